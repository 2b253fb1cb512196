"""The per-HTTP-request facts every handler reads: headers as Envoy saw them, the caller, the parsed message."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from catalog.policy import Claims
from extproc.jsonrpc import Message

ROUTING_HEADERS = ("mcp-protocol-version", "mcp-method", "mcp-name", "mcp-session-id")
TOOLSET_HEADER = "x-muster-toolset"


@dataclass(frozen=True)
class Caller:
    """Who is calling, as verified by Envoy (jwt_authn); empty subject when the gateway runs without auth.

    `verified` is False when no verified payload came with the request (never a parsed, unverified token)."""

    subject: str = ""
    claims: Claims = field(default_factory=Claims)
    verified: bool = False
    auth_error: str = ""
    expires_at: float = 0.0  # the token's `exp` (0: none): what the caller opens must not outlive it

    @property
    def key(self) -> str:
        return self.subject or "anonymous"


@dataclass
class Request:
    http_method: str = ""
    path: str = ""
    headers: dict[str, str] = field(default_factory=dict)
    duplicated: tuple[str, ...] = ()
    caller: Caller = Caller()
    message: Message | None = None
    session_nonce: bytes = b""
    client_capabilities: dict[str, Any] | None = None
    log_level: str = ""
    view_key: tuple[Any, ...] | None = None

    @classmethod
    def from_headers(cls, pairs: Iterable[tuple[str, str]], caller: Caller) -> Request:
        headers: dict[str, str] = {}
        dup: list[str] = []
        for key, value in pairs:
            if key in headers:
                if key in ROUTING_HEADERS or key.startswith("mcp-param-"):
                    dup.append(key)
                continue
            headers[key] = value
        return cls(headers.get(":method", ""), headers.get(":path", ""), headers, tuple(dup), caller)

    @property
    def bearer(self) -> str:
        """The caller's bearer as Envoy passed it on (verified there); only for exchange or forwarding."""
        scheme, _, token = self.headers.get("authorization", "").partition(" ")
        return token.strip() if scheme.lower() == "bearer" else ""

    @property
    def toolset(self) -> str:
        return self.headers.get(TOOLSET_HEADER, "").strip().lower()

    @property
    def param_headers(self) -> dict[str, str]:
        return {k: v for k, v in self.headers.items() if k.startswith("mcp-param-")}
