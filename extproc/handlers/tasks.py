"""Tasks: task-augmented tools/call and the task methods, routed by sealed task ids (extproc/task_ids.py).

Every task request is answered by the processor itself: it calls the owning upstream through Envoy's internal
listener as the caller (tool_calls.request: the caller's credential, a pooled upstream session per caller), then
puts the client's sealed id where the upstream's id was. Nothing here depends on how many ext_proc messages a
request took: a handler sees one parsed message.

- a 2025-11-25 client (`params.task`) of a 2025-11-25 upstream: tools/call, tasks/get, tasks/result, tasks/cancel
  passed on; tasks/list merged from the caller's own tasks;
- a 2026-07-28 client declaring the extension, of a 2026 extension upstream: tools/call may come back
  `resultType: "task"`; tasks/get, tasks/update, tasks/cancel passed on;
- a 2026-07-28 client declaring the extension, of a 2025-11-25 upstream: a task-required tool is run as a
  2025-11-25 task and shown in the extension's shape (tasks/get inlines the result once it is there).
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from catalog.view import Target, View
from extproc import jsonrpc, task_share
from extproc.edge_tools import ToolContext
from extproc.jsonrpc import INVALID_PARAMS, LEGACY, MODERN, Message, RpcError
from extproc.replies import Local
from extproc.request import Request
from extproc.task_ids import (
    EXTENSION_TASKS,
    LEGACY_TASKS,
    TaskRef,
    modern_task,
    task_support,
    upstream_task_kind,
)
from extproc.tool_calls import request as upstream_request

if TYPE_CHECKING:
    from extproc.gateway import Gateway

RELATED_TASK = "io.modelcontextprotocol/related-task"
LEGACY_TASK_CAPABILITY: dict[str, Any] = {"list": {}, "cancel": {}, "requests": {"tools": {"call": {}}}}
TASK_CLIENT_VERSION = "2025-11-25"
_LIST_PAGES = 20


# ---- who can do what -------------------------------------------------------------------------------------------
def server_kind(gw: Gateway, req: Request, server: str) -> str | None:
    """The task protocol an upstream serves (from what it declared when the gateway last reached it)."""
    snap = gw.fleet.state_for(server, req.caller.subject).snapshot
    if snap is None or not snap.ok:
        return None
    return upstream_task_kind(snap.era == MODERN, snap.capabilities)


def client_declares_extension(msg: Message) -> bool:
    caps = msg.meta.get(jsonrpc.META_CAPABILITIES)
    extensions = caps.get("extensions") if isinstance(caps, dict) else None
    return isinstance(extensions, dict) and EXTENSION_TASKS in extensions


def client_drives_tasks(msg: Message) -> bool:
    """Whether this client can call a task-required tool: a 2025-11-25 client, or a 2026 one declaring the extension
    on this request (the gateway runs the tool as a task for it)."""
    if msg.era == MODERN:
        return client_declares_extension(msg)
    return msg.version == TASK_CLIENT_VERSION


def listed_tools(tools: tuple[dict[str, Any], ...], msg: Message) -> tuple[dict[str, Any], ...]:
    """tools/list for this client: task-required tools only for a client that can call them."""
    if client_drives_tasks(msg):
        return tools
    return tuple(t for t in tools if task_support(t) != "required")


def capabilities(gw: Gateway, req: Request, view: View, era: str, version: str = "") -> dict[str, Any]:
    """What to add to the gateway's capabilities: tasks only as far as some upstream in the caller's view runs them
    (for a handshake-era client, only at the version that has tasks)."""
    kinds = {server_kind(gw, req, s) for s in view.servers}
    if era == LEGACY:
        return {"tasks": LEGACY_TASK_CAPABILITY} if LEGACY_TASKS in kinds and version == TASK_CLIENT_VERSION else {}
    return {"extensions": {EXTENSION_TASKS: {}}} if kinds & {LEGACY_TASKS, EXTENSION_TASKS} else {}


def client_capabilities_upstream(caps: Any) -> dict[str, Any]:
    """A handshake-era client's capabilities as its upstream sessions are told them: without `tasks` (client-hosted
    tasks for sampling and elicitation are not relayed, so upstreams must not create them)."""
    return {k: v for k, v in caps.items() if k != "tasks"} if isinstance(caps, dict) else {}


def wants_task(gw: Gateway, req: Request, msg: Message, target: Target) -> bool:
    """Whether a tools/call goes through the task path (answered here) instead of being forwarded. A 2026 client
    calling a task-required tool without declaring the extension is told which capability it lacks (-32021)."""
    kind = server_kind(gw, req, target.server)
    if msg.era == LEGACY:
        return kind == LEGACY_TASKS and isinstance(msg.params.get("task"), dict)
    required = kind == LEGACY_TASKS and task_support(target.definition) == "required"
    if not client_declares_extension(msg):
        if required:
            raise RpcError(jsonrpc.MISSING_CAPABILITY, f"Tool {msg.params.get('name')} runs only as a task: declare "
                           f"the {EXTENSION_TASKS} extension in the request's client capabilities",
                           {"requiredCapabilities": {"extensions": {EXTENSION_TASKS: {}}}})
        return False
    return kind == EXTENSION_TASKS or required


def must_run_as_task(gw: Gateway, req: Request, target: Target) -> bool:
    """A task-required tool of a 2025-11-25 upstream (run as a task even where a plain result is expected)."""
    return task_support(target.definition) == "required" and server_kind(gw, req, target.server) == LEGACY_TASKS


async def run_to_completion(ctx: ToolContext, server: str, params: dict[str, Any]) -> dict[str, Any]:
    """The CallToolResult of a task-required tool, for callers that want a plain result (the meta-tool call_tool,
    workflow steps): started as a task, its result awaited with tasks/result (bounded by the server's timeout)."""
    created = (await upstream_request(ctx, server, "tools/call", {**params, "task": {}})).get("task")
    task_id = created.get("taskId") if isinstance(created, dict) else None
    if not isinstance(task_id, str):
        raise RpcError(jsonrpc.INTERNAL_ERROR, f"Upstream server '{server}' answered with an invalid response",
                       {"server": server, "details": "no task for a task-augmented call"}, status=502)
    result = await upstream_request(ctx, server, "tasks/result", {"taskId": task_id})
    meta = result.get("_meta")
    if isinstance(meta, dict) and RELATED_TASK in meta:
        result = {**result, "_meta": {k: v for k, v in meta.items() if k != RELATED_TASK}}
    return result


# ---- creating a task -------------------------------------------------------------------------------------------
def _modern_result(gw: Gateway, result: dict[str, Any], result_type: str = "complete") -> dict[str, Any]:
    meta = result.get("_meta")
    meta = meta if isinstance(meta, dict) else {}
    return {**result, "resultType": result.get("resultType", result_type),
            "_meta": {**meta, jsonrpc.META_SERVER_INFO: gw.server_info}}


async def _seal(gw: Gateway, req: Request, server: str, upstream_id: Any, kind: str) -> str:
    if not isinstance(upstream_id, str) or not upstream_id:
        raise RpcError(jsonrpc.INTERNAL_ERROR, f"Upstream server '{server}' answered with an invalid response",
                       {"server": server, "details": "a task without a taskId"}, status=502)
    ref = TaskRef(server, upstream_id, kind, req.caller.key)
    sealed = gw.task_ids.seal(ref)
    await task_share.remember(gw, ref, sealed)
    return sealed


async def call_as_task(gw: Gateway, req: Request, msg: Message, target: Target, upstream_args: dict[str, Any]) -> Local:
    """A tools/call that creates (or may create) a task upstream; the answer carries the sealed id."""
    ctx = ToolContext(gw, req, msg.era)
    kind = server_kind(gw, req, target.server)
    params: dict[str, Any] = {"name": target.original, "arguments": upstream_args}
    if kind == LEGACY_TASKS:
        task = msg.params.get("task")
        params["task"] = task if isinstance(task, dict) else {}
        result = await upstream_request(ctx, target.server, "tools/call", params)
        created = result.get("task")
        if not isinstance(created, dict):
            raise RpcError(jsonrpc.INTERNAL_ERROR, f"Upstream server '{target.server}' answered with an invalid "
                           "response", {"server": target.server, "details": "no task for a task-augmented call"},
                           status=502)
        sealed = await _seal(gw, req, target.server, created.get("taskId"), LEGACY_TASKS)
        if msg.era == LEGACY:
            return Local.result(msg.id, {**result, "task": {**created, "taskId": sealed}})
        return Local.result(msg.id, _modern_result(gw, modern_task(created, sealed), "task"))
    # a 2026 upstream with the extension: the client's declaration goes along (and an input_required retry's
    # inputResponses / requestState); the upstream decides whether this call becomes a task
    caps = msg.meta.get(jsonrpc.META_CAPABILITIES)
    params["_meta"] = {jsonrpc.META_CAPABILITIES: {"extensions": {EXTENSION_TASKS: {}}}} if not isinstance(caps, dict) \
        else {jsonrpc.META_CAPABILITIES: caps}
    params.update({k: msg.params[k] for k in ("inputResponses", "requestState") if k in msg.params})
    result = await upstream_request(ctx, target.server, "tools/call", params)
    if result.get("resultType") == "task":
        result = {**result, "taskId": await _seal(gw, req, target.server, result.get("taskId"), EXTENSION_TASKS)}
    return Local.result(msg.id, _modern_result(gw, result))


# ---- the task methods ------------------------------------------------------------------------------------------
def _ref(gw: Gateway, req: Request, msg: Message) -> tuple[str, TaskRef]:
    task_id = msg.params.get("taskId")
    ref = gw.task_ids.open(task_id, req.caller.key)
    if ref is None or ref.server not in gw.fleet.servers:
        # a foreign, tampered, expired or another caller's id: the same answer as an unknown one
        raise RpcError(INVALID_PARAMS, f"Unknown task: {str(task_id)[:64]}")
    return str(task_id), ref


def _ctx(gw: Gateway, req: Request, msg: Message) -> ToolContext:
    return ToolContext(gw, req, msg.era)


def _upstream_params(msg: Message, ref: TaskRef, *keys: str) -> dict[str, Any]:
    params: dict[str, Any] = {"taskId": ref.upstream_id}
    params.update({k: msg.params[k] for k in keys if k in msg.params})
    return params


async def get_task(gw: Gateway, req: Request, msg: Message) -> Local:
    task_id, ref = _ref(gw, req, msg)
    ctx = _ctx(gw, req, msg)
    if ref.kind == EXTENSION_TASKS:
        if msg.era != MODERN:
            raise RpcError(INVALID_PARAMS, f"Unknown task: {task_id[:64]}")
        result = await upstream_request(ctx, ref.server, "tasks/get", _upstream_params(msg, ref, "requestState"))
        return Local.result(msg.id, _modern_result(gw, {**result, "taskId": task_id}))
    result = await upstream_request(ctx, ref.server, "tasks/get", _upstream_params(msg, ref))
    if msg.era == LEGACY:
        return Local.result(msg.id, {**result, "taskId": task_id})
    task = modern_task(result, task_id)  # bridged: the 2025-11-25 task as the extension shows it
    if task["status"] in ("completed", "failed"):
        try:
            outcome = await upstream_request(ctx, ref.server, "tasks/result", _upstream_params(msg, ref))
            meta = outcome.get("_meta")
            if isinstance(meta, dict):
                outcome = {**outcome, "_meta": {k: v for k, v in meta.items() if k != RELATED_TASK}}
            task["result"] = outcome
            task["status"] = "completed"
        except RpcError as err:
            task.update(status="failed", error={"code": err.code, "message": err.message})
    return Local.result(msg.id, _modern_result(gw, task))


async def task_result(gw: Gateway, req: Request, msg: Message) -> Local:
    if msg.era == MODERN:
        raise RpcError(jsonrpc.METHOD_NOT_FOUND, "Method not found: tasks/result (the tasks extension polls "
                                                 "tasks/get instead)")
    task_id, ref = _ref(gw, req, msg)
    if ref.kind != LEGACY_TASKS:
        raise RpcError(INVALID_PARAMS, f"Unknown task: {task_id[:64]}")
    result = await upstream_request(_ctx(gw, req, msg), ref.server, "tasks/result", _upstream_params(msg, ref))
    meta = result.get("_meta")
    if isinstance(meta, dict) and isinstance(meta.get(RELATED_TASK), dict):
        result = {**result, "_meta": {**meta, RELATED_TASK: {**meta[RELATED_TASK], "taskId": task_id}}}
    return Local.result(msg.id, result)


async def cancel_task(gw: Gateway, req: Request, msg: Message) -> Local:
    task_id, ref = _ref(gw, req, msg)
    ctx = _ctx(gw, req, msg)
    if msg.era == LEGACY:
        if ref.kind != LEGACY_TASKS:
            raise RpcError(INVALID_PARAMS, f"Unknown task: {task_id[:64]}")
        result = await upstream_request(ctx, ref.server, "tasks/cancel", _upstream_params(msg, ref))
        return Local.result(msg.id, {**result, "taskId": task_id})
    keys = ("requestState",) if ref.kind == EXTENSION_TASKS else ()
    try:
        await upstream_request(ctx, ref.server, "tasks/cancel", _upstream_params(msg, ref, *keys))
    except RpcError as err:
        if ref.kind == EXTENSION_TASKS or err.code != INVALID_PARAMS:
            raise
        # a bridged 2025-11-25 task already terminal: the extension acknowledges a cancel regardless
    return Local.result(msg.id, _modern_result(gw, {}))


async def update_task(gw: Gateway, req: Request, msg: Message) -> Local:
    if msg.era != MODERN:
        raise RpcError(jsonrpc.METHOD_NOT_FOUND, "Method not found: tasks/update (the tasks extension, 2026-07-28)")
    _, ref = _ref(gw, req, msg)
    if ref.kind == EXTENSION_TASKS:
        await upstream_request(_ctx(gw, req, msg), ref.server, "tasks/update",
                               _upstream_params(msg, ref, "inputResponses", "requestState"))
    return Local.result(msg.id, _modern_result(gw, {}))


async def _list_server(gw: Gateway, req: Request, msg: Message, server: str,
                       mine: Mapping[str, str]) -> list[tuple[str, dict[str, Any]]]:
    """This caller's tasks on one 2025-11-25 upstream: (sealed id, task) pairs."""
    ctx = _ctx(gw, req, msg)
    snap = gw.fleet.state_for(server, req.caller.subject).snapshot
    tasks_cap = (snap.capabilities or {}).get("tasks") if snap is not None else None
    found: list[tuple[str, dict[str, Any]]] = []
    if isinstance(tasks_cap, dict) and "list" in tasks_cap:
        cursor: Any = None
        for _ in range(_LIST_PAGES):
            page = await upstream_request(ctx, server, "tasks/list", {"cursor": cursor} if cursor else {})
            for task in page.get("tasks") or []:
                if isinstance(task, dict) and task.get("taskId") in mine:
                    found.append((mine[task["taskId"]], task))
            cursor = page.get("nextCursor")
            if not isinstance(cursor, str):
                break
    else:  # no tasks/list upstream: ask for each of the caller's tasks
        async def one(upstream_id: str) -> tuple[str, dict[str, Any]] | None:
            try:
                return mine[upstream_id], await upstream_request(ctx, server, "tasks/get", {"taskId": upstream_id})
            except RpcError:
                return None
        found = [r for r in await asyncio.gather(*(one(u) for u in mine)) if r is not None]
    seen = {sealed for sealed, _ in found}
    for upstream_id, sealed in mine.items():
        if sealed not in seen:  # gone upstream (its TTL ran out): forget it
            await task_share.forget(gw, req.caller.key, server, upstream_id)
    return found


async def list_tasks(gw: Gateway, req: Request, msg: Message) -> Local:
    """The caller's tasks across every upstream, never another caller's (one page, newest first)."""
    if msg.era == MODERN:
        raise RpcError(jsonrpc.METHOD_NOT_FOUND, "Method not found: tasks/list (not part of the tasks extension)")
    if msg.params.get("cursor") not in (None, ""):
        raise RpcError(INVALID_PARAMS, "Invalid cursor: the gateway lists tasks in one page")
    by_server: dict[str, dict[str, str]] = {}
    for (server, upstream_id), sealed in (await task_share.tasks_of(gw, req.caller.key)).items():
        ref = gw.task_ids.open(sealed, req.caller.key)
        if ref is not None and ref.kind == LEGACY_TASKS and server in gw.fleet.servers:
            by_server.setdefault(server, {})[upstream_id] = sealed

    async def safe(server: str, mine: dict[str, str]) -> list[tuple[str, dict[str, Any]]]:
        try:
            return await _list_server(gw, req, msg, server, mine)
        except RpcError:
            return []  # an upstream down now: its tasks are left out of this answer, not the whole list

    pages = await asyncio.gather(*(safe(s, m) for s, m in sorted(by_server.items())))
    tasks = [{**task, "taskId": sealed} for page in pages for sealed, task in page]
    tasks.sort(key=lambda t: str(t.get("createdAt", "")), reverse=True)
    return Local.result(msg.id, {"tasks": tasks})


HANDLERS = {
    "tasks/get": get_task,
    "tasks/result": task_result,
    "tasks/cancel": cancel_task,
    "tasks/update": update_task,
    "tasks/list": list_tasks,
}
