"""Changes to an upstream's answer on its way back: ids, URIs, result type, error codes.

Works on one JSON-RPC message at a time; `SseRewriter` reassembles events that Envoy delivers split across
chunks and rewrites each whole event, passing everything else through byte for byte. Where the processor reads
an answer it also checks it (`read_answer`, `SseRewriter`): what cannot be read as the MCP answer to this call
becomes a JSON-RPC error naming the server, with the client's own id (`invalid_answer`).
"""

from __future__ import annotations

import re
from typing import Any

import orjson

from catalog.view import View
from extproc import jsonrpc
from extproc.replies import ResponsePlan

_MAX_DEPTH = 8
_MAX_WHY = 200
_NS = ":"


def namespaced(server: str, text: str) -> str:
    """A server-to-client request id (its JSON text) or SSE event id made unique across upstreams."""
    return f"{server}{_NS}{text}"


def split_namespaced(value: Any) -> tuple[str, str] | None:
    if not isinstance(value, str) or _NS not in value:
        return None
    server, _, rest = value.partition(_NS)
    return (server, rest) if server and rest else None


def original_request_id(raw: str) -> Any:
    """Undo `namespaced` for a JSON-RPC id: ints and strings come back as they were sent."""
    try:
        value = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return raw
    return value if isinstance(value, (int, str)) and not isinstance(value, bool) else raw


def _map_uris(node: Any, view: View, server: str, depth: int = 0) -> None:
    if depth > _MAX_DEPTH:
        return
    if isinstance(node, list):
        for item in node:
            _map_uris(item, view, server, depth + 1)
        return
    if not isinstance(node, dict):
        return
    kind = node.get("type")
    if kind == "resource_link" and isinstance(node.get("uri"), str):
        node["uri"] = view.client_uri(server, node["uri"])
    resource = node.get("resource")
    if kind == "resource" and isinstance(resource, dict) and isinstance(resource.get("uri"), str):
        resource["uri"] = view.client_uri(server, resource["uri"])
    for key in ("content", "contents", "messages", "structuredContent"):
        child = node.get(key)
        if isinstance(child, (list, dict)):
            if key == "contents" and isinstance(child, list):
                for item in child:
                    if isinstance(item, dict) and isinstance(item.get("uri"), str):
                        item["uri"] = view.client_uri(server, item["uri"])
            _map_uris(child, view, server, depth + 1)


def rewrite_message(msg: dict[str, Any], plan: ResponsePlan, view: View, server_info: dict[str, Any]) -> dict[str, Any]:
    if "method" in msg and "id" in msg:
        if plan.namespace:  # a server-to-client request: the client's answer must find its way back
            msg["id"] = namespaced(plan.namespace, orjson.dumps(msg["id"]).decode())
        return msg
    if "result" in msg or "error" in msg:
        if plan.restore_id:
            msg["id"] = plan.client_id
        result = msg.get("result")
        if isinstance(result, dict):
            if plan.map_uris:
                _map_uris(result, view, plan.server)
            if plan.modern_client:
                result.setdefault("resultType", "complete")
                meta = result.get("_meta")
                meta = meta if isinstance(meta, dict) else {}
                meta[jsonrpc.META_SERVER_INFO] = server_info
                result["_meta"] = meta
        error = msg.get("error")
        if isinstance(error, dict) and plan.modern_client and error.get("code") == jsonrpc.LEGACY_RESOURCE_NOT_FOUND:
            error["code"] = jsonrpc.INVALID_PARAMS
    elif plan.map_uris and msg.get("method") == "notifications/resources/updated":
        params = msg.get("params")
        if isinstance(params, dict) and isinstance(params.get("uri"), str):
            params["uri"] = view.client_uri(plan.server, params["uri"])
    return msg


class Unreadable(Exception):
    """An upstream answer that cannot be read as the MCP answer to this call; the text says why."""


def invalid_answer(plan: ResponsePlan, why: str, status: int | None = None) -> bytes:
    """The JSON-RPC error a client gets for an upstream answer the gateway cannot read (its own id)."""
    data: dict[str, Any] = {"server": plan.server, "details": why[:_MAX_WHY]}
    if status is not None:
        data["status"] = status
    return jsonrpc.error_body(plan.client_id, jsonrpc.INTERNAL_ERROR,
                              f"Upstream server '{plan.server}' answered with an invalid response", data)


def _check_response(msg: Any, plan: ResponsePlan) -> None:
    """A JSON-RPC response to the call this plan is for; raises Unreadable otherwise."""
    if not isinstance(msg, dict) or msg.get("jsonrpc") != "2.0":
        raise Unreadable("not a JSON-RPC 2.0 message")
    has_result, error = "result" in msg, msg.get("error")
    if has_result == (error is not None):
        raise Unreadable("neither a result nor an error")
    if error is not None and not (isinstance(error, dict) and isinstance(error.get("code"), int)
                                  and isinstance(error.get("message"), str)):
        raise Unreadable("a malformed error object")
    if plan.upstream_id is not None and (msg.get("id") != plan.upstream_id
                                         or type(msg.get("id")) is not type(plan.upstream_id)):
        raise Unreadable(f"answered id {orjson.dumps(msg.get('id')).decode()[:40]}, not the call's")


