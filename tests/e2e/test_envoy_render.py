"""`muster-edge envoy render` writes configuration the real Envoy 1.40 accepts (`envoy --mode validate`)."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import yaml

from tests.gateway_harness import MUSTER_EDGE, manifest
from tests.procs import ROOT

ENVOY = ROOT / ".venv" / "bin" / "envoy"


def validate(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(ENVOY), "--mode", "validate", "-c", str(path), "--disable-hot-restart",
                           "--reject-unknown-dynamic-fields"], capture_output=True, text=True, timeout=60)


def render(tmp_path: Path) -> Path:
    catalog = tmp_path / "servers"
    catalog.mkdir()
    docs = [manifest("kubernetes", "http://127.0.0.1:18101/mcp"),
            manifest("remote", "https://mcp.example.com/v1/mcp", timeout=60),
            manifest("dns", "http://mcp-prometheus.monitoring.svc:8080/mcp")]
    (catalog / "fleet.yaml").write_text(yaml.safe_dump_all(docs))
    (tmp_path / "gateway.yaml").write_text(yaml.safe_dump({"catalog": "./servers", "processor": {"workers": 2}}))
    out = tmp_path / "out"
    done = subprocess.run([str(MUSTER_EDGE), "envoy", "render", "-c", str(tmp_path / "gateway.yaml"), "--out",
                           str(out)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return out


def test_standalone_bootstrap_validates(tmp_path: Path) -> None:
    out = render(tmp_path)
    result = validate(out / "bootstrap.yaml")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "OK" in result.stdout + result.stderr
    boot = yaml.safe_load((out / "bootstrap.yaml").read_text())
    endpoints = boot["static_resources"]["clusters"][0]["load_assignment"]["endpoints"][0]["lb_endpoints"]
    assert len(endpoints) == 2  # one per processor worker


def test_cds_clusters_validate(tmp_path: Path) -> None:
    """--mode validate does not read the CDS file, so its clusters are embedded in a throwaway bootstrap."""
    out = render(tmp_path)
    cds = yaml.safe_load((out / "cds" / "cds.yaml").read_text())
    clusters = []
    for resource in cds["resources"]:
        cluster = {k: v for k, v in resource.items() if k != "@type"}
        clusters.append(cluster)
    names = {c["name"] for c in clusters}
    assert names == {"mcp.kubernetes", "mcp.remote", "mcp.dns"}
    remote = next(c for c in clusters if c["name"] == "mcp.remote")
    assert remote["transport_socket"]["typed_config"]["sni"] == "mcp.example.com"
    probe = tmp_path / "probe.yaml"
    probe.write_text(yaml.safe_dump({"static_resources": {"clusters": clusters}}))
    result = validate(probe)
    assert result.returncode == 0, result.stdout + result.stderr


def test_mesh_pieces_fit_an_existing_envoy(tmp_path: Path) -> None:
    """The pieces an operator pastes into their own Envoy: filters, routes, clusters, internal listener, CDS."""
    out = render(tmp_path)
    mesh = yaml.safe_load((out / "mesh.yaml").read_text())
    router = {"name": "envoy.filters.http.router",
              "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}
    hcm: dict[str, Any] = {
        "name": "envoy.filters.network.http_connection_manager",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3."
                     "HttpConnectionManager",
            "stat_prefix": "operator_ingress",
            "route_config": {"virtual_hosts": [{"name": "operator", "domains": ["*"], "routes": mesh["routes"]}]},
            "http_filters": [*mesh["http_filters"], router],
        },
    }
    existing = {
        "node": {"id": "operator-envoy", "cluster": "operator"},
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}}},
        "dynamic_resources": {"cds_config": mesh["cds_config"]},
        "static_resources": {
            "listeners": [{"name": "operator_ingress",
                           "address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}},
                           "filter_chains": [{"filters": [hcm]}]}, *mesh["listeners"]],
            "clusters": mesh["clusters"],
        },
    }
    probe = tmp_path / "operator.yaml"
    probe.write_text(yaml.safe_dump(existing))
    result = validate(probe)
    assert result.returncode == 0, result.stdout + result.stderr


def test_committed_demo_config_is_current_and_valid(tmp_path: Path) -> None:
    """envoy/demo/ is what the renderer writes for the demo fleet today (with the repository's absolute path
    written as "."), and Envoy accepts it."""
    from extproc.selfsigned import ensure_self_signed

    subprocess.run([str(MUSTER_EDGE), "envoy", "render", "-c", str(ROOT / "deploy/demo/gateway.yaml"), "--out",
                    "envoy/demo"], check=True, capture_output=True, cwd=tmp_path, timeout=60)
    for name in ("bootstrap.yaml", "mesh.yaml", "cds/cds.yaml"):
        fresh = (tmp_path / "envoy/demo" / name).read_text().replace(str(ROOT), ".")
        assert fresh == (ROOT / "envoy/demo" / name).read_text(), f"envoy/demo/{name} is stale: `make envoy-demo`"
    ensure_self_signed(str(ROOT / ".state/demo/tls/cert.pem"), str(ROOT / ".state/demo/tls/key.pem"))
    result = subprocess.run([str(ENVOY), "--mode", "validate", "-c", "envoy/demo/bootstrap.yaml",
                             "--disable-hot-restart"], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
