"""`muster-edge run` owns its children: Ctrl-C (SIGINT) stops Envoy and every processor worker."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

from tests.gateway_harness import start_gateway


def children_of(pid: int) -> set[int]:
    """Every descendant process of `pid`, from /proc."""
    parents: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            parents[int(entry)] = int(stat.rsplit(")", 1)[1].split()[1])
    found: set[int] = set()
    frontier = {pid}
    while frontier:
        frontier = {child for child, parent in parents.items() if parent in frontier} - found
        found |= frontier
    return found


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def test_sigint_stops_envoy_and_every_worker(tmp_path: Path) -> None:
    with start_gateway(tmp_path, {}, processor={"workers": 2}) as gw:
        pid = gw.process.pid
        kids = children_of(pid)
        names = {Path(f"/proc/{k}/cmdline").read_bytes().replace(b"\0", b" ").decode() for k in kids}
        assert any("envoy" in n for n in names) and sum("processor" in n for n in names) == 2, names
        os.kill(pid, signal.SIGINT)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and (alive(pid) or any(alive(k) for k in kids)):
            time.sleep(0.1)
        assert not any(alive(k) for k in kids), "children left behind after SIGINT"
        assert gw.process.proc.wait(5) == 0
