"""A fast, minimal MCP upstream for benchmarks: raw asyncio HTTP/1.1, JSON answers, both protocol eras.

The mcp SDK demo server spends around a millisecond of Python per call, which would hide the gateway's own
overhead behind the upstream's. This server answers the handful of methods a gateway needs (initialize,
server/discover, ping, tools/list, tools/call, notifications, subscriptions/listen and the legacy GET stream)
in tens of microseconds, while still checking what a careful 2026-07-28 server checks (Mcp-Method and
Mcp-Name must match the body, the `_meta` envelope must be there) and requiring a session it issued on the
legacy wire, so a path that sends the wrong headers shows up as errors rather than as a fast number.

    .venv/bin/python -m bench.fast_upstream --port 0 --name s01 --tools 50     (from the repository root)

prints `READY http://127.0.0.1:PORT/mcp` once listening. `GET /_stats` returns how many requests it saw per
JSON-RPC method (and how many it refused, per reason), so the benchmark can show how many upstream requests
each client call cost; `GET /_last` returns the headers of the last JSON-RPC request it received.

One process can also be a whole fleet, so 40 upstreams do not mean 40 Python processes on a 2-core machine:

    .venv/bin/python -m bench.fast_upstream --port 0 --names a,b,c --tools 40 --shared-descriptions

serves server `a` at `/a/mcp`, `b` at `/b/mcp`, ... (each its own MCP server: own tools, sessions and counts,
`/a/_stats`, `/a/_last`); `/_stats` then sums every server's counts and `/_last` is the last request any of them
got. The READY line names the root (`http://127.0.0.1:PORT/mcp`). `--shared-descriptions` leaves the server's
name out of the tool descriptions, so identical servers can form a family (members whose descriptions differ
fall back to per-server names); answers still name the server that ran the tool.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import secrets
import signal
import sys
from collections import Counter
from typing import Any, cast

import orjson

from bench.http1 import FramingError, Message, Parser, render_response

MODERN = "2026-07-28"
HANDSHAKE = ("2025-11-25", "2025-06-18", "2025-03-26", "2024-11-05")
META_VERSION = "io.modelcontextprotocol/protocolVersion"
META_SERVER_INFO = "io.modelcontextprotocol/serverInfo"
SUBSCRIPTION_ID = "io.modelcontextprotocol/subscriptionId"
JSON_HEADERS = [(b"content-type", b"application/json")]
SSE_HEADERS = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncache-control: no-cache\r\n" \
              b"transfer-encoding: chunked\r\n\r\n"
KEEPALIVE_S = 20.0


def tool_definitions(name: str, count: int, *, shared: bool = False, suffix: str = "") -> list[dict[str, Any]]:
    """`echo` plus `count - 1` filler tools with realistic descriptions and schemas (about 300 bytes each);
    `shared` descriptions do not name the server (identical servers, as family members are)."""
    who = "this server" if shared else f"server {name}"
    tools: list[dict[str, Any]] = [{
        "name": "echo",
        "description": "Echo the text back." if shared else f"Echo the text back (server {name}).",
        "inputSchema": {"type": "object", "properties": {"text": {"type": "string"}}, "required": ["text"]},
    }]
    for i in range(1, count):
        tools.append({
            "name": f"op_{i:03d}",
            "description": f"Operation {i} of {who}: looks something up in a namespace and returns it.{suffix}",
            "inputSchema": {"type": "object", "properties": {
                "namespace": {"type": "string", "description": "Kubernetes namespace"},
                "limit": {"type": "integer", "minimum": 1, "maximum": 500}}, "required": ["namespace"]},
            "annotations": {"readOnlyHint": True},
        })
    return tools


class RpcFailure(Exception):
    """A JSON-RPC error answer; `tag` names the reason in /_stats so a benchmark can say why it failed."""

    def __init__(self, code: int, message: str, status: int = 200, tag: str = "") -> None:
        super().__init__(message)
        self.code, self.message, self.status = code, message, status
        self.tag = tag or str(code)


class Upstream:
    """The MCP logic, independent of the socket: one request in, one (status, headers, body) out."""

    def __init__(self, name: str, tools: int, *, shared_descriptions: bool = False, suffix: str = "") -> None:
        self.name = name
        self.info = {"name": name, "version": "1.0.0"}
        self.tools = tool_definitions(name, tools, shared=shared_descriptions, suffix=suffix)
        self.tool_names = frozenset(t["name"] for t in self.tools)
        self.capabilities = {"tools": {"listChanged": True}}
        self.sessions: set[str] = set()
        self.counts: Counter[str] = Counter()
        self.last_headers: dict[str, str] = {}
        modern_extra = {"ttlMs": 3_600_000, "cacheScope": "public", "resultType": "complete",
                        "_meta": {META_SERVER_INFO: self.info}}
        self.list_results = {False: orjson.dumps({"tools": self.tools}),
                             True: orjson.dumps({"tools": self.tools, **modern_extra})}

    def era_of(self, headers: dict[str, str]) -> bool:
        """True for a 2026-07-28 request, False for the handshake era; anything else is refused."""
        version = headers.get("mcp-protocol-version")
        if version is None or version in HANDSHAKE:
            return False
        if version == MODERN:
            return True
        raise RpcFailure(-32022, f"Unsupported protocol version: {version}", 400, "bad-version")

    def handle(self, headers: dict[str, str], body: bytes) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
        self.last_headers = headers
        msg_id: Any = None
        try:
            try:
                obj = orjson.loads(body)
            except orjson.JSONDecodeError:
                raise RpcFailure(-32700, "Parse error", 400) from None
            if not isinstance(obj, dict) or not isinstance(obj.get("method"), str):
                raise RpcFailure(-32600, "Invalid Request", 400)
            method: str = obj["method"]
            self.counts[method] += 1
            msg_id = obj.get("id")
            params = obj.get("params") or {}
            modern = self.era_of(headers)
            if msg_id is None:  # a notification
                return 202, [], b""
            if modern:
                self._check_modern(method, params, headers)
            elif method != "initialize" and not headers.get("mcp-session-id"):
                raise RpcFailure(-32600, "Bad Request: Missing session ID", 400, "legacy-without-session")
            elif method != "initialize" and headers.get("mcp-session-id") not in self.sessions:
                # as the mcp SDK server (and the spec) answer a session they do not know, e.g. after a restart
                raise RpcFailure(-32600, "Session not found", 404, "legacy-unknown-session")
            return self._answer(method, msg_id, params, modern)
        except RpcFailure as err:
            self.counts[f"rejected:{err.tag}"] += 1
            body_out = orjson.dumps({"jsonrpc": "2.0", "id": msg_id,
                                     "error": {"code": err.code, "message": err.message}})
            return err.status, JSON_HEADERS, body_out

    @staticmethod
    def _check_modern(method: str, params: dict[str, Any], headers: dict[str, str]) -> None:
        meta = params.get("_meta")
        if not isinstance(meta, dict) or meta.get(META_VERSION) != MODERN:
            raise RpcFailure(-32602, "Invalid params: _meta must carry the protocol version", 400, "no-meta-envelope")
        if headers.get("mcp-method") != method:
            raise RpcFailure(-32020, "Mcp-Method header does not match the body", 400, "mcp-method-mismatch")
        if method == "tools/call" and headers.get("mcp-name") != params.get("name"):
            raise RpcFailure(-32020, "Mcp-Name header does not match params.name", 400, "mcp-name-mismatch")

    def _answer(self, method: str, msg_id: Any, params: dict[str, Any],
                modern: bool) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
        extra: list[tuple[bytes, bytes]] = []
        if method == "tools/call":
            name = params.get("name")
            if name not in self.tool_names:
                raise RpcFailure(-32602, f"Unknown tool: {name}", tag="unknown-tool")
            arguments = params.get("arguments") or {}
            text = str(arguments.get("text", "")) if name == "echo" else f"{name} ran on {self.name}"
            result: Any = {"content": [{"type": "text", "text": text}], "isError": False}
            if modern:
                result["resultType"] = "complete"
        elif method == "tools/list":
            return 200, JSON_HEADERS, b'{"jsonrpc":"2.0","id":%s,"result":%s}' % (
                orjson.dumps(msg_id), self.list_results[modern])
        elif method == "initialize" and not modern:
            requested = params.get("protocolVersion")
            session = secrets.token_hex(16)
            self.sessions.add(session)
            extra.append((b"mcp-session-id", session.encode()))
            result = {"protocolVersion": requested if requested in HANDSHAKE else HANDSHAKE[0],
                      "capabilities": self.capabilities, "serverInfo": self.info}
        elif method == "server/discover":
            result = {"supportedVersions": [MODERN, *HANDSHAKE], "capabilities": self.capabilities,
                      "ttlMs": 3_600_000, "cacheScope": "public", "resultType": "complete",
                      "_meta": {META_SERVER_INFO: self.info}}
        elif method == "ping" and not modern:
            result = {}
        else:
            raise RpcFailure(-32601, f"Method not found: {method}", 404 if modern else 200)
        return 200, JSON_HEADERS + extra, orjson.dumps({"jsonrpc": "2.0", "id": msg_id, "result": result})

    def acknowledgement(self, body: bytes) -> bytes:
        """The first event of a modern subscriptions/listen stream."""
        obj = orjson.loads(body)
        wanted = (obj.get("params") or {}).get("notifications") or {}
        honoured = {k: v for k, v in wanted.items() if k == "toolsListChanged"}
        note = {"jsonrpc": "2.0", "method": "notifications/subscriptions/acknowledged",
                "params": {"notifications": honoured, "_meta": {SUBSCRIPTION_ID: obj.get("id")}}}
        return b"data: " + orjson.dumps(note) + b"\n\n"


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


class Fleet:
    """The servers one process serves, by path prefix: `""` alone (`/mcp`), or `/NAME` for each of several."""

    def __init__(self, servers: list[Upstream], *, by_name: bool) -> None:
        self.servers = servers
        self.routes = {f"/{u.name}" if by_name else "": u for u in servers}
        self.last: Upstream | None = None

    def counts(self) -> Counter[str]:
        total: Counter[str] = Counter()
        for upstream in self.servers:
            total.update(upstream.counts)
        return total


class Connection(asyncio.Protocol):
    """One keep-alive HTTP/1.1 connection; becomes a held-open SSE stream for listen requests."""

    def __init__(self, fleet: Fleet) -> None:
        self.fleet = fleet
        self.parser = Parser(responses=False)
        self.transport: asyncio.Transport | None = None
        self.keepalive: asyncio.Task[None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's transports do not subclass asyncio's

    def connection_lost(self, exc: Exception | None) -> None:
        if self.keepalive is not None:
            self.keepalive.cancel()

    def data_received(self, data: bytes) -> None:
        assert self.transport is not None
        if self.keepalive is not None:
            return  # an SSE stream: nothing more is read from it
        try:
            messages = self.parser.feed(data)
        except FramingError:
            self.transport.close()
            return
        for message in messages:
            self.transport.write(self.respond(message))
            if self.keepalive is not None:
                return

    def respond(self, message: Message) -> bytes:
        prefix, _, leaf = message.path.split("?", 1)[0].rpartition("/")
        fleet = self.fleet
        found = fleet.routes.get(prefix)
        if leaf in ("_stats", "_last") and found is None and prefix == "":  # the whole fleet
            if leaf == "_stats":
                return render_response(200, JSON_HEADERS, orjson.dumps(dict(fleet.counts())))
            return render_response(200, JSON_HEADERS, orjson.dumps(fleet.last.last_headers if fleet.last else {}))
        if found is None or leaf not in ("mcp", "_stats", "_last"):
            return render_response(404, [], b"not found\n")
        up = found
        if leaf == "_stats":
            return render_response(200, JSON_HEADERS, orjson.dumps(dict(up.counts)))
        if leaf == "_last":  # the headers of the last JSON-RPC request, to show what a proxy forwarded
            return render_response(200, JSON_HEADERS, orjson.dumps(up.last_headers))
        fleet.last = up
        if message.method == "GET":  # the legacy server-to-client stream: held open, nothing to say
            up.counts["GET stream"] += 1
            return self._hold(b"")
        if message.method == "DELETE":
            up.sessions.discard(message.headers.get("mcp-session-id", ""))
            return render_response(200, [], b"")
        if message.method != "POST":
            return render_response(405, [(b"allow", b"GET, POST, DELETE")], b"")
        if b'"subscriptions/listen"' in message.body:
            up.counts["subscriptions/listen"] += 1
            return self._hold(up.acknowledgement(message.body))
        status, headers, body = up.handle(message.headers, message.body)
        return render_response(status, headers, body)

    def _hold(self, first_event: bytes) -> bytes:
        self.keepalive = asyncio.get_running_loop().create_task(self._ping())
        return SSE_HEADERS + (chunk(first_event) if first_event else b"")

    async def _ping(self) -> None:
        """A comment now and then, so idle timeouts on the way never cut the stream."""
        while self.transport is not None and not self.transport.is_closing():
            await asyncio.sleep(KEEPALIVE_S)
            self.transport.write(chunk(b": keepalive\n\n"))


async def serve(host: str, port: int, fleet: Fleet) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: Connection(fleet), host, port, backlog=1024, reuse_address=True)
    real_port = server.sockets[0].getsockname()[1]
    print(f"READY http://{host}:{real_port}/mcp", flush=True)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    server.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port (reported on the READY line)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--name", default="fast", help="server name, used in tool descriptions and results")
    parser.add_argument("--tools", type=int, default=1, help="how many tools to offer (echo plus fillers)")
    parser.add_argument("--names", default="", help="comma-separated: serve one server per name at /NAME/mcp")
    parser.add_argument("--shared-descriptions", action="store_true",
                        help="tool descriptions without the server's name (family members)")
    parser.add_argument("--description-suffix", default="", help="appended to every filler tool's description")
    args = parser.parse_args(argv)
    names = [n.strip() for n in args.names.split(",") if n.strip()]
    if len(set(names)) != len(names) or any("/" in n or "?" in n for n in names):
        parser.error("--names: distinct names without '/' or '?'")
    servers = [Upstream(n, max(1, args.tools), shared_descriptions=args.shared_descriptions,
                        suffix=args.description_suffix)
               for n in names or [args.name]]
    fleet = Fleet(servers, by_name=bool(names))
    with contextlib.suppress(KeyboardInterrupt):
        try:
            import uvloop
        except ImportError:
            asyncio.run(serve(args.host, args.port, fleet))
        else:
            uvloop.run(serve(args.host, args.port, fleet))
    return 0


if __name__ == "__main__":
    sys.exit(main())
