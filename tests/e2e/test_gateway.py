"""The gateway end to end: real Envoy, the real processor, three real MCP servers, the mcp SDK client.

kubernetes and prometheus speak both eras (prometheus answers JSON, kubernetes SSE); vendor speaks only the
handshake era. Every test runs against the same gateway and only reads, so order does not matter.
"""

from __future__ import annotations

import asyncio
import base64
import json
import re
from typing import Any

import httpx2
import pytest

from tests.e2e.conftest import MODES, Fleet, connect

MODERN = "2026-07-28"
ACCEPT = {"accept": "application/json, text/event-stream", "content-type": "application/json"}

EXPECTED_TOOLS = {
    "x_kubernetes_get_pods", "x_kubernetes_list", "x_kubernetes_logs", "x_kubernetes_whoami",
    "x_prometheus_query", "x_prometheus_list_alerts", "x_prometheus_whoami",
    "x_vendor_slow_count", "x_vendor_make_link", "x_vendor_echo", "x_vendor_whoami", "x_vendor_get_pods",
    "x_vendor_toggle_beta",
}

CORE_TOOLS = {
    "core_mcpserver_list", "core_mcpserver_get", "core_events", "core_workflow_list", "core_workflow_get",
    "core_workflow_available", "core_workflow_execution_list", "core_workflow_execution_get",
}


def modern_body(method: str, params: dict[str, Any] | None = None, msg_id: int = 1) -> dict[str, Any]:
    meta = {"io.modelcontextprotocol/protocolVersion": MODERN, "io.modelcontextprotocol/clientCapabilities": {}}
    return {"jsonrpc": "2.0", "id": msg_id, "method": method, "params": {**(params or {}), "_meta": meta}}


def modern_headers(method: str, name: str | None = None, **extra: str) -> dict[str, str]:
    headers = {**ACCEPT, "mcp-protocol-version": MODERN, "mcp-method": method, **extra}
    if name is not None:
        headers["mcp-name"] = name
    return headers


def records(fleet: Fleet, server: str) -> list[dict[str, Any]]:
    path = fleet.records[server]
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def first_text(result: Any) -> str:
    return str(next(block.text for block in result.content if block.type == "text"))


@pytest.mark.parametrize("mode", MODES)
async def test_lists_merge_every_upstream_under_prefixed_names(fleet: Fleet, mode: str) -> None:
    async with connect(fleet.gateway.url, mode) as client:
        tools = [t.name for t in (await client.list_tools()).tools]
        prompts = {p.name for p in (await client.list_prompts()).prompts}
        resources = {r.uri for r in (await client.list_resources()).resources}
        templates = {t.uri_template for t in (await client.list_resource_templates()).resource_templates}
    backend = [t for t in tools if t.startswith("x_")]
    assert set(backend) == EXPECTED_TOOLS  # kubectl_delete is in the default deny set (see test_policy.py)
    assert set(tools) - set(backend) == CORE_TOOLS  # Muster's read-only core tools, listed in native mode too
    assert len(tools) == len(set(tools))
    assert backend == sorted(backend, key=lambda n: n.split("_")[1])  # grouped by server, in server order
    assert prompts == {"x_kubernetes_debug_pod", "x_prometheus_investigate_alert", "x_vendor_summarize"}
    assert resources == {"x+kubernetes+k8s://kubernetes/cluster-info", "x+prometheus+prom://prometheus/targets",
                         "x+vendor+vendor://docs/readme"}
    assert templates == {"x+kubernetes+k8s://kubernetes/namespaces/{namespace}"}


@pytest.mark.parametrize("mode", MODES)
async def test_calls_reach_the_upstream_that_owns_the_name(fleet: Fleet, mode: str) -> None:
    async with connect(fleet.gateway.url, mode) as client:
        for server in ("kubernetes", "prometheus", "vendor"):
            result = await client.call_tool(f"x_{server}_whoami", {})
            assert json.loads(first_text(result)) == {"server": server}
        pods_k8s = await client.call_tool("x_kubernetes_get_pods", {"namespace": "kube-system"})
        pods_vendor = await client.call_tool("x_vendor_get_pods", {})
    assert "kube-system" in json.dumps(pods_k8s.model_dump())
    assert "vendor" in json.dumps(pods_vendor.model_dump())


