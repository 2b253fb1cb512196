"""A relay of JSON-RPC messages between HTTP clients (streamable HTTP) and one MCP peer (a stdio child, an SSE
connection).

A relay rather than an SDK session in the middle: the client's ids, server-to-client requests (elicitation,
sampling) and notifications pass as they are, whichever era the client speaks. Client request ids are
renumbered towards the peer (several HTTP clients share one peer) and restored on the answer. The peer is
initialized once per start by the bridge itself; a client's `initialize` is answered from that result.
Pure asyncio, no HTTP: `host.py` puts it behind HTTP.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import orjson

log = logging.getLogger("muster_edge.bridge")

PROTOCOL_VERSION = "2025-06-18"
CLIENT_INFO = {"name": "muster-edge-bridge", "version": "0.1.0"}
UNAVAILABLE = -32000  # the server is down or restarting
INTERNAL = -32603


def error(msg_id: Any, code: int, message: str) -> dict[str, Any]:
    return {"jsonrpc": "2.0", "id": msg_id, "error": {"code": code, "message": message}}


@dataclass
class Call:
    """One client request in flight: what the peer sends for it arrives on `queue`, the answer last."""

    client_id: Any
    peer_id: int
    progress_token: Any = None
    queue: asyncio.Queue[dict[str, Any]] = field(default_factory=asyncio.Queue)


class Relay:
    """Messages between HTTP clients and one peer. `send` writes one message to the peer."""

    def __init__(self, name: str, send: Callable[[bytes], Awaitable[None]]) -> None:
        self.name = name
        self._send = send
        self._ids = itertools.count(1)
        self._calls: dict[int, Call] = {}
        self._listeners: list[asyncio.Queue[dict[str, Any]]] = []
        self.init_result: dict[str, Any] | None = None
        self.closed_reason = ""

    # ---- towards the peer ------------------------------------------------------------------------------------
    async def initialize(self, timeout: float, capabilities: dict[str, Any] | None = None) -> dict[str, Any]:
        """The bridge's own handshake with a freshly started peer; raises TimeoutError or RuntimeError."""
        params = {"protocolVersion": PROTOCOL_VERSION, "clientInfo": CLIENT_INFO,
                  "capabilities": capabilities if capabilities is not None else {"elicitation": {}}}
        call = await self.request({"jsonrpc": "2.0", "id": None, "method": "initialize", "params": params})
        try:
            while True:
                msg = await asyncio.wait_for(call.queue.get(), timeout)
                if "method" not in msg:
                    break
        finally:
            self.forget(call)
        if "error" in msg or not isinstance(msg.get("result"), dict):
            raise RuntimeError(f"initialize failed: {orjson.dumps(msg.get('error')).decode()}")
        await self._send(orjson.dumps({"jsonrpc": "2.0", "method": "notifications/initialized"}))
        self.init_result = msg["result"]
        return msg["result"]

    async def request(self, msg: dict[str, Any]) -> Call:
        peer_id = next(self._ids)
        params = msg.get("params")
        token = None
        if isinstance(params, dict) and isinstance(params.get("_meta"), dict):
            token = params["_meta"].get("progressToken")
        call = Call(msg.get("id"), peer_id, token)
        self._calls[peer_id] = call
        try:
            await self._send(orjson.dumps({**msg, "id": peer_id}))
        except (OSError, RuntimeError) as exc:
            self.forget(call)
            call.queue.put_nowait(error(call.client_id, UNAVAILABLE, f"MCP server {self.name} is unavailable: {exc}"))
        return call

    def forget(self, call: Call) -> None:
        self._calls.pop(call.peer_id, None)

    async def cancel(self, call: Call) -> None:
        """The client went away before the answer: tell the peer, as a client would."""
        if self._calls.pop(call.peer_id, None) is not None:
            with contextlib.suppress(OSError, RuntimeError):
                await self._send(orjson.dumps({"jsonrpc": "2.0", "method": "notifications/cancelled",
                                               "params": {"requestId": call.peer_id, "reason": "client went away"}}))

    async def forward(self, msg: dict[str, Any]) -> None:
        """A notification or a client's answer to a server request, as it is."""
        await self._send(orjson.dumps(msg))

    def listen(self) -> asyncio.Queue[dict[str, Any]]:
        queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue(maxsize=1000)
        self._listeners.append(queue)
        return queue

    def unlisten(self, queue: asyncio.Queue[dict[str, Any]]) -> None:
        if queue in self._listeners:
            self._listeners.remove(queue)

    # ---- from the peer ---------------------------------------------------------------------------------------
    def deliver(self, raw: bytes) -> None:
        try:
            msg = orjson.loads(raw)
        except orjson.JSONDecodeError:
            log.warning("[%s] not JSON on the MCP channel: %.200r", self.name, raw)
            return
        if not isinstance(msg, dict):
            return
        if "method" not in msg and "id" in msg:
            call = self._calls.pop(msg["id"], None) if isinstance(msg["id"], int) else None
            if call is not None:
                call.queue.put_nowait({**msg, "id": call.client_id})
            return
        target = self._target(msg)
        if target is not None:
            target.queue.put_nowait(msg)
            return
        for queue in self._listeners:
            if queue.full():
                continue
            queue.put_nowait(msg)
            if "id" in msg:  # a request is answered by one client
                return
        if "id" in msg and not any(not q.full() for q in self._listeners):
            asyncio.get_running_loop().create_task(self._refuse(msg))

    def _target(self, msg: dict[str, Any]) -> Call | None:
        params = msg.get("params")
        if isinstance(params, dict):
            token = params.get("progressToken")
            if token is None and isinstance(params.get("_meta"), dict):
                token = params["_meta"].get("progressToken")
            if token is not None:
                for call in self._calls.values():
                    if call.progress_token == token:
                        return call
            related = params.get("requestId")
            if isinstance(related, int) and related in self._calls:
                return self._calls[related]
        # Whatever the server says during a request belongs with the newest request in flight (stdio carries
        # no association); with none, it goes to the clients' GET streams.
        for call in reversed(self._calls.values()):
            if call.client_id is not None:  # not the bridge's own initialize
                return call
        return None

    async def _refuse(self, msg: dict[str, Any]) -> None:
        with contextlib.suppress(OSError, RuntimeError):
            await self._send(orjson.dumps(error(msg.get("id"), INTERNAL, "no client is connected to answer")))

    def close(self, reason: str) -> None:
        """The peer is gone: every request in flight is answered with an error naming the server."""
        self.closed_reason = reason
        self.init_result = None
        calls, self._calls = self._calls, {}
        for call in calls.values():
            call.queue.put_nowait(error(call.client_id, UNAVAILABLE, f"MCP server {self.name} {reason}"))
