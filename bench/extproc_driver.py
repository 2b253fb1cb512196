"""Drive one processor worker directly over gRPC, the way Envoy does, and count ext_proc cycles per second.

A cycle is one HTTP request's worth of messages on its own stream: the request body, with the request headers in
forwarded metadata as Envoy's headers_in filter packs them (extproc/carried.py); a routed call's answer goes to
the processor only when Envoy's matcher says it needs it, on a stream of its own. `--two-messages` sends the
request headers and the body as two messages instead (the path before one-message routing).
Taking Envoy out of the loop shows what the processor alone can do per core.
The driver pre-serialises every message once (the method is called without serialisers, so bytes go straight
to the wire) and only parses replies during warm-up, which keeps its own gRPC-Python cost as low as it can be;
it still pays gRPC-Python's per-message cost, which is why `run.py` reports the processor's CPU per cycle as
well as the wall-clock rate.

    .venv/bin/python -m bench.extproc_driver --target 127.0.0.1:P --scenario tools_call --name x_s01_echo \
        --concurrency 16 --seconds 3

prints one JSON object with the outcome.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import grpc
import orjson
from envoy.service.ext_proc.v3 import external_processor_pb2 as ep

from bench import procstat
from extproc import carried

METHOD = "/envoy.service.ext_proc.v3.ExternalProcessor/Process"
MODERN = "2026-07-28"
LEGACY_VERSION = "2025-11-25"
ENVELOPE = {"io.modelcontextprotocol/protocolVersion": MODERN, "io.modelcontextprotocol/clientCapabilities": {}}
CHANNEL_OPTIONS = [("grpc.max_receive_message_length", 80 << 20), ("grpc.max_send_message_length", 80 << 20)]


def headers_message(pairs: dict[str, str], end_of_stream: bool = False) -> bytes:
    request = ep.ProcessingRequest()
    target = request.request_headers
    for key, value in pairs.items():
        header = target.headers.headers.add()
        header.key = key
        header.raw_value = value.encode()
    target.end_of_stream = end_of_stream
    return request.SerializeToString()


def body_message(body: bytes, headers: dict[str, str] | None = None) -> bytes:
    """The body message; with `headers`, carrying them in metadata as Envoy's headers_in filter does."""
    request = ep.ProcessingRequest()
    request.request_body.body = body
    request.request_body.end_of_stream = True
    if headers is not None:
        packed = "\n".join(f"{k}\n{v}" for k, v in headers.items())
        fields = request.metadata_context.filter_metadata[carried.REQUEST_NAMESPACE].fields
        fields[carried.REQUEST_KEY].string_value = packed
    return request.SerializeToString()


TWO_MESSAGES = False  # --two-messages: request headers, then the body (the path before one-message routing)


def cycle_messages(hdrs: dict[str, str], body: bytes) -> tuple[bytes, ...]:
    if TWO_MESSAGES:
        return headers_message(hdrs), body_message(body)
    return (body_message(body, hdrs),)


def replies(*kinds: str) -> tuple[str, ...]:
    return ("request_headers", *kinds) if TWO_MESSAGES else kinds


def http_request(authority: str, path: str, body: bytes, extra: dict[str, str]) -> dict[str, str]:
    """The request headers as Envoy's HTTP connection manager hands them to ext_proc."""
    return {":authority": authority, ":path": path, ":method": "POST", ":scheme": "http",
            "accept": "application/json, text/event-stream", "content-type": "application/json",
            "content-length": str(len(body)), "x-forwarded-proto": "http",
            "x-request-id": "5f0c6a59-3f1a-4a53-9a43-5e6c2b1d0e7a", **extra}


@dataclass(frozen=True)
class Scenario:
    """The messages of one cycle and the reply kinds the processor must give for them."""

    messages: tuple[bytes, ...]
    expect: tuple[str, ...]


def scenario(name: str, tool: str, session: str, authority: str, path: str) -> Scenario:
    if name == "tools_list":
        body = orjson.dumps({"jsonrpc": "2.0", "id": 7, "method": "tools/list", "params": {"_meta": ENVELOPE}})
        hdrs = http_request(authority, path, body, {"mcp-protocol-version": MODERN, "mcp-method": "tools/list"})
        return Scenario(cycle_messages(hdrs, body), replies("immediate_response"))
    if name == "ping":
        body = orjson.dumps({"jsonrpc": "2.0", "id": 7, "method": "ping"})
        hdrs = http_request(authority, path, body, {"mcp-protocol-version": LEGACY_VERSION, "mcp-session-id": session})
        return Scenario(cycle_messages(hdrs, body), replies("immediate_response"))
    if name == "tools_call":
        body = orjson.dumps({"jsonrpc": "2.0", "id": 7, "method": "tools/call",
                             "params": {"name": tool, "arguments": {"text": "hello"}, "_meta": ENVELOPE}})
        hdrs = http_request(authority, path, body, {"mcp-protocol-version": MODERN, "mcp-method": "tools/call",
                                                    "mcp-name": tool})
        return Scenario(cycle_messages(hdrs, body), replies("request_body"))
    raise SystemExit(f"unknown scenario {name!r}")


METADATA: tuple[tuple[str, str], ...] = ()  # the stream's gRPC metadata (--traceparent: as Envoy's tracer sends it)


async def _cycle(process: Any, messages: tuple[bytes, ...]) -> list[bytes]:
    call = process(metadata=METADATA) if METADATA else process()
    replies: list[bytes] = []
    try:
        for message in messages:
            await call.write(message)
            reply = await call.read()
            if reply is grpc.aio.EOF:
                raise RuntimeError(f"stream ended after {len(replies)} replies")
            replies.append(reply)
    finally:
        call.cancel()  # Envoy resets each ext_proc stream when its HTTP request ends
    return replies


