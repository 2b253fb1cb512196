"""initialize, server/discover, ping, logging/setLevel and notifications: all answered at the edge."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

import orjson

from extproc import jsonrpc
from extproc.handlers import tasks
from extproc.jsonrpc import HANDSHAKE_VERSIONS, LATEST_HANDSHAKE, MODERN, MODERN_VERSIONS, Message, RpcError
from extproc.replies import Local
from extproc.request import Request

if TYPE_CHECKING:
    from extproc.gateway import Gateway

# honoured by the notification channel (extproc/notify.py): GET streams and subscriptions/listen
LIST_CHANGED_CAPABILITIES = {"tools": {"listChanged": True}, "prompts": {"listChanged": True},
                             "resources": {"subscribe": True, "listChanged": True}}
LOG_LEVELS = ("debug", "info", "notice", "warning", "error", "critical", "alert", "emergency")


async def initialize(gw: Gateway, req: Request, msg: Message) -> Local:
    if msg.era == MODERN:
        raise RpcError(jsonrpc.METHOD_NOT_FOUND, "Method not found: initialize (removed in 2026-07-28; "
                                                 "use server/discover)")
    requested = msg.params.get("protocolVersion")
    version = requested if requested in HANDSHAKE_VERSIONS else LATEST_HANDSHAKE
    caps = msg.params.get("capabilities")
    view = await gw.current_view(req)
    caps = tasks.client_capabilities_upstream(caps)
    session_id, _ = gw.sessions.mint(req.caller.subject, version, orjson.dumps(caps))
    capabilities = {**view.capabilities, **LIST_CHANGED_CAPABILITIES, "logging": {},
                    **tasks.capabilities(gw, req, view, msg.era, version)}
    result: dict[str, Any] = {"protocolVersion": version, "capabilities": capabilities, "serverInfo": gw.server_info}
    if gw.config.instructions:
        result["instructions"] = gw.config.instructions
    return Local.result(msg.id, result, {"mcp-session-id": session_id})


async def discover(gw: Gateway, req: Request, msg: Message) -> Local:
    view = await gw.current_view(req)
    result: dict[str, Any] = {
        "supportedVersions": [*MODERN_VERSIONS, *reversed(HANDSHAKE_VERSIONS)],
        "capabilities": {**view.capabilities, **LIST_CHANGED_CAPABILITIES,
                         **tasks.capabilities(gw, req, view, msg.era)},
        "ttlMs": view.ttl_ms,
        "cacheScope": gw.cache_scope(req),
        "resultType": "complete",
        "_meta": {jsonrpc.META_SERVER_INFO: gw.server_info},
    }
    if gw.config.instructions:
        result["instructions"] = gw.config.instructions
    return Local.result(msg.id, result)


async def ping(gw: Gateway, req: Request, msg: Message) -> Local:
    if msg.era == MODERN:
        raise RpcError(jsonrpc.METHOD_NOT_FOUND, "Method not found: ping (removed in 2026-07-28)")
    return Local.result(msg.id, {})


async def set_level(gw: Gateway, req: Request, msg: Message) -> Local:
    """Remembered for the session, told to its open upstream sessions now and to later ones when they open."""
    if msg.era == MODERN:
        raise RpcError(jsonrpc.METHOD_NOT_FOUND, "Method not found: logging/setLevel (removed in 2026-07-28)")
    level = msg.params.get("level")
    if not isinstance(level, str) or level not in LOG_LEVELS:
        raise RpcError(jsonrpc.INVALID_PARAMS, f"Invalid params: level must be one of {', '.join(LOG_LEVELS)}")
    gw.sessions.record(req.session_nonce).log_level = level
    asyncio.get_running_loop().create_task(gw.tell_log_level(req.session_nonce.hex(), level, req.caller.subject,
                                                                req.bearer))
    return Local.result(msg.id, {})


async def notification(gw: Gateway, req: Request, msg: Message) -> Local:
    """Client notifications (initialized, progress, roots) are accepted and not relayed; cancelled goes to the
    upstream request it names (extproc/cancellation.py)."""
    if msg.method == "notifications/cancelled":
        await gw.cancel_request(req, msg)
    return Local(202, b"", {}, details="muster_edge_notification")
