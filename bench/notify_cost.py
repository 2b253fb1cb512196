"""What the notification channel costs: 200 listening clients, 10 upstreams, one upstream's tools changing.

    .venv/bin/python bench/notify_cost.py [--clients 200] [--events 30] [--idle 32] [--workers 1]

A real gateway (Envoy + processor) in front of 10 demo upstreams (one vendor, whose `toggle_beta` adds or removes
a tool and announces tools/list_changed; nine prometheus-like servers). Half the clients are 2026-07-28
`subscriptions/listen` streams, half handshake-era GET streams (each after its own `initialize`), all raw SSE
readers on one event loop. Printed:

- latency: for each event, from the moment the trigger call is sent (the upstream announces the change before
  it answers the call) to the moment each client read its tools/list_changed; p50 and p99 over events of the
  last client's latency (and of every client's). The trigger call's own round trip is inside the figure.
- processor RSS per idle listening client: (RSS with the streams open - RSS before) / clients, after a pause.
- processor CPU on idle clients: CPU over an idle window (`--idle` seconds, two keep-alive rounds) with every
  stream open, minus the same window before any stream was opened, per client.

Targets (issue 11): p99 < 250 ms, <= 50 KB RSS per idle client, no CPU on idle clients beyond keep-alives.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx2
import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.procstat import cpu_seconds, processor_pids
from tests.gateway_harness import Gateway, start_gateway
from tests.procs import start_demo_server

MODERN = "2026-07-28"
LEGACY = "2025-11-25"
ACCEPT = {"accept": "application/json, text/event-stream", "content-type": "application/json"}
META = {"io.modelcontextprotocol/protocolVersion": MODERN, "io.modelcontextprotocol/clientCapabilities": {}}
TARGET_P99_MS = 250.0
TARGET_KB = 50.0


def rss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status", encoding="ascii") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


class Listener:
    """One raw SSE reader on its own connection (no HTTP client library: the bench's own parsing must not be
    what is measured): when (monotonic) it read each tools/list_changed."""

    def __init__(self) -> None:
        self.seen: list[float] = []
        self.open = asyncio.Event()

    async def run(self, url: str, request: bytes) -> None:
        host, port = url.split("//", 1)[1].split("/", 1)[0].rsplit(":", 1)
        reader, writer = await asyncio.open_connection(host, int(port))
        try:
            writer.write(request)
            head = await reader.readuntil(b"\r\n\r\n")
            if not head.startswith(b"HTTP/1.1 200"):
                raise RuntimeError(f"stream refused: {head[:40]!r}")
            self.open.set()
            tail = b""
            while chunk := await reader.read(65536):
                now = time.monotonic()
                data = tail + chunk
                self.seen.extend([now] * data.count(b"tools/list_changed"))
                tail = data[-24:] if not data.endswith(b"\n\n") else b""
                if tail.count(b"tools/list_changed"):
                    tail = b""
        finally:
            writer.close()


def http_request(method: str, url: str, headers: dict[str, str], body: bytes = b"") -> bytes:
    authority, path = url.split("//", 1)[1].split("/", 1)
    lines = [f"{method} /{path} HTTP/1.1", f"host: {authority}", *(f"{k}: {v}" for k, v in headers.items())]
    if body:
        lines.append(f"content-length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


async def modern(http: httpx2.AsyncClient, url: str, index: int) -> tuple[Listener, asyncio.Task[None]]:
    listener = Listener()
    body = orjson.dumps({"jsonrpc": "2.0", "id": f"listen-{index}", "method": "subscriptions/listen",
                         "params": {"notifications": {"toolsListChanged": True}, "_meta": META}})
    headers = {**ACCEPT, "mcp-protocol-version": MODERN, "mcp-method": "subscriptions/listen"}
    request = http_request("POST", url, headers, body)
    task = asyncio.get_running_loop().create_task(listener.run(url, request))
    return listener, task


async def legacy(http: httpx2.AsyncClient, url: str, index: int) -> tuple[Listener, asyncio.Task[None]]:
    init = {"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
        "protocolVersion": LEGACY, "capabilities": {}, "clientInfo": {"name": f"bench-{index}", "version": "1"}}}
    resp = await http.post(url, content=orjson.dumps(init), headers=ACCEPT)
    session = resp.headers["mcp-session-id"]
    headers = {**ACCEPT, "mcp-session-id": session, "mcp-protocol-version": LEGACY}
    await http.post(url, content=b'{"jsonrpc":"2.0","method":"notifications/initialized"}', headers=headers)
    listener = Listener()
    get_headers = {"accept": "text/event-stream", "mcp-session-id": session, "mcp-protocol-version": LEGACY}
    task = asyncio.get_running_loop().create_task(listener.run(url, http_request("GET", url, get_headers)))
    return listener, task


async def trigger(http: httpx2.AsyncClient, url: str, n: int) -> None:
    body = orjson.dumps({"jsonrpc": "2.0", "id": 1000 + n, "method": "tools/call",
                         "params": {"name": "x_vendor_toggle_beta", "arguments": {}, "_meta": META}})
    headers = {**ACCEPT, "mcp-protocol-version": MODERN, "mcp-method": "tools/call",
               "mcp-name": "x_vendor_toggle_beta"}
    resp = await http.post(url, content=body, headers=headers)
    resp.raise_for_status()


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


async def measure(gw: Gateway, pids: list[int], clients: int, events: int, idle_s: float) -> dict[str, Any]:
    limits = httpx2.Limits(max_connections=clients + 20, max_keepalive_connections=clients + 20)
    async with httpx2.AsyncClient(timeout=httpx2.Timeout(30.0, read=None), limits=limits) as http:
        await asyncio.sleep(2)
        cpu0 = sum(cpu_seconds(p) for p in pids)
        await asyncio.sleep(idle_s)
        idle_cpu_before = sum(cpu_seconds(p) for p in pids) - cpu0
        rss_before = sum(rss_kb(p) for p in pids)

        opened = [await (modern if i % 2 == 0 else legacy)(http, gw.url, i) for i in range(clients)]
        listeners = [listener for listener, _ in opened]
        await asyncio.wait_for(asyncio.gather(*(li.open.wait() for li in listeners)), 60)
        await asyncio.sleep(3)
        rss_after = sum(rss_kb(p) for p in pids)
        cpu1 = sum(cpu_seconds(p) for p in pids)
        await asyncio.sleep(idle_s)
        idle_cpu_with = sum(cpu_seconds(p) for p in pids) - cpu1

        last: list[float] = []
        every: list[float] = []
        for n in range(events):
            start = time.monotonic()
            await trigger(http, gw.url, n)
            deadline = time.monotonic() + 10
            while any(len(li.seen) <= n for li in listeners) and time.monotonic() < deadline:
                await asyncio.sleep(0.002)
            arrivals = [(li.seen[n] - start) * 1000 for li in listeners if len(li.seen) > n]
            missing = clients - len(arrivals)
            if missing:
                raise RuntimeError(f"event {n}: {missing} clients not notified within 10 s")
            last.append(max(arrivals))
            every.extend(arrivals)
            await asyncio.sleep(0.2)
        extra = sum(len(li.seen) for li in listeners) - clients * events
        for _, task in opened:
            task.cancel()
        await asyncio.gather(*(t for _, t in opened), return_exceptions=True)
    return {"last": last, "every": every, "duplicates": extra, "rss_kb_per_client": (rss_after - rss_before) / clients,
            "idle_cpu_before": idle_cpu_before, "idle_cpu_with": idle_cpu_with, "idle_s": idle_s}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=200)
    parser.add_argument("--events", type=int, default=30)
    parser.add_argument("--idle", type=float, default=32.0, help="idle window in seconds (keep-alive every 15 s)")
    parser.add_argument("--workers", type=int, default=1)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="notify-bench-") as tmp, contextlib.ExitStack() as stack:
        servers = {"vendor": stack.enter_context(start_demo_server("vendor", name="vendor")).url}
        for i in range(9):
            servers[f"prom{i}"] = stack.enter_context(start_demo_server("prometheus", name=f"prom{i}")).url
        gw = stack.enter_context(start_gateway(Path(tmp) / "gw", servers, listTtlFloorMs=600_000,
                                               processor={"workers": args.workers}))
        pids = processor_pids(gw.process.pid)
        load = os.getloadavg()[0]
        out = asyncio.run(measure(gw, pids, args.clients, args.events, args.idle))
        out["load"] = (load, os.getloadavg()[0])
        out["internal"] = internal_ms(gw.log())
        return report(args, out)  # before the upstreams stop (that takes a while)


def internal_ms(log: str) -> tuple[list[float], list[float]]:
    """From the processor's log: the refetch after each announcement, and the pass that wrote every stream."""
    refetch = [float(m) for m in re.findall(r"fetched again, ([\d.]+) ms after its list_changed", log)]
    fanout = [float(m) for m in re.findall(r"streams checked in ([\d.]+) ms", log)]
    return refetch, [r + f for r, f in zip(refetch[-len(fanout):], fanout, strict=False)] if fanout else []


