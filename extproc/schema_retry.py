"""An upstream's -32020 (HeaderMismatch, SEP-2243) on a routed tools/call: the Mcp-Param-* headers the gateway
derived from the tool schema it had cached no longer match the schema the upstream validates against (the tool
changed and its list_changed has not arrived, or the cache is still fresh). As a client would (spec: refetch
tools/list, rebuild the headers from the newest schema, resend once), the gateway fixes it for its caller.

Pure logic, no I/O: which answers are such a mismatch, and the headers rebuilt from a newer schema.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import orjson

from catalog.view import header_map
from extproc.jsonrpc import HEADER_MISMATCH, param_headers

PARAM_PREFIX = "mcp-param-"


def is_header_mismatch(body: bytes) -> bool:
    """The upstream's JSON answer is a -32020 error."""
    try:
        msg = orjson.loads(body)
    except orjson.JSONDecodeError:
        return False
    error = msg.get("error") if isinstance(msg, dict) else None
    return isinstance(error, dict) and error.get("code") == HEADER_MISMATCH


def param_headers_for(tools: Iterable[Mapping[str, Any]], name: str, arguments: Mapping[str, Any]) -> dict[str, str]:
    """The Mcp-Param-* headers of a tools/call of `name`, from that tool's schema in `tools` (none if absent)."""
    tool = next((t for t in tools if t.get("name") == name), None)
    return param_headers(header_map(tool.get("inputSchema")), arguments) if tool is not None else {}


def rebuilt_headers(headers: Mapping[str, str], body: bytes,
                    tools: Iterable[Mapping[str, Any]]) -> dict[str, str] | None:
    """`headers` with every Mcp-Param-* derived again from the schema the upstream's fresh `tools` list gives the
    called tool, for the upstream body `body` (its name and arguments are the upstream's own). None when the
    body is not a tools/call or the list no longer has the tool: then there is nothing to resend."""
    try:
        msg = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    params = msg.get("params") if isinstance(msg, dict) and msg.get("method") == "tools/call" else None
    if not isinstance(params, dict) or not isinstance(params.get("name"), str):
        return None
    arguments = params.get("arguments")
    if not isinstance(arguments, dict):
        arguments = {}
    tools = list(tools)
    if not any(t.get("name") == params["name"] for t in tools):
        return None
    out = {k: v for k, v in headers.items() if not k.lower().startswith(PARAM_PREFIX)}
    out.update(param_headers_for(tools, params["name"], arguments))
    return out
