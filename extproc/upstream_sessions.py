"""The upstream sessions one process holds on one upstream: bounded, least recently used first, counted.

Pure bookkeeping (no I/O): closing a session is handed to a `closer` the fleet provides (it counts the close and
sends the upstream its DELETE). At the cap, the least recently used session that has not been used for
`active_s` is closed to make room; when every session is that recent, opening one more is refused instead.
"""

from __future__ import annotations

import time
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Generic, TypeVar

T = TypeVar("T")


class SessionCapReached(Exception):
    """Every upstream session on this upstream is in active use: a new one cannot be opened now."""

    def __init__(self, server: str, cap: int) -> None:
        super().__init__(f"{cap} upstream sessions open, all active")
        self.server = server
        self.cap = cap


@dataclass
class _Entry(Generic[T]):
    value: T
    last_used: float


class SessionPool(Generic[T]):
    """Owner (a gateway session, or a principal) -> its upstream session, in least-recently-used order."""

    def __init__(self, server: str, closer: Callable[[T, str], None], *, cap: int = 4000, active_s: float = 10.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.server = server
        self.cap = cap
        self.active_s = active_s
        self._closer = closer
        self._clock = clock
        self._entries: OrderedDict[str, _Entry[T]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, owner: object) -> bool:
        return owner in self._entries

    def __getitem__(self, owner: str) -> T:
        return self._entries[owner].value

    def values(self) -> Iterator[T]:
        return (e.value for e in self._entries.values())

    def get(self, owner: str) -> T | None:
        """The owner's session, marked as just used."""
        entry = self._entries.get(owner)
        if entry is None:
            return None
        entry.last_used = self._clock()
        self._entries.move_to_end(owner)
        return entry.value

    def make_room(self, pending: int = 0) -> None:
        """Before opening one more: close least recently used idle sessions until there is room, else refuse."""
        now = self._clock()
        while len(self._entries) + pending >= self.cap:
            victim = next((o for o, e in self._entries.items() if now - e.last_used >= self.active_s), None)
            if victim is None:
                raise SessionCapReached(self.server, self.cap)
            self.pop(victim, "evicted")

    def evict_one(self) -> bool:
        """Close the least recently used idle session (the upstream said it has too many); False if none is idle."""
        now = self._clock()
        victim = next((o for o, e in self._entries.items() if now - e.last_used >= self.active_s), None)
        if victim is None:
            return False
        self.pop(victim, "evicted")
        return True

    def add(self, owner: str, value: T) -> None:
        old = self._entries.pop(owner, None)
        if old is not None and old.value is not value:
            self._closer(old.value, "replaced")
        self._entries[owner] = _Entry(value, self._clock())

    def pop(self, owner: str, reason: str) -> T | None:
        """Forget the owner's session and close it (reason is the label on the closed counter)."""
        entry = self._entries.pop(owner, None)
        if entry is None:
            return None
        self._closer(entry.value, reason)
        return entry.value

    def clear(self, reason: str) -> None:
        for owner in list(self._entries):
            self.pop(owner, reason)

    def close_idle(self, idle_s: float, keep: Callable[[str], bool] = lambda _o: False) -> int:
        """Close sessions unused for `idle_s` whose owner `keep` does not vouch for; returns how many."""
        cutoff = self._clock() - idle_s
        idle = [o for o, e in self._entries.items() if e.last_used <= cutoff and not keep(o)]
        for owner in idle:
            self.pop(owner, "idle")
        return len(idle)


class SessionCounts:
    """Opened and closed upstream sessions, by server (and reason), for /metrics."""

    def __init__(self) -> None:
        self.opened: Counter[str] = Counter()
        self.closed: Counter[tuple[str, str]] = Counter()

    def render(self, open_now: dict[str, int]) -> str:
        lines = ["# HELP muster_edge_upstream_sessions_opened_total Handshake-era upstream sessions the processor "
                 "opened for its clients, by server.",
                 "# TYPE muster_edge_upstream_sessions_opened_total counter"]
        lines += [f'muster_edge_upstream_sessions_opened_total{{server="{s}"}} {n}'
                  for s, n in sorted(self.opened.items())]
        lines += ["# HELP muster_edge_upstream_sessions_closed_total Upstream sessions the processor closed, by "
                  "server and reason (deleted, idle, evicted, lost, catalog, upstream_failed, shutdown, replaced).",
                  "# TYPE muster_edge_upstream_sessions_closed_total counter"]
        lines += [f'muster_edge_upstream_sessions_closed_total{{reason="{r}",server="{s}"}} {n}'
                  for (s, r), n in sorted(self.closed.items())]
        lines += ["# HELP muster_edge_upstream_sessions_open Upstream sessions this processor holds now, by server.",
                  "# TYPE muster_edge_upstream_sessions_open gauge"]
        lines += [f'muster_edge_upstream_sessions_open{{server="{s}"}} {n}' for s, n in sorted(open_now.items())]
        return "\n".join(lines) + "\n"
