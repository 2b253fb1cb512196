"""Whose view changed: the pure half of the notification channel (no sockets, no gRPC).

A listening client is told `notifications/{tools,prompts,resources}/list_changed` when what *it* would list
changed. The processor keeps, per open stream, a digest of each list the caller last could see; after any event
(an upstream's own list_changed, a server added, removed, down or up, a catalog edit, a login or logout) it
recomputes the digests of the callers it holds and tells only those whose digest moved. An upstream's own
list_changed is also passed on when the list it re-sent reads the same, to every caller who sees something of
that upstream in that list (list_changed is a level trigger; the upstream may know better than its list shows),
and never to a caller who sees nothing of it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson

KINDS = ("tools", "prompts", "resources")
LIST_CHANGED = {kind: f"notifications/{kind}/list_changed" for kind in KINDS}
# the 2026-07-28 SubscriptionFilter field for each kind
FILTER_FIELDS = {"tools": "toolsListChanged", "prompts": "promptsListChanged", "resources": "resourcesListChanged"}
SUBSCRIPTION_ID = "io.modelcontextprotocol/subscriptionId"
# which upstream list method a list_changed of each kind refreshes (resources covers its templates too)
KIND_OF_METHOD = {"notifications/tools/list_changed": "tools", "notifications/prompts/list_changed": "prompts",
                  "notifications/resources/list_changed": "resources"}


def digest(items: Iterable[Any]) -> bytes:
    """A short fingerprint of a list as a client would read it (order matters: lists are ordered)."""
    h = hashlib.blake2b(digest_size=12)
    for item in items:
        h.update(orjson.dumps(item, option=orjson.OPT_SORT_KEYS))
        h.update(b"\x00")
    return h.digest()


@dataclass
class Watch:
    """What one open stream asked for and what its caller could see when it was last told (or opened)."""

    kinds: frozenset[str]
    uris: set[str] = field(default_factory=set)  # exposed URIs it subscribed to (resources/updated)
    digests: dict[str, bytes] = field(default_factory=dict)


def changed_kinds(watch: Watch, now: Mapping[str, bytes], announced: Mapping[str, Sequence[str]],
                  sees: Mapping[str, frozenset[str]]) -> list[str]:
    """The kinds to tell this stream about, and (side effect) its digests brought up to date.

    `now`: the caller's digests per kind now. `announced`: kind -> upstream servers that sent their own
    list_changed for it. `sees`: kind -> the servers that contribute to that list of this caller.
    """
    out = []
    for kind in KINDS:
        if kind not in now:
            continue
        before = watch.digests.get(kind)
        watch.digests[kind] = now[kind]
        if kind not in watch.kinds:
            continue
        moved = before is not None and before != now[kind]
        if moved or any(server in sees.get(kind, frozenset()) for server in announced.get(kind, ())):
            out.append(kind)
    return out


def uri_matches(subscribed: Iterable[str], uri: str) -> bool:
    """A resources/updated for `uri` reaches a stream subscribed to it, or to a resource it is a part of."""
    return any(uri == sub or uri.startswith(sub if sub.endswith("/") else sub + "/") for sub in subscribed)


def listen_filter(raw: Any) -> tuple[frozenset[str], list[str]] | None:
    """(kinds, resource URIs) of a 2026-07-28 SubscriptionFilter, or None when it is not one."""
    if not isinstance(raw, dict):
        return None
    kinds = frozenset(kind for kind, name in FILTER_FIELDS.items() if raw.get(name) is True)
    uris = raw.get("resourceSubscriptions") or []
    if not isinstance(uris, list) or not all(isinstance(u, str) and u for u in uris):
        return None
    return kinds, list(dict.fromkeys(uris))


def honored_filter(kinds: Iterable[str], uris: Sequence[str]) -> dict[str, Any]:
    """The acknowledged subset, in the wire's shape (false flags and an empty URI list are left out)."""
    out: dict[str, Any] = {FILTER_FIELDS[k]: True for k in KINDS if k in set(kinds)}
    if uris:
        out["resourceSubscriptions"] = list(uris)
    return out
