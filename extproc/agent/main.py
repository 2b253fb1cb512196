"""`muster-edge agent`: stdio in, the gateway out, with the user's token.

The token comes from `--token`/`$MUSTER_EDGE_TOKEN`, else from the cache of an earlier login (refreshed when
it is about to expire). Without one, the agent answers on its own and offers Muster's `authenticate_muster`
tool, which starts the browser login; once signed in it initializes with the gateway on the client's behalf,
says the tool list changed, and from then on forwards everything.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import ssl
import sys
from typing import Any

import httpx2
import orjson

from extproc import jsonrpc
from extproc.agent import login, tokens
from extproc.agent.forward import Forwarder, Unauthorized

AUTH_TOOL = {
    "name": "authenticate_muster",
    "description": "Sign in to muster-edge: opens the login page in your browser (or returns its URL). "
                   "Call it, sign in, then list the tools again.",
    "inputSchema": {"type": "object", "properties": {}},
}
SERVER_INFO = {"name": "muster-edge-agent", "version": "0.1.0"}
NOT_SIGNED_IN = -32001


class Agent:
    def __init__(self, args: argparse.Namespace, http: httpx2.AsyncClient, out: asyncio.StreamWriter) -> None:
        self.args = args
        self.url: str = args.url
        self.http = http
        self.out = out
        self.static = args.token or os.environ.get("MUSTER_EDGE_TOKEN", "")
        self.cached = None if self.static else tokens.load(self.url)
        self.forwarder = Forwarder(http, self.url, self.token, self.write)
        self.pending: login.Pending | None = None
        self.client_init: dict[str, Any] | None = None
        self.tasks: set[asyncio.Task[None]] = set()
        self.switching = asyncio.Lock()  # held while the agent initializes with the gateway after a login

    def token(self) -> str:
        if self.static:
            return str(self.static)
        return self.cached.access_token if self.cached is not None else ""

    @property
    def signed_in(self) -> bool:
        return bool(self.token())

    async def write(self, msg: dict[str, Any]) -> None:
        self.out.write(orjson.dumps(msg) + b"\n")
        await self.out.drain()

    async def ensure_fresh(self) -> None:
        if self.cached is not None and not self.cached.fresh():
            renewed = await login.refresh(self.http, self.cached)
            self.cached = renewed
            if renewed is not None:
                tokens.save(self.url, renewed)

    # ---- one message from the client ---------------------------------------------------------------------
    async def handle(self, msg: dict[str, Any]) -> None:
        if msg.get("method") == "initialize":
            self.client_init = msg.get("params") if isinstance(msg.get("params"), dict) else {}
        async with self.switching:
            await self.ensure_fresh()
        if self.signed_in:
            try:
                await self.forwarder.send(msg)
                return
            except Unauthorized:
                if self.cached is not None and (renewed := await login.refresh(self.http, self.cached)):
                    self.cached = renewed
                    tokens.save(self.url, renewed)
                    with contextlib.suppress(Unauthorized):
                        await self.forwarder.send(msg)
                        return
                self.cached = None
                if self.static:
                    if "id" in msg and "method" in msg:
                        await self.write(_error(msg["id"], NOT_SIGNED_IN, "the gateway refused the token (HTTP 401)"))
                    return
        await self.local(msg)

    async def local(self, msg: dict[str, Any]) -> None:
        """Answers while not signed in: the handshake, ping, and the one tool that signs in."""
        method, msg_id = msg.get("method"), msg.get("id")
        if msg_id is None or method is None:
            return
        raw = msg.get("params")
        params: dict[str, Any] = raw if isinstance(raw, dict) else {}
        if method == "initialize":
            version = str(params.get("protocolVersion") or jsonrpc.LATEST_HANDSHAKE)
            await self.write({"jsonrpc": "2.0", "id": msg_id, "result": {
                "protocolVersion": version, "serverInfo": SERVER_INFO,
                "capabilities": {"tools": {"listChanged": True}},
                "instructions": "Not signed in to muster-edge: call authenticate_muster."}})
        elif method == "server/discover":
            await self.write({"jsonrpc": "2.0", "id": msg_id, "result": {
                "supportedVersions": [jsonrpc.LATEST_MODERN], "serverInfo": SERVER_INFO,
                "capabilities": {"tools": {"listChanged": True}}}})
        elif method == "ping":
            await self.write({"jsonrpc": "2.0", "id": msg_id, "result": {}})
        elif method == "tools/list":
            await self.write({"jsonrpc": "2.0", "id": msg_id, "result": {"tools": [AUTH_TOOL]}})
        elif method == "tools/call" and params.get("name") == AUTH_TOOL["name"]:
            await self.write({"jsonrpc": "2.0", "id": msg_id, "result": await self.authenticate()})
        elif method in ("prompts/list", "resources/list", "resources/templates/list"):
            key = {"prompts/list": "prompts", "resources/list": "resources"}.get(method, "resourceTemplates")
            await self.write({"jsonrpc": "2.0", "id": msg_id, "result": {key: []}})
        else:
            await self.write(_error(msg_id, NOT_SIGNED_IN,
                                    "Not signed in to muster-edge: call the authenticate_muster tool first"))

    async def authenticate(self) -> dict[str, Any]:
        if self.pending is None or self.pending.task.done():
            try:
                self.pending = await login.begin(self.http, self.url, client_id=self.args.client_id,
                                                 port=self.args.redirect_port, open_browser=not self.args.no_browser)
            except (login.LoginError, httpx2.HTTPError) as exc:
                return {"isError": True, "content": [{"type": "text", "text": f"Cannot start the login: {exc}"}]}
            self.pending.task.add_done_callback(lambda t: self._spawn(self.signed(t)))
        status = {"status": "auth_required", "auth_url": self.pending.url, "clickable_url": self.pending.url,
                  "message": "Open the link to sign in to muster-edge; the tools appear once you are signed in."}
        return {"content": [{"type": "text", "text": json.dumps(status)}]}

    async def signed(self, task: asyncio.Task[tokens.Tokens]) -> None:
        try:
            got = task.result()
        except (login.LoginError, httpx2.HTTPError, TimeoutError) as exc:
            print(f"muster-edge agent: login failed: {exc}", file=sys.stderr, flush=True)
            return
        tokens.save(self.url, got)
        if self.client_init is not None:  # the client's handshake, now with the gateway, before switching over
            async def ignore(_m: dict[str, Any]) -> None:
                return None

            async with self.switching:
                forward = Forwarder(self.http, self.url, lambda: got.access_token, ignore)
                try:
                    await forward.send({"jsonrpc": "2.0", "id": "agent-init", "method": "initialize",
                                        "params": self.client_init})
                    await forward.send({"jsonrpc": "2.0", "method": "notifications/initialized"})
                finally:
                    forward.set_writer(self.write)
                forward.use_token(self.token)
                self.cached = got
                self.forwarder, previous = forward, self.forwarder
            await previous.close()
        else:
            self.cached = got
        await self.write({"jsonrpc": "2.0", "method": "notifications/tools/list_changed"})

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def serve(self, reader: asyncio.StreamReader) -> None:
        while line := await reader.readline():
            if not line.strip():
                continue
            try:
                msg = orjson.loads(line)
            except orjson.JSONDecodeError:
                await self.write(_error(None, -32700, "Parse error"))
                continue
            if not isinstance(msg, dict):
                await self.write(_error(None, -32600, "expected one JSON-RPC message per line"))
                continue
            if msg.get("method") == "initialize":
                await self.handle(msg)  # the session id must be known before what follows
            else:
                self._spawn(self.handle(msg))
        if self.tasks:
            await asyncio.wait(set(self.tasks), timeout=5)
        await self.forwarder.close()


def _error(msg_id: Any, code: int, message: str) -> dict[str, Any]:
    return {"jsonrpc": "2.0", "id": msg_id, "error": {"code": code, "message": message}}


def _client(args: argparse.Namespace) -> httpx2.AsyncClient:
    verify: ssl.SSLContext | bool = True
    if args.cafile:
        verify = ssl.create_default_context(cafile=args.cafile)
    return httpx2.AsyncClient(verify=verify, timeout=30)


async def _main(args: argparse.Namespace) -> int:
    async with _client(args) as http:
        if args.login:
            pending = await login.begin(http, args.url, client_id=args.client_id, port=args.redirect_port,
                                        open_browser=not args.no_browser)
            try:
                got = await pending.task
            except login.LoginError as exc:
                print(f"muster-edge agent: login failed: {exc}", file=sys.stderr)
                return 1
            print(f"muster-edge agent: signed in; token cached in {tokens.save(args.url, got)}", file=sys.stderr)
            return 0
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader(limit=64 * 1024 * 1024)
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin.buffer)
        transport, protocol = await loop.connect_write_pipe(asyncio.streams.FlowControlMixin, sys.stdout.buffer)
        out = asyncio.StreamWriter(transport, protocol, None, loop)
        await Agent(args, http, out).serve(reader)
        return 0


def run_agent(args: argparse.Namespace) -> int:
    return asyncio.run(_main(args))
