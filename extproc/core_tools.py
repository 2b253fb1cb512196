"""Muster's core tools answered at the edge: core_auth_login/_logout, core_mcpserver_list/_get, core_events.

Each carries MCP annotations so the policy's annotation rules and toolsets apply to it like to any tool; each
answers from the caller's own standing (servers it can see, its own auth state).
"""

from __future__ import annotations

import re
import time
from typing import TYPE_CHECKING, Any

import orjson

from extproc.edge_tools import EdgeTool, ToolContext, text_result
from extproc.handlers import auth
from extproc.jsonrpc import LEGACY, Message

if TYPE_CHECKING:
    from extproc.gateway import Gateway

READ_ONLY = {"readOnlyHint": True, "destructiveHint": False, "idempotentHint": True, "openWorldHint": False}


def _json(value: Any) -> dict[str, Any]:
    return text_result(orjson.dumps(value).decode(), structured=value if isinstance(value, dict) else None)


# ---- core_auth_login / core_auth_logout ------------------------------------------------------------------
def _has_login(ctx: ToolContext) -> bool:
    return bool(ctx.gateway.core_tools())


def _auth_handler(name: str) -> Any:
    async def handler(ctx: ToolContext, arguments: dict[str, Any]) -> dict[str, Any]:
        msg = Message({"id": 0}, "tools/call", 0, {"name": name, "arguments": arguments}, LEGACY, "")
        local = await auth.core_tool(ctx.gateway, ctx.request, msg, name, arguments)
        result = orjson.loads(local.body).get("result")
        return result if isinstance(result, dict) else text_result("core tool failed", error=True)
    return handler


def agent_layer(ctx: ToolContext) -> bool:
    """Muster's own core tools are listed in every mode (native lists carry them too, as Muster's do)."""
    return True


# ---- core_mcpserver_list / core_mcpserver_get ------------------------------------------------------------
def _visible(ctx: ToolContext) -> set[str]:
    """Servers this caller can see: those with a tool in its view, and those with no tools to hide (down, or
    waiting for its login); a server whose every tool the policy hides from it stays hidden."""
    gw, req = ctx.gateway, ctx.request
    mine = {t.server for r in gw.view_for(req).tool_routes.values() for t in r.targets.values()}
    listed = {t.server for r in gw.fleet.view(req.caller.subject).tool_routes.values() for t in r.targets.values()}
    return mine | (set(gw.fleet.servers) - listed)


def server_entry(ctx: ToolContext, name: str) -> dict[str, Any]:
    gw, req = ctx.gateway, ctx.request
    server = gw.fleet.servers[name]
    per_user = gw.broker.per_user(server)
    state = gw.fleet.state_for(name, req.caller.subject) if (req.caller.subject or not per_user) else None
    described = gw.fleet.describe(state, server)
    view = gw.view_for(req)
    count = sum(1 for r in view.tool_routes.values() if name in r.targets)
    if server.auth.type == "oauth" and not auth.sso_kind(server):
        session = "connected" if described["state"] == "Connected" else "auth_required"
    elif auth.sso_kind(server):
        session = "connected" if described["state"] == "Connected" else "sso_pending"
    else:
        session = "connected" if described["state"] == "Connected" else "disconnected"
    entry: dict[str, Any] = {"name": name, "type": server.type, "url": server.url,
                             "state": described["state"], "sessionStatus": session, "toolsCount": count,
                             "authRequired": server.auth.type == "oauth"}
    if server.family is not None:
        entry["family"] = server.family.name
    if described.get("error") and described["state"] != "Connected":
        entry["error"] = described["error"]
    return entry


async def _mcpserver_list(ctx: ToolContext, arguments: dict[str, Any]) -> dict[str, Any]:
    gw = ctx.gateway
    await gw.fleet.ready(ctx.request.caller.subject, ctx.request.bearer)
    show_all = arguments.get("showAll") is True
    seen = _visible(ctx)
    servers = [server_entry(ctx, n) for n in sorted(gw.fleet.servers) if n in seen]
    if not show_all:
        servers = [s for s in servers if s["state"] != "Failed" or s["sessionStatus"] == "auth_required"]
    return _json({"mcpServers": servers})


