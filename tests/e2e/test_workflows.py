"""Workflows through real Envoy, real upstream servers and a real OpenID provider, in both MCP eras.

Each §5.4 feature has its test; the upstream (tests/steps_server.py) counts calls and records concurrency, so
the tests see what really reached it. Two callers (ops, viewer) differ by policy: viewer may not call `write`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx2
import pytest
from mcp.client.client import Client
from mcp.client.streamable_http import streamable_http_client

from tests.e2e.conftest import MODES
from tests.e2e.test_shared_state import start_redis
from tests.gateway_harness import Gateway, start_gateway
from tests.idp import Idp, start_idp
from tests.procs import PYTHON, ROOT, free_port, spawn

MODERN = "2026-07-28"
ACCEPT = {"accept": "application/json, text/event-stream", "content-type": "application/json"}
FAMILY = {"name": "steps", "instanceArg": "member"}
POLICY = {"rules": [{"name": "viewers-read-only", "effect": "deny",
                     "match": {"original": "write", "groups": ["viewers"]}}]}
A = {"member": "steps-a"}


def wf(name: str, spec: dict[str, Any], **meta: Any) -> dict[str, Any]:
    return {"apiVersion": "muster.giantswarm.io/v1alpha1", "kind": "Workflow",
            "metadata": {"name": name, **meta}, "spec": spec}


def echo(step_id: str, value: Any, **extra: Any) -> dict[str, Any]:
    return {"id": step_id, "tool": "x_steps_echo", "args": {**A, "value": value, "label": step_id}, **extra}


WORKFLOWS = [
    wf("typed", {
        "description": "Typed single references",
        "args": {"name": {"type": "string", "required": True}, "n": {"type": "integer", "default": 5},
                 "flag": {"type": "boolean", "default": True}, "obj": {"type": "object", "default": {"k": [1, 2]}}},
        "steps": [echo("num", "{{ .input.n }}"), echo("obj", "{{ .input.obj }}"), echo("flag", "{{ .input.flag }}"),
                  echo("text", "n={{ .input.n }}"), echo("name", "{{ .input.name }}")],
        "output": {"num": "{{ .results.num.type }}", "obj": "{{ .results.obj.type }}",
                   "flag": "{{ .results.flag.type }}", "text": "{{ .results.text.value }}",
                   "obj_value": "{{ .results.obj.value }}"}}),
    wf("conditions", {
        "args": {"mode": {"type": "string", "default": "go"}},
        "steps": [
            {"id": "probe", "tool": "x_steps_fail", "args": A, "allowFailure": True},
            echo("t_yes", 1, condition={"template": '{{ eq .input.mode "go" }}'}),
            echo("t_no", 1, condition={"template": '{{ eq .input.mode "stop" }}'}),
            echo("from_yes", 1, condition={"fromStep": "probe", "expect": {"success": False}}),
            echo("from_no", 1, condition={"fromStep": "probe", "expectNot": {"success": False}}),
            echo("tool_yes", 1, condition={"tool": "x_steps_status", "args": {**A, "phase": "Running"},
                                           "expect": {"success": True, "jsonPath": {"items[0].phase": "Running"}}}),
            echo("tool_no", 1, condition={"tool": "x_steps_status", "args": {**A, "phase": "Pending"},
                                          "expect": {"success": True, "jsonPath": {"items[0].phase": "Running"}}}),
        ]}),
    wf("tolerant", {"steps": [
        {"id": "bad", "tool": "x_steps_fail", "args": {**A, "message": "tolerated"}, "allowFailure": True},
        echo("after", "{{ .results.bad.success }}")],
        "output": {"error": "{{ .results.bad.error }}", "after": "{{ .results.after.value }}"}}),
    wf("fanout", {
        "args": {"members": {"type": "array", "default": ["steps-a", "steps-b"]}},
        "steps": [{"id": "each", "forEach": {"items": "{{ .input.members }}", "as": "m", "steps": [
            {"id": "who", "tool": "x_steps_echo",
             "args": {"member": "{{ .vars.m }}", "value": "{{ .vars.m_index }}"}}]}}],
        "output": {"first": "{{ .results.who_0.server }}", "second": "{{ .results.who_1.server }}",
                   "indexes": ["{{ .results.who_0.value }}", "{{ .results.who_1.value }}"],
                   "count": "{{ len .results.each }}"}}),
    wf("together", {"steps": [{"id": "all", "parallel": [
        {"id": f"s{i}", "tool": "x_steps_slow", "args": {**A, "label": f"s{i}", "ms": 700}} for i in range(3)]}],
        "output": {"labels": ["{{ .results.s0.label }}", "{{ .results.s1.label }}", "{{ .results.s2.label }}"]}}),
    wf("cleanup", {
        "args": {"why": {"type": "string", "default": "test"}},
        "steps": [echo("first", 1), {"id": "bad", "tool": "x_steps_fail", "args": {**A, "message": "step broke"}},
                  echo("never", 1)],
        "onFailure": [echo("undo", "undo {{ .input.why }}")]}),
    wf("shaped", {
        "args": {"who": {"type": "string", "default": "steps"}, "n": {"type": "integer", "default": 3}},
        "steps": [{"id": "list", "tool": "x_steps_items", "args": {**A, "n": "{{ .input.n }}"}}],
        "output": {"names": "{{ .results.list.names }}", "count": "{{ len .results.list.names }}",
                   "text": "{{ .input.who }} has {{ .results.list.count }}", "fixed": 7}}),
    wf("outer", {"steps": [{"id": "in", "tool": "workflow_shaped", "args": {"n": 2, "who": "inner"}}],
                 "output": {"inner_count": "{{ .results.in.count }}", "inner_text": "{{ .results.in.text }}"}}),
    wf("loop-a", {"steps": [{"id": "a", "tool": "workflow_loop-b"}]}),
    wf("loop-b", {"steps": [echo("b", 1), {"id": "back", "tool": "workflow_loop-a"}]}),
    wf("writes", {"steps": [{"id": "w", "tool": "x_steps_write", "args": {**A, "value": "x"}}]}),
    wf("ghost", {"steps": [{"id": "g", "tool": "x_nowhere_tool"}]}),
    wf("asks", {"steps": [{"id": "question", "tool": "x_steps_ask", "args": A}, echo("after_ask", 1)]}),
    wf("stuck", {"steps": [{"id": "wait", "tool": "x_steps_hang", "args": {**A, "seconds": 4}},
                           echo("after_hang", 1)]}),
]


@dataclass
class Setup:
    gateway: Gateway
    idp: Idp
    tokens: dict[str, str]
    upstreams: dict[str, str]


@contextlib.contextmanager
def steps_server(name: str) -> Iterator[str]:
    with spawn([PYTHON, ROOT / "tests" / "steps_server.py", "--port", "0", "--name", name], "READY ", 20) as proc:
        yield proc.ready_line.split(" ", 1)[1]


@contextlib.contextmanager
def stack_for(work: Path, **config: Any) -> Iterator[Setup]:
    listen = f"127.0.0.1:{free_port()}"
    resource = f"http://{listen}/mcp"
    clients: list[dict[str, Any]] = [{"client_id": "ops", "client_secret": "ops-secret", "claims": {"groups": ["ops"]}},
               {"client_id": "viewer", "client_secret": "v-secret", "claims": {"groups": ["viewers"]}}]
    with contextlib.ExitStack() as stack:
        idp = stack.enter_context(start_idp(work / "idp", clients=clients,
                                            resources=[{"audience": resource, "scope": "mcp:tools",
                                                        "accessTokenTTL": 600}]))
        upstreams = {n: stack.enter_context(steps_server(n)) for n in ("steps-a", "steps-b")}
        servers = {n: {"url": u, "family": FAMILY} for n, u in upstreams.items()}
        auth = {"issuer": idp.issuer, "jwksUri": idp.jwks_uri, "audiences": [resource], "resource": resource,
                "requiredScopes": ["mcp:tools"]}
        gateway = stack.enter_context(start_gateway(work / "gw", servers, listen=listen, auth=auth, policy=POLICY,
                                                    listTtlFloorMs=600_000, toolMode="both", **config))
        gateway.write_manifest("workflows.yaml", WORKFLOWS)
        tokens = {c["client_id"]: idp.client_credentials(c["client_id"], c["client_secret"], resource=resource,
                                                         scope="mcp:tools") for c in clients}
        yield Setup(gateway, idp, tokens, upstreams)


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    with stack_for(tmp_path_factory.mktemp("workflows")) as s:
        wait_listed(s, "workflow_stuck")
        yield s


@contextlib.asynccontextmanager
async def connect(s: Setup, who: str = "ops", mode: str = MODERN) -> AsyncIterator[Client]:
    http = httpx2.AsyncClient(headers={"authorization": f"Bearer {s.tokens[who]}"}, timeout=60)
    try:
        async with Client(streamable_http_client(s.gateway.url, http_client=http), mode=mode) as client:
            yield client
    finally:
        await http.aclose()


def post(s: Setup, method: str, params: dict[str, Any], who: str = "ops", timeout: float = 30) -> dict[str, Any]:
    """One modern-era request without a client library (stateless: any worker may answer it)."""
    meta = {"io.modelcontextprotocol/protocolVersion": MODERN, "io.modelcontextprotocol/clientCapabilities": {}}
    body = {"jsonrpc": "2.0", "id": 1, "method": method, "params": {**params, "_meta": meta}}
    headers = {**ACCEPT, "authorization": f"Bearer {s.tokens[who]}", "mcp-protocol-version": MODERN,
               "mcp-method": method}
    if "name" in params:
        headers["mcp-name"] = params["name"]
    member = params.get("arguments", {}).get("member")
    if member:  # the family's instance argument travels as a header too on this wire
        headers["mcp-param-member"] = member
    resp = httpx2.post(s.gateway.url, json=body, headers=headers, timeout=timeout)
    text = resp.text
    if "text/event-stream" in resp.headers.get("content-type", ""):
        text = next(line[5:] for line in text.splitlines() if line.startswith("data:") and '"id"' in line)
    return dict(json.loads(text))


def call(s: Setup, name: str, args: dict[str, Any] | None = None, who: str = "ops") -> dict[str, Any]:
    answer = post(s, "tools/call", {"name": name, "arguments": args or {}}, who)
    assert "result" in answer, answer
    return dict(answer["result"])


def payload(result: dict[str, Any]) -> Any:
    return json.loads(result["content"][0]["text"])


def listed(s: Setup, who: str = "ops") -> dict[str, dict[str, Any]]:
    return {t["name"]: t for t in post(s, "tools/list", {}, who)["result"]["tools"]}


def wait_listed(s: Setup, name: str, present: bool = True) -> None:
    s.gateway.wait_for(lambda: (name in listed(s)) == present, what=f"{name} {'listed' if present else 'gone'}")


def upstream_stats(s: Setup, member: str = "steps-a") -> dict[str, Any]:
    return dict(payload(call(s, "x_steps_stats", {"member": member})))


async def run_as(s: Setup, mode: str, name: str, args: dict[str, Any] | None = None, who: str = "ops") -> Any:
    async with connect(s, who, mode) as client:
        result = await client.call_tool(name, args or {})
    return result


def text_of(result: Any) -> str:
    return str(result.content[0].text)


# ---- the workflow tools ------------------------------------------------------------------------------------

@pytest.mark.parametrize("mode", MODES)
async def test_workflows_are_listed_as_tools_with_their_args(setup: Setup, mode: str) -> None:
    async with connect(setup, "ops", mode) as client:
        tools = {t.name: t for t in (await client.list_tools()).tools}
    typed = tools["workflow_typed"]
    assert typed.input_schema["required"] == ["name"]
    assert typed.input_schema["properties"]["n"] == {"type": "integer", "default": 5}
    assert typed.annotations is not None and typed.annotations.read_only_hint is True
    writes = tools["workflow_writes"]
    assert writes.annotations is not None and writes.annotations.read_only_hint is False
    assert {"core_workflow_list", "core_workflow_get", "core_workflow_available", "core_workflow_execution_list",
            "core_workflow_execution_get"} <= set(tools)
    assert tools["core_workflow_list"].annotations.read_only_hint is True  # type: ignore[union-attr]


@pytest.mark.parametrize("mode", MODES)
async def test_templates_with_typed_single_references(setup: Setup, mode: str) -> None:
    result = await run_as(setup, mode, "workflow_typed", {"name": "web"})
    assert not result.is_error, text_of(result)
    assert json.loads(text_of(result)) == {"num": "number", "obj": "object", "flag": "boolean", "text": "n=5",
                                           "obj_value": {"k": [1, 2]}}


@pytest.mark.parametrize("mode", MODES)
async def test_bad_input_is_refused_before_any_step(setup: Setup, mode: str) -> None:
    before = upstream_stats(setup)["calls"].get("echo", 0)
    missing = await run_as(setup, mode, "workflow_typed", {"n": 1})
    assert missing.is_error and text_of(missing) == "input validation failed: required field 'name' is missing"
    wrong = await run_as(setup, mode, "workflow_typed", {"name": 5})
    assert wrong.is_error and "field 'name' must be of type string" in text_of(wrong)
    assert upstream_stats(setup)["calls"].get("echo", 0) == before


@pytest.mark.parametrize("mode", MODES)
async def test_each_condition_kind(setup: Setup, mode: str) -> None:
    result = await run_as(setup, mode, "workflow_conditions")
    assert not result.is_error, text_of(result)
    out = json.loads(text_of(result))
    status = {s["id"]: s["status"] for s in out["steps"]}
    assert status == {"probe": "failed", "t_yes": "completed", "t_no": "skipped", "from_yes": "completed",
                      "from_no": "skipped", "tool_yes": "completed", "tool_no": "skipped"}
    tools = {s["id"]: s.get("condition_tool") for s in out["steps"] if s["status"] == "skipped"}
    assert tools == {"t_no": "template", "from_no": "from_step:probe", "tool_no": "x_steps_status"}


@pytest.mark.parametrize("mode", MODES)
async def test_allow_failure_records_the_error_and_goes_on(setup: Setup, mode: str) -> None:
    result = await run_as(setup, mode, "workflow_tolerant")
    assert not result.is_error, text_of(result)
    assert json.loads(text_of(result)) == {"error": "Error executing tool fail: tolerated", "after": False}


@pytest.mark.parametrize("mode", MODES)
async def test_for_each_over_family_members(setup: Setup, mode: str) -> None:
    result = await run_as(setup, mode, "workflow_fanout")
    assert not result.is_error, text_of(result)
    assert json.loads(text_of(result)) == {"first": "steps-a", "second": "steps-b", "indexes": [0, 1], "count": 2}


@pytest.mark.parametrize("mode", MODES)
async def test_parallel_steps_are_in_flight_at_once(setup: Setup, mode: str) -> None:
    call(setup, "x_steps_reset", A)
    result = await run_as(setup, mode, "workflow_together")
    assert not result.is_error, text_of(result)
    assert json.loads(text_of(result)) == {"labels": ["s0", "s1", "s2"]}
    assert upstream_stats(setup)["peak"] == 3


@pytest.mark.parametrize("mode", MODES)
async def test_on_failure_runs_after_a_failing_step(setup: Setup, mode: str) -> None:
    before = upstream_stats(setup)["calls"].get("echo", 0)
    result = await run_as(setup, mode, "workflow_cleanup", {"why": mode})
    assert result.is_error and text_of(result) == "Error executing tool fail: step broke"
    assert upstream_stats(setup)["calls"]["echo"] == before + 2  # first, then undo; never "never"
    executions = payload(call(setup, "core_workflow_execution_list", {"workflow_name": "cleanup", "limit": 1}))
    record = payload(call(setup, "core_workflow_execution_get", {"execution_id": executions["executions"][0]["id"]}))
    assert record["status"] == "failed"
    assert [(s["step_id"], s["status"]) for s in record["steps"]] == [
        ("first", "completed"), ("bad", "failed"), ("undo", "completed")]
    assert record["steps"][2]["input"]["value"] == f"undo {mode}"


@pytest.mark.parametrize("mode", MODES)
async def test_output_shaping_keeps_types(setup: Setup, mode: str) -> None:
    result = await run_as(setup, mode, "workflow_shaped")
    assert json.loads(text_of(result)) == {"names": ["item-0", "item-1", "item-2"], "count": 3,
                                           "text": "steps has 3", "fixed": 7}
    debug = json.loads(text_of(await run_as(setup, mode, "workflow_shaped", {"_debug": True})))
    assert debug["status"] == "completed" and debug["output"]["count"] == 3
    assert debug["steps"][0]["result"]["names"] == ["item-0", "item-1", "item-2"]


@pytest.mark.parametrize("mode", MODES)
async def test_nested_workflow(setup: Setup, mode: str) -> None:
    result = await run_as(setup, mode, "workflow_outer")
    assert not result.is_error, text_of(result)
    assert json.loads(text_of(result)) == {"inner_count": 2, "inner_text": "inner has 2"}


@pytest.mark.parametrize("mode", MODES)
async def test_a_cycle_is_unavailable_and_never_runs(setup: Setup, mode: str) -> None:
    before = upstream_stats(setup)["calls"].get("echo", 0)
    result = await run_as(setup, mode, "workflow_loop-a")
    assert result.is_error and text_of(result) == "workflow loop-a is not available (missing required tools)"
    avail = payload(call(setup, "core_workflow_available", {"name": "loop-a"}))
    assert avail == {"name": "loop-a", "available": False, "missing_tools": ["workflow_loop-b"]}
    assert upstream_stats(setup)["calls"].get("echo", 0) == before


@pytest.mark.parametrize("mode", MODES)
async def test_unavailable_workflow_is_listed_and_refuses(setup: Setup, mode: str) -> None:
    async with connect(setup, "ops", mode) as client:
        assert "workflow_ghost" in {t.name for t in (await client.list_tools()).tools}
        result = await client.call_tool("workflow_ghost", {})
    assert result.is_error and text_of(result) == "workflow ghost is not available (missing required tools)"
    flows = {w["name"]: w for w in payload(call(setup, "core_workflow_list"))}
    assert flows["ghost"]["available"] is False and flows["typed"]["available"] is True


async def test_availability_is_per_caller(setup: Setup) -> None:
    for who, expected in (("ops", True), ("viewer", False)):
        flows = {w["name"]: w for w in payload(call(setup, "core_workflow_list", who=who))}
        assert flows["writes"]["available"] is expected, who
        assert "workflow_writes" in listed(setup, who)  # listed regardless of availability, as in Muster
    assert payload(call(setup, "workflow_writes", who="ops"))["written"] == "x"
    refused = call(setup, "workflow_writes", who="viewer")
    assert refused["isError"] and refused["content"][0]["text"] == \
        "workflow writes is not available (missing required tools)"
    # the viewer's own executions are its own: it sees none of ops' runs
    assert payload(call(setup, "core_workflow_execution_list", {"workflow_name": "writes"}, who="viewer")) == \
        {"executions": [], "total": 0, "limit": 50, "offset": 0}


async def test_call_tool_runs_a_workflow_as_the_caller(setup: Setup) -> None:
    envelope = payload(call(setup, "call_tool", {"name": "workflow_shaped", "arguments": {"n": 1}}))
    assert envelope["isError"] is False
    assert json.loads(envelope["content"][0]["text"])["count"] == 1
    refused = payload(call(setup, "call_tool", {"name": "workflow_writes", "arguments": {}}, who="viewer"))
    assert refused["isError"] is True
    assert refused["content"][0]["text"] == "workflow writes is not available (missing required tools)"


async def test_core_workflow_get_and_execution_get(setup: Setup) -> None:
    got = payload(call(setup, "core_workflow_get", {"name": "shaped"}))
    assert got["name"] == "shaped" and got["available"] is True and got["steps"][0]["id"] == "list"
    assert call(setup, "core_workflow_get", {"name": "nope"})["content"][0]["text"] == "workflow nope not found"
    execution_id = payload(call(setup, "workflow_typed", {"name": "x", "_debug": True}))["execution_id"]
    one = payload(call(setup, "core_workflow_execution_get", {"execution_id": execution_id, "step_id": "num"}))
    assert one["step_id"] == "num" and one["input"]["value"] == 5 and one["result"]["type"] == "number"
    missing = call(setup, "core_workflow_execution_get", {"execution_id": "nope"})
    assert missing["isError"] and missing["content"][0]["text"] == "execution nope not found"


async def test_hot_reload_adds_changes_and_removes_a_workflow(setup: Setup) -> None:
    gw = setup.gateway
    gw.write_manifest("extra.yaml", [wf("extra", {"description": "first", "steps": [echo("e", 1)]})])
    wait_listed(setup, "workflow_extra")
    gw.write_manifest("extra.yaml", [wf("extra", {"description": "second", "steps": [echo("e", 1)]})])
    gw.wait_for(lambda: listed(setup)["workflow_extra"]["description"] == "second", what="changed description")
    gw.write_manifest("broken.yaml", [wf("broken", {"steps": [{"id": "x", "tool": "t", "args": {"a": "{{ now }}"}}]})])
    gw.remove_manifest("extra.yaml")
    wait_listed(setup, "workflow_extra", present=False)
    assert "workflow_broken" not in listed(setup)
    assert 'function "now" not allowed' in gw.log()
    gw.remove_manifest("broken.yaml")


async def test_a_cancelled_run_stops_calling_upstream(setup: Setup) -> None:
    before = upstream_stats(setup)
    with pytest.raises(httpx2.TimeoutException):
        post(setup, "tools/call", {"name": "workflow_stuck", "arguments": {}}, timeout=1.5)
    setup.gateway.wait_for(lambda: upstream_stats(setup)["finished"].get("hang", 0) >
                           before["finished"].get("hang", 0), timeout=10, what="the hanging step to end")
    await asyncio.sleep(1.0)
    after = upstream_stats(setup)
    assert after["calls"].get("hang", 0) == before["calls"].get("hang", 0) + 1
    assert after["calls"].get("echo", 0) == before["calls"].get("echo", 0)  # the step after it never ran


@pytest.mark.parametrize("mode", MODES)
async def test_a_step_that_needs_input_fails_naming_the_step(setup: Setup, mode: str) -> None:
    before = upstream_stats(setup)["calls"].get("echo", 0)
    result = await run_as(setup, mode, "workflow_asks")
    assert result.is_error and text_of(result).startswith("step question failed:"), text_of(result)
    assert "x_steps_ask needs input from the client (elicitation)" in text_of(result)
    assert upstream_stats(setup)["calls"].get("echo", 0) == before


# ---- executions shared through Redis ------------------------------------------------------------------------

def test_an_execution_is_read_back_from_another_worker(tmp_path: Path) -> None:
    with contextlib.ExitStack() as stack:
        url = stack.enter_context(start_redis(tmp_path))
        s = stack.enter_context(stack_for(tmp_path, processor={"workers": 2}, store={"redis": url}))
        wait_listed(s, "workflow_shaped")
        # listed by one worker; the other may not have polled the folder yet: asked for a name it does not know,
        # it reads the change first (no retry here)
        execution_id = payload(call(s, "workflow_shaped", {"_debug": True}))["execution_id"]
        status_port = int(s.gateway.status_url.rsplit(":", 1)[1].split("/")[0])
        before = [served(status_port + w) for w in (0, 1)]
        after = before
        for _ in range(60):  # stateless calls: Envoy spreads them over both workers; go on until both answered
            record = payload(call(s, "core_workflow_execution_get", {"execution_id": execution_id}))
            assert record["id"] == execution_id and record["status"] == "completed"
            after = [served(status_port + w) for w in (0, 1)]
            if all(a > b for a, b in zip(after, before, strict=True)):
                break
        assert all(a > b for a, b in zip(after, before, strict=True)), (before, after)
        import redis
        raw = redis.Redis.from_url(url).get(f"muster-edge:wfexec:{execution_id}")
        assert raw is not None and b"item-0" not in raw  # sealed


def served(status_port: int) -> int:
    """Tool calls one worker answered (its own metrics)."""
    text = httpx2.get(f"http://127.0.0.1:{status_port}/metrics", timeout=5).text
    total = 0
    for line in text.splitlines():
        if line.startswith("muster_edge_requests_total{") and 'method="tools/call"' in line:
            total += int(float(line.rsplit(" ", 1)[1]))
    return total


def test_workflow_manifests_in_the_demo_are_admitted() -> None:
    from extproc.catalog_files import read_catalog
    result = read_catalog(str(ROOT / "deploy" / "demo" / "catalog"))
    assert {w.name for w in result.workflows} >= {"investigate-alerts", "fleet-pods"}
    assert [str(e) for e in result.errors] == []


def test_a_workflow_just_written_to_the_catalog_runs_before_the_next_poll(setup: Setup) -> None:
    """A worker polls the catalog folder every 0.5 s; asked for a tool it does not know, it reads a change it has
    not polled yet instead of refusing a name its sibling workers may already list."""
    setup.gateway.write_manifest("late.yaml", [wf("late", {"steps": [echo("once", "late-value")]})])
    try:
        result = call(setup, "workflow_late")  # at once: no wait for the poll
        assert not result.get("isError"), result
        assert "late-value" in json.dumps(result)
    finally:
        setup.gateway.remove_manifest("late.yaml")
        wait_listed(setup, "workflow_late", present=False)
