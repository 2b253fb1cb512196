"""Issue 11 item 4: sessions and state that survive workers and replicas, through real Envoy.

A handshake-era `mcp` SDK client keeps its session, resumes a broken stream with Last-Event-ID and completes an
elicitation relayed from an upstream, with 2 processor workers and no store (Envoy pins the session to one
worker) and with 2 replicas sharing Redis (the client alternates between their listeners, so the resumed
stream and the relayed answer reach the replica that did not open the upstream session). A requestState handed
to one caller and replayed by another is refused.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import secrets
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx2
import mcp_types as types
import orjson
import pytest
import redis
from mcp import Client
from mcp.client.streamable_http import streamable_http_client

from extproc.continuity import Continuity
from extproc.sessions import Sealer
from extproc.upstream import Handshake
from tests.e2e.test_faults_processes import pid_of
from tests.e2e.test_faults_sessions import Client as RawClient
from tests.e2e.test_faults_sessions import counted_upstream, metric, ok, wait_until
from tests.e2e.test_shared_state import start_redis
from tests.gateway_harness import Gateway, start_gateway
from tests.idp import start_idp
from tests.procs import DemoServer, free_port, start_demo_server

LEGACY = "legacy"
MODERN = "2026-07-28"


async def accept_contact(context: Any, params: Any) -> types.ElicitResult:
    return types.ElicitResult(action="accept", content={"username": "alice", "email": "alice@example.com"})


async def answer_sampling(context: Any, params: Any) -> types.CreateMessageResult:
    return types.CreateMessageResult(role="assistant", content=types.TextContent(type="text", text="Paris"),
                                     model="test-model")


def text(result: Any) -> str:
    return " ".join(getattr(block, "text", "") for block in result.content)


@dataclass
class Sent:
    listener: int
    method: str  # the JSON-RPC method, "response" for a client's answer, or the HTTP method
    last_event_id: str = ""


@dataclass
class Alternating(httpx2.AsyncBaseTransport):
    """Sends each request of one client to the next listener in turn (two replicas, or one), and records where."""

    ports: list[int]
    sent: list[Sent] = field(default_factory=list)
    inner: httpx2.AsyncHTTPTransport = field(default_factory=httpx2.AsyncHTTPTransport)

    async def handle_async_request(self, request: httpx2.Request) -> httpx2.Response:
        which = len(self.sent) % len(self.ports)
        request.url = request.url.copy_with(port=self.ports[which])
        method = request.method
        if method == "POST":
            body = orjson.loads(request.content) if request.content else {}
            method = body.get("method", "response") if isinstance(body, dict) else "?"
        self.sent.append(Sent(which, method, request.headers.get("last-event-id", "")))
        return await self.inner.handle_async_request(request)

    async def aclose(self) -> None:
        await self.inner.aclose()


def port_of(gw: Gateway) -> int:
    return int(gw.url.split(":")[2].split("/")[0])


async def session_flow(url: str, transport: Alternating) -> None:
    """Session kept, stream resumed, elicitation and sampling relayed: what the handshake-era client sees."""
    http = httpx2.AsyncClient(transport=transport, timeout=30)
    async with http, Client(streamable_http_client(url, http_client=http), mode=LEGACY,
                            elicitation_callback=accept_contact, sampling_callback=answer_sampling) as client:
        names = {t.name for t in (await client.list_tools()).tools}
        assert {"x_fixture_test_elicitation", "x_fixture_test_reconnection"} <= names
        for round_ in range(3):
            result = await client.call_tool("x_fixture_test_elicitation", {"message": f"Who are you? ({round_})"})
            assert "action=accept" in text(result) and "alice@example.com" in text(result), text(result)
            result = await client.call_tool("x_fixture_test_reconnection", {})
            assert "Reconnection test completed" in text(result), text(result)
            result = await client.call_tool("x_fixture_test_sampling", {"prompt": "Capital of France?"})
            assert "LLM response: Paris" in text(result), text(result)
        assert (await client.call_tool("x_fixture_test_simple_text", {})).is_error is False


def resumed(sent: list[Sent]) -> list[Sent]:
    return [s for s in sent if s.method == "GET" and s.last_event_id]


async def test_two_workers_without_a_store_pin_a_session_to_one_worker(tmp_path: Path) -> None:
    with start_demo_server("fixture", name="fixture") as up, \
            start_gateway(tmp_path / "gw", {"fixture": up.url}, processor={"workers": 2}) as gw:
        workers_seen: set[int] = set()
        sessions = 0
        while workers_seen != {0, 1} and sessions < 12:  # sessions land on both workers, each on one
            sessions += 1
            transport = Alternating([port_of(gw)])
            before = metric(gw, 'muster_edge_requests_total{method="tools/call"')
            await session_flow(gw.url, transport)
            after = metric(gw, 'muster_edge_requests_total{method="tools/call"')
            served = [b - a for a, b in zip(before, after, strict=True)]
            assert sorted(served)[0] == 0 and sum(served) >= 10, served  # all of this session's calls: one worker
            workers_seen.add(served.index(max(served)))
            assert resumed(transport.sent), transport.sent  # the SDK client did resume with Last-Event-ID
        assert workers_seen == {0, 1}, f"{sessions} sessions all pinned to worker {workers_seen}"


@contextlib.contextmanager
def two_replicas(tmp_path: Path, up: DemoServer, **extra: Any) -> Iterator[tuple[Gateway, Gateway]]:
    key_file = tmp_path / "session.key"
    key_file.write_text(base64.b64encode(secrets.token_bytes(32)).decode())
    with contextlib.ExitStack() as stack:
        url = stack.enter_context(start_redis(tmp_path))
        common: dict[str, Any] = {"processor": {"workers": 2}, "store": {"redis": url},
                                  "sessionKey": {"file": str(key_file)}, **extra}
        gw_a = stack.enter_context(start_gateway(tmp_path / "a", {"fixture": up.url}, **common))
        gw_b = stack.enter_context(start_gateway(tmp_path / "b", {"fixture": up.url}, **common))
        yield gw_a, gw_b


async def test_two_replicas_sharing_redis_keep_resume_and_relay_for_an_alternating_client(tmp_path: Path) -> None:
    with start_demo_server("fixture", name="fixture") as up, two_replicas(tmp_path, up) as (gw_a, gw_b):
        transport = Alternating([port_of(gw_a), port_of(gw_b)])
        await session_flow(gw_a.url, transport)
        sent = transport.sent
        calls = [i for i, s in enumerate(sent) if s.method == "tools/call"]
        # the answers to the elicitations went to a listener: each one after its call, some to the other replica
        answers = [i for i, s in enumerate(sent) if s.method == "response"]
        assert len(answers) == 6  # three elicitations, three samplings
        crossed = [i for i in answers if sent[i].listener != sent[max(c for c in calls if c < i)].listener]
        assert crossed, [(s.listener, s.method) for s in sent]
        # the broken streams were resumed (GET + Last-Event-ID) on the replica that did not serve their call
        resumes = [i for i, s in enumerate(sent) if s.method == "GET" and s.last_event_id]
        assert len(resumes) == 3
        crossed = [i for i in resumes if sent[i].listener != sent[max(c for c in calls if c < i)].listener]
        assert crossed, [(s.listener, s.method) for s in sent]
        # one upstream session for the client, whichever replica and worker served it
        opened = sum(metric(gw_a, "muster_edge_upstream_sessions_opened_total") +
                     metric(gw_b, "muster_edge_upstream_sessions_opened_total"))
        closed = sum(metric(gw_a, "muster_edge_upstream_sessions_closed_total") +
                     metric(gw_b, "muster_edge_upstream_sessions_closed_total"))
        assert opened - closed <= 1, (opened, closed)

        def all_closed() -> bool:  # the client's DELETE (at exit) closed what was opened, once
            return sum(metric(gw_a, "muster_edge_upstream_sessions_opened_total") +
                       metric(gw_b, "muster_edge_upstream_sessions_opened_total")) == \
                sum(metric(gw_a, "muster_edge_upstream_sessions_closed_total") +
                    metric(gw_b, "muster_edge_upstream_sessions_closed_total"))

        wait_until(all_closed, "the upstream session closed after the client's DELETE")


def modern_call(token: str, msg_id: int, name: str, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    meta = {"io.modelcontextprotocol/protocolVersion": MODERN,
            "io.modelcontextprotocol/clientCapabilities": {"elicitation": {}}}
    headers = {"accept": "application/json, text/event-stream", "content-type": "application/json",
               "authorization": f"Bearer {token}", "mcp-protocol-version": MODERN, "mcp-method": "tools/call",
               "mcp-name": name}
    params = {"name": name, "arguments": {}, "_meta": meta, **(extra or {})}
    return {"headers": headers, "json": {"jsonrpc": "2.0", "id": msg_id, "method": "tools/call", "params": params}}


def rpc(answer: httpx2.Response) -> dict[str, Any]:
    body = answer.text
    if body.startswith(("event:", "data:", "id:", ":")):
        body = [line[5:].strip() for line in body.splitlines() if line.startswith("data:") and line[5:].strip()][-1]
    out = orjson.loads(body)
    assert isinstance(out, dict)
    return out


@pytest.mark.parametrize("shared", [True, False])
async def test_a_request_state_replayed_by_another_caller_is_refused(tmp_path: Path, shared: bool) -> None:
    """With a store the binding is a store key; without one, every worker learns it from the worker that saw it
    first (2026-07-28 requests are not pinned), so the replay is refused whichever worker it reaches."""
    listen = f"127.0.0.1:{free_port()}"
    resource = f"http://{listen}/mcp"
    with contextlib.ExitStack() as stack:
        idp = stack.enter_context(start_idp(
            tmp_path / "idp", clients=[{"client_id": "zoe", "client_secret": "z"},
                                       {"client_id": "yan", "client_secret": "y"}],
            resources=[{"audience": resource, "scope": "mcp:tools"}]))
        up = stack.enter_context(start_demo_server("fixture", name="fixture"))
        store = {"store": {"redis": stack.enter_context(start_redis(tmp_path))}} if shared else {}
        gw = stack.enter_context(start_gateway(
            tmp_path / "gw", {"fixture": up.url}, listen=listen, processor={"workers": 2}, **store,
            auth={"issuer": idp.issuer, "jwksUri": idp.jwks_uri, "resource": resource}))
        zoe = idp.client_credentials("zoe", "z", resource=resource)
        yan = idp.client_credentials("yan", "y", resource=resource)
        tool = "x_fixture_test_input_required_result_request_state"
        async with httpx2.AsyncClient(timeout=30) as http:
            first = rpc(await http.post(gw.url, **modern_call(zoe, 1, tool)))
            result = first["result"]
            assert result["resultType"] == "input_required" and result.get("requestState"), first
            answer = {"confirm": {"action": "accept", "content": {"ok": True}}}
            retry = {"inputResponses": answer, "requestState": result["requestState"]}
            done = rpc(await http.post(gw.url, **modern_call(zoe, 2, tool, retry)))
            assert "state-ok: confirmed=True" in orjson.dumps(done).decode(), done
            for msg_id in range(3, 11):  # whichever worker the replay reaches
                replay = await http.post(gw.url, **modern_call(yan, msg_id, tool, retry))
                assert replay.status_code == 400, replay.text
                error = rpc(replay)["error"]
                assert error["code"] == -32602 and "issued to another caller" in error["message"], error
            # the caller it was issued to may still present it
            again = rpc(await http.post(gw.url, **modern_call(zoe, 11, tool, retry)))
            assert "result" in again, again


async def test_the_store_gives_every_process_one_upstream_session_and_one_closer(tmp_path: Path) -> None:
    """Two processes (two Continuity instances on one real Redis) opening a session for one owner at once agree
    on one; ending the gateway session hands the shared sessions to exactly one of them; nothing is in clear."""
    key = secrets.token_bytes(32)
    with start_redis(tmp_path) as url:
        one, two = Continuity(url, Sealer(key)), Continuity(url, Sealer(key))
        mine = Handshake("legacy", "2025-11-25", "sid-one", auth={"authorization": "Bearer t"})
        theirs = Handshake("legacy", "2025-11-25", "sid-two")
        won = await one.publish("owner", "fixture", mine)
        lost = await two.publish("owner", "fixture", theirs)
        assert won is mine and won.shared_owner == "owner"
        assert lost is not None and lost.session_id == "sid-one" and lost.auth == {}
        seen = await two.get("owner", "fixture")
        assert seen is not None and seen.session_id == "sid-one"
        raw = redis.Redis.from_url(url).hgetall("muster-edge:upstream:owner")
        assert raw and all(b"sid-one" not in v and b"Bearer" not in v for v in raw.values())
        assert not await two.drop("owner", "fixture", "sid-two")  # not the session in the store
        await one.set_level("owner", "debug")  # a process opening a session later declares the client's level
        assert (await two.lookup("owner", "other"))[1] == "debug"
        assert set(await two.all_of("owner")) == {"fixture"}
        taken = await asyncio.gather(one.take_owner("owner"), two.take_owner("owner"))
        assert sorted(len(t) for t in taken) == [0, 1]
        assert await one.get("owner", "fixture") is None
        assert await one.bind_state("state", "zoe") and not await two.bind_state("state", "yan")
        await one.aclose()
        await two.aclose()


@pytest.mark.parametrize("shared", [False, True])
async def test_an_upstream_session_lost_is_forgotten_everywhere(tmp_path: Path, shared: bool) -> None:
    """The upstream lost its sessions (it answers 404): the first call is told to retry, and the retry opens a new
    session whichever worker read the 404 answer (answer streams are not pinned) and whichever holds the session."""
    extra: dict[str, Any] = {"processor": {"workers": 2}}
    with contextlib.ExitStack() as stack:
        if shared:
            extra["store"] = {"redis": stack.enter_context(start_redis(tmp_path))}
        up = stack.enter_context(counted_upstream())
        gw = stack.enter_context(start_gateway(tmp_path / "gw", {"counted": up.url}, **extra))
        async with httpx2.AsyncClient(timeout=30) as http:
            clients = [await RawClient(http, gw.url).open() for _ in range(8)]
            for i, c in enumerate(clients):
                assert ok(await c.call(f"before-{i}"))
            await http.post(up.url.replace("/mcp", "/forget"))
            for i, c in enumerate(clients):
                answer = await c.call(f"after-{i}")
                assert "lost its session; retry" in answer.text, answer.text
                assert ok(await c.call(f"retry-{i}")), i  # a new upstream session, at once


async def test_a_pinned_session_moves_on_when_its_worker_freezes(tmp_path: Path) -> None:
    """Without a store a session's requests go to one worker; when it freezes (health checks fail), they go to
    the other one, which opens a new upstream session: the client keeps its session."""
    with counted_upstream() as up, start_gateway(tmp_path / "gw", {"counted": up.url},
                                                 processor={"workers": 2}) as gw:
        async with httpx2.AsyncClient(timeout=30) as http:
            client = await RawClient(http, gw.url).open()
            before = metric(gw, 'muster_edge_requests_total{method="tools/call"')
            for n in range(3):
                assert ok(await client.call(f"pinned-{n}"))
            served = [b - a for a, b in zip(before, metric(gw, 'muster_edge_requests_total{method="tools/call"'),
                                            strict=True)]
            worker = served.index(3)
            assert served[1 - worker] == 0, served
            frozen = pid_of(gw, f"processor {worker}")
            os.kill(frozen, signal.SIGSTOP)
            try:
                deadline = time.monotonic() + 20
                n = 0
                while True:  # calls that reach the frozen worker before its health checks fail time out
                    n += 1
                    answer = await client.call(f"moving-{n}")
                    if ok(answer) or time.monotonic() > deadline:
                        break
                    await asyncio.sleep(0.2)
                assert ok(answer), answer.text
                for n in range(3):
                    assert ok(await client.call(f"moved-{n}"))
                tags = up.counts()["tags"]
                assert tags["moved-0"] != tags["pinned-0"]  # a new upstream session, on the other worker
            finally:
                os.kill(frozen, signal.SIGCONT)
