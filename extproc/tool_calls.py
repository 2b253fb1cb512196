"""Call a tool as this caller: what `call_tool` and workflow steps use.

Edge tools run in-process; backend and family tools go through Envoy's internal listener (like the fleet's own
list fetches) with the caller's credential. The policy decision, the audit line and the refusal texts are the
native tools/call's own (handlers/calls.resolve_call), so a tool denied natively is denied here too. Each upstream
call is bounded by its server's timeout. Free of ext_proc/gRPC types: the workflow engine calls `call_tool`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import httpx2
import orjson

from catalog.manifests import MCPServer
from extproc import jsonrpc, schema_retry
from extproc.credentials import CredentialError
from extproc.edge_tools import EdgeTool, ToolContext
from extproc.hop import Hop, HopError
from extproc.jsonrpc import INVALID_PARAMS, MODERN, Message, RpcError
from extproc.replies import Local
from extproc.rewrite import _map_uris as map_uris
from extproc.upstream import CLIENT_INFO, Handshake, UpstreamAuthError, UpstreamClient, UpstreamError, UpstreamRpcError

if TYPE_CHECKING:
    from extproc.gateway import Gateway
    from extproc.request import Request

MAX_DEPTH = 16


async def call_tool(ctx: ToolContext, name: str, arguments: Mapping[str, Any]) -> dict[str, Any]:
    """The MCP CallToolResult of `name` called as ctx's caller.

    Raises RpcError where a native tools/call would answer with a JSON-RPC error: an unknown or denied tool
    (`Unknown tool: X`, audited), a bad family instance argument, an unreachable upstream, its JSON-RPC error."""
    from extproc.handlers import calls, tasks  # both import this module

    gw, req = ctx.gateway, ctx.request
    edge = gw.edge_tools.get(name)
    if edge is not None:
        return await run_edge(ctx, edge, arguments)
    view = await gw.current_view(req)
    _, target, upstream_args = calls.resolve_call(gw, req, view, name, arguments)
    params: dict[str, Any] = {"name": target.original, "arguments": upstream_args}
    if tasks.must_run_as_task(gw, req, target):
        return await tasks.run_to_completion(ctx, target.server, params)
    return await request(ctx, target.server, "tools/call", params)


def reachable(ctx: ToolContext, name: str) -> bool:
    """Whether ctx's caller may call `name` now (its view and policy; no upstream traffic, no audit line):
    for availability answers such as a workflow's. Call after `await gw.current_view(ctx.request)`."""
    gw, req = ctx.gateway, ctx.request
    edge = gw.edge_tools.get(name)
    if edge is not None:
        return edge.available(ctx) and edge_allowed(gw, req, edge)
    return name in gw.view_for(req).tool_routes


def edge_allowed(gw: Gateway, req: Request, tool: EdgeTool) -> bool:
    route, target = tool.route()
    return gw.decide(req, route, target).allowed


async def run_edge(ctx: ToolContext, tool: EdgeTool, arguments: Mapping[str, Any]) -> dict[str, Any]:
    """An edge tool, after the same availability and policy checks (and audit line) as a routed one."""
    gw, req = ctx.gateway, ctx.request
    if ctx.depth > MAX_DEPTH:
        raise RpcError(INVALID_PARAMS, f"Tool {tool.name}: calls nested more than {MAX_DEPTH} deep")
    if not tool.available(ctx):
        gw.audit(req, tool=tool.name, decision="unknown", rule="unavailable")
        raise RpcError(INVALID_PARAMS, f"Unknown tool: {tool.name}")
    route, target = tool.route()
    decision = gw.decide(req, route, target)
    gw.audit(req, tool=tool.name, decision="allow" if decision.allowed else "deny", rule=decision.rule,
             server=tool.server, upstream_tool=tool.name)
    if not decision.allowed:
        raise RpcError(INVALID_PARAMS, f"Unknown tool: {tool.name}")
    return await tool.handler(ctx, dict(arguments))


async def edge_call(gw: Gateway, req: Request, msg: Message, name: str, arguments: dict[str, Any]) -> Local:
    """A native tools/call of an edge tool, answered at the edge."""
    tool = gw.edge_tools.get(name)
    if tool is None:
        raise RpcError(INVALID_PARAMS, f"Unknown tool: {name}")
    result = await run_edge(ToolContext(gw, req, msg.era, msg.meta), tool, arguments)
    return finish(gw, msg, result)


def finish(gw: Gateway, msg: Message, result: dict[str, Any]) -> Local:
    if msg.era == MODERN:
        result = {"resultType": "complete", **result, "_meta": {jsonrpc.META_SERVER_INFO: gw.server_info}}
    return Local.result(msg.id, result)


def _unavailable(server: str, why: str) -> RpcError:
    return RpcError(jsonrpc.INTERNAL_ERROR, f"Upstream server '{server}' is unavailable: {why}", {"server": server},
                    status=502)


_IDS = itertools.count(1)
_HOPS: dict[tuple[str, int, int], Hop] = {}


