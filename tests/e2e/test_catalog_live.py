"""The catalog is live: manifests come and go without a restart, bad ones are refused alone, prefix modes,
and upstreams that fail or hang do not take the endpoint down."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest
from mcp.shared.exceptions import MCPError

from tests.e2e.conftest import connect
from tests.gateway_harness import manifest, start_gateway
from tests.procs import free_port, start_demo_server

MODERN = "2026-07-28"


def mcp_error(exc: BaseException) -> MCPError | None:
    if isinstance(exc, MCPError):
        return exc
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            if (found := mcp_error(inner)) is not None:
                return found
    return None


async def tool_names(url: str, mode: str = MODERN) -> set[str]:
    async with connect(url, mode) as client:
        return {t.name for t in (await client.list_tools()).tools}


async def names_until(url: str, predicate: Callable[[set[str]], bool], mode: str = MODERN,
                      timeout: float = 15) -> set[str]:
    """The tool names once `predicate` holds for them (the catalog is polled, so changes land within ~1 s)."""
    deadline = time.monotonic() + timeout
    names = await tool_names(url, mode)
    while not predicate(names) and time.monotonic() < deadline:
        await asyncio.sleep(0.2)
        names = await tool_names(url, mode)
    return names


async def test_manifests_are_added_changed_and_removed_without_restart(tmp_path: Path) -> None:
    with contextlib.ExitStack() as stack:
        k8s = stack.enter_context(start_demo_server("kubernetes", name="kubernetes"))
        prom = stack.enter_context(start_demo_server("prometheus", name="prometheus"))
        gw = stack.enter_context(start_gateway(tmp_path, {"kubernetes": k8s.url}))
        pid = gw.process.pid
        assert "x_kubernetes_whoami" in await tool_names(gw.url)

        gw.add_server("prometheus", prom.url)
        assert "x_prometheus_query" in await names_until(gw.url, lambda n: "x_prometheus_query" in n)
        async with connect(gw.url, MODERN) as client:
            result = await client.call_tool("x_prometheus_whoami", {})
        assert json.loads(result.content[0].text) == {"server": "prometheus"}  # type: ignore[union-attr]

        gw.add_server("prometheus", prom.url, toolPrefix="metrics")
        names = await names_until(gw.url, lambda n: "x_metrics_query" in n, "legacy")
        assert "x_metrics_query" in names and "x_prometheus_query" not in names

        gw.remove_manifest("prometheus.yaml")
        names = await names_until(gw.url, lambda n: "x_metrics_query" not in n)
        assert gw.server_state("prometheus") is None
        assert not any(n.startswith("x_metrics_") for n in names)
        assert gw.process.pid == pid and gw.process.proc.poll() is None


async def test_a_bad_manifest_is_refused_alone_with_file_and_field(tmp_path: Path) -> None:
    with contextlib.ExitStack() as stack:
        k8s = stack.enter_context(start_demo_server("kubernetes", name="kubernetes"))
        gw = stack.enter_context(start_gateway(tmp_path, {"kubernetes": k8s.url}))
        bad = manifest("broken", "not-a-url")
        sse = manifest("legacy-sse", "http://127.0.0.1:1/sse")
        sse["spec"]["type"] = "sse"
        stdio = {"apiVersion": "muster.giantswarm.io/v1alpha1", "kind": "MCPServer", "metadata": {"name": "local"},
                 "spec": {"type": "stdio", "command": "mcp-server-time"}}
        no_url = manifest("no-url", "http://x")
        del no_url["spec"]["url"]
        gw.write_manifest("more.yaml", [bad, sse, stdio, no_url])
        gw.wait_for(lambda: len(gw.status()["refused"]) == 2, what="two refusals in the status")
        refused = gw.status()["refused"]
        assert any("more.yaml[0]" in r and "spec.url" in r and "broken" in r for r in refused)
        assert not any("legacy-sse" in r or "local" in r for r in refused)  # sse and stdio are admitted
        assert any("no-url" in r and "url is required when type is streamable-http or sse" in r for r in refused)
        assert "refused" in gw.log() and "more.yaml" in gw.log()
        assert "x_kubernetes_whoami" in await tool_names(gw.url)


@pytest.mark.parametrize("mode", ["conditional", "never"])
async def test_prefix_modes(tmp_path: Path, mode: str) -> None:
    with contextlib.ExitStack() as stack:
        k8s = stack.enter_context(start_demo_server("kubernetes", name="kubernetes"))
        vendor = stack.enter_context(start_demo_server("vendor", name="vendor"))
        gw = stack.enter_context(start_gateway(tmp_path, {"kubernetes": k8s.url, "vendor": vendor.url},
                                               prefixMode=mode))
        names = await tool_names(gw.url)
        async with connect(gw.url, MODERN) as client:
            resources = {r.uri for r in (await client.list_resources()).resources}
            echo = await client.call_tool("echo", {"text": "plain"})
            readme = await client.read_resource("vendor://docs/readme")
        problems = " ".join(gw.status()["viewProblems"])
    assert {"logs", "list", "echo", "slow_count"} <= names
    assert "plain" in echo.content[0].text  # type: ignore[union-attr]
    assert "vendor://docs/readme" in resources and "# vendor" in readme.contents[0].text  # type: ignore[union-attr]
    if mode == "conditional":
        assert {"x_kubernetes_get_pods", "x_vendor_get_pods", "x_kubernetes_whoami", "x_vendor_whoami"} <= names
    else:
        assert "get_pods" not in names and "whoami" not in names
        assert "'get_pods'" in problems and "kubernetes, vendor" in problems


async def test_an_upstream_that_goes_down_stays_listed_stale_and_named_in_errors(tmp_path: Path) -> None:
    port = free_port()
    with contextlib.ExitStack() as stack:
        k8s = stack.enter_context(start_demo_server("kubernetes", name="kubernetes"))
        prom_ctx = start_demo_server("prometheus", port=port, name="prometheus")
        prom = prom_ctx.__enter__()
        gw = stack.enter_context(start_gateway(tmp_path, {"kubernetes": k8s.url, "prometheus": prom.url}))
        assert "x_prometheus_query" in await tool_names(gw.url)
        prom_ctx.__exit__(None, None, None)
        for mode in ("legacy", MODERN):
            with pytest.raises(BaseException) as caught:
                async with connect(gw.url, mode) as client:
                    await client.call_tool("x_prometheus_query", {"promql": "up"})
            err = mcp_error(caught.value)
            assert err is not None and "prometheus" in str(err), caught.value
        gw.wait_for(lambda: gw.server_state("prometheus")["state"] == "Failed", what="prometheus Failed")
        assert gw.server_state("prometheus")["stale"] is True  # its last lists are still served (README)
        names = await tool_names(gw.url)
        assert "x_prometheus_query" in names and "x_kubernetes_whoami" in names
        async with connect(gw.url, MODERN) as client:
            assert "kubernetes" in (await client.call_tool("x_kubernetes_whoami", {})).content[0].text  # type: ignore[union-attr]
        with start_demo_server("prometheus", port=port, name="prometheus"):
            gw.wait_for(lambda: gw.server_state("prometheus")["state"] == "Connected", what="prometheus back")
            assert "x_prometheus_query" in await names_until(gw.url, lambda n: "x_prometheus_query" in n)


async def test_a_slow_upstream_is_bounded_by_its_timeout(tmp_path: Path) -> None:
    with contextlib.ExitStack() as stack:
        vendor = stack.enter_context(start_demo_server("vendor", name="vendor", json_response=True))
        k8s = stack.enter_context(start_demo_server("kubernetes", name="kubernetes"))
        gw = stack.enter_context(start_gateway(tmp_path, {"vendor": {"url": vendor.url, "timeout": 1},
                                                          "kubernetes": k8s.url}))
        with pytest.raises(BaseException) as caught:
            async with connect(gw.url, MODERN) as client:
                await client.call_tool("x_vendor_slow_count", {"n": 60})
        err = mcp_error(caught.value)
        assert err is not None and "vendor" in str(err) and "timed out" in str(err), caught.value
        async with connect(gw.url, MODERN) as client:
            assert "kubernetes" in (await client.call_tool("x_kubernetes_whoami", {})).content[0].text  # type: ignore[union-attr]


async def test_list_changed_from_an_upstream_refreshes_its_cached_list(tmp_path: Path) -> None:
    """The processor follows each upstream's subscriptions/listen stream; list TTLs are long here."""
    records = tmp_path / "vendor.jsonl"
    with contextlib.ExitStack() as stack:
        vendor = stack.enter_context(start_demo_server("vendor", name="vendor", record_headers=records))
        gw = stack.enter_context(start_gateway(tmp_path, {"vendor": vendor.url}, listTtlFloorMs=600_000))
        assert "x_vendor_beta_feature" not in await tool_names(gw.url)
        gw.wait_for(lambda: "subscriptions/listen" in records.read_text(), what="the processor to listen")
        async with connect(gw.url, MODERN) as client:
            assert "added" in (await client.call_tool("x_vendor_toggle_beta", {})).content[0].text  # type: ignore[union-attr]
        assert "x_vendor_beta_feature" in await names_until(gw.url, lambda n: "x_vendor_beta_feature" in n)
        async with connect(gw.url, "legacy") as client:
            assert "removed" in (await client.call_tool("x_vendor_toggle_beta", {})).content[0].text  # type: ignore[union-attr]
        assert "x_vendor_beta_feature" not in await names_until(gw.url, lambda n: "x_vendor_beta_feature" not in n)


