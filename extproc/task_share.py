"""Which tasks a caller started, known to every worker and replica, so tasks/list answers the same wherever it
lands. The sealed ids themselves need nothing shared (any process with the key routes them); only the per-caller
list does. With a `store`: one Redis hash per caller (keyed by a digest of the caller, fields
`server<US>upstream id`, values the sealed ids, expiring with the ids). Without one: the worker that created a
task tells its sibling workers (a message sealed with the gateway's key, awaited before the client hears of the
task); replicas without a store do not know each other's tasks. Every read opens each sealed id again for the
caller, so a corrupt or foreign entry is never listed.
"""

from __future__ import annotations

import hashlib
import logging
from typing import TYPE_CHECKING, Any

from extproc.task_ids import MAX_AGE_S, TaskRef

if TYPE_CHECKING:
    from extproc.gateway import Gateway

log = logging.getLogger(__name__)

_KEY = "muster-edge:tasks:"
_SEP = "\x1f"
MAX_SHARED_PER_CALLER = 2_000
OP = "task"


def _key(caller: str) -> str:
    return _KEY + hashlib.sha256(caller.encode()).hexdigest()[:32]


def _store(gw: Gateway) -> Any:
    return gw.peers.store if gw.peers is not None else None


async def remember(gw: Gateway, ref: TaskRef, sealed: str) -> None:
    """A task this caller just started: in this process's index, and shared before the client hears of it."""
    gw.task_index.add(ref, sealed)
    peers = gw.peers
    if peers is None:
        return
    store = peers.store
    try:
        if store is not None:
            key = _key(ref.caller)
            if int(await store.hlen(key)) < MAX_SHARED_PER_CALLER:
                pipe = store.pipeline(transaction=False)
                pipe.hset(key, ref.server + _SEP + ref.upstream_id, sealed)
                pipe.expire(key, MAX_AGE_S)
                await pipe.execute()
        elif peers.siblings:
            await peers.tell_siblings({"op": OP, "caller": ref.caller, "id": sealed})
    except Exception as exc:  # the task exists upstream either way; only other processes' lists miss it
        log.warning("sharing a task id failed: %s", type(exc).__name__)


def on_peer_message(gw: Gateway, msg: dict[str, Any]) -> bool:
    """A sibling's task: into this process's index (if the id opens for the caller it names). True if handled."""
    if msg.get("op") != OP:
        return False
    caller, sealed = msg.get("caller"), msg.get("id")
    ref = gw.task_ids.open(sealed, caller) if isinstance(caller, str) else None
    if ref is not None and isinstance(sealed, str):
        gw.task_index.add(ref, sealed)
    return True


async def tasks_of(gw: Gateway, caller: str) -> dict[tuple[str, str], str]:
    """(server, upstream id) -> sealed id for every task this caller started that this process can know of."""
    mine = gw.task_index.of(caller)
    store = _store(gw)
    if store is None:
        return mine
    try:
        shared = await store.hgetall(_key(caller))
    except Exception as exc:
        log.warning("reading shared task ids failed: %s", type(exc).__name__)
        return mine
    for value in shared.values():
        sealed = value.decode() if isinstance(value, bytes) else str(value)
        ref = gw.task_ids.open(sealed, caller)
        if ref is not None:
            mine[(ref.server, ref.upstream_id)] = sealed
    return mine


async def forget(gw: Gateway, caller: str, server: str, upstream_id: str) -> None:
    """A task gone upstream (its TTL ran out)."""
    gw.task_index.drop(caller, server, upstream_id)
    store = _store(gw)
    if store is not None:
        try:
            await store.hdel(_key(caller), server + _SEP + upstream_id)
        except Exception as exc:
            log.warning("forgetting a shared task id failed: %s", type(exc).__name__)