def read_answer(body: bytes, plan: ResponsePlan) -> dict[str, Any]:
    """A JSON answer parsed and checked: one JSON-RPC response to this call. Raises Unreadable."""
    if not body.strip():
        raise Unreadable("an empty body")
    try:
        msg = orjson.loads(body)
    except orjson.JSONDecodeError:
        raise Unreadable("not JSON") from None
    _check_response(msg, plan)
    return msg  # type: ignore[no-any-return]


def mapped_error(body: bytes, plan: ResponsePlan, status: int) -> bytes:
    """An upstream's JSON error answer (4xx/5xx) for the client: its own id, the server named, the upstream's
    code and message kept; anything else in such a body is an invalid answer."""
    try:
        msg = read_answer(body, plan)
        if "error" not in msg:
            raise Unreadable(f"HTTP {status} with a result")
    except Unreadable as exc:
        return invalid_answer(plan, str(exc), status)
    error = msg["error"]
    code = error["code"]
    if plan.modern_client and code == jsonrpc.LEGACY_RESOURCE_NOT_FOUND:
        code = jsonrpc.INVALID_PARAMS
    data: dict[str, Any] = {"server": plan.server, "status": status}
    if "data" in error:
        data["upstream"] = error["data"]
    return jsonrpc.error_body(plan.client_id, code, f"Upstream server '{plan.server}': {error['message']}", data)


def rewrite_json(body: bytes, plan: ResponsePlan, view: View, server_info: dict[str, Any]) -> bytes | None:
    try:
        msg = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(msg, dict):
        return None
    return orjson.dumps(rewrite_message(msg, plan, view, server_info))


_LINE_END = re.compile(rb"\r\n|\r|\n")
_BLANK_LINE = re.compile(rb"(?:\r\n|\n|\r(?!\n))(?:\r\n|\n|\r(?!\n))")


class SseRewriter:
    """Feed response chunks; get back the bytes of the whole events seen so far, rewritten.

    Events end at a blank line, with lines ended by CRLF, LF or CR (the SSE grammar). An event is held back
    until it is whole; a lone CR at the end of a chunk waits for the next chunk, which may start with LF.
    With `check`, an event whose data is not a JSON-RPC message, a response to another id, or a stream that
    ends without the answer to the call becomes an error event (the client's id, naming the server), and
    nothing after the answer is passed on.
    """

    def __init__(self, plan: ResponsePlan, view: View, server_info: dict[str, Any], check: bool = True) -> None:
        self._plan = plan
        self._view = view
        self._info = server_info
        self._buf = b""
        self._check = check and plan.upstream_id is not None
        self.answered = False
        self.resumable = False  # an event carried an id: the client may resume the stream (GET + Last-Event-ID)

    def feed(self, chunk: bytes, end: bool) -> bytes:
        if self.answered and self._check:
            return b""  # the call is answered (or failed): nothing more reaches the client
        self._buf += chunk
        out: list[bytes] = []
        while not (self.answered and self._check):
            match = _BLANK_LINE.search(self._buf)
            if match is None or (not end and match.end() == len(self._buf) and self._buf.endswith(b"\r")):
                break
            out.append(self._event(self._buf[:match.start()]) + self._buf[match.start():match.end()])
            self._buf = self._buf[match.end():]
        if end and self._buf and not (self.answered and self._check):
            if self._check:  # an event cut off by the end of the stream
                out.append(self._error("the stream ended inside an event"))
            else:
                out.append(self._event(self._buf))
            self._buf = b""
        if end and self._check and not self.answered and not self.resumable:
            # a stream whose events have ids may end before its answer (the server closed it, SEP-1699): the
            # client resumes it with Last-Event-ID, on whichever worker or replica
            out.append(self._error("the stream ended without an answer"))
        return b"".join(out)

    def _error(self, why: str) -> bytes:
        self.answered = True
        return b"event: message\ndata: " + invalid_answer(self._plan, why) + b"\n\n"

    def _event(self, raw: bytes) -> bytes:
        """One event without its blank line; untouched bytes unless something in it must change."""
        lines = _LINE_END.split(raw)
        found = _LINE_END.search(raw)
        eol = found.group() if found else b"\n"
        changed = False
        if any(ln.startswith(b"id:") and ln[3:].strip() for ln in lines):
            self.resumable = True
        if self._plan.namespace and any(ln.startswith(b"id:") for ln in lines):
            prefix = self._plan.namespace.encode() + _NS.encode()
            lines = [b"id: " + prefix + ln[3:].lstrip(b" ") if ln.startswith(b"id:") else ln for ln in lines]
            changed = True
        data = [ln[6:] if ln.startswith(b"data: ") else ln[5:] for ln in lines if ln.startswith(b"data:")]
        msg: Any = None
        if data and any(data):
            try:
                msg = orjson.loads(b"\n".join(data))
            except orjson.JSONDecodeError:
                msg = None
            if self._check and not isinstance(msg, dict):
                return self._error("an event that is not a JSON-RPC message")[:-2]
        if not isinstance(msg, dict):
            return eol.join(lines) if changed else raw
        if self._check and ("result" in msg or "error" in msg) and "method" not in msg:
            try:
                _check_response(msg, self._plan)
            except Unreadable as exc:
                return self._error(str(exc))[:-2]
            self.answered = True
        new = orjson.dumps(rewrite_message(msg, self._plan, self._view, self._info))
        kept = [ln for ln in lines if not ln.startswith(b"data:")]
        return eol.join([*kept, b"data: " + new])
