"""The pieces of the session lifecycle that need no network: the bounded upstream-session pool, idle records,
sealed peer messages, and the `sessions` settings."""

from __future__ import annotations

import time

import orjson
import pytest

from catalog.config import ConfigError, parse_config
from extproc.peers import Peers
from extproc.sessions import Sealer, Sessions
from extproc.upstream_sessions import SessionCapReached, SessionCounts, SessionPool


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def pool(cap: int = 2, active_s: float = 10.0) -> tuple[SessionPool[str], list[tuple[str, str]], Clock]:
    closed: list[tuple[str, str]] = []
    clock = Clock()
    return SessionPool("s", lambda v, why: closed.append((v, why)), cap=cap, active_s=active_s, clock=clock), \
        closed, clock


def test_at_the_cap_the_least_recently_used_idle_session_is_closed() -> None:
    p, closed, clock = pool()
    p.add("a", "A")
    clock.now += 1
    p.add("b", "B")
    clock.now += 1
    assert p.get("a") == "A"  # b is now the least recently used
    clock.now += 20
    p.make_room()
    assert closed == [("B", "evicted")] and "a" in p and "b" not in p


def test_when_all_are_active_a_new_one_is_refused_and_nothing_is_closed() -> None:
    p, closed, clock = pool()
    p.add("a", "A")
    p.add("b", "B")
    clock.now += 5
    with pytest.raises(SessionCapReached) as refused:
        p.make_room()
    assert refused.value.cap == 2 and closed == []


def test_sessions_being_opened_count_against_the_cap() -> None:
    p, closed, _ = pool(cap=3, active_s=0)
    p.add("a", "A")
    p.make_room(pending=1)
    assert closed == []
    p.make_room(pending=2)
    assert closed == [("A", "evicted")]


def test_idle_sessions_close_unless_their_owner_is_vouched_for() -> None:
    p, closed, clock = pool(cap=10)
    p.add("a", "A")
    p.add("b", "B")
    clock.now += 100
    p.add("c", "C")
    assert p.close_idle(50, keep=lambda owner: owner == "b") == 1
    assert closed == [("A", "idle")] and len(p) == 2


def test_replacing_and_popping_and_clearing_close_each_session_once() -> None:
    p, closed, _ = pool(cap=10)
    p.add("a", "A")
    p.add("a", "A2")
    assert p.pop("a", "deleted") == "A2"
    assert p.pop("a", "deleted") is None
    p.add("b", "B")
    p.clear("shutdown")
    assert closed == [("A", "replaced"), ("A2", "deleted"), ("B", "shutdown")] and len(p) == 0


def test_counts_render_as_prometheus_text() -> None:
    counts = SessionCounts()
    counts.opened["k8s"] += 3
    counts.closed[("k8s", "deleted")] += 2
    text = counts.render({"k8s": 1})
    assert 'muster_edge_upstream_sessions_opened_total{server="k8s"} 3' in text
    assert 'muster_edge_upstream_sessions_closed_total{reason="deleted",server="k8s"} 2' in text
    assert 'muster_edge_upstream_sessions_open{server="k8s"} 1' in text
    assert "# TYPE muster_edge_upstream_sessions_open gauge" in text


def test_idle_records_are_found_and_forgetting_returns_the_entry() -> None:
    sessions = Sessions(Sealer(bytes(32)), idle_timeout_s=0.05)
    _, nonce = sessions.mint("alice", "2025-11-25")
    assert len(sessions) == 1 and sessions.holds_owner(nonce.hex()) and not sessions.holds_owner("zz")
    assert sessions.idle() == []
    time.sleep(0.06)
    assert [n for n, _ in sessions.idle()] == [nonce]
    sessions.record(nonce)  # used again: not idle
    assert sessions.idle() == [] and sessions.seen_within(nonce, 10)
    sessions.forget(nonce)
    assert len(sessions) == 0


def test_peer_messages_are_sealed_and_a_forged_one_is_refused() -> None:
    sealer = Sealer(bytes(32))
    peers = Peers(sealer)
    ended: list[tuple[list[tuple[bytes, int]], str]] = []

    def end_here(items: list[tuple[bytes, int]], why: str) -> None:
        ended.append((items, why))

    def seen_here(nonces: list[bytes]) -> list[bytes]:
        return nonces[:1]

    body = sealer.seal(orjson.dumps({"op": "end", "reason": "deleted", "sessions": [["00ff", 7]]}),
                       b"muster-edge/peer/v1").encode()
    assert peers.handle(body, end_here, seen_here) == (200, b"[]")
    assert ended == [([(b"\x00\xff", 7)], "deleted")]
    forged = Sealer(bytes(range(32))).seal(orjson.dumps({"op": "end", "sessions": [["00", 1]]}),
                                           b"muster-edge/peer/v1").encode()
    assert peers.handle(forged, end_here, seen_here)[0] == 403
    assert peers.handle(b'{"op": "end"}', end_here, seen_here)[0] == 403
    ask = sealer.seal(orjson.dumps({"op": "seen", "sessions": ["aa", "bb"]}), b"muster-edge/peer/v1").encode()
    assert peers.handle(ask, end_here, seen_here) == (200, b'["aa"]')
    assert len(ended) == 1


def test_sessions_settings() -> None:
    cfg = parse_config("sessions: {idleTimeoutSeconds: 60, maxUpstreamSessions: 5, activeWindowSeconds: 0}\n")
    assert (cfg.sessions.idle_timeout_s, cfg.sessions.max_upstream_sessions, cfg.sessions.active_window_s) == \
        (60, 5, 0)
    default = parse_config("{}\n").sessions
    assert (default.idle_timeout_s, default.max_upstream_sessions) == (1800, 4000)
    with pytest.raises(ConfigError, match="sessions: maxUpstreamSessions"):
        parse_config("sessions: {maxUpstreamSessions: 0}\n")
    with pytest.raises(ConfigError, match="sessions: expected"):
        parse_config("sessions: {idle: 3}\n")


def test_evict_one_closes_the_least_recently_used_idle_session_only() -> None:
    p, closed, clock = pool(cap=10, active_s=5)
    p.add("a", "A")
    p.add("b", "B")
    assert not p.evict_one() and closed == []
    clock.now += 10
    assert p.get("a") == "A"
    assert p.evict_one() and closed == [("B", "evicted")]


def test_an_ended_session_is_known_by_its_owner_name() -> None:
    sessions = Sessions(Sealer(bytes(32)))
    _, nonce = sessions.mint("alice", "2025-11-25")
    assert not sessions.owner_ended(nonce.hex())
    sessions.end(nonce)
    assert sessions.owner_ended(nonce.hex()) and not sessions.owner_ended("caller:alice")
