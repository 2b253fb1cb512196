"""The demo upstream servers (deploy/demo/servers.py) with nothing in between.

(a) Each demo kind is reached with the mcp SDK client in both eras (`mode="legacy"`: the initialize handshake;
    `mode="2026-07-28"`: the stateless revision), and a `--era legacy` server is shown to speak the handshake era
    only. These are the upstreams the gateway tests put behind Envoy, so their behaviour is pinned here first.
(b) The MCP conformance suite runs straight against the `fixture` server at both spec versions; what passes here
    is the ceiling a gateway in front of the fixture can reach.
"""

from __future__ import annotations

import json
import signal
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import httpx2
import pytest
from mcp.client import Client
from mcp.client.streamable_http import streamable_http_client
from mcp.shared.exceptions import MCPError

from tests.conformance import available, run_conformance_detailed
from tests.procs import DemoServer, free_port, start_demo_server, stop

MODERN = "2026-07-28"
HANDSHAKE = "2025-11-25"
MODES = ("legacy", MODERN)

# What each kind must list, and one call that proves which upstream answered.
EXPECTED_TOOLS = {
    "kubernetes": {"get_pods", "list", "logs", "kubectl_delete", "whoami"},
    "prometheus": {"query", "list_alerts", "whoami"},
    "vendor": {"slow_count", "make_link", "echo", "whoami", "get_pods"},
    "fixture": {"test_simple_text", "test_image_content", "test_tool_with_progress", "test_param_header"},
}
NAMES = {"kubernetes": "k8s-a", "prometheus": "prom-a", "vendor": "vendor-a", "fixture": "fixture"}


@pytest.fixture(scope="module")
def upstreams() -> Iterator[dict[str, DemoServer]]:
    """One server per kind (dual era), plus a legacy-only vendor, for the whole module."""
    with ExitStack() as stack:
        servers = {kind: stack.enter_context(start_demo_server(kind, name=NAMES[kind])) for kind in EXPECTED_TOOLS}
        servers["vendor-legacy"] = stack.enter_context(start_demo_server("vendor", name="vendor-legacy", era="legacy"))
        yield servers


def connect(url: str, mode: str, **kwargs: Any) -> Client:
    return Client(url, mode=mode, read_timeout_seconds=10, **kwargs)


def wire(result: Any) -> dict[str, Any]:
    """A result as it looked on the wire (camelCase keys, no nulls)."""
    return dict(result.model_dump(mode="json", by_alias=True, exclude_none=True))


def first_text(result: Any) -> str:
    return str(next(block["text"] for block in wire(result)["content"] if block["type"] == "text"))


def mcp_errors(exc: BaseException) -> list[MCPError]:
    """The MCPErrors inside an exception (the client's task group wraps them in exception groups)."""
    if isinstance(exc, MCPError):
        return [exc]
    if isinstance(exc, BaseExceptionGroup):
        return [error for inner in exc.exceptions for error in mcp_errors(inner)]
    return []


# --------------------------------------------------------------------------------------------------------------
# (a) the SDK client against each kind, in each era


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("kind", sorted(EXPECTED_TOOLS))
async def test_list_and_call_in_each_mode(upstreams: dict[str, DemoServer], kind: str, mode: str) -> None:
    async with connect(upstreams[kind].url, mode) as client:
        assert client.protocol_version == (HANDSHAKE if mode == "legacy" else MODERN)
        listed = {tool.name for tool in (await client.list_tools()).tools}
        assert EXPECTED_TOOLS[kind] <= listed
        if kind == "fixture":
            result = await client.call_tool("test_simple_text", {})
            assert first_text(result) == "This is a simple text response for testing."
        else:
            result = await client.call_tool("whoami", {})
            assert json.loads(first_text(result)) == {"server": NAMES[kind]}
        assert not result.is_error


async def test_legacy_era_speaks_only_the_handshake(upstreams: dict[str, DemoServer]) -> None:
    url = upstreams["vendor-legacy"].url
    async with connect(url, "legacy") as client:
        assert client.protocol_version == HANDSHAKE
        assert json.loads(first_text(await client.call_tool("whoami", {}))) == {"server": "vendor-legacy"}
    async with connect(url, "auto") as client:  # the discover probe is refused, so the client falls back
        assert client.protocol_version == HANDSHAKE
    with pytest.raises(BaseException) as caught:
        async with connect(url, MODERN) as client:
            await client.list_tools()
    assert mcp_errors(caught.value), caught.value


async def test_legacy_era_answers_400_to_modern_versions(upstreams: dict[str, DemoServer]) -> None:
    meta = {"io.modelcontextprotocol/protocolVersion": MODERN, "io.modelcontextprotocol/clientCapabilities": {}}
    body = {"jsonrpc": "2.0", "id": 1, "method": "server/discover", "params": {"_meta": meta}}
    headers = {"accept": "application/json, text/event-stream", "mcp-protocol-version": MODERN}
    async with httpx2.AsyncClient(timeout=10) as http:
        legacy = await http.post(upstreams["vendor-legacy"].url, json=body, headers=headers)
        dual = await http.post(upstreams["vendor"].url, json=body, headers={**headers, "mcp-method": "server/discover"})
    assert (legacy.status_code, legacy.text) == (400, "Bad Request: Unsupported protocol version")
    assert legacy.headers["content-type"].startswith("text/plain")
    assert dual.status_code == 200 and MODERN in dual.json()["result"]["supportedVersions"]


