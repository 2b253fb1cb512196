"""Edge security through real Envoy: OAuth with a real OpenID provider (npm oidc-provider), the tool policy
on every path a call can take, audit lines, Prometheus counters, and no token in any log."""

from __future__ import annotations

import base64
import contextlib
import json
import re
import ssl
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx2
import pytest
from mcp.client.auth.extensions.client_credentials import ClientCredentialsOAuthProvider
from mcp.client.client import Client
from mcp.client.streamable_http import streamable_http_client
from mcp.shared.auth import OAuthClientInformationFull, OAuthToken

from tests.e2e.conftest import MODES
from tests.e2e.test_catalog_live import mcp_error
from tests.gateway_harness import Gateway, start_gateway
from tests.idp import Idp, forge_token, start_idp
from tests.procs import free_port, start_demo_server

MODERN = "2026-07-28"
ACCEPT = {"accept": "application/json, text/event-stream", "content-type": "application/json"}
FAMILY = {"name": "kubernetes", "instanceArg": "management_cluster"}

POLICY: dict[str, Any] = {
    "rules": [
        {"name": "sre-may-delete", "effect": "allow", "match": {"original": "kubectl_delete", "groups": ["sre"]}},
        {"name": "no-logs-for-auditors", "effect": "deny", "match": {"tool": "x_*_logs", "groups": ["auditors"]}},
        {"name": "auditors-read-only", "effect": "deny", "match": {"groups": ["auditors"], "readOnly": False}},
        {"name": "no-vendor-for-interns", "effect": "deny", "match": {"server": "vendor", "groups": ["interns"]}},
        {"name": "no-prometheus-family-for-interns", "effect": "deny",
         "match": {"family": "prometheus", "groups": ["interns"]}},
        {"name": "interns-reach-cluster-a-only", "effect": "deny",
         "match": {"server": "cluster-b-*", "groups": ["interns"]}},
        {"name": "no-echo-for-robot", "effect": "deny", "match": {"original": "echo", "subject": "robot"}},
        {"name": "admin-scope-may-toggle", "effect": "allow", "match": {"original": "toggle_beta",
                                                                          "scopes": ["mcp:admin"]}},
        {"name": "toggle-needs-admin", "effect": "deny", "match": {"original": "toggle_beta"}},
    ],
}


@dataclass
class Secured:
    gateway: Gateway
    idp: Idp
    tokens: dict[str, str]
    records: Path


def big_groups() -> list[str]:
    return [f"cn=group-{i:04d},ou=teams,ou=engineering,dc=corp,dc=example,dc=com" for i in range(800)]


