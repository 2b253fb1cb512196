"""Issue 13 item 1: Prometheus metrics through the real Envoy and two processor workers.

Routed calls are timed by Envoy (its gRPC access log to the processor), the processor times its own messages,
fan-outs and token exchanges; one scrape (/metrics/all) covers both workers. No label value ever carries a
subject, a token or a tool argument, and the Grafana dashboard in deploy/ names only series the gateway serves.
"""

from __future__ import annotations

import contextlib
import json
import re
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass

import httpx2
import pytest

from tests.e2e.test_gateway import modern_body, modern_headers
from tests.gateway_harness import Gateway, start_gateway
from tests.idp import GRANT_TOKEN_EXCHANGE, Idp, start_idp
from tests.procs import ROOT, free_port, start_demo_server

SUBJECT = "metrics-subject-5e1a9c"
SECRET_ARG = "metrics-arg-77c0d4"
DASHBOARD = ROOT / "deploy" / "grafana" / "muster-edge.json"
_SAMPLE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)$')
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')


@dataclass
class Sample:
    name: str
    labels: dict[str, str]
    value: float


@dataclass
class Metered:
    gateway: Gateway
    idp: Idp
    token: str
    first_status_port: int


def parse(text: str) -> list[Sample]:
    out = []
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        match = _SAMPLE.match(line)
        assert match, f"not an exposition line: {line!r}"
        out.append(Sample(match[1], dict(_LABEL.findall(match[2] or "")), float(match[3])))
    return out


def families(text: str) -> dict[str, str]:
    """Family name -> type, from the # TYPE lines."""
    return {parts[2]: parts[3] for line in text.splitlines()
            if line.startswith("# TYPE ") and len(parts := line.split(" ")) == 4}


def scrape(port: int, path: str = "/metrics/all") -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as resp:
        return str(resp.read().decode())


def total(samples: list[Sample], name: str, **labels: str) -> float:
    return sum(s.value for s in samples if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()))


@pytest.fixture(scope="module")
def metered(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Metered]:
    work = tmp_path_factory.mktemp("metrics")
    listen = f"127.0.0.1:{free_port()}"
    resource = f"http://{listen}/mcp"
    exchange_port = free_port()
    exchange_url = f"http://127.0.0.1:{exchange_port}/mcp"
    clients = [{"client_id": SUBJECT, "client_secret": "s-secret", "claims": {"groups": ["dev"]}},
               {"client_id": "exchanger", "client_secret": "exchanger-secret",
                "grant_types": ["client_credentials", GRANT_TOKEN_EXCHANGE]}]
    resources = [{"audience": resource, "scope": "mcp:tools", "accessTokenTTL": 600},
                 {"audience": exchange_url, "scope": "mcp:tools", "accessTokenTTL": 600}]
    creds = work / "secrets" / "default" / "exchanger-creds"
    creds.mkdir(parents=True)
    (creds / "client-id").write_text("exchanger\n")
    (creds / "client-secret").write_text("exchanger-secret\n")
    with contextlib.ExitStack() as stack:
        idp = stack.enter_context(start_idp(work / "idp", clients=clients, resources=resources, token_exchange=True))
        kube = stack.enter_context(start_demo_server("kubernetes", name="kubernetes"))
        stack.enter_context(start_demo_server("prometheus", port=exchange_port, name="exchanged",
                                              require_jwt=idp.issuer, audience=exchange_url))
        servers = {
            "kubernetes": kube.url,
            "exchanged": {"url": exchange_url, "auth": {"tokenExchange": {
                "enabled": True, "dexTokenEndpoint": idp.token_endpoint, "connectorId": "central-dex",
                "expectedIssuer": idp.issuer, "audience": exchange_url, "scopes": "mcp:tools",
                "clientCredentialsSecretRef": {"name": "exchanger-creds"}}}},
        }
        gw = stack.enter_context(start_gateway(
            work / "gw", servers, listen=listen, processor={"workers": 2}, listTtlFloorMs=600_000,
            secretsDir=str(work / "secrets"), auth={"issuer": idp.issuer, "jwksUri": idp.jwks_uri,
                                                     "resource": resource}))
        gw.write_manifest("workflows.yaml", [{
            "apiVersion": "muster.giantswarm.io/v1alpha1", "kind": "Workflow", "metadata": {"name": "pods"},
            "spec": {"args": {"ns": {"type": "string", "default": "default"}},
                     "steps": [{"id": "p", "tool": "x_kubernetes_get_pods",
                                "args": {"namespace": "{{ .input.ns }}"}}]}}])
        token = idp.client_credentials(SUBJECT, "s-secret", resource=resource, scope="mcp:tools")
        port = int(gw.status_url.rsplit(":", 1)[1].split("/")[0])
        yield Metered(gw, idp, token, port)


def _call(http: httpx2.Client, gw: Gateway, token: str, tool: str, arguments: dict[str, str], msg_id: int) -> None:
    resp = http.post(gw.url, json=modern_body("tools/call", {"name": tool, "arguments": arguments}, msg_id),
                     headers=modern_headers("tools/call", tool, authorization=f"Bearer {token}"))
    assert resp.status_code == 200, resp.text


