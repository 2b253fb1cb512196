"""Traces: what tracing costs a routed tools/call, off, on at sampling ratio 0, and on at 1.0.

Three gateways in front of one fast upstream run at once and are measured back to back in alternating rounds:
`trace off` (no `tracing:` in the config: the processor never imports the OpenTelemetry SDK), `trace 0.0`
(Envoy's tracer and the processor's SDK on, nothing sampled: Envoy still makes unsampled spans and passes
their context; the processor follows the decision) and `trace 1.0` (every call traced: Envoy's request,
upstream and ext_proc spans plus the processor's decision span, exported over OTLP/gRPC in batches). The
collector is bench/otlp_sink.py, a process of its own that counts the spans it receives.

What tracing off costs cannot be told from a gateway without the code, so it is measured where it lives: the
hooks a routed call passes through when tracing is off, timed in process and set against the processor's
CPU per call.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
import timeit
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from bench import stacks
from bench.cells import measure_processor, merge
from bench.families import probe
from bench.main import CONCURRENCY, prime
from bench.report import Row, find
from bench.wire import MODERN, Call, Endpoint, Requests
from tests.procs import PYTHON, ROOT, spawn

if TYPE_CHECKING:
    from bench.main import Bench

SECTION = "tracing"
TARGETS = ("trace off", "trace 0.0", "trace 1.0")
RPS_FLOOR_1 = 0.90  # sampling 1.0: at most 10% lower throughput
OFF_BUDGET = 0.01  # tracing off: its hooks under 1% of the processor's CPU per call ("nothing measurable")


@dataclass
class Sink:
    port: int
    stats_url: str

    def stats(self) -> dict[str, Any]:
        with urllib.request.urlopen(self.stats_url, timeout=5) as resp:
            return dict(json.loads(resp.read()))


@contextlib.contextmanager
def otlp_sink() -> Iterator[Sink]:
    cmd: list[str | os.PathLike[str]] = [PYTHON, "-m", "bench.otlp_sink", "--port", "0"]
    with spawn(cmd, "READY ", 20, cwd=ROOT) as proc:
        _, grpc_port, stats_port = proc.ready_line.split()
        yield Sink(int(grpc_port), f"http://127.0.0.1:{stats_port}/")


def hook_cost_ns() -> float:
    """ns per routed call spent in tracing's hooks with tracing off: the stream's check, the decision's span
    (a shared no-op) and its annotation, the audit line's check (extproc/server.py, gateway.py)."""
    from extproc import tracing

    assert not tracing.ON

    def one_call() -> None:
        if tracing.ON:
            pass
        with tracing.span("muster_edge.decide") as span:
            if span is not None:
                pass
        if tracing.ON:
            pass

    runs = 200_000
    return min(timeit.repeat(one_call, number=runs, repeat=5)) / runs * 1e9


def run(bench: Bench) -> None:
    work = bench.work / "tracing"
    with contextlib.ExitStack() as stack:
        sink = stack.enter_context(otlp_sink())
        fast = stack.enter_context(stacks.fast_upstream("tr"))
        endpoint = f"127.0.0.1:{sink.port}"
        gateways = {
            "trace off": stack.enter_context(stacks.gateway(work / "off", [fast], 1)),
            "trace 0.0": stack.enter_context(stacks.gateway(
                work / "r0", [fast], 1, {"tracing": {"endpoint": endpoint, "samplingRatio": 0.0}})),
            "trace 1.0": stack.enter_context(stacks.gateway(
                work / "r1", [fast], 1, {"tracing": {"endpoint": endpoint, "samplingRatio": 1.0}})),
        }
        call = Call("tools/call", f"x_{fast.name}_{fast.tool}", fast.arguments)
        for gw in gateways.values():
            prime(Requests(Endpoint.parse(gw.url), MODERN, call))
        before = _settled(sink, {"spans": -1})  # the priming calls' spans arrive up to a flush later
        calls_before = _calls(gateways)
        for c in CONCURRENCY:
            bench.compare(SECTION, "call", MODERN, c, [
                (label, Requests(Endpoint.parse(gw.url), MODERN, call), probe(gw, fast, [fast]))
                for label, gw in gateways.items()], bench.section_settings)
        calls = {label: n - calls_before[label] for label, n in _calls(gateways).items()}
        after = _settled(sink, before)
        got = {k: v - before["services"].get(k, 0) for k, v in after["services"].items()}
        traced = calls["trace 1.0"] + calls["trace 0.0"]
        bench.notes.append(f"tracing: spans the collector received during the cells, by service: {json.dumps(got)}"
                           f" for {calls['trace 1.0']} calls at 1.0 and {calls['trace 0.0']} at 0.0"
                           f" ({sum(got.values()) / max(calls['trace 1.0'], 1):.2f} spans per traced call;"
                           f" {traced} calls to traced gateways)")
        processor_alone(bench, gateways, call.name or "")
        bench.verdicts.append(off_verdict(bench.rows, hook_cost_ns()))


