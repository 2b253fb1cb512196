"""Task ids as clients see them: the upstream's id sealed with where it lives and whose it is.

An upstream's task ids collide across upstreams, carry no routing key, and are bound (if at all) to the
gateway's own credential. So the gateway hands a client an AEAD-sealed id holding the server, the upstream's
task id, the protocol the task speaks upstream, and the caller it belongs to. Any worker or replica with the
sealing key routes it with no shared state; another caller's replay does not open. `TaskIndex` remembers which
tasks a caller started (bounded), which `tasks/list` needs because upstreams cannot tell gateway callers apart.
Pure: no gRPC, no I/O.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import orjson

from catalog.task_support import EXTENSION_TASKS, LEGACY_TASKS, task_support, upstream_task_kind
from extproc.sessions import Sealer

__all__ = ["EXTENSION_TASKS", "LEGACY_TASKS", "TaskIds", "TaskIndex", "TaskRef", "modern_task", "task_support",
           "ttl_seconds", "upstream_task_kind"]

_AAD = b"muster-edge/task/v1"
_MAX_TOKEN = 1024
MAX_AGE_S = 7 * 86_400  # beyond any task TTL an upstream keeps

@dataclass(frozen=True)
class TaskRef:
    """Where one task lives and whose it is."""

    server: str
    upstream_id: str
    kind: str  # LEGACY_TASKS | EXTENSION_TASKS
    caller: str
    issued_at: int = 0


class TaskIds:
    """Seal and open client-facing task ids (one AEAD call each, the gateway's static key)."""

    def __init__(self, sealer: Sealer) -> None:
        self._sealer = sealer

    def seal(self, ref: TaskRef) -> str:
        issued = ref.issued_at or int(time.time())
        payload = orjson.dumps([1, ref.server, ref.upstream_id, ref.kind, ref.caller, issued])
        return self._sealer.seal(payload, _AAD)

    def open(self, token: Any, caller: str) -> TaskRef | None:
        """The task, if the id is ours, unexpired, and `caller`'s; None for anything else (all look unknown)."""
        if not isinstance(token, str):
            return None
        payload = self._sealer.open(token, _AAD, max_len=_MAX_TOKEN)
        if payload is None:
            return None
        try:
            version, server, upstream_id, kind, owner, issued_at = orjson.loads(payload)
        except (orjson.JSONDecodeError, TypeError, ValueError):
            return None
        if version != 1 or owner != caller or time.time() - issued_at > MAX_AGE_S:
            return None
        return TaskRef(server, upstream_id, kind, owner, issued_at)


class TaskIndex:
    """The tasks each caller started through this process: caller -> {(server, upstream id): sealed id}, bounded
    both ways (least recently used callers and oldest tasks fall out first)."""

    def __init__(self, max_callers: int = 10_000, per_caller: int = 500) -> None:
        self._max_callers = max_callers
        self._per_caller = per_caller
        self._by_caller: OrderedDict[str, OrderedDict[tuple[str, str], str]] = OrderedDict()

    def add(self, ref: TaskRef, sealed: str) -> None:
        tasks = self._by_caller.pop(ref.caller, None) or OrderedDict()
        tasks[(ref.server, ref.upstream_id)] = sealed
        while len(tasks) > self._per_caller:
            tasks.popitem(last=False)
        self._by_caller[ref.caller] = tasks
        while len(self._by_caller) > self._max_callers:
            self._by_caller.popitem(last=False)

    def of(self, caller: str) -> dict[tuple[str, str], str]:
        tasks = self._by_caller.get(caller)
        return dict(tasks) if tasks is not None else {}

    def drop(self, caller: str, server: str, upstream_id: str) -> None:
        tasks = self._by_caller.get(caller)
        if tasks is not None:
            tasks.pop((server, upstream_id), None)


def ttl_seconds(ttl_ms: Any) -> int | None:
    return None if not isinstance(ttl_ms, int) or isinstance(ttl_ms, bool) else max(0, ttl_ms // 1000)


def modern_task(task: dict[str, Any], task_id: str) -> dict[str, Any]:
    """A 2025-11-25 Task as the 2026 extension shapes it (for a 2026 client of a 2025-11-25 upstream)."""
    out: dict[str, Any] = {"taskId": task_id, "status": task.get("status", "working"),
                           "createdAt": task.get("createdAt", ""), "lastUpdatedAt": task.get("lastUpdatedAt", ""),
                           "ttlSeconds": ttl_seconds(task.get("ttl"))}
    if isinstance(task.get("statusMessage"), str):
        out["statusMessage"] = task["statusMessage"]
    if isinstance(task.get("pollInterval"), int):
        out["pollIntervalMilliseconds"] = task["pollInterval"]
    return out