async def test_dual_era_discover_lists_both_eras(upstreams: dict[str, DemoServer]) -> None:
    async with connect(upstreams["kubernetes"].url, "auto") as client:
        assert client.protocol_version == MODERN


@pytest.mark.parametrize("mode", MODES)
async def test_kubernetes_annotations_prompts_resources(upstreams: dict[str, DemoServer], mode: str) -> None:
    async with connect(upstreams["kubernetes"].url, mode) as client:
        tools = {tool["name"]: tool for tool in wire(await client.list_tools())["tools"]}
        assert tools["kubectl_delete"]["annotations"]["destructiveHint"] is True
        assert all(tools[name]["annotations"]["readOnlyHint"] for name in ("get_pods", "list", "logs", "whoami"))
        pods = await client.call_tool("get_pods", {"namespace": "kube-system"})
        assert pods.structured_content["pods"][0]["name"] == "k8s-a-api-0"
        listing = await client.call_tool("list", {"kind": "deployments"})
        assert listing.structured_content["items"] == ["k8s-a-deployments-0", "k8s-a-deployments-1"]
        assert first_text(await client.call_tool("logs", {"pod": "p", "tail": 2})).count("\n") == 1
        prompt = wire(await client.get_prompt("debug_pod", {"pod": "web-1"}))
        assert "web-1" in prompt["messages"][0]["content"]["text"]
        resources = [str(resource.uri) for resource in (await client.list_resources()).resources]
        assert resources == ["k8s://k8s-a/cluster-info"]
        templates = (await client.list_resource_templates()).resource_templates
        assert [template.uri_template for template in templates] == ["k8s://k8s-a/namespaces/{namespace}"]
        namespace = wire(await client.read_resource("k8s://k8s-a/namespaces/prod"))
        assert json.loads(namespace["contents"][0]["text"])["namespace"] == "prod"


@pytest.mark.parametrize(("server", "mode"), [("vendor", "legacy"), ("vendor", MODERN), ("vendor-legacy", "legacy")])
async def test_vendor_progress_and_links(upstreams: dict[str, DemoServer], server: str, mode: str) -> None:
    reports: list[tuple[float, float | None]] = []

    async def on_progress(progress: float, total: float | None, message: str | None) -> None:
        reports.append((progress, total))

    async with connect(upstreams[server].url, mode) as client:
        counted = await client.call_tool("slow_count", {"n": 3}, progress_callback=on_progress)
        assert first_text(counted) == "counted to 3"
        assert reports == [(1, 3), (2, 3), (3, 3)]
        link, embedded = wire(await client.call_tool("make_link", {}))["content"][1:]
        assert (link["type"], link["uri"]) == ("resource_link", "vendor://docs/readme")
        assert (embedded["type"], embedded["resource"]["uri"]) == ("resource", "vendor://docs/readme")
        readme = wire(await client.read_resource("vendor://docs/readme"))
        assert readme["contents"][0]["mimeType"] == "text/markdown"
        assert first_text(await client.call_tool("echo", {"text": "hi"})) == "hi"
        prompt = wire(await client.get_prompt("summarize", {"topic": "gateways"}))
        assert "gateways" in prompt["messages"][0]["content"]["text"]


# --------------------------------------------------------------------------------------------------------------
# the command-line options other tests rely on


@pytest.mark.parametrize("mode", MODES)
async def test_json_response_option(mode: str) -> None:
    with start_demo_server("prometheus", name="prom-json", json_response=True) as server:
        async with connect(server.url, mode) as client:
            assert json.loads(first_text(await client.call_tool("whoami", {}))) == {"server": "prom-json"}


async def test_bearer_and_header_recording(tmp_path: Path) -> None:
    record = tmp_path / "headers.jsonl"
    port = free_port()
    with start_demo_server("prometheus", port, name="prom-auth", require_bearer="s3cret", record_headers=record) as srv:
        assert srv.port == port and srv.url == f"http://127.0.0.1:{port}/mcp"
        with pytest.raises(BaseException) as caught:
            async with connect(srv.url, MODERN) as client:
                await client.list_tools()
        assert mcp_errors(caught.value), caught.value
        async with (
            httpx2.AsyncClient(headers={"Authorization": "Bearer s3cret"}, timeout=10) as http,
            Client(streamable_http_client(srv.url, http_client=http), mode=MODERN) as client,
        ):
            assert json.loads(first_text(await client.call_tool("whoami", {}))) == {"server": "prom-auth"}
    lines = [json.loads(line) for line in record.read_text().splitlines()]
    assert {line["method"] for line in lines} == {"POST"} and {line["path"] for line in lines} == {"/mcp"}
    assert all(name == name.lower() for line in lines for name in line["headers"])
    authorized = [line["headers"] for line in lines if "authorization" in line["headers"]]
    assert authorized and all(headers["authorization"] == "Bearer s3cret" for headers in authorized)
    assert any(headers.get("mcp-name") == "whoami" for headers in authorized)
    assert all(headers["mcp-protocol-version"] == MODERN for headers in authorized)


