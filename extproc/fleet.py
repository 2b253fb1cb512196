"""The fleet as the processor knows it: admitted servers, each upstream's cached lists, and its health.

Lists are fetched concurrently, cached per upstream, and refreshed on the upstream's list_changed, on its
ttlMs, and on catalog changes; a warm list never touches an upstream. A list waits (at most list_wait_s) only
for an upstream never fetched, and only once: an upstream known to be slow or down is probed in the
background while its last good lists stay in the view (stale, shown in the status), and calls to it fail fast
with "unavailable". An upstream that never answered is left out of the view. Servers whose answers depend
on the caller's credential (token forwarding, token exchange, per-user OAuth) are fetched per user, with that
user's credential, and only that user's view holds them.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import random
import time
from collections.abc import Awaitable, Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from cachetools import LRUCache

from catalog.manifests import AdmissionError, MCPServer
from catalog.notify import KIND_OF_METHOD
from catalog.view import UpstreamSnapshot, View, build_view, x_mcp_header_problem
from extproc import tracing
from extproc.continuity import Continuity
from extproc.credentials import CredentialError
from extproc.jsonrpc import LEGACY
from extproc.upstream import Handshake, UpstreamAuthError, UpstreamClient, UpstreamError, UpstreamRpcError
from extproc.upstream_sessions import SessionCapReached, SessionCounts, SessionPool

log = logging.getLogger(__name__)

_LISTS = (("tools/list", "tools", "tools"), ("prompts/list", "prompts", "prompts"),
          ("resources/list", "resources", "resources"), ("resources/templates/list", "resourceTemplates", "resources"))
RETRY_FAILED_AFTER_S = 2.0
# a new server's first fetch also proves that Envoy has its cluster (the fetch goes through Envoy): until then
# it is retried this often, for up to FIRST_FETCH_S, and stays unlisted ("Connecting") rather than "Failed"
FIRST_RETRY_S = 0.2
FIRST_FETCH_S = 5.0
# every worker reads the catalog folder every 0.5 s (catalog_files.watch): a server added later is listed only
# once the other workers have read it too, so a call that lands on another worker finds it in its catalog
CATALOG_SETTLE_S = 0.75
MAX_POOLED = 4_000
MAX_USER_STATES = 20_000

# (server, owner subject, the owner's bearer) -> the headers that authenticate the gateway's own calls
AuthSource = Callable[[MCPServer, str, str], Awaitable[Mapping[str, str]]]


async def _no_auth(server: MCPServer, owner: str, bearer: str) -> Mapping[str, str]:
    return {}


def _waits_for_use(state: UpstreamState) -> bool:
    """A stdio server with `autoStart: false` is started by the first list that needs it (Fleet.ready), not by
    the catalog load: its process, run by the bridge, starts when the bridge first hears from us."""
    return state.server.type == "stdio" and not state.server.auto_start and state.snapshot is None


async def _no_renew(server: MCPServer, owner: str) -> None:
    return None


@dataclass
class UpstreamState:
    server: MCPServer
    owner: str = ""
    bearer: str = field(default="", repr=False)
    handshake: Handshake | None = None
    snapshot: UpstreamSnapshot | None = None
    auth_required: bool = False
    expires_at: float = 0.0
    last_attempt: float = 0.0
    refreshing: asyncio.Task[None] | None = None
    listener: asyncio.Task[None] | None = None
    pooled: SessionPool[Handshake] = field(default_factory=lambda: SessionPool("", lambda _hs, _why: None))
    opening: dict[str, asyncio.Future[Handshake]] = field(default_factory=dict)
    modern_only: bool = False
    last_good: UpstreamSnapshot | None = None  # listed (stale) while the upstream is down
    waited: bool = False  # a list already waited for this upstream's first fetch: never again
    down: str = ""  # a routed call just failed (503/504): calls fail fast until a refresh succeeds
    created: float = field(default_factory=time.monotonic)
    settle_until: float = 0.0
    fetched_at: float = 0.0  # when the current lists were fetched (their age in /metrics)
    announced: set[str] = field(default_factory=set)  # kinds the upstream said changed, until the next fetch
    taken: set[str] = field(default_factory=set)  # the announced kinds the running fetch is fetching
    announced_at: float = 0.0
    resource_uris: set[str] = field(default_factory=set)  # upstream URIs the notification channel follows

    @property
    def fresh(self) -> bool:
        return self.snapshot is not None and time.monotonic() < self.expires_at

    def cancel(self) -> None:
        for task in (self.refreshing, self.listener):
            if task is not None:
                task.cancel()


def _same_lists(a: UpstreamSnapshot | None, b: UpstreamSnapshot) -> bool:
    return a is not None and a.ok and (a.tools, a.prompts, a.resources, a.templates) == \
        (b.tools, b.prompts, b.resources, b.templates)


class Fleet:
    def __init__(self, client: UpstreamClient, *, prefix: str, mode: str, default_ttl_ms: int,
                 ttl_floor_ms: int = 5_000, list_wait_s: float = 5.0, auth: AuthSource = _no_auth,
                 per_user: Callable[[MCPServer], bool] = lambda _s: False,
                 renew: Callable[[MCPServer, str], Awaitable[None]] | None = None,
                 max_upstream_sessions: int = MAX_POOLED, active_window_s: float = 10.0) -> None:
        self.client = client
        self.prefix = prefix
        self.mode = mode
        self.default_ttl_ms = default_ttl_ms
        self.ttl_floor_ms = ttl_floor_ms
        self.list_wait_s = list_wait_s
        self.auth = auth
        self.per_user = per_user
        self.renew = renew or _no_renew
        self.servers: dict[str, MCPServer] = {}
        self.errors: tuple[AdmissionError, ...] = ()
        self.states: dict[str, UpstreamState] = {}
        self.user_states: LRUCache[tuple[str, str], UpstreamState] = LRUCache(maxsize=MAX_USER_STATES)
        self.catalog_generation = 0
        self._generation = 0
        self._views: LRUCache[tuple[Any, ...], View] = LRUCache(maxsize=256)
        self.max_upstream_sessions = max_upstream_sessions
        self.active_window_s = active_window_s
        self.session_counts = SessionCounts()
        self._closing: set[asyncio.Task[None]] = set()
        # whether an owner's gateway session has ended (set by the gateway): a session opened for an owner whose
        # DELETE arrived meanwhile is closed at once, not kept
        self.owner_ended: Callable[[str], bool] = lambda _owner: False
        # one upstream's fetch (server, seconds, ok), for the fan-out histogram
        self.on_fetch: Callable[[str, float, bool], None] = lambda _server, _seconds, _ok: None
        self.continuity: Continuity | None = None  # the store's shared upstream sessions (set by the server)
        self.on_change: Callable[[MCPServer, str, bool, str], None] | None = None  # (server, owner, up, why)
        # the notification channel's hooks: (server, owner, kinds the upstream announced) after its lists were
        # fetched again and differ, it announced a change, came up or failed; (server, owner, uri) for an
        # upstream's resources/updated
        self.on_lists: Callable[[str, str, frozenset[str]], None] | None = None
        self.on_resource: Callable[[str, str, str], None] | None = None
        # with xDS: None once every connected Envoy has acknowledged a server's cluster, else why not (xds_acks)
        self.envoy_acked: Callable[[MCPServer], Awaitable[str | None]] | None = None

    def _new_state(self, server: MCPServer, owner: str = "") -> UpstreamState:
        state = UpstreamState(server, owner=owner)
        state.pooled = SessionPool(server.name, lambda hs, why: self._close_session(server, hs, why),
                                   cap=self.max_upstream_sessions, active_s=self.active_window_s)
        return state

    def _close_session(self, server: MCPServer, hs: Handshake, reason: str) -> None:
        """Count one upstream session closed and send the upstream its DELETE (tracked, so shutdown waits).

        A session shared through the store is only forgotten here: it lives on for the other processes until its
        gateway session ends (Gateway.close_shared closes it then), except when it is evicted or lost, when this
        process takes it out of the store and closes it."""
        if not hs.session_id:
            return
        if hs.shared_owner:
            if reason in ("evicted", "lost") and self.continuity is not None:
                self._track(self._drop_shared(server, hs, reason))
            return
        self.session_counts.closed[(server.name, reason)] += 1
        self._send_delete(server, hs)

    def _send_delete(self, server: MCPServer, hs: Handshake) -> None:
        self._track(self.client.delete_session(server, hs))

    def _track(self, job: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(job)
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    async def _drop_shared(self, server: MCPServer, hs: Handshake, reason: str) -> None:
        assert self.continuity is not None
        try:
            removed = await self.continuity.drop(hs.shared_owner, server.name, hs.session_id)
        except Exception as exc:
            log.warning("dropping a shared upstream session failed: %s", type(exc).__name__)
            return
        if removed:
            self.session_counts.closed[(server.name, reason)] += 1
            await self.client.delete_session(server, hs)

    # ---- catalog ---------------------------------------------------------------------------------------
    def set_catalog(self, servers: Sequence[MCPServer], errors: Sequence[AdmissionError]) -> None:
        """Swap in a new catalog; changed or new servers are fetched again, removed ones are forgotten."""
        new = {s.name: s for s in servers}
        for name in list(self.states):
            if name not in new or new[name] != self.states[name].server or self.per_user(new[name]):
                self._drop(self.states.pop(name))
        for key in list(self.user_states):
            if key[0] not in new or new[key[0]] != self.user_states[key].server:
                self._drop(self.user_states.pop(key))
        settle = time.monotonic() + CATALOG_SETTLE_S if self.catalog_generation else 0.0
        for name, server in new.items():
            if name not in self.states and not self.per_user(server):
                state = self.states[name] = self._new_state(server)
                state.settle_until = settle
        for err in errors:
            if err not in self.errors:
                log.error("catalog: refused %s", err)
        self.servers = new
        self.errors = tuple(errors)
        self.catalog_generation += 1
        for state in self.states.values():
            if not _waits_for_use(state):
                self._schedule(state)

    def _drop(self, state: UpstreamState, reason: str = "catalog") -> None:
        state.cancel()
        state.pooled.clear(reason)
        self._close_own(state)

    def _close_own(self, state: UpstreamState) -> None:
        """The fleet's own handshake-era session (lists, events) is closed too; it is not a client's, so it is
        not in the opened/closed counters."""
        hs, state.handshake = state.handshake, None
        if hs is not None and hs.session_id:
            task = asyncio.get_running_loop().create_task(self.client.delete_session(state.server, hs))
            self._closing.add(task)
            task.add_done_callback(self._closing.discard)

    # ---- refresh ---------------------------------------------------------------------------------------
    def _schedule(self, state: UpstreamState) -> asyncio.Task[None]:
        if state.refreshing is None or state.refreshing.done():
            state.refreshing = asyncio.get_running_loop().create_task(self._refresh(state))
        return state.refreshing

    async def _credentials(self, state: UpstreamState) -> dict[str, str]:
        return dict(await self.auth(state.server, state.owner, state.bearer))

    async def _fetch(self, state: UpstreamState) -> tuple[Handshake, list[tuple[list[dict[str, Any]], int | None]]]:
        started, ok = time.perf_counter(), False
        try:
            with tracing.span("muster_edge.list_fetch", {"muster_edge.server": state.server.name},
                              child_only=True):
                results = await self._fetch_lists(state)
            ok = True
            return results
        finally:
            self.on_fetch(state.server.name, time.perf_counter() - started, ok)

    async def _fetch_lists(self, state: UpstreamState
                           ) -> tuple[Handshake, list[tuple[list[dict[str, Any]], int | None]]]:
        auth = await self._credentials(state)
        hs = state.handshake or await self.client.probe(state.server, auth)
        hs.auth = auth
        state.handshake = hs
        # an upstream that announced which lists changed gets only those fetched again (the others are kept);
        # announcements that arrive while this fetch runs start another one when it is done
        state.taken |= state.announced
        state.announced = set()
        snap = state.snapshot
        kept: dict[str, Any] = {}
        if state.taken and snap is not None and snap.ok:
            kept = {"tools/list": snap.tools, "prompts/list": snap.prompts, "resources/list": snap.resources,
                    "resources/templates/list": snap.templates}
            kept = {m: kept[m] for m, _, cap in _LISTS if cap not in state.taken}

        async def one(method: str, key: str, capability: str) -> tuple[list[dict[str, Any]], int | None]:
            if method in kept:
                return list(kept[method]), None
            return await self._list(state.server, hs, method, key, capability)

        results = await asyncio.gather(*(one(m, k, cap) for m, k, cap in _LISTS))
        return hs, list(results)

    async def _refresh(self, state: UpstreamState) -> None:
        if state.last_good is None and self.envoy_acked is not None:
            # never listed yet: every Envoy must route to it first (a caller's next call may land on any of them)
            state.last_attempt = time.monotonic()
            waiting = await self.envoy_acked(state.server)
            if waiting is not None:
                self._fail(state, waiting)
                return
            state.created = time.monotonic()  # the first fetch's retries start now that Envoys have its cluster
        while True:
            server = state.server
            state.last_attempt = time.monotonic()
            try:
                try:
                    hs, results = await self._fetch(state)
                except UpstreamAuthError:
                    if not state.owner:
                        raise
                    await self.renew(server, state.owner)  # a per-user credential the upstream refused: once more
                    state.handshake = None
                    hs, results = await self._fetch(state)
                break
            except UpstreamError as exc:
                if not self._first_fetch_again(state, exc):
                    self._refresh_failed(state, exc)
                    return
            except Exception as exc:
                self._refresh_failed(state, exc)
                return
            await asyncio.sleep(FIRST_RETRY_S)
        if state.snapshot is None and state.settle_until > time.monotonic():
            await asyncio.sleep(state.settle_until - time.monotonic())
        self._refreshed(state, hs, results)

    @staticmethod
    def _first_fetch_again(state: UpstreamState, exc: UpstreamError) -> bool:
        """A server never fetched whose fetch failed without an answer from it (Envoy may not route to it yet:
        the supervisor's CDS write and this worker's catalog read race) is retried soon, still unlisted."""
        return (state.snapshot is None and not isinstance(exc, (UpstreamAuthError, UpstreamRpcError))
                and time.monotonic() - state.created < FIRST_FETCH_S and "timed out" not in str(exc))

    def _refresh_failed(self, state: UpstreamState, exc: Exception) -> None:
        if isinstance(exc, CredentialError):
            self._fail(state, exc.reason, auth_required=exc.auth_required)
        elif isinstance(exc, UpstreamAuthError):
            self._fail(state, str(exc), auth_required=True)
        elif isinstance(exc, UpstreamError):
            self._fail(state, str(exc))
        else:
            log.error("upstream %s: refresh crashed", state.server.name, exc_info=exc)
            self._fail(state, f"internal error: {type(exc).__name__}")

    def _refreshed(self, state: UpstreamState, hs: Handshake,
                   results: list[tuple[list[dict[str, Any]], int | None]]) -> None:
        server = state.server
        (tools, t1), (prompts, t2), (resources, t3), (templates, t4) = results
        ttls = [t for t in (t1, t2, t3, t4, hs.ttl_ms) if isinstance(t, int)]
        ttl = min(ttls) if ttls else None
        tools = self._valid_tools(server.name, tools)
        self._generation += 1
        previously_failed = (state.snapshot is not None and not state.snapshot.ok) or bool(state.down)
        first = state.snapshot is None
        before = state.snapshot
        state.auth_required = False
        state.down = ""
        state.snapshot = UpstreamSnapshot(
            server=server.name, ok=True, era=hs.era, protocol_version=hs.version, capabilities=hs.capabilities,
            instructions=hs.instructions, tools=tuple(tools), prompts=tuple(prompts), resources=tuple(resources),
            templates=tuple(templates), ttl_ms=ttl, generation=self._generation)
        state.last_good = state.snapshot
        state.fetched_at = time.monotonic()
        announced, state.taken = frozenset(state.taken), set()
        if announced:
            log.info("upstream %s: %s fetched again, %.1f ms after its list_changed", server.name,
                     ", ".join(sorted(announced)), (time.monotonic() - state.announced_at) * 1000)
        if state.announced:  # announced while this fetch ran: fetch again once it is done
            asyncio.get_running_loop().call_soon(self._schedule, state)
        if self.on_lists is not None and (announced or first or previously_failed or not _same_lists(before,
                                                                                                   state.snapshot)):
            self.on_lists(server.name, state.owner, announced)
        life_ms = max(ttl if ttl is not None else self.default_ttl_ms, self.ttl_floor_ms)
        state.expires_at = time.monotonic() + life_ms / 1000.0 * random.uniform(0.9, 1.0)
        if previously_failed:
            log.warning("upstream %s: recovered", server.name)
        if (previously_failed or first) and self.on_change is not None:
            self.on_change(server, state.owner, True, "")
        who = f" (for {state.owner})" if state.owner else ""
        log.info("upstream %s%s: %s %s, %d tools, %d prompts, %d resources, %d templates", server.name, who, hs.era,
                 hs.version, len(tools), len(prompts), len(resources), len(templates))
        if state.listener is None or state.listener.done():
            # a context of its own: the listener outlives the request whose fetch started it, and its log lines
            # and spans are not that request's
            state.listener = asyncio.get_running_loop().create_task(self._listen(state, hs),
                                                                     context=contextvars.Context())

    async def _list(self, server: MCPServer, hs: Handshake, method: str, key: str,
                    capability: str) -> tuple[list[dict[str, Any]], int | None]:
        if capability not in hs.capabilities:
            return [], None
        return await self.client.list_all(server, hs, method, key)

    @staticmethod
    def _valid_tools(server: str, tools: list[dict[str, Any]]) -> list[dict[str, Any]]:
        out = []
        for tool in tools:
            if not isinstance(tool.get("name"), str):
                continue
            why = x_mcp_header_problem(tool.get("inputSchema"))
            if why is not None:
                log.warning("upstream %s: tool %r dropped: %s", server, tool.get("name"), why)
                continue
            out.append(tool)
        return out

    def _fail(self, state: UpstreamState, reason: str, *, auth_required: bool = False) -> None:
        name = state.server.name
        if state.snapshot is None or state.snapshot.ok or state.snapshot.error != reason:
            who = f" (for {state.owner})" if state.owner else ""
            log.error("upstream %s%s: %s: %s", name, who, "auth required" if auth_required else "failed", reason)
            if self.on_change is not None and (state.snapshot is None or state.snapshot.ok):
                self.on_change(state.server, state.owner, False, reason)
        self._generation += 1
        was_listed = self.listed(state) is not None
        state.snapshot = UpstreamSnapshot(server=name, ok=False, error=reason, generation=self._generation)
        state.auth_required = auth_required
        if self.on_lists is not None and was_listed != (self.listed(state) is not None):
            self.on_lists(name, state.owner, frozenset())
        self._close_own(state)
        state.pooled.clear("upstream_failed")
        state.expires_at = 0.0

    async def _listen(self, state: UpstreamState, hs: Handshake) -> None:
        """Follow the upstream's list_changed notifications; any of them refreshes that upstream."""
        delay = 1.0
        if hs.era == LEGACY:
            for uri in sorted(state.resource_uris):
                await self._subscribe_legacy(state, hs, uri, True)
        while True:
            try:
                async for msg in self.client.events(state.server, hs, sorted(state.resource_uris)):
                    method = str(msg.get("method", ""))
                    if method.endswith("/list_changed"):
                        log.info("upstream %s: %s", state.server.name, msg["method"])
                        kind = KIND_OF_METHOD.get(method)
                        if kind is not None:
                            if not state.announced:
                                state.announced_at = time.monotonic()
                            state.announced.add(kind)
                        state.expires_at = 0.0
                        self._schedule(state)
                    elif method == "notifications/resources/updated" and self.on_resource is not None:
                        updated = (msg.get("params") or {}).get("uri")
                        if isinstance(updated, str):
                            self.on_resource(state.server.name, state.owner, updated)
                    delay = 1.0
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.debug("upstream %s: event stream ended: %s", state.server.name, exc)
            if state.handshake is not hs:
                return
            self._suspect_state(state)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 30.0)

    def _suspect_state(self, state: UpstreamState) -> None:
        state.expires_at = 0.0
        self._schedule(state)

    def watch_resource(self, name: str, owner: str, uri: str, on: bool) -> None:
        """Follow (or stop following) one upstream resource for the notification channel: on the fleet's own
        change stream of that upstream (a 2026-07-28 listen names its URIs and is opened again; a handshake-era
        session subscribes with resources/subscribe)."""
        server = self.servers.get(name)
        if server is None:
            return
        state = self._user_state(server, owner, "") if owner else self.states.get(name)
        if state is None or (uri in state.resource_uris) == on:
            return
        (state.resource_uris.add if on else state.resource_uris.discard)(uri)
        hs = state.handshake
        if hs is None:
            return  # the first fetch opens the stream with the URIs
        if hs.era == LEGACY:
            task = asyncio.get_running_loop().create_task(self._subscribe_legacy(state, hs, uri, on))
            self._closing.add(task)
            task.add_done_callback(self._closing.discard)
        elif state.listener is not None and not state.listener.done():
            state.listener.cancel()
            state.listener = asyncio.get_running_loop().create_task(self._listen(state, hs))

    async def _subscribe_legacy(self, state: UpstreamState, hs: Handshake, uri: str, on: bool) -> None:
        method = "resources/subscribe" if on else "resources/unsubscribe"
        try:
            await self.client.request(state.server, hs, method, {"uri": uri})
        except Exception as exc:
            log.info("upstream %s: %s %s failed: %s", state.server.name, method, uri, exc)

    def down(self, name: str, reason: str, owner: str = "") -> None:
        """A routed call found this upstream down or frozen (Envoy answered 503/504): calls to it fail fast
        until a refresh (started now) succeeds; its lists stay in the view."""
        state = self.user_states.get((name, owner)) if owner else self.states.get(name)
        if state is not None:
            if not state.down:
                log.warning("upstream %s: %s; checking it", name, reason)
            state.down = reason
            self._suspect_state(state)

    def unavailable(self, name: str, subject: str = "") -> str | None:
        """Why calls to this cataloged upstream cannot be served now (down, frozen, failing), else None.
        Credential problems are not "unavailable": they have their own errors (so a per-user server is only
        unavailable when a call just found it down)."""
        server = self.servers.get(name)
        if server is None:
            return None
        state = self.user_states.get((name, subject)) if self.per_user(server) else self.states.get(name)
        if state is None:
            return None
        if state.down:
            return state.down
        if state.owner:
            return None
        snap = state.snapshot
        if snap is None:  # never answered: unavailable once a list gave up waiting for it
            return "no answer yet (still connecting)" if state.waited else None
        if not snap.ok and not state.auth_required:
            return snap.error
        return None

    def suspect(self, name: str, owner: str = "") -> None:
        """Something went wrong talking to this upstream: check it again now (a failure marks it Failed)."""
        state = self.user_states.get((name, owner)) if owner else self.states.get(name)
        if state is None and not owner:
            state = self.states.get(name)
        if state is not None:
            self._suspect_state(state)

    def _user_state(self, server: MCPServer, subject: str, bearer: str) -> UpstreamState:
        key = (server.name, subject)
        state = self.user_states.get(key)
        if state is None:
            state = self.user_states[key] = self._new_state(server, subject)
        if bearer and bearer != state.bearer:
            state.bearer = bearer
            if state.snapshot is not None and not state.snapshot.ok:
                state.last_attempt = 0.0  # a new token: worth trying again now
        return state

    def caller_states(self, subject: str, bearer: str = "") -> list[UpstreamState]:
        """The states one caller's view is made of: the shared ones and the caller's own per-user ones."""
        states = list(self.states.values())
        if subject:
            states += [self._user_state(s, subject, bearer) for s in self.servers.values() if self.per_user(s)]
        return states

    async def ready(self, subject: str = "", bearer: str = "") -> None:
        """Make the view current: wait (at most list_wait_s, once per upstream) for upstreams never fetched,
        refresh stale and failed ones behind. A refused credential is the one failure still waited for (it is
        answered fast, and a new token may fix it: a login must show its server on the next list)."""
        waits: dict[asyncio.Task[None], UpstreamState] = {}
        now = time.monotonic()
        for state in self.caller_states(subject, bearer):
            snap = state.snapshot
            if snap is None:
                task = self._schedule(state)
                if not state.waited:
                    waits[task] = state
            elif not snap.ok and now - state.last_attempt > RETRY_FAILED_AFTER_S:
                task = self._schedule(state)
                if state.auth_required and not state.waited:
                    waits[task] = state
            elif snap.ok and (not state.fresh or state.down):
                self._schedule(state)
        if waits:
            with tracing.span("muster_edge.fanout", {"muster_edge.upstreams": len(waits)}):
                _, pending = await asyncio.wait([asyncio.shield(w) for w in waits], timeout=self.list_wait_s)
            if pending:
                for task, state in waits.items():
                    if not task.done():
                        state.waited = True  # slow: the next lists do not wait for it again

    async def maintain(self, every_s: float = 2.0) -> None:
        """Retry failed upstreams in the background, so the status recovers without client traffic."""
        while True:
            await asyncio.sleep(every_s)
            now = time.monotonic()
            for state in list(self.states.values()):
                failing = state.snapshot is not None and (not state.snapshot.ok or bool(state.down))
                if failing and now - state.last_attempt > every_s:
                    self._schedule(state)

    @staticmethod
    def listed(state: UpstreamState) -> UpstreamSnapshot | None:
        """The lists this upstream contributes: the current ones, or the last good ones (stale) while it is
        down; none while it never answered or refuses the credential."""
        snap = state.snapshot
        if snap is None or snap.ok:
            return snap
        return None if state.auth_required else state.last_good

    def view(self, subject: str = "") -> View:
        snapshots = {s.server.name: snap for s in self.caller_states(subject)
                     if (snap := self.listed(s)) is not None}
        key = (self.catalog_generation, tuple(sorted((n, s.generation) for n, s in snapshots.items())))
        view = self._views.get(key)
        if view is None:
            view = build_view(list(self.servers.values()), snapshots, prefix=self.prefix, mode=self.mode,
                              default_ttl_ms=self.default_ttl_ms)
            for problem in view.problems:
                log.warning("view: %s", problem)
            self._views[key] = view
        return view

    # ---- upstream sessions for routed calls --------------------------------------------------------------
    async def refetch(self, name: str, subject: str = "") -> UpstreamSnapshot | None:
        """Fetch one upstream's lists again now and return them (None if that failed): its answer said the schema
        the gateway holds is stale (-32020). A refresh already under way may predate the change: one more runs."""
        state = self.state_for(name, subject)
        running = state.refreshing
        if running is not None and not running.done():
            await asyncio.shield(running)
        state.expires_at = 0.0
        await asyncio.shield(self._schedule(state))
        snap = state.snapshot
        return snap if snap is not None and snap.ok else None

    def state_for(self, name: str, subject: str = "") -> UpstreamState:
        server = self.servers[name]
        if self.per_user(server):
            return self._user_state(server, subject, "")
        return self.states[name]

    async def session_for(self, name: str, owner: str, client_capabilities: dict[str, Any] | None = None,
                          log_level: str = "", *, subject: str = "",
                          auth: Mapping[str, str] | None = None) -> Handshake:
        """The upstream handshake a routed call uses.

        A legacy client (`client_capabilities` set, `owner` its gateway session) gets its own handshake-era
        session on every upstream that speaks that era, declaring its capabilities, so server-to-client
        requests, logging and resumption work as if it were connected directly. Modern clients call modern
        upstreams statelessly, and legacy upstreams through one session per principal (`owner`).
        """
        state = self.state_for(name, subject)
        hs = state.handshake
        if hs is None:
            hs = state.handshake = await self.client.probe(state.server, auth)
        legacy_client = client_capabilities is not None
        if hs.era != LEGACY and (not legacy_client or state.modern_only):
            return hs
        pooled = state.pooled.get(owner)
        if pooled is not None:
            return pooled
        opening = state.opening.get(owner)
        if opening is not None:  # a concurrent call of the same owner is opening it: one session, not two
            return await asyncio.shield(opening)
        state.pooled.make_room(pending=len(state.opening))
        future: asyncio.Future[Handshake] = asyncio.get_running_loop().create_future()
        state.opening[owner] = future
        share = legacy_client and self.continuity is not None and self.continuity.shared
        try:
            adopted, level = await self._adopt(name, owner, auth) if share else (None, "")
            log_level = log_level or level  # a level the client set through another process
            if adopted is not None:  # another process opened it: use the same upstream session
                state.pooled.add(owner, adopted)
                future.set_result(adopted)
                return adopted
            try:
                pooled = await self.client.initialize(state.server, client_capabilities, log_level, auth)
            except UpstreamRpcError as exc:
                # the upstream's own limit (an SDK server: "Too many open sessions"): make room here, once
                if "too many" not in exc.message.lower():
                    raise
                if not state.pooled.evict_one():
                    raise SessionCapReached(name, len(state.pooled)) from None
                if self._closing:  # the upstream has the room before we ask again
                    await asyncio.wait(list(self._closing), timeout=2.0)
                pooled = await self.client.initialize(state.server, client_capabilities, log_level, auth)
            if pooled.session_id:
                self.session_counts.opened[name] += 1
                if share:  # still opening: a concurrent call of this owner waits for the shared one
                    pooled = await self._publish(state, name, owner, pooled, auth)
        except UpstreamError as exc:
            future.set_exception(exc)
            future.exception()  # retrieved: waiters get it, nobody else must
            if hs.era == LEGACY:
                raise
            state.modern_only = True
            return hs
        except BaseException as exc:
            future.set_exception(UpstreamError(f"opening a session failed: {type(exc).__name__}"))
            future.exception()
            raise
        finally:
            state.opening.pop(owner, None)
        state.pooled.add(owner, pooled)
        future.set_result(pooled)
        if self.owner_ended(owner):
            if pooled.shared_owner and self.continuity is not None:  # its DELETE came while we published it
                self._track(self._drop_shared(state.server, pooled, "deleted"))
            state.pooled.pop(owner, "deleted")
        return pooled

    async def _adopt(self, name: str, owner: str, auth: Mapping[str, str] | None) -> tuple[Handshake | None, str]:
        """The upstream session another process opened for this owner and the log level its client set, from
        the store (None if none or the store cannot be read: then this process opens one, as without a store)."""
        assert self.continuity is not None
        try:
            found, level = await self.continuity.lookup(owner, name)
        except Exception as exc:
            log.warning("reading shared upstream sessions failed: %s", type(exc).__name__)
            return None, ""
        if found is not None:
            found.auth = dict(auth or {})
        return found, level

    async def _publish(self, state: UpstreamState, name: str, owner: str, hs: Handshake,
                       auth: Mapping[str, str] | None) -> Handshake:
        """Offer the session just opened to every process; if another one was first, use theirs, close ours."""
        assert self.continuity is not None
        try:
            winner = await self.continuity.publish(owner, name, hs)
        except Exception as exc:
            log.warning("sharing an upstream session failed: %s", type(exc).__name__)
            return hs
        if winner is None or winner is hs:
            return hs
        self._close_session(state.server, hs, "replaced")
        winner.auth = dict(auth or {})
        return winner

    async def shared_session(self, name: str, owner: str, subject: str = "",
                             auth: Mapping[str, str] | None = None) -> Handshake | None:
        """The owner's upstream session on a server, held here or (with a store) opened by another process:
        what a relayed answer or a resumed stream must reach."""
        found = self.pooled_session(name, owner, subject)
        if found is not None or self.continuity is None or not self.continuity.shared or name not in self.servers:
            return found
        adopted, _ = await self._adopt(name, owner, auth)
        if adopted is not None:
            self.state_for(name, subject).pooled.add(owner, adopted)
        return adopted

    async def close_shared(self, owner: str, reason: str, auth: AuthSource | None = None,
                           subject: str = "", bearer: str = "") -> int:
        """An ended gateway session's upstream sessions from the store, closed by the one process that takes
        them (counted here); returns how many. `auth` gives the DELETE its credential (default: the gateway's
        own calls' one)."""
        if self.continuity is None or not self.continuity.shared:
            return 0
        try:
            taken = await self.continuity.take_owner(owner)
        except Exception as exc:
            log.warning("reading shared upstream sessions failed: %s", type(exc).__name__)
            return 0
        for name, hs in taken.items():
            server = self.servers.get(name)
            self.session_counts.closed[(name, reason)] += 1
            if server is None:
                continue
            try:
                hs.auth = dict(await (auth or self.auth)(server, subject, bearer))
            except Exception as exc:  # the DELETE goes without; the upstream's own expiry ends the session
                log.info("no credential to end a session on %s: %s", name, type(exc).__name__)
            self._send_delete(server, hs)
        return len(taken)

    def pooled_session(self, name: str, owner: str, subject: str = "") -> Handshake | None:
        if name not in self.servers:
            return None
        return self.state_for(name, subject).pooled.get(owner)

    def _all_states(self) -> list[UpstreamState]:
        return [*self.states.values(), *self.user_states.values()]

    def sessions_of(self, owner: str) -> list[tuple[MCPServer, Handshake]]:
        return [(s.server, s.pooled[owner]) for s in self._all_states() if owner in s.pooled]

    def forget_session(self, name: str, owner: str, subject: str = "") -> Handshake | None:
        """The upstream no longer knows this session (it answered 404): forget it (a DELETE is harmless)."""
        if name not in self.servers:
            return None
        return self.state_for(name, subject).pooled.pop(owner, "lost")

    def end_sessions(self, owner: str, reason: str = "deleted") -> int:
        """Close every upstream session this process holds for one owner; returns how many."""
        closed = 0
        for state in self._all_states():
            closed += state.pooled.pop(owner, reason) is not None
        return closed

    def close_idle_sessions(self, idle_s: float, keep: Callable[[str], bool]) -> int:
        """Close upstream sessions unused for `idle_s` whose owner `keep` does not vouch for (a live client
        session keeps its own; principals' shared sessions go by their own last use)."""
        return sum(state.pooled.close_idle(idle_s, keep) for state in self._all_states())

    def open_sessions(self) -> dict[str, int]:
        counts: dict[str, int] = dict.fromkeys(self.servers, 0)
        for state in self._all_states():
            counts[state.server.name] = counts.get(state.server.name, 0) + len(state.pooled)
        return counts

    def list_ages(self) -> dict[str, float]:
        """Seconds since each shared upstream's lists were fetched (the last good ones while it is down)."""
        now = time.monotonic()
        return {name: now - state.fetched_at for name, state in self.states.items() if state.fetched_at}

    def session_metrics(self) -> str:
        return self.session_counts.render(self.open_sessions())

    # ---- status ------------------------------------------------------------------------------------------
    @staticmethod
    def describe(state: UpstreamState | None, server: MCPServer) -> dict[str, Any]:
        entry: dict[str, Any] = {"name": server.name, "url": server.url}
        snap = state.snapshot if state is not None else None
        if snap is None:
            entry["state"] = "Connecting"
        elif snap.ok:
            entry.update(state="Connected", era=snap.era, protocolVersion=snap.protocol_version,
                         tools=len(snap.tools), prompts=len(snap.prompts), resources=len(snap.resources),
                         resourceTemplates=len(snap.templates))
            if state is not None and state.down:
                entry.update(unavailable=state.down)
        else:
            entry.update(state="Auth Required" if state is not None and state.auth_required else "Failed",
                         error=snap.error)
            stale = Fleet.listed(state) if state is not None else None
            if stale is not None:
                entry.update(stale=True, tools=len(stale.tools), prompts=len(stale.prompts),
                             resources=len(stale.resources), resourceTemplates=len(stale.templates))
        return entry

    def status(self) -> dict[str, Any]:
        servers = []
        for name in sorted(self.servers):
            server = self.servers[name]
            if self.per_user(server):
                users = [s for (n, _), s in self.user_states.items() if n == name]
                entry = {"name": name, "url": server.url, "state": "Per user",
                         "users": {s.owner: self.describe(s, server)["state"] for s in users}}
            else:
                entry = self.describe(self.states.get(name), server)
            servers.append(entry)
        view = self.view()
        return {"servers": servers, "refused": [str(e) for e in self.errors], "viewProblems": list(view.problems)}

    async def aclose(self, timeout_s: float = 3.0) -> None:
        """Close every upstream session and wait (bounded) for their DELETEs, before the HTTP client closes."""
        for state in self._all_states():
            with contextlib.suppress(Exception):
                self._drop(state, "shutdown")
        if self._closing:
            await asyncio.wait(list(self._closing), timeout=timeout_s)
