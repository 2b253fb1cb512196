"""Envoy configuration rendered from the gateway config and the catalog.

Two shapes: the standalone bootstrap (`bootstrap`), and the pieces a mesh operator adds to an Envoy they
already run (`mesh_pieces`). Upstream clusters live in a file-based CDS document (`cds`) that is replaced
atomically on every catalog change, so servers come and go without a restart.
"""

from __future__ import annotations

import ipaddress
import os
import tempfile
from collections.abc import Sequence
from typing import Any
from urllib.parse import urlsplit

import yaml

from catalog.config import GatewayConfig
from catalog.manifests import MCPServer
from extproc.upstream import ROUTE_HEADER, cluster_name

CDS_FILE = "cds.yaml"
_HCM = "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"
_ROUTER = {"name": "envoy.filters.http.router",
           "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}
_CA_BUNDLE = "/etc/ssl/certs/ca-certificates.crt"


def _socket(host: str, port: int) -> dict[str, Any]:
    return {"socket_address": {"address": host, "port_value": port}}


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def upstream_cluster(server: MCPServer) -> dict[str, Any]:
    """One Envoy cluster per MCPServer, named as the processor's routing header names it."""
    parts = urlsplit(server.url)
    tls = parts.scheme == "https"
    host = parts.hostname or ""
    port = parts.port or (443 if tls else 80)
    cluster: dict[str, Any] = {
        "@type": "type.googleapis.com/envoy.config.cluster.v3.Cluster",
        "name": cluster_name(server.name),
        "type": "STATIC" if _is_ip(host) else "STRICT_DNS",
        "connect_timeout": f"{min(server.timeout, 10)}s",
        "dns_lookup_family": "V4_PREFERRED",
        "circuit_breakers": {"thresholds": [{"max_requests": 10000, "max_pending_requests": 10000,
                                             "max_connections": 10000}]},
        "load_assignment": {"cluster_name": cluster_name(server.name),
                            "endpoints": [{"lb_endpoints": [{"endpoint": {"address": _socket(host, port)}}]}]},
    }
    if tls:
        cluster["transport_socket"] = {
            "name": "envoy.transport_sockets.tls",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
                "sni": host,
                "common_tls_context": {"validation_context": {"trusted_ca": {"filename": _CA_BUNDLE}}},
            },
        }
    return cluster


def cds(servers: Sequence[MCPServer]) -> dict[str, Any]:
    return {"resources": [upstream_cluster(s) for s in sorted(servers, key=lambda s: s.name)]}


def ext_proc_filter(config: GatewayConfig) -> dict[str, Any]:
    full = {"response_header_mode": "SEND", "request_trailer_mode": "SKIP", "response_trailer_mode": "SKIP",
            "request_body_mode": "NONE"}
    return {
        "name": "envoy.filters.http.ext_proc",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.ext_proc.v3.ExternalProcessor",
            "grpc_service": {"envoy_grpc": {"cluster_name": "muster_edge_processor"}, "timeout": "5s"},
            "failure_mode_allow": False,
            "processing_mode": {
                "request_header_mode": "SEND", "request_body_mode": "BUFFERED",
                "response_header_mode": "SEND", "response_body_mode": "NONE",
                "request_trailer_mode": "SKIP", "response_trailer_mode": "SKIP",
            },
            "allow_mode_override": True,
            # Compared with the whole effective override: every field spelled out (DESIGN.md, traps).
            "allowed_override_modes": [
                {**full, "response_body_mode": "NONE"},
                {**full, "response_body_mode": "STREAMED"},
                {**full, "response_body_mode": "BUFFERED"},
            ],
            "message_timeout": "2s",
            "max_message_timeout": "90s",
            "metadata_options": {"forwarding_namespaces": {"untyped": ["envoy.filters.http.jwt_authn"]},
                                 "receiving_namespaces": {"untyped": ["muster_edge"]}},
            "mutation_rules": {"allow_all_routing": True, "allow_envoy": True, "disallow_is_error": True},
            "status_on_error": {"code": "ServiceUnavailable"},
        },
    }


def body_size_filter(config: GatewayConfig) -> dict[str, Any]:
    return {
        "name": "envoy.filters.http.body_size_limit",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.body_size_limit.v3.BodySizeLimit",
            "max_request_bytes": config.max_request_bytes,
        },
    }


def routes(config: GatewayConfig) -> list[dict[str, Any]]:
    """The public routes: routed calls by the processor's header; the MCP path; nothing else."""
    not_routed = ('{"jsonrpc":"2.0","id":null,"error":{"code":-32603,'
                  '"message":"muster-edge: the request was not routed"}}')
    return [
        {
            "name": "muster_edge_routed",
            "match": {"prefix": "/", "headers": [{"name": ROUTE_HEADER, "present_match": True}]},
            "route": {"cluster_header": ROUTE_HEADER, "timeout": "0s", "idle_timeout": "300s",
                      "cluster_not_found_response_code": "SERVICE_UNAVAILABLE"},
            "request_headers_to_remove": [ROUTE_HEADER],
            "response_headers_to_remove": ["mcp-session-id"],
        },
        {
            "name": "muster_edge_mcp",
            "match": {"path": config.path},
            "direct_response": {"status": 500, "body": {"inline_string": not_routed}},
            "response_headers_to_add": [{"header": {"key": "content-type", "value": "application/json"}}],
        },
        {
            "name": "muster_edge_not_found",
            "match": {"prefix": "/"},
            "direct_response": {"status": 404, "body": {"inline_string": "not found\n"}},
            "typed_per_filter_config": {"envoy.filters.http.ext_proc": {
                "@type": "type.googleapis.com/envoy.extensions.filters.http.ext_proc.v3.ExtProcPerRoute",
                "disabled": True}},
        },
    ]


