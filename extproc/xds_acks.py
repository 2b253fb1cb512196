"""Which Envoys are connected to the gateway's xDS servers, and which catalog servers each has acknowledged.

The worker that holds an Envoy's ADS stream writes one record per Envoy node (refreshed while the stream lives,
gone when it ends or its writer dies); every processor reads them all before it lists a new server, so a server
is listed only once every connected Envoy (of every worker and every replica) has ACKed its cluster. Records live
in Redis/Valkey when the gateway has a shared store (replicas), else in files under the state folder (the workers
of one replica). They hold node ids and cluster digests: nothing secret.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

from catalog.manifests import MCPServer
from extproc.xds_resources import server_digest

NODE_TTL_S = 15.0  # a record not refreshed for this long is a dead writer's: ignored
HEARTBEAT_S = 5.0
ACK_WAIT_S = 5.0  # a new server waits this long for the ACKs, then shows why it is not listed (and is retried)
_POLL_S = 0.1


@dataclass
class NodeRecord:
    node: str
    worker: str  # the process holding the node's stream
    servers: dict[str, str] = field(default_factory=dict)  # acknowledged: server name -> server digest
    version: str = ""  # the acknowledged cluster version
    nack: str = ""  # the last rejection of a newer version, if it is still the latest sent
    seen: float = 0.0  # wall clock of the writer's last refresh

    def live(self, now: float) -> bool:
        return now - self.seen < NODE_TTL_S

    @classmethod
    def parse(cls, raw: bytes | str) -> NodeRecord | None:
        try:
            doc = json.loads(raw)
            return cls(node=str(doc["node"]), worker=str(doc["worker"]), servers=dict(doc.get("servers") or {}),
                       version=str(doc.get("version", "")), nack=str(doc.get("nack", "")),
                       seen=float(doc.get("seen", 0.0)))
        except (ValueError, KeyError, TypeError):
            return None

    def dump(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"))


class AckRegistry(Protocol):
    async def put(self, record: NodeRecord) -> None: ...

    async def drop(self, node: str, worker: str) -> None: ...

    async def nodes(self) -> list[NodeRecord]: ...


class FileAcks:
    """One JSON file per node in a folder of the state directory (the workers of one replica share it)."""

    def __init__(self, folder: str) -> None:
        self.folder = folder

    def _path(self, node: str) -> str:
        return os.path.join(self.folder, re.sub(r"[^A-Za-z0-9_.-]", "_", node) + ".json")

    def _put(self, record: NodeRecord) -> None:
        os.makedirs(self.folder, exist_ok=True)
        tmp = self._path(record.node) + f".{os.getpid()}.tmp"
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(record.dump())
        os.replace(tmp, self._path(record.node))

    def _drop(self, node: str, worker: str) -> None:
        path = self._path(node)
        with contextlib.suppress(OSError), open(path, encoding="utf-8") as fh:
            rec = NodeRecord.parse(fh.read())
        if rec is not None and rec.worker == worker:  # not if another worker took the node over meanwhile
            with contextlib.suppress(OSError):
                os.unlink(path)

    def _nodes(self) -> list[NodeRecord]:
        out = []
        now = time.time()
        with contextlib.suppress(OSError):
            for name in sorted(os.listdir(self.folder)):
                if not name.endswith(".json"):
                    continue
                with contextlib.suppress(OSError), open(os.path.join(self.folder, name), encoding="utf-8") as fh:
                    rec = NodeRecord.parse(fh.read())
                    if rec is not None and rec.live(now):
                        out.append(rec)
        return out

    async def put(self, record: NodeRecord) -> None:
        await asyncio.to_thread(self._put, record)

    async def drop(self, node: str, worker: str) -> None:
        await asyncio.to_thread(self._drop, node, worker)

    async def nodes(self) -> list[NodeRecord]:
        return await asyncio.to_thread(self._nodes)


class RedisAcks:
    """One key per node with a TTL (replicas share it): a writer that dies leaves nothing behind for long."""

    def __init__(self, url: str, prefix: str = "muster-edge:xds:node:") -> None:
        import redis.asyncio as redis

        self._redis: Any = redis.from_url(url)
        self._prefix = prefix

    async def put(self, record: NodeRecord) -> None:
        await self._redis.set(self._prefix + record.node, record.dump(), px=int(NODE_TTL_S * 1000))

    async def drop(self, node: str, worker: str) -> None:
        raw = await self._redis.get(self._prefix + node)
        rec = NodeRecord.parse(raw) if raw is not None else None
        if rec is not None and rec.worker == worker:
            await self._redis.delete(self._prefix + node)

    async def nodes(self) -> list[NodeRecord]:
        keys = [k async for k in self._redis.scan_iter(match=self._prefix + "*", count=500)]
        if not keys:
            return []
        now = time.time()
        out = [NodeRecord.parse(raw) for raw in await self._redis.mget(keys) if raw is not None]
        return sorted((r for r in out if r is not None and r.live(now)), key=lambda r: r.node)

    async def aclose(self) -> None:
        await self._redis.aclose()


def behind(records: Sequence[NodeRecord], name: str, digest: str) -> list[NodeRecord]:
    """The connected Envoys that have not acknowledged server `name` as `digest` defines it."""
    return [r for r in records if r.servers.get(name) != digest]


NO_ENVOY = "waiting for an Envoy to connect to the xDS server and acknowledge its cluster"


def why_not_listed(records: Sequence[NodeRecord]) -> str:
    parts = [f"{r.node} ({'rejected it: ' + r.nack if r.nack else 'no ACK yet'})" for r in records]
    return "waiting for every connected Envoy to acknowledge its cluster: " + ", ".join(parts)


class AckGate:
    """What the fleet asks before it lists a server for the first time."""

    def __init__(self, registry: AckRegistry, wait_s: float = ACK_WAIT_S) -> None:
        self.registry = registry
        self.wait_s = wait_s
        self.last: list[NodeRecord] = []  # the latest read, for the status

    async def acked(self, server: MCPServer) -> str | None:
        """None once every connected Envoy (and at least one: with none, nothing routes to it) has acknowledged
        `server`'s clusters; else, after waiting, why not."""
        digest = server_digest(server)
        deadline = time.monotonic() + self.wait_s
        while True:
            self.last = await self.registry.nodes()
            late = behind(self.last, server.name, digest)
            if self.last and not late:
                return None
            if time.monotonic() >= deadline:
                return why_not_listed(late) if late else NO_ENVOY
            await asyncio.sleep(_POLL_S)

    async def refresh(self, every_s: float = 2.0) -> None:
        """Keep `last` current for the status page."""
        while True:
            with contextlib.suppress(Exception):
                self.last = await self.registry.nodes()
            await asyncio.sleep(every_s)

    def status(self) -> list[dict[str, Any]]:
        return [{"node": r.node, "ackedVersion": r.version, "ackedServers": len(r.servers),
                 **({"rejected": r.nack} if r.nack else {})} for r in self.last]
