"""What the kernel knows about the processes under test: children, peak RSS, CPU time. Linux /proc only.

The benchmark reports the processor's peak RSS beside every figure. VmHWM only ever grows, so before each
cell the peak is reset (`echo 5 > /proc/PID/clear_refs`, Linux >= 4.0) and the figure is that cell's own
peak; where the reset is refused the figure is the peak since start, and the table says so.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def children(pid: int) -> list[int]:
    """Direct children of `pid`, found by scanning /proc (no psutil in the venv)."""
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        with contextlib.suppress(OSError):
            with open(f"/proc/{entry}/stat", "rb") as fh:
                stat = fh.read()
            # the command name may contain spaces and parentheses: fields start after the last ')'
            fields = stat[stat.rindex(b")") + 2 :].split()
            if int(fields[1]) == pid:
                out.append(int(entry))
    return sorted(out)


def cmdline(pid: int) -> list[str]:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            return [part.decode(errors="replace") for part in fh.read().split(b"\0") if part]
    except OSError:
        return []


def descendants(pid: int) -> list[int]:
    found, queue = [], [pid]
    while queue:
        kids = children(queue.pop())
        found.extend(kids)
        queue.extend(kids)
    return found


def processor_pids(run_pid: int) -> list[int]:
    """The processor workers under a `muster-edge run` (its children whose command line says `processor`)."""
    return [p for p in descendants(run_pid) if "processor" in cmdline(p)]


def envoy_pids(run_pid: int) -> list[int]:
    return [p for p in descendants(run_pid) if any(part.endswith("envoy") for part in cmdline(p)[:2])]


def _status_kb(pid: int, key: str) -> int:
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def peak_rss_kb(pid: int) -> int:
    return _status_kb(pid, "VmHWM")


def reset_peak(pid: int) -> bool:
    """Make VmHWM start again from the current RSS; False if the kernel refused."""
    try:
        with open(f"/proc/{pid}/clear_refs", "w", encoding="ascii") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def cpu_seconds(pid: int) -> float:
    """User + system CPU time the process has used so far (0 if it is gone)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            stat = fh.read()
    except OSError:
        return 0.0
    fields = stat[stat.rindex(b")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def machine_busy_seconds() -> float:
    """CPU seconds all CPUs spent not idle since boot (user, nice, system, irq, softirq, steal)."""
    with open("/proc/stat", encoding="ascii") as fh:
        fields = [int(v) for v in fh.readline().split()[1:]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (fields + [0] * 8)[:8]
    return (user + nice + system + irq + softirq + steal) / CLOCK_TICKS


def other_load_pct(busy_s: float, ours_s: float, elapsed_s: float) -> float:
    """How much of the machine something other than the benchmark used during a window, in % of all CPUs: the
    noise a figure was measured under (other tenants, a test suite running beside the benchmark)."""
    if elapsed_s <= 0:
        return 0.0
    return max(0.0, busy_s - ours_s) / (elapsed_s * (os.cpu_count() or 1)) * 100


@dataclass
class Watch:
    """CPU and peak RSS of a group of processes over one measurement."""

    pids: list[int]
    cpu_start: float = 0.0
    peak_reset: bool = False

    def start(self) -> None:
        self.peak_reset = all([reset_peak(p) for p in self.pids]) if self.pids else False
        self.cpu_start = sum(cpu_seconds(p) for p in self.pids)

    def cpu_used(self) -> float:
        return sum(cpu_seconds(p) for p in self.pids) - self.cpu_start

    def peak_rss_mb(self) -> float:
        """The sum of the group's peaks (workers peak independently; the sum bounds what they held together)."""
        return sum(peak_rss_kb(p) for p in self.pids) / 1024
