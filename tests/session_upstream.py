"""A handshake-era `mcp` SDK upstream that counts the sessions opened on it and deleted, for the session tests.

    python tests/session_upstream.py --port 0

Tool `tag(tag)` answers "ok"; the wrapper remembers which upstream session each tag arrived on. `GET /counts`
answers {"opened": [...session ids], "deleted": [...], "tags": {tag: session id}}; after `POST /forget`, the
sessions opened so far get 404 (the upstream lost them). Prints `READY http://...`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import sys

import uvicorn
from mcp.server import MCPServer
from mcp_types.version import HANDSHAKE_PROTOCOL_VERSIONS
from starlette.types import ASGIApp, Message, Receive, Scope, Send


def counting(app: ASGIApp) -> ASGIApp:
    opened: list[str] = []
    deleted: list[str] = []
    tags: dict[str, str] = {}
    forgotten: set[str] = set()  # POST /forget: the sessions open now get 404, as after the upstream lost them

    async def wrapped(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await app(scope, receive, send)
            return
        if scope["path"] == "/counts":
            body = json.dumps({"opened": opened, "deleted": deleted, "tags": tags}).encode()
            await send({"type": "http.response.start", "status": 200,
                        "headers": [(b"content-type", b"application/json")]})
            await send({"type": "http.response.body", "body": body})
            return
        if scope["path"] == "/forget":
            forgotten.update(opened)
            await send({"type": "http.response.start", "status": 204, "headers": []})
            await send({"type": "http.response.body", "body": b""})
            return
        headers = {k.decode().lower(): v.decode() for k, v in scope["headers"]}
        session = headers.get("mcp-session-id", "")
        if session in forgotten and scope["method"] == "POST":
            body = b'{"jsonrpc":"2.0","id":null,"error":{"code":-32600,"message":"Session not found"}}'
            await send({"type": "http.response.start", "status": 404,
                        "headers": [(b"content-type", b"application/json")]})
            await send({"type": "http.response.body", "body": body})
            return
        version = headers.get("mcp-protocol-version")
        if version is not None and version not in HANDSHAKE_PROTOCOL_VERSIONS:  # a handshake-era server
            await send({"type": "http.response.start", "status": 400, "headers": [(b"content-type", b"text/plain")]})
            await send({"type": "http.response.body", "body": b"Bad Request: Unsupported protocol version"})
            return
        chunks: list[bytes] = []
        more = True
        while more and scope["method"] == "POST":
            msg = await receive()
            chunks.append(msg.get("body", b""))
            more = msg.get("more_body", False)
        raw = b"".join(chunks)
        if raw:
            try:
                obj = json.loads(raw)
            except ValueError:
                obj = None
            if isinstance(obj, dict) and obj.get("method") == "tools/call":
                tag = (obj.get("params") or {}).get("arguments", {}).get("tag")
                if isinstance(tag, str):
                    tags[tag] = session
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if scope["method"] == "POST" and not replayed:
                replayed = True
                return {"type": "http.request", "body": raw, "more_body": False}
            return await receive()

        async def watch(message: Message) -> None:
            if message["type"] == "http.response.start":
                out = {k.decode().lower(): v.decode() for k, v in message.get("headers", [])}
                if scope["method"] == "POST" and not session and out.get("mcp-session-id"):
                    opened.append(out["mcp-session-id"])
                if scope["method"] == "DELETE" and message["status"] < 300 and session:
                    deleted.append(session)
            await send(message)

        await app(scope, replay, watch)

    return wrapped


def build(max_sessions: int | None = None) -> ASGIApp:
    server = MCPServer("counted", version="0.1.0")

    @server.tool()
    def tag(tag: str) -> str:
        """Answer ok (the wrapper notes which upstream session the tag came on)."""
        return "ok"

    return counting(server.streamable_http_app(json_response=True, host="127.0.0.1",
                                                       **({"max_sessions": max_sessions} if max_sessions else {})))


async def main(port: int, max_sessions: int | None) -> None:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.bind(("127.0.0.1", port))
    sock.listen(128)
    config = uvicorn.Config(build(max_sessions), log_level="warning", lifespan="on", access_log=False)
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve(sockets=[sock]))
    while not server.started and not task.done():
        await asyncio.sleep(0.01)
    print(f"READY http://127.0.0.1:{sock.getsockname()[1]}/mcp", flush=True)
    await task


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--max-sessions", type=int, default=0, help="the SDK's own limit (0: its default)")
    args = parser.parse_args()
    asyncio.run(main(args.port, args.max_sessions or None))
    sys.exit(0)