def _hop(gw: Gateway) -> Hop:
    """One lean client per event loop and internal listener."""
    address = gw.config.internal_listen
    key = (address.host, address.port, id(asyncio.get_running_loop()))
    hop = _HOPS.get(key)
    if hop is None:
        hop = _HOPS[key] = Hop(address.host, address.port)
    return hop


async def _send(gw: Gateway, server: MCPServer, hs: Handshake, method: str, params: dict[str, Any],
                tools: Sequence[Mapping[str, Any]] = ()) -> dict[str, Any]:
    """One JSON-RPC request through Envoy's internal listener, framed as UpstreamClient frames it."""
    params = dict(params)
    if hs.era == MODERN:
        meta = dict(params.get("_meta") or {})
        meta.update({jsonrpc.META_VERSION: hs.version, jsonrpc.META_CLIENT_INFO: CLIENT_INFO,
                     jsonrpc.META_CAPABILITIES: meta.get(jsonrpc.META_CAPABILITIES, {})})
        params["_meta"] = meta
    msg_id = next(_IDS)
    key = jsonrpc.NAME_BEARING.get(method)
    headers = gw.fleet.client.headers(server, era=hs.era, version=hs.version, session_id=hs.session_id, method=method,
                                      name=params.get(key) if key else None, auth=hs.auth)
    if hs.era == MODERN and method == "tools/call" and tools:  # mirrored arguments, from the upstream's own schema
        arguments = params.get("arguments")
        headers.update(schema_retry.param_headers_for(tools, str(params.get("name")),
                                                      arguments if isinstance(arguments, dict) else {}))
    body = orjson.dumps({"jsonrpc": "2.0", "id": msg_id, "method": method, "params": params})
    try:
        status, answer_headers, content = await _hop(gw).post(server.path, headers, body, float(server.timeout))
    except TimeoutError as exc:
        raise UpstreamError(f"timed out after {server.timeout}s") from exc
    except HopError as exc:
        raise UpstreamError(str(exc)) from exc
    return UpstreamClient.answer(httpx2.Response(status, headers=answer_headers, content=content), msg_id)


async def request(ctx: ToolContext, server_name: str, method: str, params: dict[str, Any]) -> dict[str, Any]:
    """One request to an upstream as ctx's caller, through Envoy's internal listener; returns its result.

    Legacy upstreams get one pooled session per principal (not the client's session: the processor is the
    client here). A refused renewable credential is renewed and the request sent once more; so is a request
    whose pooled session the upstream forgot."""
    gw, req = ctx.gateway, ctx.request
    server: MCPServer | None = gw.fleet.servers.get(server_name)
    if server is None:
        raise _unavailable(server_name, "not in the catalog")
    subject = req.caller.subject
    owner = "edge:" + req.caller.key
    for attempt in (0, 1):
        try:
            credential = await gw.broker.credential(server, subject, req.bearer)
        except CredentialError as exc:
            raise RpcError(jsonrpc.INTERNAL_ERROR, f"Upstream server '{server_name}': {exc.reason}",
                           {"server": server_name, "authRequired": exc.auth_required}, status=502) from None
        try:
            hs = await gw.fleet.session_for(server_name, owner, None, subject=subject, auth=credential.headers)
        except Exception as exc:
            gw.fleet.suspect(server_name, subject if gw.broker.per_user(server) else "")
            raise _unavailable(server_name, str(exc)) from None
        hs = dataclasses.replace(hs, auth=dict(credential.headers))
        if ctx.relay and hs.era == MODERN and method == "tools/call":
            params = {**params, **ctx.relay}
        snap = gw.fleet.state_for(server_name, subject).snapshot
        try:
            result = await _send(gw, server, hs, method, params, snap.tools if snap is not None else ())
            view = gw.view_for(req)
            if server_name in view.uri_slug_of:  # upstream URIs in the answer, as the caller names them
                map_uris(result, view, server_name)
            return result
        except UpstreamAuthError:
            if attempt == 0 and gw.broker.renewable(server):
                await gw.broker.evict(server, subject)
                continue
            raise RpcError(jsonrpc.INTERNAL_ERROR, f"Upstream server '{server_name}' refused the credential",
                           {"server": server_name}, status=502) from None
        except UpstreamRpcError as exc:
            if attempt == 0 and exc.code == jsonrpc.HEADER_MISMATCH and hs.era == MODERN and method == "tools/call":
                await gw.fleet.refetch(server_name, subject)  # its schema changed: headers from the new one, once
                continue
            raise RpcError(exc.code, exc.message, exc.data) from None
        except UpstreamError as exc:
            if attempt == 0 and hs.session_id and "HTTP 404" in str(exc):
                gw.fleet.forget_session(server_name, owner, subject)
                continue
            if "timed out" in str(exc):
                raise RpcError(jsonrpc.INTERNAL_ERROR, f"Upstream server '{server_name}' timed out",
                               {"server": server_name}, status=502) from None
            gw.fleet.suspect(server_name, subject if gw.broker.per_user(server) else "")
            raise _unavailable(server_name, str(exc)) from None
    raise _unavailable(server_name, "no answer")  # pragma: no cover - the loop always returns or raises
