"""Per-user authentication at the edge: core_auth_login / core_auth_logout, the OAuth callback, auth://status.

Texts follow Muster's (`core_auth_login` answers with an authorization URL and `structuredContent.authUrl`;
`auth://status` lists each server's state for the calling user).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl, urlsplit

import orjson

from catalog.manifests import MCPServer
from extproc import jsonrpc
from extproc.jsonrpc import MODERN, Message
from extproc.oauth import LOGIN_LIMIT, OAuthError
from extproc.replies import Local
from extproc.request import Request

if TYPE_CHECKING:
    from extproc.gateway import Gateway

AUTH_STATUS_URI = "auth://status"
AUTH_STATUS_RESOURCE = {"uri": AUTH_STATUS_URI, "name": "auth-status", "mimeType": "application/json",
                        "description": "Each MCP server's connection and authentication state for you"}
_SERVER_ARG = {"type": "object", "properties": {"server": {"type": "string", "description": "The MCPServer name"}},
               "required": ["server"]}
CORE_TOOLS = (
    {"name": "core_auth_login", "inputSchema": _SERVER_ARG,
     "description": "Sign in to an MCP server that needs your own authorization (per-user OAuth): returns a URL "
                    "to open in a browser.",
     "annotations": {"readOnlyHint": True, "openWorldHint": True}},
    {"name": "core_auth_logout", "inputSchema": _SERVER_ARG,
     "description": "Forget your tokens for an MCP server you signed in to with core_auth_login.",
     "annotations": {"readOnlyHint": False, "destructiveHint": False, "openWorldHint": False}},
)
CORE_TOOL_NAMES = {t["name"] for t in CORE_TOOLS}
_HTML_HEADERS = {"content-type": "text/html; charset=utf-8", "x-content-type-options": "nosniff",
                 "x-frame-options": "DENY", "content-security-policy": "default-src 'none'; style-src 'unsafe-inline'",
                 "cache-control": "no-store", "referrer-policy": "no-referrer"}


def sso_kind(server: MCPServer) -> str:
    te = server.auth.token_exchange
    if te is not None and te.enabled:
        return "Exchanged"
    return "Forwarded" if server.auth.forward_token else ""


def _text_result(text: str, *, error: bool = False, structured: dict[str, Any] | None = None) -> dict[str, Any]:
    result: dict[str, Any] = {"content": [{"type": "text", "text": text}], "isError": error}
    if structured is not None:
        result["structuredContent"] = structured
    return result


def _finish(gw: Gateway, msg: Message, result: dict[str, Any]) -> Local:
    if msg.era == MODERN:
        result = {**result, "resultType": "complete", "_meta": {jsonrpc.META_SERVER_INFO: gw.server_info}}
    return Local.result(msg.id, result)


async def core_tool(gw: Gateway, req: Request, msg: Message, name: str, arguments: dict[str, Any]) -> Local:
    target = arguments.get("server")
    if not isinstance(target, str) or not target:
        return _finish(gw, msg, _text_result("Error: 'server' argument is required and must be a string", error=True))
    if name == "core_auth_login" and gw.broker.user_tokens is not None:
        left = await gw.broker.user_tokens.login_allowed(req.caller.key)
        if left < 0:
            return _finish(gw, msg, _text_result(
                "Rate limit exceeded. Too many authentication attempts. Please wait before trying again (at most "
                f"{LOGIN_LIMIT} a minute). Remaining attempts: 0", error=True))
    server = gw.fleet.servers.get(target)
    if server is None:
        return _finish(gw, msg, _text_result(f"Server '{target}' not found. Use list_tools to see available servers.",
                                             error=True))
    users = gw.broker.user_tokens
    subject = req.caller.subject
    if server.auth.type != "oauth" or sso_kind(server):
        text = (f"Server '{target}' uses SSO and is connected automatically. Manual login via core_auth_login is "
                "not supported for SSO servers." if sso_kind(server) else
                f"Server '{target}' does not require authentication.")
        return _finish(gw, msg, _text_result(text))
    if users is None:
        return _finish(gw, msg, _text_result(
            f"OAuth is not configured. Server '{target}' requires authentication but the gateway has no "
            "upstreamOAuth client.", error=True))
    if name == "core_auth_logout":
        existed = await users.logout(server, subject)
        gw.notifier.view_changed("logout", [target], subject)  # refetched; listening streams told what went
        return _finish(gw, msg, _text_result(f"Signed out of '{target}'." if existed else
                                             f"Server '{target}' had no tokens of yours."))
    if await users.token_for(server, subject) is not None:
        return _finish(gw, msg, _text_result(f"Server '{target}' is already authenticated."))
    try:
        url = await users.login_url(server, subject)
    except OAuthError as exc:
        return _finish(gw, msg, _text_result(str(exc), error=True))
    text = (f"Authentication Required\n\nServer: {target}\nStatus: Authentication required for {target}. Please "
            f"visit the link below to authenticate.\n\nPlease sign in to connect to this server:\n\n{url}\n\n"
            "After signing in, run this tool again to complete the connection.")
    return _finish(gw, msg, _text_result(text, structured={"authUrl": url}))


def status_of(gw: Gateway, req: Request) -> dict[str, Any]:
    """Each server's state as this caller sees it (no side effects: nothing is fetched)."""
    out = []
    for name in sorted(gw.fleet.servers):
        server = gw.fleet.servers[name]
        state = gw.fleet.state_for(name, req.caller.subject) if (req.caller.subject or not gw.broker.per_user(
            server)) else None
        described = gw.fleet.describe(state, server)
        entry: dict[str, Any] = {"name": name, "status": described["state"]}
        if sso_kind(server):
            entry["sso"] = sso_kind(server)
        if server.auth.type == "oauth" and not sso_kind(server):
            entry["auth_tool"] = "core_auth_login"
        if described.get("error") and described["state"] != "Connected":
            entry["error"] = described["error"]
        out.append(entry)
    return {"servers": out}


