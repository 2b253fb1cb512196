"""The floor of a Python ext_proc processor: a grpc.aio servicer with the gateway's server settings that answers
every message at once without reading it (a body message gets an empty body reply).

Driven by bench/extproc_driver.py like a real worker, it shows what gRPC-Python, the event loop and protobuf cost
per message before any of the gateway's own work: the processor's CPU per call minus this is what parsing and
deciding cost.

    .venv/bin/python -m bench.echo_processor --port 0      prints `READY 127.0.0.1:PORT`

Options try other server settings on the same floor (the losers are in the README's performance section):
`--grpc-option KEY=VALUE` (repeatable, an extra server option), `--generator` (reply by yielding from an async
generator instead of `context.write`), `--no-uvloop`, `--no-limit` (no `maximum_concurrent_rpcs`), `--sync N`
(the sync server with a pool of N threads).
"""

from __future__ import annotations

import argparse
import asyncio
from collections.abc import AsyncIterator
from concurrent import futures
from typing import Any

import grpc
from envoy.service.ext_proc.v3 import external_processor_pb2 as ep
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as epg

from extproc.server import GRPC_OPTIONS


class Echo(epg.ExternalProcessorServicer):
    async def Process(self, request_iterator: Any, context: grpc.aio.ServicerContext) -> None:
        try:
            async for msg in request_iterator:
                reply = ep.ProcessingResponse()
                if msg.WhichOneof("request") == "request_headers":
                    reply.request_headers.SetInParent()
                else:
                    reply.request_body.SetInParent()
                await context.write(reply)
        except asyncio.CancelledError:
            pass


def _reply(msg: ep.ProcessingRequest) -> ep.ProcessingResponse:
    reply = ep.ProcessingResponse()
    if msg.WhichOneof("request") == "request_headers":
        reply.request_headers.SetInParent()
    else:
        reply.request_body.SetInParent()
    return reply


class EchoGenerator(epg.ExternalProcessorServicer):
    async def Process(self, request_iterator: Any,  # type: ignore[override]
                      context: grpc.aio.ServicerContext) -> AsyncIterator[ep.ProcessingResponse]:
        async for msg in request_iterator:
            yield _reply(msg)


class EchoSync(epg.ExternalProcessorServicer):
    def Process(self, request_iterator: Any, context: Any) -> Any:
        for msg in request_iterator:
            yield _reply(msg)


def serve_sync(port: int, threads: int, options: list[tuple[str, Any]]) -> None:
    server = grpc.server(futures.ThreadPoolExecutor(threads), options=options)
    epg.add_ExternalProcessorServicer_to_server(EchoSync(), server)
    bound = server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    print(f"READY 127.0.0.1:{bound}", flush=True)
    server.wait_for_termination()


async def serve(port: int, options: list[tuple[str, Any]] | None = None, generator: bool = False,
                limit: bool = True) -> None:
    server = grpc.aio.server(options=options or GRPC_OPTIONS, maximum_concurrent_rpcs=20_000 if limit else None)
    epg.add_ExternalProcessorServicer_to_server(EchoGenerator() if generator else Echo(), server)
    bound = server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    print(f"READY 127.0.0.1:{bound}", flush=True)
    await server.wait_for_termination()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--grpc-option", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--generator", action="store_true")
    parser.add_argument("--no-uvloop", action="store_true")
    parser.add_argument("--no-limit", action="store_true")
    parser.add_argument("--sync", type=int, default=0, metavar="THREADS")
    args = parser.parse_args()
    options: list[tuple[str, Any]] = list(GRPC_OPTIONS)
    for item in args.grpc_option:
        key, _, value = item.partition("=")
        options.append((key, int(value) if value.lstrip("-").isdigit() else value))
    if args.sync:
        serve_sync(args.port, args.sync, options)
        return
    main_coro = serve(args.port, options, args.generator, not args.no_limit)
    if args.no_uvloop:
        asyncio.run(main_coro)
        return
    import uvloop

    uvloop.run(main_coro)


if __name__ == "__main__":
    main()
