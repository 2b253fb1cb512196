"""What the xDS server sends: typed resources with content-hash versions, per-server digests that do not depend on
an Envoy's bridge address, and which connected Envoys hold a server back."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import yaml
from envoy.config.cluster.v3 import cluster_pb2

from catalog.config import Address, parse_config
from catalog.manifests import MCPServer, parse_server
from extproc import envoy_config
from extproc.upstream import cluster_name
from extproc.xds_acks import NodeRecord, behind, why_not_listed
from extproc.xds_resources import CLUSTER_TYPE, ROUTE_TYPE, render, server_digest

CONFIG = parse_config("xds: true\n", "gateway.yaml")
BRIDGE_A, BRIDGE_B = Address("127.0.0.1", 18081), Address("127.0.0.1", 28081)


def server(name: str, **spec: Any) -> MCPServer:
    return parse_server({"apiVersion": "muster.giantswarm.io/v1alpha1", "kind": "MCPServer",
                         "metadata": {"name": name}, "spec": {"type": "streamable-http", **spec}}, "t.yaml")


FLEET = [server("plain", url="http://127.0.0.1:18101/mcp"), server("remote", url="https://mcp.example.com/mcp"),
         server("dns", url="http://mcp.monitoring.svc:8080/mcp", timeout=90),
         server("local", type="stdio", command="mcp-local"), server("legacy", type="sse", url="http://10.0.0.1/sse")]


def test_every_cluster_and_the_route_table_are_typed_resources() -> None:
    snaps = render(CONFIG, FLEET, BRIDGE_A)
    clusters = snaps[CLUSTER_TYPE]
    assert set(clusters.resources) == {cluster_name(s.name) for s in FLEET} | {"mcp-origin.legacy"}
    local = cluster_pb2.Cluster()
    assert clusters.resources[cluster_name("local")].Unpack(local)
    address = local.load_assignment.endpoints[0].lb_endpoints[0].endpoint.address.socket_address
    assert (address.address, address.port_value) == ("127.0.0.1", 18081)  # this Envoy's own bridge
    assert list(snaps[ROUTE_TYPE].resources) == [envoy_config.ROUTE_TABLE]


def test_versions_are_content_hashes() -> None:
    first, again = render(CONFIG, FLEET, BRIDGE_A), render(CONFIG, list(reversed(FLEET)), BRIDGE_A)
    assert first[CLUSTER_TYPE].version == again[CLUSTER_TYPE].version  # any worker, any replica: one version
    assert first[ROUTE_TYPE].version == again[ROUTE_TYPE].version
    other_bridge = render(CONFIG, FLEET, BRIDGE_B)
    assert other_bridge[CLUSTER_TYPE].version != first[CLUSTER_TYPE].version
    assert other_bridge[CLUSTER_TYPE].servers == first[CLUSTER_TYPE].servers  # digests ignore the bridge
    changed = [*FLEET[:-1], server("legacy", type="sse", url="http://10.0.0.2/sse")]
    moved = render(CONFIG, changed, BRIDGE_A)[CLUSTER_TYPE]
    assert moved.version != first[CLUSTER_TYPE].version
    assert moved.servers["legacy"] != first[CLUSTER_TYPE].servers["legacy"]
    assert moved.servers["plain"] == first[CLUSTER_TYPE].servers["plain"]


def test_a_server_waits_for_every_live_envoy_that_has_not_acknowledged_it() -> None:
    plain = FLEET[0]
    now = time.time()
    current = {"plain": server_digest(plain)}
    a = NodeRecord("envoy-a", "w1", current, "v2", "", now)
    b = NodeRecord("envoy-b", "w2", {}, "v1", "malformed IP address", now)
    c = NodeRecord("envoy-c", "w2", {"plain": "0123456789abcdef"}, "v0", "", now)  # an older definition
    assert behind([a], "plain", current["plain"]) == []
    late = behind([a, b, c], "plain", current["plain"])
    assert [r.node for r in late] == ["envoy-b", "envoy-c"]
    assert why_not_listed(late) == ("waiting for every connected Envoy to acknowledge its cluster: envoy-b "
                                    "(rejected it: malformed IP address), envoy-c (no ACK yet)")
    assert not NodeRecord("gone", "w3", {}, "", "", now - 60).live(now)
    assert NodeRecord.parse(a.dump()) == a and NodeRecord.parse("not json") is None


def test_the_kubernetes_deployment_uses_xds_with_one_node_id_per_envoy() -> None:
    deploy = Path(__file__).resolve().parents[2] / "deploy" / "kubernetes"
    docs = list(yaml.safe_load_all((deploy / "processor.yaml").read_text()))
    config = parse_config(docs[0]["data"]["gateway.yaml"], "/etc/muster-edge/gateway.yaml")
    assert config.xds and config.redis_url  # ACKs of every Envoy, seen by every processor pod
    envoy = next(d for d in yaml.safe_load_all((deploy / "envoy.yaml").read_text()) if d["kind"] == "Deployment")
    container = envoy["spec"]["template"]["spec"]["containers"][0]
    assert container["command"][-2:] == ["--service-node", "$(POD_NAME)"]
    assert "cds" not in {v["name"] for v in envoy["spec"]["template"]["spec"]["volumes"]}
    boot = envoy_config.bootstrap(config.with_overrides(processor_listen=Address("muster-edge-processor", 50051)),
                                  [50051], "/unused")
    xds = next(c for c in boot["static_resources"]["clusters"] if c["name"] == envoy_config.XDS_CLUSTER)
    assert xds["type"] == "STRICT_DNS" and boot["dynamic_resources"]["cds_config"] == {
        "ads": {}, "resource_api_version": "V3"}
