"""The printed result: one row per measured cell, then the ratios against the project's targets.

Absolute numbers on a 2-core machine shared by the load driver, Envoy, the processor and the upstream are
pessimistic; the ratios measured in the same run, against the same upstream, are what the targets are about.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass


@dataclass
class Row:
    """One measured cell. None means "not applicable here" and prints as '-'."""

    section: str
    upstream: str
    target: str
    wire: str
    concurrency: int
    p50_ms: float | None = None
    p99_ms: float | None = None
    rps: float | None = None
    errors: int = 0
    failure: str = ""
    proc_mb: float | None = None
    proc_us: float | None = None
    envoy_us: float | None = None
    upstream_us: float | None = None
    driver_us: float | None = None
    upstream_rq: float | None = None
    xp_msgs: float | None = None
    other_pct: float | None = None
    note: str = ""


COLUMNS: tuple[tuple[str, str, int, str], ...] = (
    # header, attribute, width, format
    ("upstream", "upstream", 10, "s"),
    ("target", "target", 11, "s"),
    ("wire", "wire", 10, "s"),
    ("c", "concurrency", 3, "d"),
    ("p50 ms", "p50_ms", 7, ".2f"),
    ("p99 ms", "p99_ms", 7, ".2f"),
    ("req/s", "rps", 7, ".0f"),
    ("err", "errors", 4, "d"),
    ("procMB", "proc_mb", 6, ".1f"),
    ("proc us", "proc_us", 7, ".0f"),
    ("envoy us", "envoy_us", 8, ".0f"),
    ("up us", "upstream_us", 6, ".0f"),
    ("drv us", "driver_us", 6, ".0f"),
    ("up rq", "upstream_rq", 5, ".2f"),
    ("xp msg", "xp_msgs", 6, ".2f"),
    ("other%", "other_pct", 6, ".0f"),
)

LEGEND = (
    "procMB: peak RSS of the processor worker(s) during the cell (VmHWM, reset before the cell; summed over workers)."
    "\nproc/envoy/up/drv us: CPU microseconds per request spent by the processor, Envoy, the upstream(s) and the"
    " load driver.\nup rq: upstream HTTP requests per client call (Envoy cluster counters, or the fast upstream's"
    " own count).\nxp msg: ext_proc messages Envoy sent to the processor per client call (admin /stats).\nother%: CPU"
    " used during the window by processes that are not part of the cell (/proc/stat), in % of all CPUs: the noise"
    " the figure was measured under."
)


def _cell(value: object, width: int, fmt: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-".rjust(width)
    text = format(value, fmt)
    return text.ljust(width) if fmt == "s" else text.rjust(width)


def table(rows: Sequence[Row], title: str) -> str:
    header = " ".join(_cell(name, width, "s") if fmt == "s" else name.rjust(width) for name, _, width, fmt in COLUMNS)
    lines = [title, header, "-" * len(header)]
    for row in rows:
        if row.failure:
            lead = " ".join(_cell(getattr(row, attr), width, fmt) for _, attr, width, fmt in COLUMNS[:4])
            lines.append(f"{lead}  FAILED: {row.failure[:600]}")
            continue
        line = " ".join(_cell(getattr(row, attr), width, fmt) for _, attr, width, fmt in COLUMNS)
        lines.append(line + (f"  {row.note}" if row.note else ""))
    return "\n".join(lines)


def find(rows: Iterable[Row], upstream: str, target: str, wire: str, concurrency: int,
         section: str = "tools/call") -> Row | None:
    for row in rows:
        if (row.section, row.upstream, row.target, row.wire, row.concurrency) == (
                section, upstream, target, wire, concurrency) and not row.failure:
            return row
    return None


def _verdict(ok: bool) -> str:
    return "PASS" if ok else "MISS"


def free_processor_bound(envoy: Row, gateway: Row) -> float | None:
    """The best throughput ratio any processor could give, from CPU per call with the CPUs saturated: what Envoy
    alone, the upstream and the driver spend per call, over what they spend through the gateway (Envoy's own
    ext_proc work included) with the processor's share taken out."""
    parts = ("envoy_us", "upstream_us", "driver_us")
    base = [getattr(envoy, p) for p in parts]
    through = [getattr(gateway, p) for p in parts]
    if None in base or None in through or not sum(through):
        return None
    return float(sum(base) / sum(through))


def ratios(rows: Sequence[Row], upstreams: Sequence[str], gateways: Sequence[str]) -> list[str]:
    """The figures the targets are stated in, each with its verdict, for every upstream and gateway shape."""
    out = []
    for up in upstreams:
        for wire in ("2026-07-28", "legacy"):
            base1 = find(rows, up, "envoy", wire, 1) or find(rows, up, "envoy", "2026-07-28", 1)
            base16 = find(rows, up, "envoy", wire, 16) or find(rows, up, "envoy", "2026-07-28", 16)
            for gw in gateways:
                g1, g16 = find(rows, up, gw, wire, 1), find(rows, up, gw, wire, 16)
                if g1 and base1 and g1.p50_ms is not None and base1.p50_ms is not None:
                    delta = g1.p50_ms - base1.p50_ms
                    out.append(f"[{up:4}] {gw} {wire:10} p50 - envoy p50 at c=1   = {delta:6.2f} ms"
                               f"   target <= 1.0 ms: {_verdict(delta <= 1.0)}")
                if g16 and base16 and g16.rps and base16.rps:
                    ratio = g16.rps / base16.rps
                    target = f"target >= 0.3: {_verdict(ratio >= 0.3)}" if up == "fast" else "(target: vs contender)"
                    out.append(f"[{up:4}] {gw} {wire:10} req/s / envoy at c=16  = {ratio:6.2f}      {target}")
                    bound = free_processor_bound(base16, g16)
                    if bound is not None:
                        out.append(f"[{up:4}] {gw} {wire:10} same, if the processor cost nothing <= {bound:4.2f}"
                                   "      (CPU per call with the CPUs saturated: Envoy, upstream and driver only)")
            c1, c16 = find(rows, up, "contender", wire, 1), find(rows, up, "contender", wire, 16)
            if c1 and base1 and c1.p50_ms is not None and base1.p50_ms is not None:
                out.append(f"[{up:4}] contender  {wire:10} p50 - envoy p50 at c=1   = "
                           f"{c1.p50_ms - base1.p50_ms:6.2f} ms   (Envoy's own MCP filters)")
            if c16 and base16 and c16.rps and base16.rps:
                out.append(f"[{up:4}] contender  {wire:10} req/s / envoy at c=16  = {c16.rps / base16.rps:6.2f}"
                           f"      (Envoy's own MCP filters)")
                for gw in gateways:
                    g16 = find(rows, up, gw, wire, 16)
                    if g16 and g16.rps:
                        ratio = g16.rps / c16.rps
                        out.append(f"[{up:4}] {gw} {wire:10} req/s / contender c=16 = {ratio:6.2f}"
                                   f"      target >= 1: {_verdict(ratio >= 1.0)}")
    return out
