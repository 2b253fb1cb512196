"""The lean HTTP/1.1 client of the processor's own calls, against a local asyncio server."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import pytest

from extproc.hop import Hop, HopError

Answer = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


async def serve(answer: Answer) -> tuple[asyncio.Server, int]:
    server = await asyncio.start_server(answer, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


async def read_request(reader: asyncio.StreamReader) -> bytes:
    head = await reader.readuntil(b"\r\n\r\n")
    length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                  if line.lower().startswith(b"content-length"))
    return await reader.readexactly(length)


async def test_content_length_and_chunked_answers_on_one_kept_alive_connection() -> None:
    connections = 0

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        body = await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n%s"
                     % (len(body), body))
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n")
        await writer.drain()
        await reader.read()

    server, port = await serve(answer)
    hop = Hop("127.0.0.1", port)
    assert await hop.post("/mcp", {"x": "1"}, b"hello", 5) == (200, {"content-type": "application/json",
                                                                     "content-length": "5"}, b"hello")
    status, _, body = await hop.post("/mcp", {}, b"again", 5)
    assert (status, body, connections) == (200, b"abcde", 1)
    hop.close()
    server.close()


async def test_a_connection_closed_while_idle_is_replaced_and_the_request_sent_once_more() -> None:
    seen = []

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        seen.append(await read_request(reader))
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
        await writer.drain()
        writer.close()  # no keep-alive header: the client learns it only on the next request

    server, port = await serve(answer)
    hop = Hop("127.0.0.1", port)
    assert (await hop.post("/", {}, b"1", 5))[2] == b"ok"
    await asyncio.sleep(0.05)
    assert (await hop.post("/", {}, b"2", 5))[2] == b"ok"
    assert seen == [b"1", b"2"]
    server.close()


async def test_timeouts_and_unreachable_listeners_are_errors() -> None:
    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()

    server, port = await serve(silent)
    with pytest.raises(TimeoutError):
        await Hop("127.0.0.1", port).post("/", {}, b"x", 0.2)
    server.close()
    await server.wait_closed()
    with pytest.raises(HopError, match="unreachable"):
        await Hop("127.0.0.1", port).post("/", {}, b"x", 2)
