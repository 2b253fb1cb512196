"""Meta mode through real Envoy, real SDK upstreams and the test IdP, both eras: Muster's 11 meta-tools, their
output shapes and error texts, BM25F ranking, call_tool to every kind of tool, the policy on every meta path,
and the per-caller core tools."""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import re
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx2
import pytest
from mcp.client.client import Client
from mcp.client.streamable_http import streamable_http_client

from tests.e2e.conftest import MODES
from tests.e2e.test_catalog_live import mcp_error
from tests.gateway_harness import Gateway, start_gateway
from tests.idp import Idp, start_idp
from tests.procs import free_port, start_demo_server

MODERN = "2026-07-28"
ARG = "management_cluster"
FAMILY = {"name": "kubernetes", "instanceArg": ARG}
K8S = ["cluster-a-mcp-kubernetes", "cluster-b-mcp-kubernetes"]
META = ["list_tools", "describe_tool", "list_core_tools", "filter_tools", "call_tool", "list_resources",
        "describe_resource", "get_resource", "list_prompts", "describe_prompt", "get_prompt"]
POLICY: dict[str, Any] = {"rules": [
    {"name": "no-prometheus-for-interns", "effect": "deny", "match": {"server": "prometheus", "groups": ["interns"]}},
    {"name": "no-events-for-interns", "effect": "deny", "match": {"tool": "core_events", "groups": ["interns"]}},
]}


@dataclass
class Setup:
    gateway: Gateway
    idp: Idp
    tokens: dict[str, str]
    audit: Path


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    work = tmp_path_factory.mktemp("meta")
    listen = f"127.0.0.1:{free_port()}"
    resource = f"http://{listen}/mcp"
    clients = [{"client_id": "dev", "client_secret": "dev-secret", "claims": {"groups": ["dev"]}},
               {"client_id": "intern", "client_secret": "i-secret", "claims": {"groups": ["interns"]}}]
    with contextlib.ExitStack() as stack:
        idp = stack.enter_context(start_idp(work / "idp", clients=clients,
                                            resources=[{"audience": resource, "scope": "mcp:tools"}]))
        k8s_a = stack.enter_context(start_demo_server("kubernetes", name=K8S[0]))
        k8s_b = stack.enter_context(start_demo_server("kubernetes", name=K8S[1]))
        prom = stack.enter_context(start_demo_server("prometheus", name="prometheus"))
        vendor = stack.enter_context(start_demo_server("vendor", name="vendor", era="legacy"))
        fixture = stack.enter_context(start_demo_server("fixture", name="fixture"))
        servers = {K8S[0]: {"url": k8s_a.url, "family": FAMILY}, K8S[1]: {"url": k8s_b.url, "family": FAMILY},
                   "prometheus": prom.url, "vendor": vendor.url, "fixture": fixture.url,
                   # per-user OAuth with no login yet: listed under servers_requiring_auth
                   "oauth-srv": {"url": prom.url, "auth": {"type": "oauth"}}}
        auth = {"issuer": idp.issuer, "jwksUri": idp.jwks_uri, "audiences": [resource], "resource": resource}
        audit = work / "audit.jsonl"
        (work / "oauth-client-secret").write_text("unused-here")
        (work / "edge-login-secret").write_text("unused-here")
        gateway = stack.enter_context(start_gateway(
            work / "gw", servers, listen=listen, auth=auth, policy=POLICY, toolMode="both", listTtlFloorMs=600_000,
            audit=str(audit), upstreamOAuth={"clientId": "muster-edge",
                                             "clientSecretFile": str(work / "oauth-client-secret")},
            edgeLogin={"clientId": "muster-edge-login", "clientSecretFile": str(work / "edge-login-secret")}))
        tokens = {c["client_id"]: idp.client_credentials(c["client_id"], c["client_secret"], resource=resource,
                                                         scope="mcp:tools") for c in clients}
        yield Setup(gateway, idp, tokens, audit)


