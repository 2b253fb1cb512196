"""Sealed gateway session ids and list cursors, and the store of upstream sessions behind a gateway session.

One AES-256-GCM key, loaded once: sealing is one AEAD call per id, with no per-request key derivation.
What a client carries back is opaque; an upstream's session id is never inside it, in clear or sealed.
"""

from __future__ import annotations

import base64
import binascii
import logging
import os
import re
import secrets
import time
from dataclasses import dataclass, field

from cachetools import TTLCache
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from extproc.gen.muster_edge.v1 import sealed_pb2

log = logging.getLogger(__name__)

_URLSAFE = re.compile(r"[A-Za-z0-9_-]+")
_SESSION_AAD = b"muster-edge/session/v1"
_CURSOR_AAD = b"muster-edge/cursor/v1"


def load_key(file: str = "", env: str = "") -> bytes:
    """The 32-byte sealing key from a file or an environment variable (base64), else a fresh random one."""
    raw = ""
    if file:
        with open(file, encoding="ascii") as fh:
            raw = fh.read().strip()
        if not raw:
            raise ValueError(f"sessionKey: the key file {file} is empty")
    elif env:
        raw = os.environ.get(env, "").strip()
        if not raw:
            raise ValueError(f"sessionKey: environment variable {env} is empty or unset")
    if not raw:
        log.warning("no sessionKey configured: using a random key; sessions will not survive a restart "
                    "and replicas will not accept each other's sessions")
        return secrets.token_bytes(32)
    try:
        key = base64.b64decode(raw, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ValueError("sessionKey: not valid base64") from exc
    if len(key) != 32:
        raise ValueError(f"sessionKey: must decode to 32 bytes, got {len(key)}")
    return key


class Sealer:
    def __init__(self, key: bytes) -> None:
        self._aead = AESGCM(key)

    def seal(self, payload: bytes, aad: bytes) -> str:
        nonce = secrets.token_bytes(12)
        sealed = nonce + self._aead.encrypt(nonce, payload, aad)
        return base64.urlsafe_b64encode(sealed).rstrip(b"=").decode()

    def open(self, token: str, aad: bytes, max_len: int = 4096) -> bytes | None:
        if not token or len(token) > max_len or not _URLSAFE.fullmatch(token):
            return None
        try:
            raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        except (binascii.Error, ValueError):
            return None
        if len(raw) < 28:
            return None
        try:
            return self._aead.decrypt(raw[:12], raw[12:], aad)
        except InvalidTag:
            return None


@dataclass
class SessionRecord:
    """What this process knows of one legacy gateway session: what it set that upstream sessions opened later
    must also be told, its issue time, and when this process last saw it (monotonic seconds)."""

    log_level: str = ""
    issued_at: int = 0
    last_used: float = field(default_factory=time.monotonic)


class _Ended(TTLCache[bytes, int]):
    """Ended sessions (nonce -> issued_at), bounded. What falls out raises a watermark instead of being
    forgotten: a session issued at or before it that this process does not hold is refused."""

    watermark = 0

    def popitem(self) -> tuple[bytes, int]:
        nonce, issued_at = super().popitem()
        self.watermark = max(self.watermark, issued_at)
        return nonce, issued_at


class Sessions:
    """Mints and checks gateway session ids; remembers what each one set (bounded)."""

    def __init__(self, sealer: Sealer, *, max_age_s: int = 86_400, max_sessions: int = 100_000,
                 idle_timeout_s: float = 1800.0) -> None:
        self.sealer = sealer
        self._max_age = max_age_s
        self.max_age_s = max_age_s
        self.idle_timeout_s = idle_timeout_s
        self._records: TTLCache[bytes, SessionRecord] = TTLCache(maxsize=max_sessions, ttl=max_age_s)
        self._ended = _Ended(maxsize=max_sessions, ttl=max_age_s)

    def mint(self, subject: str, version: str, capabilities: bytes = b"{}") -> tuple[str, bytes]:
        token = sealed_pb2.SessionToken(nonce=secrets.token_bytes(16), subject=subject,
                                        issued_at=int(time.time()), protocol_version=version,
                                        capabilities=capabilities)
        self._records[token.nonce] = SessionRecord(issued_at=token.issued_at)
        return self.sealer.seal(token.SerializeToString(), _SESSION_AAD), token.nonce

    def open(self, session_id: str, subject: str) -> sealed_pb2.SessionToken | None:
        """The session, if the id is ours, unexpired, not ended, and bound to this caller."""
        payload = self.sealer.open(session_id, _SESSION_AAD)
        if payload is None:
            return None
        token = sealed_pb2.SessionToken.FromString(payload)
        if token.nonce in self._ended or token.subject != subject:
            return None
        if token.nonce not in self._records and token.issued_at <= self._ended.watermark:
            return None
        if time.time() - token.issued_at > self._max_age:
            return None
        return token

    def record(self, nonce: bytes, issued_at: int = 0) -> SessionRecord:
        """The session's record here, marked as just used (made when this process first sees the session)."""
        rec = self._records.get(nonce)
        if rec is None:
            rec = self._records[nonce] = SessionRecord(issued_at=issued_at)
        rec.last_used = time.monotonic()
        return rec

    def __len__(self) -> int:
        """Live session entries this process holds (what idle expiry gives back)."""
        return len(self._records)

    def holds(self, nonce: bytes) -> bool:
        return nonce in self._records

    def holds_owner(self, owner: str) -> bool:
        """Whether an upstream-session owner (a nonce in hex) is a session this process still holds."""
        try:
            return bytes.fromhex(owner) in self._records
        except ValueError:
            return False

    def seen_within(self, nonce: bytes, seconds: float) -> bool:
        rec = self._records.get(nonce)
        return rec is not None and time.monotonic() - rec.last_used < seconds

    def idle(self) -> list[tuple[bytes, SessionRecord]]:
        """Sessions this process has not seen for the idle timeout (candidates to expire)."""
        cutoff = time.monotonic() - self.idle_timeout_s
        return [(n, r) for n, r in list(self._records.items()) if r.last_used <= cutoff]

    def forget(self, nonce: bytes) -> None:
        """Drop this process's record of a session that lives on elsewhere (memory returned, not ended)."""
        self._records.pop(nonce, None)

    def owner_ended(self, owner: str) -> bool:
        """Whether an upstream-session owner (a nonce in hex) is a session that ended."""
        try:
            return bytes.fromhex(owner) in self._ended
        except ValueError:
            return False

    def is_ended(self, nonce: bytes) -> bool:
        return nonce in self._ended

    def end(self, nonce: bytes, issued_at: int | None = None) -> SessionRecord:
        """End a session; without its issue time, the watermark errs on the side of refusing."""
        self._ended[nonce] = int(time.time()) if issued_at is None else issued_at
        return self._records.pop(nonce, None) or SessionRecord()


class Cursors:
    """Opaque, integrity-protected cursors over a merged list."""

    def __init__(self, sealer: Sealer) -> None:
        self._sealer = sealer

    def make(self, method: str, view: int, offset: int) -> str:
        payload = sealed_pb2.ListCursor(method=method, view=view, offset=offset).SerializeToString()
        return self._sealer.seal(payload, _CURSOR_AAD)

    def read(self, method: str, cursor: str) -> sealed_pb2.ListCursor | None:
        payload = self._sealer.open(cursor, _CURSOR_AAD)
        if payload is None:
            return None
        parsed = sealed_pb2.ListCursor.FromString(payload)
        return parsed if parsed.method == method else None
