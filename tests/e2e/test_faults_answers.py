"""Upstream answers the gateway cannot read, error ids, the request size limit and answer timeouts (issue 9,
rows 5 to 8), through real Envoy and the real processor.

`bad` is a small handshake-era MCP server written here (raw asyncio HTTP/1.1 on loopback) that lists and
initializes correctly and misbehaves on `tools/call`, one way per tool; `prom` (JSON answers) and `vendor` (SSE,
handshake era only) are real `mcp` SDK servers that must keep working beside it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx2
import pytest

from tests.conformance import NODE
from tests.gateway_harness import Gateway, start_gateway
from tests.procs import start_demo_server

MODERN = "2026-07-28"
HANDSHAKE = "2025-11-25"
ACCEPT = {"accept": "application/json, text/event-stream", "content-type": "application/json"}
CLIENT_ID = "my-request-42"
STREAM_EVENTS = 8
STREAM_GAP_S = 0.25  # 8 events 0.25 s apart: a healthy answer that lasts twice bad's 1 s timeout
PAD = "p" * 250_000  # 8 events: 2 MB per answer

TOOLS = ["ok", "html", "empty", "not_json", "wrong_id", "bad_sse", "fail500", "echo_size", "stream",
         "slow_start", "cut", "die", "stall"]


# ---- the misbehaving upstream ---------------------------------------------------------------------------------

def _response(status: int, ctype: str | None, body: bytes, extra: str = "") -> bytes:
    head = f"HTTP/1.1 {status} X\r\ncontent-length: {len(body)}\r\n{extra}"
    if ctype is not None:
        head += f"content-type: {ctype}\r\n"
    return head.encode() + b"\r\n" + body


def _json(msg: dict[str, Any], status: int = 200, extra: str = "") -> bytes:
    return _response(status, "application/json", json.dumps(msg).encode(), extra)


def _sse_event(msg: dict[str, Any] | str) -> bytes:
    data = msg if isinstance(msg, str) else json.dumps(msg)
    return f"event: message\ndata: {data}\n\n".encode()


def _chunk(data: bytes) -> bytes:
    return f"{len(data):x}\r\n".encode() + data + b"\r\n"


class BadUpstream:
    """A handshake-era MCP server that answers initialize and tools/list well, and tools/call badly."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.port = 0
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> BadUpstream:
        self._thread.start()
        assert self._ready.wait(10)
        return self

    def __exit__(self, *exc: object) -> None:
        async def stop() -> None:
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            self.loop.stop()

        self.loop.call_soon_threadsafe(lambda: self.loop.create_task(stop()))
        self._thread.join(5)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/mcp"

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        server = self.loop.run_until_complete(asyncio.start_server(self._serve, "127.0.0.1", 0))
        self.port = server.sockets[0].getsockname()[1]
        self._ready.set()
        self.loop.run_forever()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                lines = head.decode("latin-1").split("\r\n")
                method = lines[0].split()[0]
                headers = {k.strip().lower(): v.strip() for k, v in (ln.split(":", 1) for ln in lines[1:] if ":" in ln)}
                body = await reader.readexactly(int(headers.get("content-length", "0")))
                if not await self._answer(method, body, writer):
                    break
        writer.close()

    async def _answer(self, method: str, body: bytes, writer: asyncio.StreamWriter) -> bool:
        """Write one answer; False when the connection must close after it."""
        if method == "DELETE":
            writer.write(_response(200, None, b""))
            return True
        if method != "POST":
            writer.write(_response(405, None, b"", "allow: POST, DELETE\r\n"))
            return True
        msg = json.loads(body)
        rpc, msg_id = msg.get("method"), msg.get("id")
        if msg_id is None:  # a notification
            writer.write(_response(202, None, b""))
            return True
        if rpc == "initialize":
            writer.write(_json({"jsonrpc": "2.0", "id": msg_id, "result": {
                "protocolVersion": HANDSHAKE, "capabilities": {"tools": {}},
                "serverInfo": {"name": "bad", "version": "1"}}}, extra="mcp-session-id: bad-session\r\n"))
            return True
        if rpc == "tools/list":
            tools = [{"name": t, "inputSchema": {"type": "object"}} for t in TOOLS]
            writer.write(_json({"jsonrpc": "2.0", "id": msg_id, "result": {"tools": tools}}))
            return True
        if rpc != "tools/call":
            writer.write(_json({"jsonrpc": "2.0", "id": msg_id, "error": {"code": -32601, "message": "no"}}))
            return True
        return await self._call(msg["params"]["name"], msg_id, len(body), writer)

    async def _call(self, tool: str, msg_id: Any, size: int, writer: asyncio.StreamWriter) -> bool:
        def result(text: str) -> dict[str, Any]:
            return {"jsonrpc": "2.0", "id": msg_id, "result": {"content": [{"type": "text", "text": text}]}}

        if tool == "ok":
            writer.write(_json(result("ok")))
        elif tool == "echo_size":
            writer.write(_json(result(str(size))))
        elif tool == "html":
            writer.write(_response(200, "text/html", b"<html><body>Bad gateway page</body></html>"))
        elif tool == "empty":
            writer.write(_response(200, "application/json", b""))
        elif tool == "not_json":
            writer.write(_response(200, "application/json", b'{"jsonrpc": "2.0", "id": '))
        elif tool == "wrong_id":
            writer.write(_json({**result("for someone else"), "id": "somebody-else"}))
        elif tool == "fail500":
            writer.write(_json({"jsonrpc": "2.0", "id": msg_id, "error": {"code": -32000,
                                                                         "message": "database on fire"}}, 500))
        elif tool == "slow_start":
            await asyncio.sleep(3)
            writer.write(_json(result("too late")))
        elif tool == "die":  # one event, then the connection drops mid-answer (no last chunk)
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n")
            writer.write(_chunk(_sse_event({"jsonrpc": "2.0", "method": "notifications/message",
                                            "params": {"level": "info", "data": "about to die"}})))
            await writer.drain()
            await asyncio.sleep(0.2)
            writer.transport.abort()
            return False
        elif tool == "stall":  # one event, then silence for three times the timeout, then the answer
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n")
            writer.write(_chunk(_sse_event({"jsonrpc": "2.0", "method": "notifications/message",
                                            "params": {"level": "info", "data": "thinking"}})))
            await writer.drain()
            await asyncio.sleep(3)
            writer.write(_chunk(_sse_event(result("too late"))) + b"0\r\n\r\n")
            await writer.drain()
            return False
        elif tool in ("bad_sse", "stream", "cut"):
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n")
            if tool == "bad_sse":
                writer.write(_chunk(_sse_event("{oops")))
            else:
                for step in range(STREAM_EVENTS if tool == "stream" else 1):
                    note = {"jsonrpc": "2.0", "method": "notifications/message",
                            "params": {"level": "info", "data": f"step {step} {PAD}"}}
                    writer.write(_chunk(_sse_event(note)))
                    await writer.drain()
                    await asyncio.sleep(STREAM_GAP_S)
                if tool == "stream":
                    writer.write(_chunk(_sse_event(result(f"streamed {STREAM_EVENTS} events"))))
            writer.write(b"0\r\n\r\n")
            await writer.drain()
            return False
        await writer.drain()
        return True