@contextlib.asynccontextmanager
async def connect_as(setup: Setup, who: str, mode: str, meta: bool = True, **headers: str) -> AsyncIterator[Client]:
    if meta:
        headers["x-muster-tool-mode"] = "meta"
    http = httpx2.AsyncClient(headers={"authorization": f"Bearer {setup.tokens[who]}", **headers}, timeout=30)
    try:
        async with Client(streamable_http_client(setup.gateway.url, http_client=http), mode=mode) as client:
            yield client
    finally:
        await http.aclose()


async def call(client: Client, name: str, arguments: dict[str, Any] | None = None) -> tuple[str, bool, Any]:
    result = await client.call_tool(name, arguments or {})
    assert len(result.content) == 1 and result.content[0].type == "text"
    return result.content[0].text, bool(result.is_error), result.structured_content


async def meta_json(client: Client, name: str, arguments: dict[str, Any] | None = None) -> Any:
    text, error, _ = await call(client, name, arguments)
    assert not error, text
    return json.loads(text)


# ---- modes ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", MODES)
async def test_meta_mode_lists_exactly_musters_eleven_meta_tools(setup: Setup, mode: str) -> None:
    async with connect_as(setup, "dev", mode) as client:
        tools = (await client.list_tools()).tools
        prompts = (await client.list_prompts()).prompts
        resources = (await client.list_resources()).resources
        with pytest.raises(BaseException) as caught:
            await client.call_tool("x_prometheus_whoami", {})
    assert [t.name for t in tools] == META
    schemas = {t.name: t.input_schema for t in tools}
    assert schemas["filter_tools"]["properties"]["limit"]["default"] == 5
    assert schemas["list_core_tools"]["properties"]["include_schema"]["default"] is True
    assert schemas["call_tool"]["required"] == ["name"]
    assert prompts == [] and [str(r.uri) for r in resources] == ["auth://status"]
    err = mcp_error(caught.value)
    assert err is not None and err.code == -32602 and "x_prometheus_whoami" in err.message


@pytest.mark.parametrize("mode", MODES)
async def test_both_mode_lists_meta_core_and_native_tools(setup: Setup, mode: str) -> None:
    async with connect_as(setup, "dev", mode, meta=False) as client:
        names = [t.name for t in (await client.list_tools()).tools]
        native = await client.call_tool("x_prometheus_whoami", {})
        core = await client.call_tool("core_mcpserver_get", {"name": "prometheus"})
    assert names[:11] == META
    assert {"core_mcpserver_list", "core_mcpserver_get", "core_events", "x_prometheus_query",
            "x_kubernetes_whoami", "x_vendor_echo"} <= set(names)
    assert json.loads(native.content[0].text) == {"server": "prometheus"}  # type: ignore[union-attr]
    assert json.loads(core.content[0].text)["name"] == "prometheus"  # type: ignore[union-attr]


async def test_the_header_is_refused_where_the_gateway_runs_native(tmp_path: Path) -> None:
    with start_demo_server("prometheus", name="prometheus") as prom, \
            start_gateway(tmp_path, {"prometheus": prom.url}) as gw:
        async with httpx2.AsyncClient(timeout=10) as http:
            resp = await http.post(gw.url, json={"jsonrpc": "2.0", "id": 1, "method": "tools/list"},
                                   headers={"accept": "application/json, text/event-stream",
                                            "content-type": "application/json", "x-muster-tool-mode": "meta"})
    assert resp.status_code == 400
    assert "toolMode" in resp.json()["error"]["message"]


# ---- list_tools / describe_tool ------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", MODES)
async def test_list_tools_and_describe_tool_shapes_and_errors(setup: Setup, mode: str) -> None:
    async with connect_as(setup, "dev", mode) as client:
        listed = await meta_json(client, "list_tools")
        described = await meta_json(client, "describe_tool", {"name": "x_kubernetes_get_pods"})
        missing = await call(client, "describe_tool", {"name": "x_nope"})
        no_name = await call(client, "describe_tool", {})
    assert listed["servers_requiring_auth"] == [{"name": "oauth-srv", "status": "auth_required",
                                                 "auth_tool": "core_auth_login"}]
    names = [t["name"] for t in listed["tools"]]
    assert all(set(t) == {"name", "description"} for t in listed["tools"])
    assert not set(META) & set(names)
    assert {"x_prometheus_query", "x_kubernetes_get_pods", "core_mcpserver_list", "core_events"} <= set(names)
    assert set(described) == {"name", "description", "inputSchema"}
    assert described["inputSchema"]["properties"][ARG]["enum"] == K8S
    assert missing[:2] == ("Tool not found: x_nope", True)
    assert no_name[:2] == ("name argument is required", True)


