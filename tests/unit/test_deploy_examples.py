"""The Kubernetes examples in deploy/ hold manifests the catalog admits, and a CRD that names the same fields."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from catalog.config import parse_config
from catalog.manifests import load_documents

DEPLOY = Path(__file__).resolve().parents[2] / "deploy" / "kubernetes"


@pytest.mark.parametrize("example", sorted(p.name for p in (DEPLOY / "examples").glob("*.yaml")))
def test_example_catalogs_are_admitted(example: str) -> None:
    config_map = yaml.safe_load((DEPLOY / "examples" / example).read_text())
    files = [(name, text) for name, text in config_map["data"].items()]
    result = load_documents(files)
    assert result.servers and not result.errors, [str(e) for e in result.errors]


def test_the_processor_config_in_the_deployment_parses() -> None:
    docs = list(yaml.safe_load_all((DEPLOY / "processor.yaml").read_text()))
    config = parse_config(docs[0]["data"]["gateway.yaml"], "/etc/muster-edge/gateway.yaml")
    assert config.auth is not None and config.redis_url.startswith("redis://")


def test_the_processor_status_endpoint_is_guarded_and_probed_on_healthz() -> None:
    docs = list(yaml.safe_load_all((DEPLOY / "processor.yaml").read_text()))
    config = parse_config(docs[0]["data"]["gateway.yaml"], "/etc/muster-edge/gateway.yaml")
    deployment = next(d for d in docs if d["kind"] == "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    container = pod["containers"][0]
    # bound beyond loopback (the kubelet probes the pod IP), so /status and /metrics need the statusToken
    assert config.status_listen.host == "0.0.0.0" and config.status_token_file
    for probe in ("readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"] == {"path": "/healthz", "port": "status"}
    mount = next(m for m in container["volumeMounts"] if config.status_token_file.startswith(m["mountPath"] + "/"))
    volume = next(v for v in pod["volumes"] if v["name"] == mount["name"])
    secret = next(d for d in docs if d["kind"] == "Secret" and d["metadata"]["name"] == volume["secret"]["secretName"])
    assert config.status_token_file.rsplit("/", 1)[1] in secret["stringData"]


def test_the_crd_knows_every_spec_field_the_catalog_reads() -> None:
    crd = yaml.safe_load((DEPLOY / "crd-mcpserver.yaml").read_text())
    spec = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]
    assert set(spec) == {"type", "toolPrefix", "family", "description", "autoStart", "command", "args", "url", "env",
                         "headers", "auth", "timeout"}


def test_the_stdio_bridge_example_is_a_deployment_and_service_the_catalog_points_at() -> None:
    docs = {d["kind"]: d for d in yaml.safe_load_all((DEPLOY / "stdio-bridge.yaml").read_text())}
    container = docs["Deployment"]["spec"]["template"]["spec"]["containers"][0]
    assert container["args"][0] == "bridge" and "--" in container["args"]
    port = docs["Service"]["spec"]["ports"][0]["port"]
    service = f"{docs['Service']['metadata']['name']}.{docs['Service']['metadata']['namespace']}.svc"
    result = load_documents(list(docs["ConfigMap"]["data"].items()))
    assert not result.errors and [s.type for s in result.servers] == ["streamable-http"]
    assert result.servers[0].url == f"http://{service}:{port}/mcp"
