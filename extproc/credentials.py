"""The credential each upstream gets instead of the caller's bearer.

Static headers (values from files or environment variables, for mounted Kubernetes Secrets), the caller's
token forwarded unchanged (`auth.forwardToken`), an RFC 8693 exchanged token (`auth.tokenExchange`), or a
per-user OAuth token (`auth.type: oauth`, see oauth.py). Exchanged tokens are cached per (token endpoint,
connector, subject, audience) until shortly before they expire, in memory and, when configured, in Redis or
Valkey (sealed: a token is never stored in clear); concurrent calls of one user cause one exchange.
No token or secret is ever logged: errors name the server and the reason only.
"""

from __future__ import annotations

import asyncio
import base64
import functools
import hashlib
import logging
import os
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol
from urllib.parse import quote_plus, urlsplit

import httpx2
import orjson
from cachetools import TLRUCache, TTLCache

from catalog.manifests import MCPServer, TokenExchange
from extproc import tracing
from extproc.sessions import Sealer

log = logging.getLogger(__name__)

GRANT_TOKEN_EXCHANGE = "urn:ietf:params:oauth:grant-type:token-exchange"
TYPE_ID_TOKEN = "urn:ietf:params:oauth:token-type:id_token"
TYPE_ACCESS_TOKEN = "urn:ietf:params:oauth:token-type:access_token"
EXPIRY_BUFFER_S = 30
MAX_SUBJECT_TOKEN = 64 * 1024
_REF = re.compile(r"\$\{(env|file):([^}]+)\}")
_AAD = b"muster-edge/token/v1"
# KEYS[1] a sorted set of attempt times; ARGV now_ms, window_ms, limit, a unique member. Returns attempts left, or -1.
_SLIDING_WINDOW = """
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[1] - ARGV[2])
local used = redis.call('ZCARD', KEYS[1])
if used >= tonumber(ARGV[3]) then return -1 end
redis.call('ZADD', KEYS[1], ARGV[1], ARGV[4])
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return tonumber(ARGV[3]) - used - 1
"""


class CredentialError(Exception):
    """No credential could be had for an upstream; `reason` is safe to show (no token, no secret)."""

    def __init__(self, server: str, reason: str, *, auth_required: bool = False) -> None:
        super().__init__(f"{server}: {reason}")
        self.server = server
        self.reason = reason
        self.auth_required = auth_required


class SecretFiles:
    """Secrets as Kubernetes mounts them: `<dir>/<namespace>/<name>/<key>` (or `<dir>/<name>/<key>`)."""

    RECHECK_S = 1.0

    def __init__(self, folder: str) -> None:
        self.folder = folder
        self._cache: dict[str, tuple[int, str, float]] = {}

    def read_file(self, path: str) -> str:
        """A file's content (trailing newline removed), re-read when it changes (rotated Secrets).

        Looked at at most once a second: a routed call with a file-backed header costs a dict lookup.
        """
        now = time.monotonic()
        cached = self._cache.get(path)
        if cached is not None and now - cached[2] < self.RECHECK_S:
            return cached[1]
        mtime = os.stat(path).st_mtime_ns
        if cached is None or cached[0] != mtime:
            with open(path, encoding="utf-8") as fh:
                cached = (mtime, fh.read().rstrip("\r\n"), now)
        self._cache[path] = (cached[0], cached[1], now)
        return cached[1]

    def secret(self, namespace: str, name: str, key: str) -> str:
        for path in (os.path.join(self.folder, namespace, name, key), os.path.join(self.folder, name, key)):
            if os.path.exists(path):
                return self.read_file(path)
        raise FileNotFoundError(f"secret {namespace}/{name} has no key {key!r} under {self.folder}")


def resolve_value(value: str, files: SecretFiles) -> str:
    """`${env:NAME}` and `${file:PATH}` inside a header value, replaced by what they name."""
    def one(match: re.Match[str]) -> str:
        kind, ref = match.group(1), match.group(2).strip()
        if kind == "env":
            if ref not in os.environ:
                raise KeyError(f"environment variable {ref} is not set")
            return os.environ[ref]
        return files.read_file(ref)

    return _REF.sub(one, value)