# ---- filter_tools ----------------------------------------------------------------------------------------------
def reference_bm25f(query: str, docs: list[tuple[str, str]]) -> list[tuple[str, float]]:
    """§4.2 written out: BM25F k1=1.5 b=0.75, name weight 3, first description line weight 1, ln(1+(N-df+.5)/(df+.5)),
    list/get weight 0.25, score > 0 kept, stable descending, rounded to 4 decimals."""
    def tokens(text: str) -> list[str]:
        text = re.sub(r"([a-z])([A-Z])", r"\1 \2", text)
        return [t.lower() for t in re.split(r"[^A-Za-z0-9]+", text) if t]

    fields = [(tokens(n), tokens(d.split("\n")[0].strip())) for n, d in docs]
    n = len(docs)
    avg = [sum(len(f[i]) for f in fields) / n for i in (0, 1)]
    out = []
    for (name, (nt, dt)) in zip([d[0] for d in docs], fields, strict=True):
        score = 0.0
        for term in set(tokens(query)):
            df = sum(1 for f in fields if term in f[0] or term in f[1])
            idf = math.log(1 + (n - df + 0.5) / (df + 0.5))
            w = sum(weight * Counter(toks)[term] / (1 - 0.75 + 0.75 * len(toks) / avg[i])
                    for i, (weight, toks) in enumerate(((3.0, nt), (1.0, dt))) if Counter(toks)[term])
            if w:
                score += idf * w * 2.5 / (w + 1.5) * (0.25 if term in ("list", "get") else 1)
        if score > 0:
            out.append((name, max(round(score, 4), 0.0001)))
    return sorted(out, key=lambda e: -e[1])


@pytest.mark.parametrize("mode", MODES)
async def test_filter_tools_ranks_with_bm25f_and_pages(setup: Setup, mode: str) -> None:
    async with connect_as(setup, "dev", mode) as client:
        catalog = await meta_json(client, "list_tools")
        ranked = await meta_json(client, "filter_tools", {"pattern": "x_*", "query": "list pods", "limit": 3})
        page2 = await meta_json(client, "filter_tools", {"pattern": "x_*", "query": "list pods", "limit": 3,
                                                         "offset": 3})
        plain = await meta_json(client, "filter_tools", {"description_filter": "PROMQL"})
        schema = await meta_json(client, "filter_tools", {"pattern": "core_mcpserver_*", "include_schema": True})
        core = await meta_json(client, "list_core_tools", {"include_schema": False})
        errors = [await call(client, "filter_tools", args) for args in
                  ({"limit": 0}, {"offset": -1}, {"pattern": "["}, {"limit": "x"})]
    docs = [(t["name"], t["description"]) for t in catalog["tools"] if t["name"].startswith("x_")]
    expected = reference_bm25f("list pods", docs)
    assert [(t["name"], t["score"]) for t in ranked["tools"]] == expected[:3]
    assert [(t["name"], t["score"]) for t in page2["tools"]] == expected[3:6]
    assert ranked["filters"] == {"pattern": "x_*", "query": "list pods", "case_sensitive": False,
                                 "include_schema": False, "limit": 3, "offset": 0}
    assert ranked["total_tools"] == len(catalog["tools"]) and ranked["total"] == len(expected)
    assert ranked["filtered_count"] == 3 and ranked["truncated"] is True
    assert all(set(t) == {"name", "summary", "score"} for t in ranked["tools"])
    assert [t["name"] for t in plain["tools"]] == ["x_prometheus_query"] and "score" not in plain["tools"][0]
    assert all(set(t) == {"name", "description", "inputSchema"} for t in schema["tools"])
    assert [t["name"] for t in core["tools"]] == ["core_auth_login", "core_auth_logout", "core_events",
                                                  "core_mcpserver_get", "core_mcpserver_list",
                                                  "core_workflow_available", "core_workflow_execution_get",
                                                  "core_workflow_execution_list", "core_workflow_get",
                                                  "core_workflow_list"]
    assert core["filters"]["limit"] == 0 and core["truncated"] is False
    assert [e[:2] for e in errors] == [("limit must be at least 1", True), ("offset must be at least 0", True),
                                       ('Invalid pattern "[": syntax error in pattern', True),
                                       ("limit must be a number", True)]


