"""State that must outlive one processor process: a handshake-era client's upstream sessions and the
`requestState` values callers present back.

With a `store` (Redis/Valkey), every worker of every replica sees the same upstream session for one gateway
session and one server (a hash `muster-edge:upstream:<session nonce>`, one field per server, each value sealed
with the gateway key), so a call, a relayed answer to an elicitation or a resumed stream lands on the upstream
session that asked, whichever process serves it. Without a store these are no-ops (None / nothing shared): Envoy
pins a session to one worker instead (envoy_config.pinned_routes).

`requestState` binding: a state handed to one caller is refused to any other. The gateway binds it when it sees
the result that carries it (edge tools such as call_tool) and, for routed calls whose answers it does not read,
when the state first comes back; in the store when there is one, else per process.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
from typing import Any

import orjson
from cachetools import TTLCache

from extproc.sessions import Sealer
from extproc.upstream import Handshake

log = logging.getLogger(__name__)

_AAD = b"muster-edge/upstream-session/v1|"
LEVEL_FIELD = "@logLevel"  # beside the servers' fields: the level the client set, for sessions opened later
STATE_TTL_S = 3_600
MAX_LOCAL_STATES = 100_000


def _aad(owner: str, server: str) -> bytes:
    return _AAD + owner.encode() + b"|" + server.encode()


def encode_handshake(hs: Handshake) -> bytes:
    """What another process needs to use an upstream session: never the credential (each process gets its own
    from the broker)."""
    return orjson.dumps({"era": hs.era, "version": hs.version, "sid": hs.session_id,
                         "caps": hs.capabilities, "info": hs.server_info})


def decode_handshake(raw: bytes, owner: str) -> Handshake | None:
    try:
        obj = orjson.loads(raw)
        return Handshake(str(obj["era"]), str(obj["version"]), str(obj["sid"]), dict(obj.get("caps") or {}),
                         server_info=dict(obj.get("info") or {}), shared_owner=owner)
    except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
        return None


def state_key(state: Any) -> str:
    """A fixed-size key for a presented requestState (any JSON value), so the store never holds the state."""
    return hashlib.sha256(orjson.dumps(state, option=orjson.OPT_SORT_KEYS)).hexdigest()


class Continuity:
    """The store side of continuity; every method is cheap and safe to call without a store."""

    def __init__(self, redis_url: str, sealer: Sealer, *, ttl_s: int = 86_400, prefix: str = "muster-edge:") -> None:
        self._sealer = sealer
        self._ttl = ttl_s
        self._prefix = prefix
        self._redis: Any = None
        if redis_url:
            import redis.asyncio as redis

            self._redis = redis.from_url(redis_url)
        self._states: TTLCache[str, str] = TTLCache(maxsize=MAX_LOCAL_STATES, ttl=STATE_TTL_S)

    @property
    def shared(self) -> bool:
        return self._redis is not None

    def _key(self, owner: str) -> str:
        return f"{self._prefix}upstream:{owner}"

    # ---- upstream sessions per gateway session ------------------------------------------------------------
    async def get(self, owner: str, server: str) -> Handshake | None:
        return (await self.lookup(owner, server))[0]

    async def lookup(self, owner: str, server: str) -> tuple[Handshake | None, str]:
        """The owner's shared session on a server, and the log level its client set (one round trip)."""
        if self._redis is None:
            return None, ""
        raw, level = await self._redis.hmget(self._key(owner), [server, LEVEL_FIELD])
        return self._open(owner, server, raw), level.decode() if isinstance(level, bytes) else ""

    async def all_of(self, owner: str) -> dict[str, Handshake]:
        if self._redis is None:
            return {}
        return self._open_all(owner, await self._redis.hgetall(self._key(owner)))

    async def set_level(self, owner: str, level: str) -> None:
        if self._redis is not None:
            pipe = self._redis.pipeline(transaction=True)
            pipe.hset(self._key(owner), LEVEL_FIELD, level)
            pipe.expire(self._key(owner), self._ttl)
            await pipe.execute()

    def _open_all(self, owner: str, found: Any) -> dict[str, Handshake]:
        out: dict[str, Handshake] = {}
        for field_, raw in (found or {}).items():
            server = field_.decode() if isinstance(field_, bytes) else str(field_)
            hs = self._open(owner, server, raw) if server != LEVEL_FIELD else None
            if hs is not None:
                out[server] = hs
        return out

    def _open(self, owner: str, server: str, raw: Any) -> Handshake | None:
        if raw is None:
            return None
        payload = self._sealer.open(raw.decode() if isinstance(raw, bytes) else str(raw), _aad(owner, server))
        return decode_handshake(payload, owner) if payload is not None else None

    async def publish(self, owner: str, server: str, hs: Handshake) -> Handshake | None:
        """Offer a session this process just opened; returns the one every process uses (another process's
        when it published first), or None without a store."""
        if self._redis is None:
            return None
        key = self._key(owner)
        sealed = self._sealer.seal(encode_handshake(hs), _aad(owner, server))
        pipe = self._redis.pipeline(transaction=True)
        pipe.hsetnx(key, server, sealed)
        pipe.expire(key, self._ttl)
        pipe.hget(key, server)
        added, _, current = await pipe.execute()
        if added:
            hs.shared_owner = owner
            return hs
        return self._open(owner, server, current)

    async def drop(self, owner: str, server: str, session_id: str) -> bool:
        """Forget one shared session (the upstream lost it, or it was evicted); True if this call removed it."""
        if self._redis is None:
            return False
        current = await self.get(owner, server)
        if current is None or current.session_id != session_id:
            return False
        return bool(await self._redis.hdel(self._key(owner), server))

    async def take_owner(self, owner: str) -> dict[str, Handshake]:
        """Every shared upstream session of an ended gateway session, removed at once: of several processes
        ending one session, exactly one gets them (and closes them)."""
        if self._redis is None:
            return {}
        pipe = self._redis.pipeline(transaction=True)
        pipe.hgetall(self._key(owner))
        pipe.delete(self._key(owner))
        found, _ = await pipe.execute()
        return self._open_all(owner, found)

    # ---- requestState bound to a caller ------------------------------------------------------------------
    async def bind_state(self, state: Any, caller: str) -> bool:
        """Bind a requestState to a caller, or check it: False when another caller holds it."""
        key = state_key(state)
        if self._redis is not None:
            skey = f"{self._prefix}state:{key}"
            if await self._redis.set(skey, caller.encode(), nx=True, ex=STATE_TTL_S):
                return True
            holder = await self._redis.get(skey)
            return holder is None or holder == caller.encode()
        return self.claim_here(key, caller)[0] == caller

    def claim_here(self, key: str, caller: str) -> tuple[str, bool]:
        """(who holds the state key in this process, whether this call bound it); without a store."""
        holder = self._states.get(key)
        if holder is None:
            self._states[key] = caller
            return caller, True
        return holder, False

    def hold_here(self, key: str, holder: str) -> None:
        """A sibling worker bound this state first: its holder is the holder here too."""
        self._states[key] = holder

    async def aclose(self) -> None:
        if self._redis is not None:
            with contextlib.suppress(Exception):
                await self._redis.aclose()
