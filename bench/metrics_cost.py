"""What the metrics cost a routed call: the same gateway with `metrics: true` (the default: histograms, and
Envoy's gRPC access log of routed calls to the processor) and `metrics: false` (the original counters only, no
access log), running at once in front of the same fast upstream, every cell measured back to back in
alternating order. The access log's batches reach the processor during the cells, so their cost is in the
processor's CPU per call; a scrape of /metrics/all after the run checks that the histograms were filled.

A 3% difference is below what this shared machine drifts by within seconds, so the run carries its own noise
floor: a second metrics-off gateway (`metrics off'`) measured the same way, whose ratio to the first says how
far apart two identical targets land. It also drives each processor alone (gRPC, no Envoy: the per-message
histograms without the access log) and counts the access log's batches.
"""

from __future__ import annotations

import contextlib
import statistics
import time
import timeit
import urllib.request
from collections.abc import Sequence
from typing import TYPE_CHECKING

from bench import stacks
from bench.cells import Probe, Settings, measure_http, measure_processor, merge
from bench.main import CONCURRENCY, prime
from bench.report import Row, find
from bench.stacks import GatewayStack, Upstream
from bench.wire import LEGACY, MODERN, Call, Endpoint, Requests

if TYPE_CHECKING:
    from bench.main import Bench

SECTION = "metrics"
TARGET_RPS = 0.97  # metrics may take at most 3% of throughput
# a 3% difference is below this shared machine's drift over a few seconds: many short alternating rounds
QUICK, FULL = Settings(0.2, 0.7, 500_000, 6), Settings(0.3, 1.0, 500_000, 12)


def _probe(gw: GatewayStack, up: Upstream) -> Probe:
    return Probe(processor_pids=gw.processor_pids, envoy_pids=gw.envoy_pids, upstreams=[up],
                 admin_url=gw.admin_url, clusters=[f"mcp.{up.name}"], ext_proc=True)


def routed_calls_seen(gw: GatewayStack) -> float:
    """The routed calls in the call histogram, over every worker (/metrics/all)."""
    url = gw.status_urls[0].replace("/status", "/metrics/all")
    with urllib.request.urlopen(url, timeout=10) as resp:
        text = resp.read().decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("muster_edge_call_duration_seconds_count{"))


def access_log_counts(gw: GatewayStack) -> tuple[float, float]:
    url = gw.status_urls[0].replace("/status", "/metrics")
    with urllib.request.urlopen(url, timeout=10) as resp:
        lines = resp.read().decode().splitlines()

    def value(name: str) -> float:
        return sum(float(line.rsplit(" ", 1)[1]) for line in lines if line.startswith(name + " "))

    return value("muster_edge_access_log_batches_total"), value("muster_edge_access_log_entries_total")


def processor_alone(bench: Bench, on: GatewayStack, off: GatewayStack, up: Upstream) -> None:
    """The ext_proc driver straight to each worker, alternating, c=16: the per-message histograms' CPU."""
    settings = Settings(0.3, 1.5, 500_000, 1)
    tool = f"x_{up.name}_{up.tool}"
    results: dict[str, list[Row]] = {"metrics on": [], "metrics off": []}
    for round_no in range(2 if bench.quick else 4):
        order = [("metrics on", on), ("metrics off", off)]
        for label, gw in order if round_no % 2 == 0 else reversed(order):
            base = Row(SECTION, "ext_proc", label, "tools_call", 16)
            results[label].append(measure_processor(base, gw.processor_listen[0], "tools_call", tool,
                                                    gw.url.split("/")[2], 16, settings, gw.processor_pids))
    for rows in results.values():
        bench.add(merge(rows))


