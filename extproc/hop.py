"""A lean keep-alive HTTP/1.1 client for the processor's own tool calls into Envoy's internal listener.

call_tool and workflow steps sit on the caller's latency: a general-purpose client costs about a millisecond of
the processor's event loop per request, this one a fraction of that. It only POSTs to one listener (Envoy, which
frames its answers with content-length or chunked encoding) and keeps a few idle connections; a request that
meets a keep-alive connection Envoy already closed is sent once more on a fresh one (nothing was answered).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Mapping

from extproc import tracing

MAX_IDLE = 64
MAX_HEADER_BYTES = 64 * 1024


class HopError(Exception):
    """The listener could not be reached, or answered something that is not HTTP/1.1."""


class Hop:
    def __init__(self, host: str, port: int) -> None:
        self._host = host.strip("[]")
        self._port = port
        self._idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []

    async def post(self, path: str, headers: Mapping[str, str], body: bytes,
                   timeout: float) -> tuple[int, dict[str, str], bytes]:
        """(status, lower-cased headers, body); TimeoutError after `timeout` seconds, HopError when unreachable."""
        async with asyncio.timeout(timeout):
            return await self._post(path, headers, body)

    async def _post(self, path: str, headers: Mapping[str, str], body: bytes) -> tuple[int, dict[str, str], bytes]:
        lines = [f"POST {path} HTTP/1.1"]
        lines.extend(f"{k}: {v}" for k, v in headers.items() if k.lower() not in ("content-length", "connection"))
        if tracing.ON:
            carried: dict[str, str] = {}
            tracing.inject(carried)
            lines.extend(f"{k}: {v}" for k, v in carried.items())
        lines.append(f"content-length: {len(body)}")
        request = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body
        for attempt in (0, 1):
            reused = attempt == 0 and bool(self._idle)
            if reused:
                reader, writer = self._idle.pop()
            else:
                try:
                    reader, writer = await asyncio.open_connection(self._host, self._port)
                except OSError as exc:
                    raise HopError(f"unreachable: {type(exc).__name__}") from exc
            done = False
            try:
                writer.write(request)
                head = await reader.readuntil(b"\r\n\r\n")
                status, answer_headers = _parse_head(head)
                content = await _read_body(reader, answer_headers)
                done = True
            except (ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError) as exc:
                if reused and isinstance(exc, (ConnectionError, asyncio.IncompleteReadError)) and \
                        not getattr(exc, "partial", b""):
                    continue  # a kept-alive connection closed while idle: the request never got in
                raise HopError(f"connection lost: {type(exc).__name__}") from exc
            finally:
                if not done:
                    writer.close()
            if answer_headers.get("connection", "").lower() == "close" or len(self._idle) >= MAX_IDLE:
                writer.close()
            else:
                self._idle.append((reader, writer))
            return status, answer_headers, content
        raise HopError("connection lost twice")

    def close(self) -> None:
        for _, writer in self._idle:
            with contextlib.suppress(Exception):
                writer.close()
        self._idle.clear()


def _parse_head(head: bytes) -> tuple[int, dict[str, str]]:
    if len(head) > MAX_HEADER_BYTES:
        raise HopError("response headers too large")
    lines = head.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ", 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/1.") or not parts[1].isdigit():
        raise HopError(f"not an HTTP/1.1 answer: {lines[0][:60]!r}")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        if line:
            key, _, value = line.partition(":")
            headers[key.strip().lower()] = value.strip()
    return int(parts[1]), headers


async def _read_body(reader: asyncio.StreamReader, headers: Mapping[str, str]) -> bytes:
    if "chunked" in headers.get("transfer-encoding", "").lower():
        chunks: list[bytes] = []
        while True:
            size_line = await reader.readuntil(b"\r\n")
            try:
                size = int(size_line.split(b";", 1)[0].strip() or b"0", 16)
            except ValueError as exc:
                raise HopError("bad chunk size") from exc
            if size == 0:
                while (await reader.readuntil(b"\r\n")) != b"\r\n":  # trailers
                    pass
                return b"".join(chunks)
            chunks.append(await reader.readexactly(size))
            await reader.readexactly(2)
    length = headers.get("content-length")
    if length is not None and length.isdigit():
        return await reader.readexactly(int(length))
    if headers.get("connection", "").lower() == "close":
        return await reader.read()
    raise HopError("an answer without content-length or chunked framing")