def check(replies: list[bytes], expect: tuple[str, ...]) -> str:
    """'' when every reply is of the expected kind, else what went wrong."""
    kinds = [ep.ProcessingResponse.FromString(r).WhichOneof("response") for r in replies]
    if tuple(kinds) != expect:
        return f"replies {kinds}, expected {list(expect)}"
    last = ep.ProcessingResponse.FromString(replies[-1])
    if last.WhichOneof("response") == "immediate_response" and last.immediate_response.status.code != 200:
        return f"immediate {last.immediate_response.status.code}: {last.immediate_response.body[:200]!r}"
    return ""


async def open_session(process: Any, authority: str, path: str) -> str:
    """A sealed legacy session id minted by the processor itself (an initialize cycle)."""
    body = orjson.dumps({"jsonrpc": "2.0", "id": 1, "method": "initialize",
                         "params": {"protocolVersion": LEGACY_VERSION, "capabilities": {},
                                    "clientInfo": {"name": "bench", "version": "1"}}})
    answers = await _cycle(process, cycle_messages(http_request(authority, path, body, {}), body))
    answer = ep.ProcessingResponse.FromString(answers[-1]).immediate_response
    for option in answer.headers.set_headers:
        if option.header.key.lower() == "mcp-session-id":
            return (option.header.raw_value or option.header.value.encode()).decode()
    raise RuntimeError(f"initialize gave no session: {answer.status.code} {answer.body[:200]!r}")


@dataclass
class Result:
    scenario: str
    concurrency: int
    cycles: int = 0
    messages_per_cycle: int = 0
    elapsed_s: float = 0.0
    errors: int = 0
    first_error: str = ""
    driver_cpu_s: float = 0.0
    watched_cpu_s: float = 0.0  # CPU the watched processes (the processor worker) used during the window
    machine_busy_s: float = 0.0  # CPU the whole machine used during the window
    latencies_ns: list[int] = field(default_factory=list)


async def _worker(process: Any, messages: tuple[bytes, ...], stop_at: float, out: Result | None) -> None:
    clock = time.perf_counter_ns
    stop_ns = int(stop_at * 1e9)
    while True:
        start = clock()
        if start >= stop_ns:
            return
        try:
            await _cycle(process, messages)
        except Exception as exc:
            if out is not None:
                out.errors += 1
                out.first_error = out.first_error or f"{type(exc).__name__}: {exc}"
            continue
        if out is not None:
            out.latencies_ns.append(clock() - start)


async def measure(target: str, name: str, tool: str, concurrency: int, seconds: float, warmup: float,
                  authority: str, path: str, watch: list[int]) -> Result:
    async with grpc.aio.insecure_channel(target, options=CHANNEL_OPTIONS) as channel:
        process = channel.stream_stream(METHOD)
        session = await open_session(process, authority, path) if name == "ping" else ""
        plan = scenario(name, tool, session, authority, path)
        problem = check(await _cycle(process, plan.messages), plan.expect)
        if problem:
            raise SystemExit(f"{name}: the processor's first answer is wrong: {problem}")
        now = time.perf_counter
        await asyncio.gather(*(_worker(process, plan.messages, now() + warmup, None) for _ in range(concurrency)))
        out = Result(name, concurrency, messages_per_cycle=len(plan.messages))
        watched0, busy0 = sum(procstat.cpu_seconds(p) for p in watch), procstat.machine_busy_seconds()
        cpu0, start = time.process_time(), now()
        await asyncio.gather(*(_worker(process, plan.messages, start + seconds, out) for _ in range(concurrency)))
        out.elapsed_s = now() - start
        out.driver_cpu_s = time.process_time() - cpu0
        out.watched_cpu_s = sum(procstat.cpu_seconds(p) for p in watch) - watched0
        out.machine_busy_s = procstat.machine_busy_seconds() - busy0
        out.cycles = len(out.latencies_ns)
        return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", required=True, help="HOST:PORT of one processor worker")
    parser.add_argument("--scenario", choices=("tools_list", "ping", "tools_call"), required=True)
    parser.add_argument("--name", default="x_fast_echo", help="the exposed tool name for tools_call")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--warmup", type=float, default=0.5)
    parser.add_argument("--authority", default="127.0.0.1:8080", help=":authority as the gateway listener sees it")
    parser.add_argument("--path", default="/mcp")
    parser.add_argument("--traceparent", default="", help="W3C context in each stream's metadata, as Envoy's tracer")
    parser.add_argument("--watch-pids", default="", help="comma-separated PIDs whose CPU time to report")
    parser.add_argument("--two-messages", action="store_true", help="request headers and body as two messages")
    args = parser.parse_args(argv)
    global METADATA, TWO_MESSAGES
    METADATA = (("traceparent", args.traceparent), ("tracestate", "")) if args.traceparent else ()
    TWO_MESSAGES = args.two_messages
    watch = [int(p) for p in args.watch_pids.split(",") if p.strip()]
    result = asyncio.run(measure(args.target, args.scenario, args.name, args.concurrency, args.seconds,
                                 args.warmup, args.authority, args.path, watch))
    summary = asdict(result)
    ordered = sorted(summary.pop("latencies_ns"))
    for label, q in (("p50_ms", 0.5), ("p99_ms", 0.99)):
        summary[label] = ordered[min(len(ordered) - 1, int(q * len(ordered)))] / 1e6 if ordered else None
    print(json.dumps(summary), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
