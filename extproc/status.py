"""The processor's status endpoint (loopback): GET /status (JSON), GET /metrics (Prometheus), GET /healthz."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

import orjson

log = logging.getLogger(__name__)


async def serve_status(host: str, port: int, status: Callable[[], dict[str, Any]],
                       metrics: Callable[[], str] = lambda: "",
                       peer: Callable[[bytes], tuple[int, bytes]] | None = None) -> asyncio.Server:
    """`peer` answers `POST /peer`: sealed messages from sibling workers (extproc/peers.py)."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            line = await asyncio.wait_for(reader.readline(), 5)
            length = 0
            while (header := await asyncio.wait_for(reader.readline(), 5)) not in (b"\r\n", b"\n", b""):
                name, _, value = header.decode("latin-1").partition(":")
                if name.strip().lower() == "content-length" and value.strip().isdigit():
                    length = int(value.strip())
            parts = line.decode("latin-1").split()
            path = parts[1] if len(parts) > 1 else "/"
            if parts and parts[0] == "POST" and path == "/peer" and peer is not None and 0 < length <= 1 << 20:
                code, body = peer(await asyncio.wait_for(reader.readexactly(length), 5))
                ctype = "application/json"
            elif path == "/status":
                code, body, ctype = 200, orjson.dumps(status(), option=orjson.OPT_INDENT_2), "application/json"
            elif path == "/metrics":
                code, body, ctype = 200, metrics().encode(), "text/plain; version=0.0.4"
            elif path == "/healthz":
                code, body, ctype = 200, b"ok\n", "text/plain"
            else:
                code, body, ctype = 404, b"not found\n", "text/plain"
            writer.write(f"HTTP/1.1 {code} X\r\ncontent-type: {ctype}\r\ncontent-length: {len(body)}\r\n"
                         "connection: close\r\n\r\n".encode() + body)
            await writer.drain()
        except (TimeoutError, ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    return await asyncio.start_server(handle, host, port)
