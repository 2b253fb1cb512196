"""Workflow admission (Muster's schema and rules, one bad manifest refused alone) and the tool it becomes."""

from __future__ import annotations

from typing import Any

import pytest
import yaml

from catalog.manifests import API_VERSION, load_documents
from catalog.workflows import available, input_schema, load_workflows, step_tools, tool_definition


def wf(spec: dict[str, Any], name: str = "flow") -> dict[str, Any]:
    return {"apiVersion": API_VERSION, "kind": "Workflow", "metadata": {"name": name}, "spec": spec}


def load(*docs: Any) -> Any:
    return load_workflows([("flow.yaml", yaml.safe_dump_all(docs, sort_keys=False))])


def refused(spec: dict[str, Any]) -> tuple[str, str]:
    result = load(wf(spec))
    assert result.workflows == ()
    assert len(result.errors) == 1, result.errors
    return result.errors[0].field, result.errors[0].message


STEP = {"id": "a", "tool": "x_srv_get"}


def test_admits_a_full_workflow() -> None:
    result = load(wf({
        "description": "demo", "args": {"ns": {"type": "string", "required": True, "description": "namespace"},
                                        "n": {"type": "integer", "default": 3}},
        "steps": [{"id": "list", "tool": "x_k_list", "args": {"ns": "{{ .input.ns }}"}},
                  {"id": "each", "forEach": {"items": "{{ .results.list.items }}", "as": "pod",
                                             "steps": [{"id": "desc", "tool": "x_k_get"}]}},
                  {"id": "both", "parallel": [{"id": "p1", "tool": "x_a"}, {"id": "p2", "tool": "x_b"}]},
                  {"id": "maybe", "tool": "x_c", "condition": {"fromStep": "list", "expect": {"success": True}}},
                  {"id": "probe", "tool": "x_d", "condition": {"tool": "x_e", "expect_not": {"success": False}},
                   "allow_failure": True}],
        "onFailure": [{"id": "cleanup", "tool": "x_f"}],
        "output": {"count": "{{ len .results.list.items }}"},
    }))
    assert result.errors == ()
    (flow,) = result.workflows
    assert flow.tool_name == "workflow_flow"
    assert flow.steps[4].allow_failure is True
    assert step_tools(flow) == ["x_k_list", "x_k_get", "x_a", "x_b", "x_c", "x_d", "x_e"]
    assert input_schema(flow) == {"type": "object", "required": ["ns"], "properties": {
        "ns": {"type": "string", "description": "namespace"}, "n": {"type": "integer", "default": 3}}}
    tool = tool_definition(flow, read_only=True)
    assert tool["name"] == "workflow_flow" and tool["annotations"]["readOnlyHint"] is True


@pytest.mark.parametrize(("spec", "field", "message"), [
    ({}, "spec.steps", "at least one step is required"),
    ({"steps": [{"tool": "x"}]}, "spec.steps[0].id", "step id is required"),
    ({"steps": [{"id": "a b", "tool": "x"}]}, "spec.steps[0].id", "must match"),
    ({"steps": [{"id": "a" * 64, "tool": "x"}]}, "spec.steps[0].id", "at most 63"),
    ({"steps": [STEP, STEP]}, "spec.steps", "duplicate step id 'a'"),
    ({"steps": [{"id": "a"}]}, "spec.steps[0]", "exactly one of tool, forEach or parallel"),
    ({"steps": [{"id": "a", "tool": "x", "parallel": [STEP]}]}, "spec.steps[0]", "exactly one of tool"),
    ({"steps": [{"id": "a", "parallel": [{"id": "b"}]}]}, "spec.steps[0].parallel[0].tool", "tool is required"),
    ({"steps": [{"id": "a", "forEach": {"steps": [STEP]}}]}, "spec.steps[0].forEach.items", "items is required"),
    ({"steps": [{**STEP, "condition": {"template": "x", "fromStep": "b"}}]}, "spec.steps[0].condition",
     "exactly one of template, tool or fromStep"),
    ({"steps": [{**STEP, "condition": {"fromStep": "b"}}]}, "spec.steps[0].condition",
     "fromStep condition requires expect or expectNot"),
    ({"steps": [{**STEP, "condition": {"tool": "t"}}]}, "spec.steps[0].condition",
     "tool condition requires expect or expectNot"),
    ({"steps": [{**STEP, "args": {"a": "{{ now }}"}}]}, "spec.steps[0].args", 'function "now" not allowed'),
    ({"steps": [STEP], "output": {"a": "{{ .x | sha256sum }}"}}, "spec.output", 'function "sha256sum"'),
    ({"steps": [STEP], "args": {"a": {"type": "text"}}}, "spec.args.a.type", "unsupported value 'text'"),
    ({"steps": [STEP], "args": {"a": {}}}, "spec.args.a.type", "type is required"),
    ({"steps": [STEP], "description": "x" * 1001}, "spec.description", "at most 1000"),
    ({"steps": [{**STEP, "bogus": 1}]}, "spec.steps[0].bogus", "unknown field"),
])
def test_refusals_name_field_and_reason(spec: dict[str, Any], field: str, message: str) -> None:
    got_field, got_message = refused(spec)
    assert got_field == field
    assert message in got_message


def test_a_bad_workflow_is_refused_alone_and_mcpservers_ignore_workflows() -> None:
    text = yaml.safe_dump_all([wf({"steps": [STEP]}, "good"), wf({"steps": []}, "bad"),
                               {"apiVersion": API_VERSION, "kind": "MCPServer", "metadata": {"name": "s"},
                                "spec": {"type": "streamable-http", "url": "https://x.example/mcp"}}])
    flows = load_workflows([("mixed.yaml", text)])
    assert [w.name for w in flows.workflows] == ["good"]
    assert [str(e) for e in flows.errors] == [
        "mixed.yaml[1] (Workflow bad): spec.steps: at least one step is required"]
    servers = load_documents([("mixed.yaml", text)])
    assert servers.errors == () and [s.name for s in servers.servers] == ["s"]


def test_duplicate_workflow_names_keep_the_first() -> None:
    result = load(wf({"steps": [STEP]}), wf({"steps": [STEP]}))
    assert len(result.workflows) == 1 and "duplicate Workflow name" in result.errors[0].message


def test_availability_is_recursive_with_cycle_detection() -> None:
    flows = {w.name: w for w in load(
        wf({"steps": [{"id": "a", "tool": "x_ok"}, {"id": "b", "tool": "workflow_inner"}]}, "outer"),
        wf({"steps": [{"id": "a", "tool": "x_ok"}]}, "inner"),
        wf({"steps": [{"id": "a", "tool": "x_denied"}]}, "denied"),
        wf({"steps": [{"id": "a", "tool": "workflow_loop2"}]}, "loop1"),
        wf({"steps": [{"id": "a", "tool": "workflow_loop1"}]}, "loop2"),
    ).workflows}

    def ok(tool: str) -> bool:
        return tool == "x_ok" or tool.startswith("workflow_")
    assert available("outer", flows, ok) and available("inner", flows, ok)
    assert not available("denied", flows, ok)
    assert not available("loop1", flows, ok)
    assert not available("missing", flows, ok)
    assert not available("outer", flows, lambda t: t == "x_ok")  # the nested workflow's tool is hidden