def status_text(status: dict[str, Any]) -> str:
    """The seed's format: `cluster-a-mcp-kubernetes   Connected [SSO: Exchanged]`."""
    lines = []
    width = max([len(s["name"]) for s in status["servers"]] + [20]) + 3
    for server in status["servers"]:
        line = f"{server['name']:<{width}}{server['status']}"
        if server.get("sso"):
            line += f" [SSO: {server['sso']}]"
        if server.get("error"):
            line += f" ({server['error']})"
        lines.append(line)
    return "\n".join(lines)


async def read_status(gw: Gateway, req: Request, msg: Message) -> Local:
    await gw.fleet.ready(req.caller.subject, req.bearer)
    text = orjson.dumps(status_of(gw, req)).decode()
    result: dict[str, Any] = {"contents": [{"uri": AUTH_STATUS_URI, "mimeType": "application/json", "text": text}]}
    if msg.era == MODERN:
        result.update(ttlMs=0, cacheScope="private", resultType="complete",
                      _meta={jsonrpc.META_SERVER_INFO: gw.server_info})
    return Local.result(msg.id, result)


def _page(title: str, text: str, status: int) -> Local:
    body = (f"<!doctype html><html><head><meta charset=utf-8><title>{title}</title></head><body style="
            f'"font-family:sans-serif;margin:3em"><h1>{title}</h1><p>{text}</p></body></html>').encode()
    return Local(status, body, dict(_HTML_HEADERS), details="muster_edge_oauth_callback")


async def callback(gw: Gateway, req: Request) -> Local:
    """The browser's return from an upstream's authorization server."""
    users = gw.broker.user_tokens
    if users is None or req.http_method != "GET":
        return _page("Not available", "Per-user OAuth is not configured on this gateway.", 404)
    query = dict(parse_qsl(urlsplit(req.path).query))
    try:
        outcome = await users.callback(query, gw.fleet.servers)
    except (OAuthError, KeyError, ValueError, TypeError) as exc:
        message = str(exc) if isinstance(exc, OAuthError) else "malformed callback"
        return _page("Sign-in failed", message.replace("<", "&lt;"), 400)
    if outcome.redirect:  # on to the gateway's own sign-in: it proves whose browser this is
        return Local(302, b"", {"location": outcome.redirect, "cache-control": "no-store",
                                "referrer-policy": "no-referrer"}, details="muster_edge_oauth_callback")
    server, subject = outcome.server, outcome.subject
    assert server is not None
    gw.notifier.view_changed("login", [server.name], subject)  # refetched; listening streams told what came
    gw.events.record("MCPServer", server.name, "LoggedIn", f"signed in to {server.name}", subject=subject)
    return _page("Signed in", f"You are signed in to {server.name}. You can close this window and go back to your "
                              "agent.", 200)