@pytest.mark.parametrize("mode", MODES)
async def test_progress_notifications_stream_back_through_envoy(fleet: Fleet, mode: str) -> None:
    seen: list[float] = []

    async def on_progress(progress: float, total: float | None, message: str | None) -> None:
        seen.append(progress)

    async with connect(fleet.gateway.url, mode) as client:
        result = await client.call_tool("x_vendor_slow_count", {"n": 4}, progress_callback=on_progress)
    assert "4" in first_text(result)
    assert seen == [1.0, 2.0, 3.0, 4.0]


@pytest.mark.parametrize("mode", MODES)
async def test_prompts_and_resources_round_trip(fleet: Fleet, mode: str) -> None:
    async with connect(fleet.gateway.url, mode) as client:
        prompt = await client.get_prompt("x_kubernetes_debug_pod", {"pod": "web-1"})
        assert "web-1" in json.dumps(prompt.model_dump())
        info = await client.read_resource("x+kubernetes+k8s://kubernetes/cluster-info")
        assert info.contents[0].uri == "x+kubernetes+k8s://kubernetes/cluster-info"
        assert "cluster: kubernetes" in info.contents[0].text  # type: ignore[union-attr]
        ns = await client.read_resource("x+kubernetes+k8s://kubernetes/namespaces/monitoring")
        assert "monitoring" in json.dumps(ns.model_dump())
        alert = await client.get_prompt("x_prometheus_investigate_alert", {"alert": "HighLatency"})
        assert "HighLatency" in json.dumps(alert.model_dump())


@pytest.mark.parametrize("mode", MODES)
async def test_uris_inside_results_are_mapped_back_and_readable(fleet: Fleet, mode: str) -> None:
    async with connect(fleet.gateway.url, mode) as client:
        result = await client.call_tool("x_vendor_make_link", {})
        links = [b.uri for b in result.content if b.type == "resource_link"]
        embedded = [b.resource.uri for b in result.content if b.type == "resource"]
        assert links == ["x+vendor+vendor://docs/readme"]
        assert embedded == ["x+vendor+vendor://docs/readme"]
        readme = await client.read_resource(links[0])
    assert readme.contents[0].uri == links[0]
    assert "# vendor" in readme.contents[0].text  # type: ignore[union-attr]


async def test_routed_requests_are_re_originated_for_each_upstream(fleet: Fleet) -> None:
    """Mcp-Name, host and version are recomputed; the caller's token and foreign Mcp-Param-* never leave."""
    gw = fleet.gateway
    body = modern_body("tools/call", {"name": "x_kubernetes_whoami", "arguments": {}})
    headers = modern_headers("tools/call", "x_kubernetes_whoami", authorization="Bearer caller-secret",
                             **{"mcp-param-region": "eu"})
    async with httpx2.AsyncClient(timeout=10) as http:
        resp = await http.post(gw.url, json=body, headers=headers)
        assert resp.status_code == 200, resp.text
        legacy = await http.post(gw.url, json={"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
            "protocolVersion": "2025-11-25", "capabilities": {}, "clientInfo": {"name": "t", "version": "1"}}},
            headers=ACCEPT)
        sid = legacy.headers["mcp-session-id"]
        call = {"jsonrpc": "2.0", "id": 2, "method": "tools/call", "params": {"name": "x_vendor_echo",
                                                                             "arguments": {"text": "hi"}}}
        resp = await http.post(gw.url, json=call, headers={**ACCEPT, "mcp-session-id": sid,
                                                            "mcp-protocol-version": "2025-11-25",
                                                            "authorization": "Bearer caller-secret"})
        assert resp.status_code == 200, resp.text
    k8s = [r for r in records(fleet, "kubernetes") if r["headers"].get("mcp-method") == "tools/call"][-1]["headers"]
    assert k8s["mcp-name"] == "whoami"
    assert k8s["host"] == f"127.0.0.1:{fleet.servers['kubernetes'].port}"
    assert k8s["mcp-protocol-version"] == MODERN
    assert "authorization" not in k8s and "mcp-param-region" not in k8s and "mcp-session-id" not in k8s
    vendor = [r["headers"] for r in records(fleet, "vendor") if r.get("method") == "POST"][-1]
    assert vendor["host"] == f"127.0.0.1:{fleet.servers['vendor'].port}"
    assert "authorization" not in vendor and "mcp-name" not in vendor and "mcp-method" not in vendor
    assert vendor["mcp-session-id"] and vendor["mcp-session-id"] != sid


