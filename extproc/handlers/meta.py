"""Muster's 11 meta-tools (toolMode meta / both): names, arguments, defaults, output shapes and error texts as
Muster has them (reference §4.2, §4.3), answered from the caller's own view.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from typing import TYPE_CHECKING, Any

import orjson

from catalog import ranking
from extproc import tool_calls
from extproc.edge_tools import ToolContext, text_result
from extproc.handlers import auth
from extproc.jsonrpc import INVALID_PARAMS, MODERN, Message, RpcError
from extproc.replies import Local
from extproc.request import Request

if TYPE_CHECKING:
    from extproc.gateway import Gateway

_STR = {"type": "string"}
DEFAULT_FILTER_LIMIT = 5
SUMMARY_MAX = 120
LABELS_META = "muster.giantswarm.io/labels"
"""Where a tool carries its discovery labels (`_meta`): workflow tools put their metadata.labels there."""


def _tool(name: str, description: str, props: dict[str, Any] | None = None,
          required: tuple[str, ...] = ()) -> dict[str, Any]:
    schema: dict[str, Any] = {"type": "object", "properties": props or {}}
    if required:
        schema["required"] = list(required)
    return {"name": name, "description": description, "inputSchema": schema,
            "annotations": {"readOnlyHint": name != "call_tool", "openWorldHint": name == "call_tool"}}


META_TOOLS: tuple[dict[str, Any], ...] = (
    _tool("list_tools", "List all available tools from connected MCP servers"),
    _tool("describe_tool", "Get detailed information about a specific tool including its input schema",
          {"name": {**_STR, "description": "Name of the tool to describe"}}, ("name",)),
    _tool("list_core_tools", "List core muster tools (built-in functionality separate from external MCP servers)",
          {"include_schema": {"type": "boolean", "default": True,
                              "description": "Whether to include the full input schema for each tool"}}),
    _tool("filter_tools", "Discover tools cheaply: filter by name pattern, description, or labels, optionally rank "
                          "by a natural-language query, and get a bounded, summarised page. Full descriptions and "
                          "schemas are omitted by default — use describe_tool for the authoritative detail of a "
                          "chosen tool.",
          {"pattern": {**_STR, "description": "Glob pattern for tool names (e.g. 'core_*', '*workflow*')"},
           "description_filter": {**_STR, "description": "Substring the tool description must contain"},
           "query": {**_STR, "description": "Natural-language query; results are ranked by relevance (BM25)"},
           "labels": {"type": "object", "additionalProperties": _STR,
                      "description": "Labels that must all match (workflow metadata.labels)"},
           "case_sensitive": {"type": "boolean", "default": False,
                              "description": "Whether pattern and description matching is case-sensitive"},
           "include_schema": {"type": "boolean", "default": False,
                              "description": "Whether to include the full input schema for each tool"},
           "limit": {"type": "number", "default": 5, "description": "Maximum number of tools to return"},
           "offset": {"type": "number", "default": 0, "description": "Number of matching tools to skip"}}),
    _tool("call_tool", "Execute a tool with the given arguments",
          {"name": {**_STR, "description": "Name of the tool to execute"},
           "arguments": {"type": "object", "description": "Arguments to pass to the tool"}}, ("name",)),
    _tool("list_resources", "List all available resources from connected MCP servers"),
    _tool("describe_resource", "Get detailed information about a specific resource",
          {"uri": {**_STR, "description": "URI of the resource to describe"}}, ("uri",)),
    _tool("get_resource", "Retrieve the contents of a resource",
          {"uri": {**_STR, "description": "URI of the resource to retrieve"}}, ("uri",)),
    _tool("list_prompts", "List all available prompts from connected MCP servers"),
    _tool("describe_prompt", "Get detailed information about a specific prompt",
          {"name": {**_STR, "description": "Name of the prompt to describe"}}, ("name",)),
    _tool("get_prompt", "Get a prompt with the given arguments",
          {"name": {**_STR, "description": "Name of the prompt to execute"},
           "arguments": {"type": "object", "description": "Arguments to pass to the prompt",
                         "additionalProperties": _STR}}, ("name",)),
)
META_TOOL_NAMES = frozenset(t["name"] for t in META_TOOLS)


# ---- answers ----------------------------------------------------------------------------------------------
def _text(text: str, *, error: bool = False) -> dict[str, Any]:
    return text_result(text, error=error)


def _json(value: Any) -> dict[str, Any]:
    """Muster's formatters: indented JSON in one text content."""
    return text_result(orjson.dumps(value, option=orjson.OPT_INDENT_2).decode())


