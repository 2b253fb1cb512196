"""Relay JSON-RPC messages between a stdio client and the gateway's streamable-HTTP endpoint, both eras.

Each message from stdin is POSTed as it is (ids, server-to-client answers and notifications untouched) with
the headers the era needs: `Mcp-Session-Id` and the negotiated `MCP-Protocol-Version` in the handshake era;
the version from the message's `_meta`, `Mcp-Method` and `Mcp-Name` in the 2026-07-28 revision. What the
gateway answers (JSON, or an SSE stream with requests and notifications before the answer) goes to stdout.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import httpx2
import orjson

from extproc import jsonrpc

log = logging.getLogger("muster_edge.agent")

Write = Callable[[dict[str, Any]], Awaitable[None]]


class Unauthorized(Exception):
    """The gateway refused the token (HTTP 401)."""


class Forwarder:
    def __init__(self, http: httpx2.AsyncClient, url: str, token: Callable[[], str], write: Write) -> None:
        self._http = http
        self.url = url
        self._token = token
        self._write = write
        self.session_id = ""
        self.version = ""
        self._stream: asyncio.Task[None] | None = None

    def set_writer(self, write: Write) -> None:
        self._write = write

    def use_token(self, token: Callable[[], str]) -> None:
        self._token = token

    def headers(self, msg: dict[str, Any]) -> dict[str, str]:
        out = {"content-type": "application/json", "accept": "application/json, text/event-stream"}
        if token := self._token():
            out["authorization"] = f"Bearer {token}"
        params = msg.get("params") if isinstance(msg.get("params"), dict) else None
        meta = params.get("_meta") if params is not None and isinstance(params.get("_meta"), dict) else None
        modern = meta.get(jsonrpc.META_VERSION) if meta is not None else None
        method = msg.get("method")
        if isinstance(modern, str) and isinstance(method, str):
            out["mcp-protocol-version"] = modern
            out["mcp-method"] = method
            key = jsonrpc.NAME_BEARING.get(method)
            if key and params is not None and isinstance(params.get(key), str):
                out["mcp-name"] = jsonrpc.encode_header_value(params[key])
        elif self.version:
            out["mcp-protocol-version"] = self.version
        if self.session_id:
            out["mcp-session-id"] = self.session_id
        return out

    async def send(self, msg: dict[str, Any]) -> None:
        """POST one message; answers and what comes before them are written out. Raises Unauthorized."""
        is_request = "method" in msg and "id" in msg
        try:
            async with self._http.stream("POST", self.url, content=orjson.dumps(msg), headers=self.headers(msg),
                                         timeout=httpx2.Timeout(30.0, read=None)) as resp:
                if resp.status_code == 401:
                    raise Unauthorized()
                ctype = resp.headers.get("content-type", "")
                if ctype.startswith("text/event-stream"):
                    await self._events(resp, msg)
                    return
                body = await resp.aread()
                if not body:
                    if is_request:
                        await self._write(_error(msg["id"], f"the gateway answered HTTP {resp.status_code}"))
                    return
                try:
                    answer = orjson.loads(body)
                except orjson.JSONDecodeError:
                    answer = None
                if isinstance(answer, dict) and ("result" in answer or "error" in answer or "method" in answer):
                    self._learn(msg, answer, resp)
                    await self._write(answer)
                elif is_request:
                    await self._write(_error(msg["id"], f"the gateway answered HTTP {resp.status_code}"))
        except httpx2.HTTPError as exc:
            if is_request:
                await self._write(_error(msg["id"], f"the gateway is unreachable ({type(exc).__name__})"))

    async def _events(self, resp: httpx2.Response, msg: dict[str, Any]) -> None:
        data: list[str] = []
        async for line in resp.aiter_lines():
            if line == "":
                if data:
                    with contextlib.suppress(orjson.JSONDecodeError):
                        event = orjson.loads("\n".join(data))
                        if isinstance(event, dict):
                            self._learn(msg, event, resp)
                            await self._write(event)
                data = []
            elif line.startswith("data:"):
                data.append(line[5:].lstrip(" ") if line.startswith("data: ") else line[5:])

    def _learn(self, msg: dict[str, Any], answer: dict[str, Any], resp: httpx2.Response) -> None:
        if msg.get("method") == "initialize" and answer.get("id") == msg.get("id"):
            result = answer.get("result")
            if isinstance(result, dict):
                self.version = str(result.get("protocolVersion", ""))
                self.session_id = resp.headers.get("mcp-session-id", "")
                if self.session_id and self._stream is None:
                    self._stream = asyncio.get_running_loop().create_task(self._listen())

    async def _listen(self) -> None:
        """The session's GET stream: notifications and requests outside any call."""
        headers = {k: v for k, v in self.headers({}).items() if k != "content-type"}
        headers["accept"] = "text/event-stream"
        with contextlib.suppress(httpx2.HTTPError):
            async with self._http.stream("GET", self.url, headers=headers,
                                         timeout=httpx2.Timeout(30.0, read=None)) as resp:
                if resp.status_code == 200:
                    await self._events(resp, {})

    async def close(self) -> None:
        if self._stream is not None:
            self._stream.cancel()
        if self.session_id:
            with contextlib.suppress(httpx2.HTTPError):
                headers = {k: v for k, v in self.headers({}).items() if k != "content-type"}
                await self._http.delete(self.url, headers=headers, timeout=5)


def _error(msg_id: Any, message: str, code: int = -32603) -> dict[str, Any]:
    return {"jsonrpc": "2.0", "id": msg_id, "error": {"code": code, "message": message}}
