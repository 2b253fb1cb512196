"""Fleet routing: MCPServer families collapse into one tool set with an injected instance argument.

Three management clusters (a, b, c), each with a kubernetes-like and a prometheus-like server, in the families
`kubernetes` and `prometheus`. Cluster c's kubernetes server is "skewed": its `logs` description differs and it
has a tool with an argument named `management_cluster`, so those two tools fall back to per-server names
(Muster's rules). Two more servers form a family whose members disagree on instanceArg.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx2
import pytest

from tests.e2e.conftest import MODES, connect
from tests.e2e.test_catalog_live import mcp_error
from tests.gateway_harness import Gateway, start_gateway
from tests.procs import free_port, start_demo_server

MODERN = "2026-07-28"
CLUSTERS = ("a", "b", "c")
K8S = [f"cluster-{c}-mcp-kubernetes" for c in CLUSTERS]
PROM = [f"cluster-{c}-mcp-prometheus" for c in CLUSTERS]
ARG = "management_cluster"


@dataclass
class Families:
    gateway: Gateway
    records: Path


@pytest.fixture(scope="module")
def families(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Families]:
    work = tmp_path_factory.mktemp("families")
    records = work / "cluster-b-k8s.jsonl"
    with contextlib.ExitStack() as stack:
        servers: dict[str, dict[str, Any]] = {}
        for cluster in CLUSTERS:
            k8s = stack.enter_context(start_demo_server(
                "kubernetes", name=f"cluster-{cluster}-mcp-kubernetes", variant="skewed" if cluster == "c" else "",
                record_headers=records if cluster == "b" else None))
            prom = stack.enter_context(start_demo_server("prometheus", name=f"cluster-{cluster}-mcp-prometheus"))
            servers[f"cluster-{cluster}-mcp-kubernetes"] = {"url": k8s.url,
                                                           "family": {"name": "kubernetes", "instanceArg": ARG}}
            servers[f"cluster-{cluster}-mcp-prometheus"] = {"url": prom.url,
                                                           "family": {"name": "prometheus", "instanceArg": ARG}}
        for member, arg in (("metrics-east", "region"), ("metrics-west", "zone")):
            prom = stack.enter_context(start_demo_server("prometheus", name=member))
            servers[member] = {"url": prom.url, "family": {"name": "metrics", "instanceArg": arg}}
        gateway = stack.enter_context(start_gateway(work / "gw", servers, listTtlFloorMs=600_000))
        yield Families(gateway, records)


def by_name(tools: list[Any]) -> dict[str, Any]:
    return {t.name: t for t in tools}


def text(result: Any) -> str:
    return str(result.content[0].text)


@pytest.mark.parametrize("mode", MODES)
async def test_family_members_collapse_into_one_tool_set(families: Families, mode: str) -> None:
    async with connect(families.gateway.url, mode) as client:
        tools = by_name((await client.list_tools()).tools)
        prompts = {p.name: p for p in (await client.list_prompts()).prompts}
    for name in ("x_kubernetes_get_pods", "x_kubernetes_list", "x_kubernetes_whoami", "x_prometheus_query",
                 "x_prometheus_whoami"):
        assert name in tools, sorted(tools)
    assert not any(n.startswith(("x_cluster-a-mcp-kubernetes_get", "x_cluster-b-mcp-prometheus_query"))
                   for n in tools)
    schema = tools["x_kubernetes_get_pods"].input_schema
    injected = schema["properties"][ARG]
    assert injected["type"] == "string"
    assert injected["enum"] == K8S
    assert injected["description"].startswith("Target instance to execute this tool on. Available: "
                                              + ", ".join(K8S))
    assert "cluster-a for cluster-a-mcp-kubernetes" in injected["description"]
    assert schema["required"][-1] == ARG
    assert tools["x_kubernetes_get_pods"].description.endswith(f"(available on servers: {', '.join(K8S)})")
    assert ("x-mcp-header" in injected) == (mode == MODERN)
    assert tools["x_prometheus_query"].input_schema["properties"][ARG]["enum"] == PROM
    debug = prompts["x_kubernetes_debug_pod"]
    assert any(a.name == ARG and a.required for a in debug.arguments or [])


@pytest.mark.parametrize("mode", MODES)
async def test_muster_fallbacks_to_per_server_names(families: Families, mode: str) -> None:
    async with connect(families.gateway.url, mode) as client:
        names = set(by_name((await client.list_tools()).tools))
        east = await client.call_tool("x_metrics-east_whoami", {})
    # a description that differs between members: that tool alone falls back, for every member
    assert {f"x_{m}_logs" for m in K8S} <= names and "x_kubernetes_logs" not in names
    # a tool that already has a property named like the instance argument falls back alone
    assert "x_cluster-c-mcp-kubernetes_switch_context" in names and "x_kubernetes_switch_context" not in names
    # members that disagree on instanceArg: the whole family falls back to per-server names
    assert {"x_metrics-east_query", "x_metrics-west_query"} <= names and "x_metrics_query" not in names
    assert json.loads(text(east)) == {"server": "metrics-east"}
    problems = " ".join(families.gateway.status()["viewProblems"])
    assert "'metrics'" in problems and "disagree on instanceArg" in problems


@pytest.mark.parametrize("mode", MODES)
async def test_calls_route_to_the_selected_member(families: Families, mode: str) -> None:
    async with connect(families.gateway.url, mode) as client:
        for member in K8S:
            result = await client.call_tool("x_kubernetes_whoami", {ARG: member})
            assert json.loads(text(result)) == {"server": member}
        for member in PROM:
            result = await client.call_tool("x_prometheus_whoami", {ARG: member})
            assert json.loads(text(result)) == {"server": member}
        pods = await client.call_tool("x_kubernetes_get_pods", {ARG: "cluster-b-mcp-kubernetes", "namespace": "ns1"})
    assert pods.structured_content == {"cluster": "cluster-b-mcp-kubernetes", "namespace": "ns1",
                                       "pods": pods.structured_content["pods"]}  # type: ignore[index]
    sent = [json.loads(line) for line in families.records.read_text().splitlines()]
    calls = [r for r in sent if (r.get("body") or {}).get("method") == "tools/call"
             and r["body"]["params"]["name"] == "get_pods"]
    assert calls, "cluster b never saw the call"
    for record in calls:
        assert ARG not in record["body"]["params"]["arguments"]
        assert "mcp-param-management-cluster" not in record["headers"]


@pytest.mark.parametrize("mode", MODES)
async def test_a_bare_cluster_name_is_accepted_and_ambiguity_refused(families: Families, mode: str) -> None:
    async with connect(families.gateway.url, mode) as client:
        result = await client.call_tool("x_prometheus_whoami", {ARG: "cluster-c"})
        assert json.loads(text(result)) == {"server": "cluster-c-mcp-prometheus"}
        ambiguous = await client.call_tool("x_kubernetes_whoami", {ARG: "cluster"})
    # a tool result the model reads (SEP-1303), not a protocol error: it names the candidates and the valid values
    assert ambiguous.is_error is True
    assert "matches more than one server" in text(ambiguous) and all(m in text(ambiguous) for m in K8S)
    assert ambiguous.structured_content == {"available": K8S}


ERRORS = [
    ({}, 'the "management_cluster" parameter is required'),
    ({ARG: ""}, 'the "management_cluster" parameter is required'),
    ({ARG: 7}, 'the "management_cluster" parameter is required'),
    ({ARG: "typo"}, 'is not available on server "typo"'),
]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(("arguments", "expected"), ERRORS, ids=["missing", "empty", "not-a-string", "unknown"])
async def test_instance_errors_are_tool_results_with_musters_texts_and_the_valid_values(
        families: Families, mode: str, arguments: dict[str, Any], expected: str) -> None:
    async with connect(families.gateway.url, mode) as client:
        result = await client.call_tool("x_kubernetes_get_pods", arguments)  # a result: no exception raised
        # the model corrects its call from what it read, and the next call goes through
        fixed = await client.call_tool("x_kubernetes_get_pods", {**arguments, ARG: result.structured_content[
            "available"][1], "namespace": "ns1"})  # type: ignore[index]
    assert result.is_error is True
    assert expected in text(result)
    assert ", ".join(K8S) in text(result)
    assert result.structured_content == {"available": K8S}
    assert not fixed.is_error and fixed.structured_content["cluster"] == K8S[1]  # type: ignore[index]


@pytest.mark.parametrize("mode", MODES)
async def test_an_unknown_tool_stays_a_protocol_error_and_a_prompt_argument_error_too(
        families: Families, mode: str) -> None:
    async with connect(families.gateway.url, mode) as client:
        with pytest.raises(BaseException) as unknown:
            await client.call_tool("x_kubernetes_no_such_tool", {ARG: K8S[0]})
        with pytest.raises(BaseException) as prompt:
            await client.get_prompt("x_kubernetes_debug_pod", {"pod": "p"})
    err = mcp_error(unknown.value)
    assert err is not None and err.code == -32602 and err.message == "Unknown tool: x_kubernetes_no_such_tool"
    # prompts/get has no isError result: an argument problem there is -32602 (the spec's "missing required
    # arguments"), with the same text and the valid values in error.data
    err = mcp_error(prompt.value)
    assert err is not None and err.code == -32602, prompt.value
    assert 'the "management_cluster" parameter is required' in err.message and ", ".join(K8S) in err.message
    assert err.data == {"available": K8S}


async def test_mcp_param_header_must_match_the_instance_argument(families: Families) -> None:
    meta = {"io.modelcontextprotocol/protocolVersion": MODERN, "io.modelcontextprotocol/clientCapabilities": {}}
    body = {"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {
        "name": "x_kubernetes_whoami", "arguments": {ARG: "cluster-a-mcp-kubernetes"}, "_meta": meta}}
    base = {"accept": "application/json, text/event-stream", "content-type": "application/json",
            "mcp-protocol-version": MODERN, "mcp-method": "tools/call", "mcp-name": "x_kubernetes_whoami"}
    async with httpx2.AsyncClient(timeout=10) as http:
        wrong = await http.post(families.gateway.url, json=body,
                                headers={**base, "mcp-param-management-cluster": "cluster-b-mcp-kubernetes"})
        missing = await http.post(families.gateway.url, json=body, headers=base)
        right = await http.post(families.gateway.url, json=body,
                                headers={**base, "mcp-param-management-cluster": "cluster-a-mcp-kubernetes"})
    assert wrong.status_code == 400 and wrong.json()["error"]["code"] == -32020
    assert missing.status_code == 400 and missing.json()["error"]["code"] == -32020
    assert right.status_code == 200 and "cluster-a-mcp-kubernetes" in right.text


async def test_a_member_that_goes_down_is_unavailable_and_comes_back(tmp_path: Path) -> None:
    port = free_port()
    with contextlib.ExitStack() as stack:
        a = stack.enter_context(start_demo_server("kubernetes", name="cluster-a-mcp-kubernetes"))
        b_ctx = start_demo_server("kubernetes", port=port, name="cluster-b-mcp-kubernetes")
        b = b_ctx.__enter__()
        family = {"name": "kubernetes", "instanceArg": ARG}
        gw = stack.enter_context(start_gateway(tmp_path, {
            "cluster-a-mcp-kubernetes": {"url": a.url, "family": family},
            "cluster-b-mcp-kubernetes": {"url": b.url, "family": family}}))

        async def enum() -> list[str]:
            async with connect(gw.url, MODERN) as client:
                tools = by_name((await client.list_tools()).tools)
            return list(tools["x_kubernetes_whoami"].input_schema["properties"][ARG]["enum"])

        assert await enum() == ["cluster-a-mcp-kubernetes", "cluster-b-mcp-kubernetes"]
        b_ctx.__exit__(None, None, None)
        gw.wait_for(lambda: gw.server_state("cluster-b-mcp-kubernetes")["state"] == "Failed", what="b Failed")
        # a member that is down keeps its place in the enum (stale, README "Resilience") and says so when called
        assert await enum() == ["cluster-a-mcp-kubernetes", "cluster-b-mcp-kubernetes"]
        with pytest.raises(BaseException) as caught:
            async with connect(gw.url, MODERN) as client:
                await client.call_tool("x_kubernetes_whoami", {ARG: "cluster-b-mcp-kubernetes"})
        err = mcp_error(caught.value)
        assert err is not None and err.message == "Upstream server 'cluster-b-mcp-kubernetes' is unavailable"
        with start_demo_server("kubernetes", port=port, name="cluster-b-mcp-kubernetes"):
            gw.wait_for(lambda: gw.server_state("cluster-b-mcp-kubernetes")["state"] == "Connected", what="b back")
            assert await enum() == ["cluster-a-mcp-kubernetes", "cluster-b-mcp-kubernetes"]