def exchange_form(exchange: TokenExchange, subject_token: str, required_audiences: tuple[str, ...] = ()
                  ) -> dict[str, str]:
    """The RFC 8693 request, with Muster's parameters; `audience`/`resource` only for IdPs that are not Dex.

    Muster sends the user's Dex ID token and asks for an ID token; a caller here may hold a JWT access token
    instead (`typ: at+jwt`), and then says so. With `audience` or `resource` set (a non-Dex IdP) an access
    token is requested.
    """
    subject_type = TYPE_ACCESS_TOKEN if _jwt_type(subject_token) == "at+jwt" else TYPE_ID_TOKEN
    scopes = exchange.scopes or "openid profile email groups"
    scopes = " ".join([scopes, *(f"audience:server:client_id:{a}" for a in required_audiences)])
    form = {
        "grant_type": GRANT_TOKEN_EXCHANGE,
        "subject_token": subject_token,
        "subject_token_type": subject_type,
        "requested_token_type": TYPE_ACCESS_TOKEN if (exchange.audience or exchange.resource) else TYPE_ID_TOKEN,
        "scope": scopes,
    }
    if exchange.connector_id:
        form["connector_id"] = exchange.connector_id
    if exchange.audience:
        form["audience"] = exchange.audience
    if exchange.resource:
        form["resource"] = exchange.resource
    return form


def _jwt_part(token: str, index: int) -> dict[str, Any]:
    try:
        part = token.split(".")[index]
        value = orjson.loads(base64.urlsafe_b64decode(part + "=" * (-len(part) % 4)))
    except (IndexError, ValueError, orjson.JSONDecodeError):
        return {}
    return value if isinstance(value, dict) else {}


def _jwt_type(token: str) -> str:
    return str(_jwt_part(token, 0).get("typ", "")).lower()


def basic_auth(client_id: str, secret: str) -> str:
    """HTTP Basic client authentication, each part form-encoded first (RFC 6749 §2.3.1)."""
    pair = f"{quote_plus(client_id)}:{quote_plus(secret)}".encode()
    return "Basic " + base64.b64encode(pair).decode()


def expected_issuer(exchange: TokenExchange) -> str:
    """Muster's default: the token endpoint without a trailing `/token` and `/`."""
    if exchange.expected_issuer:
        return exchange.expected_issuer.rstrip("/")
    endpoint = exchange.dex_token_endpoint.rstrip("/")
    return (endpoint[: -len("/token")] if endpoint.endswith("/token") else endpoint).rstrip("/")


class TokenStore(Protocol):
    shared: bool

    async def get(self, key: str) -> bytes | None: ...
    async def set(self, key: str, value: bytes, ttl_s: float) -> None: ...
    async def delete(self, key: str) -> None: ...
    async def take(self, key: str) -> bytes | None: ...
    async def hit(self, key: str, limit: int, window_s: float) -> int: ...
    async def lock(self, key: str, ttl_s: float) -> bool: ...
    async def unlock(self, key: str) -> None: ...


class MemoryStore:
    """Bounded, per-entry expiry; the default for one replica."""

    shared = False

    def __init__(self, maxsize: int = 50_000) -> None:
        self._items: TLRUCache[str, tuple[float, bytes]] = TLRUCache(
            maxsize=maxsize, ttu=lambda _k, v, now: v[0], timer=time.monotonic)

    async def get(self, key: str) -> bytes | None:
        item = self._items.get(key)
        return item[1] if item else None

    async def set(self, key: str, value: bytes, ttl_s: float) -> None:
        self._items[key] = (time.monotonic() + ttl_s, value)

    async def delete(self, key: str) -> None:
        self._items.pop(key, None)

    async def take(self, key: str) -> bytes | None:
        """Get and delete in one step (nothing awaits in between): of two takers, one gets the value."""
        item = self._items.pop(key, None)
        return item[1] if item is not None and item[0] > time.monotonic() else None

    async def hit(self, key: str, limit: int, window_s: float) -> int:
        """Count one attempt in a sliding window unless `limit` are already in it; the attempts left after this
        one, or -1 when refused (a refused attempt is not counted)."""
        now = time.monotonic()
        item = self._items.get(key)
        times = [t for t in orjson.loads(item[1]) if t > now - window_s] if item else []
        if len(times) >= limit:
            return -1
        times.append(now)
        self._items[key] = (now + window_s, orjson.dumps(times))
        return limit - len(times)

    async def lock(self, key: str, ttl_s: float) -> bool:
        return True

    async def unlock(self, key: str) -> None:
        return None