# ---- call_tool -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", MODES)
async def test_call_tool_reaches_backend_family_legacy_and_core_tools_in_musters_envelope(
        setup: Setup, mode: str) -> None:
    async with connect_as(setup, "dev", mode) as client:
        backend = await call(client, "call_tool", {"name": "x_prometheus_query", "arguments": {"promql": "up"}})
        member = await call(client, "call_tool", {"name": "x_kubernetes_whoami", "arguments": {ARG: K8S[1]}})
        legacy = await call(client, "call_tool", {"name": "x_vendor_echo", "arguments": {"text": "hi"}})
        core = await call(client, "call_tool", {"name": "core_mcpserver_list"})
        bad_member = await call(client, "call_tool", {"name": "x_kubernetes_whoami", "arguments": {ARG: "nope"}})
        errors = [await call(client, "call_tool", args) for args in
                  ({}, {"name": "x_prometheus_query", "arguments": [1]}, {"name": "x_missing"})]
    text, error, structured = backend
    inner = json.loads(text)
    assert error is False and inner["isError"] is False
    assert inner["structuredContent"] == structured and structured["query"] == "up"
    assert inner["content"][0]["type"] == "text"
    assert json.loads(json.loads(member[0])["content"][0]["text"]) == {"server": K8S[1]}
    assert "hi" in json.loads(legacy[0])["content"][0]["text"]
    servers = json.loads(json.loads(core[0])["content"][0]["text"])["mcpServers"]
    assert {s["name"] for s in servers} == {*K8S, "prometheus", "vendor", "fixture", "oauth-srv"}
    assert bad_member[1] is True and bad_member[0].startswith("Tool execution failed: tool x_kubernetes_whoami is "
                                                              'not available on server "nope"')
    assert [e[:2] for e in errors] == [("name argument is required", True),
                                       ("arguments must be a JSON object", True),
                                       ("Tool execution failed: Unknown tool: x_missing", True)]


@pytest.mark.parametrize("mode", MODES)
async def test_a_denied_tool_is_unreachable_by_every_meta_path(setup: Setup, mode: str) -> None:
    denied = "x_kubernetes_kubectl_delete"  # Muster's default deny set
    async with connect_as(setup, "dev", mode) as client:
        listed = await meta_json(client, "list_tools")
        described = await call(client, "describe_tool", {"name": denied})
        filtered = await meta_json(client, "filter_tools", {"query": "kubectl delete", "limit": 50})
        called = await call(client, "call_tool", {"name": denied, "arguments": {"kind": "pod", "name": "p",
                                                                                 ARG: K8S[0]}})
    async with connect_as(setup, "dev", mode, **{"x-muster-toolset": "read-only"}) as client:
        narrowed = await call(client, "call_tool", {"name": "x_vendor_toggle_beta"})  # not read-only
        narrowed_list = await meta_json(client, "list_tools")
    assert denied not in {t["name"] for t in listed["tools"]}
    assert described[:2] == (f"Tool not found: {denied}", True)
    assert denied not in {t["name"] for t in filtered["tools"]}
    assert called[:2] == (f"Tool execution failed: Unknown tool: {denied}", True)
    assert narrowed[:2] == ("Tool execution failed: Unknown tool: x_vendor_toggle_beta", True)
    assert "x_vendor_toggle_beta" not in {t["name"] for t in narrowed_list["tools"]}
    assert "x_vendor_echo" in {t["name"] for t in narrowed_list["tools"]}
    lines = [json.loads(line) for line in setup.audit.read_text().splitlines() if line.strip()]
    assert any(e["tool"] == denied and e["decision"] == "deny" and e["rule"] == "default-deny" for e in lines)