BAD_INPUTS = [
    ("malformed JSON", b'{"jsonrpc": "2.0", "id": 1,', ACCEPT, 400, -32700),
    ("batch", b'[{"jsonrpc":"2.0","id":1,"method":"tools/list"}]', ACCEPT, 400, -32600),
    ("not JSON-RPC", b'{"id":1,"method":"tools/list"}', ACCEPT, 400, -32600),
    ("modern unknown method", json.dumps(modern_body("nope/nothing")).encode(), modern_headers("nope/nothing"),
     404, -32601),
    ("modern unknown tool", json.dumps(modern_body("tools/call", {"name": "x_nope_tool"})).encode(),
     modern_headers("tools/call", "x_nope_tool"), 400, -32602),
    ("modern missing _meta", b'{"jsonrpc":"2.0","id":1,"method":"tools/list","params":{}}',
     modern_headers("tools/list"), 400, -32602),
    ("Mcp-Name disagrees", json.dumps(modern_body("tools/call", {"name": "x_vendor_echo"})).encode(),
     modern_headers("tools/call", "x_kubernetes_whoami"), 400, -32020),
    ("Mcp-Method disagrees", json.dumps(modern_body("tools/list")).encode(), modern_headers("prompts/list"),
     400, -32020),
    ("unsupported version", json.dumps(modern_body("tools/list")).encode(),
     {**modern_headers("tools/list"), "mcp-protocol-version": "2099-01-01"}, 400, -32020),
    ("wrong Accept", b'{"jsonrpc":"2.0","id":1,"method":"initialize","params":{}}',
     {"accept": "text/html", "content-type": "application/json"}, 406, -32600),
    ("legacy without session", b'{"jsonrpc":"2.0","id":1,"method":"tools/list"}', ACCEPT, 400, -32600),
    ("legacy forged session", b'{"jsonrpc":"2.0","id":1,"method":"tools/list"}',
     {**ACCEPT, "mcp-session-id": "forged-session-id"}, 404, -32600),
]


@pytest.mark.parametrize(("case", "body", "headers", "status", "code"), BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS])
async def test_bad_input_gets_the_right_error(fleet: Fleet, case: str, body: bytes, headers: dict[str, str],
                                              status: int, code: int) -> None:
    async with httpx2.AsyncClient(timeout=10) as http:
        resp = await http.post(fleet.gateway.url, content=body, headers=headers)
    assert resp.status_code == status, resp.text
    assert resp.headers["content-type"].startswith("application/json")
    assert resp.json()["error"]["code"] == code


async def test_unknown_version_names_the_supported_ones(fleet: Fleet) -> None:
    body = modern_body("tools/list")
    body["params"]["_meta"]["io.modelcontextprotocol/protocolVersion"] = "2099-01-01"
    async with httpx2.AsyncClient(timeout=10) as http:
        resp = await http.post(fleet.gateway.url, json=body,
                               headers={**modern_headers("tools/list"), "mcp-protocol-version": "2099-01-01"})
    assert resp.status_code == 400
    error = resp.json()["error"]
    assert error["code"] == -32022
    assert MODERN in error["data"]["supported"] and error["data"]["requested"] == "2099-01-01"


async def test_oversized_body_is_refused_with_413(fleet: Fleet) -> None:
    """Envoy refuses a body over maxRequestBytes from its Content-Length, before reading it (and nothing reaches
    the processor or an upstream)."""
    host, port = fleet.gateway.config["listen"].rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(f"POST /mcp HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
                 f"Accept: application/json, text/event-stream\r\nContent-Length: {5 << 20}\r\n\r\n".encode())
    await writer.drain()
    status = await asyncio.wait_for(reader.readline(), 10)
    writer.close()
    assert status.split()[1] == b"413", status


async def test_get_and_other_methods_are_not_allowed(fleet: Fleet) -> None:
    async with httpx2.AsyncClient(timeout=10) as http:
        get = await http.get(fleet.gateway.url, headers={"accept": "text/event-stream"})
        put = await http.put(fleet.gateway.url, content=b"{}", headers=ACCEPT)
        other = await http.post(fleet.gateway.url.replace("/mcp", "/elsewhere"), content=b"{}", headers=ACCEPT)
    assert get.status_code == 405 and "POST" in get.headers["allow"]
    assert put.status_code == 405
    assert other.status_code == 404
    # each refusal says why as a JSON-RPC error a client can show
    for resp, says in ((get, "Method Not Allowed: GET"), (put, "Method Not Allowed: PUT"), (other, "Not Found")):
        assert resp.headers["content-type"] == "application/json"
        error = resp.json()["error"]
        assert error["message"].startswith(says) and resp.json()["id"] is None, resp.text