class RedisStore:
    """Redis or Valkey, shared by every replica; values are sealed with the gateway's key."""

    shared = True

    def __init__(self, url: str, sealer: Sealer, prefix: str = "muster-edge:") -> None:
        import redis.asyncio as redis

        self._redis = redis.from_url(url)
        self._sealer = sealer
        self._prefix = prefix
        # key -> the redis-py Lock this process holds (its owner token); bounded, and gone after any lock's life
        self._locks: TTLCache[str, Any] = TTLCache(maxsize=100_000, ttl=120)
        self._hit = self._redis.register_script(_SLIDING_WINDOW)

    async def get(self, key: str) -> bytes | None:
        raw = await self._redis.get(self._prefix + key)
        if raw is None:
            return None
        return self._sealer.open(raw.decode() if isinstance(raw, bytes) else str(raw), _AAD)

    async def set(self, key: str, value: bytes, ttl_s: float) -> None:
        await self._redis.set(self._prefix + key, self._sealer.seal(value, _AAD), px=max(1, int(ttl_s * 1000)))

    async def delete(self, key: str) -> None:
        await self._redis.delete(self._prefix + key)

    async def take(self, key: str) -> bytes | None:
        """GETDEL: of two replicas taking one key at once, exactly one gets the value."""
        raw = await self._redis.getdel(self._prefix + key)
        if raw is None:
            return None
        return self._sealer.open(raw.decode() if isinstance(raw, bytes) else str(raw), _AAD)

    async def hit(self, key: str, limit: int, window_s: float) -> int:
        """The sliding window of MemoryStore.hit, shared by every replica (one Lua script, so atomic)."""
        now_ms = int(time.time() * 1000)
        member = f"{now_ms}-{os.urandom(6).hex()}"
        return int(await self._hit(keys=[self._prefix + key],
                                   args=[now_ms, int(window_s * 1000), limit, member]))

    async def lock(self, key: str, ttl_s: float) -> bool:
        """One replica at a time may fill `key`: redis-py's Lock (SET NX PX with a random owner token, so a crashed
        holder cannot block, and a release never deletes a lock that expired and another replica now holds)."""
        from redis.asyncio.lock import Lock

        lock = Lock(self._redis, f"{self._prefix}lock:{key}", timeout=ttl_s, blocking=False,
                    thread_local=False, raise_on_release_error=False)
        if not await lock.acquire(blocking=False):
            return False
        self._locks[key] = lock
        return True

    async def unlock(self, key: str) -> None:
        """Release the lock only if this process still owns it (the owner token checked in Redis, atomically)."""
        from redis.exceptions import LockError

        lock = self._locks.pop(key, None)
        if lock is not None:
            try:
                await lock.release()
            except LockError:  # it expired, and may be another replica's by now: theirs to release
                log.info("a store lock expired before its holder released it")


@dataclass(frozen=True)
class Issued:
    token: str
    expires_at: float  # unix time
    issued_at: float = field(default_factory=time.time)


def expiry_buffer(issued: Issued) -> float:
    """How long before expiry a token is renewed: Muster's 30 s, or a quarter of a shorter lifetime."""
    return min(EXPIRY_BUFFER_S, max(1.0, (issued.expires_at - issued.issued_at) / 4))