async def test_a_call_whose_answer_needs_nothing_costs_two_ext_proc_messages_and_envoy_names_a_failed_upstream(
        tmp_path: Path) -> None:
    """The processor sees request headers and body; an answer only when Envoy's matcher finds it must change
    (a handshake-era client's SSE answer, whose event ids are namespaced), on a stream of its own. Envoy's own
    5xx reply for a call still becomes a JSON-RPC error naming the server."""
    with start_demo_server("vendor", name="vendor") as vendor, \
            start_demo_server("prometheus", name="prom", json_response=True) as prom, \
            start_gateway(tmp_path, {"vendor": {"url": vendor.url, "timeout": 1}, "prom": prom.url},
                          prefixMode="conditional") as gw:
        for mode in (MODERN, "legacy"):
            async with connect(gw.url, mode) as client:
                for tool, args in (("echo", {"text": "x"}), ("list_alerts", {})):  # SSE from vendor, JSON from prom
                    await client.call_tool(tool, args)
                    before = gw.processor_traffic()
                    for _ in range(5):
                        await client.call_tool(tool, args)
                    requests, streams, messages = (b - a for a, b in zip(before, gw.processor_traffic(), strict=True))
                    assert requests == 5
                    if mode == "legacy" and tool == "echo":
                        assert streams == 10 and messages >= 10, (streams, messages)  # + its body chunk(s)
                    else:
                        assert (streams, messages) == (5, 5), (mode, tool)
        with pytest.raises(BaseException) as caught:
            async with connect(gw.url, MODERN) as client:
                await client.call_tool("slow_count", {"n": 60})
        err = mcp_error(caught.value)
        assert err is not None and err.message == "Upstream server 'vendor' timed out", caught.value
        assert err.data["server"] == "vendor" and err.data["status"] == 504
        with urllib.request.urlopen(gw.status_url.replace("/status", "/metrics"), timeout=5) as resp:
            metrics = resp.read().decode()
        assert 'muster_edge_upstream_errors_total{server="vendor",status="504"} 1' in metrics, metrics