def caller_tools(ctx: ToolContext) -> list[dict[str, Any]]:
    """What Muster's ListTools gives this caller: its backend tools, then core tools, then workflow_* tools."""
    gw, req = ctx.gateway, ctx.request
    view = gw.view_for(req)
    edge = gw.edge_tools.for_caller(ctx, lambda t: gw.edge_allowed(req, t))
    core = [dict(t.definition) for t in edge if t.kind == "core"]
    other = [dict(t.definition) for t in edge if t.kind != "core"]
    return [*view.tools, *core, *other]


def _labels(tool: Mapping[str, Any]) -> dict[str, str]:
    meta = tool.get("_meta")
    labels = meta.get(LABELS_META) if isinstance(meta, dict) else None
    return {str(k): str(v) for k, v in labels.items()} if isinstance(labels, dict) else {}


def servers_requiring_auth(ctx: ToolContext) -> list[dict[str, str]]:
    out = []
    for entry in auth.status_of(ctx.gateway, ctx.request)["servers"]:
        if entry.get("auth_tool") and entry["status"] != "Connected":
            out.append({"name": entry["name"], "status": "auth_required", "auth_tool": "core_auth_login"})
    return out


async def _list_tools(ctx: ToolContext, args: dict[str, Any]) -> dict[str, Any]:
    tools = caller_tools(ctx)
    answer: dict[str, Any] = {"tools": [{"name": t["name"], "description": t.get("description", "")}
                                        for t in tools]}
    needing = servers_requiring_auth(ctx)
    if needing:
        answer["servers_requiring_auth"] = needing
    return _json(answer)


async def _describe_tool(ctx: ToolContext, args: dict[str, Any]) -> dict[str, Any]:
    name = args.get("name")
    if not isinstance(name, str) or not name:
        return _text("name argument is required", error=True)
    for tool in caller_tools(ctx):
        if tool["name"] == name:
            return _json({"description": tool.get("description", ""), "inputSchema": tool.get("inputSchema"),
                          "name": name})
    return _text(f"Tool not found: {name}", error=True)


def _int_arg(value: Any) -> int | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return int(value)


async def _filter_tools(ctx: ToolContext, args: dict[str, Any]) -> dict[str, Any]:
    opts: dict[str, Any] = {"pattern": "", "description_filter": "", "query": "", "labels": {},
                            "case_sensitive": False, "include_schema": False, "limit": DEFAULT_FILTER_LIMIT,
                            "offset": 0}
    for key in ("pattern", "description_filter", "query"):
        if isinstance(args.get(key), str):
            opts[key] = args[key]
    for key in ("case_sensitive", "include_schema"):
        if isinstance(args.get(key), bool):
            opts[key] = args[key]
    if isinstance(args.get("labels"), dict):
        opts["labels"] = {str(k): _go_string(v) for k, v in args["labels"].items()}
    for key, least in (("limit", 1), ("offset", 0)):
        if key in args:
            value = _int_arg(args[key])
            if value is None:
                return _text(f"{key} must be a number", error=True)
            if value < least:
                return _text(f"{key} must be at least {least}", error=True)
            opts[key] = value
    return _filtered(ctx, opts, summarize=not opts["include_schema"])


async def _list_core_tools(ctx: ToolContext, args: dict[str, Any]) -> dict[str, Any]:
    include = args.get("include_schema")
    opts = {"pattern": "core*", "description_filter": "", "query": "", "labels": {}, "case_sensitive": False,
            "include_schema": include if isinstance(include, bool) else True, "limit": 0, "offset": 0}
    return _filtered(ctx, opts, summarize=False)


