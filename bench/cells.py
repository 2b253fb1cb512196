"""Measure one cell (target x wire x concurrency) and everything around it that explains the number.

Around the load driver's measured window this reads: CPU time of the processor, Envoy and upstream processes
(/proc), the processor's peak RSS, Envoy's upstream request and ext_proc message counters (admin /stats), and
the fast upstream's own per-method counts, and turns them into per-request figures on a `Row`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

from bench import loadgen, procstat
from bench.report import Row
from bench.stacks import Upstream, counters
from bench.wire import Requests
from tests.procs import PYTHON, ROOT

EXT_PROC_SENT = ".ext_proc.stream_msgs_sent"  # summed over every listener's stat prefix


@dataclass(frozen=True)
class Settings:
    warmup_s: float
    measure_s: float
    max_requests: int
    rounds: int = 1  # passes over each group of tools/call targets (bench/main.py measure_group)


@dataclass
class Probe:
    """The processes and counters that belong to one target."""

    processor_pids: list[int] = field(default_factory=list)
    envoy_pids: list[int] = field(default_factory=list)
    upstreams: Sequence[Upstream] = ()
    admin_url: str = ""
    clusters: Sequence[str] = ()  # Envoy cluster names of the upstreams, for upstream_rq_total
    ext_proc: bool = False


@dataclass
class _Snapshot:
    envoy: dict[str, int] = field(default_factory=dict)
    methods: Counter[str] = field(default_factory=Counter)
    cpu: dict[str, float] = field(default_factory=dict)
    busy: float = 0.0


class _Recorder:
    """Takes the 'before' snapshot when the driver starts its window, and the 'after' one when it is done."""

    def __init__(self, probe: Probe) -> None:
        self.probe = probe
        self.processor = procstat.Watch(probe.processor_pids)
        self.before = _Snapshot()
        self.after = _Snapshot()

    def begin(self) -> None:
        """At the start of the cell, before warm-up: reset peaks, and keep a snapshot for failed cells."""
        self.processor.start()
        self.before = self._take()

    def explain_failure(self) -> str:
        """What the upstream saw and refused during a failed cell, and which MCP headers reached it
        (fast upstream only)."""
        seen = self._take().methods - self.before.methods
        if not seen:
            return ""
        text = ", ".join(f"{m} x{n}" for m, n in sorted(seen.items()))
        for upstream in self.probe.upstreams:
            with contextlib.suppress(OSError, ValueError):
                got = upstream.last_headers()
                if got:
                    mcp = {k: v for k, v in got.items() if k.startswith("mcp-")}
                    text += f"; its last request carried {json.dumps(mcp)} among {len(got)} headers"
        return text

    def _take(self) -> _Snapshot:
        snap = _Snapshot()
        if self.probe.admin_url:
            snap.envoy = counters(self.probe.admin_url, r"(upstream_rq_total|ext_proc\.stream_msgs_sent)$")
        for upstream in self.probe.upstreams:
            with contextlib.suppress(OSError, ValueError):
                snap.methods.update(upstream.method_counts())
        groups = {"processor": self.probe.processor_pids, "envoy": self.probe.envoy_pids,
                  "upstream": sorted({u.pid for u in self.probe.upstreams}), "driver": [os.getpid()]}
        snap.cpu = {name: sum(procstat.cpu_seconds(p) for p in pids) for name, pids in groups.items()}
        snap.busy = procstat.machine_busy_seconds()
        return snap

    def start_window(self) -> None:
        self.before = self._take()

    def end_window(self) -> None:
        self.after = self._take()

    def fill(self, row: Row, calls: int, elapsed_s: float) -> None:
        if calls <= 0:
            return
        per_call = 1e6 / calls
        cpu = {k: self.after.cpu[k] - self.before.cpu.get(k, 0.0) for k in self.after.cpu}
        row.other_pct = procstat.other_load_pct(self.after.busy - self.before.busy, sum(cpu.values()), elapsed_s)
        if self.probe.processor_pids:
            row.proc_us = cpu["processor"] * per_call
            row.proc_mb = self.processor.peak_rss_mb()
            if not self.processor.peak_reset:
                row.note = (row.note + " procMB=peak since start").strip()
        if self.probe.envoy_pids:
            row.envoy_us = cpu["envoy"] * per_call
        if self.probe.upstreams:
            row.upstream_us = cpu["upstream"] * per_call
        delta = {k: v - self.before.envoy.get(k, 0) for k, v in self.after.envoy.items()}
        if self.probe.clusters:
            total = sum(delta.get(f"cluster.{c}.upstream_rq_total", 0) for c in self.probe.clusters)
            row.upstream_rq = total / calls
        elif self.probe.upstreams and all(u.kind == "fast" for u in self.probe.upstreams):
            row.upstream_rq = sum((self.after.methods - self.before.methods).values()) / calls
        if self.probe.ext_proc:
            row.xp_msgs = sum(v for k, v in delta.items() if k.endswith(EXT_PROC_SENT)) / calls
        extra = self.after.methods - self.before.methods
        called = extra.most_common(1)[0][0] if extra else ""
        others = {m: n / calls for m, n in extra.items() if m != called and n}
        if others:
            row.note = (row.note + " upstream also got " + ", ".join(f"{m} {v:.2f}/call" for m, v in
                                                                      sorted(others.items()))).strip()


def measure_http(base: Row, requests: Requests, concurrency: int, settings: Settings, probe: Probe) -> Row:
    """Run one load cell; a target that cannot answer becomes a FAILED row rather than an exception."""
    row = Row(**{**base.__dict__, "concurrency": concurrency})
    recorder = _Recorder(probe)
    recorder.begin()
    try:
        outcome = asyncio.run(loadgen.run(requests, concurrency, warmup_s=settings.warmup_s,
                                          measure_s=settings.measure_s, max_requests=settings.max_requests,
                                          before_measure=recorder.start_window))
    except (RuntimeError, OSError, ConnectionError) as exc:
        row.failure = str(exc)
        seen = recorder.explain_failure()
        if seen:
            row.failure += f" | upstream saw: {seen}"
        return row
    recorder.end_window()
    calls = outcome.count + outcome.errors
    row.p50_ms, row.p99_ms, row.rps = outcome.percentile_ms(0.5), outcome.percentile_ms(0.99), outcome.rps
    row.errors = outcome.errors
    row.driver_us = outcome.driver_cpu_s * 1e6 / calls if calls else None
    if outcome.errors:
        row.note = f"first error: {outcome.first_error[:120]}"
    recorder.fill(row, calls, outcome.elapsed_s)
    return row


def measure_processor(base: Row, target: str, scenario: str, tool: str, authority: str, concurrency: int,
                      settings: Settings, processor_pids: list[int], traceparent: str = "") -> Row:
    """Run bench/extproc_driver.py against one worker in its own process. The driver reads the processor's CPU
    time and the machine's load at the edges of its own window (its start-up and warm-up stay outside)."""
    row = Row(**{**base.__dict__, "concurrency": concurrency})
    watch = procstat.Watch(processor_pids)
    watch.start()
    cmd = [str(PYTHON), "-m", "bench.extproc_driver", "--target", target, "--scenario", scenario, "--name", tool,
           "--concurrency", str(concurrency), "--seconds", str(settings.measure_s),
           "--warmup", str(settings.warmup_s), "--authority", authority,
           "--watch-pids", ",".join(str(p) for p in processor_pids)]
    if traceparent:
        cmd += ["--traceparent", traceparent]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120, check=False)
    if done.returncode != 0:
        row.failure = (done.stderr.strip().splitlines() or ["driver failed"])[-1]
        return row
    result = json.loads(done.stdout.strip().splitlines()[-1])
    cycles = result["cycles"] + result["errors"]
    cpu = result["watched_cpu_s"]
    row.p50_ms, row.p99_ms = result["p50_ms"], result["p99_ms"]
    row.rps = result["cycles"] / result["elapsed_s"] if result["elapsed_s"] else None
    row.errors = result["errors"]
    row.proc_mb = watch.peak_rss_mb()
    row.other_pct = procstat.other_load_pct(result["machine_busy_s"], cpu + result["driver_cpu_s"],
                                            result["elapsed_s"])
    if cycles:
        row.proc_us = cpu * 1e6 / cycles
        row.driver_us = result["driver_cpu_s"] * 1e6 / cycles
        row.xp_msgs = float(result["messages_per_cycle"])
    if cpu > 0:
        row.note = f"{result['cycles'] / cpu:.0f} cycles per processor CPU-second"
    if result["errors"]:
        row.note += f"; first error: {result['first_error'][:100]}"
    return row


def merge(rows: Sequence[Row]) -> Row:
    """One row from the rounds of the same cell: the mean of each figure, the sum of errors, the highest peak
    RSS; a failed round makes the whole cell failed."""
    failed = next((r for r in rows if r.failure), None)
    if failed is not None or len(rows) == 1:
        return failed or rows[0]
    out = Row(**{**rows[0].__dict__})
    for name in ("p50_ms", "p99_ms", "rps", "proc_us", "envoy_us", "upstream_us", "driver_us", "upstream_rq",
                 "xp_msgs"):
        values = [getattr(r, name) for r in rows if getattr(r, name) is not None]
        setattr(out, name, sum(values) / len(values) if values else None)
    peaks = [r.proc_mb for r in rows if r.proc_mb is not None]
    out.proc_mb = max(peaks) if peaks else None
    out.errors = sum(r.errors for r in rows)
    out.note = "; ".join(dict.fromkeys(r.note for r in rows if r.note))
    return out