def _hcm(stat_prefix: str, virtual_host: dict[str, Any], filters: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "name": "envoy.filters.network.http_connection_manager",
        "typed_config": {
            "@type": _HCM,
            "stat_prefix": stat_prefix,
            "codec_type": "AUTO",
            "max_request_headers_kb": 96,
            "request_timeout": "0s",
            "stream_idle_timeout": "300s",
            "normalize_path": True,
            "merge_slashes": True,
            "common_http_protocol_options": {"headers_with_underscores_action": "REJECT_REQUEST"},
            "http2_protocol_options": {"max_concurrent_streams": 256},
            "route_config": {"name": f"{stat_prefix}_routes", "virtual_hosts": [virtual_host]},
            "http_filters": filters,
        },
    }


def public_listener(config: GatewayConfig) -> dict[str, Any]:
    vhost = {"name": "mcp", "domains": ["*"], "routes": routes(config)}
    filters = [body_size_filter(config), ext_proc_filter(config), _ROUTER]
    return {
        "name": "muster_edge_public",
        "address": _socket(config.listen.host, config.listen.port),
        "per_connection_buffer_limit_bytes": 1 << 20,
        "filter_chains": [{"filters": [_hcm("muster_edge", vhost, filters)]}],
    }


def internal_listener(config: GatewayConfig) -> dict[str, Any]:
    """Where the processor's own upstream calls enter Envoy: no ext_proc, routed by the same header."""
    vhost = {"name": "upstreams", "domains": ["*"], "routes": [
        {"match": {"prefix": "/", "headers": [{"name": ROUTE_HEADER, "present_match": True}]},
         "route": {"cluster_header": ROUTE_HEADER, "timeout": "0s",
                   "cluster_not_found_response_code": "SERVICE_UNAVAILABLE"},
         "request_headers_to_remove": [ROUTE_HEADER]},
        {"match": {"prefix": "/"}, "direct_response": {"status": 404}},
    ]}
    return {
        "name": "muster_edge_internal",
        "address": _socket(config.internal_listen.host, config.internal_listen.port),
        "filter_chains": [{"filters": [_hcm("muster_edge_internal", vhost, [_ROUTER])]}],
    }


def processor_cluster(config: GatewayConfig, ports: Sequence[int]) -> dict[str, Any]:
    host = config.processor_listen.host
    return {
        "name": "muster_edge_processor",
        "type": "STATIC",
        "connect_timeout": "1s",
        "lb_policy": "LEAST_REQUEST",
        "circuit_breakers": {"thresholds": [{"max_requests": 100000, "max_pending_requests": 100000,
                                             "max_connections": 1000}]},
        "typed_extension_protocol_options": {"envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
            "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
            "explicit_http_config": {"http2_protocol_options": {
                "max_concurrent_streams": 1000, "connection_keepalive": {"interval": "60s", "timeout": "5s"}}},
        }},
        "load_assignment": {"cluster_name": "muster_edge_processor", "endpoints": [
            {"lb_endpoints": [{"endpoint": {"address": _socket(host, p)}} for p in ports]}]},
    }


def bootstrap(config: GatewayConfig, ports: Sequence[int], cds_dir: str) -> dict[str, Any]:
    """The standalone gateway: public listener, internal listener, processor cluster, file-based CDS."""
    return {
        "node": {"id": "muster-edge", "cluster": "muster-edge"},
        "admin": {"address": _socket(config.envoy_admin.host, config.envoy_admin.port)},
        "overload_manager": {"resource_monitors": [{
            "name": "envoy.resource_monitors.global_downstream_max_connections",
            "typed_config": {"@type": "type.googleapis.com/envoy.extensions.resource_monitors."
                                      "downstream_connections.v3.DownstreamConnectionsConfig",
                             "max_active_downstream_connections": 50000}}]},
        "dynamic_resources": {"cds_config": {
            "resource_api_version": "V3",
            "path_config_source": {"path": os.path.join(cds_dir, CDS_FILE), "watched_directory": {"path": cds_dir}},
        }},
        "static_resources": {
            "listeners": [public_listener(config), internal_listener(config)],
            "clusters": [processor_cluster(config, ports)],
        },
    }


def mesh_pieces(config: GatewayConfig, ports: Sequence[int], cds_dir: str) -> dict[str, Any]:
    """What a mesh operator adds to an Envoy they already run, each piece under its own key."""
    return {
        "http_filters": [body_size_filter(config), ext_proc_filter(config)],
        "routes": routes(config),
        "clusters": [processor_cluster(config, ports)],
        "listeners": [internal_listener(config)],
        "cds_config": bootstrap(config, ports, cds_dir)["dynamic_resources"]["cds_config"],
    }


def dump(doc: Any) -> str:
    return yaml.safe_dump(doc, sort_keys=False, default_flow_style=False)


def write_atomic(path: str, text: str) -> None:
    """Replace a file in one rename, so Envoy's directory watch never reads half a file."""
    folder = os.path.dirname(path) or "."
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=".yaml")
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write(text)
    os.replace(tmp, path)


def processor_ports(config: GatewayConfig) -> list[int]:
    return [config.processor_listen.port + i for i in range(config.workers)]
