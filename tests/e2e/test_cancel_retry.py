"""Retries and cancellation on the routed path, with an upstream the test runs itself (tests/live_upstream.py).

- An upstream that answers -32020 (its tool schema changed under the gateway) gets its tools/list fetched
  again, the Mcp-Param-* headers rebuilt from the new schema, and exactly one resend.
- A client's cancellation reaches the upstream that owns the request.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.conftest import MODES, connect
from tests.e2e.test_catalog_live import mcp_error
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
