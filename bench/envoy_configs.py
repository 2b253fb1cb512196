"""Envoy bootstraps for the two Envoy-only targets: plain Envoy, and Envoy 1.40's own MCP filters.

Plain Envoy is the baseline the gateway is measured against: the same binary, the same listener settings as
the gateway's public listener (extproc/envoy_config.py), a router and nothing else, one listener per
upstream. The contender puts `envoy.filters.http.mcp` (parses the JSON-RPC body into metadata) in front of
`envoy.filters.http.mcp_router` (terminal: aggregates the backends, prefixes tool names with `backend__`).
Both are checked with `envoy --mode validate` before they run.
"""

from __future__ import annotations

import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from extproc.envoy_config import http_connection_manager

_ROUTER = {"name": "envoy.filters.http.router",
           "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}


@dataclass(frozen=True)
class Backend:
    """An upstream as Envoy sees it: cluster name and loopback port."""

    name: str
    host: str
    port: int
    path: str = "/mcp"


def _socket(host: str, port: int) -> dict[str, Any]:
    return {"socket_address": {"address": host, "port_value": port}}


def cluster(backend: Backend) -> dict[str, Any]:
    """Same shape as the gateway's upstream clusters, so connection handling is identical."""
    return {
        "name": backend.name,
        "type": "STATIC",
        "connect_timeout": "5s",
        "circuit_breakers": {"thresholds": [{"max_requests": 10000, "max_pending_requests": 10000,
                                             "max_connections": 10000}]},
        "load_assignment": {"cluster_name": backend.name,
                            "endpoints": [{"lb_endpoints": [{"endpoint": {"address": _socket(backend.host,
                                                                                              backend.port)}}]}]},
    }


def _hcm(stat_prefix: str, routes: list[dict[str, Any]], filters: list[dict[str, Any]]) -> dict[str, Any]:
    """The gateway's own HTTP connection manager settings, so plain Envoy differs from it only by the filters."""
    return http_connection_manager(stat_prefix, {"name": "all", "domains": ["*"], "routes": routes}, filters)


def _listener(name: str, host: str, port: int, hcm: dict[str, Any]) -> dict[str, Any]:
    return {"name": name, "address": _socket(host, port), "per_connection_buffer_limit_bytes": 1 << 20,
            "filter_chains": [{"filters": [hcm]}]}


def plain(admin_port: int, listeners: Sequence[tuple[int, Backend]], host: str = "127.0.0.1") -> dict[str, Any]:
    """One listener per upstream, each routing everything to that upstream's cluster."""
    out = []
    for port, backend in listeners:
        route = {"match": {"prefix": "/"}, "route": {"cluster": backend.name, "timeout": "0s"}}
        out.append(_listener(f"plain_{backend.name}", host, port, _hcm(f"plain_{backend.name}", [route], [_ROUTER])))
    return {
        "node": {"id": "bench-plain", "cluster": "bench"},
        "admin": {"address": _socket(host, admin_port)},
        "static_resources": {"listeners": out, "clusters": [cluster(b) for _, b in listeners]},
    }


def contender(admin_port: int, port: int, backends: Sequence[Backend], host: str = "127.0.0.1") -> dict[str, Any]:
    """Envoy's MCP filters aggregating `backends` on one listener (the route is ignored by mcp_router)."""
    servers = [{"name": b.name, "mcp_cluster": {"cluster": b.name, "path": b.path, "timeout": "30s"}}
               for b in backends]
    filters = [
        {"name": "envoy.filters.http.mcp",
         "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.mcp.v3.Mcp"}},
        {"name": "envoy.filters.http.mcp_router",
         "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.mcp_router.v3.McpRouter",
                          "servers": servers}},
    ]
    route = {"match": {"prefix": "/"}, "route": {"cluster": backends[0].name, "timeout": "0s"}}
    return {
        "node": {"id": "bench-contender", "cluster": "bench"},
        "admin": {"address": _socket(host, admin_port)},
        "static_resources": {"listeners": [_listener("contender", host, port, _hcm("contender", [route], filters))],
                             "clusters": [cluster(b) for b in backends]},
    }


class InvalidConfig(RuntimeError):
    pass


def write_validated(envoy: str, path: Path, bootstrap: dict[str, Any]) -> Path:
    """Write the bootstrap and run `envoy --mode validate` on it; raise with Envoy's words if it refuses."""
    path.write_text(yaml.safe_dump(bootstrap, sort_keys=False))
    done = subprocess.run([envoy, "--mode", "validate", "-c", str(path), "--log-level", "error"],
                          capture_output=True, text=True, timeout=60, check=False)
    if done.returncode != 0 or "OK" not in done.stdout + done.stderr:
        raise InvalidConfig(f"{path.name}: envoy --mode validate failed:\n{done.stdout}{done.stderr}")
    return path
