"""The processor's status endpoint (loopback): GET /status (JSON), GET /metrics (Prometheus), GET /healthz."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

import orjson

log = logging.getLogger(__name__)


async def serve_status(host: str, port: int, status: Callable[[], dict[str, Any]],
                       metrics: Callable[[], str] = lambda: "") -> asyncio.Server:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            line = await asyncio.wait_for(reader.readline(), 5)
            while (await asyncio.wait_for(reader.readline(), 5)) not in (b"\r\n", b"\n", b""):
                pass
            parts = line.decode("latin-1").split()
            path = parts[1] if len(parts) > 1 else "/"
            if path == "/status":
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
        except (TimeoutError, ConnectionError):
            pass
        finally:
            writer.close()

    return await asyncio.start_server(handle, host, port)
