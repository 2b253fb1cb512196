"""The MCP requests the benchmark sends, rendered once as bytes, for both protocol eras.

Every target gets the same JSON-RPC body for a given upstream; only the tool name differs (the upstream's own
name when talking to it directly or through plain Envoy, the prefixed name through a gateway). The modern
(2026-07-28) wire carries the `_meta` envelope and the Mcp-Method / Mcp-Name headers; the legacy wire opens a
session with `initialize` + `notifications/initialized` first and carries `Mcp-Session-Id` on every call.
"""

from __future__ import annotations

import contextlib
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import orjson

from bench.http1 import Message, render_request

MODERN = "2026-07-28"
LEGACY = "legacy"
LEGACY_VERSION = "2025-11-25"
ENVELOPE = {"io.modelcontextprotocol/protocolVersion": MODERN, "io.modelcontextprotocol/clientCapabilities": {}}
CLIENT_INFO = {"name": "muster-edge-bench", "version": "1"}
ACCEPT = {"accept": "application/json, text/event-stream", "content-type": "application/json"}

Exchange = Callable[[bytes], Awaitable[Message]]


@dataclass(frozen=True)
class Endpoint:
    host: str
    port: int
    path: str = "/mcp"

    @classmethod
    def parse(cls, url: str) -> Endpoint:
        parts = urlsplit(url)
        return cls(parts.hostname or "127.0.0.1", parts.port or 80, parts.path or "/")

    @property
    def authority(self) -> str:
        return f"{self.host}:{self.port}"


@dataclass(frozen=True)
class Call:
    """One JSON-RPC request as the benchmark repeats it: method, and for tools/call the name and arguments.

    `param_headers` are the Mcp-Param-* headers a 2026-07-28 client derives from the tool's `x-mcp-header`
    annotations (a family's instance argument); they are sent on the modern wire only.
    """

    method: str
    name: str | None = None
    arguments: dict[str, Any] | None = None
    param_headers: Mapping[str, str] | None = None

    def params(self) -> dict[str, Any]:
        params: dict[str, Any] = {}
        if self.name is not None:
            params["name"] = self.name
        if self.arguments is not None:
            params["arguments"] = self.arguments
        return params


class SetupError(RuntimeError):
    """A session could not be opened, or the first request was not answered with a result."""


class Requests:
    """Renders numbered requests for one endpoint, wire and call; `open` performs the wire's session setup.

    `headers` go on every request of both wires, the session setup included (an `Authorization` bearer).
    """

    def __init__(self, endpoint: Endpoint, wire: str, call: Call, headers: Mapping[str, str] | None = None) -> None:
        self.endpoint = endpoint
        self.wire = wire
        self.call = call
        self.extra = {k.lower(): v for k, v in (headers or {}).items()}
        params = call.params()
        headers = {"host": endpoint.authority, **ACCEPT, **self.extra}
        if wire == MODERN:
            params["_meta"] = ENVELOPE
            headers.update({"mcp-protocol-version": MODERN, "mcp-method": call.method})
            if call.name is not None:
                headers["mcp-name"] = call.name
            headers.update({k.lower(): v for k, v in (call.param_headers or {}).items()})
        self._headers = headers
        tail = orjson.dumps({"method": call.method, "params": params})
        self._body_tail = b"," + tail[1:]  # the object without its opening brace, appended after the id
        self._head = b""
        self._render_head()

    def _render_head(self) -> None:
        self._head = render_request("POST", self.endpoint.path, self._headers)[: -len(b"content-length: 0\r\n\r\n")]

    @property
    def headers(self) -> dict[str, str]:
        return dict(self._headers)

    def body(self, msg_id: int) -> bytes:
        return b'{"jsonrpc":"2.0","id":%d%s' % (msg_id, self._body_tail)

    def build(self, msg_id: int) -> bytes:
        """The whole request (head and body) for this JSON-RPC id."""
        body = self.body(msg_id)
        return self._head + b"content-length: %d\r\n\r\n" % len(body) + body

    async def open(self, exchange: Exchange) -> Requests:
        """A copy of these requests bound to a fresh session (legacy wire); the modern wire needs none."""
        if self.wire == MODERN:
            return self
        hello = {"jsonrpc": "2.0", "id": 0, "method": "initialize",
                 "params": {"protocolVersion": LEGACY_VERSION, "capabilities": {}, "clientInfo": CLIENT_INFO}}
        headers = {"host": self.endpoint.authority, **ACCEPT, **self.extra}
        answer = await exchange(render_request("POST", self.endpoint.path, headers, orjson.dumps(hello)))
        session = answer.headers.get("mcp-session-id")
        if answer.status != 200 or not session:
            raise SetupError(f"initialize: HTTP {answer.status} {answer.body[:300]!r}")
        version = LEGACY_VERSION
        with contextlib.suppress(orjson.JSONDecodeError, KeyError, TypeError):
            version = str(orjson.loads(answer.body)["result"]["protocolVersion"])
        bound = Requests(self.endpoint, self.wire, self.call, self.extra)
        bound._headers.update({"mcp-protocol-version": version, "mcp-session-id": session})
        bound._render_head()
        note = orjson.dumps({"jsonrpc": "2.0", "method": "notifications/initialized"})
        done = await exchange(render_request("POST", self.endpoint.path, bound._headers, note))
        if done.status not in (200, 202):
            raise SetupError(f"notifications/initialized: HTTP {done.status} {done.body[:300]!r}")
        return bound


def succeeded(answer: Message) -> bool:
    """A JSON-RPC result in a 200 answer (cheap byte checks: this runs once per request under load)."""
    return answer.status == 200 and b'"result":' in answer.body and b'"error":{' not in answer.body