def per_call_cost() -> str:
    """The processor's added work per routed call, in process and in isolation (no gRPC, nothing else running
    against it): two message observations, the method in the routed request's metadata, and the call's access
    log entry (parsed out of a batch of 72, as Envoy sends them, and observed in three histograms)."""
    from envoy.service.accesslog.v3 import als_pb2
    from envoy.service.ext_proc.v3 import external_processor_pb2 as ep

    from extproc.access_log import AccessLogs
    from extproc.metrics import Metrics

    metrics = Metrics()
    batch = als_pb2.StreamAccessLogsMessage()
    for _ in range(72):
        entry = batch.http_logs.log_entry.add()
        common = entry.common_properties
        fields = common.metadata.filter_metadata["muster_edge"].fields
        fields["server"].string_value = "fast"
        fields["method"].string_value = "tools/call"
        fields["rpc_id"].string_value = "1"
        fields["plan"].string_value = '{"server":"fast","client_id":1,"modern_client":true,"upstream_id":1}'
        common.duration.FromMicroseconds(1500)
        common.time_to_first_upstream_tx_byte.FromMicroseconds(400)
        common.time_to_last_upstream_rx_byte.FromMicroseconds(900)
        entry.response.response_code.value = 200
        entry.request.path = "/mcp"
        entry.request.request_id = "0f8e-4c1d-9b7a-2e6f"
    raw = batch.SerializeToString()
    logs = AccessLogs(metrics, lambda: {"fast"}, {"tools/call"})

    def one_batch() -> None:
        logs.record(als_pb2.StreamAccessLogsMessage.FromString(raw))

    def one_call() -> None:
        resp = ep.ProcessingResponse()
        resp.dynamic_metadata.fields["muster_edge"].struct_value.fields["method"].string_value = "tools/call"
        for kind in ("request_headers", "request_body"):
            started = time.perf_counter()
            metrics.message(kind, time.perf_counter() - started)

    batch_s = min(timeit.repeat(one_batch, number=300, repeat=5)) / 300 / 72
    call_s = min(timeit.repeat(one_call, number=20_000, repeat=5)) / 20_000
    return (f"processor work added per routed call, in process: {(batch_s + call_s) * 1e6:.1f} us"
            f" ({batch_s * 1e6:.1f} us for its access log entry, {call_s * 1e6:.1f} us for the message"
            f" histograms and the method metadata); gRPC-Python's own cost of an access log batch"
            f" (~250 us) is shared by the calls in it")


def run(bench: Bench) -> None:
    wires = (MODERN,) if bench.quick else (MODERN, LEGACY)
    with contextlib.ExitStack() as stack:
        up = stack.enter_context(stacks.fast_upstream("fast"))
        on = stack.enter_context(stacks.gateway(bench.work / "gw-metrics-on", [up], 1))
        off = stack.enter_context(stacks.gateway(bench.work / "gw-metrics-off", [up], 1, {"metrics": False}))
        twin = stack.enter_context(stacks.gateway(bench.work / "gw-metrics-off2", [up], 1, {"metrics": False}))
        call = Call("tools/call", f"x_{up.name}_{up.tool}", up.arguments)
        for gw in (on, off, twin):
            for wire in wires:
                prime(Requests(Endpoint.parse(gw.url), wire, call))
        targets = [("metrics on", on), ("metrics off", off), ("metrics off'", twin)]
        settings = QUICK if bench.quick else FULL
        for c in CONCURRENCY:
            for wire in wires:
                rounds: dict[str, list[Row]] = {name: [] for name, _ in targets}
                for round_no in range(settings.rounds):
                    for name, gw in targets if round_no % 2 == 0 else reversed(targets):
                        rounds[name].append(measure_http(Row(SECTION, "fast", name, wire, c),
                                                         Requests(Endpoint.parse(gw.url), wire, call), c, settings,
                                                         _probe(gw, up)))
                for name, _ in targets:
                    bench.add(merge(rounds[name]))
                bench.verdicts.append(paired(wire, c, rounds))
        processor_alone(bench, on, off, up)
        bench.notes.append(per_call_cost())
        stacks.wait_until(lambda: routed_calls_seen(on) > 0, 5, "the access log's first batch")
        batches, entries = access_log_counts(on)
        bench.notes.append(f"metrics on: {routed_calls_seen(on):.0f} routed calls in muster_edge_call_duration_seconds"
                           f" after the run, from {entries:.0f} access log entries in {batches:.0f} gRPC messages"
                           f" ({entries / max(batches, 1):.0f} calls per message)")
        bench.gateway_stats(on, "metrics-on gateway")
        bench.gateway_stats(off, "metrics-off gateway")


