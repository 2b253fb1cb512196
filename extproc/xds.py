"""The xDS server: the processor serves the catalog's clusters and route table to every Envoy over gRPC ADS
(state of the world), so Envoys in other pods, and Envoys that start later, converge on the same clusters.

Every processor worker serves it on its gRPC port (Envoy keeps one ADS stream, on the `muster_edge_xds` cluster,
to one worker; if that worker dies it reconnects to another, which serves the same content-hashed versions). Per
stream and per type it tracks what was sent (version, nonce) and what the Envoy acknowledged or rejected, and
publishes the acknowledged servers in the ACK registry (xds_acks) that every worker reads before listing a server.
Bridged (stdio, sse) clusters point at each Envoy's own bridge, named in its node metadata.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import socket
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2

from catalog.config import DEFAULT_BRIDGE_PORT, Address, ConfigError, GatewayConfig
from catalog.manifests import MCPServer
from extproc.envoy_config import NODE_BRIDGE_KEY
from extproc.xds_acks import HEARTBEAT_S, AckGate, AckRegistry, FileAcks, NodeRecord, RedisAcks
from extproc.xds_resources import CLUSTER_TYPE, ROUTE_TYPE, Snapshot, render

log = logging.getLogger(__name__)

TYPES = (CLUSTER_TYPE, ROUTE_TYPE)


def registry_for(config: GatewayConfig) -> AckRegistry:
    """Redis/Valkey when the gateway shares state between replicas, else files beside the rendered config."""
    if config.redis_url:
        return RedisAcks(config.redis_url)
    return FileAcks(os.path.join(config.state_dir, "xds-nodes"))


@dataclass
class _TypeState:
    names: frozenset[str] | None = None  # None: every resource (CDS wildcard)
    sent: Snapshot | None = None
    nonce: str = ""
    acked: Snapshot | None = None
    nack: str = ""


@dataclass(eq=False)
class _Stream:
    peer: str
    bridge: Address  # until the node's metadata names its own
    node: str = ""
    types: dict[str, _TypeState] = field(default_factory=dict)
    outbox: asyncio.Queue[discovery_pb2.DiscoveryResponse | None] = field(default_factory=asyncio.Queue)

    def record(self, worker: str) -> NodeRecord:
        cds = self.types.get(CLUSTER_TYPE) or _TypeState()
        acked = cds.acked
        return NodeRecord(node=self.node, worker=worker, servers=dict(acked.servers) if acked else {},
                          version=acked.version if acked else "", nack=cds.nack, seen=time.time())


class XdsServer(ads_pb2_grpc.AggregatedDiscoveryServiceServicer):
    def __init__(self, config: GatewayConfig, registry: AckRegistry) -> None:
        self.config = config
        self.registry = registry
        self.gate = AckGate(registry)
        self.worker = f"{socket.gethostname()}:{os.getpid()}"
        self.servers: tuple[MCPServer, ...] = ()
        self.streams: set[_Stream] = set()
        self.render_error = ""
        self._rendered: dict[Address, dict[str, Snapshot]] = {}
        self._nonces = itertools.count(1)

    # ---- the catalog ---------------------------------------------------------------------------------------
    def set_catalog(self, servers: Sequence[MCPServer]) -> None:
        """A catalog (re)load: every connected Envoy gets what changed for it."""
        self.servers = tuple(sorted(servers, key=lambda s: s.name))
        self._rendered.clear()
        for stream in list(self.streams):
            for type_url in TYPES:
                if type_url in stream.types:
                    self._push(stream, type_url)

    def _snapshots(self, bridge: Address) -> dict[str, Snapshot] | None:
        snaps = self._rendered.get(bridge)
        if snaps is None:
            try:
                snaps = render(self.config, self.servers, bridge)
            except Exception as exc:  # a bad document: the last good resources stay with that Envoy
                if str(exc) != self.render_error:
                    log.error("xds: the catalog's Envoy resources do not render: %s", exc)
                self.render_error = str(exc)
                return None
            self.render_error = ""
            self._rendered[bridge] = snaps
        return snaps

    def _push(self, stream: _Stream, type_url: str, *, force: bool = False) -> None:
        snaps = self._snapshots(stream.bridge)
        ts = stream.types.setdefault(type_url, _TypeState())
        if snaps is None or type_url not in snaps:
            return
        snap = snaps[type_url]
        if not force and ts.sent is not None and ts.sent.version == snap.version:
            return
        names = ts.names
        resources = [res for name, res in snap.resources.items() if names is None or name in names]
        ts.sent, ts.nonce = snap, str(next(self._nonces))
        stream.outbox.put_nowait(discovery_pb2.DiscoveryResponse(
            version_info=snap.version, type_url=type_url, nonce=ts.nonce, resources=resources))

    # ---- one Envoy's stream ----------------------------------------------------------------------------------
    def _on_request(self, stream: _Stream, req: discovery_pb2.DiscoveryRequest) -> bool:
        """Apply one DiscoveryRequest; True when the Envoy's acknowledged state changed (publish it)."""
        if not stream.node and req.node.id:
            stream.node = req.node.id
            meta = req.node.metadata.fields.get(NODE_BRIDGE_KEY)
            if meta is not None and meta.string_value:
                with contextlib.suppress(ConfigError):
                    stream.bridge = Address.parse(meta.string_value, "node metadata")
            log.info("xds: Envoy %s connected (%s)", stream.node, stream.peer)
            if any(s.node == stream.node for s in self.streams if s is not stream):
                log.warning("xds: two Envoys connected as node %r: node ids must be unique (--service-node), or "
                            "their ACKs overwrite each other", stream.node)
        type_url = req.type_url
        if type_url not in TYPES:
            log.debug("xds: %s asked for %s, which the gateway does not serve", stream.node, type_url)
            return False
        ts = stream.types.setdefault(type_url, _TypeState())
        names = frozenset(req.resource_names) if type_url == ROUTE_TYPE else None
        if not req.response_nonce:  # a new subscription (a connect or reconnect)
            ts.names = names
            snaps = self._snapshots(stream.bridge)
            current = snaps.get(type_url) if snaps else None
            if current is not None and req.version_info == current.version:
                ts.acked = current  # it already runs these very resources (served by another worker)
            self._push(stream, type_url, force=True)
            return True
        if req.response_nonce != ts.nonce:
            return False  # an answer to a response that has been superseded
        if req.HasField("error_detail"):
            ts.nack = req.error_detail.message or f"code {req.error_detail.code}"
            log.error("xds: Envoy %s rejected %s version %s: %s", stream.node, type_url.rsplit(".", 1)[1],
                      ts.sent.version if ts.sent else "?", ts.nack)
        else:
            ts.acked, ts.nack = ts.sent, ""
        if names != ts.names:
            ts.names = names
            self._push(stream, type_url, force=True)
        return True

    async def _read(self, stream: _Stream, requests: AsyncIterator[discovery_pb2.DiscoveryRequest]) -> None:
        try:
            async for req in requests:
                if self._on_request(stream, req) and stream.node:
                    await self._publish(stream)
        finally:
            stream.outbox.put_nowait(None)

    async def _publish(self, stream: _Stream) -> None:
        try:
            await self.registry.put(stream.record(self.worker))
        except Exception as exc:  # the gate then waits for this Envoy (its record is missing or old)
            log.warning("xds: cannot record Envoy %s's ACKs: %s", stream.node, exc)

    async def StreamAggregatedResources(self, request_iterator: Any, context: grpc.aio.ServicerContext) -> None:
        bridge = self.config.bridge_listen
        stream = _Stream(context.peer(), bridge if bridge.port else Address("127.0.0.1", DEFAULT_BRIDGE_PORT))
        self.streams.add(stream)
        reader = asyncio.get_running_loop().create_task(self._read(stream, request_iterator))
        try:
            while (response := await stream.outbox.get()) is not None:
                await context.write(response)
        except asyncio.CancelledError:
            pass
        finally:
            reader.cancel()
            self.streams.discard(stream)
            if stream.node:
                log.info("xds: Envoy %s disconnected", stream.node)
                if not any(s.node == stream.node for s in self.streams):
                    with contextlib.suppress(Exception):
                        await asyncio.shield(self.registry.drop(stream.node, self.worker))

    async def DeltaAggregatedResources(self, request_iterator: Any, context: grpc.aio.ServicerContext) -> None:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "muster-edge serves state-of-the-world ADS")

    # ---- upkeep ----------------------------------------------------------------------------------------------
    async def heartbeat(self, every_s: float = HEARTBEAT_S) -> None:
        """Refresh the records of the Envoys this worker serves (a record not refreshed is a dead worker's)."""
        while True:
            await asyncio.sleep(every_s)
            for stream in list(self.streams):
                if stream.node:
                    await self._publish(stream)

    def status(self) -> dict[str, Any]:
        out: dict[str, Any] = {"connected": self.gate.status(), "servedHere": [{
            "node": s.node, "peer": s.peer,
            **{t.rsplit(".", 1)[1]: {"sent": ts.sent.version if ts.sent else "",
                                     "acked": ts.acked.version if ts.acked else "",
                                     **({"rejected": ts.nack} if ts.nack else {})} for t, ts in s.types.items()},
        } for s in sorted(self.streams, key=lambda s: s.node)]}
        if self.render_error:
            out["renderError"] = self.render_error
        return out