async def _mcpserver_get(ctx: ToolContext, arguments: dict[str, Any]) -> dict[str, Any]:
    name = arguments.get("name")
    if not isinstance(name, str) or not name:
        return text_result("name argument is required", error=True)
    await ctx.gateway.fleet.ready(ctx.request.caller.subject, ctx.request.bearer)
    if name not in ctx.gateway.fleet.servers or name not in _visible(ctx):
        return text_result(f"MCPServer '{name}' not found", error=True)
    return _json(server_entry(ctx, name))


# ---- core_events -----------------------------------------------------------------------------------------
_DURATION = re.compile(r"^(\d+(?:\.\d+)?)(ms|s|m|h)$")


def parse_time(value: Any, now: float) -> float | None:
    """A Go duration (`5m`, `1h`: that long ago) or an RFC 3339 time, as epoch seconds."""
    if not isinstance(value, str) or not value:
        return None
    match = _DURATION.match(value)
    if match:
        unit = {"ms": 0.001, "s": 1, "m": 60, "h": 3600}[match.group(2)]
        return now - float(match.group(1)) * unit
    from datetime import datetime
    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
    except ValueError as exc:
        raise ValueError(f"invalid time {value!r}: use a duration like 5m or an RFC3339 time") from exc


async def _events(ctx: ToolContext, arguments: dict[str, Any]) -> dict[str, Any]:
    gw = ctx.gateway
    limit = arguments.get("limit", 50)
    if not isinstance(limit, int) or isinstance(limit, bool) or limit < 1:
        return text_result("limit must be at least 1", error=True)
    now = time.time()
    try:
        since = parse_time(arguments.get("since"), now)
        until = parse_time(arguments.get("until"), now)
    except ValueError as exc:
        return text_result(str(exc), error=True)
    visible = _visible(ctx)
    events = await gw.events.read(subject=ctx.request.caller.subject, servers=visible,
                                  resource_type=arguments.get("resourceType"),
                                  resource_name=arguments.get("resourceName"),
                                  event_type=arguments.get("eventType"), since=since, until=until, limit=limit)
    return _json({"events": events, "count": len(events)})


def _schema(props: dict[str, Any], required: tuple[str, ...] = ()) -> dict[str, Any]:
    schema: dict[str, Any] = {"type": "object", "properties": props}
    if required:
        schema["required"] = list(required)
    return schema


def register_builtin(gw: Gateway) -> None:
    tools = gw.edge_tools
    for definition in auth.CORE_TOOLS:
        tools.register(EdgeTool(definition, _auth_handler(str(definition["name"])), _has_login))
    tools.register(EdgeTool({
        "name": "core_mcpserver_list",
        "description": "List the MCP servers you can reach through this gateway, with their state, your "
                       "authentication state and how many of their tools you see.",
        "inputSchema": _schema({"showAll": {"type": "boolean", "default": False,
                                            "description": "Include servers that are unreachable"},
                                "verbose": {"type": "boolean", "default": False,
                                            "description": "Accepted for Muster compatibility"}}),
        "annotations": READ_ONLY}, _mcpserver_list, agent_layer))
    tools.register(EdgeTool({
        "name": "core_mcpserver_get",
        "description": "Get one MCP server's state, your authentication state and your tools count.",
        "inputSchema": _schema({"name": {"type": "string", "description": "The MCPServer name"}}, ("name",)),
        "annotations": READ_ONLY}, _mcpserver_get, agent_layer))
    tools.register(EdgeTool({
        "name": "core_events",
        "description": "Events the gateway recorded: upstreams up/down, catalog reloads, refused manifests, "
                       "logins (only about servers you can see).",
        "inputSchema": _schema({
            "resourceType": {"type": "string", "description": "MCPServer, Workflow or Catalog"},
            "resourceName": {"type": "string", "description": "Only events about this resource"},
            "namespace": {"type": "string", "description": "Accepted for Muster compatibility"},
            "eventType": {"type": "string", "enum": ["Normal", "Warning"]},
            "since": {"type": "string", "description": "A duration (5m, 1h) or an RFC3339 time"},
            "until": {"type": "string", "description": "A duration (5m, 1h) or an RFC3339 time"},
            "limit": {"type": "integer", "default": 50, "minimum": 1},
        }),
        "annotations": READ_ONLY}, _events, agent_layer))