def report(args: argparse.Namespace, out: dict[str, Any]) -> int:
    last, every = out["last"], out["every"]
    per_client_cpu_ms = max(0.0, out["idle_cpu_with"] - out["idle_cpu_before"]) * 1000 / args.clients
    print(f"notification channel: {args.clients} listening clients (half listen, half GET), 10 upstreams, "
          f"{args.workers} worker(s), {args.events} upstream tools/list_changed events")
    print(f"  trigger -> last client notified:  p50 {statistics.median(last):7.1f} ms   "
          f"p99 {pct(last, 0.99):7.1f} ms   (target p99 < {TARGET_P99_MS:.0f} ms)")
    print(f"  trigger -> each client notified:  p50 {statistics.median(every):7.1f} ms   "
          f"p99 {pct(every, 0.99):7.1f} ms")
    print(f"  duplicate notifications:          {out['duplicates']}")
    print(f"  processor RSS per idle client:    {out['rss_kb_per_client']:7.1f} KB   (target <= {TARGET_KB:.0f} KB)")
    print(f"  processor CPU, idle {out['idle_s']:.0f} s:        {out['idle_cpu_before'] * 1000:7.1f} ms without "
          f"streams, {out['idle_cpu_with'] * 1000:7.1f} ms with {args.clients} (= {per_client_cpu_ms:.2f} ms per "
          f"idle client per {out['idle_s']:.0f} s: keep-alives only)")
    refetch, fanout = out["internal"]
    if refetch:
        print(f"  inside the processor: upstream list_changed -> list fetched again p50 "
              f"{statistics.median(refetch):.1f} ms, p99 {pct(refetch, 0.99):.1f} ms; -> every stream written "
              f"p50 {statistics.median(fanout):.1f} ms, p99 {pct(fanout, 0.99):.1f} ms")
    print(f"  machine load average (2 cores, shared): {out['load'][0]:.1f} at start, {out['load'][1]:.1f} at end")
    ok = pct(last, 0.99) < TARGET_P99_MS and out["rss_kb_per_client"] <= TARGET_KB and out["duplicates"] == 0
    print("  targets:", "met" if ok else "NOT met")
    sys.stdout.flush()
    return 0 if ok else 1

if __name__ == "__main__":
    sys.exit(main())
