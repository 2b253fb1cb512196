"""Retries and cancellation on the routed path, with an upstream the test runs itself (tests/live_upstream.py).

- An upstream that answers -32020 (its tool schema changed under the gateway) gets its tools/list fetched
  again, the Mcp-Param-* headers rebuilt from the new schema, and exactly one resend.
- A client's cancellation reaches the upstream that owns the request.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import secrets
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx2
import pytest

from tests.e2e.conftest import MODES, connect
from tests.e2e.test_catalog_live import mcp_error
from tests.e2e.test_shared_state import start_redis
from tests.gateway_harness import Gateway, start_gateway
from tests.live_upstream import LiveUpstream, build, mirror_region, serve

LOOKUP = "x_shifty_lookup"


@dataclass
class Setup:
    gateway: Gateway
    live: LiveUpstream


@pytest.fixture
def shifty(tmp_path: Path) -> Iterator[Setup]:
    """A fresh 2026-07-28-only upstream per test (its schema changes; handshake-era clients reach it on the
    2026-07-28 wire too), behind a gateway whose list cache never expires by itself."""
    with contextlib.ExitStack() as stack:
        live = stack.enter_context(serve(build("shifty", modern_only=True)))
        gateway = stack.enter_context(start_gateway(tmp_path / "gw", {"shifty": live.url},
                                                    listTtlFloorMs=600_000, listTtlMs=600_000))
        yield Setup(gateway, live)


def wait_until(predicate: Any, what: str, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


@pytest.mark.parametrize("mode", MODES)
async def test_an_upstream_header_mismatch_refetches_its_tools_and_resends_once(shifty: Setup, mode: str) -> None:
    live = shifty.live
    async with connect(shifty.gateway.url, mode) as client:
        assert LOOKUP in {t.name for t in (await client.list_tools()).tools}
        first = await client.call_tool(LOOKUP, {"region": "eu"})
        assert first.structured_content == {"region": "eu"} and not first.is_error
        before = len(live.seen)
        mirror_region(live)  # the upstream now wants Mcp-Param-Region; the gateway's cached schema does not know
        second = await client.call_tool(LOOKUP, {"region": "eu"})
    assert second.structured_content == {"region": "eu"} and not second.is_error
    after = live.seen[before:]
    calls = [s for s in after if s.body and s.body.get("method") == "tools/call"]
    # the first try without the header (-32020), a fresh tools/list, then one resend with the rebuilt header
    assert [c.status for c in calls] == [400, 200], [(c.status, c.headers) for c in calls]
    assert "mcp-param-region" not in calls[0].headers
    assert calls[1].headers["mcp-param-region"] == "eu"
    assert calls[1].body == calls[0].body  # the same call, the same id
    methods = [s.body.get("method") for s in after if s.body]
    assert methods.index("tools/list") < methods.index("tools/call", methods.index("tools/call") + 1)
    assert "-32020" in shifty.gateway.log() and "call resent" in shifty.gateway.log()


@pytest.mark.parametrize("mode", MODES)
async def test_an_upstream_that_keeps_answering_32020_gets_one_retry_only(shifty: Setup, mode: str) -> None:
    live = shifty.live
    async with connect(shifty.gateway.url, mode) as client:
        await client.list_tools()
        live.always_mismatch = True
        before = len(live.calls("lookup"))
        with pytest.raises(BaseException) as caught:
            await client.call_tool(LOOKUP, {"region": "eu"})
    err = mcp_error(caught.value)
    assert err is not None and err.code == -32020 and "Upstream server 'shifty'" in err.message, caught.value
    # one try and one resend per client attempt (a 2026-07-28 SDK client itself retries a -32020 once: two attempts)
    attempts = 2 if mode == "2026-07-28" else 1
    assert len(live.calls("lookup")) - before == 2 * attempts


async def test_the_processors_own_calls_send_mcp_param_headers_and_resend_once_after_32020(tmp_path: Path) -> None:
    """call_tool (meta mode) and workflow steps reach the upstream from the processor: the same headers from the
    upstream's schema, and the same single refetch-and-resend when that schema changed."""
    with serve(build("shifty", modern_only=True)) as live, \
            start_gateway(tmp_path / "gw", {"shifty": live.url}, listTtlFloorMs=600_000, toolMode="both") as gw:
        async with connect(gw.url, "2026-07-28") as client:
            await client.list_tools()
            mirror_region(live)
            before = len(live.seen)
            wrapped = await client.call_tool("call_tool", {"name": LOOKUP, "arguments": {"region": "us"}})
            again = await client.call_tool("call_tool", {"name": LOOKUP, "arguments": {"region": "ap"}})
    assert not wrapped.is_error and wrapped.structured_content == {"region": "us"}, wrapped
    assert not again.is_error and again.structured_content == {"region": "ap"}
    calls = [s for s in live.seen[before:] if s.body and s.body.get("method") == "tools/call"]
    assert [(c.status, c.headers.get("mcp-param-region")) for c in calls] == [(400, None), (200, "us"), (200, "ap")]