def test_sigterm_exits_cleanly() -> None:
    with start_demo_server("kubernetes") as server:
        proc = server.process.proc
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0
        assert stop(proc) == 0


# --------------------------------------------------------------------------------------------------------------
# (b) the conformance suite straight against the fixture server
#
# Recorded on 2026-11-22 (suite 0.2.0-alpha.12, mcp 2.3.0): with `--suite all` every scenario the suite runs
# passes, with no FAILURE check.
#   2025-11-25 (33 scenarios): server-initialize, server-session-lifecycle, logging-set-level, ping,
#     completion-complete, tools-list, tools-call-{simple-text,image,audio,embedded-resource,mixed-content,
#     with-logging,error,with-progress,sampling,elicitation}, json-schema-2020-12, elicitation-sep1034-defaults,
#     elicitation-sep1330-enums, server-sse-polling, server-sse-multiple-streams, resources-{list,read-text,
#     read-binary,templates-read,subscribe,unsubscribe}, prompts-{list,get-simple,get-with-args,
#     get-embedded-resource,get-with-image}, dns-rebinding-protection.
#   2026-07-28 (40 scenarios): server-stateless, completion-complete, tools-list, tools-call-{simple-text,image,
#     audio,embedded-resource,mixed-content,error,with-progress}, json-schema-2020-12, server-sse-multiple-streams,
#     resources-{list,read-text,read-binary,templates-read}, sep-2164-resource-not-found, prompts-{list,
#     get-simple,get-with-args,get-embedded-resource,get-with-image}, dns-rebinding-protection, caching,
#     http-header-validation, http-custom-header-server-validation, and the 14 input-required-result-* ones.
# Not one check is a FAILURE or a WARNING at either version (the 2025-11-25 run also has 10 INFO checks).
# The extension scenarios (tasks-*, sep-2640-skills-*) are not part of `--suite all`.

SCENARIOS_2025 = {
    "server-initialize", "server-session-lifecycle", "logging-set-level", "ping", "completion-complete",
    "tools-list", "tools-call-simple-text", "tools-call-image", "tools-call-audio", "tools-call-embedded-resource",
    "tools-call-mixed-content", "tools-call-with-logging", "tools-call-error", "tools-call-with-progress",
    "tools-call-sampling", "tools-call-elicitation", "json-schema-2020-12", "elicitation-sep1034-defaults",
    "elicitation-sep1330-enums", "server-sse-polling", "server-sse-multiple-streams", "resources-list",
    "resources-read-text", "resources-read-binary", "resources-templates-read", "resources-subscribe",
    "resources-unsubscribe", "prompts-list", "prompts-get-simple", "prompts-get-with-args",
    "prompts-get-embedded-resource", "prompts-get-with-image", "dns-rebinding-protection",
}  # fmt: skip
SCENARIOS_2026 = {
    "server-stateless", "completion-complete", "tools-list", "tools-call-simple-text", "tools-call-image",
    "tools-call-audio", "tools-call-embedded-resource", "tools-call-mixed-content", "tools-call-error",
    "tools-call-with-progress", "json-schema-2020-12", "server-sse-multiple-streams", "resources-list",
    "resources-read-text", "resources-read-binary", "resources-templates-read", "sep-2164-resource-not-found",
    "prompts-list", "prompts-get-simple", "prompts-get-with-args", "prompts-get-embedded-resource",
    "prompts-get-with-image", "dns-rebinding-protection", "caching", "http-header-validation",
    "http-custom-header-server-validation",
    *(f"input-required-result-{name}" for name in (
        "basic-elicitation", "basic-sampling", "basic-list-roots", "request-state", "multiple-input-requests",
        "multi-round", "missing-input-response", "non-tool-request", "result-type", "unsupported-methods",
        "tampered-state", "capability-check", "ignore-extra-params", "validate-input",
    )),
}  # fmt: skip


@pytest.mark.skipif(not available(), reason="Node 22 and the conformance suite are not installed (make node)")
@pytest.mark.parametrize(("spec_version", "expected"), [("2025-11-25", SCENARIOS_2025), (MODERN, SCENARIOS_2026)])
def test_conformance_against_fixture(
    upstreams: dict[str, DemoServer], tmp_path: Path, spec_version: str, expected: set[str]
) -> None:
    results = run_conformance_detailed(upstreams["fixture"].url, spec_version, tmp_path, timeout=120)
    failed = {name: result.failures for name, result in results.items() if not result.passed}
    assert expected <= set(results), f"scenarios the suite no longer runs: {expected - set(results)}"
    assert not (expected & failed.keys()), {name: failed[name] for name in expected & failed.keys()}
