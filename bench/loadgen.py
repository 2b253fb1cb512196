"""The asyncio load driver: N workers, one keep-alive HTTP/1.1 connection each, closed loop.

Why not httpx2 on the hot path: on a 2-core machine the driver competes with Envoy, the processor and the
upstream for CPU, so every microsecond it spends per request is taken from the system under test. A raw
asyncio Protocol that writes pre-rendered bytes and only frames the answer costs a fraction of a general
client (`run.py --driver-check` prints both ceilings against the fast upstream); httpx2 is still used to
set things up and to read stats.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import cast

import httpx2

from bench.http1 import FramingError, Message, Parser
from bench.wire import Endpoint, Requests, succeeded


class ClientConnection(asyncio.Protocol):
    """One connection, one request in flight at a time."""

    def __init__(self) -> None:
        self.parser = Parser(responses=True)
        self.transport: asyncio.Transport | None = None
        self.waiter: asyncio.Future[Message] | None = None
        self.lost: Exception | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        try:
            messages = self.parser.feed(data)
        except FramingError as exc:
            self._fail(exc)
            return
        for message in messages:
            if self.waiter is not None and not self.waiter.done():
                self.waiter.set_result(message)

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail(exc or ConnectionResetError("connection closed by the server"))

    def _fail(self, exc: Exception) -> None:
        self.lost = exc
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(exc)
        if self.transport is not None:
            self.transport.close()

    async def exchange(self, data: bytes) -> Message:
        if self.lost is not None or self.transport is None:
            raise ConnectionError(f"connection unusable: {self.lost}")
        self.waiter = asyncio.get_running_loop().create_future()
        self.transport.write(data)
        return await self.waiter

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


async def connect(endpoint: Endpoint) -> ClientConnection:
    _, protocol = await asyncio.get_running_loop().create_connection(ClientConnection, endpoint.host, endpoint.port)
    return protocol


@dataclass
class Outcome:
    """What one measured window produced."""

    concurrency: int
    latencies_ns: list[int] = field(default_factory=list)
    errors: int = 0
    first_error: str = ""
    elapsed_s: float = 0.0
    driver_cpu_s: float = 0.0

    @property
    def count(self) -> int:
        return len(self.latencies_ns)

    @property
    def rps(self) -> float:
        return self.count / self.elapsed_s if self.elapsed_s else 0.0

    def percentile_ms(self, q: float) -> float:
        if not self.latencies_ns:
            return float("nan")
        ordered = sorted(self.latencies_ns)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))] / 1e6


async def _worker(conn: ClientConnection, requests: Requests, first_id: int, deadline: float, limit: int,
                  out: Outcome, record: bool) -> int:
    """Closed loop on one connection until the deadline or `limit` requests; warm-up (`record` False) stops at
    the first failure, so a target that cannot answer fails fast instead of spinning."""
    msg_id = first_id
    clock = time.perf_counter_ns
    stop_ns = int(deadline * 1e9)
    sent = 0
    while sent < limit:
        start = clock()
        if start >= stop_ns:
            break
        try:
            answer = await conn.exchange(requests.build(msg_id))
        except (ConnectionError, OSError, FramingError) as exc:
            out.errors += 1
            out.first_error = out.first_error or f"{type(exc).__name__}: {exc}"
            break
        end = clock()
        msg_id += 1
        sent += 1
        if not succeeded(answer):
            out.errors += 1
            if not out.first_error:
                out.first_error = f"HTTP {answer.status}: {answer.body[:240]!r}"
            if not record:
                break
        elif record:
            out.latencies_ns.append(end - start)
    return msg_id


async def run(requests: Requests, concurrency: int, *, warmup_s: float, measure_s: float, max_requests: int,
              before_measure: Callable[[], None] | None = None) -> Outcome:
    """Open `concurrency` connections (and sessions), warm up, then measure one closed-loop window.

    `before_measure` runs between warm-up and the window (snapshots of counters the caller diffs later).
    """
    conns = [await connect(requests.endpoint) for _ in range(concurrency)]
    try:
        bound = [await requests.open(conn.exchange) for conn in conns]
        ids = [1_000_000 * (i + 1) for i in range(concurrency)]
        warm = Outcome(concurrency)
        loop_time = time.perf_counter
        warm_deadline = loop_time() + warmup_s
        ids = await asyncio.gather(*(_worker(c, b, i, warm_deadline, 10**9, warm, False)
                                     for c, b, i in zip(conns, bound, ids, strict=True)))
        if warm.errors:
            raise RuntimeError(f"warm-up failed ({warm.errors} errors): {warm.first_error}")
        if before_measure is not None:
            before_measure()
        out = Outcome(concurrency)
        per_worker = max(1, max_requests // concurrency)
        cpu0 = time.process_time()
        start = loop_time()
        await asyncio.gather(*(_worker(c, b, i, start + measure_s, per_worker, out, True)
                               for c, b, i in zip(conns, bound, ids, strict=True)))
        out.elapsed_s = loop_time() - start
        out.driver_cpu_s = time.process_time() - cpu0
        return out
    finally:
        for conn in conns:
            conn.close()


async def run_httpx2(requests: Requests, concurrency: int, *, warmup_s: float, measure_s: float) -> Outcome:
    """The same closed loop through httpx2 (one client and connection per worker): the driver ceiling check."""
    url = f"http://{requests.endpoint.authority}{requests.endpoint.path}"
    headers = requests.headers

    async def worker(client: httpx2.AsyncClient, first_id: int, stop_at: float, out: Outcome | None) -> int:
        msg_id = first_id
        while time.perf_counter() < stop_at:
            start = time.perf_counter_ns()
            resp = await client.post(url, content=requests.body(msg_id), headers=headers)
            msg_id += 1
            if resp.status_code != 200 or b'"result":' not in resp.content:
                raise RuntimeError(f"HTTP {resp.status_code}: {resp.content[:200]!r}")
            if out is not None:
                out.latencies_ns.append(time.perf_counter_ns() - start)
        return msg_id

    limits = httpx2.Limits(max_connections=1, max_keepalive_connections=1)
    clients = [httpx2.AsyncClient(limits=limits, timeout=30.0) for _ in range(concurrency)]
    try:
        ids = [1_000_000 * (i + 1) for i in range(concurrency)]
        warm_until = time.perf_counter() + warmup_s
        ids = await asyncio.gather(*(worker(c, i, warm_until, None) for c, i in zip(clients, ids, strict=True)))
        out = Outcome(concurrency)
        cpu0, start = time.process_time(), time.perf_counter()
        await asyncio.gather(*(worker(c, i, start + measure_s, out) for c, i in zip(clients, ids, strict=True)))
        out.elapsed_s = time.perf_counter() - start
        out.driver_cpu_s = time.process_time() - cpu0
        return out
    finally:
        for client in clients:
            await client.aclose()
