"""The fleet as the processor knows it: admitted servers, each upstream's cached lists, and its health.

Lists are fetched concurrently, cached per upstream, and refreshed on the upstream's list_changed, on its
ttlMs, and on catalog changes; a warm list never touches an upstream. A failed upstream is left out of the
view and shown in the status until a later refresh succeeds. Servers whose answers depend on the caller's
credential (token forwarding, token exchange, per-user OAuth) are fetched per user, with that user's
credential, and only that user's view holds them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from cachetools import LRUCache

from catalog.manifests import AdmissionError, MCPServer
from catalog.view import UpstreamSnapshot, View, build_view, x_mcp_header_problem
from extproc.credentials import CredentialError
from extproc.jsonrpc import LEGACY
from extproc.upstream import Handshake, UpstreamAuthError, UpstreamClient, UpstreamError

log = logging.getLogger(__name__)

_LISTS = (("tools/list", "tools", "tools"), ("prompts/list", "prompts", "prompts"),
          ("resources/list", "resources", "resources"), ("resources/templates/list", "resourceTemplates", "resources"))
RETRY_FAILED_AFTER_S = 2.0
MAX_POOLED = 20_000
MAX_USER_STATES = 20_000

# (server, owner subject, the owner's bearer) -> the headers that authenticate the gateway's own calls
AuthSource = Callable[[MCPServer, str, str], Awaitable[Mapping[str, str]]]


async def _no_auth(server: MCPServer, owner: str, bearer: str) -> Mapping[str, str]:
    return {}


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
    pooled: LRUCache[str, Handshake] = field(default_factory=lambda: LRUCache(maxsize=MAX_POOLED))
    modern_only: bool = False

    @property
    def fresh(self) -> bool:
        return self.snapshot is not None and time.monotonic() < self.expires_at

    def cancel(self) -> None:
        for task in (self.refreshing, self.listener):
            if task is not None:
                task.cancel()


class Fleet:
    def __init__(self, client: UpstreamClient, *, prefix: str, mode: str, default_ttl_ms: int,
                 ttl_floor_ms: int = 5_000, list_wait_s: float = 10.0, auth: AuthSource = _no_auth,
                 per_user: Callable[[MCPServer], bool] = lambda _s: False,
                 renew: Callable[[MCPServer, str], Awaitable[None]] | None = None) -> None:
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
        self.on_change: Callable[[MCPServer, str, bool, str], None] | None = None  # (server, owner, up, why)

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
        for name, server in new.items():
            if name not in self.states and not self.per_user(server):
                self.states[name] = UpstreamState(server)
        for err in errors:
            if err not in self.errors:
                log.error("catalog: refused %s", err)
        self.servers = new
        self.errors = tuple(errors)
        self.catalog_generation += 1
        for state in self.states.values():
            self._schedule(state)

    def _drop(self, state: UpstreamState) -> None:
        state.cancel()
        for hs in list(state.pooled.values()):
            if hs.session_id:
                asyncio.get_running_loop().create_task(self.client.delete_session(state.server, hs))

    # ---- refresh ---------------------------------------------------------------------------------------
    def _schedule(self, state: UpstreamState) -> asyncio.Task[None]:
        if state.refreshing is None or state.refreshing.done():
            state.refreshing = asyncio.get_running_loop().create_task(self._refresh(state))
        return state.refreshing

    async def _credentials(self, state: UpstreamState) -> dict[str, str]:
        return dict(await self.auth(state.server, state.owner, state.bearer))

    async def _fetch(self, state: UpstreamState) -> tuple[Handshake, list[tuple[list[dict[str, Any]], int | None]]]:
        auth = await self._credentials(state)
        hs = state.handshake or await self.client.probe(state.server, auth)
        hs.auth = auth
        state.handshake = hs
        results = await asyncio.gather(*(self._list(state.server, hs, m, k, cap) for m, k, cap in _LISTS))
        return hs, list(results)

    async def _refresh(self, state: UpstreamState) -> None:
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
        except CredentialError as exc:
            self._fail(state, exc.reason, auth_required=exc.auth_required)
            return
        except UpstreamAuthError as exc:
            self._fail(state, str(exc), auth_required=True)
            return
        except UpstreamError as exc:
            self._fail(state, str(exc))
            return
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.exception("upstream %s: refresh crashed", server.name)
            self._fail(state, f"internal error: {type(exc).__name__}")
            return
        (tools, t1), (prompts, t2), (resources, t3), (templates, t4) = results
        ttls = [t for t in (t1, t2, t3, t4, hs.ttl_ms) if isinstance(t, int)]
        ttl = min(ttls) if ttls else None
        tools = self._valid_tools(server.name, tools)
        self._generation += 1
        previously_failed = state.snapshot is not None and not state.snapshot.ok
        first = state.snapshot is None
        state.auth_required = False
        state.snapshot = UpstreamSnapshot(
            server=server.name, ok=True, era=hs.era, protocol_version=hs.version, capabilities=hs.capabilities,
            instructions=hs.instructions, tools=tuple(tools), prompts=tuple(prompts), resources=tuple(resources),
            templates=tuple(templates), ttl_ms=ttl, generation=self._generation)
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
            state.listener = asyncio.get_running_loop().create_task(self._listen(state, hs))

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
        state.snapshot = UpstreamSnapshot(server=name, ok=False, error=reason, generation=self._generation)
        state.auth_required = auth_required
        state.handshake = None
        state.pooled.clear()
        state.expires_at = 0.0

    async def _listen(self, state: UpstreamState, hs: Handshake) -> None:
        """Follow the upstream's list_changed notifications; any of them refreshes that upstream."""
        delay = 1.0
        while True:
            try:
                async for msg in self.client.events(state.server, hs):
                    if str(msg.get("method", "")).endswith("/list_changed"):
                        log.info("upstream %s: %s", state.server.name, msg["method"])
                        state.expires_at = 0.0
                        self._schedule(state)
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
            state = self.user_states[key] = UpstreamState(server, owner=subject)
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
        """Make the view current: wait (bounded) for upstreams never fetched, refresh stale ones behind."""
        waits = []
        now = time.monotonic()
        for state in self.caller_states(subject, bearer):
            if state.snapshot is None or (not state.snapshot.ok and now - state.last_attempt > RETRY_FAILED_AFTER_S):
                waits.append(self._schedule(state))
            elif state.snapshot.ok and not state.fresh:
                self._schedule(state)
        if waits:
            await asyncio.wait([asyncio.shield(w) for w in waits], timeout=self.list_wait_s)

    async def maintain(self, every_s: float = 2.0) -> None:
        """Retry failed upstreams in the background, so the status recovers without client traffic."""
        while True:
            await asyncio.sleep(every_s)
            now = time.monotonic()
            for state in list(self.states.values()):
                if state.snapshot is not None and not state.snapshot.ok and now - state.last_attempt > every_s:
                    self._schedule(state)

    def view(self, subject: str = "") -> View:
        states = [s for s in self.caller_states(subject) if s.snapshot is not None and s.snapshot.ok]
        snapshots = {s.server.name: s.snapshot for s in states if s.snapshot is not None}
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
        if pooled is None:
            try:
                pooled = await self.client.initialize(state.server, client_capabilities, log_level, auth)
            except UpstreamError:
                if hs.era == LEGACY:
                    raise
                state.modern_only = True
                return hs
            state.pooled[owner] = pooled
        return pooled

    def pooled_session(self, name: str, owner: str, subject: str = "") -> Handshake | None:
        if name not in self.servers:
            return None
        return self.state_for(name, subject).pooled.get(owner)

    def _all_states(self) -> list[UpstreamState]:
        return [*self.states.values(), *self.user_states.values()]

    def sessions_of(self, owner: str) -> list[tuple[MCPServer, Handshake]]:
        return [(s.server, s.pooled[owner]) for s in self._all_states() if owner in s.pooled]

    def forget_session(self, name: str, owner: str, subject: str = "") -> Handshake | None:
        if name not in self.servers:
            return None
        return self.state_for(name, subject).pooled.pop(owner, None)

    async def end_sessions(self, owner: str) -> None:
        for state in self._all_states():
            hs = state.pooled.pop(owner, None)
            if hs is not None and hs.session_id:
                await self.client.delete_session(state.server, hs)

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
        else:
            entry.update(state="Auth Required" if state is not None and state.auth_required else "Failed",
                         error=snap.error)
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

    async def aclose(self) -> None:
        for state in self._all_states():
            with contextlib.suppress(Exception):
                self._drop(state)
