"""Workflow tools at the edge: `workflow_<name>` per admitted Workflow, and the read-only core_workflow_* tools.

Steps run as the caller: each step tool is called with the caller's view, policy, credentials and audit, so a
workflow can never reach what its caller could not reach directly. A workflow whose step tool the caller cannot
reach is listed as unavailable and refuses with Muster's text. Every run is recorded (extproc/executions.py).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import orjson

from catalog.policy import ToolFacts
from catalog.workflow_engine import Execution, Runner, StepCallError, text_result
from catalog.workflows import PREFIX, Workflow, available, missing_tools, step_tools, tool_definition
from extproc import tool_calls
from extproc.core_tools import agent_layer
from extproc.edge_tools import EdgeTool, ToolContext
from extproc.executions import Executions, summary
from extproc.jsonrpc import RpcError

if TYPE_CHECKING:
    from extproc.gateway import Gateway

log = logging.getLogger(__name__)

READ_ONLY = {"readOnlyHint": True, "destructiveHint": False, "idempotentHint": True, "openWorldHint": False}
_NAME_ARG = {"type": "object", "properties": {"name": {"type": "string", "description": "The workflow's name"}},
             "required": ["name"]}

CORE_TOOLS: tuple[dict[str, Any], ...] = (
    {"name": "core_workflow_list", "annotations": READ_ONLY,
     "description": "List the workflows, with whether each is available to you (every step tool reachable).",
     "inputSchema": {"type": "object", "properties": {"include_system": {"type": "boolean", "default": False}}}},
    {"name": "core_workflow_get", "annotations": READ_ONLY, "inputSchema": _NAME_ARG,
     "description": "Get a workflow's definition: arguments, steps, onFailure and output."},
    {"name": "core_workflow_available", "annotations": READ_ONLY, "inputSchema": _NAME_ARG,
     "description": "Whether a workflow is available to you, and which step tools you cannot reach if not."},
    {"name": "core_workflow_execution_list", "annotations": READ_ONLY,
     "description": "List your workflow executions, newest first.",
     "inputSchema": {"type": "object", "properties": {
         "workflow_name": {"type": "string", "description": "Only executions of this workflow"},
         "status": {"type": "string", "description": "inprogress, completed or failed"},
         "limit": {"type": "integer", "default": 50}, "offset": {"type": "integer", "default": 0}}}},
    {"name": "core_workflow_execution_get", "annotations": READ_ONLY,
     "description": "Get one of your workflow executions with its steps' inputs and results.",
     "inputSchema": {"type": "object", "required": ["execution_id"], "properties": {
         "execution_id": {"type": "string"}, "include_steps": {"type": "boolean", "default": True},
         "step_id": {"type": "string", "description": "Only this step"}}}},
)
CORE_TOOL_NAMES = frozenset(t["name"] for t in CORE_TOOLS)

class WorkflowTools:
    """The admitted workflows (swapped on every catalog change), their edge tools, and the records of runs."""

    def __init__(self, gw: Gateway, executions: Executions, timeout_s: float) -> None:
        self.gw = gw
        self.executions = executions
        self.timeout_s = timeout_s
        self.workflows: dict[str, Workflow] = {}
        self._annotated: tuple[Any, ...] = ()
        for definition in CORE_TOOLS:
            gw.edge_tools.register(EdgeTool(definition, self._core_handler(str(definition["name"])), agent_layer))

    def set_workflows(self, flows: Sequence[Workflow]) -> None:
        """Swap in the catalog's workflows; the next tools/list shows the change."""
        new = {w.name: w for w in flows}
        if new == self.workflows:
            return
        self.workflows = new
        self._annotated = ()
        self._refresh()
        log.info("workflows: %s", ", ".join(sorted(new)) or "none")

    def _refresh(self) -> None:
        """(Re)register the workflow tools when the workflows or the fleet's tools (read-only hints) changed."""
        base = self.gw.fleet.view()
        key = (base.fingerprint, id(self.workflows))
        if key == self._annotated:
            return
        self._annotated = key
        tools = []
        for name in sorted(self.workflows):
            wf = self.workflows[name]
            tools.append(EdgeTool(tool_definition(wf, self.read_only(name)), self._run_handler(name),
                                  self._listed, kind="workflow"))
        self.gw.edge_tools.replace("workflow", tools)

    def _listed(self, ctx: ToolContext) -> bool:
        """Every workflow is listed (Muster lists them regardless of availability); keep the hints current."""
        self._refresh()
        return True

    # ---- what a caller can reach -------------------------------------------------------------------------
    def tool_ok(self, ctx: ToolContext) -> Callable[[str], bool]:
        """Whether this caller can reach a tool now: in its own view, or an edge tool it has and may call."""
        def ok(tool: str) -> bool:
            return tool_calls.reachable(ctx, tool)
        return ok

    def read_only(self, name: str, seen: frozenset[str] = frozenset()) -> bool:
        """readOnlyHint of a workflow tool: every step tool is read-only (nested workflows recursively)."""
        wf = self.workflows.get(name)
        if wf is None or name in seen:
            return False
        base = self.gw.fleet.view()
        for tool in step_tools(wf):
            if tool.startswith(PREFIX):
                if not self.read_only(tool[len(PREFIX):], seen | {name}):
                    return False
                continue
            edge = self.gw.edge_tools.get(tool)
            if edge is not None:
                if not ToolFacts(tool, tool, edge.server, "", edge.annotations).read_only:
                    return False
                continue
            route = base.tool_routes.get(tool)
            if route is None or not all(ToolFacts(tool, t.original, t.server, route.family or "",
                                                  t.definition.get("annotations") or {}).read_only
                                        for t in route.targets.values()):
                return False
        return True

    # ---- calls -------------------------------------------------------------------------------------------
    def _run_handler(self, wf_name: str) -> Callable[[ToolContext, dict[str, Any]], Awaitable[dict[str, Any]]]:
        async def handler(ctx: ToolContext, arguments: dict[str, Any]) -> dict[str, Any]:
            return await self.run(ctx, wf_name, arguments)
        return handler

    def _core_handler(self, name: str) -> Callable[[ToolContext, dict[str, Any]], Awaitable[dict[str, Any]]]:
        async def handler(ctx: ToolContext, arguments: dict[str, Any]) -> dict[str, Any]:
            await ctx.gateway.current_view(ctx.request)
            return await self._core(ctx, name, arguments)
        return handler

    async def run(self, ctx: ToolContext, wf_name: str, arguments: dict[str, Any]) -> dict[str, Any]:
        """workflow_<name> called by ctx's caller: refused with Muster's text unless every step tool is
        reachable for this caller; else run, every step as this caller, and recorded."""
        gw, req = ctx.gateway, ctx.request
        await gw.current_view(req)
        if wf_name not in self.workflows:
            return text_result(f"workflow {wf_name} not found", True)
        ok = self.tool_ok(ctx)
        if not available(wf_name, self.workflows, ok):
            missing = missing_tools(wf_name, self.workflows, ok)
            gw.audit(req, tool=PREFIX + wf_name, decision="deny", rule="workflow-unavailable",
                     upstream_tool=",".join(missing))
            return text_result(f"workflow {wf_name} is not available (missing required tools)", True)
        subject = req.caller.subject
        inner = ctx.nested()

        async def step(tool: str, args: dict[str, Any]) -> dict[str, Any]:
            needs_input = StepCallError(f"tool {tool} needs input from the client (elicitation), which a "
                                        "workflow step cannot ask for")
            try:
                result = await tool_calls.call_tool(inner, tool, args)
            except RpcError as err:
                if "elicitation" in err.message:  # the upstream had no way to ask: there is no client to ask
                    raise needs_input from None
                raise StepCallError(err.message) from None
            if result.get("resultType") == "input_required" or "inputRequests" in result:
                raise needs_input
            return result

        async def record(ex: Execution) -> None:
            if ex.status != "inprogress":
                gw.metrics.workflow(ex.workflow if ex.workflow in self.workflows else "other", ex.status,
                                    ex.duration_ms / 1000)
            try:
                await self.executions.put(subject, ex.record())
            except Exception as exc:  # a lost record must not fail the caller's run
                log.warning("workflow %s: execution %s not recorded: %s", ex.workflow, ex.id, exc)

        runner = Runner(self.workflows, step, timeout=self.timeout_s, on_execution=record)
        result, _ = await runner.run(wf_name, arguments)
        return result

    async def _core(self, ctx: ToolContext, name: str, args: Mapping[str, Any]) -> dict[str, Any]:
        req = ctx.request
        if name == "core_workflow_list":
            ok = self.tool_ok(ctx)
            return _json([{"name": w.name, "description": w.description, "available": available(w.name,
                           self.workflows, ok), "steps": len(w.steps), **({"labels": dict(w.labels)} if w.labels
                                                                          else {})}
                          for w in (self.workflows[n] for n in sorted(self.workflows))])
        if name in ("core_workflow_get", "core_workflow_available"):
            wf_name = args.get("name")
            if not isinstance(wf_name, str) or not wf_name:
                return text_result("name argument is required", True)
            wf_name = wf_name.removeprefix(PREFIX)
            wf = self.workflows.get(wf_name)
            if wf is None:
                return text_result(f"workflow {wf_name} not found", True)
            ok = self.tool_ok(ctx)
            is_ok = available(wf_name, self.workflows, ok)
            if name == "core_workflow_available":
                body: dict[str, Any] = {"name": wf_name, "available": is_ok}
                if not is_ok:
                    body["missing_tools"] = missing_tools(wf_name, self.workflows, ok)
                return _json(body)
            return _json({"name": wf.name, **wf.spec, "available": is_ok, "tool": wf.tool_name})
        if name == "core_workflow_execution_list":
            limit, offset = args.get("limit", 50), args.get("offset", 0)
            if not isinstance(limit, int) or isinstance(limit, bool) or limit < 1:
                return text_result("limit must be at least 1", True)
            if not isinstance(offset, int) or isinstance(offset, bool) or offset < 0:
                return text_result("offset must be at least 0", True)
            page, total = await self.executions.list(
                req.caller.subject, workflow=str(args.get("workflow_name") or "").removeprefix(PREFIX),
                status=str(args.get("status") or ""), limit=min(limit, 1000), offset=offset)
            return _json({"executions": [summary(r) for r in page], "total": total, "limit": limit,
                          "offset": offset})
        exec_id = args.get("execution_id")
        if not isinstance(exec_id, str) or not exec_id:
            return text_result("execution_id argument is required", True)
        record = await self.executions.get(req.caller.subject, exec_id)
        if record is None:
            return text_result(f"execution {exec_id} not found", True)
        step_id = args.get("step_id")
        if isinstance(step_id, str) and step_id:
            found = next((s for s in record.get("steps", []) if s.get("step_id") == step_id), None)
            if found is None:
                return text_result(f"step {step_id} not found in execution {exec_id}", True)
            return _json(found)
        if args.get("include_steps") is False:
            record = {k: v for k, v in record.items() if k != "steps"}
        return _json(record)


def _json(value: Any) -> dict[str, Any]:
    return text_result(orjson.dumps(value).decode())


def install(gw: Gateway, executions: Executions) -> WorkflowTools:
    """Register the core_workflow_* tools on the gateway's edge tools; workflows come with set_workflows."""
    tools = WorkflowTools(gw, executions, gw.config.workflows.timeout_s)
    setattr(gw, "_workflow_tools", tools)  # noqa: B010 - the Gateway class stays free of this module
    return tools


def of(gw: Gateway) -> WorkflowTools:
    tools: WorkflowTools = getattr(gw, "_workflow_tools")  # noqa: B009
    return tools

