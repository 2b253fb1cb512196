"""What the gateway itself recorded (core_events): upstreams up/down, catalog reloads, refused manifests, logins.

Bounded: the newest `limit` events. Shared through Redis when the gateway has a `store` (every replica and
worker writes to and reads one list), else kept in this process. Reading filters per caller: only events about
servers it can see, and an event naming a user's subject only for that user (and then without the subject).
"""

from __future__ import annotations

import collections
import logging
import time
from collections.abc import Iterable
from typing import Any

import orjson

log = logging.getLogger(__name__)

MAX_EVENTS = 1000
_KEY = "muster-edge:events"


class Events:
    def __init__(self, redis_url: str = "", limit: int = MAX_EVENTS) -> None:
        self._limit = limit
        self._local: collections.deque[dict[str, Any]] = collections.deque(maxlen=limit)
        self._redis: Any = None
        if redis_url:
            import redis.asyncio as redis

            self._redis = redis.from_url(redis_url)
        self._pending: set[Any] = set()

    def record(self, resource_type: str, resource_name: str, reason: str, message: str, *,
               event_type: str = "Normal", subject: str = "") -> None:
        """Record one event (never blocks: the shared write runs in the background)."""
        event = {"timestamp": time.time(), "type": event_type, "reason": reason, "resourceType": resource_type,
                 "resourceName": resource_name, "message": message, "subject": subject}
        self._local.append(event)
        if self._redis is not None:
            import asyncio

            try:
                task = asyncio.get_running_loop().create_task(self._push(event))
            except RuntimeError:
                return
            self._pending.add(task)
            task.add_done_callback(self._pending.discard)

    async def _push(self, event: dict[str, Any]) -> None:
        try:
            pipe = self._redis.pipeline()
            pipe.lpush(_KEY, orjson.dumps(event))
            pipe.ltrim(_KEY, 0, self._limit - 1)
            await pipe.execute()
        except Exception as exc:  # a store outage must not break the hot path; reads fall back to local
            log.warning("recording an event in the store failed: %s", type(exc).__name__)

    async def _all(self) -> list[dict[str, Any]]:
        if self._redis is not None:
            try:
                raw = await self._redis.lrange(_KEY, 0, self._limit - 1)
                return [orjson.loads(r) for r in reversed(raw)]
            except Exception as exc:
                log.warning("reading events from the store failed: %s", type(exc).__name__)
        return list(self._local)

    async def read(self, *, subject: str, servers: Iterable[str], resource_type: Any = None,
                   resource_name: Any = None, event_type: Any = None, since: float | None = None,
                   until: float | None = None, limit: int = 50) -> list[dict[str, Any]]:
        """The newest `limit` events this caller may see, oldest first, timestamps as RFC 3339."""
        visible = set(servers)
        out = []
        for event in await self._all():
            if event.get("resourceType") == "MCPServer" and event.get("resourceName") not in visible:
                continue
            if event.get("subject") and event.get("subject") != subject:
                continue
            if resource_type and event.get("resourceType") != resource_type:
                continue
            if resource_name and event.get("resourceName") != resource_name:
                continue
            if event_type and event.get("type") != event_type:
                continue
            ts = float(event.get("timestamp", 0))
            if (since is not None and ts < since) or (until is not None and ts > until):
                continue
            shown = {k: v for k, v in event.items() if k != "subject"}
            shown["timestamp"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))
            out.append(shown)
        return out[-limit:]