PARENTS = {"trace off": "", "trace 0.0": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-00",
           "trace 1.0": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"}  # Envoy's, per stream


def processor_alone(bench: Bench, gateways: dict[str, stacks.GatewayStack], tool: str) -> None:
    """The processor's own CPU per routed call, Envoy taken out (bench/extproc_driver.py straight to each worker,
    with the stream metadata Envoy's tracer would send: none, an unsampled or a sampled context), in alternating
    rounds: the least noisy figure for what tracing costs the processor."""
    s = bench.section_settings
    results: dict[str, list[Row]] = {label: [] for label in gateways}
    for round_no in range(s.rounds):
        order = list(gateways.items()) if round_no % 2 == 0 else list(reversed(gateways.items()))
        for label, gw in order:
            authority = gw.url.split("/")[2]
            results[label].append(measure_processor(Row(SECTION, "processor", label, "ext_proc", 16),
                                                    gw.processor_listen[0], "tools_call", tool, authority, 16, s,
                                                    gw.processor_pids, PARENTS[label]))
    for label in gateways:
        bench.add(merge(results[label]))


def _calls(gateways: dict[str, stacks.GatewayStack]) -> dict[str, int]:
    """Routed calls each gateway's Envoy sent upstream (its router's requests to the upstream's cluster)."""
    out = {}
    for label, gw in gateways.items():
        stats = stacks.counters(gw.admin_url, r"^cluster\.mcp\.tr\.upstream_rq_total$")
        out[label] = sum(stats.values())
    return out


def _settled(sink: Sink, before: dict[str, Any]) -> dict[str, Any]:
    """The collector's counts once the last batches arrived (both exporters flush every second)."""
    last = sink.stats()
    for _ in range(20):
        time.sleep(0.5)
        now = sink.stats()
        if now["spans"] == last["spans"] and now["spans"] > before["spans"]:
            return now
        last = now
    return last


def off_verdict(rows: Sequence[Row], ns: float) -> str:
    off = find(rows, "call", "trace off", MODERN, max(CONCURRENCY), section=SECTION)
    if not (off and off.proc_us):
        return f"[trace] tracing off: its hooks cost {ns:.0f} ns per routed call"
    share = ns / 1000 / off.proc_us
    return (f"[trace] tracing off: its hooks cost {ns:.0f} ns per routed call = {share:.3%} of the processor's"
            f" {off.proc_us:.0f} us CPU per call; no SDK imported   target nothing measurable (< {OFF_BUDGET:.0%}):"
            f" {'PASS' if share < OFF_BUDGET else 'MISS'}")


def summary(rows: Sequence[Row]) -> list[str]:
    lines = []
    for c in CONCURRENCY:
        off = find(rows, "call", "trace off", MODERN, c, section=SECTION)
        if not (off and off.p50_ms is not None and off.rps):
            continue
        for label in TARGETS[1:]:
            on = find(rows, "call", label, MODERN, c, section=SECTION)
            if not (on and on.p50_ms is not None and on.rps):
                continue
            ratio = on.rps / off.rps
            verdict = ""
            if label == "trace 1.0" and c == max(CONCURRENCY):
                verdict = f"   req/s target >= x{RPS_FLOOR_1}: {'PASS' if ratio >= RPS_FLOOR_1 else 'MISS'}"
            lines.append(f"[trace] tools/call c={c:<2} {label} vs off: p50 {on.p50_ms - off.p50_ms:+.2f} ms"
                         f" ({on.p50_ms:.2f} vs {off.p50_ms:.2f}), p50 x{on.p50_ms / off.p50_ms:.2f}, req/s"
                         f" x{ratio:.2f} ({on.rps:.0f} vs {off.rps:.0f}); processor us/call {on.proc_us or 0:.0f} vs"
                         f" {off.proc_us or 0:.0f}, Envoy {on.envoy_us or 0:.0f} vs {off.envoy_us or 0:.0f};"
                         f" procMB {on.proc_mb or 0:.0f} vs {off.proc_mb or 0:.0f}{verdict}")
    off = find(rows, "processor", "trace off", "ext_proc", 16, section=SECTION)
    for label in TARGETS[1:]:
        on = find(rows, "processor", label, "ext_proc", 16, section=SECTION)
        if off and on and off.proc_us and on.proc_us and off.rps and on.rps:
            lines.append(f"[trace] the processor alone, routed calls, {label} vs off: CPU per call {on.proc_us:.0f}"
                         f" vs {off.proc_us:.0f} us (x{on.proc_us / off.proc_us:.3f}), calls per processor"
                         f" CPU-second x{off.proc_us / on.proc_us:.3f}")
    return lines
