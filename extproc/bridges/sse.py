"""sse upstreams (the 2024-11-05 HTTP+SSE transport) behind the bridge.

An sse server answers on its GET stream, not on the POST that carried the request, so Envoy's forward of a
POST cannot carry a call: the bridge holds the GET /sse connection, POSTs to the endpoint the server announces,
and serves the result as streamable HTTP like any other upstream. Its outbound calls go through Envoy's
internal listener (cluster `mcp-origin.<name>`), so egress stays in Envoy. The credential the processor put on
the routed request (static headers, the forwarded token, an exchanged token) is what the bridge sends: one
connection per distinct credential, that is per (user, server) when credentials are per user, capped (least
recently used closed first) and closed after an idle time.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any
from urllib.parse import urljoin, urlsplit

import httpx2

from catalog.config import GatewayConfig
from catalog.manifests import MCPServer
from extproc.bridges.relay import Relay
from extproc.bridges.stdio import Unavailable
from extproc.upstream import ROUTE_HEADER, origin_cluster_name

log = logging.getLogger("muster_edge.bridge")

# What of the routed request is not the credential: transport, routing and MCP headers.
_NOT_CREDENTIAL = {"host", "content-length", "content-type", "accept", "accept-encoding", "connection", "te",
                   "transfer-encoding", "user-agent", "mcp-session-id", "mcp-protocol-version", "mcp-method",
                   "mcp-name", "last-event-id", "origin", ROUTE_HEADER}
_NOT_CREDENTIAL_PREFIXES = ("x-envoy-", "x-forwarded-", "x-request-id", "mcp-param-", ":", "x-muster-edge")


def credential(headers: dict[str, str]) -> dict[str, str]:
    return {k: v for k, v in headers.items()
            if k not in _NOT_CREDENTIAL and not k.startswith(_NOT_CREDENTIAL_PREFIXES)}


class SseConnection:
    """One GET /sse stream and its relay."""

    def __init__(self, server: MCPServer, http: httpx2.AsyncClient, headers: dict[str, str]) -> None:
        self.server = server
        self._http = http
        self._headers = headers
        self.relay = Relay(server.name, self._post)
        self.endpoint = ""
        self.used = time.monotonic()
        self._task: asyncio.Task[None] | None = None
        self._ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        origin = urlsplit(server.url)
        self._origin = origin
        self._base = {"host": origin.netloc, ROUTE_HEADER: origin_cluster_name(server.name)}

    async def open(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._stream())
        await asyncio.wait_for(asyncio.shield(self._ready), self.server.timeout)
        await self.relay.initialize(float(self.server.timeout))

    @property
    def alive(self) -> bool:
        return self._task is not None and not self._task.done() and not self.relay.closed_reason

    async def _stream(self) -> None:
        path = self._origin.path + (f"?{self._origin.query}" if self._origin.query else "")
        headers = {**self._headers, **self._base, "accept": "text/event-stream"}
        reason = "closed its event stream"
        try:
            async with self._http.stream("GET", path or "/", headers=headers,
                                         timeout=httpx2.Timeout(self.server.timeout, read=None)) as resp:
                if resp.status_code != 200:
                    reason = f"answered HTTP {resp.status_code} to GET {self._origin.path}"
                    refused = resp.status_code in (401, 403)
                    if not self._ready.done():
                        self._ready.set_exception(Unavailable(
                            f"MCP server {self.server.name} {reason}", resp.status_code if refused else 0,
                            resp.headers.get("www-authenticate", "") if refused else ""))
                    return
                event, data = "message", list[str]()
                async for line in resp.aiter_lines():
                    if line == "":
                        if data:
                            self._event(event, "\n".join(data))
                        event, data = "message", list[str]()
                    elif line.startswith("event:"):
                        event = line[6:].strip()
                    elif line.startswith("data:"):
                        data.append(line[5:].lstrip(" ") if line.startswith("data: ") else line[5:])
        except httpx2.HTTPError as exc:
            reason = f"is unreachable ({type(exc).__name__})"
        finally:
            if not self._ready.done():
                self._ready.set_exception(Unavailable(f"MCP server {self.server.name} {reason}"))
            self.relay.close(f"is unavailable: it {reason}" if not reason.startswith("is ") else f"{reason}")

    def _event(self, event: str, data: str) -> None:
        if event == "endpoint":
            # The announced endpoint is relative to the server's URL; only a same-origin endpoint is followed.
            target = urlsplit(urljoin(self.server.url, data))
            if target.netloc != self._origin.netloc:
                log.warning("[%s] ignored an endpoint on another origin", self.server.name)
                return
            self.endpoint = target.path + (f"?{target.query}" if target.query else "")
            if not self._ready.done():
                self._ready.set_result(None)
        elif event == "message":
            self.relay.deliver(data.encode())

    async def _post(self, body: bytes) -> None:
        if not self.endpoint:
            raise RuntimeError("is not connected")
        headers = {**self._headers, **self._base, "content-type": "application/json"}
        try:
            resp = await self._http.post(self.endpoint, content=body, headers=headers,
                                         timeout=float(self.server.timeout))
        except httpx2.HTTPError as exc:
            raise RuntimeError(f"is unreachable ({type(exc).__name__})") from None
        if resp.status_code >= 300:
            raise RuntimeError(f"refused the message (HTTP {resp.status_code})")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
        self.relay.close("closed the connection")


class SseUpstream:
    def __init__(self, server: MCPServer, http: httpx2.AsyncClient, max_connections: int, idle: float,
                 on_change: Callable[[], None]) -> None:
        self.server = server
        self._http = http
        self._max = max_connections
        self._idle = idle
        self._on_change = on_change
        self._conns: OrderedDict[str, SseConnection] = OrderedDict()
        self._opening: dict[str, asyncio.Lock] = {}
        self.error = ""
        self.opened = 0
        self._reaper: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self._reaper is None:
            self._reaper = asyncio.get_running_loop().create_task(self._reap())

    async def relay_for(self, headers: dict[str, str]) -> Relay:
        self.start()
        cred = credential(headers)
        key = hashlib.sha256(repr(sorted(cred.items())).encode()).hexdigest()
        lock = self._opening.setdefault(key, asyncio.Lock())
        async with lock:
            conn = self._conns.get(key)
            if conn is None or not conn.alive:
                if conn is not None:
                    self._conns.pop(key, None)
                conn = SseConnection(self.server, self._http, cred)
                try:
                    await conn.open()
                except Unavailable as exc:
                    await conn.close()
                    self.error = str(exc)
                    self._on_change()
                    raise
                except (TimeoutError, RuntimeError) as exc:
                    await conn.close()
                    self.error = f"MCP server {self.server.name} did not initialize: {exc or 'timed out'}"
                    self._on_change()
                    raise Unavailable(self.error) from None
                self.error = ""
                self.opened += 1
                self._conns[key] = conn
                while len(self._conns) > self._max:
                    _, oldest = self._conns.popitem(last=False)
                    await oldest.close()
                self._on_change()
            self._conns.move_to_end(key)
            conn.used = time.monotonic()
            return conn.relay

    async def _reap(self) -> None:
        while True:
            await asyncio.sleep(min(30.0, max(1.0, self._idle / 4)))
            now = time.monotonic()
            for key, conn in list(self._conns.items()):
                if now - conn.used > self._idle or not conn.alive:
                    self._conns.pop(key, None)
                    await conn.close()
                    self._on_change()

    def status(self) -> dict[str, Any]:
        live = sum(1 for c in self._conns.values() if c.alive)
        out: dict[str, Any] = {"name": self.server.name, "type": "sse",
                               "state": "Connected" if live else ("Failed" if self.error else "Idle"),
                               "connections": live, "opened": self.opened}
        if self.error:
            out["error"] = self.error
        return out

    async def stop(self) -> None:
        if self._reaper is not None:
            self._reaper.cancel()
        for conn in list(self._conns.values()):
            await conn.close()
        self._conns.clear()

    def kill_now(self) -> None:
        pass


class SseFactory:
    """sse upstreams share one HTTP client to Envoy's internal listener."""

    def __init__(self, config: GatewayConfig) -> None:
        self.config = config
        self._http: httpx2.AsyncClient | None = None

    def make(self, server: MCPServer, on_change: Callable[[], None]) -> SseUpstream:
        if self._http is None:
            self._http = httpx2.AsyncClient(base_url=f"http://{self.config.internal_listen}",
                                            limits=httpx2.Limits(max_connections=None, max_keepalive_connections=64))
        return SseUpstream(server, self._http, self.config.bridge_max_connections,
                           float(self.config.bridge_idle_seconds), on_change)