# ---- the gateway and its clients ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    work = tmp_path_factory.mktemp("faults_answers")
    with contextlib.ExitStack() as stack:
        bad = stack.enter_context(BadUpstream())
        prom = stack.enter_context(start_demo_server("prometheus", name="prom", json_response=True))
        vendor = stack.enter_context(start_demo_server("vendor", name="vendor", era="legacy"))
        yield stack.enter_context(start_gateway(work, {"bad": {"url": bad.url, "timeout": 1}, "prom": prom.url,
                                                       "vendor": vendor.url}, prefixMode="never"))


def modern_call(tool: str, arguments: dict[str, Any] | None = None) -> tuple[dict[str, str], bytes]:
    meta = {"io.modelcontextprotocol/protocolVersion": MODERN, "io.modelcontextprotocol/clientCapabilities": {}}
    body = {"jsonrpc": "2.0", "id": CLIENT_ID, "method": "tools/call",
            "params": {"name": tool, "arguments": arguments or {}, "_meta": meta}}
    headers = {**ACCEPT, "mcp-protocol-version": MODERN, "mcp-method": "tools/call", "mcp-name": tool}
    return headers, json.dumps(body).encode()


def messages(resp: httpx2.Response) -> list[dict[str, Any]]:
    """The JSON-RPC messages of an answer, JSON or SSE."""
    if "event-stream" not in resp.headers.get("content-type", ""):
        return [resp.json()]
    out = []
    for event in resp.text.replace("\r\n", "\n").split("\n\n"):
        data = [ln[5:].lstrip() for ln in event.split("\n") if ln.startswith("data:")]
        if data and any(data):
            out.append(json.loads("\n".join(data)))
    return out


def answer(resp: httpx2.Response) -> dict[str, Any]:
    """The one response among an answer's messages (notifications before it are left out)."""
    found = [m for m in messages(resp) if "result" in m or "error" in m]
    assert len(found) == 1, resp.text[-2000:]
    return found[0]