class Exchanger:
    """RFC 8693 with a cache in front (memory first, then the shared store) and one exchange per key at a time."""

    def __init__(self, http: httpx2.AsyncClient, store: TokenStore, secrets: SecretFiles) -> None:
        self._http = http
        self._store = store
        self._secrets = secrets
        self._local = MemoryStore()
        self._inflight: dict[str, asyncio.Future[Issued]] = {}
        self.exchanges = 0
        # each exchange at the IdP (server, seconds, ok), for /metrics
        self.on_exchange: Callable[[str, float, bool], None] = lambda _server, _seconds, _ok: None

    @staticmethod
    @functools.lru_cache(maxsize=65_536)
    def cache_key(exchange: TokenExchange, subject: str) -> str:
        """Per (token endpoint, connector, subject, audience); hashed so a store never holds a subject in clear."""
        audience = exchange.audience or exchange.resource
        raw = "\0".join([exchange.dex_token_endpoint, exchange.connector_id, subject, audience])
        return "exchange:" + hashlib.sha256(raw.encode()).hexdigest()

    async def token(self, server: MCPServer, subject: str, subject_token: str) -> str:
        exchange = server.auth.token_exchange
        assert exchange is not None
        key = self.cache_key(exchange, subject)
        now = time.time()
        for store in (self._local, self._store):
            raw = await store.get(key)
            if raw is not None:
                cached = orjson.loads(raw)
                if cached["expires_at"] - cached.get("buffer", EXPIRY_BUFFER_S) > now:
                    if store is not self._local:
                        await self._local.set(key, raw, cached["expires_at"] - cached.get("buffer", EXPIRY_BUFFER_S)
                                              - now)
                    return str(cached["access_token"])
        pending = self._inflight.get(key)
        if pending is None:
            pending = self._inflight[key] = asyncio.get_running_loop().create_future()
            try:
                issued = await self._exchange_once(server, exchange, subject_token, key)
            except asyncio.CancelledError:
                pending.cancel()
                raise
            except Exception as exc:
                pending.set_exception(exc)
                pending.exception()  # retrieved here; waiters re-raise it
                raise
            finally:
                self._inflight.pop(key, None)
            pending.set_result(issued)
            ttl = issued.expires_at - expiry_buffer(issued) - time.time()
            try:
                if ttl > 0:
                    raw = orjson.dumps({"access_token": issued.token, "expires_at": issued.expires_at,
                                        "buffer": expiry_buffer(issued)})
                    await self._local.set(key, raw, ttl)
                    await self._store.set(key, raw, ttl)
            finally:
                await self._store.unlock(key)
            return issued.token
        return (await asyncio.shield(pending)).token

    async def _exchange_once(self, server: MCPServer, exchange: TokenExchange, subject_token: str,
                             key: str) -> Issued:
        """With a shared store, one replica exchanges and the others wait for its result (bounded)."""
        if not self._store.shared or await self._store.lock(key, 10.0):
            return await self._exchange(server, exchange, subject_token)
        deadline = time.monotonic() + 10.0
        while time.monotonic() < deadline:
            await asyncio.sleep(0.05)
            raw = await self._store.get(key)
            if raw is not None:
                cached = orjson.loads(raw)
                return Issued(str(cached["access_token"]), float(cached["expires_at"]))
        return await self._exchange(server, exchange, subject_token)

    async def evict(self, server: MCPServer, subject: str) -> None:
        exchange = server.auth.token_exchange
        if exchange is not None:
            key = self.cache_key(exchange, subject)
            await self._local.delete(key)
            await self._store.delete(key)

    async def _exchange(self, server: MCPServer, exchange: TokenExchange, subject_token: str) -> Issued:
        started, ok = time.perf_counter(), False
        try:
            with tracing.span("muster_edge.token_exchange", {"muster_edge.server": server.name}):
                issued = await self._exchange_at_idp(server, exchange, subject_token)
            ok = True
            return issued
        finally:
            self.on_exchange(server.name, time.perf_counter() - started, ok)

    async def _exchange_at_idp(self, server: MCPServer, exchange: TokenExchange, subject_token: str) -> Issued:
        if len(subject_token) > MAX_SUBJECT_TOKEN:
            raise CredentialError(server.name, "token exchange refused: the subject token is larger than 64 KB")
        headers = {}
        ref = exchange.client_credentials_secret_ref
        if ref is not None:
            try:
                client_id = self._secrets.secret(ref.namespace, ref.name, ref.client_id_key)
                secret = self._secrets.secret(ref.namespace, ref.name, ref.client_secret_key)
            except OSError as exc:
                raise CredentialError(server.name, f"token exchange client credentials unavailable: {exc}") from None
            headers["authorization"] = basic_auth(client_id, secret)
        form = exchange_form(exchange, subject_token, server.auth.required_audiences)
        self.exchanges += 1
        try:
            resp = await self._http.post(exchange.dex_token_endpoint, data=form, headers=headers, timeout=10.0)
        except httpx2.HTTPError as exc:
            host = urlsplit(exchange.dex_token_endpoint).netloc
            raise CredentialError(server.name, f"token exchange failed: {host} unreachable "
                                               f"({type(exc).__name__})") from None
        if resp.status_code != 200:
            try:
                body = resp.json()
            except ValueError:
                body = {}
            error = body.get("error", "") if isinstance(body, dict) else ""
            raise CredentialError(server.name, f"token exchange failed: HTTP {resp.status_code}"
                                               + (f" {error}" if error else ""))
        try:
            answer = resp.json()
            token = str(answer["access_token"])
        except (ValueError, KeyError, TypeError):
            raise CredentialError(server.name, "token exchange failed: no access_token in the answer") from None
        claims = _jwt_part(token, 1)
        want = expected_issuer(exchange)
        if claims and want and str(claims.get("iss", "")).rstrip("/") != want:
            raise CredentialError(server.name, f"token issuer mismatch: expected {want}, got {claims.get('iss')}. "
                                               "Hint: If accessing Dex via a proxy, set 'expectedIssuer'")
        expires_in = answer.get("expires_in")
        if isinstance(expires_in, (int, float)) and expires_in > 0:
            expires_at = time.time() + float(expires_in)
        else:
            expires_at = float(claims.get("exp", 0)) or time.time() + 300
        log.info("token exchange for server %s: issued, valid for %ds", server.name, int(expires_at - time.time()))
        return Issued(token, expires_at)


