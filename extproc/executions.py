"""Workflow execution records: bounded, private to the caller who ran them, shared through the `store`.

A record holds what the steps answered with the caller's credentials, so it is only ever shown to that caller
(records are keyed by a hash of the subject, never the subject itself) and, in Redis, sealed with the gateway
key. Retention follows Muster: the newest N records (default 10,000), none older than the retention (21 days),
and a record larger than the limit (256 KB) is kept without its step results, marked `truncated: true`.
"""

from __future__ import annotations

import hashlib
import time
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

import orjson

from catalog.config import WorkflowSettings
from extproc.sessions import Sealer

_AAD = b"muster-edge/workflow-execution/v1"


def owner_key(subject: str) -> str:
    return hashlib.sha256(b"muster-edge/execution-owner\0" + subject.encode()).hexdigest()[:32]


def bounded(record: dict[str, Any], limit: int) -> bytes:
    """The record as JSON, within `limit` bytes: step inputs and results, then the result, are dropped first."""
    raw = orjson.dumps(record)
    if len(raw) <= limit:
        return raw
    slim = dict(record, truncated=True)
    slim["steps"] = [{k: v for k, v in s.items() if k not in ("result", "input")} for s in record.get("steps", [])]
    raw = orjson.dumps(slim)
    if len(raw) <= limit:
        return raw
    slim.pop("result", None)
    slim["input"] = {}
    slim["steps"] = slim["steps"][:100]
    raw = orjson.dumps(slim)
    if len(raw) <= limit:
        return raw
    keep = ("id", "workflow_name", "status", "started_at", "completed_at", "duration_ms", "error")
    return orjson.dumps({k: str(record.get(k, ""))[:512] for k in keep} | {"truncated": True, "steps": []})


class Executions:
    """Newest-first execution records; in memory, or in Redis when the gateway has a `store`."""

    def __init__(self, settings: WorkflowSettings, sealer: Sealer, redis_url: str = "",
                 prefix: str = "muster-edge:wfexec:") -> None:
        self.settings = settings
        self._sealer = sealer
        self._prefix = prefix
        self._memory: OrderedDict[str, tuple[float, str, bytes]] = OrderedDict()
        self._redis: Any = None
        if redis_url:
            import redis.asyncio as redis

            self._redis = redis.from_url(redis_url)

    @property
    def retention_s(self) -> float:
        return self.settings.retention_days * 86_400.0

    async def put(self, subject: str, record: dict[str, Any]) -> None:
        raw = bounded(record, self.settings.max_record_bytes)
        owner = owner_key(subject)
        now = time.time()
        exec_id = str(record["id"])
        if self._redis is None:
            self._memory[exec_id] = (now, owner, raw)
            self._memory.move_to_end(exec_id)
            self._prune(now)
            return
        sealed = self._sealer.seal(owner.encode() + b"\n" + raw, _AAD)
        index = self._prefix + "index"
        async with self._redis.pipeline(transaction=False) as pipe:
            pipe.set(self._prefix + exec_id, sealed, px=int(self.retention_s * 1000))
            pipe.zadd(index, {exec_id: now})
            pipe.zadd(f"{index}:{owner}", {exec_id: now})
            pipe.zremrangebyscore(f"{index}:{owner}", "-inf", now - self.retention_s)
            pipe.zremrangebyrank(f"{index}:{owner}", 0, -(self.settings.max_executions + 1))
            pipe.expire(f"{index}:{owner}", int(self.retention_s))
            pipe.zremrangebyscore(index, "-inf", now - self.retention_s)
            pipe.zrange(index, 0, -(self.settings.max_executions + 1))
            results = await pipe.execute()
        stale = [m.decode() if isinstance(m, bytes) else str(m) for m in results[-1]]
        if stale:
            async with self._redis.pipeline(transaction=False) as pipe:
                pipe.zrem(index, *stale)
                pipe.delete(*(self._prefix + s for s in stale))
                await pipe.execute()

    def _prune(self, now: float) -> None:
        while len(self._memory) > self.settings.max_executions:
            self._memory.popitem(last=False)
        while self._memory:
            first = next(iter(self._memory.values()))
            if now - first[0] <= self.retention_s:
                break
            self._memory.popitem(last=False)

    def _open(self, sealed: Any) -> tuple[str, dict[str, Any]] | None:
        text = sealed.decode() if isinstance(sealed, bytes) else str(sealed)
        plain = self._sealer.open(text, _AAD, max_len=1 << 26)
        if plain is None:
            return None
        owner, _, raw = plain.partition(b"\n")
        return owner.decode(), orjson.loads(raw)

    async def get(self, subject: str, exec_id: str) -> dict[str, Any] | None:
        owner = owner_key(subject)
        if self._redis is None:
            self._prune(time.time())
            entry = self._memory.get(exec_id)
            if entry is None or entry[1] != owner:
                return None
            rec: dict[str, Any] = orjson.loads(entry[2])
            return rec
        if not exec_id or len(exec_id) > 100:
            return None
        found = self._open(await self._redis.get(self._prefix + exec_id) or b"")
        if found is None or found[0] != owner:
            return None
        return found[1]

    async def list(self, subject: str, *, workflow: str = "", status: str = "", limit: int = 50,
                   offset: int = 0) -> tuple[list[dict[str, Any]], int]:
        """(the page, newest first, and how many matched) of this caller's records."""
        owner = owner_key(subject)
        records: list[dict[str, Any]] = []
        if self._redis is None:
            self._prune(time.time())
            for _, (_, own, raw) in reversed(self._memory.items()):
                if own == owner:
                    records.append(orjson.loads(raw))
        else:
            ids = await self._redis.zrevrange(f"{self._prefix}index:{owner}", 0, self.settings.max_executions - 1)
            for start in range(0, len(ids), 500):
                chunk = ids[start:start + 500]
                keys = [self._prefix + (i.decode() if isinstance(i, bytes) else str(i)) for i in chunk]
                for sealed in await self._redis.mget(keys):
                    found = self._open(sealed) if sealed else None
                    if found is not None and found[0] == owner:
                        records.append(found[1])
        matched = [r for r in records if (not workflow or r.get("workflow_name") == workflow)
                   and (not status or r.get("status") == status)]
        return matched[offset:offset + limit], len(matched)

    async def aclose(self) -> None:
        if self._redis is not None:
            await self._redis.aclose()


def summary(record: Mapping[str, Any]) -> dict[str, Any]:
    """A record as core_workflow_execution_list shows it (no step results)."""
    keep = ("id", "workflow_name", "status", "started_at", "completed_at", "duration_ms", "error", "truncated")
    return {k: record[k] for k in keep if k in record}