# ---- cancellation ---------------------------------------------------------------------------------------------
HANDSHAKE = "2025-11-25"
BASE = {"accept": "application/json, text/event-stream", "content-type": "application/json"}


@pytest.fixture
def waiting(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Setup]:
    """An upstream with the long-running tool `wait`: dual era, 2026-07-28 only (param "modern-only") or
    handshake era only ("legacy-only")."""
    era = getattr(request, "param", "")
    with contextlib.ExitStack() as stack:
        live = stack.enter_context(serve(build("waiter", modern_only=era == "modern-only",
                                               legacy_only=era == "legacy-only")))
        gateway = stack.enter_context(start_gateway(tmp_path / "gw", {"waiter": live.url}))
        yield Setup(gateway, live)


async def legacy_session(http: httpx2.AsyncClient, url: str) -> dict[str, str]:
    """A handshake-era session opened by hand (initialize, initialized): the headers its requests carry."""
    init = await http.post(url, headers=BASE, json={"jsonrpc": "2.0", "id": 0, "method": "initialize", "params": {
        "protocolVersion": HANDSHAKE, "capabilities": {}, "clientInfo": {"name": "t", "version": "1"}}})
    assert init.status_code == 200, init.text
    headers = {**BASE, "mcp-protocol-version": HANDSHAKE, "mcp-session-id": init.headers["mcp-session-id"]}
    sent = await http.post(url, headers=headers, json={"jsonrpc": "2.0", "method": "notifications/initialized"})
    assert sent.status_code == 202
    return headers


def call(request_id: int, label: str, seconds: float = 30) -> dict[str, Any]:
    return {"jsonrpc": "2.0", "id": request_id, "method": "tools/call",
            "params": {"name": "x_waiter_wait", "arguments": {"label": label, "seconds": seconds}}}


async def event_set(event: threading.Event, timeout: float = 10) -> bool:
    deadline = time.monotonic() + timeout
    while not event.is_set() and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    return event.is_set()


@pytest.mark.parametrize("waiting", ["dual", "modern-only"], indirect=True)
async def test_a_handshake_era_cancel_reaches_the_upstream(waiting: Setup) -> None:
    """The client keeps its POST open and sends notifications/cancelled: a handshake-era upstream session gets
    the cancel (with the id it saw); a 2026-07-28 upstream gets its stream closed. Either way the upstream's
    handler is cancelled, and the original POST is answered at once (-32800)."""
    live, url = waiting.live, waiting.gateway.url
    async with httpx2.AsyncClient(timeout=20) as http:
        headers = await legacy_session(http, url)
        pending = asyncio.create_task(http.post(url, headers=headers, json=call(7, "cancel-me")))
        assert await event_set(live.event("started", "cancel-me")), "the call never reached the upstream"
        sent = await http.post(url, headers=headers, json={"jsonrpc": "2.0", "method": "notifications/cancelled",
                                                           "params": {"requestId": 7, "reason": "user stop"}})
        assert sent.status_code == 202
        assert await event_set(live.event("cancelled", "cancel-me")), "the upstream never saw the cancel"
        answer = await asyncio.wait_for(pending, 10)
    cancels = [n for n in live.notifications if n["method"] == "notifications/cancelled"]
    if waiting.live.modern_only:
        assert cancels == []  # nothing to notify on the 2026-07-28 wire: its stream was closed
        assert answer.json()["error"]["code"] == -32800 and answer.json()["id"] == 7
    else:
        assert cancels == [{"jsonrpc": "2.0", "method": "notifications/cancelled",
                            "params": {"requestId": 7, "reason": "user stop"}}]
    assert not live.event("finished", "cancel-me").is_set()


async def test_a_cancel_for_an_unknown_or_finished_request_is_accepted_and_goes_nowhere(waiting: Setup) -> None:
    live, url = waiting.live, waiting.gateway.url
    async with httpx2.AsyncClient(timeout=20) as http:
        headers = await legacy_session(http, url)
        done = await http.post(url, headers=headers, json=call(3, "quick", 0))
        assert "finished" in done.text
        for rid in (3, 99):
            sent = await http.post(url, headers=headers, json={"jsonrpc": "2.0", "method": "notifications/cancelled",
                                                               "params": {"requestId": rid}})
            assert sent.status_code == 202
    assert [n for n in live.notifications if n["method"] == "notifications/cancelled"] == []


async def test_a_2026_client_disconnect_cancels_the_upstream_request(waiting: Setup) -> None:
    """Closing the stream is a 2026-07-28 client's cancel: the SDK client aborts its POST when its call is
    cancelled, Envoy resets the upstream request, and the upstream's handler is cancelled."""
    live = waiting.live
    async with connect(waiting.gateway.url, "2026-07-28") as client:
        task = asyncio.create_task(client.call_tool("x_waiter_wait", {"label": "modern"}))
        assert await event_set(live.event("started", "modern"))
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        assert await event_set(live.event("cancelled", "modern")), "the upstream never saw the disconnect"