# ---- resources and prompts -------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", MODES)
async def test_resource_and_prompt_meta_tools(setup: Setup, mode: str) -> None:
    async with connect_as(setup, "dev", mode) as client:
        resources = await meta_json(client, "list_resources")
        uri = next(r["uri"] for r in resources if r["uri"].endswith("/targets"))
        described = await meta_json(client, "describe_resource", {"uri": uri})
        content = await call(client, "get_resource", {"uri": uri})
        missing = await call(client, "describe_resource", {"uri": "nope://x"})
        prompts = await meta_json(client, "list_prompts")
        prompt = await meta_json(client, "describe_prompt", {"name": "x_prometheus_investigate_alert"})
        got = await meta_json(client, "get_prompt", {"name": "x_prometheus_investigate_alert",
                                                    "arguments": {"alert": "Disk"}})
        no_prompt = await call(client, "describe_prompt", {"name": "x_nope"})
    assert all({"uri", "name"} <= set(r) for r in resources)
    assert set(described) == {"uri", "name", "description", "mimeType"}
    assert json.loads(content[0])["source"] == "prometheus" and content[1] is False
    assert missing[:2] == ("Resource not found: nope://x", True)
    assert all(set(p) == {"name", "description"} for p in prompts)
    assert prompt["arguments"] == [{"name": "alert", "description": prompt["arguments"][0]["description"],
                                    "required": True}]
    assert got[0]["role"] == "user" and "Disk" in got[0]["content"]["text"]
    assert no_prompt[:2] == ("Prompt not found: x_nope", True)


# ---- core tools per caller -------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", MODES)
async def test_core_mcpserver_list_and_events_answer_per_caller(setup: Setup, mode: str) -> None:
    answers = {}
    for who in ("dev", "intern"):
        async with connect_as(setup, who, mode) as client:
            listed = json.loads((await call(client, "call_tool", {"name": "core_mcpserver_list"}))[0])
            got = await call(client, "call_tool", {"name": "core_mcpserver_get", "arguments": {"name": "prometheus"}})
            events = await call(client, "call_tool", {"name": "core_events", "arguments": {"limit": 100}})
            answers[who] = (json.loads(listed["content"][0]["text"])["mcpServers"], got, events)
    dev, intern = answers["dev"], answers["intern"]
    dev_servers = {s["name"]: s for s in dev[0]}
    assert set(dev_servers) == {*K8S, "prometheus", "vendor", "fixture", "oauth-srv"}
    assert dev_servers["prometheus"]["state"] == "Connected"
    assert dev_servers["prometheus"]["sessionStatus"] == "connected"
    assert dev_servers["prometheus"]["toolsCount"] == 3
    assert {s["name"] for s in intern[0]} == {*K8S, "vendor", "fixture", "oauth-srv"}
    assert dev_servers["oauth-srv"]["sessionStatus"] == "auth_required" and dev_servers["oauth-srv"]["toolsCount"] == 0
    assert json.loads(json.loads(dev[1][0])["content"][0]["text"])["toolsCount"] == 3
    assert json.loads(intern[1][0])["content"][0]["text"] == "MCPServer 'prometheus' not found"
    events = json.loads(json.loads(dev[2][0])["content"][0]["text"])["events"]
    assert any(e["resourceType"] == "Catalog" and e["reason"] == "Reloaded" for e in events)
    assert any(e["resourceName"] == "prometheus" and e["reason"] == "Connected" for e in events)
    assert all("subject" not in e for e in events)
    assert intern[2][:2] == ("Tool execution failed: Unknown tool: core_events", True)  # the policy applies


@pytest.mark.parametrize("mode", MODES)
async def test_call_tool_maps_resource_links_like_a_native_call(setup: Setup, mode: str) -> None:
    async with connect_as(setup, "dev", mode, meta=False) as client:
        native = await client.call_tool("x_vendor_make_link", {})
        wrapped = await call(client, "call_tool", {"name": "x_vendor_make_link"})
    native_uri = str(native.content[1].uri)  # type: ignore[union-attr]
    inner = json.loads(wrapped[0])["content"]
    assert inner[1]["type"] == "resource_link" and inner[1]["uri"] == native_uri
    assert native_uri != "vendor://docs/readme"