@pytest.fixture(scope="module")
def secured(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Secured]:
    work = tmp_path_factory.mktemp("secured")
    listen = f"127.0.0.1:{free_port()}"
    resource = f"http://{listen}/mcp"
    short = f"http://{listen}/mcp-short-lived"
    clients = [
        {"client_id": "dev", "client_secret": "dev-secret", "claims": {"groups": ["dev"]}},
        {"client_id": "sre", "client_secret": "sre-secret", "claims": {"groups": ["sre"]}},
        {"client_id": "auditor", "client_secret": "a-secret", "claims": {"groups": ["auditors"]}},
        {"client_id": "intern", "client_secret": "i-secret", "claims": {"groups": ["interns"]}},
        {"client_id": "robot", "client_secret": "r-secret"},
        {"client_id": "admin", "client_secret": "ad-secret", "claims": {"groups": ["dev"]}},
        {"client_id": "big", "client_secret": "big-secret", "claims": {"groups": big_groups()}},
        {"client_id": "sdk", "client_secret": "sdk-secret", "claims": {"groups": ["dev"]}},
    ]
    resources = [{"audience": resource, "scope": "mcp:tools mcp:admin", "accessTokenTTL": 600},
                 {"audience": short, "scope": "mcp:tools", "accessTokenTTL": 1},
                 {"audience": "https://somewhere-else.example/mcp", "scope": "mcp:tools"}]
    records = work / "k8s.jsonl"
    with contextlib.ExitStack() as stack:
        idp = stack.enter_context(start_idp(work / "idp", clients=clients, resources=resources))
        k8s_a = stack.enter_context(start_demo_server("kubernetes", name="cluster-a-mcp-kubernetes",
                                                      record_headers=records))
        k8s_b = stack.enter_context(start_demo_server("kubernetes", name="cluster-b-mcp-kubernetes",
                                                      record_headers=records))
        prom = stack.enter_context(start_demo_server("prometheus", name="prometheus-a"))
        vendor = stack.enter_context(start_demo_server("vendor", name="vendor"))
        servers = {"cluster-a-mcp-kubernetes": {"url": k8s_a.url, "family": FAMILY},
                   "cluster-b-mcp-kubernetes": {"url": k8s_b.url, "family": FAMILY},
                   "prometheus-a": {"url": prom.url, "family": {"name": "prometheus", "instanceArg": "cluster"}},
                   "vendor": vendor.url}
        auth = {"issuer": idp.issuer, "jwksUri": idp.jwks_uri, "audiences": [resource, short],
                "resource": resource, "requiredScopes": ["mcp:tools"], "scopesSupported": ["mcp:tools", "mcp:admin"],
                "clockSkewSeconds": 1}
        gateway = stack.enter_context(start_gateway(work / "gw", servers, listen=listen, auth=auth, policy=POLICY,
                                                    listTtlFloorMs=600_000, audit=str(work / "audit.jsonl")))
        tokens = {c["client_id"]: idp.client_credentials(c["client_id"], c["client_secret"], resource=resource,
                                                         scope="mcp:tools")
                  for c in clients}
        tokens["admin"] = idp.client_credentials("admin", "ad-secret", resource=resource,
                                                 scope="mcp:tools mcp:admin")
        tokens["short"] = idp.client_credentials("dev", "dev-secret", resource=short, scope="mcp:tools")
        tokens["elsewhere"] = idp.client_credentials("dev", "dev-secret", resource="https://somewhere-else.example/mcp",
                                                     scope="mcp:tools")
        tokens["noscope"] = idp.client_credentials("dev", "dev-secret", resource=resource, scope="mcp:admin")
        yield Secured(gateway, idp, tokens, records)


@contextlib.asynccontextmanager
async def connect_as(url: str, token: str, mode: str, **headers: str) -> AsyncIterator[Client]:
    http = httpx2.AsyncClient(headers={"authorization": f"Bearer {token}", **headers}, timeout=30)
    try:
        async with Client(streamable_http_client(url, http_client=http), mode=mode) as client:
            yield client
    finally:
        await http.aclose()


async def names_as(secured: Secured, who: str, mode: str = MODERN, **headers: str) -> set[str]:
    async with connect_as(secured.gateway.url, secured.tokens[who], mode, **headers) as client:
        return {t.name for t in (await client.list_tools()).tools}


def tampered(token: str) -> str:
    head, payload, signature = token.split(".")
    claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    claims["sub"] = "someone-else"
    forged = base64.urlsafe_b64encode(json.dumps(claims).encode()).rstrip(b"=").decode()
    return f"{head}.{forged}.{signature}"


# ---- OAuth at the edge --------------------------------------------------------------------------------------

