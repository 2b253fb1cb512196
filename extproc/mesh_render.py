"""muster-edge for an Envoy a mesh already runs: Envoy Gateway and Istio resources built from the same pieces
as the standalone bootstrap (`envoy_config`), so what a mesh operator applies is what the test suite validates.

Envoy Gateway: one `EnvoyPatchPolicy` of JSON patches on the xDS it generates; Istio: one `EnvoyFilter` of config
patches. Both carry the filter chain (body size limit, jwt_authn keeping the bearer for the processor, the request
ext_proc filter, the answer filters with their matchers), one cluster per MCPServer for `cluster_header` routing,
the processor and IdP clusters, the internal listener, the route the processor selects, and JSON-RPC local replies.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from catalog.config import GatewayConfig
from catalog.manifests import MCPServer
from extproc import envoy_config

TARGETS = ("standalone", "envoy-gateway", "istio")
_CLUSTER = "type.googleapis.com/envoy.config.cluster.v3.Cluster"
_LISTENER = "type.googleapis.com/envoy.config.listener.v3.Listener"
_ROUTE_CONFIG = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration"
_HCM_NAME = "envoy.filters.network.http_connection_manager"
_LABELS = {"app.kubernetes.io/name": "muster-edge", "app.kubernetes.io/managed-by": "muster-edge-render"}


@dataclass(frozen=True)
class MeshTarget:
    """Where the rendered resources attach: the mesh's own objects, named by the operator."""

    namespace: str = "default"
    gateway: str = "eg"  # Envoy Gateway: the Gateway; Istio: the workload label app=<gateway>
    listener: str = "http"  # Envoy Gateway: the Gateway listener (section) that serves MCP
    port: int = 0  # Istio: the gateway listener's port that serves MCP (default: the config's listen port)
    processor_host: str = ""  # the processor Service (host); default: processor.listen's host
    processor_port: int = 0


def _processor(config: GatewayConfig, target: MeshTarget) -> tuple[str, int]:
    return (target.processor_host or config.processor_listen.host,
            target.processor_port or config.processor_listen.port)


def _processor_cluster(config: GatewayConfig, target: MeshTarget) -> dict[str, Any]:
    host, port = _processor(config, target)
    cluster = envoy_config.processor_cluster(config, [port])
    if not envoy_config._is_ip(host):
        cluster["type"] = "STRICT_DNS"
    cluster["load_assignment"]["endpoints"][0]["lb_endpoints"] = [
        {"endpoint": {"address": {"socket_address": {"address": host, "port_value": port}}}}]
    return cluster


def _clusters(config: GatewayConfig, servers: Sequence[MCPServer], target: MeshTarget) -> list[dict[str, Any]]:
    """The processor cluster (the answer filters and the request filter's Istio form use it), the IdP's JWKS
    cluster, and one cluster per MCPServer."""
    upstream = [{k: v for k, v in envoy_config.upstream_cluster(s).items() if k != "@type"} for s in servers]
    idp = [envoy_config.idp_cluster(config)] if config.auth is not None else []
    return [_processor_cluster(config, target), *idp, *upstream]


def _meta(name: str, target: MeshTarget) -> dict[str, Any]:
    return {"name": name, "namespace": target.namespace, "labels": dict(_LABELS)}


# ---- Envoy Gateway --------------------------------------------------------------------------------------------
def envoy_gateway(config: GatewayConfig, servers: Sequence[MCPServer], target: MeshTarget) -> list[dict[str, Any]]:
    """One EnvoyPatchPolicy. Not EnvoyExtensionPolicy + Backend for the request filter: the answer filters' matchers
    must run after the request filter in the same chain (they read the flags its reply writes) and the processor
    extends slow decisions past message_timeout (max_message_timeout); EnvoyExtensionPolicy can place or say
    neither, so the whole chain is patched in, in its own order, exactly as the standalone gateway runs it."""
    patch = {"apiVersion": "gateway.envoyproxy.io/v1alpha1", "kind": "EnvoyPatchPolicy",
             "metadata": _meta("muster-edge", target),
             "spec": {"targetRef": {"group": "gateway.networking.k8s.io", "kind": "Gateway", "name": target.gateway},
                      "type": "JSONPatch", "jsonPatches": envoy_gateway_patches(config, servers, target)}}
    return [patch]


def eg_listener_name(target: MeshTarget) -> str:
    """Envoy Gateway names a Gateway listener's Envoy listener and route configuration namespace/gateway/section."""
    return f"{target.namespace}/{target.gateway}/{target.listener}"