async def test_events_are_shared_through_the_store(tmp_path: Path) -> None:
    from extproc.events import Events
    from tests.e2e.test_shared_state import start_redis

    with start_redis(tmp_path) as url:
        one, two = Events(url), Events(url)
        one.record("MCPServer", "prom", "Connected", "prom is reachable")
        for _ in range(100):
            seen = await two.read(subject="", servers={"prom"})
            if seen:
                break
            await asyncio.sleep(0.05)
    assert [(e["resourceName"], e["reason"]) for e in seen] == [("prom", "Connected")]


async def post(setup: Setup, method: str, params: dict[str, Any]) -> httpx2.Response:
    meta = {"io.modelcontextprotocol/protocolVersion": MODERN, "io.modelcontextprotocol/clientCapabilities": {
        "elicitation": {"form": {}}}}
    headers = {"accept": "application/json, text/event-stream", "content-type": "application/json",
               "mcp-protocol-version": MODERN, "mcp-method": method, "x-muster-tool-mode": "meta",
               "authorization": f"Bearer {setup.tokens['dev']}"}
    if "name" in params:
        headers["mcp-name"] = params["name"]
    if "uri" in params:
        headers["mcp-name"] = params["uri"]
    async with httpx2.AsyncClient(timeout=30) as http:
        return await http.post(setup.gateway.url, headers=headers, json={
            "jsonrpc": "2.0", "id": 7, "method": method, "params": {**params, "_meta": meta}})


async def test_call_tool_relays_input_required_to_a_modern_client(setup: Setup) -> None:
    call_params = {"name": "call_tool", "arguments": {"name": "x_fixture_test_input_required_result_elicitation"}}
    first = (await post(setup, "tools/call", call_params)).json()["result"]
    assert first["resultType"] == "input_required" and "user_name" in first["inputRequests"]
    answer = {"user_name": {"action": "accept", "content": {"name": "Ada"}}}
    retry = {**call_params, "inputResponses": answer}
    if first.get("requestState"):
        retry["requestState"] = first["requestState"]
    second = (await post(setup, "tools/call", retry)).json()["result"]
    assert second["resultType"] == "complete" and second["isError"] is False
    assert json.loads(second["content"][0]["text"])["content"][0]["text"] == "Hello, Ada!"


async def test_meta_mode_reaches_backend_prompts_and_resources_only_through_meta_tools(setup: Setup) -> None:
    prompt = (await post(setup, "prompts/get", {"name": "x_prometheus_investigate_alert",
                                                "arguments": {"alert": "a"}})).json()
    resources = (await post(setup, "resources/list", {})).json()["result"]["resources"]
    uri = next(r["uri"] for r in json.loads((await post(setup, "tools/call", {"name": "list_resources",
                                                                              "arguments": {}})).json()
                                             ["result"]["content"][0]["text"]) if r["uri"].endswith("/targets"))
    read = (await post(setup, "resources/read", {"uri": uri})).json()
    status = (await post(setup, "resources/read", {"uri": "auth://status"})).json()
    assert prompt["error"]["code"] == -32602
    assert [r["uri"] for r in resources] == ["auth://status"]
    assert "error" in read and "Resource not found" in read["error"]["message"]
    assert "prometheus" in status["result"]["contents"][0]["text"]


async def test_backend_tools_named_like_edge_tools_are_left_out_and_named_in_the_status(tmp_path: Path) -> None:
    with start_demo_server("prometheus", name="prometheus") as prom, \
            start_gateway(tmp_path, {"prometheus": prom.url}, prefix="workflow", toolMode="both") as gw:
        async with Client(gw.url, mode=MODERN) as client:
            names = {t.name for t in (await client.list_tools()).tools}
        collisions = gw.status()["collisions"]
    assert "workflow_prometheus_query" in collisions and "workflow_prometheus_whoami" in collisions
    assert not any(n.startswith("workflow_") for n in names)
    assert set(META) <= names