async def test_requests_without_a_valid_token_get_401_with_the_metadata_url(secured: Secured) -> None:
    gw = secured.gateway
    prm = f"{gw.url.rsplit('/mcp', 1)[0]}/.well-known/oauth-protected-resource/mcp"
    time.sleep(3)  # the 1-second token in tokens["short"] has expired (clock skew 1 s)
    cases = {
        "no token": None,
        "expired": secured.tokens["short"],
        "wrong audience": secured.tokens["elsewhere"],
        "tampered": tampered(secured.tokens["dev"]),
        "unknown key": forge_token({"iss": secured.idp.issuer, "sub": "dev", "aud": gw.url, "scope": "mcp:tools"}),
        "not a JWT": "opaque-token-value",
    }
    body = {"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {}}
    async with httpx2.AsyncClient(timeout=10) as http:
        for case, token in cases.items():
            headers = dict(ACCEPT)
            if token is not None:
                headers["authorization"] = f"Bearer {token}"
            resp = await http.post(gw.url, json=body, headers=headers)
            assert resp.status_code == 401, (case, resp.status_code, resp.text)
            assert resp.json()["error"]["message"].startswith("Unauthorized: "), (case, resp.text)
            challenge = resp.headers["www-authenticate"]
            assert f'resource_metadata="{prm}"' in challenge, (case, challenge)
            assert 'scope="mcp:tools"' in challenge
            assert ('error="invalid_token"' in challenge) == (token is not None), (case, challenge)


async def test_protected_resource_metadata_is_served_at_both_paths(secured: Secured) -> None:
    base = secured.gateway.url.rsplit("/mcp", 1)[0]
    async with httpx2.AsyncClient(timeout=10) as http:
        for path in ("/.well-known/oauth-protected-resource", "/.well-known/oauth-protected-resource/mcp"):
            resp = await http.get(base + path)
            assert resp.status_code == 200 and resp.headers["content-type"] == "application/json"
            doc = resp.json()
            assert doc["resource"] == secured.gateway.url
            assert doc["authorization_servers"] == [secured.idp.issuer]
            assert doc["scopes_supported"] == ["mcp:tools", "mcp:admin"]


async def test_a_token_without_the_required_scope_gets_403_insufficient_scope(secured: Secured) -> None:
    async with httpx2.AsyncClient(timeout=10) as http:
        resp = await http.post(secured.gateway.url, json={"jsonrpc": "2.0", "id": 1, "method": "initialize"},
                               headers={**ACCEPT, "authorization": f"Bearer {secured.tokens['noscope']}"})
    assert resp.status_code == 403
    challenge = resp.headers["www-authenticate"]
    assert 'error="insufficient_scope"' in challenge and 'scope="mcp:tools"' in challenge
    assert "resource_metadata=" in challenge


@pytest.mark.parametrize("mode", MODES)
async def test_a_valid_token_gets_in_in_both_eras(secured: Secured, mode: str) -> None:
    assert "x_kubernetes_whoami" in await names_as(secured, "dev", mode)


async def test_a_50kb_token_with_hundreds_of_groups_is_accepted(secured: Secured) -> None:
    token = secured.tokens["big"]
    assert len(token) > 40_000
    assert "x_kubernetes_whoami" in await names_as(secured, "big")


class _Memory:
    def __init__(self) -> None:
        self.tokens: OAuthToken | None = None
        self.client_info: OAuthClientInformationFull | None = None

    async def get_tokens(self) -> OAuthToken | None:
        return self.tokens

    async def set_tokens(self, tokens: OAuthToken) -> None:
        self.tokens = tokens

    async def get_client_info(self) -> OAuthClientInformationFull | None:
        return self.client_info

    async def set_client_info(self, client_info: OAuthClientInformationFull) -> None:
        self.client_info = client_info


@pytest.mark.filterwarnings("ignore::mcp.shared.exceptions.MCPDeprecationWarning")
async def test_the_sdk_client_credentials_provider_discovers_the_idp_and_gets_in(secured: Secured) -> None:
    """From the 401: RFC 9728 metadata, RFC 8414 metadata of the IdP, client_credentials with the resource.
    No `issuer` is given on purpose: the provider must find it from the gateway's metadata (the SDK warns)."""
    secured.idp.reset_counters()
    auth = ClientCredentialsOAuthProvider(server_url=secured.gateway.url, storage=_Memory(), client_id="sdk",
                                          client_secret="sdk-secret", scope="mcp:tools")
    http = httpx2.AsyncClient(auth=auth, timeout=30)
    try:
        async with Client(streamable_http_client(secured.gateway.url, http_client=http), mode=MODERN) as client:
            tools = {t.name for t in (await client.list_tools()).tools}
    finally:
        await http.aclose()
    assert "x_kubernetes_whoami" in tools
    assert any(r["grant_type"] == "client_credentials" and r["resource"] == secured.gateway.url
               for r in secured.idp.recent_requests())


# ---- the tool policy ----------------------------------------------------------------------------------------

async def test_the_default_deny_set_hides_destructive_tools_and_a_group_rule_allows_them(secured: Secured) -> None:
    dev = await names_as(secured, "dev")
    sre = await names_as(secured, "sre")
    assert "x_kubernetes_kubectl_delete" not in dev
    assert "x_kubernetes_kubectl_delete" in sre
    async with connect_as(secured.gateway.url, secured.tokens["sre"], MODERN) as client:
        result = await client.call_tool("x_kubernetes_kubectl_delete", {
            "management_cluster": "cluster-a-mcp-kubernetes", "kind": "pod", "name": "web-1"})
    assert "deleted" in result.content[0].text  # type: ignore[union-attr]


@pytest.mark.parametrize(("who", "hidden", "visible"), [
    ("auditor", {"x_kubernetes_logs", "x_vendor_toggle_beta", "x_kubernetes_kubectl_delete"},
     {"x_kubernetes_get_pods", "x_vendor_echo"}),
    ("intern", {"x_vendor_echo", "x_vendor_whoami", "x_prometheus_query"}, {"x_kubernetes_get_pods"}),
    ("robot", {"x_vendor_echo"}, {"x_vendor_whoami"}),
    ("dev", {"x_vendor_toggle_beta"}, {"x_vendor_echo", "x_kubernetes_logs"}),
    ("admin", set(), {"x_vendor_toggle_beta"}),
], ids=["exposed-glob-and-annotations", "server-and-family", "subject", "default", "scope"])
async def test_each_rule_kind(secured: Secured, who: str, hidden: set[str], visible: set[str]) -> None:
    names = await names_as(secured, who)
    assert not hidden & names, hidden & names
    assert visible <= names, visible - names


async def test_the_toolset_header_only_narrows(secured: Secured) -> None:
    full = await names_as(secured, "sre")
    read_only = await names_as(secured, "sre", **{"x-muster-toolset": "read-only"})
    none = await names_as(secured, "sre", **{"x-muster-toolset": "none"})
    assert "x_kubernetes_kubectl_delete" in full
    assert read_only == full - {"x_kubernetes_kubectl_delete"} and "x_vendor_echo" in read_only
    assert none == set()
    dev = await names_as(secured, "dev")
    widened = await names_as(secured, "dev", **{"x-muster-toolset": "full"})
    assert widened == dev and "x_kubernetes_kubectl_delete" not in widened
    with pytest.raises(BaseException) as caught:
        async with connect_as(secured.gateway.url, secured.tokens["sre"], MODERN,
                              **{"x-muster-toolset": "read-only"}) as client:
            await client.call_tool("x_kubernetes_kubectl_delete", DELETE_ARGS)
    err = mcp_error(caught.value)
    assert err is not None and err.code == -32602
    async with httpx2.AsyncClient(timeout=10) as http:
        resp = await http.post(secured.gateway.url, json={"jsonrpc": "2.0", "id": 1, "method": "initialize"},
                               headers={**ACCEPT, "authorization": f"Bearer {secured.tokens['dev']}",
                                        "x-muster-toolset": "everything"})
    assert resp.status_code == 400 and "Unknown toolset" in resp.text


def _raw_call(name_json: str, args: dict[str, Any]) -> bytes:
    meta = {"io.modelcontextprotocol/protocolVersion": MODERN, "io.modelcontextprotocol/clientCapabilities": {}}
    return (f'{{"jsonrpc":"2.0","id":7,"method":"tools/call","params":{{"name":{name_json},'
            f'"arguments":{json.dumps(args)},"_meta":{json.dumps(meta)}}}}}').encode()


DELETE_ARGS = {"management_cluster": "cluster-a-mcp-kubernetes", "kind": "pod", "name": "web-1"}
BYPASSES = [
    ("letter case", '"X_KUBERNETES_KUBECTL_DELETE"', "X_KUBERNETES_KUBECTL_DELETE", 400, -32602),
    ("json escapes", '"\\u0078_kubernetes_kubectl_\\u0064elete"', "x_kubernetes_kubectl_delete", 400, -32602),
    ("duplicate name keys", '"x_kubernetes_kubectl_delete","name":"x_kubernetes_kubectl_delete"',
     "x_kubernetes_kubectl_delete", 400, -32602),
    ("other instance", '"x_kubernetes_kubectl_delete"', "x_kubernetes_kubectl_delete", 400, -32602),
    ("Mcp-Name disagrees", '"x_kubernetes_kubectl_delete"', "x_kubernetes_whoami", 400, -32020),
]


@pytest.mark.parametrize(("case", "name_json", "header_name", "status", "code"), BYPASSES,
                         ids=[b[0] for b in BYPASSES])
async def test_a_denied_tool_cannot_be_called_by_any_form(secured: Secured, case: str, name_json: str,
                                                          header_name: str, status: int, code: int) -> None:
    args = dict(DELETE_ARGS)
    if case == "other instance":
        args["management_cluster"] = "cluster-b"
    body = _raw_call(name_json, args)
    headers = {**ACCEPT, "authorization": f"Bearer {secured.tokens['dev']}", "mcp-protocol-version": MODERN,
               "mcp-method": "tools/call", "mcp-name": header_name,
               "mcp-param-management-cluster": args["management_cluster"]}
    before = deletes_upstream(secured)
    async with httpx2.AsyncClient(timeout=10) as http:
        resp = await http.post(secured.gateway.url, content=body, headers=headers)
        batch = await http.post(secured.gateway.url, content=b"[" + body + b"]", headers=headers)
    assert resp.status_code == status, resp.text
    assert resp.json()["error"]["code"] == code
    if code == -32602:
        assert resp.json()["error"]["message"] == f"Unknown tool: {header_name}"
    assert batch.status_code == 400 and batch.json()["error"]["code"] == -32600
    assert deletes_upstream(secured) == before


def deletes_upstream(secured: Secured) -> int:
    """How many kubectl_delete calls the upstreams have received so far."""
    records = [json.loads(line) for line in secured.records.read_text().splitlines()]
    return sum(1 for r in records if (r.get("body") or {}).get("method") == "tools/call"
               and r["body"]["params"]["name"] == "kubectl_delete")


async def test_a_duplicate_name_key_forwards_only_what_was_checked(secured: Secured) -> None:
    """Last key wins at the gateway, and the upstream gets the re-serialised body: the same name."""
    body = _raw_call('"x_kubernetes_kubectl_delete","name":"x_kubernetes_whoami"',
                     {"management_cluster": "cluster-a-mcp-kubernetes"})
    headers = {**ACCEPT, "authorization": f"Bearer {secured.tokens['dev']}", "mcp-protocol-version": MODERN,
               "mcp-method": "tools/call", "mcp-name": "x_kubernetes_whoami",
               "mcp-param-management-cluster": "cluster-a-mcp-kubernetes"}
    before = len(secured.records.read_text().splitlines())
    async with httpx2.AsyncClient(timeout=10) as http:
        resp = await http.post(secured.gateway.url, content=body, headers=headers)
    assert resp.status_code == 200 and "cluster-a-mcp-kubernetes" in resp.text
    new = [json.loads(line) for line in secured.records.read_text().splitlines()[before:]]
    calls = [r["body"] for r in new if (r.get("body") or {}).get("method") == "tools/call"]
    assert [c["params"]["name"] for c in calls] == ["whoami"]
    assert all(b'"name":"kubectl_delete"' not in json.dumps(r["body"]).encode() for r in new if r.get("body"))


@pytest.mark.parametrize("mode", MODES)
async def test_two_callers_with_different_reach_see_different_enums_and_cannot_cross(secured: Secured,
                                                                                     mode: str) -> None:
    """Family membership is per caller: the enum, the list and routing come from the caller's own view."""
    async def enum(who: str) -> list[str]:
        async with connect_as(secured.gateway.url, secured.tokens[who], mode) as client:
            tools = {t.name: t for t in (await client.list_tools()).tools}
        return list(tools["x_kubernetes_whoami"].input_schema["properties"]["management_cluster"]["enum"])

    assert await enum("dev") == ["cluster-a-mcp-kubernetes", "cluster-b-mcp-kubernetes"]
    assert await enum("intern") == ["cluster-a-mcp-kubernetes"]
    async with connect_as(secured.gateway.url, secured.tokens["dev"], mode) as client:
        result = await client.call_tool("x_kubernetes_whoami", {"management_cluster": "cluster-b"})
    assert json.loads(result.content[0].text) == {"server": "cluster-b-mcp-kubernetes"}  # type: ignore[union-attr]
    before = deletes_upstream(secured), whoami_calls(secured)
    async with connect_as(secured.gateway.url, secured.tokens["intern"], mode) as client:
        refused = await client.call_tool("x_kubernetes_whoami", {"management_cluster": "cluster-b-mcp-kubernetes"})
    # an argument problem is a tool result the model reads (isError), listing only what this caller may use
    assert refused.is_error is True and refused.structured_content == {"available": ["cluster-a-mcp-kubernetes"]}
    assert "(available: cluster-a-mcp-kubernetes)" in refused.content[0].text  # type: ignore[union-attr]
    assert (deletes_upstream(secured), whoami_calls(secured)) == before


def whoami_calls(secured: Secured) -> int:
    """whoami calls received so far by either kubernetes member (they share one record file)."""
    records = [json.loads(line) for line in secured.records.read_text().splitlines()]
    return sum(1 for r in records if (r.get("body") or {}).get("method") == "tools/call"
               and r["body"]["params"]["name"] == "whoami")


# ---- audit, counters, and no token in a log -----------------------------------------------------------------

async def test_every_call_decision_is_one_audit_line_and_a_counter(secured: Secured) -> None:
    async with connect_as(secured.gateway.url, secured.tokens["dev"], MODERN) as client:
        await client.call_tool("x_vendor_echo", {"text": "audited"})
        with pytest.raises(BaseException) as caught:
            await client.call_tool("x_kubernetes_kubectl_delete", DELETE_ARGS)
    err = mcp_error(caught.value)
    assert err is not None and err.code == -32602
    lines = [json.loads(m.group(1)) for m in re.finditer(r"muster_edge\.audit: (\{.*\})", secured.gateway.log())]
    assert {"event": "tools/call", "subject": "dev", "tool": "x_vendor_echo", "upstream_tool": "echo",
            "server": "vendor", "decision": "allow", "rule": "default", "toolset": "full"} in lines
    assert any(line["tool"] == "x_kubernetes_kubectl_delete" and line["decision"] == "deny"
               and line["rule"] == "default-deny" and line["subject"] == "dev" for line in lines)
    audit_file = secured.gateway.config_path.parent.parent / "audit.jsonl"
    in_file = [json.loads(line) for line in audit_file.read_text().splitlines()]
    assert in_file == lines
    async with httpx2.AsyncClient(timeout=5) as http:
        metrics = (await http.get(secured.gateway.status_url.replace("/status", "/metrics"))).text
    assert re.search(r'muster_edge_policy_decisions_total\{decision="deny",rule="default-deny",'
                     r'server="cluster-a-mcp-kubernetes"\} [1-9]', metrics), metrics
    assert re.search(r'muster_edge_policy_decisions_total\{decision="allow",rule="default",server="vendor"\} [1-9]',
                     metrics)


def test_no_token_appears_in_any_log(secured: Secured) -> None:
    logs = secured.gateway.log() + "".join(p.read_text(errors="replace") for p in
                                           secured.gateway.log_path.parent.parent.rglob("*.log"))
    for who, token in secured.tokens.items():
        assert token not in logs, who
        assert token.split(".")[2][:40] not in logs, who


async def test_https_and_the_loopback_listener_enforce_oauth_alike(tmp_path: Path) -> None:
    from extproc.selfsigned import ensure_self_signed

    cert, key = tmp_path / "tls" / "cert.pem", tmp_path / "tls" / "key.pem"
    assert ensure_self_signed(str(cert), str(key))
    tls_port = free_port()
    resource = f"https://localhost:{tls_port}/mcp"
    with contextlib.ExitStack() as stack:
        idp = stack.enter_context(start_idp(tmp_path / "idp", resources=[{"audience": resource, "scope": "mcp:tools"}],
                                            clients=[{"client_id": "dev", "client_secret": "s"}]))
        k8s = stack.enter_context(start_demo_server("kubernetes", name="kubernetes"))
        gw = stack.enter_context(start_gateway(
            tmp_path / "gw", {"kubernetes": k8s.url},
            tls={"listen": f"127.0.0.1:{tls_port}", "certFile": str(cert), "keyFile": str(key)},
            auth={"issuer": idp.issuer, "jwksUri": idp.jwks_uri, "resource": resource}))
        token = idp.client_credentials("dev", "s", resource=resource)
        init = {"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {}}
        trust = ssl.create_default_context(cafile=str(cert))
        async with httpx2.AsyncClient(verify=trust, timeout=10) as http:
            for url in (resource, gw.url):
                anonymous = await http.post(url, json=init, headers=ACCEPT)
                assert anonymous.status_code == 401, url
                assert f'resource_metadata="https://localhost:{tls_port}/.well-known/oauth-protected-resource/mcp"' \
                    in anonymous.headers["www-authenticate"]
                ok = await http.post(url, json=init, headers={**ACCEPT, "authorization": f"Bearer {token}"})
                assert ok.status_code == 200 and "mcp-session-id" in ok.headers, url
            metadata = await http.get(f"https://localhost:{tls_port}/.well-known/oauth-protected-resource/mcp")
        assert metadata.json()["resource"] == resource
        http_client = httpx2.AsyncClient(verify=trust, headers={"authorization": f"Bearer {token}"})
        try:
            async with Client(streamable_http_client(resource, http_client=http_client), mode=MODERN) as client:
                assert "x_kubernetes_whoami" in {t.name for t in (await client.list_tools()).tools}
        finally:
            await http_client.aclose()
