"""The official MCP conformance suite through the gateway (prefixMode: never, one upstream), both spec versions.

The suite is run twice in the same test: straight at the upstream, and through Envoy + the processor. Every
scenario that passes against the upstream must pass through the gateway too.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import pytest

from tests.conformance import run_conformance_detailed
from tests.gateway_harness import start_gateway
from tests.procs import start_demo_server


@pytest.mark.parametrize("spec_version", ["2025-11-25", "2026-07-28"])
def test_gateway_passes_what_the_upstream_passes(tmp_path: Path, spec_version: str) -> None:
    with contextlib.ExitStack() as stack:
        fixture = stack.enter_context(start_demo_server("fixture", name="fixture"))
        gw = stack.enter_context(start_gateway(tmp_path / "gw", {"fixture": fixture.url}, prefixMode="never"))
        direct = run_conformance_detailed(fixture.url, spec_version, tmp_path / "direct")
        through = run_conformance_detailed(gw.url, spec_version, tmp_path / "gateway")
    baseline = {name for name, result in direct.items() if result.passed}
    assert len(baseline) >= 30, f"the fixture itself passes too little: {sorted(baseline)}"
    lost = {name: through[name].failures or through[name].warnings
            for name in sorted(baseline) if name not in through or not through[name].passed}
    assert not lost, f"scenarios that pass against the upstream but not through the gateway: {lost}"