def call_modern(gw: Gateway, tool: str, arguments: dict[str, Any] | None = None) -> httpx2.Response:
    headers, body = modern_call(tool, arguments)
    with httpx2.Client(timeout=30) as http:
        return http.post(gw.url, content=body, headers=headers)


@contextlib.contextmanager
def legacy_session(gw: Gateway) -> Iterator[httpx2.Client]:
    """A handshake-era client session at the gateway (its session id and version on every request)."""
    init = {"jsonrpc": "2.0", "id": 0, "method": "initialize", "params": {
        "protocolVersion": HANDSHAKE, "capabilities": {}, "clientInfo": {"name": "faults", "version": "1"}}}
    with httpx2.Client(timeout=30) as http:
        resp = http.post(gw.url, content=json.dumps(init), headers=ACCEPT)
        assert resp.status_code == 200, resp.text
        http.headers.update({**ACCEPT, "mcp-session-id": resp.headers["mcp-session-id"],
                             "mcp-protocol-version": HANDSHAKE})
        http.post(gw.url, content=json.dumps({"jsonrpc": "2.0", "method": "notifications/initialized"}))
        yield http


def call_legacy(http: httpx2.Client, gw: Gateway, tool: str, arguments: dict[str, Any] | None = None,
                msg_id: Any = CLIENT_ID) -> httpx2.Response:
    body = {"jsonrpc": "2.0", "id": msg_id, "method": "tools/call", "params": {"name": tool,
                                                                              "arguments": arguments or {}}}
    return http.post(gw.url, content=json.dumps(body))


def assert_names_bad(msg: dict[str, Any], code: int = -32603) -> dict[str, Any]:
    assert msg["id"] == CLIENT_ID, msg
    error = msg["error"]
    assert error["code"] == code and "Upstream server 'bad'" in error["message"], msg
    assert error["data"]["server"] == "bad", msg
    return dict(error)


def assert_untouched_servers_work(gw: Gateway) -> None:
    """Calls to the SDK servers beside `bad` all succeed, in both eras."""
    for tool, args in (("list_alerts", {}), ("echo", {"text": "still here"})):
        resp = call_modern(gw, tool, args)
        assert resp.status_code == 200 and "result" in answer(resp), resp.text
    with legacy_session(gw) as http:
        for tool, args in (("list_alerts", {}), ("echo", {"text": "still here"}), ("ok", {})):
            resp = call_legacy(http, gw, tool, args)
            assert resp.status_code == 200 and "result" in answer(resp), resp.text
    assert answer(call_modern(gw, "ok"))["result"]["content"][0]["text"] == "ok"


# ---- row 5: answers the gateway cannot read --------------------------------------------------------------------

@pytest.mark.parametrize("tool", ["html", "empty", "not_json", "wrong_id"])
def test_an_unreadable_json_answer_becomes_an_error_naming_the_server(gw: Gateway, tool: str) -> None:
    """200 with HTML, an empty 200, malformed JSON and an answer to another id: never passed on as they came.
    A 2026-07-28 client on a handshake-era upstream: its answers are read (ids are mapped back)."""
    resp = call_modern(gw, tool)
    # decided from the headers: 502; found in a body whose headers were already on their way: the error replaces
    # the body under the upstream's status
    assert resp.status_code == (502 if tool in ("html", "empty") else 200), resp.text
    error = assert_names_bad(resp.json())
    assert error["message"] == "Upstream server 'bad' answered with an invalid response"
    assert "for someone else" not in resp.text and "<html>" not in resp.text
    assert_untouched_servers_work(gw)


def test_an_answer_that_is_no_mcp_is_an_error_in_the_handshake_era_too(gw: Gateway) -> None:
    """Decided from the status and headers alone (Envoy's matcher): no body needs reading."""
    with legacy_session(gw) as http:
        for tool in ("html", "empty"):
            resp = call_legacy(http, gw, tool)
            assert resp.status_code == 502, resp.text
            assert_names_bad(resp.json())


def test_malformed_sse_ends_with_an_error_event(gw: Gateway) -> None:
    """An SSE event whose data is not JSON-RPC becomes an error event with the client's id, in both eras."""
    resp = call_modern(gw, "bad_sse")
    assert resp.status_code == 200 and "event-stream" in resp.headers["content-type"]
    assert_names_bad(answer(resp))
    assert "{oops" not in resp.text
    with legacy_session(gw) as http:
        resp = call_legacy(http, gw, "bad_sse")
        assert_names_bad(answer(resp))
    assert_untouched_servers_work(gw)


# ---- row 6: the client's own id on a mapped error --------------------------------------------------------------