def envoy_gateway_patches(config: GatewayConfig, servers: Sequence[MCPServer],
                          target: MeshTarget) -> list[dict[str, Any]]:
    """JSON patches on Envoy Gateway's generated xDS: our filters first in the listener's chain, in their own
    order, so every other filter and the router come after them."""
    listener = eg_listener_name(target)
    hcm = "/default_filter_chain/filters/0/typed_config"
    ours = envoy_config.http_filters(config)
    patches: list[dict[str, Any]] = [
        {"type": _LISTENER, "name": listener,
         "operation": {"op": "add", "path": f"{hcm}/http_filters/{i}", "value": f}} for i, f in enumerate(ours)]
    if config.auth is not None:
        patches.append({"type": _LISTENER, "name": listener,
                        "operation": {"op": "add", "path": f"{hcm}/local_reply_config",
                                      "value": envoy_config.local_replies(config)}})
    for i, route in enumerate(_routed(config, servers)):
        patches.append({"type": _ROUTE_CONFIG, "name": listener,
                        "operation": {"op": "add", "path": f"/virtual_hosts/0/routes/{i}", "value": route}})
    for cluster in _clusters(config, servers, target):
        patches.append({"type": _CLUSTER, "name": cluster["name"],
                        "operation": {"op": "add", "path": "", "value": cluster}})
    internal = envoy_config.internal_listener(config)
    patches.append({"type": _LISTENER, "name": internal["name"],
                    "operation": {"op": "add", "path": "", "value": internal}})
    return patches


def _routed(config: GatewayConfig, servers: Sequence[MCPServer]) -> list[dict[str, Any]]:
    """The routes a processor decision selects (by the header it sets: one per server with its timeout, then the
    shared ones, each for calls safe to repeat and for others); they must come before the mesh's own."""
    return [copy.deepcopy(r) for r in envoy_config.routes(config, servers)
            if r["name"].startswith("muster_edge_routed")]


# ---- Istio ----------------------------------------------------------------------------------------------------
def istio(config: GatewayConfig, servers: Sequence[MCPServer], target: MeshTarget,
          context: str = "GATEWAY") -> list[dict[str, Any]]:
    """One EnvoyFilter for the workloads labelled app=<gateway>: filters before the router, clusters, the
    internal listener, the routed route first in every virtual host, JSON-RPC local replies."""
    port = target.port or config.listen.port  # only the MCP listener: never the internal one added below
    hcm_match = {"context": context, "listener": {"portNumber": port, "filterChain": {"filter": {"name": _HCM_NAME}}}}
    router_match = {"context": context, "listener": {"portNumber": port, "filterChain": {"filter": {
        "name": _HCM_NAME, "subFilter": {"name": "envoy.filters.http.router"}}}}}
    patches: list[dict[str, Any]] = [
        {"applyTo": "HTTP_FILTER", "match": router_match, "patch": {"operation": "INSERT_BEFORE", "value": f}}
        for f in envoy_config.http_filters(config)]
    if config.auth is not None:
        patches.append({"applyTo": "NETWORK_FILTER", "match": hcm_match, "patch": {"operation": "MERGE", "value": {
            "name": _HCM_NAME, "typed_config": {"@type": envoy_config._HCM,
                                                "local_reply_config": envoy_config.local_replies(config)}}}})
    if envoy_config.call_access_log(config):  # the call histograms' source (extproc/access_log.py)
        patches.append({"applyTo": "NETWORK_FILTER", "match": hcm_match, "patch": {"operation": "MERGE", "value": {
            "name": _HCM_NAME, "typed_config": {"@type": envoy_config._HCM,
                                                "access_log": envoy_config.call_access_log(config)}}}})
    for route in reversed(_routed(config, servers)):  # each goes first: the last inserted ends up first
        patches.append({"applyTo": "HTTP_ROUTE",
                        "match": {"context": context, "routeConfiguration": {"portNumber": port}},
                        "patch": {"operation": "INSERT_FIRST", "value": route}})
    for cluster in _clusters(config, servers, target):
        patches.append({"applyTo": "CLUSTER", "match": {"context": context},
                        "patch": {"operation": "ADD", "value": cluster}})
    patches.append({"applyTo": "LISTENER", "match": {"context": context},
                    "patch": {"operation": "ADD", "value": envoy_config.internal_listener(config)}})
    return [{"apiVersion": "networking.istio.io/v1alpha3", "kind": "EnvoyFilter",
             "metadata": _meta("muster-edge", target),
             "spec": {"workloadSelector": {"labels": {"app": target.gateway}}, "configPatches": patches}}]


def render(kind: str, config: GatewayConfig, servers: Sequence[MCPServer], target: MeshTarget) -> list[dict[str, Any]]:
    if kind == "envoy-gateway":
        return envoy_gateway(config, servers, target)
    if kind == "istio":
        return istio(config, servers, target)
    raise ValueError(f"unknown target {kind!r}: expected one of {', '.join(TARGETS)}")