def paired(wire: str, c: int, rounds: dict[str, list[Row]]) -> str:
    """Medians of the per-round ratios: each round measures on, off and off' within seconds of each other, so a
    ratio inside a round is free of the machine's slower drift, and the median drops the rounds a burst hit."""
    def med(values: list[float]) -> float:
        return statistics.median(values) if values else float("nan")

    def ratio(a: str, attr: str) -> float:
        return med([getattr(x, attr) / getattr(y, attr) for x, y in zip(rounds[a], rounds["metrics off"], strict=True)
                    if not x.failure and not y.failure and getattr(x, attr) and getattr(y, attr)])

    def added(a: str, attr: str) -> float:
        return med([getattr(x, attr) - getattr(y, attr) for x, y in zip(rounds[a], rounds["metrics off"], strict=True)
                    if getattr(x, attr) is not None and getattr(y, attr) is not None])

    def least(a: str, attr: str) -> float:
        values = [getattr(x, attr) for x in rounds[a] if getattr(x, attr) is not None]
        return min(values) if values else float("nan")

    on, twin = "metrics on", "metrics off'"
    rps = ratio(on, "rps")
    # the least CPU per call a target showed over the rounds: what it costs when nothing else competes
    floor_cpu = (f"; least CPU/call over the rounds (processor, Envoy): on {least(on, 'proc_us'):.0f},"
                 f" {least(on, 'envoy_us'):.0f} us; off {least('metrics off', 'proc_us'):.0f},"
                 f" {least('metrics off', 'envoy_us'):.0f} us; off' {least(twin, 'proc_us'):.0f},"
                 f" {least(twin, 'envoy_us'):.0f} us")
    return (f"[metr ] paired ({len(rounds[on])} rounds, medians) tools/call {wire:10} c={c:<2} on/off:"
            f" req/s x{rps:.3f}, p50 x{ratio(on, 'p50_ms'):.3f}, processor CPU/call {added(on, 'proc_us'):+.0f} us,"
            f" Envoy {added(on, 'envoy_us'):+.0f} us | noise floor off'/off: req/s x{ratio(twin, 'rps'):.3f},"
            f" p50 x{ratio(twin, 'p50_ms'):.3f}, processor {added(twin, 'proc_us'):+.0f} us,"
            f" Envoy {added(twin, 'envoy_us'):+.0f} us   target req/s >= x{TARGET_RPS:.2f}:"
            f" {'PASS' if rps >= TARGET_RPS else 'MISS'}{floor_cpu}")


def summary(rows: Sequence[Row]) -> list[str]:
    lines = []
    for wire in (MODERN, LEGACY):
        for c in CONCURRENCY:
            on = find(rows, "fast", "metrics on", wire, c, section=SECTION)
            off = find(rows, "fast", "metrics off", wire, c, section=SECTION)
            if not (on and off and on.p50_ms and off.p50_ms and on.rps and off.rps):
                continue
            rps = on.rps / off.rps
            cpu = f"; processor CPU/call {on.proc_us or 0:.0f} vs {off.proc_us or 0:.0f} us, Envoy" \
                  f" {on.envoy_us or 0:.0f} vs {off.envoy_us or 0:.0f} us"
            twin = find(rows, "fast", "metrics off'", wire, c, section=SECTION)
            floor = f"; noise floor (off'/off): p50 x{twin.p50_ms / off.p50_ms:.3f}, req/s x{twin.rps / off.rps:.3f}" \
                if twin and twin.p50_ms and twin.rps else ""
            lines.append(f"[metr ] tools/call {wire:10} c={c:<2} metrics on/off: p50 x{on.p50_ms / off.p50_ms:.3f}"
                         f" ({on.p50_ms:.2f} vs {off.p50_ms:.2f} ms), req/s x{rps:.3f} ({on.rps:.0f} vs"
                         f" {off.rps:.0f}){cpu}; procMB {on.proc_mb or 0:.0f} vs {off.proc_mb or 0:.0f}{floor}"
                         f"   target req/s >= x{TARGET_RPS:.2f}: {'PASS' if rps >= TARGET_RPS else 'MISS'}")
    on = find(rows, "ext_proc", "metrics on", "tools_call", 16, section=SECTION)
    off = find(rows, "ext_proc", "metrics off", "tools_call", 16, section=SECTION)
    if on and off and on.proc_us and off.proc_us and on.rps and off.rps:
        lines.append(f"[metr ] processor alone (gRPC driver, tools/call cycles, c=16) metrics on/off: processor CPU"
                     f" per cycle {on.proc_us:.0f} vs {off.proc_us:.0f} us (x{on.proc_us / off.proc_us:.3f}),"
                     f" cycles/s x{on.rps / off.rps:.3f}")
    return lines
