"""tools/call, prompts/get, resources/read, completion/complete: resolved in the caller's view, then routed.

The route comes from the same view the caller's lists were built from; a name the view does not hold is
refused here and never reaches an upstream.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from catalog.policy import ToolFacts
from catalog.view import Route, Target, View
from extproc import jsonrpc, tool_calls
from extproc.edge_tools import text_result
from extproc.handlers import auth, meta, tasks
from extproc.handlers.meta import META_TOOL_NAMES
from extproc.jsonrpc import INVALID_PARAMS, LEGACY_RESOURCE_NOT_FOUND, MODERN, Message, RpcError
from extproc.replies import Forward, Local
from extproc.request import Request

if TYPE_CHECKING:
    from extproc.gateway import Gateway


class ArgumentError(RpcError):
    """An instance argument the gateway cannot route (missing, empty, unknown, ambiguous): the model can fix it.

    A tools/call answers it as a tool result with isError (SEP-1303: input validation errors are tool execution
    errors, so the model reads the text and retries); prompts/get and completion/complete have no such result and
    answer it as JSON-RPC -32602. Either way the valid values are in the text and in `available`."""

    def __init__(self, message: str, available: list[str]) -> None:
        super().__init__(INVALID_PARAMS, message, {"available": available})
        self.available = available

    def tool_result(self) -> dict[str, Any]:
        return text_result(self.message, error=True, structured={"available": self.available})


def select_target(route: Route, arguments: Mapping[str, Any], kind: str = "tool") -> tuple[Target, dict[str, Any]]:
    """The member a call goes to, and the arguments without the instance argument (family names)."""
    single = route.single
    if single is not None:
        return single, dict(arguments)
    arg = route.instance_arg or ""
    members = sorted(route.targets)
    value = arguments.get(arg)
    rest = {k: v for k, v in arguments.items() if k != arg}
    if not isinstance(value, str) or not value:
        raise ArgumentError(f"{kind} {route.exposed} is provided by a family on servers "
                            f'{", ".join(members)}; the "{arg}" parameter is required', members)
    if value in route.targets:
        return route.targets[value], rest
    aliases = [m for m in members if m.startswith(value + "-")]
    if len(aliases) == 1:
        return route.targets[aliases[0]], rest
    if len(aliases) > 1:
        raise ArgumentError(f'{kind} {route.exposed}: "{value}" matches more than one server '
                            f"({', '.join(aliases)}); use the full name", members)
    raise ArgumentError(f'{kind} {route.exposed} is not available on server "{value}" '
                        f"(available: {', '.join(members)})", members)


def _object(params: Mapping[str, Any], key: str) -> dict[str, Any]:
    value = params.get(key)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise RpcError(INVALID_PARAMS, f"Invalid params: {key} must be an object")
    return value


def _name(params: Mapping[str, Any], key: str = "name") -> str:
    value = params.get(key)
    if not isinstance(value, str) or not value:
        raise RpcError(INVALID_PARAMS, f"Invalid params: {key} must be a non-empty string")
    return value


def _failed_owner(gw: Gateway, req: Request, name: str) -> RpcError | None:
    """A name that would belong to a per-user server this caller cannot reach now: say which and why, rather
    than "unknown" (its tools are not in this caller's view while its credential fails)."""
    for server in gw.fleet.servers.values():
        if not gw.broker.per_user(server) or not req.caller.subject:
            continue
        prefixes = [f"{gw.config.prefix}_{server.server_prefix}_"]
        if server.family is not None:
            prefixes.append(f"{gw.config.prefix}_{server.family.name}_")
        state = gw.fleet.state_for(server.name, req.caller.subject)
        if state.snapshot is not None and not state.snapshot.ok and name.startswith(tuple(prefixes)):
            return RpcError(jsonrpc.INTERNAL_ERROR, f"Upstream server '{server.name}': {state.snapshot.error}",
                            {"server": server.name, "authRequired": state.auth_required}, status=502)
    return None


def _unavailable_owner(gw: Gateway, req: Request, name: str) -> RpcError | None:
    """A name under the prefix of a cataloged server that is down and was never listed (its tool names are
    unknown): "unavailable", naming it, unless the policy would deny such a name to this caller (fail closed:
    then it stays unknown, as a denied name does). Servers listed before they went down keep their last
    known tools in the view, so their calls never come here."""
    policy = gw.config.policy
    for server in gw.fleet.servers.values():
        prefix = f"{gw.config.prefix}_{server.server_prefix}_"
        if not name.startswith(prefix) or len(name) == len(prefix):
            continue
        why = gw.fleet.unavailable(server.name, req.caller.subject)
        if why is None:
            continue
        facts = ToolFacts(name, name[len(prefix):], server.name)
        if not policy.decide(facts, req.caller.claims).allowed or not policy.toolset_allows(req.toolset, facts):
            return None
        return RpcError(jsonrpc.INTERNAL_ERROR, f"Upstream server '{server.name}' is unavailable",
                        {"server": server.name, "reason": why}, status=502)
    return None


def _refused(gw: Gateway, req: Request, name: str, arguments: Mapping[str, Any]) -> RpcError:
    """A name the caller's view does not hold: audited as denied when the policy hid it, else unknown."""
    base = gw.fleet.view().tool_routes.get(name)
    target = None
    if base is not None:
        try:
            target = select_target(base, arguments)[0]
        except RpcError:
            target = next(iter(base.targets.values()))
    if base is None or target is None:
        failed = _failed_owner(gw, req, name) or _unavailable_owner(gw, req, name)
        if failed is not None:
            gw.audit(req, tool=name, decision="unavailable", rule="server-down", server=failed.data["server"])
            return failed
        gw.audit(req, tool=name, decision="unknown", rule="no-such-tool")
    else:
        decision = gw.decide(req, base, target)
        gw.audit(req, tool=name, decision="deny", rule=decision.rule, server=target.server,
                 upstream_tool=target.original)
    return RpcError(INVALID_PARAMS, f"Unknown tool: {name}")


def _repeatable(definition: Mapping[str, Any]) -> bool:
    """A call safe to send twice: the upstream declares the tool read-only or idempotent."""
    hints = definition.get("annotations")
    return isinstance(hints, dict) and (hints.get("readOnlyHint") is True or hints.get("idempotentHint") is True)


def resolve_call(gw: Gateway, req: Request, view: View, name: str, arguments: Mapping[str, Any]
                 ) -> tuple[Route, Target, dict[str, Any]]:
    """The route, member and upstream arguments of a routed tool call, with its policy decision audited.

    Shared by a native tools/call and the processor's own calls (call_tool, workflow steps): one decision,
    one audit line, one refusal text, whichever way the call came."""
    route = view.tool_routes.get(name)
    if route is None:
        raise _refused(gw, req, name, arguments)
    try:
        target, upstream_args = select_target(route, arguments)
    except RpcError:
        base = gw.fleet.view().tool_routes.get(name)
        value = arguments.get(route.instance_arg or "")
        if base is not None and isinstance(value, str) and value in base.targets and value not in route.targets:
            decision = gw.decide(req, base, base.targets[value])
            gw.audit(req, tool=name, decision="deny", rule=decision.rule, server=value,
                     upstream_tool=base.targets[value].original)
        raise
    decision = gw.decide(req, route, target)
    gw.audit(req, tool=name, decision="allow", rule=decision.rule, server=target.server,
             upstream_tool=target.original)
    return route, target, upstream_args


async def call_tool(gw: Gateway, req: Request, msg: Message) -> Forward | Local:
    name = _name(msg.params)
    arguments = _object(msg.params, "arguments")
    mode = gw.tool_mode(req)
    if name in META_TOOL_NAMES and mode != "native":
        return await meta.call(gw, req, msg, name, arguments)
    if mode == "meta":
        gw.audit(req, tool=name, decision="unknown", rule="meta-mode")
        raise RpcError(INVALID_PARAMS, f"Unknown tool: {name}")
    if name in gw.edge_tools:
        return await tool_calls.edge_call(gw, req, msg, name, arguments)
    view = await gw.current_view(req)
    if name not in view.tool_routes and gw.recheck_catalog():  # a catalog edit this worker has not polled yet
        if name in gw.edge_tools:
            return await tool_calls.edge_call(gw, req, msg, name, arguments)
        view = await gw.current_view(req)
    route = view.tool_routes.get(name)
    if route is not None and msg.era == MODERN:
        jsonrpc.check_param_headers(route.header_map, arguments, req.param_headers)
    try:
        route, target, upstream_args = resolve_call(gw, req, view, name, arguments)
    except ArgumentError as err:  # a result the model reads and acts on, not a protocol error
        return tool_calls.finish(gw, msg, err.tool_result())
    if tasks.wants_task(gw, req, msg, target):
        return await tasks.call_as_task(gw, req, msg, target, upstream_args)
    params = {**msg.params, "name": target.original, "arguments": upstream_args}
    return await gw.forward(req, msg, target.server, params, name=target.original, header_map=target.header_map,
                            arguments=upstream_args, repeatable=_repeatable(target.definition))


async def get_prompt(gw: Gateway, req: Request, msg: Message) -> Forward:
    name = _name(msg.params)
    arguments = _object(msg.params, "arguments")
    view = await gw.current_view(req)
    route = view.prompt_routes.get(name)
    if route is None or gw.tool_mode(req) == "meta":  # meta mode: prompts only through the meta-tools
        raise RpcError(INVALID_PARAMS, f"Unknown prompt: {name}")
    target, upstream_args = select_target(route, arguments, "prompt")
    params = {**msg.params, "name": target.original, "arguments": upstream_args}
    return await gw.forward(req, msg, target.server, params, name=target.original)


def _not_found(msg: Message, uri: str) -> RpcError:
    code = INVALID_PARAMS if msg.era == MODERN else LEGACY_RESOURCE_NOT_FOUND
    return RpcError(code, f"Resource not found: {uri}", {"uri": uri})


async def _forward_by_uri(gw: Gateway, req: Request, msg: Message, uri: str) -> Forward:
    """Route to the upstream whose URI this is, with the upstream's own URI in the body and Mcp-Name."""
    view = await gw.current_view(req)
    resolved = view.resolve_uri(uri)
    if resolved is None:
        raise _not_found(msg, uri)
    server, original = resolved
    return await gw.forward(req, msg, server, {**msg.params, "uri": original}, name=original)


async def read_resource(gw: Gateway, req: Request, msg: Message) -> Forward | Local:
    uri = _name(msg.params, "uri")
    meta_mode = gw.tool_mode(req) == "meta"
    if uri == auth.AUTH_STATUS_URI and (gw.offers_auth_status or meta_mode):
        return await auth.read_status(gw, req, msg)
    if meta_mode:  # meta mode: backend resources only through the meta-tools
        raise _not_found(msg, uri)
    return await _forward_by_uri(gw, req, msg, uri)


async def subscribe(gw: Gateway, req: Request, msg: Message) -> Forward:
    """resources/subscribe and unsubscribe (handshake era only) go to the session of the URI's upstream."""
    if msg.era == MODERN:
        raise RpcError(jsonrpc.METHOD_NOT_FOUND, f"Method not found: {msg.method} (removed in 2026-07-28)")
    return await _forward_by_uri(gw, req, msg, _name(msg.params, "uri"))


async def complete(gw: Gateway, req: Request, msg: Message) -> Forward:
    ref = _object(msg.params, "ref")
    view = await gw.current_view(req)
    if ref.get("type") == "ref/prompt":
        name = _name(ref)
        route = view.prompt_routes.get(name)
        if route is None:
            raise RpcError(INVALID_PARAMS, f"Unknown prompt: {name}")
        context = _object(msg.params, "context")
        target, rest = select_target(route, _object(context, "arguments"), "prompt")
        params = {**msg.params, "ref": {**ref, "name": target.original}}
        if context:
            params["context"] = {**context, "arguments": rest}
        return await gw.forward(req, msg, target.server, params)
    if ref.get("type") == "ref/resource":
        uri = _name(ref, "uri")
        resolved = view.resolve_uri(uri)
        if resolved is None:
            raise _not_found(msg, uri)
        server, original = resolved
        return await gw.forward(req, msg, server, {**msg.params, "ref": {**ref, "uri": original}})
    raise RpcError(INVALID_PARAMS, "Invalid params: ref.type must be ref/prompt or ref/resource")