async def test_a_forged_routing_header_cannot_pick_an_upstream(fleet: Fleet) -> None:
    body = modern_body("tools/call", {"name": "x_nope_tool"})
    headers = {**modern_headers("tools/call", "x_nope_tool"), "x-muster-edge-cluster": "mcp.kubernetes"}
    before = len(records(fleet, "kubernetes"))
    async with httpx2.AsyncClient(timeout=10) as http:
        resp = await http.post(fleet.gateway.url, json=body, headers=headers)
    assert resp.status_code == 400 and resp.json()["error"]["code"] == -32602
    assert len(records(fleet, "kubernetes")) == before


async def test_legacy_sessions_are_sealed_bound_and_end_with_delete(fleet: Fleet) -> None:
    gw = fleet.gateway
    init = {"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
        "protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "t", "version": "1"}}}
    async with httpx2.AsyncClient(timeout=10) as http:
        resp = await http.post(gw.url, json=init, headers=ACCEPT)
        assert resp.json()["result"]["protocolVersion"] == "2025-06-18"
        sid = resp.headers["mcp-session-id"]
        legacy = {**ACCEPT, "mcp-session-id": sid, "mcp-protocol-version": "2025-06-18"}
        call = {"jsonrpc": "2.0", "id": 2, "method": "tools/call",
                "params": {"name": "x_vendor_echo", "arguments": {"text": "sealed"}}}
        assert (await http.post(gw.url, json=call, headers=legacy)).status_code == 200
        upstream_sids = {r["headers"].get("mcp-session-id") for r in records(fleet, "vendor")} - {None}
        raw = base64.urlsafe_b64decode(sid + "=" * (-len(sid) % 4))
        for upstream in upstream_sids:
            assert upstream not in sid and upstream.encode() not in raw
        tampered = sid[:-2] + ("A" if sid[-2] != "A" else "B") + sid[-1]
        bad = await http.post(gw.url, json=call, headers={**legacy, "mcp-session-id": tampered})
        assert bad.status_code == 404
        deleted = await http.delete(gw.url, headers=legacy)
        assert deleted.status_code == 200
        after = await http.post(gw.url, json=call, headers=legacy)
        assert after.status_code == 404
        modern = await http.post(gw.url, json=modern_body("tools/list"), headers=modern_headers("tools/list"))
        assert "mcp-session-id" not in modern.headers
    gw.wait_for(lambda: any(r.get("method") == "DELETE" for r in records(fleet, "vendor")),
                what="the upstream session behind the gateway session to be deleted")


async def test_warm_lists_do_not_touch_upstreams(fleet: Fleet) -> None:
    async with connect(fleet.gateway.url, MODERN) as client:
        await client.list_tools(cache_mode="bypass")
        before = {name: sum(r["method"] == "POST" for r in records(fleet, name)) for name in fleet.records}
        for _ in range(5):
            await client.list_tools(cache_mode="bypass")
    after = {name: sum(r["method"] == "POST" for r in records(fleet, name)) for name in fleet.records}
    assert after == before


async def test_requests_are_counted_by_known_method_and_outcome(fleet: Fleet) -> None:
    gw = fleet.gateway
    async with connect(gw.url, MODERN) as client:
        await client.call_tool("x_prometheus_whoami", {})
    async with httpx2.AsyncClient(timeout=10) as http:
        odd = await http.post(gw.url, json=modern_body("nonsense/made-up"), headers=modern_headers("nonsense/made-up"))
        assert odd.json()["error"]["code"] == -32601
        metrics = (await http.get(gw.status_url.replace("/status", "/metrics"))).text
    assert re.search(r'muster_edge_requests_total\{method="tools/call",outcome="routed"\} [1-9]', metrics), metrics
    assert re.search(r'muster_edge_requests_total\{method="tools/list",outcome="answered"\} [1-9]', metrics)
    assert re.search(r'muster_edge_requests_total\{method="other",outcome="error"\} [1-9]', metrics)
    assert "made-up" not in metrics  # a client's method name never becomes a label value
