"""The gateway's decisions for one HTTP request, independent of how Envoy delivers it.

`on_headers` answers what can be answered from the headers alone (GET, DELETE, Accept, Origin);
`on_body` parses the JSON-RPC message once and hands it to the handler for its method.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections.abc import Awaitable, Callable, Coroutine, Mapping, Sequence
from typing import Any

import orjson
from cachetools import LRUCache

from catalog.config import GatewayConfig
from catalog.manifests import MCPServer
from catalog.policy import Decision, ToolFacts
from catalog.view import Route, Target, View, restrict
from extproc import cancellation, core_tools, jsonrpc, schema_retry, task_share, tracing
from extproc.answer import Resend
from extproc.continuity import Continuity, state_key
from extproc.credentials import Broker, CredentialError
from extproc.edge_tools import EdgeTool, EdgeTools, ToolContext
from extproc.events import Events
from extproc.fleet import Fleet
from extproc.handlers import auth, calls, lifecycle, lists, subscriptions, tasks
from extproc.handlers.meta import META_TOOL_NAMES
from extproc.jsonrpc import INVALID_REQUEST, LEGACY, MODERN, Message, RpcError
from extproc.metrics import Metrics
from extproc.notify import Notifier
from extproc.peers import Peers
from extproc.replies import JSON, Forward, Local, ResponsePlan
from extproc.request import Caller, Request
from extproc.rewrite import (
    SseRewriter,
    invalid_answer,
    mapped_error,
    original_request_id,
    rewrite_json,
    split_namespaced,
)
from extproc.sessions import Cursors, Sessions
from extproc.task_ids import TaskIds, TaskIndex
from extproc.upstream import CLIENT_INFO, REPEATABLE, RETRY_HEADER, ROUTE_HEADER, UpstreamError, cluster_name
from extproc.upstream_sessions import SessionCapReached

log = logging.getLogger(__name__)
audit_log = logging.getLogger("muster_edge.audit")

Handler = Callable[["Gateway", Request, Message], Awaitable[Local | Forward]]

HANDLERS: dict[str, Handler] = {
    "initialize": lifecycle.initialize,
    "server/discover": lifecycle.discover,
    "ping": lifecycle.ping,
    "logging/setLevel": lifecycle.set_level,
    "tools/list": lists.list_items,
    "prompts/list": lists.list_items,
    "resources/list": lists.list_items,
    "resources/templates/list": lists.list_items,
    "tools/call": calls.call_tool,
    "prompts/get": calls.get_prompt,
    "resources/read": calls.read_resource,
    "completion/complete": calls.complete,
    "resources/subscribe": subscriptions.subscribe,
    "resources/unsubscribe": subscriptions.subscribe,
    "subscriptions/listen": subscriptions.listen,
    **tasks.HANDLERS,
}

TOOL_MODE_HEADER = "x-muster-tool-mode"
RESERVED_PREFIXES = ("core_", "workflow_")
_DROP_UPSTREAM = ("x-muster-tool-mode", "last-event-id", "cookie", "origin", "x-envoy-original-path", RETRY_HEADER)


def _accepts(accept: str) -> tuple[bool, bool]:
    types = {part.split(";")[0].strip().lower() for part in accept.split(",")}
    wildcard = "*/*" in types
    return (wildcard or "application/json" in types or "application/*" in types,
            wildcard or "text/event-stream" in types or "text/*" in types)


KNOWN_METHODS = frozenset((*HANDLERS, "notifications/initialized", "notifications/cancelled",
                           "notifications/progress", "notifications/roots/list_changed"))


class Gateway:
    def __init__(self, config: GatewayConfig, fleet: Fleet, sessions: Sessions, cursors: Cursors,
                 broker: Broker, metrics: Metrics | None = None) -> None:
        self.config = config
        self.fleet = fleet
        self.sessions = sessions
        self.cursors = cursors
        self.task_ids = TaskIds(sessions.sealer)
        self.task_index = TaskIndex()
        self.server_info = {"name": config.server_name, "version": CLIENT_INFO["version"]}
        self.pages: LRUCache[tuple[Any, ...], bytes] = LRUCache(maxsize=512)
        self.metrics = metrics or Metrics()
        self.broker = broker
        self.groups_claim = config.auth.groups_claim if config.auth else "groups"
        self._caller_views: LRUCache[tuple[Any, ...], View] = LRUCache(maxsize=1024)
        self._decisions: LRUCache[tuple[Any, ...], Decision] = LRUCache(maxsize=100_000)
        self._ids = itertools.count(1)
        self.peers: Peers | None = None
        fleet.owner_ended = sessions.owner_ended
        self._background: set[asyncio.Task[None]] = set()
        self.continuity = fleet.continuity = Continuity(config.redis_url, sessions.sealer, ttl_s=sessions.max_age_s)
        self.metrics.collectors.append(self._session_metrics)
        self.edge_tools = EdgeTools()
        self.events = Events(config.redis_url)
        core_tools.register_builtin(self)
        self.fleet.on_change = self._upstream_changed
        self.notifier = Notifier(self)
        self.fleet.on_lists = self.notifier.upstream_lists
        self.fleet.on_resource = lambda server, owner, uri: self.notifier.resource_updated(server, uri, owner)
        self.collisions: dict[str, list[str]] = {}
        self.inflight = cancellation.Tracker()
        # read the catalog folder now if it changed (set by the server; a name this worker does not know yet)
        self.recheck_catalog: Callable[[], bool] = lambda: False
        self.answers = cancellation.Answers()
        self._cancels: set[asyncio.Task[None]] = set()

    def _upstream_changed(self, server: MCPServer, owner: str, up: bool, why: str) -> None:
        self.events.record("MCPServer", server.name, "Connected" if up else "Failed",
                           f"{server.name} is reachable" if up else f"{server.name} failed: {why}",
                           event_type="Normal" if up else "Warning", subject=owner)

    def set_catalog(self, servers: Sequence[MCPServer], errors: Sequence[Any]) -> None:
        """A catalog (re)load: swapped into the fleet and recorded as events (reload, each refused manifest)."""
        before = set(self.fleet.errors)
        self.fleet.set_catalog(servers, errors)
        self.notifier.view_changed("catalog", relay=False)  # every worker reads the catalog itself
        self.events.record("Catalog", "catalog", "Reloaded", f"{len(servers)} MCPServers admitted, "
                                                             f"{len(errors)} refused")
        for err in errors:
            if err not in before:
                self.events.record("Catalog", "catalog", "Refused", str(err), event_type="Warning")

    def reserved(self, name: str) -> bool:
        """Names answered at the edge: a backend tool exposed under one is left out (and named in the status)."""
        if name in self.edge_tools:
            return True
        return self.config.tool_mode != "native" and (name in META_TOOL_NAMES or name.startswith(RESERVED_PREFIXES))

    def status(self) -> dict[str, Any]:
        out = self.fleet.status()
        view = self.fleet.view()
        out["collisions"] = sorted(name for name in view.tool_routes if self.reserved(name))
        out["toolMode"] = self.config.tool_mode
        out["notifications"] = self.notifier.status()
        return out

    def tool_mode(self, req: Request) -> str:
        """native | meta | both for this request: the setting, narrowed to meta by X-Muster-Tool-Mode."""
        mode = self.config.tool_mode
        if mode == "both" and req.headers.get(TOOL_MODE_HEADER, "").strip().lower() == "meta":
            return "meta"
        return mode

    def edge_listing(self, req: Request, era: str) -> tuple[dict[str, Any], ...]:
        """The edge tools this caller has (availability and policy), as listed in a native tools/list."""
        ctx = ToolContext(self, req, era)
        return tuple(dict(t.definition) for t in self.edge_tools.for_caller(ctx, lambda t: self.edge_allowed(req, t)))

    def edge_allowed(self, req: Request, tool: EdgeTool) -> bool:
        route, target = tool.route()
        return self.decide(req, route, target).allowed

    def cache_scope(self, req: Request) -> str:
        """Lists are filtered per caller (policy, toolset), so they are private whenever callers differ."""
        return "private" if req.caller.verified or req.toolset else "public"

    def decide(self, req: Request, route: Route, target: Target) -> Decision:
        """The policy's decision for this caller on one (tool, upstream) pair; the toolset can only narrow.

        Remembered per caller view, so the audit line of a call costs a lookup, not the rules again.
        """
        if req.view_key is None:
            return self._decide(req, route, target)
        key = (req.view_key, route.exposed, target.server)
        decision = self._decisions.get(key)
        if decision is None:
            decision = self._decisions[key] = self._decide(req, route, target)
        return decision

    def _decide(self, req: Request, route: Route, target: Target) -> Decision:
        policy = self.config.policy
        facts = ToolFacts(route.exposed, target.original, target.server, route.family,
                          target.definition.get("annotations") or {})
        decision = policy.decide(facts, req.caller.claims)
        if decision.allowed and not policy.toolset_allows(req.toolset, facts):
            return Decision(False, f"toolset:{req.toolset}")
        return decision

    async def current_view(self, req: Request) -> View:
        """The caller's own view: the fleet's current view, narrowed by the policy and the toolset."""
        await self.fleet.ready(req.caller.subject, req.bearer)
        return self.view_for(req)

    def view_for(self, req: Request) -> View:
        base = self.fleet.view(req.caller.subject)
        key = req.view_key = (base.fingerprint, req.caller.claims.key, req.toolset, self.edge_tools.generation)
        view = self._caller_views.get(key)
        if view is None:
            def allowed(route: Route, target: Target) -> bool:
                return not self.reserved(route.exposed) and self.decide(req, route, target).allowed

            view = self._caller_views[key] = restrict(base, allowed, key)
        return view

    def audit(self, req: Request, *, tool: str, decision: str, rule: str, server: str = "",
              upstream_tool: str = "") -> None:
        """One structured line per decision on a call (`auditVolume`: all, denied only, or none; the decision
        counter counts every one); never a token or header value."""
        volume = self.config.audit_volume
        if volume == "all" or (volume == "denied" and decision != "allow"):
            self._audit_line(req, tool, decision, rule, server, upstream_tool)
        if tracing.ON:
            tracing.annotate_current({"gen_ai.tool.name": tool, "muster_edge.decision": decision,
                                      "muster_edge.rule": rule})
        self.metrics.inc("muster_edge_policy_decisions_total", decision=decision, rule=rule, server=server)

    def _audit_line(self, req: Request, tool: str, decision: str, rule: str, server: str, upstream_tool: str) -> None:
        fields = {"event": "tools/call", "subject": req.caller.subject, "tool": tool, "upstream_tool": upstream_tool,
                  "server": server, "decision": decision, "rule": rule, "toolset": req.toolset or "full"}
        # a refusal is written at once (with the lines batched before it); allowed calls wait for their batch
        audit_log.info("%s", orjson.dumps(fields).decode(), extra={"fields": fields, "urgent": decision != "allow"})

    # ---- headers ------------------------------------------------------------------------------------------
    def _host_allowed(self, authority: str) -> bool:
        """DNS-rebinding protection: with allowedHosts set (the default on loopback), Host must be one of them."""
        allowed = self.config.allowed_hosts
        if not allowed:
            return True
        authority = authority.lower()
        host = authority.rsplit(":", 1)[0] if not authority.endswith("]") else authority
        return authority in allowed or host in allowed

    def _origin_ok(self, req: Request) -> bool:
        if not self._host_allowed(req.headers.get(":authority", "")):
            return False
        origin = req.headers.get("origin")
        if origin is None or origin in self.config.allowed_origins:
            return True
        host = origin.split("://", 1)[-1].rstrip("/")
        return host == req.headers.get(":authority", "") or (bool(self.config.allowed_hosts) and
                                                           self._host_allowed(host))

    def token_ends_at(self, caller: Caller) -> float:
        """When Envoy stops accepting the caller's token (its `exp` plus the allowed clock skew); 0: never."""
        if not caller.expires_at or self.config.auth is None:
            return 0.0
        return caller.expires_at + self.config.auth.clock_skew_s

    def _authorized(self, req: Request) -> Local | None:
        """Envoy verified the token; here: fail closed without verified claims, 403 without required scopes."""
        auth = self.config.auth
        if auth is None:
            return None
        # Envoy compares `exp` in whole seconds; a token past it by less than a second still reaches us, and a stream
        # ended at its expiry (extproc/notify.py) must not be reopened with it
        ends_at = self.token_ends_at(req.caller)
        expired = bool(ends_at) and time.time() >= ends_at
        if not req.caller.verified or expired:
            challenge = f'resource_metadata="{self.config.prm_url}"'
            if auth.required_scopes:
                challenge += f', scope="{" ".join(auth.required_scopes)}"'
            if "authorization" in req.headers:
                why = "Jwt is expired" if expired else req.caller.auth_error.replace('"', "'") or "invalid token"
                challenge = f'error="invalid_token", error_description="{why}", {challenge}'
            refused = Local.error(RpcError(INVALID_REQUEST, "Unauthorized: this gateway needs a valid bearer token "
                                           "issued for it", status=401), MODERN)
            refused.headers["www-authenticate"] = f"Bearer {challenge}"
            refused.details = "muster_edge_unauthorized"
            return refused
        missing = [s for s in auth.required_scopes if s not in req.caller.claims.scopes]
        if missing:
            challenge = (f'Bearer error="insufficient_scope", scope="{" ".join(auth.required_scopes)}", '
                         f'resource_metadata="{self.config.prm_url}"')
            err = RpcError(INVALID_REQUEST, f"Forbidden: the token lacks the scope {' '.join(missing)}", status=403)
            local = Local.error(err, MODERN)
            local.headers["www-authenticate"] = challenge
            return local
        return None

    async def on_headers(self, req: Request, end_of_stream: bool) -> Local | Forward | None:
        oauth = self.config.upstream_oauth
        if oauth is not None and req.path.split("?", 1)[0] == oauth.callback_path:
            return await auth.callback(self, req)
        if req.path.split("?", 1)[0] != self.config.path:
            return self._refusal(404, f"Not Found: the MCP endpoint is {self.config.path}", "muster_edge_no_such_path")
        refused = self._authorized(req)
        if refused is not None:
            return refused
        mode = req.headers.get(TOOL_MODE_HEADER, "").strip().lower()
        if mode and (mode not in ("meta", "native") or (mode == "meta" and self.config.tool_mode == "native")):
            why = (f"the gateway's toolMode is {self.config.tool_mode}; set toolMode: both or meta to use it"
                   if mode == "meta" else "use meta or native")
            return Local.error(RpcError(INVALID_REQUEST, f"X-Muster-Tool-Mode: {mode!r} is not available: {why}",
                                        status=400), MODERN)
        if not self.config.policy.known_toolset(req.toolset):
            known = ", ".join(["full", "read-only", "none", *self.config.policy.toolsets])
            return Local.error(RpcError(INVALID_REQUEST, f"Unknown toolset {req.toolset!r} (known: {known})",
                                        status=400), MODERN)
        if not self._origin_ok(req):
            return Local.error(RpcError(INVALID_REQUEST, "Forbidden: Host or Origin not allowed", status=403), MODERN)
        method = req.http_method
        if method == "POST":
            has_json, has_sse = _accepts(req.headers.get("accept", ""))
            if not (has_json and has_sse):
                return Local.error(RpcError(INVALID_REQUEST, "Not Acceptable: Client must accept both "
                                            "application/json and text/event-stream", status=406), MODERN)
            ctype = req.headers.get("content-type", "").split(";")[0].strip().lower()
            if ctype != "application/json":
                return Local.error(RpcError(INVALID_REQUEST, "Unsupported Media Type: Content-Type must be "
                                            "application/json", status=415), MODERN)
            if end_of_stream:
                return Local.error(RpcError(jsonrpc.PARSE_ERROR, "Parse error: empty body"), MODERN)
            return None
        if method == "DELETE":
            return await self._end_session(req)
        if method == "GET" and "last-event-id" in req.headers and "mcp-session-id" in req.headers:
            return await self._resume(req)
        if method == "GET" and "mcp-session-id" in req.headers:
            return await self._listen_stream(req)
        refused = self._refusal(405, f"Method Not Allowed: {method} (use POST; DELETE ends a session)",
                                "muster_edge_method_not_allowed")
        refused.headers["allow"] = "POST, DELETE"
        return refused

    @staticmethod
    def _refusal(status: int, message: str, details: str) -> Local:
        """An HTTP refusal that says why as a JSON-RPC error (id null: no message was read), so a client shows it."""
        local = Local.error(RpcError(INVALID_REQUEST, message, status=status), MODERN)
        local.details = details
        return local

    async def _resume(self, req: Request) -> Local | Forward:
        """A legacy client resuming an SSE stream: the event id names the upstream session to resume on (held
        here, or with a store opened by another worker or replica)."""
        token = self.sessions.open(req.headers["mcp-session-id"], req.caller.subject)
        if token is None:
            return Local.error(RpcError(INVALID_REQUEST, "Session not found", status=404), LEGACY)
        if self.peers is not None and self.peers.shared and await self.peers.ended(token.nonce):
            return Local.error(RpcError(INVALID_REQUEST, "Session not found", status=404), LEGACY)
        split = split_namespaced(req.headers["last-event-id"])
        hs = await self._session_of(req, split[0], token.nonce.hex()) if split else None
        if split is None or hs is None:
            return Local.error(RpcError(INVALID_REQUEST, "Unknown Last-Event-ID for this session", status=404),
                               LEGACY)
        server = self.fleet.servers[split[0]]
        headers = self._upstream_headers(server.name, hs.version, b"")
        headers.update({**hs.auth, "mcp-session-id": hs.session_id, "last-event-id": split[1],
                        "accept": "text/event-stream"})
        del headers["content-length"]
        plan = ResponsePlan(server=server.name, namespace=server.name, upstream_session_owner=token.nonce.hex())
        return Forward(cluster_name(server.name), b"", headers, self._dropped(req, headers), plan)

    async def _listen_stream(self, req: Request) -> Local | Forward:
        """A handshake-era client's GET stream: its session checked here, the stream served by the notifier."""
        if "text/event-stream" not in req.headers.get("accept", "") and "*/*" not in req.headers.get("accept", ""):
            return Local.error(RpcError(INVALID_REQUEST, "Not Acceptable: Client must accept text/event-stream",
                                        status=406), LEGACY)
        try:
            await self._check_session(req)
        except RpcError as err:
            return Local.error(err, LEGACY)
        return self.notifier.open_get(req, req.session_nonce)

    async def _end_session(self, req: Request) -> Local:
        sid = req.headers.get("mcp-session-id")
        if not sid:
            return Local.error(RpcError(INVALID_REQUEST, "Bad Request: Missing session ID", status=400), LEGACY)
        token = self.sessions.open(sid, req.caller.subject)
        if token is None:
            return Local.error(RpcError(INVALID_REQUEST, "Session not found", status=404), LEGACY)
        ended = [(token.nonce, token.issued_at)]
        self.end_here(ended, "deleted")
        if self.peers is not None:  # the other workers and replicas know before the client hears 200
            await self.peers.announce_end(ended, "deleted")
        # upstream sessions shared through the store: closed once, by the process that ends the session
        await self.fleet.close_shared(token.nonce.hex(), "deleted", subject=req.caller.subject, bearer=req.bearer)
        return Local(200, b"", {}, details="muster_edge_session_ended")

    # ---- session lifecycle --------------------------------------------------------------------------------
    def end_here(self, ended: list[tuple[bytes, int]], reason: str) -> None:
        """End sessions in this process: refuse their ids from now on and close the upstream sessions held here."""
        for nonce, issued_at in ended:
            self.sessions.end(nonce, issued_at)
            self.fleet.end_sessions(nonce.hex(), reason)
            self.notifier.session_ended(nonce.hex())

    def seen_here(self, nonces: list[bytes]) -> list[bytes]:
        return [n for n in nonces if self.sessions.seen_within(n, self.sessions.idle_timeout_s)]

    def peer_message(self, body: bytes) -> tuple[int, bytes]:
        if self.peers is None:
            return 404, b"not found\n"
        msg = self.peers.open(body)
        if msg is not None and task_share.on_peer_message(self, msg):
            return 200, b"[]"
        return self.peers.handle(body, self.end_here, self.seen_here, self.lost_here, self.claim_here)

    async def expire_idle(self) -> int:
        """Expire sessions idle for the timeout everywhere (asking the other processes first); a session still
        in use elsewhere only gives back what this process held for it. Returns how many ended."""
        idle = self.sessions.idle()
        elsewhere: set[bytes] = set()
        if idle and self.peers is not None:
            elsewhere = await self.peers.seen_elsewhere([n for n, _ in idle])
        ended: list[tuple[bytes, int]] = []
        for nonce, rec in idle:
            if self.sessions.seen_within(nonce, self.sessions.idle_timeout_s):
                continue  # used again while we asked
            if nonce in elsewhere:
                self.fleet.end_sessions(nonce.hex(), "idle")
                self.sessions.forget(nonce)
            else:
                ended.append((nonce, rec.issued_at))
        self.end_here(ended, "idle")
        if ended and self.peers is not None:
            await self.peers.announce_end(ended, "idle")
        for nonce, _ in ended:
            await self.fleet.close_shared(nonce.hex(), "idle")
        self.fleet.close_idle_sessions(self.sessions.idle_timeout_s, self.sessions.holds_owner)
        return len(ended)

    async def sweep_sessions(self) -> None:
        every = min(30.0, max(0.25, self.sessions.idle_timeout_s / 4))
        while True:
            await asyncio.sleep(every)
            try:
                await self.expire_idle()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("expiring idle sessions failed")

    def session_status(self) -> dict[str, Any]:
        return {"live": len(self.sessions), "idleTimeoutSeconds": self.sessions.idle_timeout_s,
                "upstream": self.fleet.open_sessions()}

    def _session_metrics(self) -> str:
        return ("# HELP muster_edge_sessions_live Handshake-era gateway sessions this processor holds an entry for.\n"
                f"# TYPE muster_edge_sessions_live gauge\nmuster_edge_sessions_live {len(self.sessions)}\n"
                + self.fleet.session_metrics())

    # ---- body ---------------------------------------------------------------------------------------------
    async def on_body(self, req: Request, body: bytes) -> Local | Forward:
        with tracing.span("muster_edge.decide") as span:
            decision = await self._on_body(req, body)
            method = req.message.method if req.message is not None else ""
            outcome = "routed" if isinstance(decision, Forward) else \
                "error" if decision.details.startswith("muster_edge_error") else "answered"
            if span is not None:
                tracing.annotate(span, {"mcp.method.name": method if method in KNOWN_METHODS else "other",
                                        "muster_edge.outcome": outcome,
                                        "muster_edge.server": decision.plan.server if isinstance(decision, Forward)
                                        else ""})
        # only methods the gateway knows become label values: client input must not grow the metric
        self.metrics.inc("muster_edge_requests_total", method=method if method in KNOWN_METHODS else "other",
                         outcome=outcome)
        return decision

    async def _on_body(self, req: Request, body: bytes) -> Local | Forward:
        era = MODERN if req.headers.get("mcp-protocol-version", "") not in ("", *jsonrpc.HANDSHAKE_VERSIONS) \
            else LEGACY
        msg_id: Any = None
        try:
            if req.duplicated:
                raise RpcError(jsonrpc.HEADER_MISMATCH, f"Duplicated routing header: {req.duplicated[0]}")
            obj = jsonrpc.parse(body)
            if isinstance(obj, dict):
                msg_id = obj.get("id") if isinstance(obj.get("id"), (str, int)) else None
                if era == LEGACY and "method" not in obj and ("result" in obj or "error" in obj):
                    await self._check_session(req)
                    return await self._relay_response(req, obj)
            msg = jsonrpc.classify(obj, req.headers)
            req.message = msg
            era = msg.era
            if msg.era == LEGACY and msg.method != "initialize":
                await self._check_session(req)
            if msg.era == MODERN and "requestState" in msg.params:
                await self._check_request_state(req, msg)
            if msg.is_notification:
                return await lifecycle.notification(self, req, msg)
            handler = HANDLERS.get(msg.method)
            if handler is None:
                raise RpcError(jsonrpc.METHOD_NOT_FOUND, f"Method not found: {msg.method}")
            return await handler(self, req, msg)
        except RpcError as err:
            return Local.error(err, era, msg_id)

    async def _check_session(self, req: Request) -> None:
        sid = req.headers.get("mcp-session-id")
        if not sid:
            raise RpcError(INVALID_REQUEST, "Bad Request: Missing session ID", status=400)
        token = self.sessions.open(sid, req.caller.subject)
        if token is None:
            raise RpcError(INVALID_REQUEST, "Session not found", status=404)
        if self.peers is not None and self.peers.shared:
            if await self.peers.ended(token.nonce):  # ended on another replica
                self.end_here([(token.nonce, token.issued_at)], "deleted")
                raise RpcError(INVALID_REQUEST, "Session not found", status=404)
            await self.peers.touch(token.nonce)
        req.session_nonce = token.nonce
        caps = orjson.loads(token.capabilities or b"{}")
        req.client_capabilities = caps if isinstance(caps, dict) else {}
        req.log_level = self.sessions.record(token.nonce, token.issued_at).log_level

    async def _check_request_state(self, req: Request, msg: Message) -> None:
        """A requestState belongs to the caller it was handed to: another caller presenting it is refused."""
        try:
            mine = await self.bind_request_state(msg.params["requestState"], req.caller.key)
        except Exception as exc:  # fail closed: an unchecked state never goes upstream
            log.warning("checking a requestState in the store failed: %s", type(exc).__name__)
            raise RpcError(jsonrpc.INTERNAL_ERROR, "muster-edge: the shared store is unavailable; retry later",
                           status=503) from None
        if not mine:
            raise RpcError(jsonrpc.INVALID_PARAMS, "Invalid params: this requestState was issued to another caller; "
                           "start the request again without it", {"reason": "requestStateNotYours"}, status=400)

    async def bind_request_state(self, state: Any, caller: str) -> bool:
        """Bind a requestState to a caller, or check it (False: another caller holds it): in the store when there
        is one; else in this worker and, the first time this worker sees it, in every sibling worker (2026-07-28
        requests carry no session, so they are not pinned to a worker)."""
        if self.continuity.shared or self.peers is None or not self.peers.siblings:
            return await self.continuity.bind_state(state, caller)
        key = state_key(state)
        holder, new = self.continuity.claim_here(key, caller)
        if new:
            holder = await self.peers.claim_state(key, caller)
            if holder != caller:
                self.continuity.hold_here(key, holder)
        return holder == caller

    def claim_here(self, key: str, caller: str) -> str:
        return self.continuity.claim_here(key, caller)[0]

    async def _session_of(self, req: Request, server_name: str, owner: str) -> Any:
        """The gateway session's upstream session on one server: held here, or (with a store) adopted from the
        process that opened it, with this process's own credential for it."""
        hs = self.fleet.pooled_session(server_name, owner, req.caller.subject)
        if hs is not None or server_name not in self.fleet.servers or not self.continuity.shared:
            return hs
        try:
            credential = await self.broker.credential(self.fleet.servers[server_name], req.caller.subject,
                                                      req.bearer)
        except CredentialError:
            return None
        return await self.fleet.shared_session(server_name, owner, req.caller.subject, credential.headers)

    async def _relay_response(self, req: Request, obj: dict[str, Any]) -> Forward:
        """A legacy client's answer to a server-to-client request goes back to the upstream session that asked
        (whichever worker or replica opened it, when they share a store)."""
        split = split_namespaced(obj.get("id"))
        hs = await self._session_of(req, split[0], req.session_nonce.hex()) if split else None
        if split is None or hs is None:
            raise RpcError(INVALID_REQUEST, "Invalid Request: this response answers no request of this session",
                           status=400)
        body = jsonrpc.dumps({**obj, "id": original_request_id(split[1])})
        headers = self._upstream_headers(split[0], hs.version, body)
        headers.update({**hs.auth, "mcp-session-id": hs.session_id})
        plan = ResponsePlan(server=split[0], upstream_session_owner=req.session_nonce.hex())
        return Forward(cluster_name(split[0]), body, headers, self._dropped(req, headers), plan)

    def _upstream_headers(self, server_name: str, version: str, body: bytes) -> dict[str, str]:
        server = self.fleet.servers[server_name]
        return {
            ":path": server.path,
            ":authority": server.authority,
            ROUTE_HEADER: cluster_name(server_name),
            "content-length": str(len(body)),
            "mcp-protocol-version": version,
            # the manifest timeout bounds the wait for the answer to start (a per-try timeout ends when response
            # headers arrive; the route's own timeout is off), never a stream that is still sending
            "x-envoy-upstream-rq-per-try-timeout-ms": str(server.timeout * 1000),
        }

    def core_tools(self) -> tuple[dict[str, Any], ...]:
        """core_auth_login / core_auth_logout, offered while the catalog has per-user OAuth servers."""
        if any(s.auth.type == "oauth" and not auth.sso_kind(s) for s in self.fleet.servers.values()):
            return auth.CORE_TOOLS
        return ()

    @property
    def offers_auth_status(self) -> bool:
        return self.config.auth is not None or any(self.broker.per_user(s) for s in self.fleet.servers.values())

    @staticmethod
    def _dropped(req: Request, keep: Mapping[str, str] | None = None) -> list[str]:
        """Inbound headers that never reach an upstream as they came (re-derived ones are set instead); the
        caller's Authorization is removed unless the credential set one (forwarding sets it unchanged)."""
        keep = keep or {}
        return [h for h in req.headers if (h.startswith("mcp-") or h in _DROP_UPSTREAM or h == "authorization")
                and h not in keep and h != "mcp-protocol-version"]

    async def tell_log_level(self, owner: str, level: str, subject: str = "", bearer: str = "") -> None:
        """Tell the session's upstream sessions the level: those held here and, with a store, those other
        processes opened (and those they open later: the level is kept in the store too)."""
        held = self.fleet.sessions_of(owner)
        if self.continuity.shared:
            try:
                await self.continuity.set_level(owner, level)
                shared = await self.continuity.all_of(owner)
            except Exception as exc:
                log.warning("sharing the log level failed: %s", type(exc).__name__)
                shared = {}
            mine = {s.name for s, _ in held}
            for name, hs in shared.items():
                server = self.fleet.servers.get(name)
                if server is None or name in mine:
                    continue
                with contextlib.suppress(CredentialError):
                    hs.auth = dict((await self.broker.credential(server, subject, bearer)).headers)
                    held.append((server, hs))
        for server, hs in held:
            if "logging" in hs.capabilities:
                try:
                    await self.fleet.client.request(server, hs, "logging/setLevel", {"level": level})
                except Exception as exc:
                    log.info("telling %s the log level failed: %s", server.name, exc)

    # ---- forwarding ---------------------------------------------------------------------------------------
    async def forward(self, req: Request, msg: Message, server_name: str, params: dict[str, Any], *,
                      name: str | None = None, header_map: Mapping[tuple[str, ...], str] | None = None,
                      arguments: Mapping[str, Any] | None = None, repeatable: bool | None = None) -> Forward:
        """Re-originate the request for one upstream: body, routing headers and credentials recomputed.
        `repeatable` (default: reads are) lets Envoy resend it once after a connection reset."""
        owner = req.session_nonce.hex() if req.session_nonce else req.caller.key
        server = self.fleet.servers[server_name]
        why = self.fleet.unavailable(server_name, req.caller.subject)
        if why is not None:  # known down or frozen: fail fast, naming it; a background probe brings it back
            raise RpcError(jsonrpc.INTERNAL_ERROR, f"Upstream server '{server_name}' is unavailable",
                           {"server": server_name, "reason": why}, status=502)
        try:
            credential = await self.broker.credential(server, req.caller.subject, req.bearer)
        except CredentialError as exc:
            raise RpcError(jsonrpc.INTERNAL_ERROR, f"Upstream server '{server_name}': {exc.reason}",
                           {"server": server_name, "authRequired": exc.auth_required}, status=502) from None
        try:
            hs = await self.fleet.session_for(server_name, owner, req.client_capabilities, req.log_level,
                                              subject=req.caller.subject, auth=credential.headers)
        except SessionCapReached as exc:
            raise RpcError(jsonrpc.INTERNAL_ERROR, f"Upstream server '{server_name}' has too many open sessions "
                           f"({exc.cap}, all in active use); retry later",
                           {"server": server_name, "reason": "sessionLimit", "limit": exc.cap}) from None
        except Exception as exc:
            self.fleet.suspect(server_name, req.caller.subject if self.broker.per_user(server) else "")
            raise RpcError(jsonrpc.INTERNAL_ERROR, f"Upstream server '{server_name}' is unavailable: {exc}",
                           {"server": server_name}, status=502) from None
        meta = {k: v for k, v in msg.meta.items() if not k.startswith("io.modelcontextprotocol/")}
        if hs.era == MODERN:
            meta[jsonrpc.META_VERSION] = hs.version
            meta[jsonrpc.META_CAPABILITIES] = msg.meta.get(jsonrpc.META_CAPABILITIES, {}) if msg.era == MODERN else {}
            meta[jsonrpc.META_CLIENT_INFO] = CLIENT_INFO
            if jsonrpc.META_LOG_LEVEL in msg.meta:
                meta[jsonrpc.META_LOG_LEVEL] = msg.meta[jsonrpc.META_LOG_LEVEL]
        params = dict(params)
        if meta:
            params["_meta"] = meta
        else:
            params.pop("_meta", None)
        shared_session = hs.era == LEGACY and not req.session_nonce
        upstream_id = next(self._ids) if shared_session else msg.id
        body = jsonrpc.dumps({"jsonrpc": "2.0", "id": upstream_id, "method": msg.method, "params": params})
        set_headers = self._upstream_headers(server_name, hs.version, body)
        set_headers.update(credential.headers)
        if repeatable or (repeatable is None and msg.method in REPEATABLE):
            set_headers[RETRY_HEADER] = "1"
        if hs.era == MODERN:
            set_headers["mcp-method"] = msg.method
            if name is not None:
                set_headers["mcp-name"] = jsonrpc.encode_header_value(name)
            if header_map and arguments is not None:
                set_headers.update(jsonrpc.param_headers(header_map, arguments))
        elif hs.session_id:
            set_headers["mcp-session-id"] = hs.session_id
        remove = self._dropped(req, set_headers)
        view = self.view_for(req)
        snap = self.fleet.state_for(server_name, req.caller.subject).snapshot
        has_uris = snap is not None and bool(snap.resources or snap.templates)
        map_uris = server_name in view.uri_slug_of and (msg.method == "resources/read" or has_uris)
        plan = ResponsePlan(
            server=server_name, client_id=msg.id, restore_id=shared_session, modern_client=msg.era == MODERN,
            map_uris=map_uris, upstream_session_owner=owner if hs.era == LEGACY else "",
            namespace=server_name if msg.era == LEGACY and hs.era == LEGACY else "",
            renewable=credential.kind in ("exchanged", "oauth"), subject=req.caller.subject, upstream_id=upstream_id,
        )
        plan.rewrite_body = shared_session or map_uris or (msg.era == MODERN and hs.era == LEGACY)
        plan.resend_on_mismatch = hs.era == MODERN and msg.method == "tools/call"
        return Forward(cluster_name(server_name), body, set_headers, remove, plan,
                       credential_keys=tuple(k.lower() for k in credential.headers))

    async def upstream_session_lost(self, plan: ResponsePlan) -> None:
        """The upstream answered 404: the session is gone. This answer's stream may run in another worker than the
        one holding the session (answer streams are balanced, not pinned), and with a store several processes
        hold it: all of them forget it, so the client's retry opens a new one. The answer waits for the news to be
        delivered (at most 1 s): a client that retries at once must not meet the lost session again."""
        if not plan.upstream_session_owner:
            return
        self.lost_here(plan.server, plan.upstream_session_owner, plan.subject)
        if self.peers is not None and (self.peers.siblings or self.peers.shared):
            task = asyncio.get_running_loop().create_task(
                self.peers.announce_lost(plan.server, plan.upstream_session_owner, plan.subject))
            self._background.add(task)
            task.add_done_callback(self._background.discard)
            await asyncio.wait([task], timeout=1.0)

    def lost_here(self, server: str, owner: str, subject: str) -> None:
        self.fleet.forget_session(server, owner, subject)
    # ---- cancellation -------------------------------------------------------------------------------------
    def track(self, req: Request, fwd: Forward, close_stream: Callable[[], Awaitable[None]]
              ) -> tuple[tuple[str, str, Any], cancellation.InFlight] | None:
        """Remember where a handshake-era client's routed request went, so its notifications/cancelled can follow
        it (a 2026-07-28 client cancels by closing its stream: Envoy resets the upstream request itself)."""
        msg = req.message
        if not req.session_nonce or msg is None or msg.id is None or fwd.plan.upstream_id is None:
            return None
        plan = fwd.plan
        entry = cancellation.InFlight(plan.server, plan.upstream_id, LEGACY if plan.upstream_session_owner else MODERN,
                                      plan.upstream_session_owner, plan.subject, close_stream)
        return self.inflight.add(req.session_nonce.hex(), msg.id, entry), entry

    @staticmethod
    def watches_disconnect(plan: ResponsePlan) -> bool:
        """A 2026-07-28 client's call on a shared handshake-era upstream session: its disconnect is its cancel, and
        that upstream must be told (it does not read a closed connection as one)."""
        return plan.restore_id and plan.modern_client and bool(plan.upstream_session_owner)

    def answer_complete(self, plan: ResponsePlan) -> None:
        """An answer filter saw this call's answer complete (only watched calls are remembered)."""
        if self.watches_disconnect(plan):
            self.answers.seen(plan.server, plan.upstream_session_owner, plan.upstream_id)

    def request_ended(self, plan: ResponsePlan) -> None:
        """A watched call's request stream ended: without its answer seen, the client closed its stream. Looked at
        a moment later: the answer filter's stream and this one end at about the same time."""
        asyncio.get_running_loop().call_later(cancellation.ANSWER_GRACE_S, self._ended_unanswered, plan)

    def _ended_unanswered(self, plan: ResponsePlan) -> None:
        if self.answers.was_seen(plan.server, plan.upstream_session_owner, plan.upstream_id):
            return
        params = {"requestId": plan.upstream_id, "reason": "the client closed its stream"}
        self._spawn_cancel(self._tell_cancelled(plan.server, plan.upstream_session_owner, plan.subject, params))

    async def _tell_cancelled(self, server_name: str, owner: str, subject: str, params: dict[str, Any]) -> None:
        """notifications/cancelled to a handshake-era upstream, on the session the request went on."""
        server = self.fleet.servers.get(server_name)
        hs = self.fleet.pooled_session(server_name, owner, subject)
        if server is None or hs is None:
            return
        log.info("request %r to %s cancelled: telling it", params["requestId"], server_name)
        try:
            await self.fleet.client.notify(server, hs, "notifications/cancelled", params)
        except Exception as exc:  # nobody waits for this: log it
            log.info("telling %s about a cancelled request failed: %s", server_name, exc)

    async def cancel_request(self, req: Request, msg: Message) -> None:
        """A handshake-era client's notifications/cancelled: the upstream request it names is cancelled there."""
        request_id = cancellation.cancelled_id(msg.params)
        if not req.session_nonce or request_id is None:
            return
        owner = req.session_nonce.hex()
        if await self._cancel_held(owner, request_id, msg.params):
            return
        # finished, never routed, or held by another worker or replica (sessions move between them when a store is
        # shared): whichever holds it cancels it; the spec lets a cancel for a finished request pass
        if self.peers is not None:
            await self.peers.announce_cancel(owner, request_id, msg.params)

    def cancel_here(self, owner: str, request_id: Any, params: dict[str, Any]) -> None:
        """Another process's cancel: cancel the request if this process routed it (peers.on_cancel)."""
        if cancellation.cancelled_id({"requestId": request_id}) is None:
            return

        async def cancel() -> None:
            await self._cancel_held(owner, request_id, params)

        self._spawn_cancel(cancel())

    def _spawn_cancel(self, work: Coroutine[Any, Any, None]) -> None:
        """Cancel work nobody waits for, kept referenced until it ends."""
        task = asyncio.get_running_loop().create_task(work)
        self._cancels.add(task)
        task.add_done_callback(self._cancels.discard)

    async def _cancel_held(self, owner: str, request_id: Any, params: dict[str, Any]) -> bool:
        """Cancel the request if this process holds it; whether it did."""
        entry = self.inflight.take(owner, request_id)
        if entry is None:
            return False
        if entry.upstream_era == MODERN:
            log.info("client cancelled request %r: ending its stream to %s", request_id, entry.server)
            try:
                await entry.close_stream()
            except Exception as exc:  # the request ended meanwhile: nothing left to cancel
                log.info("ending a cancelled request's stream failed: %s", exc)
            return True
        await self._tell_cancelled(entry.server, entry.session_owner, entry.subject,
                                   cancellation.upstream_params(params, entry.upstream_id))
        return True

    def resend_for(self, req: Request, fwd: Forward) -> Resend | None:
        """What a resend needs: after a 401, for a call whose credential can be renewed; after an upstream's -32020,
        for a tools/call to a 2026-07-28 upstream (else None)."""
        if not fwd.plan.renewable and not fwd.plan.resend_on_mismatch:
            return None
        # the refused credential (and the caller's bearer where it stood) is replaced on the resend, never carried
        skip = {ROUTE_HEADER, "content-length", *fwd.credential_keys}
        hop = {"host", "connection", "transfer-encoding", "keep-alive", "upgrade", "te", "x-forwarded-proto",
               "x-request-id", *skip}
        headers = {k: v for k, v in req.headers.items()
                   if not k.startswith((":", "x-envoy-")) and k not in fwd.remove_headers and k not in hop}
        headers.update({k: v for k, v in fwd.set_headers.items() if not k.startswith(":") and k.lower() not in skip})
        return Resend(fwd.body, headers, req.bearer)

    async def retry_refused(self, plan: ResponsePlan, resend: Resend) -> Local:
        """The upstream refused a renewable credential (401): forget it, get a new one, and send the call once
        more from the processor (through Envoy's internal listener); its answer goes back as it came."""
        with tracing.span("muster_edge.resend", {"muster_edge.server": plan.server}) as span:
            outcome, answer = await self._resend(plan, resend)
            tracing.annotate(span, {"muster_edge.outcome": outcome})
        self.metrics.inc("muster_edge_upstream_retries_total", server=plan.server, outcome=outcome)
        return answer

    async def _resend(self, plan: ResponsePlan, resend: Resend) -> tuple[str, Local]:
        """(outcome for the retries counter, the answer)."""
        server = self.fleet.servers.get(plan.server)
        if server is None:
            return "server_gone", self.error_for_upstream_status(plan, 401, "upstream refused the credential")
        await self.broker.evict(server, plan.subject)
        try:
            credential = await self.broker.credential(server, plan.subject, resend.bearer)
        except CredentialError as exc:
            return "credential_failed", Local.error(RpcError(
                jsonrpc.INTERNAL_ERROR, f"Upstream server '{plan.server}': {exc.reason}", {"server": plan.server},
                status=502), MODERN, plan.client_id)
        return await self._post_again(plan, server, resend.body, {**resend.headers, **credential.headers},
                                      "muster_edge_retried_after_401")

    async def _post_again(self, plan: ResponsePlan, server: MCPServer, body: bytes, headers: dict[str, str],
                          details: str) -> tuple[str, Local]:
        """Send a call once more from the processor; (outcome for the retries counter, its answer for the client)."""
        try:
            status, ctype, body = await self.fleet.client.raw_post(server, body, headers)
        except UpstreamError as exc:
            return "unavailable", Local.error(RpcError(
                jsonrpc.INTERNAL_ERROR, f"Upstream server '{plan.server}' is unavailable: {exc}",
                {"server": plan.server}, status=502), MODERN, plan.client_id)
        if status in (401, 403):
            return "refused_again", Local.error(RpcError(
                jsonrpc.INTERNAL_ERROR, f"Upstream server '{plan.server}' refused the renewed credential",
                {"server": plan.server}, status=502), MODERN, plan.client_id)
        if status >= 400 and "json" in ctype:  # an error: the client's id, the server named (as on the first try)
            return f"upstream_{status}", Local(status if status < 500 else 502, mapped_error(body, plan, status),
                                               {"content-type": JSON}, details=details)
        if plan.rewrite_sse or plan.rewrite_body:
            view = self.fleet.view(plan.subject)
            if "event-stream" in ctype:
                body = SseRewriter(plan, view, self.server_info).feed(body, True)
            elif "json" in ctype:
                body = rewrite_json(body, plan, view, self.server_info) or body
        outcome = "ok" if status < 400 else f"upstream_{status}"
        return outcome, Local(status, body, {"content-type": ctype}, details=details)

    async def retry_mismatch(self, plan: ResponsePlan, resend: Resend, answer: bytes) -> Local:
        """A 2026-07-28 upstream answered -32020 (HeaderMismatch): the Mcp-Param-* headers came from a schema it no
        longer has. Its tools/list is fetched again now, the headers are rebuilt from the new schema, and the
        call is sent once more (through Envoy's internal listener); the answer to that goes back as it came.
        Without a resend, or when the fresh list no longer has the tool, the upstream's -32020 goes back."""
        first = Local(400, mapped_error(answer, plan, 400), {"content-type": JSON},
                      details="muster_edge_upstream_error")
        server = self.fleet.servers.get(plan.server)
        if server is None:
            return first
        snapshot = await self.fleet.refetch(plan.server, plan.subject)
        headers = schema_retry.rebuilt_headers(resend.headers, resend.body, snapshot.tools if snapshot else ())
        if headers is None:
            self.metrics.inc("muster_edge_upstream_retries_total", server=plan.server, outcome="schema_gone")
            return first
        try:
            credential = await self.broker.credential(server, plan.subject, resend.bearer)
        except CredentialError as exc:
            return Local.error(RpcError(jsonrpc.INTERNAL_ERROR, f"Upstream server '{plan.server}': {exc.reason}",
                                        {"server": plan.server}, status=502), MODERN, plan.client_id)
        outcome, local = await self._post_again(plan, server, resend.body, {**headers, **credential.headers},
                                                "muster_edge_retried_after_32020")
        log.info("upstream %s answered -32020: tools fetched again, call resent (%s)", plan.server, outcome)
        self.metrics.inc("muster_edge_upstream_retries_total", server=plan.server, outcome=f"schema_{outcome}")
        return local

    def upstream_failed(self, plan: ResponsePlan, status: int) -> None:
        """Count a routed call the upstream failed; a 5xx also makes the fleet check that server again."""
        self.metrics.inc("muster_edge_upstream_errors_total", server=plan.server, status=str(status))
        server = self.fleet.servers.get(plan.server)
        owner = plan.subject if server is not None and self.broker.per_user(server) else ""
        if status in (503, 504):
            self.fleet.down(plan.server, "timed out" if status == 504 else "unavailable (HTTP 503)", owner)
        elif status >= 500:
            self.fleet.suspect(plan.server, owner)

    def invalid_answer(self, plan: ResponsePlan, why: str, status: int | None = None) -> Local:
        """An upstream answer that cannot be read as MCP: a JSON-RPC error naming the server, never the answer."""
        self.metrics.inc("muster_edge_upstream_errors_total", server=plan.server, status="invalid")
        log.warning("upstream %s answered with an invalid response: %s", plan.server, why)
        return Local(502, invalid_answer(plan, why, status), {"content-type": JSON},
                     details="muster_edge_upstream_invalid_answer")

    def error_for_upstream_status(self, plan: ResponsePlan, status: int, details: str) -> Local:
        self.upstream_failed(plan, status)
        why = {503: "is unavailable", 504: "timed out", 502: "answered with an invalid response",
               404: "lost its session; retry the call",
               401: "refused the credential the gateway sent it (HTTP 401)"}.get(status, f"failed with HTTP {status}")
        err = RpcError(jsonrpc.INTERNAL_ERROR, f"Upstream server '{plan.server}' {why}",
                       {"server": plan.server, "status": status, "details": details}, status=502)
        if status == 404:
            err.status = 200
        return Local(err.http_status(MODERN), jsonrpc.error_body(plan.client_id, err.code, err.message, err.data),
                     {"content-type": JSON}, details="muster_edge_upstream_error")
