"""JSON-RPC for both MCP eras: parse a body once, classify it, and shape errors with the right HTTP status.

Pure: no I/O. The one validation ladder for a POSTed body lives in `classify`; everything after it reads the
typed `Message` and never the raw bytes again.
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Mapping
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

import orjson

PARSE_ERROR = -32700
INVALID_REQUEST = -32600
METHOD_NOT_FOUND = -32601
INVALID_PARAMS = -32602
INTERNAL_ERROR = -32603
HEADER_MISMATCH = -32020
MISSING_CAPABILITY = -32021
UNSUPPORTED_VERSION = -32022
LEGACY_RESOURCE_NOT_FOUND = -32002

HANDSHAKE_VERSIONS = ("2024-11-05", "2025-03-26", "2025-06-18", "2025-11-25")
MODERN_VERSIONS = ("2026-07-28",)
LATEST_HANDSHAKE = "2025-11-25"
LATEST_MODERN = "2026-07-28"
DEFAULT_LEGACY_VERSION = "2025-03-26"

META_VERSION = "io.modelcontextprotocol/protocolVersion"
META_CAPABILITIES = "io.modelcontextprotocol/clientCapabilities"
META_CLIENT_INFO = "io.modelcontextprotocol/clientInfo"
META_SERVER_INFO = "io.modelcontextprotocol/serverInfo"
META_LOG_LEVEL = "io.modelcontextprotocol/logLevel"

NAME_BEARING = {"tools/call": "name", "prompts/get": "name", "resources/read": "uri",
                # the tasks extension: Mcp-Name carries params.taskId
                "tasks/get": "taskId", "tasks/update": "taskId", "tasks/cancel": "taskId"}

_MODERN_STATUS = {
    PARSE_ERROR: 400, INVALID_REQUEST: 400, INVALID_PARAMS: 400, HEADER_MISMATCH: 400,
    MISSING_CAPABILITY: 400, UNSUPPORTED_VERSION: 400, METHOD_NOT_FOUND: 404,
}
_LEGACY_STATUS = {PARSE_ERROR: 400, INVALID_REQUEST: 400}

LEGACY = "legacy"
MODERN = "modern"


class RpcError(Exception):
    """A JSON-RPC error the gateway answers with; `status` overrides the era's default HTTP status."""

    def __init__(self, code: int, message: str, data: Any = None, status: int | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.data = data
        self.status = status

    def http_status(self, era: str) -> int:
        if self.status is not None:
            return self.status
        table = _MODERN_STATUS if era == MODERN else _LEGACY_STATUS
        return table.get(self.code, 200)


@dataclass(frozen=True)
class Message:
    """One parsed JSON-RPC message as the client sent it."""

    obj: dict[str, Any]
    method: str
    id: Any
    params: dict[str, Any]
    era: str
    version: str

    @property
    def is_notification(self) -> bool:
        return "id" not in self.obj

    @property
    def meta(self) -> dict[str, Any]:
        meta = self.params.get("_meta")
        return meta if isinstance(meta, dict) else {}


def parse(body: bytes) -> Any:
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise RpcError(PARSE_ERROR, f"Parse error: {exc.msg}") from None


_SENTINEL_HEAD = "=?base64?"
_SENTINEL_TAIL = "?="
_VISIBLE = re.compile(r"[\x20-\x7e]*")
_DECIMAL = re.compile(r"-?[0-9]+(\.[0-9]+)?")


def _looks_sentinel(value: str) -> bool:
    return value.startswith(_SENTINEL_HEAD) and value.endswith(_SENTINEL_TAIL) and \
        len(value) >= len(_SENTINEL_HEAD) + len(_SENTINEL_TAIL)


def encode_header_value(value: str) -> str:
    """Mcp-Name / Mcp-Param-* value encoding: plain visible ASCII, else the base64 sentinel."""
    if _VISIBLE.fullmatch(value) and value == value.strip() and not _looks_sentinel(value):
        return value
    return _SENTINEL_HEAD + base64.b64encode(value.encode()).decode() + _SENTINEL_TAIL


def decode_header_value(value: str) -> str | None:
    """The value a header carries; None when it is a malformed or non-canonical sentinel."""
    if not _looks_sentinel(value):
        return value
    raw = value[len(_SENTINEL_HEAD):-len(_SENTINEL_TAIL)]
    try:
        decoded = base64.b64decode(raw, validate=True)
    except (binascii.Error, ValueError):
        return None
    if base64.b64encode(decoded).decode() != raw:
        return None
    try:
        return decoded.decode()
    except UnicodeDecodeError:
        return None


def _integral(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return None


def render_param(value: Any) -> str | None:
    """How a tool argument is mirrored into an Mcp-Param-* header (None: not mirrored)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if (number := _integral(value)) is not None:
        return str(number)
    if isinstance(value, str):
        return encode_header_value(value)
    return None


def value_at(arguments: Mapping[str, Any], path: tuple[str, ...]) -> Any:
    node: Any = arguments
    for key in path:
        if not isinstance(node, Mapping) or key not in node:
            return None
        node = node[key]
    return node


def param_headers(hmap: Mapping[tuple[str, ...], str], arguments: Mapping[str, Any]) -> dict[str, str]:
    out: dict[str, str] = {}
    for path, token in hmap.items():
        rendered = render_param(value_at(arguments, path))
        if rendered is not None:
            out[f"mcp-param-{token.lower()}"] = rendered
    return out


def _param_matches(value: Any, decoded: str | None) -> bool:
    if decoded is None:
        return False
    if isinstance(value, bool):
        return decoded == ("true" if value else "false")
    if (number := _integral(value)) is not None:
        return bool(_DECIMAL.fullmatch(decoded)) and Decimal(decoded) == number
    if isinstance(value, str):
        return decoded == value
    return False


def check_param_headers(hmap: Mapping[tuple[str, ...], str], arguments: Mapping[str, Any],
                        headers: Mapping[str, str]) -> None:
    """Every mirrored argument must match its Mcp-Param-* header, both ways (else -32020)."""
    for path, token in hmap.items():
        name = f"mcp-param-{token.lower()}"
        value = value_at(arguments, path)
        sent = headers.get(name)
        if value is None or render_param(value) is None:
            if sent is not None:
                raise RpcError(HEADER_MISMATCH, f"Header {name} is set but argument {'.'.join(path)} is absent")
            continue
        if sent is None:
            raise RpcError(HEADER_MISMATCH, f"Header {name} is required for argument {'.'.join(path)}")
        if not _param_matches(value, decode_header_value(sent)):
            raise RpcError(HEADER_MISMATCH, f"Header {name} does not match argument {'.'.join(path)}")


def classify(obj: Any, headers: Mapping[str, str]) -> Message:
    """The validation ladder for one POSTed body: shape, era, envelope, routing headers."""
    if isinstance(obj, list):
        raise RpcError(INVALID_REQUEST, "Body must be a single JSON-RPC request or notification object "
                                        "(batches are not supported)")
    if not isinstance(obj, dict) or obj.get("jsonrpc") != "2.0":
        raise RpcError(INVALID_REQUEST, "Invalid Request: expected a JSON-RPC 2.0 object")
    if "method" not in obj:
        if "result" in obj or "error" in obj:
            raise RpcError(INVALID_REQUEST, "Invalid Request: responses to the gateway are not supported", status=400)
        raise RpcError(INVALID_REQUEST, "Invalid Request: missing method")
    method = obj["method"]
    if not isinstance(method, str) or not method:
        raise RpcError(INVALID_REQUEST, "Invalid Request: method must be a non-empty string")
    if "id" in obj and (isinstance(obj["id"], bool) or not isinstance(obj["id"], (str, int)) or obj["id"] is None):
        raise RpcError(INVALID_REQUEST, "Invalid Request: id must be a string or an integer")
    params = obj.get("params", {})
    if params is None:
        params = {}
    if not isinstance(params, dict):
        raise RpcError(INVALID_REQUEST, "Invalid Request: params must be an object")
    header_version = headers.get("mcp-protocol-version")
    if header_version is None or header_version in HANDSHAKE_VERSIONS:
        return Message(obj, method, obj.get("id"), params, LEGACY, header_version or DEFAULT_LEGACY_VERSION)
    return _modern(obj, method, params, header_version, headers)


def _modern(obj: dict[str, Any], method: str, params: dict[str, Any], header_version: str,
            headers: Mapping[str, str]) -> Message:
    meta = params.get("_meta")
    msg = Message(obj, method, obj.get("id"), params, MODERN, header_version)
    if "id" not in obj:
        return msg  # notifications carry no envelope over HTTP
    if not isinstance(meta, dict) or META_VERSION not in meta or META_CAPABILITIES not in meta:
        raise RpcError(INVALID_PARAMS, f"Invalid params: _meta must carry {META_VERSION} and {META_CAPABILITIES}")
    if meta[META_VERSION] != header_version:
        raise RpcError(HEADER_MISMATCH, "MCP-Protocol-Version header does not match _meta protocolVersion")
    if headers.get("mcp-method") != method:
        raise RpcError(HEADER_MISMATCH, "Mcp-Method header does not match the body's method")
    key = NAME_BEARING.get(method)
    if key is not None:
        body_name = params.get(key)
        sent = headers.get("mcp-name")
        if body_name is not None and (sent is None or decode_header_value(sent) != body_name):
            raise RpcError(HEADER_MISMATCH, f"Mcp-Name header does not match params.{key}")
    if not isinstance(meta[META_VERSION], str):
        raise RpcError(INVALID_PARAMS, "Invalid params: protocolVersion must be a string")
    if header_version not in MODERN_VERSIONS:
        raise RpcError(UNSUPPORTED_VERSION, f"Unsupported protocol version: {header_version}",
                       {"supported": [*MODERN_VERSIONS, *reversed(HANDSHAKE_VERSIONS)], "requested": header_version})
    return msg


def dumps(obj: Any) -> bytes:
    return orjson.dumps(obj)


def error_body(msg_id: Any, code: int, message: str, data: Any = None) -> bytes:
    err: dict[str, Any] = {"code": code, "message": message}
    if data is not None:
        err["data"] = data
    return orjson.dumps({"jsonrpc": "2.0", "id": msg_id, "error": err})


def result_body(msg_id: Any, result: Any) -> bytes:
    return orjson.dumps({"jsonrpc": "2.0", "id": msg_id, "result": result})
