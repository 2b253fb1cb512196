"""The bridge process: every stdio and sse server of a replica, served over streamable HTTP on loopback.

`POST /bridge/<name>` carries one JSON-RPC message (answered as JSON, or as an SSE stream when the server
sends requests or notifications before its answer), `GET /bridge/<name>` is the stream of what the server
says outside any request, `GET /status` is the state of every process. The bridge follows the catalog
folder itself: a new manifest starts (autoStart) or arms (on first use) a server, a removed one stops it.
It dies with the gateway: SIGTERM from the parent-death signal stops every child's process group.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import logging
import os
from collections.abc import Awaitable, Callable
from typing import Any, Protocol, cast

import orjson

from catalog.config import GatewayConfig
from catalog.manifests import MCPServer
from extproc.bridges.refs import resolve
from extproc.bridges.relay import INTERNAL, Call, Relay, error
from extproc.bridges.state import status_path
from extproc.bridges.stdio import StdioUpstream, Unavailable
from extproc.catalog_files import read_catalog, signature

log = logging.getLogger("muster_edge.bridge")

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]


class Upstream(Protocol):
    server: MCPServer

    def start(self) -> None: ...
    async def relay_for(self, headers: dict[str, str]) -> Relay: ...
    def status(self) -> dict[str, Any]: ...
    async def stop(self) -> None: ...
    def kill_now(self) -> None: ...


class BridgeHost:
    def __init__(self, state_dir: str, secrets_dir: str, *,
                 make_sse: Callable[[MCPServer, Callable[[], None]], Upstream] | None = None,
                 alias: dict[str, str] | None = None) -> None:
        self.state_dir = state_dir
        self._alias = alias or {}
        self.upstreams: dict[str, Upstream] = {}
        self.secrets_dir = secrets_dir
        self._make_sse = make_sse
        self._status_dirty = False
        atexit.register(self.kill_now)

    def _resolve(self, value: str) -> str:
        return resolve(value)

    def _make(self, server: MCPServer) -> Upstream | None:
        if server.type == "stdio":
            home = os.path.join(self.state_dir, "bridges", "home", server.name)
            return StdioUpstream(server, home, self._resolve, self.changed)
        if server.type == "sse" and self._make_sse is not None:
            return self._make_sse(server, self.changed)
        return None

    async def apply(self, servers: tuple[MCPServer, ...] | list[MCPServer]) -> None:
        """Follow the catalog: start new servers (autoStart), restart changed ones, stop removed ones."""
        wanted = {s.name: s for s in servers if s.bridged}
        for name in list(self.upstreams):
            old = self.upstreams[name]
            if name not in wanted or wanted[name] != old.server:
                log.info("[%s] %s", name, "removed: stopping" if name not in wanted else "changed: restarting")
                del self.upstreams[name]
                await old.stop()
        for name, server in wanted.items():
            if name not in self.upstreams:
                upstream = self._make(server)
                if upstream is None:
                    continue
                self.upstreams[name] = upstream
                if server.auto_start:
                    upstream.start()
        self.changed()

    def changed(self) -> None:
        if not self._status_dirty:
            self._status_dirty = True
            with contextlib.suppress(RuntimeError):
                asyncio.get_running_loop().call_soon(self._write_status)

    def status(self) -> dict[str, Any]:
        return {"servers": [self.upstreams[n].status() for n in sorted(self.upstreams)]}

    def _write_status(self) -> None:
        self._status_dirty = False
        path = status_path(self.state_dir)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.{os.getpid()}.tmp"
        with open(tmp, "wb") as fh:
            fh.write(orjson.dumps(self.status()))
        os.replace(tmp, path)

    async def stop(self) -> None:
        await asyncio.gather(*(u.stop() for u in self.upstreams.values()), return_exceptions=True)
        self.upstreams.clear()

    def kill_now(self) -> None:
        for upstream in self.upstreams.values():
            upstream.kill_now()

    async def watch(self, folder: str, interval: float = 0.5) -> None:
        last = None
        while True:
            sig = signature(folder)
            if sig != last:
                last = sig
                try:
                    await self.apply(read_catalog(folder).servers)
                except Exception:
                    log.exception("bridge: applying a catalog change failed")
            await asyncio.sleep(interval)

    # ---- HTTP (ASGI) -------------------------------------------------------------------------------------
    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            while (await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            await self.stop()
            await send({"type": "lifespan.shutdown.complete"})
            return
        if scope["type"] != "http":
            return
        path: str = scope["path"]
        method: str = scope["method"]
        if path == "/status" and method == "GET":
            await _reply(send, 200, orjson.dumps(self.status()))
            return
        if path == "/healthz":
            await _reply(send, 200, b"ok\n", "text/plain")
            return
        name = path[len("/bridge/"):] if path.startswith("/bridge/") else self._alias.get(path.rstrip("/"), "")
        upstream = self.upstreams.get(name.rstrip("/"))
        if upstream is None:
            await _reply(send, 404, orjson.dumps(error(None, INTERNAL, f"no bridged MCP server at {path}")))
            return
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
        if method == "POST":
            await self._post(upstream, headers, receive, send)
        elif method == "GET":
            await self._listen(upstream, headers, receive, send)
        elif method == "DELETE":
            await _reply(send, 200, b"", "text/plain")
        else:
            await _reply(send, 405, b"", "text/plain", [(b"allow", b"GET, POST, DELETE")])

    async def _post(self, upstream: Upstream, headers: dict[str, str], receive: Receive, send: Send) -> None:
        body = bytearray()
        while True:
            event = await receive()
            body += event.get("body", b"")
            if not event.get("more_body"):
                break
        try:
            msg = orjson.loads(body)
        except orjson.JSONDecodeError:
            await _reply(send, 400, orjson.dumps({"jsonrpc": "2.0", "id": None,
                                                  "error": {"code": -32700, "message": "Parse error"}}))
            return
        if not isinstance(msg, dict) or msg.get("jsonrpc") != "2.0":
            await _reply(send, 400, orjson.dumps(error(None, -32600, "expected one JSON-RPC 2.0 message")))
            return
        msg_id = msg.get("id")
        is_request = "method" in msg and "id" in msg
        try:
            relay = await upstream.relay_for(headers)
        except Unavailable as exc:
            if exc.status:
                extra = [(b"www-authenticate", exc.challenge.encode("latin-1"))] if exc.challenge else []
                await _reply(send, exc.status, orjson.dumps(error(msg_id, exc.code, str(exc))), extra=extra)
            elif is_request:
                await _reply(send, 200, orjson.dumps(error(msg_id, exc.code, str(exc))))
            else:
                await _reply(send, 503, orjson.dumps(error(None, exc.code, str(exc))))
            return
        if not is_request:
            if msg.get("method") != "notifications/initialized":  # the bridge initialized the server itself
                try:
                    await relay.forward(msg)
                except (OSError, RuntimeError) as exc:
                    await _reply(send, 503, orjson.dumps(error(None, -32000, f"MCP server {relay.name} {exc}")))
                    return
            await _reply(send, 202, b"", "text/plain")
            return
        if msg.get("method") == "initialize" and relay.init_result is not None:
            await _reply(send, 200, orjson.dumps({"jsonrpc": "2.0", "id": msg_id, "result": relay.init_result}))
            return
        call = await relay.request(msg)
        await self._answer(relay, call, receive, send)

    async def _answer(self, relay: Relay, call: Call, receive: Receive, send: Send) -> None:
        gone = asyncio.ensure_future(_disconnected(receive))
        try:
            first = await _next(call, gone)
            if first is None:
                await relay.cancel(call)
                return
            if _is_answer(first):
                await _reply(send, 200, orjson.dumps(first))
                return
            await send({"type": "http.response.start", "status": 200,
                        "headers": [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache")]})
            msg: dict[str, Any] | None = first
            while msg is not None:
                await send({"type": "http.response.body", "body": _event(msg), "more_body": True})
                if _is_answer(msg):
                    break
                msg = await _next(call, gone)
            if msg is None:
                await relay.cancel(call)
                return
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            gone.cancel()

    async def _listen(self, upstream: Upstream, headers: dict[str, str], receive: Receive, send: Send) -> None:
        try:
            relay = await upstream.relay_for(headers)
        except Unavailable as exc:
            await _reply(send, 503, orjson.dumps(error(None, exc.code, str(exc))))
            return
        queue = relay.listen()
        gone = asyncio.ensure_future(_disconnected(receive))
        try:
            await send({"type": "http.response.start", "status": 200,
                        "headers": [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache")]})
            await send({"type": "http.response.body", "body": b": stream open\n\n", "more_body": True})
            while True:
                got: asyncio.Future[Any] = asyncio.ensure_future(queue.get())
                waiters: set[asyncio.Future[Any]] = {got, gone}
                done, _ = await asyncio.wait(waiters, timeout=15, return_when=asyncio.FIRST_COMPLETED)
                if gone in done:
                    got.cancel()
                    break
                if got not in done:
                    got.cancel()
                    await send({"type": "http.response.body", "body": b": keep-alive\n\n", "more_body": True})
                    continue
                await send({"type": "http.response.body", "body": _event(got.result()), "more_body": True})
        finally:
            gone.cancel()
            relay.unlisten(queue)


def _is_answer(msg: dict[str, Any]) -> bool:
    return "method" not in msg and ("result" in msg or "error" in msg)


def _event(msg: dict[str, Any]) -> bytes:
    return b"event: message\ndata: " + orjson.dumps(msg) + b"\n\n"


async def _disconnected(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


async def _next(call: Call, gone: asyncio.Future[None]) -> dict[str, Any] | None:
    """The next message for this call, or None when the client went away first."""
    if not call.queue.empty():
        return call.queue.get_nowait()
    got: asyncio.Future[Any] = asyncio.ensure_future(call.queue.get())
    waiters: set[asyncio.Future[Any]] = {got, gone}
    done, _ = await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
    if got in done:
        return got.result()
    got.cancel()
    return None


async def _reply(send: Send, status: int, body: bytes, ctype: str = "application/json",
                 extra: list[tuple[bytes, bytes]] | None = None) -> None:
    headers = [(b"content-type", ctype.encode()), (b"content-length", str(len(body)).encode()), *(extra or [])]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


async def serve(host: BridgeHost, address: str, port: int, catalog_dir: str | None) -> None:
    """Serve until SIGTERM/SIGINT; every child's process group is stopped on the way out."""
    import uvicorn

    config = uvicorn.Config(host, host=address, port=port, log_level="warning", access_log=False,
                            lifespan="on", loop="asyncio", http="h11", timeout_keep_alive=300,
                            timeout_graceful_shutdown=2,  # open GET streams must not hold the children
                            log_config=None)  # uvicorn's lines in the process's own format (logFormat)
    server = uvicorn.Server(config)
    watcher = asyncio.get_running_loop().create_task(host.watch(catalog_dir)) if catalog_dir else None
    try:
        await server.serve()
    finally:
        if watcher is not None:
            watcher.cancel()
        await host.stop()


def run_bridges(config: GatewayConfig, port: int) -> None:
    """`muster-edge bridges`: the gateway's bridge process (started by `muster-edge run`)."""
    factories: list[Any] = []

    def make_sse(server: MCPServer, on_change: Callable[[], None]) -> Upstream:
        if not factories:  # httpx2 is loaded only when there is an sse server
            from extproc.bridges.sse import SseFactory

            factories.append(SseFactory(config))
        return cast(Upstream, factories[0].make(server, on_change))

    host = BridgeHost(config.state_dir, config.secrets_dir, make_sse=make_sse)
    asyncio.run(serve(host, config.bridge_listen.host, port, config.catalog_dir))
