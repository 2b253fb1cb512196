"""Telling the other processes of a gateway that a session ended, and asking whether they still see one.

Two carriers, both optional:
- sibling workers of one gateway (no store needed): each worker's status listener takes `POST /peer` with a
  message sealed with the gateway's key (so only a holder of the key can end a session this way);
- the `store` (Redis), shared by every replica: an ended session is a key with a TTL as long as a session can
  live (checked on every handshake-era request), announced on a pub/sub channel so every process closes its
  own upstream sessions; "seen" keys (expiring after the idle timeout) tell whether a session is in use
  anywhere before one process expires it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import httpx2
import orjson

from extproc.sessions import Sealer

log = logging.getLogger(__name__)

_AAD = b"muster-edge/peer/v1"
CHANNEL = "muster-edge:sessions-ended"
PEER_PATH = "/peer"
BATCH = 5_000  # sessions per sibling message: a sealed message stays far below the status listener's 1 MiB

# (nonce, issued_at) pairs and why they ended -> end them in this process
EndHere = Callable[[list[tuple[bytes, int]], str], None]
# nonces -> those this process saw within the idle timeout
SeenHere = Callable[[list[bytes]], list[bytes]]
# (server, upstream session owner, subject): the upstream lost that session: forget it in this process
LostHere = Callable[[str, str, str], None]
# (requestState key, caller) -> who holds that state in this process (binding it to the caller if nobody did)
ClaimHere = Callable[[str, str], str]
# (gateway session, the client's request id, the notification's params): cancel that request if it is held here
CancelHere = Callable[[str, Any, dict[str, Any]], None]


class Peers:
    def __init__(self, sealer: Sealer, siblings: Sequence[str] = (), redis_url: str = "", *,
                 idle_timeout_s: float = 1800.0, max_age_s: int = 86_400, prefix: str = "muster-edge:") -> None:
        self._sealer = sealer
        self.siblings = list(siblings)
        self._idle = idle_timeout_s
        self._max_age = max_age_s
        self._prefix = prefix
        self._redis: Any = None
        if redis_url:
            import redis.asyncio as redis

            self._redis = redis.from_url(redis_url)
        self._http = httpx2.AsyncClient(timeout=2.0) if self.siblings else None
        self._touched: dict[bytes, float] = {}
        # the notification channel's events from other processes (extproc/notify.py: logins, subscriptions)
        self.on_notify: Callable[[dict[str, Any]], None] | None = None
        # a client's notifications/cancelled that reached another process than the one holding its request
        self.on_cancel: CancelHere | None = None
        self._origin = secrets.token_hex(8)

    @property
    def shared(self) -> bool:
        return self._redis is not None

    @property
    def store(self) -> Any:
        """The store's client (redis.asyncio), or None without a store: for other shared state (task ids)."""
        return self._redis

    async def tell_siblings(self, msg: dict[str, Any]) -> None:
        """A sealed message to every sibling worker, awaited (short timeouts); failures are logged, not raised.
        Ops other than end/seen are read by `Gateway.peer_message` before `handle`."""
        results = await asyncio.gather(*(self._post(url, msg) for url in self.siblings), return_exceptions=True)
        for result in results:
            if isinstance(result, BaseException):
                log.warning("telling a sibling worker (%s) failed: %s", msg.get("op"), type(result).__name__)

    # ---- announcing -------------------------------------------------------------------------------------------
    def _seal(self, obj: dict[str, Any]) -> bytes:
        return self._sealer.seal(orjson.dumps(obj), _AAD).encode()

    def open(self, body: bytes) -> dict[str, Any] | None:
        payload = self._sealer.open(body.decode("ascii", "replace").strip(), _AAD, max_len=1 << 20)
        if payload is None:
            return None
        obj = orjson.loads(payload)
        return obj if isinstance(obj, dict) else None

    async def announce_end(self, ended: list[tuple[bytes, int]], reason: str) -> None:
        """Every other process learns the sessions ended before this returns (bounded by short timeouts)."""
        jobs: list[Awaitable[Any]] = []
        for start in range(0, len(ended), BATCH):
            batch = ended[start:start + BATCH]
            msg = {"op": "end", "reason": reason, "sessions": [[n.hex(), t] for n, t in batch], "at": time.time()}
            if self._redis is not None:
                jobs.append(self._redis_end(batch, msg))
            jobs += [self._post(url, msg) for url in self.siblings]
        results = await asyncio.gather(*jobs, return_exceptions=True)
        for result in results:
            if isinstance(result, BaseException):
                log.warning("telling the other processes a session ended failed: %s", type(result).__name__)

    async def announce_lost(self, server: str, owner: str, subject: str) -> None:
        """The upstream lost an owner's session (it answered 404 to a call whose answer this process read): every
        other process holding it forgets it, so the client's retry opens a new one wherever it lands."""
        await self._broadcast({"op": "lost", "server": server, "owner": owner, "subject": subject},
                              "an upstream session was lost")

    async def _broadcast(self, msg: dict[str, Any], what: str) -> None:
        """`msg` to every sibling worker and, with a store, every replica; failures are logged, not raised."""
        jobs: list[Awaitable[Any]] = [self._post(url, msg) for url in self.siblings]
        if self._redis is not None:
            jobs.append(self._redis.publish(CHANNEL, self._seal(msg)))
        for result in await asyncio.gather(*jobs, return_exceptions=True):
            if isinstance(result, BaseException):
                log.warning("telling the other processes %s failed: %s", what, type(result).__name__)

    async def claim_state(self, key: str, caller: str) -> str:
        """Bind a requestState key to a caller in every sibling worker (no store); the holder a sibling already
        had, if it is another caller, else `caller`. A sibling that is down holds nothing and serves nothing (one
        restarted later has forgotten its bindings, like the sessions that ended before it started)."""
        msg = {"op": "claim", "key": key, "caller": caller}
        answers = await asyncio.gather(*(self._post(url, msg) for url in self.siblings), return_exceptions=True)
        for answer in answers:
            if not isinstance(answer, httpx2.Response) or answer.status_code != 200:
                log.warning("a sibling worker did not answer a requestState claim")
                continue
            holder = orjson.loads(answer.content)
            if isinstance(holder, str) and holder != caller:
                return holder
        return caller

    async def _redis_end(self, ended: list[tuple[bytes, int]], msg: dict[str, Any]) -> None:
        pipe = self._redis.pipeline(transaction=False)
        for nonce, _ in ended:
            pipe.set(f"{self._prefix}ended:{nonce.hex()}", b"1", ex=self._max_age)
            pipe.delete(f"{self._prefix}seen:{nonce.hex()}")
        pipe.publish(CHANNEL, self._seal(msg))
        await pipe.execute()

    async def _post(self, url: str, msg: dict[str, Any]) -> httpx2.Response:
        assert self._http is not None
        return await self._http.post(url, content=self._seal(msg))

    async def tell(self, event: dict[str, Any]) -> None:
        """A notification-channel event for every other process: sibling workers, and replicas via the store."""
        await self._broadcast({"op": "notify", "from": self._origin, "event": event}, "a notification event")

    async def announce_cancel(self, owner: str, request_id: Any, params: dict[str, Any]) -> None:
        """A cancel whose request this process does not hold: the process that routed it (a sibling worker, or a
        replica through the store) cancels it; the others find nothing and drop it."""
        await self._broadcast({"op": "cancel", "from": self._origin, "owner": owner, "id": request_id,
                               "params": params}, "of a cancel")

    def _cancelled(self, msg: dict[str, Any]) -> None:
        params = msg.get("params")
        if self.on_cancel is not None and msg.get("from") != self._origin and isinstance(params, dict):
            self.on_cancel(str(msg.get("owner", "")), msg.get("id"), params)

    def _notified(self, msg: dict[str, Any]) -> None:
        event = msg.get("event")
        if self.on_notify is not None and msg.get("from") != self._origin and isinstance(event, dict):
            self.on_notify(event)

    # ---- asking ---------------------------------------------------------------------------------------------
    async def ended(self, nonce: bytes) -> bool:
        """Whether the store says this session ended (always False without a store)."""
        if self._redis is None:
            return False
        return bool(await self._redis.exists(f"{self._prefix}ended:{nonce.hex()}"))

    async def touch(self, nonce: bytes) -> None:
        """Mark the session seen in the store, at most once per tenth of the idle timeout per process."""
        if self._redis is None:
            return
        now = time.monotonic()
        if now - self._touched.get(nonce, -1e18) < self._idle / 10:
            return
        self._touched[nonce] = now
        if len(self._touched) > 100_000:
            self._touched.clear()
        await self._redis.set(f"{self._prefix}seen:{nonce.hex()}", b"1", px=max(1, int(self._idle * 1000)))

    async def seen_elsewhere(self, nonces: list[bytes]) -> set[bytes]:
        """Those of these sessions another process (sibling or replica) saw within the idle timeout."""
        if not nonces:
            return set()
        seen: set[bytes] = set()
        if self._redis is not None:
            for nonce in nonces:
                self._touched.pop(nonce, None)
            found = await self._redis.mget([f"{self._prefix}seen:{n.hex()}" for n in nonces])
            seen.update(n for n, v in zip(nonces, found, strict=True) if v is not None)
        if self.siblings:
            asks = [{"op": "seen", "sessions": [n.hex() for n in nonces[i:i + BATCH]]}
                    for i in range(0, len(nonces), BATCH)]
            answers = await asyncio.gather(*(self._post(url, msg) for url in self.siblings for msg in asks),
                                           return_exceptions=True)
            for answer in answers:
                if isinstance(answer, httpx2.Response) and answer.status_code == 200:
                    with contextlib.suppress(ValueError, orjson.JSONDecodeError):
                        seen.update(bytes.fromhex(h) for h in orjson.loads(answer.content))
        return seen

    # ---- serving ------------------------------------------------------------------------------------------
    def handle(self, body: bytes, end_here: EndHere, seen_here: SeenHere,
               lost_here: LostHere | None = None, claim_here: ClaimHere | None = None) -> tuple[int, bytes]:
        """A sibling's sealed message: end sessions here, or say which of some sessions this process saw."""
        msg = self.open(body)
        if msg is None:
            return 403, b"forbidden\n"
        try:
            if msg.get("op") == "end":
                end_here([(bytes.fromhex(h), int(t)) for h, t in msg.get("sessions", [])], str(msg.get("reason")))
                return 200, b"[]"
            if msg.get("op") == "notify":
                self._notified(msg)
                return 200, b"[]"
            if msg.get("op") == "cancel":
                self._cancelled(msg)
                return 200, b"[]"
            if msg.get("op") == "seen":
                nonces = [bytes.fromhex(h) for h in msg.get("sessions", [])]
                return 200, orjson.dumps([n.hex() for n in seen_here(nonces)])
            if msg.get("op") == "lost" and lost_here is not None:
                lost_here(str(msg["server"]), str(msg["owner"]), str(msg.get("subject", "")))
                return 200, b"[]"
            if msg.get("op") == "claim" and claim_here is not None:
                return 200, orjson.dumps(claim_here(str(msg["key"]), str(msg["caller"])))
        except (TypeError, ValueError):
            pass
        return 400, b"bad request\n"

    async def listen(self, end_here: EndHere, lost_here: LostHere | None = None) -> None:
        """Follow the store's channel of ended sessions (a replica's DELETE or expiry) for as long as we run."""
        if self._redis is None:
            return
        delay = 0.5
        while True:
            pubsub = self._redis.pubsub()
            try:
                await pubsub.subscribe(CHANNEL)
                delay = 0.5
                async for item in pubsub.listen():
                    if item.get("type") != "message":
                        continue
                    msg = self.open(item["data"])
                    if msg is not None and msg.get("op") == "notify":
                        self._notified(msg)
                    elif msg is not None and msg.get("op") == "cancel":
                        self._cancelled(msg)
                    elif msg is not None and msg.get("op") == "end":
                        end_here([(bytes.fromhex(h), int(t)) for h, t in msg["sessions"]], str(msg.get("reason")))
                    elif msg is not None and msg.get("op") == "lost" and lost_here is not None:
                        lost_here(str(msg["server"]), str(msg["owner"]), str(msg.get("subject", "")))
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("the store's channel of ended sessions failed (%s); subscribing again", exc)
            finally:
                with contextlib.suppress(Exception):
                    await pubsub.aclose()
            await asyncio.sleep(delay)
            delay = min(delay * 2, 10.0)

    async def aclose(self) -> None:
        if self._http is not None:
            await self._http.aclose()
        if self._redis is not None:
            with contextlib.suppress(Exception):
                await self._redis.aclose()