@pytest.mark.timeout(180)
def test_histograms_appear_with_bounded_labels_across_workers(metered: Metered) -> None:
    gw, token = metered.gateway, metered.token
    gw.wait_for(lambda: (gw.server_state("kubernetes") or {}).get("state") == "Connected", 30, "kubernetes connected")
    calls = 40
    with httpx2.Client(timeout=30) as http:
        for i in range(calls):
            _call(http, gw, token, "x_kubernetes_get_pods", {"namespace": SECRET_ARG}, i + 1)
        _call(http, gw, token, "x_exchanged_query", {"promql": SECRET_ARG}, 1000)
        for i in range(8):  # both workers: each renders the page once, then serves it
            resp = http.post(gw.url, json=modern_body("tools/list", {}, 2000 + i),
                             headers=modern_headers("tools/list", authorization=f"Bearer {token}"))
            assert resp.status_code == 200, resp.text
        def workflow_ran() -> bool:
            resp = http.post(gw.url, json=modern_body("tools/call", {"name": "workflow_pods",
                                                                     "arguments": {"ns": SECRET_ARG}}, 4000),
                             headers=modern_headers("tools/call", "workflow_pods", authorization=f"Bearer {token}"))
            return resp.status_code == 200 and "result" in resp.json() and not resp.json()["result"].get("isError")

        gw.wait_for(workflow_ran, 15, "the workflow to run")
        # an unknown method: counted, but its name never becomes a label value
        http.post(gw.url, json=modern_body(f"x/{SECRET_ARG}", {}, 3000),
                  headers=modern_headers(f"x/{SECRET_ARG}", authorization=f"Bearer {token}"))

    def calls_seen() -> bool:
        samples = parse(scrape(metered.first_status_port))
        return total(samples, "muster_edge_call_duration_seconds_count", server="kubernetes",
                     method="tools/call", outcome="ok") >= calls and \
            total(samples, "muster_edge_call_duration_seconds_count", server="exchanged", method="tools/call") >= 1

    # Envoy flushes its access log every second
    gw.wait_for(calls_seen, 20, "the routed calls in the call histogram")
    text = scrape(metered.first_status_port)
    samples = parse(text)
    assert {s.labels["worker"] for s in samples if s.name == "muster_edge_worker_up" and s.value == 1} == {"0", "1"}
    # every sample says which worker it came from; both workers processed messages
    assert all("worker" in s.labels for s in samples)
    workers = {s.labels["worker"] for s in samples
               if s.name == "muster_edge_processor_message_seconds_count" and s.labels.get("kind") == "request_body"
               and s.value > 0}
    assert workers == {"0", "1"}, workers
    for name in ("muster_edge_call_upstream_seconds_count", "muster_edge_call_gateway_seconds_count"):
        assert total(samples, name, server="kubernetes", method="tools/call") >= calls, name
    buckets = [s for s in samples if s.name == "muster_edge_call_duration_seconds_bucket"
               and s.labels.get("server") == "kubernetes"]
    assert buckets and {"le", "server", "method", "outcome", "worker"} == set(buckets[0].labels)
    assert total(samples, "muster_edge_token_exchange_seconds_count", server="exchanged", outcome="ok") >= 1
    assert total(samples, "muster_edge_fanout_seconds_count", server="kubernetes", outcome="ok") >= 1
    assert total(samples, "muster_edge_list_cache_seconds_count", list="tools", result="hit") >= 1
    assert total(samples, "muster_edge_list_cache_seconds_count", list="tools", result="miss") >= 1
    assert any(s.name == "muster_edge_list_cache_age_seconds" and s.labels["server"] == "kubernetes"
               for s in samples)
    assert total(samples, "muster_edge_workflow_execution_seconds_count", workflow="pods", status="completed") >= 1
    assert any(s.name == "muster_edge_listening_clients" for s in samples)
    assert any(s.name == "muster_edge_sessions_live" for s in samples)
    # the original counters keep their names
    assert total(samples, "muster_edge_requests_total", method="tools/call", outcome="routed") >= calls
    assert total(samples, "muster_edge_requests_total", method="other") >= 1
    # bounded labels: servers from the catalog, known methods, fixed outcomes and kinds
    allowed = {"server": {"kubernetes", "exchanged", "other", "", "muster-edge"},  # the last: edge tools (config)
               "outcome": {"ok", "error", "refused", "unavailable", "timeout", "cancelled", "failed", "routed",
                           "answered"},
               "worker": {"0", "1"}}
    for s in samples:
        for key, values in allowed.items():
            if key in s.labels and not s.name.startswith("muster_edge_upstream_sessions"):
                assert s.labels[key] in values, (s.name, key, s.labels[key])
    # nothing the caller sent or is appears anywhere in the scrape, nor in a single worker's
    for whole in (text, scrape(metered.first_status_port, "/metrics"), scrape(metered.first_status_port + 1,
                                                                               "/metrics")):
        for secret in (SUBJECT, SECRET_ARG, token, token[-40:]):
            assert secret not in whole


def test_the_dashboard_parses_and_names_only_series_that_exist(metered: Metered) -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    text = scrape(metered.first_status_port)
    kinds = families(text)
    exist = {s.name for s in parse(text)} | set(kinds)
    for family, kind in kinds.items():
        if kind == "histogram":
            exist |= {f"{family}_bucket", f"{family}_count", f"{family}_sum"}
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    assert len(exprs) >= 5
    named = {n for e in exprs for n in re.findall(r"\b(muster_edge_[a-z_]+)", e)}
    assert named and named <= exist, sorted(named - exist)
    # the five alert panels come first and are named so
    assert [p["title"].split(" - ")[0] for p in dashboard["panels"][:5]] == [f"ALERT {i}" for i in range(1, 6)]