def test_an_upstream_500_with_a_json_rpc_error_reaches_the_client_with_its_own_id(gw: Gateway) -> None:
    """bad speaks the handshake era; a 2026-07-28 client shares one upstream session, so the upstream saw the
    gateway's own request id. The upstream's code and message are kept, the server named."""
    resp = call_modern(gw, "fail500")
    assert resp.status_code == 502, resp.text
    error = assert_names_bad(resp.json(), code=-32000)
    assert error["message"] == "Upstream server 'bad': database on fire" and error["data"]["status"] == 500
    with legacy_session(gw) as http:
        resp = call_legacy(http, gw, "fail500")
        assert resp.status_code == 502 and assert_names_bad(resp.json(), code=-32000)
    assert_untouched_servers_work(gw)


# ---- row 7: maxRequestBytes is the limit a client meets --------------------------------------------------------

def _sized_call(size: int) -> tuple[dict[str, str], bytes]:
    headers, body = modern_call("echo_size", {"pad": ""})
    body = body.replace(b'"pad": ""', b'"pad": "' + b"x" * (size - len(body)) + b'"')
    assert len(body) == size
    return headers, body


def _http2(gw: Gateway, headers: dict[str, str], body: bytes, tmp: Path) -> tuple[int, dict[str, Any]]:
    """POST over HTTP/2 (prior knowledge) with Node's http2 client: curl 7.88 drops an early answer."""
    node = str(NODE) if NODE.exists() else shutil.which("node")
    if node is None:
        pytest.skip("no Node for the HTTP/2 client")
    (tmp / "body").write_bytes(body)
    script = """
const http2 = require('http2'); const fs = require('fs');
const [url, file, headers] = [new URL(process.argv[2]), process.argv[3], JSON.parse(process.argv[4])];
const c = http2.connect(url.origin); const body = fs.readFileSync(file);
const req = c.request({':method': 'POST', ':path': url.pathname, ...headers, 'content-length': String(body.length)});
let status = 0, data = '';
req.on('response', h => { status = h[':status']; }); req.on('data', d => { data += d; });
req.on('error', e => { data = 'error ' + e.code; });
req.on('close', () => { console.log(JSON.stringify({status, data})); c.close(); });
req.end(body);
"""
    (tmp / "post.js").write_text(script)
    out = subprocess.run([node, str(tmp / "post.js"), gw.url, str(tmp / "body"), json.dumps(headers)],
                         capture_output=True, text=True, timeout=60, check=True)
    result = json.loads(out.stdout)
    return int(result["status"]), json.loads(result["data"]) if result["data"].startswith("{") else result


def test_max_request_bytes_is_the_limit_on_http1_and_http2(gw: Gateway, tmp_path: Path) -> None:
    """Up to maxRequestBytes (4 MiB here) a body reaches the upstream whole, on both protocols; over it, 413
    with a JSON-RPC error, before the body is read."""
    limit = 4 * 1024 * 1024
    with httpx2.Client(timeout=60) as http:
        for size in (1024 * 1024 + 1, limit - 4096):
            headers, body = _sized_call(size)
            resp = http.post(gw.url, content=body, headers=headers)
            assert resp.status_code == 200, (size, resp.status_code, resp.text[:300])
            assert int(answer(resp)["result"]["content"][0]["text"]) > size - 1024  # what bad received
            status, msg = _http2(gw, headers, body, tmp_path)
            assert status == 200 and int(msg["result"]["content"][0]["text"]) > size - 1024, (size, msg)
    headers, body = _sized_call(limit + 1)
    status, msg = _http2(gw, headers, body, tmp_path)
    assert status == 413, msg
    assert msg["id"] is None and msg["error"]["code"] == -32600 and "maxRequestBytes" in msg["error"]["message"]
    # HTTP/1.1: a client that waits for the answer to its headers (Expect: 100-continue) is told 413
    with httpx2.Client(timeout=30) as http:
        resp = http.post(gw.url, content=body, headers={**headers, "expect": "100-continue"})
    assert resp.status_code == 413 and resp.json()["error"]["code"] == -32600
    assert_untouched_servers_work(gw)


# ---- row 8: timeouts bound the start and the gaps, never a stream that is still sending -------------------------

