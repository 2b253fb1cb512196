"""The notification channel: streams that tell listening clients when what they see changed.

ext_proc cannot stream an answer it makes itself (an ImmediateResponse is one body), so a listening client's
request is routed, like a tool call, to an HTTP endpoint of the processor itself: `POST /notify` on every
worker's status listener, known to Envoy as the cluster NOTIFY_CLUSTER. The request's own ext_proc stream does
every check first (token, Origin, session, the 2026-07-28 envelope) and seals what the stream needs — the
verified caller, the era, the filter, the session — into TICKET_HEADER, valid for TICKET_TTL_S; the endpoint
trusts nothing else a client could send it (a forged, replayed-late or foreign ticket is a 403).

Two kinds of stream, one registry:
- 2026-07-28 `subscriptions/listen`: acknowledged first (`notifications/subscriptions/acknowledged`, the honoured
  filter), every frame tagged with `_meta["io.modelcontextprotocol/subscriptionId"]` = the listen request's id,
  only the kinds it asked for; a graceful end sends the `SubscriptionsListenResult`.
- a handshake-era client's GET stream (its session), which gets list_changed for every kind and the
  resources/updated of the URIs its session subscribed to (resources/subscribe, answered here).

Each worker tells the streams it holds. Every worker follows each upstream's own change stream and reads the
catalog folder itself, so upstream and catalog events reach every worker without a relay, and each client
(whose stream one worker holds) is told once. What happens on one worker only — a login or logout, a legacy
client's resources/subscribe — is relayed to the sibling workers (extproc/peers.py, sealed) and, with a store,
to other replicas over its channel. Streams carry an SSE comment every `keepalive_s` (one timer for all), so
idle proxies keep them; a client that goes away releases its stream and the upstream subscriptions it held.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
import zlib
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import orjson
from cachetools import LRUCache

from catalog.notify import (
    KINDS,
    LIST_CHANGED,
    SUBSCRIPTION_ID,
    Watch,
    changed_kinds,
    digest,
    honored_filter,
    listen_filter,
    uri_matches,
)
from catalog.policy import Claims
from catalog.view import View
from extproc import jsonrpc
from extproc.jsonrpc import INVALID_PARAMS, LEGACY, MODERN, Message, RpcError
from extproc.replies import Forward, ResponsePlan
from extproc.request import TOOLSET_HEADER, Caller, Request
from extproc.upstream import ROUTE_HEADER

if TYPE_CHECKING:
    from extproc.gateway import Gateway

log = logging.getLogger(__name__)

NOTIFY_CLUSTER = "muster_edge_notify"
NOTIFY_PATH = "/notify"
TICKET_HEADER = "x-muster-edge-listen"
TICKET_TTL_S = 30
PLAN_SERVER = "muster-edge notifications"
_AAD = b"muster-edge/listen/v1"
_MAX_TICKET = 1 << 20
_MAX_BUFFERED = 256 * 1024  # a stream whose client stopped reading is ended past this
_TOOL_MODE_HEADER = "x-muster-tool-mode"


@dataclass
class Listener:
    """One open stream, as the worker holding it knows it."""

    id: int
    era: str
    req: Request
    watch: Watch
    writer: asyncio.StreamWriter
    subscription_id: Any = None  # the listen request's JSON-RPC id (2026-07-28); None for a GET stream
    session: str = ""  # the handshake-era session nonce (hex) of a GET stream
    upstream_uris: set[tuple[str, str, str]] = field(default_factory=set)  # (server, owner, upstream uri)
    closed: bool = False
    expiry: asyncio.TimerHandle | None = None  # ends the stream when its bearer would no longer be accepted


class Notifier:
    """The channel's API for the rest of the gateway: `view_changed`, `resource_updated`; and its streams."""

    def __init__(self, gw: Gateway, keepalive_s: float = 15.0) -> None:
        self.gw = gw
        self.keepalive_s = keepalive_s
        self.listeners: dict[int, Listener] = {}
        self._ids = itertools.count(1)
        self._digests: LRUCache[tuple[Any, ...], dict[str, bytes]] = LRUCache(maxsize=1024)
        self._pending: dict[str, set[str]] = {}
        self._pending_subjects: set[str] = set()
        self._pending_all = False
        self._flush: asyncio.Handle | None = None
        # handshake-era sessions' resource subscriptions (session nonce hex -> exposed URIs), from any worker
        self.session_uris: LRUCache[str, set[str]] = LRUCache(maxsize=20_000)
        # upstream subscriptions this worker holds: (server, owner, upstream uri) -> streams that need it
        self._upstream_refs: Counter[tuple[str, str, str]] = Counter()
        self.relay: Callable[[dict[str, Any]], None] | None = None  # set by the server: to sibling workers
        self.sent = 0  # notifications written (tests, bench)
        self._keepalive: asyncio.Task[None] | None = None

    # ---- opening, in the request path ------------------------------------------------------------------------
    def _ticket(self, req: Request, era: str, **extra: Any) -> str:
        claims = req.caller.claims
        payload = {"era": era, "sub": req.caller.subject, "v": req.caller.verified, "g": sorted(claims.groups),
                   "s": sorted(claims.scopes), "ts": req.headers.get(TOOLSET_HEADER, ""),
                   "tm": req.headers.get(_TOOL_MODE_HEADER, ""), "b": req.bearer,
                   "x": self.gw.token_ends_at(req.caller),
                   "exp": time.time() + TICKET_TTL_S, **extra}
        return self.gw.sessions.sealer.seal(zlib.compress(orjson.dumps(payload)), _AAD)

    def _forward(self, req: Request, ticket: str, client_id: Any, body: bytes) -> Forward:
        headers = {":path": NOTIFY_PATH, ROUTE_HEADER: NOTIFY_CLUSTER, TICKET_HEADER: ticket}
        if body:
            headers["content-length"] = str(len(body))
        remove = [h for h in req.headers if h.startswith("mcp-") or h in ("authorization", "cookie", "last-event-id")]
        plan = ResponsePlan(server=PLAN_SERVER, client_id=client_id, subject=req.caller.subject)
        return Forward(NOTIFY_CLUSTER, body, headers, remove, plan)

    def open_listen(self, req: Request, msg: Message) -> Forward:
        """A 2026-07-28 `subscriptions/listen`: checked here, served by the stream endpoint."""
        if msg.era != MODERN:
            raise RpcError(jsonrpc.METHOD_NOT_FOUND, "Method not found: subscriptions/listen (2026-07-28 only; "
                                                     "handshake-era clients open a GET stream)")
        if msg.id is None:
            raise RpcError(jsonrpc.INVALID_REQUEST, "subscriptions/listen requires a request id")
        parsed = listen_filter(msg.params.get("notifications"))
        if parsed is None:
            raise RpcError(INVALID_PARAMS, "Invalid params: notifications must be a SubscriptionFilter")
        kinds, uris = parsed
        view = self.gw.view_for(req)
        honored = [u for u in uris if view.resolve_uri(u) is not None]
        ticket = self._ticket(req, MODERN, id=msg.id, k=sorted(kinds), u=honored)
        return self._forward(req, ticket, msg.id, b"{}")

    def open_get(self, req: Request, nonce: bytes) -> Forward:
        """A handshake-era client's GET stream on its (already checked) session."""
        return self._forward(req, self._ticket(req, LEGACY, n=nonce.hex()), None, b"")

    def read_ticket(self, ticket: str) -> dict[str, Any] | None:
        sealed = self.gw.sessions.sealer.open(ticket, _AAD, max_len=_MAX_TICKET)
        if sealed is None:
            return None
        try:
            payload = orjson.loads(zlib.decompress(sealed, bufsize=4096))
        except (zlib.error, orjson.JSONDecodeError):
            return None
        if not isinstance(payload, dict) or float(payload.get("exp", 0)) < time.time():
            return None
        return payload

    # ---- the stream endpoint ------------------------------------------------------------------------------
    async def serve(self, headers: dict[str, str], reader: asyncio.StreamReader,
                    writer: asyncio.StreamWriter) -> None:
        """POST/GET /notify from Envoy: one stream, until the client (or Envoy) goes away."""
        ticket = self.read_ticket(headers.get(TICKET_HEADER, ""))
        if ticket is None:
            writer.write(b"HTTP/1.1 403 Forbidden\r\ncontent-type: text/plain\r\ncontent-length: 10\r\n"
                         b"connection: close\r\n\r\nforbidden\n")
            await writer.drain()
            return
        try:
            listener = await self._open(ticket, headers, writer)
        except (ConnectionError, RuntimeError) as exc:  # the peer went away while the stream opened
            log.info("a listening stream could not be opened: %s", exc)
            return
        try:
            while await reader.read(65536):  # the request body, then nothing until the peer closes
                pass
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            self._close(listener)

    async def _open(self, ticket: dict[str, Any], headers: dict[str, str], writer: asyncio.StreamWriter) -> Listener:
        claims = Claims(str(ticket.get("sub", "")), frozenset(ticket.get("g") or ()), frozenset(ticket.get("s") or ()))
        caller = Caller(subject=claims.subject, claims=claims, verified=bool(ticket.get("v")))
        req_headers = {k: v for k, v in ((TOOLSET_HEADER, ticket.get("ts")), (_TOOL_MODE_HEADER, ticket.get("tm")))
                       if v}
        if ticket.get("b"):
            req_headers["authorization"] = f"Bearer {ticket['b']}"
        req = Request("POST", self.gw.config.path, req_headers, (), caller)
        era = str(ticket.get("era"))
        if era == MODERN:
            watch = Watch(frozenset(ticket.get("k") or ()), set(ticket.get("u") or ()))
        else:
            session = str(ticket.get("n", ""))
            watch = Watch(frozenset(KINDS), set(self.session_uris.get(session, ())))
        listener = Listener(next(self._ids), era, req, watch, writer, ticket.get("id"), str(ticket.get("n", "")))
        with contextlib.suppress(Exception):  # a slow upstream must not hold the stream: lists catch up later
            await asyncio.wait_for(self.gw.fleet.ready(caller.subject, req.bearer), self.gw.fleet.list_wait_s)
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncache-control: no-cache, no-transform\r\n"
                     b"x-accel-buffering: no\r\ntransfer-encoding: chunked\r\n\r\n")
        if era == MODERN:
            ack = {"notifications": honored_filter(watch.kinds, sorted(watch.uris)),
                   "_meta": {SUBSCRIPTION_ID: listener.subscription_id}}
            self._write(listener, {"jsonrpc": "2.0", "method": "notifications/subscriptions/acknowledged",
                                   "params": ack})
        else:
            self._chunk(listener, b": stream open\n\n")
        listener.watch.digests = dict(self._digests_of(listener))  # its own copy: the cached one is shared
        self.listeners[listener.id] = listener
        self.gw.metrics.listening(+1)
        ends_at = float(ticket.get("x") or 0)
        if ends_at:
            loop = asyncio.get_running_loop()
            listener.expiry = loop.call_at(loop.time() + max(0.0, ends_at - time.time()), self._expired, listener)
        for uri in watch.uris:
            self._hold_uri(listener, uri)
        self._ensure_keepalive()
        return listener

    def _close(self, listener: Listener) -> None:
        if listener.closed:
            return
        listener.closed = True
        if listener.expiry is not None:
            listener.expiry.cancel()
        if self.listeners.pop(listener.id, None) is not None:
            self.gw.metrics.listening(-1)
        for key in listener.upstream_uris:
            self._release_upstream(key)
        listener.upstream_uris.clear()

    def _chunk(self, listener: Listener, data: bytes) -> None:
        writer = listener.writer
        if listener.closed or writer.is_closing():
            self._close(listener)
            return
        transport = writer.transport
        if transport.get_write_buffer_size() > _MAX_BUFFERED:
            log.warning("a listening client stopped reading; its stream is ended")
            writer.close()
            self._close(listener)
            return
        writer.write(b"%x\r\n%s\r\n" % (len(data), data))

    def _write(self, listener: Listener, message: dict[str, Any]) -> None:
        self._chunk(listener, b"event: message\ndata: " + orjson.dumps(message) + b"\n\n")

    def _notify(self, listener: Listener, method: str, params: dict[str, Any] | None = None) -> None:
        params = dict(params or {})
        if listener.era == MODERN:
            params["_meta"] = {SUBSCRIPTION_ID: listener.subscription_id}
        message: dict[str, Any] = {"jsonrpc": "2.0", "method": method}
        if params:
            message["params"] = params
        self._write(listener, message)
        self.sent += 1

    def _ensure_keepalive(self) -> None:
        if self._keepalive is None or self._keepalive.done():
            self._keepalive = asyncio.get_running_loop().create_task(self._keepalives())

    async def _keepalives(self) -> None:
        """One timer for every stream: an SSE comment each keepalive_s, so idle proxies keep the streams."""
        while self.listeners:
            await asyncio.sleep(self.keepalive_s)
            for listener in list(self.listeners.values()):
                self._chunk(listener, b": keep-alive\n\n")

    async def aclose(self) -> None:
        """Shutdown: 2026-07-28 streams end gracefully (their result), GET streams just end."""
        if self._keepalive is not None:
            self._keepalive.cancel()
        for listener in list(self.listeners.values()):
            self._end(listener)

    def _expired(self, listener: Listener) -> None:
        log.info("a listening stream ended: the bearer that opened it expired (the client opens a new one)")
        self._end(listener)

    def _end(self, listener: Listener) -> None:
        """End a stream as a server may: a 2026-07-28 listen gets its result, a GET stream just ends."""
        if listener.closed:
            return
        if listener.era == MODERN:
            self._write(listener, {"jsonrpc": "2.0", "id": listener.subscription_id, "result": {
                "_meta": {SUBSCRIPTION_ID: listener.subscription_id}, "resultType": "complete"}})
        with contextlib.suppress(Exception):
            listener.writer.write(b"0\r\n\r\n")
            listener.writer.close()
        self._close(listener)

    # ---- whose view changed ---------------------------------------------------------------------------------
    def _digests_of(self, listener: Listener) -> dict[str, bytes]:
        from extproc.handlers.lists import listing  # the handlers import the gateway, which imports us

        gw = self.gw
        view = gw.view_for(listener.req)
        key = (view.fingerprint, listener.era, gw.tool_mode(listener.req), gw.edge_tools.generation,
               gw.fleet.catalog_generation)
        found = self._digests.get(key)
        if found is None:
            found = {}
            for kind in KINDS:
                extra, native = listing(gw, listener.req, view, kind, listener.era)
                items: tuple[Any, ...] = (*extra, *native)
                if kind == "resources":
                    items = (*items, *view.templates)
                found[kind] = digest(items)
            self._digests[key] = found
        return found

    @staticmethod
    def _sees(view: View, server: str, kind: str, has_resources: bool) -> bool:
        if kind == "tools":
            return any(server in route.targets for route in view.tool_routes.values())
        if kind == "prompts":
            return any(server in route.targets for route in view.prompt_routes.values())
        return server in view.servers and has_resources

    def view_changed(self, reason: str, servers: Iterable[str] = (), subject: str | None = None, *,
                     relay: bool = True) -> None:
        """Something may have changed what callers see (`reason`, for the log): tell those whose lists did.

        `subject`: only that caller's streams can be affected (a login or logout); its per-user servers in
        `servers` are fetched again here first. Relayed to the sibling workers unless `relay` is False.
        """
        servers = list(servers)
        log.debug("notify: view may have changed (%s)", reason)
        if subject is not None:
            for name in servers:
                server = self.gw.fleet.servers.get(name)
                if server is not None and self.gw.fleet.per_user(server):
                    self.gw.fleet.suspect(name, subject)  # its refresh checks the streams again when done
        self._schedule({}, subject)
        if relay and self.relay is not None:
            self.relay({"op": "view", "reason": reason, "servers": servers, "subject": subject})

    def upstream_lists(self, server: str, owner: str, announced: Iterable[str]) -> None:
        """Fleet hook: an upstream's lists were fetched again (changed, or it announced list_changed), it
        came up, failed, or went away."""
        self._schedule({kind: {server} for kind in announced}, owner or None)

    def _schedule(self, announced: dict[str, set[str]], subject: str | None) -> None:
        """Checks are coalesced: every event of one loop turn is one pass over the streams."""
        for kind, servers in announced.items():
            self._pending.setdefault(kind, set()).update(servers)
        if subject is None:
            self._pending_all = True
        else:
            self._pending_subjects.add(subject)
        if self._flush is None:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                return
            self._flush = loop.call_soon(self.check)

    def check(self) -> int:
        """Compare every stream's lists with what it was last told; notify the ones that changed."""
        self._flush = None
        started = time.monotonic()
        announced = {k: sorted(v) for k, v in self._pending.items()}
        subjects = None if self._pending_all else self._pending_subjects
        self._pending, self._pending_subjects, self._pending_all = {}, set(), False
        told = 0
        # streams of the same caller, era, toolset and tool mode read the same lists: computed once per pass
        memo: dict[tuple[Any, ...], tuple[dict[str, bytes], dict[str, frozenset[str]]]] = {}
        for listener in list(self.listeners.values()):
            req = listener.req
            if subjects is not None and req.caller.subject not in subjects:
                continue
            ident = (req.caller.claims.key, req.caller.verified, req.toolset, req.headers.get(_TOOL_MODE_HEADER, ""),
                     listener.era)
            found = memo.get(ident)
            if found is None:
                sees: dict[str, frozenset[str]] = {}
                if announced:
                    view = self.gw.view_for(req)
                    for kind, servers in announced.items():
                        sees[kind] = frozenset(s for s in servers if self._sees(
                            view, s, kind, kind == "resources" and self._has_resources(s, req.caller.subject)))
                found = memo[ident] = (self._digests_of(listener), sees)
            now, sees = found
            for kind in changed_kinds(listener.watch, now, announced, sees):
                self._notify(listener, LIST_CHANGED[kind])
                told += 1
            self._rehold(listener)
        if told:
            log.info("notify: %d list_changed notifications sent (%d streams checked in %.1f ms)", told,
                     len(self.listeners), (time.monotonic() - started) * 1000)
        return told

    def _has_resources(self, server: str, subject: str) -> bool:
        if server not in self.gw.fleet.servers:
            return False
        snap = self.gw.fleet.listed(self.gw.fleet.state_for(server, subject))
        return snap is not None and bool(snap.resources or snap.templates)

    # ---- resource subscriptions -------------------------------------------------------------------------------
    def resource_updated(self, server: str, uri: str, owner: str = "") -> None:
        """An upstream said one of its resources changed: streams subscribed to it get its exposed URI."""
        told = 0
        for listener in list(self.listeners.values()):
            if owner and listener.req.caller.subject != owner:
                continue
            if not any(key[0] == server for key in listener.upstream_uris):
                continue
            exposed = self.gw.view_for(listener.req).client_uri(server, uri)
            if uri_matches(listener.watch.uris, exposed):
                self._notify(listener, "notifications/resources/updated", {"uri": exposed})
                told += 1
        if told:
            log.info("notify: %d resources/updated notifications sent", told)

    def session_subscribe(self, session: str, uri: str, on: bool, *, relay: bool = True) -> None:
        """A handshake-era session's resources/subscribe or unsubscribe (answered by the gateway)."""
        uris = self.session_uris.get(session)
        if uris is None:
            uris = self.session_uris[session] = set()
        (uris.add if on else uris.discard)(uri)
        for listener in list(self.listeners.values()):
            if listener.session == session:
                if on:
                    listener.watch.uris.add(uri)
                    self._hold_uri(listener, uri)
                else:
                    listener.watch.uris.discard(uri)
                    self._rehold(listener)
        if relay and self.relay is not None:
            self.relay({"op": "subscribe", "session": session, "uri": uri, "on": on})

    def _resolve(self, listener: Listener, uri: str) -> tuple[str, str, str] | None:
        resolved = self.gw.view_for(listener.req).resolve_uri(uri)
        if resolved is None:
            return None
        server = self.gw.fleet.servers.get(resolved[0])
        owner = listener.req.caller.subject if server is not None and self.gw.fleet.per_user(server) else ""
        return resolved[0], owner, resolved[1]

    def _hold_uri(self, listener: Listener, uri: str) -> None:
        key = self._resolve(listener, uri)
        if key is None or key in listener.upstream_uris:
            return
        listener.upstream_uris.add(key)
        self._upstream_refs[key] += 1
        if self._upstream_refs[key] == 1:
            self.gw.fleet.watch_resource(key[0], key[1], key[2], True)

    def _rehold(self, listener: Listener) -> None:
        """After a change: the upstream subscriptions this stream needs now (a URI may have moved or gone)."""
        if not listener.watch.uris and not listener.upstream_uris:
            return
        wanted = {k for uri in listener.watch.uris if (k := self._resolve(listener, uri)) is not None}
        for key in listener.upstream_uris - wanted:
            listener.upstream_uris.discard(key)
            self._release_upstream(key)
        for uri in listener.watch.uris:
            self._hold_uri(listener, uri)

    def _release_upstream(self, key: tuple[str, str, str]) -> None:
        self._upstream_refs[key] -= 1
        if self._upstream_refs[key] <= 0:
            del self._upstream_refs[key]
            self.gw.fleet.watch_resource(key[0], key[1], key[2], False)

    def session_ended(self, session: str) -> None:
        """A handshake-era session ended (DELETE, expiry; on every worker): its GET streams end with it."""
        self.session_uris.pop(session, None)
        for listener in list(self.listeners.values()):
            if listener.session == session:
                with contextlib.suppress(Exception):
                    listener.writer.write(b"0\r\n\r\n")
                    listener.writer.close()
                self._close(listener)

    # ---- relayed from a sibling worker ----------------------------------------------------------------------
    def from_peer(self, msg: dict[str, Any]) -> None:
        op = msg.get("op")
        if op == "view":
            subject = msg.get("subject")
            servers = [s for s in msg.get("servers") or [] if isinstance(s, str)]
            self.view_changed(str(msg.get("reason", "peer")), servers,
                              subject if isinstance(subject, str) else None, relay=False)
        elif op == "subscribe" and isinstance(msg.get("session"), str) and isinstance(msg.get("uri"), str):
            self.session_subscribe(msg["session"], msg["uri"], bool(msg.get("on")), relay=False)

    def status(self) -> dict[str, Any]:
        eras = Counter(listener.era for listener in self.listeners.values())
        return {"listening": len(self.listeners), "byEra": dict(eras),
                "upstreamSubscriptions": len(self._upstream_refs), "sent": self.sent}
