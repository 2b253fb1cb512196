"""Running a Workflow the way Muster's ExecuteWorkflow does (§5.4), with tool calls injected.

Pure and async: `call(tool, args)` is given by the caller (in the gateway: the tool as this caller, through
Envoy) and returns an MCP CallToolResult dict, or raises StepCallError for what Muster calls a Go error
(transport, unknown or denied tool, a step that needs the client's input). Nested `workflow_*` steps run here,
with the chain of running workflows, so a cycle is an error rather than a hang. Every run yields an execution
record (the shape core_workflow_execution_get returns).
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import json
import re
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from catalog import templates
from catalog.templates import TemplateError
from catalog.workflows import PREFIX, Condition, Expect, Step, Workflow

Call = Callable[[str, dict[str, Any]], Awaitable[dict[str, Any]]]


class StepCallError(Exception):
    """A step's tool could not be called at all (Muster's Go error, as opposed to an isError result)."""


class WorkflowError(Exception):
    """The run stopped; str() is the text the caller sees."""


def _now() -> str:
    return datetime.now(UTC).isoformat().replace("+00:00", "Z")


def text_result(payload: Any, is_error: bool = False) -> dict[str, Any]:
    text = payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)
    return {"content": [{"type": "text", "text": text}], "isError": is_error}


def parse_result(result: Mapping[str, Any]) -> Any:
    """Muster's step result: the first content item if it is text, JSON-parsed when possible."""
    content = result.get("content") or []
    if not content or not isinstance(content[0], Mapping) or content[0].get("type") != "text":
        return None
    text = content[0].get("text", "")
    try:
        return json.loads(text)
    except (ValueError, TypeError):
        return text


def _result_text(result: Mapping[str, Any]) -> str:
    parts = [c.get("text", "") for c in result.get("content") or [] if isinstance(c, Mapping)
             and c.get("type") == "text"]
    return "\n".join(parts)


def validate_input(wf: Workflow, args: Mapping[str, Any]) -> dict[str, Any]:
    """§5.4 step 2: required fields, defaults, types; extra args are kept."""
    out = dict(args)
    for a in wf.args:
        if a.name not in out or out[a.name] is None:
            if a.required:
                raise WorkflowError(f"input validation failed: required field '{a.name}' is missing")
            if a.has_default:
                out[a.name] = copy.deepcopy(a.default)
            continue
        v = out[a.name]
        ok = {
            "string": isinstance(v, str),
            "number": isinstance(v, int | float) and not isinstance(v, bool),
            "integer": isinstance(v, int | float) and not isinstance(v, bool),
            "boolean": isinstance(v, bool),
            "array": isinstance(v, list),
            "object": isinstance(v, dict),
        }.get(a.type, True)
        if not ok:
            raise WorkflowError(f"input validation failed: field '{a.name}' must be of type {a.type}")
    return out


_INDEX = re.compile(r"([^.\[\]]+)|\[(\d+)\]")


def json_path(value: Any, path: str) -> tuple[bool, Any]:
    """§5.4 step 7: dotted paths with [n] indexes, or a whole template rooted at `.result`."""
    if templates.is_template(path):
        try:
            return True, templates.render_output(path, {"result": value})
        except TemplateError:
            return False, None
    for m in _INDEX.finditer(path):
        key, idx = m.group(1), m.group(2)
        if key is not None:
            if not isinstance(value, Mapping) or key not in value:
                return False, None
            value = value[key]
        else:
            i = int(idx)
            if not isinstance(value, list) or i >= len(value):
                return False, None
            value = value[i]
    return True, value


def _same(a: Any, b: Any) -> bool:
    num = (int, float)
    if isinstance(a, num) and isinstance(b, num) and not isinstance(a, bool) and not isinstance(b, bool):
        return float(a) == float(b)
    return bool(a == b)


def _expect_met(expect: Expect, is_error: bool, value: Any) -> bool:
    if expect.success is not None and (not is_error) != expect.success:
        return False
    for path, want in expect.json_path.items():
        found, got = json_path(value, path)
        if not found or not _same(got, want):
            return False
    return True


