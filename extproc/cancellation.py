"""A client's notifications/cancelled, carried to the upstream request it names.

Only a handshake-era client sends it over HTTP (a 2026-07-28 client cancels by closing its stream, which Envoy
turns into a reset of the upstream request by itself). The gateway keeps, per process and bounded, which
upstream each in-flight routed request of a handshake-era client went to, under that client's id (a cancel that
reaches another process is passed on to the others, extproc/peers.py, and the one holding the request acts):

- a handshake-era upstream gets `notifications/cancelled` on the client's upstream session, naming the id the
  upstream saw (the gateway's own id where it renumbered the request);
- a 2026-07-28 upstream has no such notification over HTTP (closing the stream is the cancel): the processor
  ends the original request with an ImmediateResponse on that request's still open ext_proc stream, and Envoy
  resets the upstream request (measured on Envoy 1.40: the upstream sees the disconnect).

A 2026-07-28 client on a handshake-era upstream (one upstream session per caller, ids renumbered) cancels by
closing its stream too, which that upstream does not read as a cancel: when the request's ext_proc stream ends
before its answer was seen complete, the upstream gets `notifications/cancelled` with the gateway's id. (Every
such answer passes an answer filter, which marks it complete; one whose answer filter ran on another worker
looks unanswered here and gets a cancel for a finished request, which the spec tells the upstream to ignore.)

What arrives here does not depend on how many ext_proc messages a request took: a request is tracked when its
route is decided, and forgotten when its ext_proc stream ends.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from cachetools import LRUCache

from extproc import jsonrpc

log = logging.getLogger(__name__)

MAX_TRACKED = 20_000
ANSWER_GRACE_S = 0.25  # how long after a request stream ends its answer may still be marked complete
CANCELLED = -32800  # JSON-RPC's "request cancelled" (LSP), outside the range MCP reserves


@dataclass(frozen=True)
class InFlight:
    """One routed request of a handshake-era client: where it went, under which id, and how to end its stream."""

    server: str
    upstream_id: Any
    upstream_era: str
    session_owner: str  # the upstream session's owner (handshake-era upstreams), else ""
    subject: str
    close_stream: Callable[[], Awaitable[None]]


def key(owner: str, request_id: Any) -> tuple[str, str, Any]:
    """Ids are compared as JSON-RPC compares them: 1 and "1" are different requests."""
    return owner, type(request_id).__name__, request_id


class Tracker:
    """owner (a gateway session) + the client's request id -> InFlight, bounded (oldest forgotten first)."""

    def __init__(self, maxsize: int = MAX_TRACKED) -> None:
        self._live: LRUCache[tuple[str, str, Any], InFlight] = LRUCache(maxsize=maxsize)

    def add(self, owner: str, request_id: Any, entry: InFlight) -> tuple[str, str, Any]:
        k = key(owner, request_id)
        self._live[k] = entry
        return k

    def done(self, k: tuple[str, str, Any], entry: InFlight) -> None:
        """The request's stream ended: forget it (unless a newer request of the same id took its place)."""
        if self._live.get(k) is entry:
            del self._live[k]

    def take(self, owner: str, request_id: Any) -> InFlight | None:
        return self._live.pop(key(owner, request_id), None)

    def __len__(self) -> int:
        return len(self._live)


class Answers:
    """Answers seen complete, by (server, upstream session owner, upstream id); bounded, each read once."""

    def __init__(self, maxsize: int = MAX_TRACKED) -> None:
        self._seen: LRUCache[tuple[str, str, Any], bool] = LRUCache(maxsize=maxsize)

    def seen(self, server: str, owner: str, upstream_id: Any) -> None:
        self._seen[(server, owner, upstream_id)] = True

    def was_seen(self, server: str, owner: str, upstream_id: Any) -> bool:
        return self._seen.pop((server, owner, upstream_id), False)


def cancelled_id(params: dict[str, Any]) -> Any:
    """The request a notifications/cancelled names (None: it names none we could route)."""
    request_id = params.get("requestId")
    return request_id if isinstance(request_id, (str, int)) and not isinstance(request_id, bool) else None


def upstream_params(params: dict[str, Any], upstream_id: Any) -> dict[str, Any]:
    """The notification's params for the upstream: its own id for the request, the reason kept."""
    out: dict[str, Any] = {"requestId": upstream_id}
    if isinstance(params.get("reason"), str):
        out["reason"] = params["reason"]
    return out


def cancelled_body(client_id: Any) -> bytes:
    """What the cancelled request's own HTTP answer carries (the client has stopped waiting for it)."""
    return jsonrpc.error_body(client_id, CANCELLED, "Request cancelled by the client")
