"""An `mcp` SDK upstream served in the test's own process (a uvicorn thread), so a test can change its tool
schema while it runs and see, request by request, what reached it: headers, body, the status it answered, and
which tool calls were cancelled."""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import uvicorn
from mcp.server import MCPServer
from starlette.types import ASGIApp, Receive, Scope, Send

from tests.steps_server import demo


@dataclass
class Seen:
    headers: dict[str, str]
    body: Any
    status: int


@dataclass
class LiveUpstream:
    """The server, what it saw, and switches a test flips while it runs."""

    server: MCPServer
    url: str = ""
    seen: list[Seen] = field(default_factory=list)
    always_mismatch: bool = False  # answer every tools/call with -32020, whatever its headers
    modern_only: bool = False  # refuse `initialize` (-32022): a 2026-07-28-only server
    legacy_only: bool = False  # refuse the 2026-07-28 wire (as demo servers with --era legacy): handshake era only
    started: dict[str, threading.Event] = field(default_factory=dict)
    cancelled: dict[str, threading.Event] = field(default_factory=dict)
    finished: dict[str, threading.Event] = field(default_factory=dict)
    notifications: list[dict[str, Any]] = field(default_factory=list)

    def calls(self, tool: str) -> list[Seen]:
        return [s for s in self.seen if isinstance(s.body, dict) and s.body.get("method") == "tools/call"
                and s.body["params"]["name"] == tool]

    def methods(self) -> list[str]:
        return [str(s.body.get("method")) for s in self.seen if isinstance(s.body, dict)]

    def event(self, kind: str, label: str) -> threading.Event:
        table = {"started": self.started, "cancelled": self.cancelled, "finished": self.finished}[kind]
        return table.setdefault(label, threading.Event())


class _Recorder:
    """ASGI middleware: every POST's headers and JSON body, and the status answered."""

    def __init__(self, app: ASGIApp, live: LiveUpstream) -> None:
        self.app = app
        self.live = live

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        chunks: list[bytes] = []
        more = True
        while more:
            message = await receive()
            chunks.append(message.get("body", b""))
            more = message.get("more_body", False)
        raw = b"".join(chunks)
        try:
            body = json.loads(raw)
        except ValueError:
            body = None
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        seen = Seen(headers, body, 0)
        self.live.seen.append(seen)
        if isinstance(body, dict) and "id" not in body and "method" in body:
            self.live.notifications.append(body)
        method = body.get("method") if isinstance(body, dict) else None
        refuse = None
        if self.live.always_mismatch and method == "tools/call":
            refuse = {"code": -32020, "message": "Header mcp-param-x does not match"}
        elif self.live.modern_only and method == "initialize":
            refuse = {"code": -32022, "message": "Unsupported protocol version",
                      "data": {"supported": ["2026-07-28"], "requested": body["params"].get("protocolVersion")}}
        if self.live.legacy_only and headers.get("mcp-protocol-version") == "2026-07-28":
            seen.status = 400
            await send({"type": "http.response.start", "status": 400, "headers": [(b"content-type", b"text/plain")]})
            await send({"type": "http.response.body", "body": b"Bad Request: Unsupported protocol version"})
            return
        if refuse is not None:
            payload = json.dumps({"jsonrpc": "2.0", "id": body.get("id"), "error": refuse}).encode()
            seen.status = 400
            await send({"type": "http.response.start", "status": 400,
                        "headers": [(b"content-type", b"application/json")]})
            await send({"type": "http.response.body", "body": payload})
            return
        sent = False

        async def replay() -> dict[str, Any]:
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": raw, "more_body": False}
            return dict(await receive())

        async def tap(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                seen.status = int(message["status"])
            await send(message)

        await self.app(scope, replay, tap)  # type: ignore[arg-type]


class _ThreadServer(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield  # not the main thread: the test's own signal handling stays as it is


def build(name: str, *, modern_only: bool = False, legacy_only: bool = False) -> LiveUpstream:
    """A server with `lookup(region)` (its schema is changed by tests) and `wait(label)`, which runs until it is
    cancelled (or 30 s pass) and says when it started and when it was cancelled."""
    server = MCPServer(name, version="0.1.0")
    live = LiveUpstream(server, modern_only=modern_only, legacy_only=legacy_only)

    @server.tool()
    def lookup(region: str) -> dict[str, Any]:
        """Look something up in a region."""
        return {"region": region}

    @server.tool()
    async def wait(label: str, seconds: float = 30) -> str:
        """Run until cancelled (or `seconds` pass)."""
        live.event("started", label).set()
        try:
            await asyncio.sleep(seconds)
        except asyncio.CancelledError:
            live.event("cancelled", label).set()
            raise
        live.event("finished", label).set()
        return "finished"

    return live


def mirror_region(live: LiveUpstream) -> None:
    """The upstream's schema changes under the gateway: `region` is now mirrored in the Mcp-Param-Region header
    (no list_changed is sent)."""
    tool = live.server._tool_manager.get_tool("lookup")
    assert tool is not None
    tool.parameters["properties"]["region"]["x-mcp-header"] = "Region"


@contextlib.contextmanager
def serve(live: LiveUpstream) -> Iterator[LiveUpstream]:
    sock = demo.listen("127.0.0.1", 0)
    port = sock.getsockname()[1]
    app = _Recorder(live.server.streamable_http_app(host="127.0.0.1"), live)
    server = _ThreadServer(uvicorn.Config(app, log_level="warning", lifespan="on", access_log=False,
                                          timeout_graceful_shutdown=1))
    thread = threading.Thread(target=lambda: asyncio.run(server.serve(sockets=[sock])), daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the live upstream did not start")
        time.sleep(0.02)
    live.url = f"http://127.0.0.1:{port}/mcp"
    try:
        yield live
    finally:
        server.should_exit = True
        thread.join(5)
        sock.close()