@dataclass
class StepRecord:
    """One executed (or skipped) step; `result` is every step's parsed result, shown only where allowed."""

    id: str
    tool: str
    status: str = "pending"
    args: Any = None
    result: Any = None
    error: str = ""
    allow_failure: bool = False
    keeps_result: bool = False
    condition: dict[str, Any] = field(default_factory=dict)
    started_at: str = ""
    completed_at: str = ""
    duration_ms: int = 0

    def summary(self, debug: bool) -> dict[str, Any]:
        out: dict[str, Any] = {"id": self.id, "tool": self.tool, "status": self.status}
        out.update(self.condition)
        if self.allow_failure:
            out["allow_failure"] = True
        if (self.keeps_result or debug) and self.result is not None:
            out["result"] = self.result
        if self.error:
            out["error"] = self.error
        return out

    def record(self) -> dict[str, Any]:
        out: dict[str, Any] = {"step_id": self.id, "tool": self.tool, "status": self.status,
                               "started_at": self.started_at, "completed_at": self.completed_at,
                               "duration_ms": self.duration_ms, "input": self.args}
        if self.result is not None:
            out["result"] = self.result
        if self.error:
            out["error"] = self.error
        out.update(self.condition)
        return out


@dataclass
class Execution:
    """What core_workflow_execution_get shows, and the tool result the caller got."""

    id: str
    workflow: str
    input: dict[str, Any]
    status: str = "inprogress"
    started_at: str = field(default_factory=_now)
    completed_at: str = ""
    duration_ms: int = 0
    steps: list[StepRecord] = field(default_factory=list)
    error: str = ""
    response: dict[str, Any] = field(default_factory=dict)

    def record(self) -> dict[str, Any]:
        out: dict[str, Any] = {"id": self.id, "workflow_name": self.workflow, "status": self.status,
                               "started_at": self.started_at, "input": self.input,
                               "steps": [s.record() for s in self.steps]}
        if self.completed_at:
            out["completed_at"] = self.completed_at
            out["duration_ms"] = self.duration_ms
        if self.response:
            out["result"] = parse_result(self.response)
        if self.error:
            out["error"] = self.error
        return out