async def test_a_handshake_era_client_disconnect_does_not_cancel(waiting: Setup) -> None:
    """In the handshake era a dropped connection is not a cancel (the spec keeps the request alive): the
    upstream's handler runs to its end."""
    live, url = waiting.live, waiting.gateway.url
    async with httpx2.AsyncClient(timeout=20) as http:
        headers = await legacy_session(http, url)
        pending = asyncio.create_task(http.post(url, headers=headers, json=call(5, "dropped", 1.5)))
        assert await event_set(live.event("started", "dropped"))
        pending.cancel()  # the client goes away mid-call
        with contextlib.suppress(asyncio.CancelledError):
            await pending
    assert await event_set(live.event("finished", "dropped"), 10), "the upstream request did not stay alive"
    assert not live.event("cancelled", "dropped").is_set()


@pytest.mark.parametrize("waiting", ["legacy-only"], indirect=True)
async def test_a_2026_client_disconnect_reaches_a_handshake_era_upstream_as_a_cancel(waiting: Setup) -> None:
    """A handshake-era upstream does not read a closed connection as a cancel: when the 2026-07-28 client's
    request ends without its answer, the gateway sends notifications/cancelled on the shared upstream session,
    with the id the gateway gave the request there. A call that was answered gets no cancel."""
    live = waiting.live
    async with connect(waiting.gateway.url, "2026-07-28") as client:
        done = await client.call_tool("x_waiter_wait", {"label": "quick", "seconds": 0})
        assert done.content[0].text == "finished"  # type: ignore[union-attr]
        task = asyncio.create_task(client.call_tool("x_waiter_wait", {"label": "legacy-upstream"}))
        assert await event_set(live.event("started", "legacy-upstream"))
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        assert await event_set(live.event("cancelled", "legacy-upstream")), "the upstream never saw the cancel"
    sent_id = live.calls("wait")[-1].body["id"]
    cancels = [n["params"] for n in live.notifications if n["method"] == "notifications/cancelled"]
    assert cancels == [{"requestId": sent_id, "reason": "the client closed its stream"}]


@pytest.mark.parametrize(("spread", "era"), [("workers", "modern-only"), ("replicas", "dual")])
async def test_a_cancel_reaches_its_request_on_another_worker_or_replica(tmp_path: Path, spread: str,
                                                                         era: str) -> None:
    """With a store, a handshake-era session's requests go to any worker of any replica: the cancel lands where
    the request is not held and is passed on (sibling workers: their peer listener; replicas: the store's channel).
    `workers`: 2 workers, 2026-07-28 upstream (its stream is closed); Envoy balances by least requests, so the
    cancel goes to the worker not holding the call. `replicas`: the call through one replica, the cancel through
    the other, handshake-era upstream session (it gets notifications/cancelled with the id it saw)."""
    key_file = tmp_path / "session.key"
    key_file.write_text(base64.b64encode(secrets.token_bytes(32)).decode())
    with contextlib.ExitStack() as stack:
        live = stack.enter_context(serve(build("waiter", modern_only=era == "modern-only")))
        common: dict[str, Any] = {"store": {"redis": stack.enter_context(start_redis(tmp_path))},
                                  "sessionKey": {"file": str(key_file)}}
        if spread == "workers":
            gw = stack.enter_context(start_gateway(tmp_path / "a", {"waiter": live.url}, processor={"workers": 2},
                                                   **common))
            urls = (gw.url, gw.url)
        else:
            urls = tuple(stack.enter_context(start_gateway(tmp_path / name, {"waiter": live.url}, **common)).url
                         for name in ("a", "b"))
        async with httpx2.AsyncClient(timeout=20) as http:
            headers = await legacy_session(http, urls[0])
            for n in range(3):
                label = f"elsewhere-{n}"
                pending = asyncio.create_task(http.post(urls[0], headers=headers, json=call(20 + n, label)))
                assert await event_set(live.event("started", label)), "the call never reached the upstream"
                sent = await http.post(urls[1], headers=headers, json={
                    "jsonrpc": "2.0", "method": "notifications/cancelled", "params": {"requestId": 20 + n}})
                assert sent.status_code == 202
                assert await event_set(live.event("cancelled", label)), f"call {n}: the upstream never saw the cancel"
                answer = await asyncio.wait_for(pending, 10)
                if era == "modern-only":
                    assert answer.json()["error"]["code"] == -32800 and answer.json()["id"] == 20 + n, answer.text
    cancels = [n for n in live.notifications if n["method"] == "notifications/cancelled"]
    assert len(cancels) == (0 if era == "modern-only" else 3), cancels
