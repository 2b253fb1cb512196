"""ExecuteWorkflow semantics (§5.4) against an injected call function."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
import yaml

from catalog.manifests import API_VERSION
from catalog.workflow_engine import Runner, StepCallError, text_result
from catalog.workflows import Workflow, load_workflows


def flows(*specs: tuple[str, dict[str, Any]]) -> dict[str, Workflow]:
    docs = [{"apiVersion": API_VERSION, "kind": "Workflow", "metadata": {"name": n}, "spec": s} for n, s in specs]
    result = load_workflows([("f.yaml", yaml.safe_dump_all(docs))])
    assert result.errors == (), result.errors
    return {w.name: w for w in result.workflows}


class Fake:
    def __init__(self, answers: dict[str, Any] | None = None) -> None:
        self.answers = answers or {}
        self.calls: list[tuple[str, dict[str, Any]]] = []
        self.in_flight = 0
        self.peak = 0

    async def __call__(self, tool: str, args: dict[str, Any]) -> dict[str, Any]:
        self.calls.append((tool, args))
        self.in_flight += 1
        self.peak = max(self.peak, self.in_flight)
        try:
            await asyncio.sleep(0.01)
            answer = self.answers.get(tool, {"echo": args})
            if isinstance(answer, Exception):
                raise answer
            if callable(answer):
                return answer(args)  # type: ignore[no-any-return]
            return answer if "content" in answer else text_result(answer)
        finally:
            self.in_flight -= 1


def body(result: dict[str, Any]) -> Any:
    return json.loads(result["content"][0]["text"])


async def run(wfs: dict[str, Workflow], fake: Fake, name: str, args: dict[str, Any] | None = None) -> Any:
    result, _ = await Runner(wfs, fake).run(name, args or {})
    return result


async def test_input_defaults_required_and_types() -> None:
    wfs = flows(("f", {"args": {"ns": {"type": "string", "required": True}, "n": {"type": "integer", "default": 2}},
                       "steps": [{"id": "a", "tool": "x_t", "args": {"ns": "{{ .input.ns }}", "n": "{{ .input.n }}",
                                                                      "s": "n={{ .input.n }}"}}]}))
    fake = Fake()
    r = await run(wfs, fake, "f", {"ns": "default", "extra": 1, "_debug": False})
    assert fake.calls == [("x_t", {"ns": "default", "n": 2, "s": "n=2"})]
    out = body(r)
    assert out["status"] == "completed" and out["input"] == {"ns": "default", "extra": 1, "n": 2}
    assert out["echo"] == {"ns": "default", "n": 2, "s": "n=2"}  # last plain step's object merged
    r = await run(wfs, fake, "f", {})
    assert r["isError"] and r["content"][0]["text"] == "input validation failed: required field 'ns' is missing"
    r = await run(wfs, fake, "f", {"ns": 5})
    assert r["isError"] and "field 'ns' must be of type string" in r["content"][0]["text"]
    r = await run(wfs, fake, "nope", {})
    assert r["content"][0]["text"] == "workflow nope not found"


async def test_conditions_of_each_kind() -> None:
    wfs = flows(("f", {"steps": [
        {"id": "probe", "tool": "x_fail", "allowFailure": True},
        {"id": "t_yes", "tool": "x_t", "condition": {"template": '{{ eq .input.mode "a" }}'}},
        {"id": "t_no", "tool": "x_t", "condition": {"template": '{{ eq .input.mode "b" }}'}},
        {"id": "from_ok", "tool": "x_t", "condition": {"fromStep": "probe", "expect": {"success": False}}},
        {"id": "from_not", "tool": "x_t", "condition": {"fromStep": "probe", "expectNot": {"success": False}}},
        {"id": "tool_path", "tool": "x_t", "condition": {"tool": "x_status", "args": {"q": "{{ .input.mode }}"},
                                                          "expect": {"success": True,
                                                                     "jsonPath": {"items[0].phase": "Running"}}}},
        {"id": "tool_err", "tool": "x_t", "condition": {"tool": "x_gone", "expect": {"success": True}}},
    ]}))
    fake = Fake({"x_fail": text_result("boom", True), "x_status": {"items": [{"phase": "Running"}]},
                 "x_gone": StepCallError("unknown tool")})
    out = body(await run(wfs, fake, "f", {"mode": "a"}))
    status = {s["id"]: s["status"] for s in out["steps"]}
    assert status == {"probe": "failed", "t_yes": "completed", "t_no": "skipped", "from_ok": "completed",
                      "from_not": "skipped", "tool_path": "completed", "tool_err": "skipped"}
    skipped = next(s for s in out["steps"] if s["id"] == "from_not")
    assert skipped["condition_result"] is False and skipped["condition_tool"] == "from_step:probe"
    assert ("x_status", {"q": "a"}) in fake.calls


async def test_failure_stops_runs_on_failure_and_returns_the_error() -> None:
    wfs = flows(("f", {"steps": [{"id": "a", "tool": "x_fail"}, {"id": "b", "tool": "x_never"}],
                       "onFailure": [{"id": "cleanup", "tool": "x_cleanup", "args": {"why": "{{ .results.a }}"}}]}))
    fake = Fake({"x_fail": text_result("boom", True)})
    result, ex = await Runner(wfs, fake).run("f", {})
    assert result["isError"] and result["content"][0]["text"] == "boom"
    assert [c[0] for c in fake.calls] == ["x_fail", "x_cleanup"]
    assert ex is not None and ex.status == "failed"


async def test_for_each_binds_vars_and_indexed_results() -> None:
    wfs = flows(("f", {"steps": [
        {"id": "list", "tool": "x_list"},
        {"id": "each", "forEach": {"items": "{{ .results.list.names }}", "as": "srv", "steps": [
            {"id": "get", "tool": "x_get", "args": {"name": "{{ .vars.srv }}", "i": "{{ .vars.srv_index }}"}}]}},
    ], "output": {"first": "{{ .results.get_0.echo.name }}", "n": "{{ len .results.each }}"}}))
    fake = Fake({"x_list": {"names": ["a", "b", "c"]}})
    out = body(await run(wfs, fake, "f"))
    assert out == {"first": "a", "n": 3}
    assert fake.calls[1:] == [("x_get", {"name": n, "i": i}) for i, n in enumerate("abc")]


async def test_parallel_is_concurrent_and_isolated() -> None:
    wfs = flows(("f", {"steps": [{"id": "p", "parallel": [
        {"id": "a", "tool": "x_a"}, {"id": "b", "tool": "x_b"}, {"id": "c", "tool": "x_c"}]}],
        "output": {"a": "{{ .results.a.echo }}", "b": "{{ .results.p.b.echo }}"}}))
    fake = Fake()
    out = body(await run(wfs, fake, "f"))
    assert fake.peak == 3
    assert out == {"a": {}, "b": {}}


async def test_nested_and_cycles() -> None:
    wfs = flows(("outer", {"steps": [{"id": "in", "tool": "workflow_inner", "args": {"v": 7}}],
                           "output": {"got": "{{ .results.in.v }}"}}),
                ("inner", {"args": {"v": {"type": "integer"}}, "steps": [{"id": "a", "tool": "x_t"}],
                           "output": {"v": "{{ .input.v }}"}}),
                ("loop1", {"steps": [{"id": "a", "tool": "workflow_loop2"}]}),
                ("loop2", {"steps": [{"id": "a", "tool": "workflow_loop1"}]}))
    assert body(await run(wfs, Fake(), "outer")) == {"got": 7}
    r = await run(wfs, Fake(), "loop1")
    assert r["isError"] and "workflow cycle detected: loop1 -> loop2 -> loop1" in r["content"][0]["text"]


async def test_debug_shows_every_result_and_output_errors_are_reported() -> None:
    wfs = flows(("f", {"steps": [{"id": "a", "tool": "x_t"}], "output": {"x": "{{ .results.a.echo }}"}}),
                ("bad", {"steps": [{"id": "a", "tool": "x_t"}], "output": {"x": "{{ .results.zz }}"}}))
    out = body(await run(wfs, Fake(), "f", {"_debug": True}))
    assert out["output"] == {"x": {}} and out["steps"][0]["result"] == {"echo": {}}
    r = await run(wfs, Fake(), "bad")
    assert r["isError"] and 'no entry for key "zz"' in body(r)["output_error"]


async def test_timeout_and_cancellation_stop_the_run() -> None:
    wfs = flows(("f", {"steps": [{"id": "a", "tool": "x_slow"}, {"id": "b", "tool": "x_t"}]}))

    async def slow(tool: str, args: dict[str, Any]) -> dict[str, Any]:
        calls.append(tool)
        await asyncio.sleep(10)
        return text_result({})
    calls: list[str] = []
    records: list[Any] = []

    async def keep(ex: Any) -> None:
        records.append(ex.record())
    result, _ = await Runner(wfs, slow, timeout=0.05, on_execution=keep).run("f", {})
    assert result["isError"] and "timed out" in result["content"][0]["text"]
    assert records[-1]["status"] == "failed" and records[-1]["error"] == "timed out after 0.05s"
    task = asyncio.ensure_future(Runner(wfs, slow, on_execution=keep).run("f", {}))
    await asyncio.sleep(0.05)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert calls == ["x_slow", "x_slow"]
    assert records[-1]["error"] == "cancelled" and [st["step_id"] for st in records[-1]["steps"]] == ["a"]
