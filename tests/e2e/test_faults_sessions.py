"""Issue 9 rows 11 and 12: the handshake-era session lifecycle through real Envoy and 2 processor workers.

DELETE ends a session on every worker and replica; every upstream session the gateway opens is closed (the
upstream's own count, and /metrics, agree); idle sessions expire and give back their entries; the per-upstream
cap closes the least recently used idle session first and refuses clearly only when all are active.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import secrets
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx2

from tests.e2e.test_shared_state import start_redis
from tests.gateway_harness import Gateway, start_gateway
from tests.procs import PYTHON, ROOT, spawn

HANDSHAKE = "2025-11-25"
TOOL = "x_counted_tag"


@dataclass
class Counted:
    url: str

    def counts(self) -> dict[str, Any]:
        with urllib.request.urlopen(self.url.replace("/mcp", "/counts"), timeout=5) as resp:
            return dict(json.loads(resp.read()))


@contextlib.contextmanager
def counted_upstream(max_sessions: int = 0) -> Iterator[Counted]:
    cmd = [PYTHON, ROOT / "tests" / "session_upstream.py", "--port", "0", "--max-sessions", str(max_sessions)]
    with spawn(cmd, "READY ", 20) as proc:
        yield Counted(proc.ready_line.split(" ", 1)[1])


def status_ports(gw: Gateway) -> list[int]:
    first = int(gw.status_url.rsplit(":", 1)[1].split("/")[0])
    return [first + i for i in range(int(gw.config["processor"].get("workers", 1)))]


def metric(gw: Gateway, prefix: str) -> list[int]:
    """The sum of the lines starting with `prefix` in each worker's /metrics."""
    out = []
    for port in status_ports(gw):
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
            text = resp.read().decode()
        out.append(sum(int(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(prefix)))
    return out


def worker_status(gw: Gateway) -> list[dict[str, Any]]:
    out = []
    for port in status_ports(gw):
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/status", timeout=5) as resp:
            out.append(json.loads(resp.read()))
    return out


def wait_until(predicate: Callable[[], bool], what: str, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            if predicate():
                return
        except Exception as exc:  # a worker between answers: try again until the deadline
            last = exc
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what} ({last!r})")


class Client:
    """A handshake-era MCP client speaking raw HTTP, one gateway session."""

    def __init__(self, http: httpx2.AsyncClient, url: str) -> None:
        self.http = http
        self.url = url
        self.session = ""
        self._ids = 0

    def headers(self) -> dict[str, str]:
        out = {"accept": "application/json, text/event-stream", "content-type": "application/json"}
        if self.session:
            out.update({"mcp-session-id": self.session, "mcp-protocol-version": HANDSHAKE})
        return out

    async def post(self, method: str, params: dict[str, Any] | None = None, url: str = "") -> httpx2.Response:
        self._ids += 1
        body = {"jsonrpc": "2.0", "id": self._ids, "method": method, "params": params or {}}
        return await self.http.post(url or self.url, json=body, headers=self.headers())

    async def open(self) -> Client:
        answer = await self.post("initialize", {"protocolVersion": HANDSHAKE, "capabilities": {},
                                                "clientInfo": {"name": "t", "version": "1"}})
        assert answer.status_code == 200, answer.text
        self.session = answer.headers["mcp-session-id"]
        await self.http.post(self.url, json={"jsonrpc": "2.0", "method": "notifications/initialized"},
                             headers=self.headers())
        return self

    async def call(self, tag: str, url: str = "") -> httpx2.Response:
        return await self.post("tools/call", {"name": TOOL, "arguments": {"tag": tag}}, url)

    async def delete(self, url: str = "") -> httpx2.Response:
        return await self.http.delete(url or self.url, headers=self.headers())


def result_text(answer: httpx2.Response) -> str:
    text = answer.text
    if text.startswith(("event:", "data:", "id:")):
        text = next(line[5:].strip() for line in text.splitlines() if line.startswith("data:"))
    return text


def ok(answer: httpx2.Response) -> bool:
    return answer.status_code == 200 and '"result"' in result_text(answer) and '"isError":true' not in \
        result_text(answer).replace(" ", "")


async def test_delete_ends_the_session_on_every_worker_and_closes_every_upstream_session(tmp_path: Path) -> None:
    with counted_upstream() as up, start_gateway(tmp_path / "gw", {"counted": up.url},
                                                 processor={"workers": 2}) as gw:
        async with httpx2.AsyncClient(timeout=30) as http:
            clients = [await Client(http, gw.url).open() for _ in range(20)]
            # each session calls enough that both workers open an upstream session for it
            answers = await asyncio.gather(*(c.call(f"{i}-{n}") for i, c in enumerate(clients) for n in range(6)))
            assert all(ok(a) for a in answers), [a.text for a in answers if not ok(a)][:1]
            deleted = await asyncio.gather(*(c.delete() for c in clients))
            assert [d.status_code for d in deleted] == [200] * 20
            refused_before = metric(gw, 'muster_edge_requests_total{method="tools/call",outcome="error"}')
            after = await asyncio.gather(*(c.call(f"after-{i}-{n}") for i, c in enumerate(clients) for n in range(6)))
            assert [a.status_code for a in after] == [404] * len(after), [a.text for a in after if a.status_code != 404]
            assert all('"Session not found"' in a.text for a in after)
            refused_after = metric(gw, 'muster_edge_requests_total{method="tools/call",outcome="error"}')
            # the deleted ids reached both workers, and both refused them
            assert all(b > a for a, b in zip(refused_before, refused_after, strict=True)), (refused_before,
                                                                                             refused_after)
            again = await clients[0].delete()
            assert again.status_code == 404

        opened = sum(metric(gw, "muster_edge_upstream_sessions_opened_total"))
        assert opened >= 20  # one per session and worker that served it
        assert min(metric(gw, "muster_edge_upstream_sessions_opened_total")) > 0

        def all_closed() -> bool:
            counts = up.counts()
            closed = sum(metric(gw, 'muster_edge_upstream_sessions_closed_total{reason="deleted"'))
            client_sessions = set(counts["tags"].values())
            still_open = sum(metric(gw, "muster_edge_upstream_sessions_open{"))
            return (closed == opened and client_sessions <= set(counts["deleted"])
                    and len(counts["deleted"]) == opened and still_open == 0)

        wait_until(all_closed, "every upstream session closed")
        assert len(set(up.counts()["tags"].values())) == opened  # one upstream session per (session, worker)


async def test_replicas_sharing_redis_end_a_deleted_session_and_close_their_own_upstream_sessions(
        tmp_path: Path) -> None:
    key_file = tmp_path / "session.key"
    key_file.write_text(base64.b64encode(secrets.token_bytes(32)).decode())
    with contextlib.ExitStack() as stack:
        url = stack.enter_context(start_redis(tmp_path))
        up = stack.enter_context(counted_upstream())
        common: dict[str, Any] = {"processor": {"workers": 2}, "store": {"redis": url},
                                  "sessionKey": {"file": str(key_file)}}
        gw_a = stack.enter_context(start_gateway(tmp_path / "a", {"counted": up.url}, **common))
        gw_b = stack.enter_context(start_gateway(tmp_path / "b", {"counted": up.url}, **common))
        async with httpx2.AsyncClient(timeout=30) as http:
            clients = [await Client(http, gw_a.url).open() for _ in range(6)]
            calls = [c.call(f"{i}-{n}", gw.url) for i, c in enumerate(clients) for n in range(4) for gw in (gw_a, gw_b)]
            answers = await asyncio.gather(*calls)
            assert all(ok(a) for a in answers), [a.text for a in answers if not ok(a)][:1]
            # half deleted on the replica that did not mint them
            deleted = await asyncio.gather(*(c.delete(gw_b.url) for c in clients[:3]))
            assert [d.status_code for d in deleted] == [200] * 3
            after = await asyncio.gather(*(c.call(f"x{n}", gw.url) for c in clients[:3] for n in range(4)
                                           for gw in (gw_a, gw_b)))
            assert [a.status_code for a in after] == [404] * len(after)
            alive = await asyncio.gather(*(c.call(f"y{n}", gw.url) for c in clients[3:] for n in range(2)
                                           for gw in (gw_a, gw_b)))
            assert all(ok(a) for a in alive)
            await asyncio.gather(*(c.delete(gw_a.url) for c in clients[3:]))

        def all_closed() -> bool:
            opened = sum(metric(gw_a, "muster_edge_upstream_sessions_opened_total") +
                         metric(gw_b, "muster_edge_upstream_sessions_opened_total"))
            closed = sum(metric(gw_a, "muster_edge_upstream_sessions_closed_total") +
                         metric(gw_b, "muster_edge_upstream_sessions_closed_total"))
            counts = up.counts()
            return opened == closed == len(counts["deleted"]) and set(counts["tags"].values()) <= set(counts["deleted"])

        wait_until(all_closed, "every replica closed its upstream sessions")
        # both replicas held upstream sessions for these clients, and closed them
        assert sum(metric(gw_a, "muster_edge_upstream_sessions_closed_total")) > 0
        assert sum(metric(gw_b, "muster_edge_upstream_sessions_closed_total")) > 0


async def test_idle_sessions_expire_their_upstream_sessions_close_and_their_entries_go(tmp_path: Path) -> None:
    with counted_upstream() as up, start_gateway(tmp_path / "gw", {"counted": up.url}, processor={"workers": 2},
                                                 sessions={"idleTimeoutSeconds": 3}) as gw:
        async with httpx2.AsyncClient(timeout=30) as http:

            async def used(i: int) -> tuple[Client, list[httpx2.Response]]:
                client = await Client(http, gw.url).open()
                return client, list(await asyncio.gather(*(client.call(f"{i}-{n}") for n in range(4))))

            runs = await asyncio.gather(*(used(i) for i in range(10)))
            clients = [c for c, _ in runs]
            assert all(ok(a) for _, answers in runs for a in answers)
            assert sum(s["sessions"]["live"] for s in worker_status(gw)) > 0
            opened = sum(metric(gw, "muster_edge_upstream_sessions_opened_total"))
            assert opened >= 10

            def expired() -> bool:
                statuses = worker_status(gw)
                return (sum(s["sessions"]["live"] for s in statuses) == 0
                        and sum(s["sessions"]["upstream"]["counted"] for s in statuses) == 0)

            wait_until(expired, "idle sessions to expire")
            closed_idle = sum(metric(gw, 'muster_edge_upstream_sessions_closed_total{reason="idle"'))
            assert closed_idle == opened
            wait_until(lambda: set(up.counts()["tags"].values()) <= set(up.counts()["deleted"]),
                       "the upstream to see every session deleted")
            late = await clients[0].call("late")
            assert late.status_code == 404 and "Session not found" in late.text
            fresh = await Client(http, gw.url).open()
            assert ok(await fresh.call("fresh"))


async def test_the_upstream_session_cap_refuses_only_when_all_are_active(tmp_path: Path) -> None:
    with counted_upstream() as up, start_gateway(tmp_path / "gw", {"counted": up.url},
                                                 sessions={"maxUpstreamSessions": 2,
                                                           "activeWindowSeconds": 3600}) as gw:
        async with httpx2.AsyncClient(timeout=30) as http:
            a, b, c = [await Client(http, gw.url).open() for _ in range(3)]
            assert ok(await a.call("a")) and ok(await b.call("b"))
            refused = await c.call("c")
            assert refused.status_code == 200, refused.text
            error = json.loads(result_text(refused))["error"]
            assert "too many open sessions" in error["message"] and "'counted'" in error["message"]
            assert error["data"]["reason"] == "sessionLimit" and error["data"]["limit"] == 2
            assert ok(await a.call("a2")) and ok(await b.call("b2"))  # the active ones are untouched
            assert (await a.delete()).status_code == 200
            assert ok(await c.call("c2"))  # room again
            assert "c2" in up.counts()["tags"]


async def test_at_the_cap_the_least_recently_used_idle_session_is_closed_first(tmp_path: Path) -> None:
    with counted_upstream() as up, start_gateway(tmp_path / "gw", {"counted": up.url},
                                                 sessions={"maxUpstreamSessions": 2,
                                                           "activeWindowSeconds": 0}) as gw:
        async with httpx2.AsyncClient(timeout=30) as http:
            a, b, c = [await Client(http, gw.url).open() for _ in range(3)]
            assert ok(await a.call("a")) and ok(await b.call("b"))
            assert ok(await a.call("a-again"))  # now b is the least recently used
            assert ok(await c.call("c"))
            tags = up.counts()["tags"]
            wait_until(lambda: tags["b"] in up.counts()["deleted"], "b's upstream session to be closed")
            assert tags["a"] not in up.counts()["deleted"]
            assert metric(gw, 'muster_edge_upstream_sessions_closed_total{reason="evicted"') == [1]
            assert ok(await a.call("a3"))
            assert up.counts()["tags"]["a3"] == tags["a"]  # a kept its upstream session
            assert ok(await b.call("b2"))  # b gets a new one (evicting c, now least recently used)
            assert up.counts()["tags"]["b2"] != tags["b"]


async def test_an_upstream_at_its_own_limit_gets_room_from_the_least_recently_used_idle_session(
        tmp_path: Path) -> None:
    """The upstream allows 3 sessions (the gateway's own list session is one): the third client does not meet
    the upstream's "Too many open sessions"; the gateway closes its least recently used idle session instead."""
    with counted_upstream(max_sessions=3) as up, start_gateway(tmp_path / "gw", {"counted": up.url},
                                                               sessions={"activeWindowSeconds": 0}) as gw:
        async with httpx2.AsyncClient(timeout=30) as http:
            a, b, c = [await Client(http, gw.url).open() for _ in range(3)]
            assert ok(await a.call("a")) and ok(await b.call("b"))
            answer = await c.call("c")
            assert ok(answer), answer.text
            tags = up.counts()["tags"]
            assert tags["a"] in up.counts()["deleted"] and tags["b"] not in up.counts()["deleted"]
            assert metric(gw, 'muster_edge_upstream_sessions_closed_total{reason="evicted"') == [1]