class _Fail(Exception):
    """A step failed and was not allowed to: the run stops (after onFailure)."""

    def __init__(self, message: str, result: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.result = result


class Runner:
    """Runs workflows by name against one caller's `call`; nested runs share it and the chain."""

    def __init__(self, workflows: Mapping[str, Workflow], call: Call, *, timeout: float = 60.0,
                 on_execution: Callable[[Execution], Awaitable[None]] | None = None) -> None:
        self.workflows = workflows
        self.call = call
        self.timeout = timeout
        self.on_execution = on_execution
        self._deadline = float("inf")

    async def run(self, name: str, args: Mapping[str, Any] | None) -> tuple[dict[str, Any], Execution | None]:
        """The tool result of `workflow_<name>` and its execution record (None when refused before running)."""
        self._deadline = time.monotonic() + self.timeout
        try:
            return await asyncio.wait_for(self._run(name, dict(args or {}), ()), self.timeout)
        except TimeoutError:
            return text_result(f"workflow {name} timed out after {self.timeout:g}s", True), None

    async def _run(self, name: str, args: dict[str, Any], chain: tuple[str, ...]
                   ) -> tuple[dict[str, Any], Execution | None]:
        wf = self.workflows.get(name)
        if wf is None:
            return text_result(f"workflow {name} not found", True), None
        if name in chain:
            raise StepCallError("workflow cycle detected: " + " -> ".join((*chain, name)))
        debug_raw = args.pop("_debug", False)
        debug = debug_raw is True or debug_raw == "true"
        try:
            inputs = validate_input(wf, args)
        except WorkflowError as exc:
            return text_result(str(exc), True), None
        ex = Execution(id=str(uuid.uuid4()), workflow=name, input=inputs)
        t0 = time.monotonic()
        ctx: dict[str, Any] = {"input": inputs, "results": {}, "vars": {}}
        ctx["context"] = ctx["results"]
        failure: _Fail | None = None
        try:
            for step in wf.steps:
                await self._step(step, ctx, ex, (*chain, name), allow=step.allow_failure)
        except _Fail as fail:
            failure = fail
            for sub in wf.on_failure:
                with contextlib.suppress(_Fail):
                    await self._step(sub, ctx, ex, (*chain, name), allow=True)
        except asyncio.CancelledError:
            timed_out = time.monotonic() >= self._deadline - 0.01
            ex.status, ex.error = "failed", f"timed out after {self.timeout:g}s" if timed_out else "cancelled"
            await self._finish(ex, t0)
            raise
        ex.status = "failed" if failure else "completed"
        if failure:
            ex.error = failure.message
            ex.response = failure.result or text_result(failure.message, True)
        else:
            ex.response = self._response(wf, ex, ctx, debug)
        await self._finish(ex, t0)
        return ex.response, ex

    async def _finish(self, ex: Execution, t0: float) -> None:
        ex.completed_at = _now()
        ex.duration_ms = int((time.monotonic() - t0) * 1000)
        if self.on_execution is not None:
            await asyncio.shield(self.on_execution(ex))

    def _response(self, wf: Workflow, ex: Execution, ctx: dict[str, Any], debug: bool) -> dict[str, Any]:
        full: dict[str, Any] = {"execution_id": ex.id, "workflow": wf.name, "status": ex.status,
                                "input": ex.input, "steps": [s.summary(debug) for s in ex.steps],
                                "template_vars": sorted(ctx["results"])}
        if wf.output is not None:
            try:
                shaped = templates.render_output(wf.output, ctx)
            except TemplateError as exc:
                full["output_error"] = str(exc)
                return text_result(full, True)
            if debug:
                full["output"] = shaped
                return text_result(full)
            return text_result(shaped)
        last = wf.steps[-1]
        rec = next((s for s in reversed(ex.steps) if s.id == last.id), None)
        if (last.tool and not last.keeps_result and rec is not None and rec.status == "completed"
                and isinstance(rec.result, dict)):
            full.update(rec.result)
        return text_result(full)

    # ---- steps ----

    async def _condition(self, cond: Condition, ctx: dict[str, Any], chain: tuple[str, ...]
                         ) -> tuple[bool, str]:
        if cond.template:
            rendered = templates.render_arg(cond.template, ctx)
            return rendered is True or rendered == "true", "template"
        if cond.from_step:
            label = f"from_step:{cond.from_step}"
            value = ctx["results"].get(cond.from_step)
            is_error = isinstance(value, Mapping) and bool(value.get("isError"))
        else:
            label = cond.tool
            try:
                result = await self._call(cond.tool, templates.render_args(cond.args or {}, ctx), chain)
            except StepCallError:
                return False, label
            value, is_error = parse_result(result), bool(result.get("isError"))
        if cond.expect_not is not None:
            return not _expect_met(cond.expect_not, is_error, value), label
        return _expect_met(cond.expect or Expect(success=False), is_error, value), label

    async def _call(self, tool: str, args: dict[str, Any], chain: tuple[str, ...]) -> dict[str, Any]:
        if tool.startswith(PREFIX) and tool[len(PREFIX):] in self.workflows:
            result, _ = await self._run(tool[len(PREFIX):], dict(args), chain)
            return result
        return await self.call(tool, args)

    async def _step(self, step: Step, ctx: dict[str, Any], ex: Execution, chain: tuple[str, ...],
                    allow: bool) -> None:
        rec = StepRecord(id=step.id, tool=step.tool or ("forEach" if step.for_each else "parallel"),
                         allow_failure=allow, keeps_result=step.keeps_result, started_at=_now())
        ex.steps.append(rec)
        t0 = time.monotonic()
        try:
            await self._step_body(step, rec, ctx, ex, chain, allow)
        finally:
            rec.completed_at = _now()
            rec.duration_ms = int((time.monotonic() - t0) * 1000)

    async def _step_body(self, step: Step, rec: StepRecord, ctx: dict[str, Any], ex: Execution,
                         chain: tuple[str, ...], allow: bool) -> None:
        if step.condition is not None:
            try:
                passed, label = await self._condition(step.condition, ctx, chain)
            except TemplateError as exc:
                self._failed(rec, ctx, f"step {step.id} condition: {exc}", allow)
                return
            rec.condition = {"condition_evaluation": True, "condition_result": passed, "condition_tool": label}
            if not passed:
                rec.status = "skipped"
                return
        if step.for_each is not None:
            await self._for_each(step, rec, ctx, ex, chain, allow)
            return
        if step.parallel:
            await self._parallel(step, rec, ctx, ex, chain, allow)
            return
        try:
            rec.args = templates.render_args(step.args or {}, ctx)
        except TemplateError as exc:
            self._failed(rec, ctx, f"step {step.id}: {exc}", allow)
            return
        rec.status = "running"
        try:
            result = await self._call(step.tool, rec.args, chain)
        except StepCallError as exc:
            self._failed(rec, ctx, f"step {step.id} failed: {exc}", allow, go_error=True)
            return
        rec.result = parse_result(result)
        ctx["results"][step.id] = rec.result
        if result.get("isError"):
            text = _result_text(result)
            rec.status = "failed"
            rec.error = text
            if allow:
                rec.result = {"success": False, "isError": True, "error": text}
                ctx["results"][step.id] = rec.result
                return
            raise _Fail(text, {"content": list(result.get("content") or []), "isError": True})
        rec.status = "completed"

    def _failed(self, rec: StepRecord, ctx: dict[str, Any], message: str, allow: bool,
                go_error: bool = False) -> None:
        rec.status = "failed"
        rec.error = message
        rec.result = {"error": message, "success": False, "isError": True}
        ctx["results"][rec.id] = rec.result
        if not allow:
            raise _Fail(message)

    async def _for_each(self, step: Step, rec: StepRecord, ctx: dict[str, Any], ex: Execution,
                        chain: tuple[str, ...], allow: bool) -> None:
        fe = step.for_each
        assert fe is not None
        try:
            items = templates.render_output(fe.items, ctx)
        except TemplateError as exc:
            self._failed(rec, ctx, f"step {step.id}: forEach items: {exc}", allow)
            return
        if isinstance(items, str):
            with contextlib.suppress(ValueError):
                items = json.loads(items)
        if not isinstance(items, list):
            self._failed(rec, ctx, f"step {step.id}: forEach items must be an array", allow)
            return
        rec.status = "running"
        collected: list[dict[str, Any]] = []
        saved = dict(ctx["vars"])
        try:
            for i, item in enumerate(items):
                ctx["vars"][fe.as_] = item
                ctx["vars"][f"{fe.as_}_index"] = i
                one: dict[str, Any] = {}
                collected.append(one)
                for sub in fe.steps:
                    before = len(ex.steps)
                    await self._step(sub, ctx, ex, chain, allow=sub.allow_failure)
                    for r in ex.steps[before:]:
                        if r.id == sub.id:
                            one[sub.id] = r.result
                            ctx["results"][f"{sub.id}_{i}"] = r.result
        except _Fail as fail:
            rec.result = collected
            ctx["results"][step.id] = collected
            self._failed(rec, ctx, f"step {step.id} failed: {fail.message}", allow)
            return
        finally:
            ctx["vars"].clear()
            ctx["vars"].update(saved)
        rec.status = "completed"
        rec.result = collected
        ctx["results"][step.id] = collected

    async def _parallel(self, step: Step, rec: StepRecord, ctx: dict[str, Any], ex: Execution,
                        chain: tuple[str, ...], allow: bool) -> None:
        rec.status = "running"

        async def one(sub: Step) -> tuple[Execution, dict[str, Any], _Fail | None]:
            # Each branch sees a snapshot of the results so far; siblings cannot see each other.
            mine = Execution(id=ex.id, workflow=ex.workflow, input=ex.input)
            snap = {"input": ctx["input"], "results": dict(ctx["results"]), "vars": dict(ctx["vars"])}
            snap["context"] = snap["results"]
            try:
                await self._step(sub, snap, mine, chain, allow=sub.allow_failure)
            except _Fail as fail:
                return mine, snap, fail
            return mine, snap, None

        outcomes = await asyncio.gather(*(one(sub) for sub in step.parallel))
        first: _Fail | None = None
        merged: dict[str, Any] = {}
        for sub, (mine, snap, fail) in zip(step.parallel, outcomes, strict=True):
            ex.steps.extend(mine.steps)
            if sub.id in snap["results"]:
                ctx["results"][sub.id] = snap["results"][sub.id]
                merged[sub.id] = snap["results"][sub.id]
            if fail is not None and first is None:
                first = fail
        rec.result = merged
        ctx["results"][step.id] = merged
        if first is not None:
            self._failed(rec, ctx, f"step {step.id} failed: {first.message}", allow)
            return
        rec.status = "completed"
