"""`muster-edge envoy render --target envoy-gateway|istio`: resources a mesh operator applies to an Envoy they
already run. Neither controller installs here, so the test does what each controller would do with the
rendered patches — applies them to a base configuration shaped like that controller's own output (the appliers
below implement just the operations the renderer uses, from the two APIs' documented semantics) — and the real
Envoy 1.40 validates the result (`envoy --mode validate`)."""

from __future__ import annotations

import copy
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.e2e.test_envoy_render import validate
from tests.gateway_harness import MUSTER_EDGE, manifest

_HCM = "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"
_ROUTER = {"name": "envoy.filters.http.router",
           "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}


def _render(tmp_path: Path, target: str, *extra: str, auth: bool = True) -> list[dict[str, Any]]:
    catalog = tmp_path / "servers"
    catalog.mkdir(exist_ok=True)
    docs = [manifest("kubernetes", "http://mcp-kubernetes.tools.svc:8080/mcp"),
            manifest("remote", "https://mcp.example.com/v1/mcp", timeout=60)]
    (catalog / "fleet.yaml").write_text(yaml.safe_dump_all(docs))
    cfg: dict[str, Any] = {"catalog": "./servers", "listen": "0.0.0.0:8080"}
    if auth:
        cfg["auth"] = {"issuer": "https://idp.example.com", "jwksUri": "https://idp.example.com/jwks",
                       "audiences": ["https://mcp.example.com/mcp"], "resource": "https://mcp.example.com/mcp",
                       "authorizationServers": ["https://idp.example.com"]}
    (tmp_path / "gateway.yaml").write_text(yaml.safe_dump(cfg))
    out = tmp_path / "out"
    done = subprocess.run([str(MUSTER_EDGE), "envoy", "render", "-c", str(tmp_path / "gateway.yaml"), "--out",
                           str(out), "--target", target, "--processor", "muster-edge-processor.mcp.svc:50051",
                           *extra], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return [d for d in yaml.safe_load_all((out / f"{target}.yaml").read_text()) if d]


def _hcm(vhost_name: str, route_name: str) -> dict[str, Any]:
    return {"name": "envoy.filters.network.http_connection_manager", "typed_config": {
        "@type": _HCM, "stat_prefix": "mesh",
        "route_config": {"name": route_name, "virtual_hosts": [{
            "name": vhost_name, "domains": ["*"],
            "routes": [{"match": {"prefix": "/"}, "route": {"cluster": "mesh_backend"}}]}]},
        "http_filters": [copy.deepcopy(_ROUTER)]}}


def _backend() -> dict[str, Any]:
    return {"name": "mesh_backend", "type": "STATIC", "load_assignment": {"cluster_name": "mesh_backend", "endpoints": [
        {"lb_endpoints": [{"endpoint": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": 9}}}}]}]}}


def _validates(tmp_path: Path, boot: dict[str, Any]) -> None:
    path = tmp_path / "patched.yaml"
    path.write_text(yaml.safe_dump(boot))
    result = validate(path)
    assert result.returncode == 0, result.stdout + result.stderr


# ---- Envoy Gateway: RFC 6902 "add" on the named xDS resource ("" adds a new resource) -------------------------
def _pointer_add(doc: Any, path: str, value: Any) -> None:
    parts = [p.replace("~1", "/").replace("~0", "~") for p in path.split("/")[1:]]
    node = doc
    for part in parts[:-1]:
        node = node[int(part)] if isinstance(node, list) else node[part]
    last = parts[-1]
    if isinstance(node, list):
        node.insert(len(node) if last == "-" else int(last), value)
    else:
        node[last] = value


def test_envoy_gateway_patch_policy_applies_and_validates(tmp_path: Path) -> None:
    docs = _render(tmp_path, "envoy-gateway", "--namespace", "mcp", "--gateway", "eg", "--listener", "http")
    assert [d["kind"] for d in docs] == ["EnvoyPatchPolicy"]
    policy = docs[0]
    assert policy["metadata"]["namespace"] == "mcp"
    assert policy["spec"]["targetRef"] == {"group": "gateway.networking.k8s.io", "kind": "Gateway", "name": "eg"}
    # what Envoy Gateway generates for Gateway mcp/eg, listener "http" (names as it gives them)
    listener = {"name": "mcp/eg/http", "address": {"socket_address": {"address": "0.0.0.0", "port_value": 10080}},
                "default_filter_chain": {"filters": [_hcm("mcp/eg/http/*", "mcp/eg/http")]}}
    resources: dict[tuple[str, str], dict[str, Any]] = {
        ("Listener", "mcp/eg/http"): listener,
        ("RouteConfiguration", "mcp/eg/http"): listener["default_filter_chain"]["filters"][0]["typed_config"][
            "route_config"],
        ("Cluster", "mesh_backend"): _backend(),
    }
    for patch in policy["spec"]["jsonPatches"]:
        kind = patch["type"].rsplit(".", 1)[1]
        op = patch["operation"]
        assert op["op"] == "add"
        if op["path"] == "":
            assert (kind, patch["name"]) not in resources
            resources[(kind, patch["name"])] = op["value"]
        else:
            _pointer_add(resources[(kind, patch["name"])], op["path"], op["value"])
    filters = [f["name"] for f in listener["default_filter_chain"]["filters"][0]["typed_config"]["http_filters"]]
    assert filters == ["envoy.filters.http.body_size_limit", "envoy.filters.http.jwt_authn",
                       "muster_edge.headers_in", "envoy.filters.http.ext_proc", "muster_edge.request_headers",
                       "muster_edge.headers_out", "muster_edge.answer_status", "muster_edge.answer_json",
                       "muster_edge.answer_sse", "envoy.filters.http.router"]
    clusters = [v for (k, _), v in resources.items() if k == "Cluster"]
    names = {c["name"] for c in clusters}
    assert {"mcp.kubernetes", "mcp.remote", "muster_edge_processor"} <= names
    listeners = [v for (k, _), v in resources.items() if k == "Listener"]
    _validates(tmp_path, {"static_resources": {"listeners": listeners, "clusters": clusters}})


# ---- Istio: EnvoyFilter config patches, the operations the renderer uses ------------------------------------------
def _hcms(listener: dict[str, Any]) -> list[dict[str, Any]]:
    chains = listener.get("filter_chains", []) + ([listener["default_filter_chain"]]
                                                  if "default_filter_chain" in listener else [])
    hcm = "envoy.filters.network.http_connection_manager"
    return [f for chain in chains for f in chain["filters"] if f["name"] == hcm]


def _apply_istio(boot: dict[str, Any], patches: list[dict[str, Any]]) -> None:
    static = boot["static_resources"]
    for patch in patches:
        where, op, value = patch["applyTo"], patch["patch"]["operation"], patch["patch"]["value"]
        port = (patch["match"].get("listener") or patch["match"].get("routeConfiguration") or {}).get("portNumber")
        matching = [ls for ls in static["listeners"]
                    if port is None or ls["address"]["socket_address"]["port_value"] == port]
        if where in ("CLUSTER", "LISTENER"):
            assert op == "ADD"
            static["clusters" if where == "CLUSTER" else "listeners"].append(value)
        elif where == "HTTP_FILTER":
            assert op == "INSERT_BEFORE"
            before = patch["match"]["listener"]["filterChain"]["filter"]["subFilter"]["name"]
            for hcm in (h for ls in matching for h in _hcms(ls)):
                chain = hcm["typed_config"]["http_filters"]
                chain.insert(next(i for i, f in enumerate(chain) if f["name"] == before), value)
        elif where == "NETWORK_FILTER":
            assert op == "MERGE"
            for hcm in (h for ls in matching for h in _hcms(ls)):
                hcm["typed_config"].update({k: v for k, v in value["typed_config"].items() if k != "@type"})
        elif where == "HTTP_ROUTE":
            assert op == "INSERT_FIRST"
            for hcm in (h for ls in matching for h in _hcms(ls)):
                for vhost in hcm["typed_config"]["route_config"]["virtual_hosts"]:
                    vhost["routes"].insert(0, value)
        else:
            raise AssertionError(f"unexpected applyTo {where}")


def test_istio_envoy_filter_applies_and_validates(tmp_path: Path) -> None:
    docs = _render(tmp_path, "istio", "--namespace", "istio-system", "--gateway", "istio-ingressgateway",
                   "--port", "8080")
    assert [d["kind"] for d in docs] == ["EnvoyFilter"]
    spec = docs[0]["spec"]
    assert spec["workloadSelector"] == {"labels": {"app": "istio-ingressgateway"}}
    # what an Istio ingress gateway runs: a listener on 8080 with its own routes, and an unrelated one
    other = {"name": "0.0.0.0_9443", "address": {"socket_address": {"address": "0.0.0.0", "port_value": 9443}},
             "filter_chains": [{"filters": [_hcm("other", "other")]}]}
    boot = {"static_resources": {"listeners": [
        {"name": "0.0.0.0_8080", "address": {"socket_address": {"address": "0.0.0.0", "port_value": 8080}},
         "filter_chains": [{"filters": [_hcm("mcp.example.com:80", "http.8080")]}]}, other],
        "clusters": [_backend()]}}
    _apply_istio(boot, spec["configPatches"])
    mcp = _hcms(boot["static_resources"]["listeners"][0])[0]["typed_config"]
    assert [f["name"] for f in mcp["http_filters"]][-8:] == [
        "muster_edge.headers_in", "envoy.filters.http.ext_proc", "muster_edge.request_headers",
        "muster_edge.headers_out", "muster_edge.answer_status", "muster_edge.answer_json",
        "muster_edge.answer_sse", "envoy.filters.http.router"]
    names = [r.get("name", "") for r in mcp["route_config"]["virtual_hosts"][0]["routes"]]
    assert names[0] == "muster_edge_routed_kubernetes_repeatable"  # the processor's routes first, in order
    assert names.index("muster_edge_routed") < len(names) - 1  # and before the mesh's own
    assert "local_reply_config" in mcp
    assert [f["name"] for f in _hcms(other)[0]["typed_config"]["http_filters"]] == ["envoy.filters.http.router"]
    internal = next(ls for ls in boot["static_resources"]["listeners"] if ls["name"] == "muster_edge_internal")
    assert [f["name"] for f in _hcms(internal)[0]["typed_config"]["http_filters"]] == ["envoy.filters.http.router"]
    _validates(tmp_path, boot)


@pytest.mark.timeout(60)
def test_render_watch_follows_the_catalog(tmp_path: Path) -> None:
    _render(tmp_path, "istio")  # writes the config and catalog
    out = tmp_path / "out" / "istio.yaml"
    proc = subprocess.Popen([str(MUSTER_EDGE), "envoy", "render", "-c", str(tmp_path / "gateway.yaml"), "--out",
                             str(tmp_path / "out"), "--target", "istio", "--watch"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        (tmp_path / "servers" / "extra.yaml").write_text(yaml.safe_dump(manifest("extra", "http://extra:80/mcp")))
        deadline = time.monotonic() + 30
        while "mcp.extra" not in out.read_text() and time.monotonic() < deadline:
            time.sleep(0.2)
        assert "mcp.extra" in out.read_text()
        (tmp_path / "servers" / "extra.yaml").unlink()
        deadline = time.monotonic() + 30
        while "mcp.extra" in out.read_text() and time.monotonic() < deadline:
            time.sleep(0.2)
        assert "mcp.extra" not in out.read_text()
    finally:
        proc.terminate()
        proc.wait(10)
