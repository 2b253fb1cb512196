"""What the xDS server sends: the catalog's clusters and route table as protobuf resources, with versions that
are content hashes (so every processor worker and every replica names the same catalog with the same version,
and an Envoy that reconnects to another worker is not sent anything new), and per-server digests (so any process
can tell whether an Envoy's acknowledged clusters hold a server as the catalog now defines it).

The documents come from envoy_config (`cds`, `route_table`): the file mode and xDS serve the same resources.
No gRPC here; protobuf only.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import pkgutil
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from google.protobuf import any_pb2, descriptor_pool, json_format, message_factory

from catalog.config import Address, GatewayConfig
from catalog.manifests import MCPServer
from extproc import envoy_config

CLUSTER_TYPE = "type.googleapis.com/envoy.config.cluster.v3.Cluster"
ROUTE_TYPE = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration"
_PREFIX = "type.googleapis.com/"


class ResourceError(ValueError):
    """A rendered document Envoy's API does not accept (an unknown field, a bad value): never sent."""


_loaded_packages: set[str] = set()


def _ensure_type(full_name: str) -> None:
    """Import the generated modules of a message's package (xds-protos), so json_format can resolve every
    `@type` the renderer writes, including ones other parts of the renderer add later."""
    pool = descriptor_pool.Default()
    try:
        pool.FindMessageTypeByName(full_name)
        return
    except KeyError:
        pass
    package = full_name.rsplit(".", 1)[0]
    if package in _loaded_packages:
        return
    _loaded_packages.add(package)
    try:
        module = importlib.import_module(package)
    except ImportError:
        return
    for info in pkgutil.iter_modules(getattr(module, "__path__", [])):
        if info.name.endswith("_pb2"):
            importlib.import_module(f"{package}.{info.name}")


def _ensure_nested(doc: Any) -> None:
    if isinstance(doc, dict):
        kind = doc.get("@type")
        if isinstance(kind, str) and kind.startswith(_PREFIX):
            _ensure_type(kind[len(_PREFIX):])
        for value in doc.values():
            _ensure_nested(value)
    elif isinstance(doc, list):
        for value in doc:
            _ensure_nested(value)


def to_any(type_url: str, doc: dict[str, Any]) -> any_pb2.Any:
    """A YAML-shaped document (as the file mode writes it) as a typed protobuf Any."""
    _ensure_type(type_url[len(_PREFIX):])
    _ensure_nested(doc)
    cls = message_factory.GetMessageClass(descriptor_pool.Default().FindMessageTypeByName(type_url[len(_PREFIX):]))
    body = {k: v for k, v in doc.items() if k != "@type"}
    try:
        msg = json_format.ParseDict(body, cls())
    except json_format.ParseError as exc:
        raise ResourceError(f"{doc.get('name', '?')}: {exc}") from exc
    out = any_pb2.Any()
    out.Pack(msg, deterministic=True)
    return out


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:16]


def server_digest(server: MCPServer) -> str:
    """What an Envoy must have acknowledged for `server`'s clusters to be current, computed the same way in every
    process (the bridge address, which differs per Envoy, is left out)."""
    docs = [envoy_config.upstream_cluster(server)]
    if server.type == "sse":
        docs.append(envoy_config.origin_cluster(server))
    return _digest(json.dumps(docs, sort_keys=True).encode())


@dataclass(frozen=True)
class Snapshot:
    """One type's resources for one Envoy: version, resources by name, and (clusters) the servers they carry."""

    type_url: str
    version: str
    resources: dict[str, any_pb2.Any]
    servers: dict[str, str]  # server name -> server_digest (clusters only)


def _version(resources: dict[str, any_pb2.Any]) -> str:
    h = hashlib.sha256()
    for name in sorted(resources):
        h.update(name.encode() + b"\0" + resources[name].value + b"\0")
    return h.hexdigest()[:16]


def clusters(servers: Sequence[MCPServer], bridge: Address) -> Snapshot:
    docs = envoy_config.cds(servers, bridge)["resources"]
    resources = {doc["name"]: to_any(CLUSTER_TYPE, doc) for doc in docs}
    return Snapshot(CLUSTER_TYPE, _version(resources), resources, {s.name: server_digest(s) for s in servers})


def routes(config: GatewayConfig, servers: Sequence[MCPServer]) -> Snapshot:
    docs = envoy_config.route_table(config, servers)["resources"]
    resources = {doc["name"]: to_any(ROUTE_TYPE, doc) for doc in docs}
    return Snapshot(ROUTE_TYPE, _version(resources), resources, {})


def render(config: GatewayConfig, servers: Sequence[MCPServer], bridge: Address) -> dict[str, Snapshot]:
    """Everything one Envoy gets, by type URL."""
    return {CLUSTER_TYPE: clusters(servers, bridge), ROUTE_TYPE: routes(config, servers)}