def _go_string(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def _filtered(ctx: ToolContext, opts: dict[str, Any], *, summarize: bool) -> dict[str, Any]:
    tools = caller_tools(ctx)
    if not tools:
        return _text("No tools available to filter")
    case = opts["case_sensitive"]
    pattern = None
    if opts["pattern"]:
        try:
            pattern = ranking.glob_regex(opts["pattern"], case)
        except ValueError as exc:
            return _text(f'Invalid pattern {orjson.dumps(opts["pattern"]).decode()}: {exc}', error=True)
    wanted_desc = opts["description_filter"] if case else opts["description_filter"].lower()
    matched = []
    for tool in tools:
        desc = str(tool.get("description") or "")
        if pattern is not None and not pattern.match(tool["name"]):
            continue
        if wanted_desc and wanted_desc not in (desc if case else desc.lower()):
            continue
        have = _labels(tool)
        if any(have.get(k) != v for k, v in opts["labels"].items()):
            continue
        matched.append(tool)
    scored: list[tuple[dict[str, Any], float | None]]
    if opts["query"]:
        docs = [ranking.Doc(t["name"], ranking.first_line(str(t.get("description") or ""))) for t in matched]
        scored = [(matched[i], s) for i, s in ranking.rank(opts["query"], docs)]
    else:
        scored = [(t, None) for t in matched]
    total = len(scored)
    start = min(opts["offset"], total)
    end = total if not opts["limit"] or start + opts["limit"] >= total else start + opts["limit"]
    infos = []
    for tool, score in scored[start:end]:
        info: dict[str, Any] = {"name": tool["name"]}
        desc = str(tool.get("description") or "")
        if summarize:
            if ranking.first_line(desc, SUMMARY_MAX):
                info["summary"] = ranking.first_line(desc, SUMMARY_MAX)
        elif desc:
            info["description"] = desc
        if score is not None:
            info["score"] = ranking.round_score(score)
        labels = _labels(tool)
        if labels:
            info["labels"] = labels
        if opts["include_schema"] and tool.get("inputSchema") is not None:
            info["inputSchema"] = tool["inputSchema"]
        infos.append(info)
    filters: dict[str, Any] = {k: opts[k] for k in ("pattern", "description_filter", "query", "labels") if opts[k]}
    filters.update({k: opts[k] for k in ("case_sensitive", "include_schema", "limit", "offset")})
    return _json({"filters": filters, "total_tools": len(tools), "filtered_count": len(infos), "total": total,
                  "truncated": end < total, "tools": infos})


def envelope(result: Mapping[str, Any]) -> dict[str, Any]:
    """Muster's call_tool result: the wrapped result as JSON text; isError and structuredContent mirrored."""
    content = []
    for item in result.get("content") or []:
        if isinstance(item, dict) and item.get("type") == "text":
            content.append({"type": "text", "text": item.get("text", "")})
        elif isinstance(item, dict) and item.get("type") in ("image", "audio"):
            content.append({"type": item["type"], "mimeType": item.get("mimeType", ""),
                            "dataSize": len(str(item.get("data") or ""))})
        else:
            content.append(item)
    is_error = result.get("isError") is True
    inner: dict[str, Any] = {"isError": is_error, "content": content}
    structured = result.get("structuredContent")
    if structured is not None:
        inner["structuredContent"] = structured
    out = text_result(orjson.dumps(inner).decode(), error=is_error)
    if structured is not None:
        out["structuredContent"] = structured
    return out


async def _call_tool(ctx: ToolContext, args: dict[str, Any]) -> dict[str, Any]:
    name = args.get("name")
    if not isinstance(name, str) or not name:
        return _text("name argument is required", error=True)
    arguments = args.get("arguments")
    if arguments is None:
        arguments = {}
    if not isinstance(arguments, dict):
        return _text("arguments must be a JSON object", error=True)
    if name in META_TOOL_NAMES:
        return _text(f"Tool execution failed: Unknown tool: {name}", error=True)
    try:
        result = await tool_calls.call_tool(ctx, name, arguments)
    except RpcError as exc:
        return _text(f"Tool execution failed: {exc.message}", error=True)
    if result.get("resultType") == "input_required":  # relayed as it came: the client answers, then calls again
        if ctx.era != MODERN:
            return _text(f"Tool execution failed: tool {name} asks the client for input, which a handshake-era "
                         "client cannot give through call_tool", error=True)
        if "requestState" in result:  # bound to this caller now: another one presenting it back is refused
            await ctx.gateway.bind_request_state(result["requestState"], ctx.request.caller.key)
        return {k: v for k, v in result.items() if k != "_meta"}
    return envelope(result)


def _resources(ctx: ToolContext) -> tuple[dict[str, Any], ...]:
    return ctx.gateway.view_for(ctx.request).resources


async def _list_resources(ctx: ToolContext, args: dict[str, Any]) -> dict[str, Any]:
    resources = _resources(ctx)
    if not resources:
        return _text("No resources available")
    out = []
    for r in resources:
        entry = {"uri": r.get("uri", ""), "name": r.get("name", ""),
                 "description": r.get("description") or r.get("name", "")}
        if r.get("mimeType"):
            entry["mimeType"] = r["mimeType"]
        if not entry["description"]:
            del entry["description"]
        out.append(entry)
    return _json(out)


async def _describe_resource(ctx: ToolContext, args: dict[str, Any]) -> dict[str, Any]:
    uri = args.get("uri")
    if not isinstance(uri, str) or not uri:
        return _text("uri argument is required", error=True)
    for r in _resources(ctx):
        if r.get("uri") == uri:
            return _json({"description": r.get("description", ""), "mimeType": r.get("mimeType", ""),
                          "name": r.get("name", ""), "uri": uri})
    return _text(f"Resource not found: {uri}", error=True)


async def _get_resource(ctx: ToolContext, args: dict[str, Any]) -> dict[str, Any]:
    uri = args.get("uri")
    if not isinstance(uri, str) or not uri:
        return _text("uri argument is required", error=True)
    resolved = ctx.gateway.view_for(ctx.request).resolve_uri(uri)
    if resolved is None:
        return _text(f"Resource retrieval failed: Resource not found: {uri}", error=True)
    server, original = resolved
    try:
        result = await tool_calls.request(ctx, server, "resources/read", {"uri": original})
    except RpcError as exc:
        return _text(f"Resource retrieval failed: {exc.message}", error=True)
    texts = []
    for item in result.get("contents") or []:
        if isinstance(item, dict) and "text" in item:
            texts.append(str(item["text"]))
        elif isinstance(item, dict) and "blob" in item:
            texts.append(f"[Binary data: {len(str(item['blob']))} bytes]")
    return _text("\n".join(texts))


def _prompts(ctx: ToolContext) -> tuple[dict[str, Any], ...]:
    return ctx.gateway.view_for(ctx.request).prompts


async def _list_prompts(ctx: ToolContext, args: dict[str, Any]) -> dict[str, Any]:
    prompts = _prompts(ctx)
    if not prompts:
        return _text("No prompts available")
    return _json([{"name": p.get("name", ""), "description": p.get("description", "")} for p in prompts])


async def _describe_prompt(ctx: ToolContext, args: dict[str, Any]) -> dict[str, Any]:
    name = args.get("name")
    if not isinstance(name, str) or not name:
        return _text("name argument is required", error=True)
    for p in _prompts(ctx):
        if p.get("name") == name:
            info: dict[str, Any] = {"description": p.get("description", ""), "name": name}
            if p.get("arguments"):
                info["arguments"] = [{"description": a.get("description", ""), "name": a.get("name", ""),
                                      "required": a.get("required") is True} for a in p["arguments"]]
            return _json(info)
    return _text(f"Prompt not found: {name}", error=True)


def _content(item: Any) -> Any:
    if isinstance(item, dict) and item.get("type") == "text":
        return {"type": "text", "text": item.get("text", "")}
    if isinstance(item, dict) and item.get("type") in ("image", "audio"):
        return {"type": item["type"], "mimeType": item.get("mimeType", ""), "dataSize": len(str(item.get("data")
                                                                                             or ""))}
    if isinstance(item, dict) and item.get("type") == "resource":
        return {"type": "embeddedResource", "resource": item.get("resource")}
    return item


async def _get_prompt(ctx: ToolContext, args: dict[str, Any]) -> dict[str, Any]:
    from extproc.handlers.calls import select_target

    name = args.get("name")
    if not isinstance(name, str) or not name:
        return _text("name argument is required", error=True)
    raw = args.get("arguments")
    if raw is not None and not isinstance(raw, dict):
        return _text("arguments must be a JSON object", error=True)
    arguments = {k: _go_string(v) for k, v in (raw or {}).items()}
    route = ctx.gateway.view_for(ctx.request).prompt_routes.get(name)
    try:
        if route is None:
            raise RpcError(INVALID_PARAMS, f"Unknown prompt: {name}")
        target, upstream_args = select_target(route, arguments, "prompt")
        result = await tool_calls.request(ctx, target.server, "prompts/get",
                                          {"name": target.original, "arguments": upstream_args})
    except RpcError as exc:
        return _text(f"Prompt retrieval failed: {exc.message}", error=True)
    messages = [{"role": m.get("role", ""), "content": _content(m.get("content"))}
                for m in result.get("messages") or [] if isinstance(m, dict)]
    return _json(messages)


HANDLERS: dict[str, Callable[[ToolContext, dict[str, Any]], Awaitable[dict[str, Any]]]] = {
    "list_tools": _list_tools, "describe_tool": _describe_tool, "list_core_tools": _list_core_tools,
    "filter_tools": _filter_tools, "call_tool": _call_tool, "list_resources": _list_resources,
    "describe_resource": _describe_resource, "get_resource": _get_resource, "list_prompts": _list_prompts,
    "describe_prompt": _describe_prompt, "get_prompt": _get_prompt,
}


async def run(ctx: ToolContext, name: str, arguments: dict[str, Any]) -> dict[str, Any]:
    """One meta-tool's CallToolResult, from the caller's own view (its policy and toolset already applied)."""
    await ctx.gateway.current_view(ctx.request)
    return await HANDLERS[name](ctx, arguments)


async def call(gw: Gateway, req: Request, msg: Message, name: str, arguments: dict[str, Any]) -> Local:
    """A native tools/call of one meta-tool."""
    relay: dict[str, Any] = {k: msg.params[k] for k in ("inputResponses", "requestState")
                             if k in msg.params and msg.era == MODERN}
    result = await run(ToolContext(gw, req, msg.era, msg.meta, relay=relay), name, arguments)
    return tool_calls.finish(gw, msg, result)