@dataclass(frozen=True)
class Credential:
    """Headers to set on one upstream request, and how they were obtained (for the auth status)."""

    headers: Mapping[str, str]
    forward_caller_token: bool
    kind: str  # static | forwarded | exchanged | oauth | none


class Broker:
    """Picks and obtains the credential for (upstream, caller)."""

    def __init__(self, exchanger: Exchanger, secrets: SecretFiles, user_tokens: Any = None) -> None:
        self.exchanger = exchanger
        self.secrets = secrets
        self.user_tokens = user_tokens

    def static_headers(self, server: MCPServer) -> dict[str, str]:
        try:
            return {k.lower(): resolve_value(v, self.secrets) for k, v in server.headers.items()}
        except (OSError, KeyError) as exc:
            raise CredentialError(server.name, f"static header unavailable: {exc}") from None

    @staticmethod
    def per_user(server: MCPServer) -> bool:
        """Servers whose answers depend on the caller's credential: their lists are fetched per user."""
        te = server.auth.token_exchange
        return server.auth.forward_token or (te is not None and te.enabled) or server.auth.type == "oauth"

    @staticmethod
    def renewable(server: MCPServer) -> bool:
        """Credentials the gateway obtains and may renew after an upstream's 401 (exchange, per-user OAuth)."""
        te = server.auth.token_exchange
        return (te is not None and te.enabled) or (server.auth.type == "oauth" and not server.auth.forward_token)

    async def credential(self, server: MCPServer, subject: str, bearer: str) -> Credential:
        headers = self.static_headers(server)
        te = server.auth.token_exchange
        if te is not None and te.enabled and te.dex_token_endpoint and te.connector_id:
            if not bearer:
                raise CredentialError(server.name, "token exchange needs the caller's token (is auth on?)")
            headers["authorization"] = f"Bearer {await self.exchanger.token(server, subject, bearer)}"
            return Credential(headers, False, "exchanged")
        if server.auth.forward_token:
            if not bearer:
                raise CredentialError(server.name, "forwardToken needs the caller's token (is auth on?)")
            headers["authorization"] = f"Bearer {bearer}"
            return Credential(headers, True, "forwarded")
        if server.auth.type == "oauth" and self.user_tokens is not None:
            token = await self.user_tokens.token_for(server, subject)
            if token is None:
                raise CredentialError(server.name,
                                      f"no token of yours yet: call core_auth_login with server={server.name}",
                                      auth_required=True)
            headers["authorization"] = f"Bearer {token}"
            return Credential(headers, False, "oauth")
        return Credential(headers, False, "static" if headers else "none")

    async def evict(self, server: MCPServer, subject: str) -> None:
        await self.exchanger.evict(server, subject)
        if self.user_tokens is not None and server.auth.type == "oauth":
            await self.user_tokens.expire(server, subject)