def test_a_healthy_stream_longer_than_the_timeout_is_never_cut(gw: Gateway) -> None:
    """bad's timeout is 1 s; its answer streams 2 MB in events 0.25 s apart for 2 s: it arrives whole, several
    at once, in both eras (the handshake era: SSE rewritten event by event by the processor)."""
    async def legacy(http: httpx2.AsyncClient) -> httpx2.Response:
        init = {"jsonrpc": "2.0", "id": 0, "method": "initialize", "params": {
            "protocolVersion": HANDSHAKE, "capabilities": {}, "clientInfo": {"name": "faults", "version": "1"}}}
        sid = (await http.post(gw.url, content=json.dumps(init), headers=ACCEPT)).headers["mcp-session-id"]
        body = {"jsonrpc": "2.0", "id": CLIENT_ID, "method": "tools/call", "params": {"name": "stream",
                                                                                     "arguments": {}}}
        return await http.post(gw.url, content=json.dumps(body), headers={
            **ACCEPT, "mcp-session-id": sid, "mcp-protocol-version": HANDSHAKE})

    async def many() -> list[httpx2.Response]:
        headers, body = modern_call("stream")
        async with httpx2.AsyncClient(timeout=30) as http:
            return list(await asyncio.gather(*(http.post(gw.url, content=body, headers=headers) for _ in range(3)),
                                             *(legacy(http) for _ in range(3))))

    for resp in asyncio.run(many()):
        assert resp.status_code == 200
        assert answer(resp)["result"]["content"][0]["text"] == f"streamed {STREAM_EVENTS} events"
        assert answer(resp)["id"] == CLIENT_ID
        notes = [m for m in messages(resp) if m.get("method") == "notifications/message"]
        assert len(notes) == STREAM_EVENTS and all(PAD in n["params"]["data"] for n in notes)


def test_an_answer_that_does_not_start_in_time_is_a_timeout_error_with_the_clients_id(gw: Gateway) -> None:
    resp = call_modern(gw, "slow_start")
    assert resp.status_code == 504, resp.text
    error = assert_names_bad(resp.json())
    assert error["message"] == "Upstream server 'bad' timed out"
    assert_untouched_servers_work(gw)


def test_a_gap_between_events_longer_than_the_timeout_ends_the_answer(gw: Gateway) -> None:
    """bad's route idle timeout is its `timeout` (1 s): a stream silent for 3 s after its first event is cut;
    its headers were sent, so the client sees a broken stream, not a late or a silently short answer."""
    with pytest.raises(httpx2.TransportError):
        resp = call_modern(gw, "stall")
        pytest.fail(f"not cut: {resp.status_code} {resp.text[-500:]}")
    with legacy_session(gw) as http, pytest.raises(httpx2.TransportError):
        resp = call_legacy(http, gw, "stall")
        pytest.fail(f"not cut: {resp.status_code} {resp.text[-500:]}")
    assert_untouched_servers_work(gw)


def test_a_stream_that_ends_without_the_answer_ends_with_an_error_event(gw: Gateway) -> None:
    resp = call_modern(gw, "cut")
    assert resp.status_code == 200
    assert_names_bad(answer(resp))
    with legacy_session(gw) as http:
        resp = call_legacy(http, gw, "cut")
    assert [m.get("method") for m in messages(resp)][:1] == ["notifications/message"]
    error = assert_names_bad(answer(resp))
    assert "ended without an answer" in error["data"]["details"]


def test_an_upstream_that_dies_mid_answer_is_never_a_clean_silent_end(gw: Gateway) -> None:
    """The upstream's connection drops after headers and one event: Envoy resets the client's stream (nothing can
    be added to it then), so the client sees a broken answer, in both eras; never a complete answer without
    its response."""
    with pytest.raises(httpx2.TransportError):
        resp = call_modern(gw, "die")
        pytest.fail(f"a clean end: {resp.status_code} {resp.text[-500:]}")
    with legacy_session(gw) as http, pytest.raises(httpx2.TransportError):
        resp = call_legacy(http, gw, "die")
        pytest.fail(f"a clean end: {resp.status_code} {resp.text[-500:]}")
    assert_untouched_servers_work(gw)


# ---- the common path keeps its cost ----------------------------------------------------------------------------

def test_a_plain_routed_call_costs_one_ext_proc_message(gw: Gateway) -> None:
    """The request body (its headers carried in metadata), nothing for an answer that needs nothing (a modern
    client on modern SDK servers, JSON or SSE); an answer the processor reads costs one stream and one message more."""
    def cost(tool: str, args: dict[str, Any]) -> tuple[int, int, int]:
        call_modern(gw, tool, args)
        before = gw.processor_traffic()
        for _ in range(5):
            assert "result" in answer(call_modern(gw, tool, args))
        return tuple(b - a for a, b in zip(before, gw.processor_traffic(), strict=True))  # type: ignore[return-value]

    assert cost("list_alerts", {}) == (5, 5, 5)
    assert cost("ok", {}) == (5, 10, 10)  # a handshake-era upstream: its answer's id is mapped back
