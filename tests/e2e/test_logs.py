"""`logFormat: json`: every line the gateway writes (supervisor, processor workers, Envoy) is one JSON object,
correlated by Envoy's x-request-id, and no token, secret or tool argument ever appears in one."""

from __future__ import annotations

import json
import socket
from pathlib import Path
from typing import Any

import httpx2
import pytest

from tests.e2e.test_gateway import modern_body, modern_headers
from tests.e2e.test_transports import sdk_stdio
from tests.gateway_harness import start_gateway
from tests.procs import free_port, start_demo_server

SECRET_ARG = "arg-secret-6f1d2c"
SECRET_HEADER = "static-secret-93ab7e"
CALLER_TOKEN = "caller-token-b4e8a1"


def _lines(text: str) -> list[dict[str, Any]]:
    out = []
    for line in text.splitlines():
        if line.strip():
            out.append(json.loads(line))  # every line parses, or the test fails here naming it
    return out


@pytest.mark.timeout(120)
def test_json_logs_parse_line_by_line_and_hold_no_secret(tmp_path: Path) -> None:
    secrets = tmp_path / "secrets"
    secrets.mkdir()
    (secrets / "vendor-key").write_text(SECRET_HEADER)
    bridge_port = free_port()
    with start_demo_server("kubernetes", name="kubernetes") as kube, \
            start_demo_server("vendor", name="vendor", era="legacy") as vendor, \
            start_gateway(tmp_path, {"kubernetes": kube.url,
                                     "vendor": {"url": vendor.url,
                                                "headers": {"X-Api-Key": f"${{file:{secrets / 'vendor-key'}}}"}},
                                     "down": "http://127.0.0.1:1/mcp", "local": sdk_stdio()},
                          logFormat="json", secretsDir="./secrets",
                          bridges={"listen": f"127.0.0.1:{bridge_port}"}) as gw:
        request_id = "req-7c2f0e1d"
        with httpx2.Client(timeout=30) as http:
            gw.wait_for(lambda: any(s["name"] == "kubernetes" and s["state"] == "Connected"
                                    for s in gw.status()["servers"]), what="kubernetes connected")
            call = modern_body("tools/call", {"name": "x_kubernetes_get_pods",
                                              "arguments": {"namespace": SECRET_ARG}})
            resp = http.post(gw.url, json=call, headers=modern_headers(
                "tools/call", "x_kubernetes_get_pods", **{"x-request-id": request_id,
                                                          "authorization": f"Bearer {CALLER_TOKEN}"}))
            assert resp.status_code == 200, resp.text
            denied = modern_body("tools/call", {"name": "x_kubernetes_kubectl_delete",
                                                "arguments": {"kind": "pod", "name": SECRET_ARG}})
            http.post(gw.url, json=denied, headers=modern_headers("tools/call", "x_kubernetes_kubectl_delete"))
        gw.wait_for(lambda: '"event":"tools/call"' in gw.log() and "x_kubernetes_kubectl_delete" in gw.log(),
                    what="audit lines")
        # the bridge's HTTP server (uvicorn) logs in the same shape: a request it cannot parse makes it warn
        gw.wait_for(lambda: gw.server_state("local")["state"] == "Connected", what="the stdio server")
        with socket.create_connection(("127.0.0.1", bridge_port), timeout=5) as sock:
            sock.sendall(b"NOT HTTP\r\n\r\n")
            sock.recv(1024)
        gw.wait_for(lambda: '"logger":"uvicorn.error"' in gw.log(), what="the bridge's warning")
    text = gw.log()
    lines = _lines(text)
    assert lines, "the gateway wrote no log line"
    for line in lines:
        assert {"time", "level", "logger", "message"} <= set(line), line
    loggers = {line["logger"] for line in lines}
    assert any(name.startswith("extproc") for name in loggers), loggers
    audits = [line for line in lines if line["logger"] == "muster_edge.audit"]
    call_audit = next(a for a in audits if a.get("tool") == "x_kubernetes_get_pods")
    assert call_audit["decision"] == "allow" and call_audit["server"] == "kubernetes"
    assert call_audit["request_id"] == request_id  # correlated with Envoy's x-request-id
    assert call_audit["method"] == "tools/call"
    assert any(a.get("decision") == "deny" for a in audits)
    assert not any(line["level"] == "error" and line["logger"] == "extproc.fleet" and "vendor" in line["message"]
                   for line in lines), "the static header was not read"
    assert any(line["logger"].startswith("envoy.") for line in lines)  # Envoy's own lines, same shape
    for secret in (SECRET_ARG, SECRET_HEADER, CALLER_TOKEN):
        assert secret not in text, f"{secret} leaked into the log"


@pytest.mark.timeout(120)
def test_audit_volume_denied_writes_only_refusals_and_still_counts_every_decision(tmp_path: Path) -> None:
    with start_demo_server("kubernetes", name="kubernetes") as kube, \
            start_gateway(tmp_path, {"kubernetes": kube.url}, logFormat="json", auditVolume="denied") as gw:
        gw.wait_for(lambda: any(s["name"] == "kubernetes" and s["state"] == "Connected"
                                for s in gw.status()["servers"]), what="kubernetes connected")
        with httpx2.Client(timeout=30) as http:
            for name, arguments in (("x_kubernetes_get_pods", {"namespace": "a"}),
                                    ("x_kubernetes_kubectl_delete", {"kind": "pod", "name": "p"}),
                                    ("x_kubernetes_get_pods", {"namespace": "b"})):
                http.post(gw.url, json=modern_body("tools/call", {"name": name, "arguments": arguments}),
                          headers=modern_headers("tools/call", name))
        gw.wait_for(lambda: "x_kubernetes_kubectl_delete" in gw.log(), what="the refusal's audit line")
        host, port = gw.config["processor"]["status"].rsplit(":", 1)
        metrics = httpx2.get(f"http://{host}:{port}/metrics/all", timeout=5).text
    audits = [line for line in _lines(gw.log()) if line["logger"] == "muster_edge.audit"]
    assert [(a["decision"], a.get("tool")) for a in audits] == [("deny", "x_kubernetes_kubectl_delete")], audits
    counted = sum(float(line.rsplit(" ", 1)[1]) for line in metrics.splitlines()
                  if line.startswith("muster_edge_policy_decisions_total{"))
    assert counted == 3, [line for line in metrics.splitlines() if "policy_decisions" in line]
