"""Upstream credentials end to end: the caller's bearer is swapped for what each upstream accepts.

A real OpenID provider (npm oidc-provider, with an RFC 8693 grant) issues the callers' tokens and exchanged
tokens; the upstreams are real MCP servers that validate tokens on their own (signature from the provider's
JWKS, issuer, audience) or demand a static bearer. What each upstream received is read from its own log of
request headers.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx2
import pytest
from mcp.client.client import Client
from mcp.client.streamable_http import streamable_http_client

from tests.e2e.test_catalog_live import mcp_error
from tests.gateway_harness import MUSTER_EDGE, Gateway, manifest, start_gateway
from tests.idp import GRANT_TOKEN_EXCHANGE, Idp, start_idp
from tests.procs import free_port, start_demo_server

MODERN = "2026-07-28"
USERS = ("alice", "bob", "carol", "dave", "eve", "frank")
ENV_TOKEN = "env-bearer-value"


@dataclass
class Creds:
    gateway: Gateway
    idp: Idp
    tokens: dict[str, str]
    records: dict[str, Path]
    urls: dict[str, str]


def jwt_claims(token: str) -> dict[str, Any]:
    payload = token.split(".")[1]
    return dict(json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4))))


@pytest.fixture(scope="module")
def creds(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Creds]:
    work = tmp_path_factory.mktemp("creds")
    listen = f"127.0.0.1:{free_port()}"
    resource = f"http://{listen}/mcp"
    ports = {name: free_port() for name in ("exchange", "revoking", "oauth")}
    urls = {name: f"http://127.0.0.1:{port}/mcp" for name, port in ports.items()}
    records = {name: work / f"{name}.jsonl" for name in ("static", "env", "forward", "exchange", "revoking", "oauth")}
    clients: list[dict[str, Any]] = [{"client_id": u, "client_secret": f"{u}-secret", "claims": {"groups": ["dev"]}}
                                     for u in USERS]
    clients += [{"client_id": "exchanger", "client_secret": "exchanger-secret",
                 "grant_types": ["client_credentials", GRANT_TOKEN_EXCHANGE]},
                {"client_id": "muster-edge", "client_secret": "oauth-client-secret",
                 "grant_types": ["authorization_code", "refresh_token"],
                 "redirect_uris": [f"http://{listen}/oauth/callback"],
                 "scope": "openid offline_access mcp:tools"},
                {"client_id": "muster-edge-login", "client_secret": "edge-login-secret",
                 "grant_types": ["authorization_code"], "redirect_uris": [f"http://{listen}/oauth/callback"],
                 "scope": "openid"}]
    resources = [{"audience": resource, "scope": "mcp:tools", "accessTokenTTL": 600},
                 {"audience": urls["exchange"], "scope": "mcp:tools", "accessTokenTTL": 8},
                 {"audience": urls["revoking"], "scope": "mcp:tools", "accessTokenTTL": 600},
                 {"audience": urls["oauth"], "scope": "mcp:tools", "accessTokenTTL": 33}]
    secrets = work / "secrets" / "default" / "exchanger-creds"
    secrets.mkdir(parents=True)
    (secrets / "client-id").write_text("exchanger\n")
    (secrets / "client-secret").write_text("exchanger-secret\n")
    (work / "static-token").write_text("static-bearer-value\n")
    (work / "oauth-client-secret").write_text("oauth-client-secret")
    (work / "edge-login-secret").write_text("edge-login-secret")
    os.environ["MUSTER_EDGE_TEST_UPSTREAM_TOKEN"] = ENV_TOKEN
    with contextlib.ExitStack() as stack:
        idp = stack.enter_context(start_idp(work / "idp", clients=clients, resources=resources, token_exchange=True,
                                            users=[{"sub": "alice", "password": "pw"},
                                                   {"sub": "bob", "password": "pw"}]))

        def exchange(audience: str) -> dict[str, Any]:
            return {"tokenExchange": {"enabled": True, "dexTokenEndpoint": idp.token_endpoint,
                                      "connectorId": "central-dex", "expectedIssuer": idp.issuer, "audience": audience,
                                      "scopes": "mcp:tools",
                                      "clientCredentialsSecretRef": {"name": "exchanger-creds"}}}

        up = {
            "static": stack.enter_context(start_demo_server("prometheus", name="static-srv",
                                                            require_bearer="static-bearer-value",
                                                            record_headers=records["static"])),
            "env": stack.enter_context(start_demo_server("prometheus", name="env-srv", require_bearer=ENV_TOKEN,
                                                         record_headers=records["env"])),
            "forward": stack.enter_context(start_demo_server("vendor", name="forward-srv", require_jwt=idp.issuer,
                                                             audience=resource, record_headers=records["forward"])),
            "exchange": stack.enter_context(start_demo_server("kubernetes", port=ports["exchange"], name="exchange-srv",
                                                              require_jwt=idp.issuer, audience=urls["exchange"],
                                                              record_headers=records["exchange"])),
            "revoking": stack.enter_context(start_demo_server("kubernetes", port=ports["revoking"], name="revoking-srv",
                                                              require_jwt=idp.issuer, audience=urls["revoking"],
                                                              max_token_uses=8, record_headers=records["revoking"])),
            "oauth": stack.enter_context(start_demo_server("prometheus", port=ports["oauth"], name="oauth-srv",
                                                           require_jwt=idp.issuer, audience=urls["oauth"],
                                                           record_headers=records["oauth"])),
        }
        servers = {
            "static-srv": {"url": up["static"].url,
                           "headers": {"Authorization": f"Bearer ${{file:{work / 'static-token'}}}"}},
            "env-srv": {"url": up["env"].url,
                        "headers": {"Authorization": "Bearer ${env:MUSTER_EDGE_TEST_UPSTREAM_TOKEN}"}},
            "forward-srv": {"url": up["forward"].url, "auth": {"forwardToken": True}},
            "exchange-srv": {"url": urls["exchange"], "auth": exchange(urls["exchange"])},
            "revoking-srv": {"url": urls["revoking"], "auth": exchange(urls["revoking"])},
            "oauth-srv": {"url": urls["oauth"], "auth": {"type": "oauth"}},
        }
        gateway = stack.enter_context(start_gateway(
            work / "gw", servers, listen=listen, listTtlFloorMs=600_000, secretsDir=str(work / "secrets"),
            auth={"issuer": idp.issuer, "jwksUri": idp.jwks_uri, "resource": resource},
            upstreamOAuth={"clientId": "muster-edge", "clientSecretFile": str(work / "oauth-client-secret")},
            edgeLogin={"clientId": "muster-edge-login", "clientSecretFile": str(work / "edge-login-secret")}))
        tokens = {u: idp.client_credentials(u, f"{u}-secret", resource=resource, scope="mcp:tools") for u in USERS}
        yield Creds(gateway, idp, tokens, records, urls)


@contextlib.asynccontextmanager
async def as_user(creds: Creds, user: str, mode: str = MODERN) -> AsyncIterator[Client]:
    http = httpx2.AsyncClient(headers={"authorization": f"Bearer {creds.tokens[user]}"}, timeout=30)
    try:
        async with Client(streamable_http_client(creds.gateway.url, http_client=http), mode=mode) as client:
            yield client
    finally:
        await http.aclose()


def seen(creds: Creds, name: str) -> list[dict[str, Any]]:
    path = creds.records[name]
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def bearers(creds: Creds, name: str) -> list[str]:
    return [r["headers"]["authorization"].split(" ", 1)[1] for r in seen(creds, name)
            if r["headers"].get("authorization", "").lower().startswith("bearer ")]


def exchanges(creds: Creds, user: str = "", audience: str = "") -> int:
    """Token exchanges the provider answered (all, or for one user and audience among the recent ones)."""
    if not user:
        return creds.idp.token_requests(GRANT_TOKEN_EXCHANGE)
    return sum(1 for r in creds.idp.recent_requests() if r["grant_type"] == GRANT_TOKEN_EXCHANGE
               and r.get("subject") == user and r.get("audience") == audience)


async def whoami(creds: Creds, user: str, server: str) -> dict[str, Any]:
    async with as_user(creds, user) as client:
        result = await client.call_tool(f"x_{server}_whoami", {})
    return dict(json.loads(result.content[0].text))  # type: ignore[union-attr]


async def test_static_headers_from_a_file_and_the_environment(creds: Creds) -> None:
    assert await whoami(creds, "alice", "static-srv") == {"server": "static-srv"}
    assert await whoami(creds, "alice", "env-srv") == {"server": "env-srv"}
    static = seen(creds, "static")
    assert static and {r["headers"].get("authorization") for r in static} == {"Bearer static-bearer-value"}
    assert {r["headers"].get("authorization") for r in seen(creds, "env")} == {f"Bearer {ENV_TOKEN}"}
    calls = [r for r in static if (r.get("body") or {}).get("method") == "tools/call"]
    lists = [r for r in static if (r.get("body") or {}).get("method") == "tools/list"]
    assert calls and lists  # routed calls and the processor's own list calls alike


async def test_forward_token_sends_the_callers_token_unchanged(creds: Creds) -> None:
    assert await whoami(creds, "alice", "forward-srv") == {"server": "forward-srv"}
    assert creds.tokens["alice"] in bearers(creds, "forward")
    for other in ("static", "env", "exchange", "revoking", "oauth"):
        assert creds.tokens["alice"] not in bearers(creds, other), other


async def test_token_exchange_gives_the_upstream_its_own_token(creds: Creds) -> None:
    assert await whoami(creds, "alice", "exchange-srv") == {"server": "exchange-srv"}
    received = bearers(creds, "exchange")
    assert received and creds.tokens["alice"] not in received
    claims = jwt_claims(received[-1])
    assert claims["aud"] == creds.urls["exchange"]
    assert claims["sub"] == "alice" and claims["act"] == {"sub": "exchanger"}
    assert claims["connector_id"] == "central-dex"
    request = next(r for r in creds.idp.recent_requests() if r["grant_type"] == GRANT_TOKEN_EXCHANGE)
    assert request["client_id"] == "exchanger" and request["connector_id"] == "central-dex"


async def test_exchanged_tokens_are_cached_per_user_and_never_shared(creds: Creds) -> None:
    await whoami(creds, "bob", "exchange-srv")
    before = exchanges(creds)
    cost = {}
    for server in ("exchange-srv", "static-srv"):
        traffic = creds.gateway.processor_traffic()
        for _ in range(5):
            await whoami(creds, "bob", server)
        cost[server] = tuple(b - a for a, b in zip(traffic, creds.gateway.processor_traffic(), strict=True))
    assert exchanges(creds) == before
    # requests, ext_proc streams and messages: a cached exchanged token costs what a static header costs
    assert cost["exchange-srv"] == cost["static-srv"], cost
    subjects = {jwt_claims(t)["sub"] for t in bearers(creds, "exchange")}
    assert {"alice", "bob"} <= subjects
    alice_tokens = {t for t in bearers(creds, "exchange") if jwt_claims(t)["sub"] == "alice"}
    bob_tokens = {t for t in bearers(creds, "exchange") if jwt_claims(t)["sub"] == "bob"}
    assert not alice_tokens & bob_tokens


async def test_fifty_concurrent_calls_of_one_user_cause_one_exchange(creds: Creds) -> None:
    token = creds.tokens["carol"]
    meta = {"io.modelcontextprotocol/protocolVersion": MODERN, "io.modelcontextprotocol/clientCapabilities": {}}
    headers = {"accept": "application/json, text/event-stream", "content-type": "application/json",
               "authorization": f"Bearer {token}", "mcp-protocol-version": MODERN, "mcp-method": "tools/call",
               "mcp-name": "x_exchange-srv_whoami"}
    async with httpx2.AsyncClient(timeout=60, limits=httpx2.Limits(max_connections=50)) as http:
        async def call(i: int) -> httpx2.Response:
            body = {"jsonrpc": "2.0", "id": i, "method": "tools/call",
                    "params": {"name": "x_exchange-srv_whoami", "arguments": {}, "_meta": meta}}
            return await http.post(creds.gateway.url, json=body, headers=headers)

        answers = await asyncio.gather(*(call(i) for i in range(50)))
    assert all(a.status_code == 200 and "exchange-srv" in a.text for a in answers)
    assert exchanges(creds, "carol", creds.urls["exchange"]) == 1


async def test_an_exchanged_token_is_renewed_shortly_before_it_expires(creds: Creds) -> None:
    await whoami(creds, "dave", "exchange-srv")
    first = exchanges(creds)
    await whoami(creds, "dave", "exchange-srv")
    assert exchanges(creds) == first
    time.sleep(7)  # 8 s tokens are renewed a quarter of their life before they expire
    await whoami(creds, "dave", "exchange-srv")
    assert exchanges(creds) == first + 1


async def test_a_401_from_the_upstream_evicts_exchanges_again_and_retries_once(creds: Creds) -> None:
    """revoking-srv refuses a token after eight requests (the processor's list calls use five), as if revoked."""
    before = exchanges(creds)
    results = [await whoami(creds, "eve", "revoking-srv") for _ in range(6)]
    assert results == [{"server": "revoking-srv"}] * 6
    eves = [r for r in seen(creds, "revoking")
            if jwt_claims(r["headers"]["authorization"].split()[1])["sub"] == "eve"]
    tokens = {r["headers"]["authorization"] for r in eves}
    assert len(tokens) >= 2 and exchanges(creds) - before >= 2
    assert f"Bearer {creds.tokens['eve']}" not in tokens  # the resend carries a new exchanged token, never hers


async def test_an_idp_that_fails_gives_a_clear_error_without_a_token(creds: Creds) -> None:
    creds.idp.set_down(True)
    try:
        with pytest.raises(BaseException) as caught:
            async with as_user(creds, "frank") as client:
                await client.call_tool("x_exchange-srv_whoami", {})
    finally:
        creds.idp.set_down(False)
    err = mcp_error(caught.value)
    assert err is not None, caught.value
    assert "exchange-srv" in err.message and "token exchange failed" in err.message and "503" in err.message
    assert "eyJ" not in err.message and creds.tokens["frank"] not in str(err.data)


async def test_per_user_oauth_login_callback_refresh_and_logout(creds: Creds) -> None:
    gw = creds.gateway
    async with as_user(creds, "alice") as client:
        names = {t.name for t in (await client.list_tools()).tools}
        assert "core_auth_login" in names and not any(n.startswith("x_oauth-srv_") for n in names)
        status = json.loads((await client.read_resource("auth://status")).contents[0].text)  # type: ignore[union-attr]
        assert {"name": "oauth-srv", "status": "Auth Required", "auth_tool": "core_auth_login"}.items() <= \
            next(s for s in status["servers"] if s["name"] == "oauth-srv").items()
        login = await client.call_tool("core_auth_login", {"server": "oauth-srv"})
    url = login.structured_content["authUrl"]  # type: ignore[index]
    assert url in login.content[0].text and "code_challenge_method=S256" in url  # type: ignore[union-attr]
    callback = f"{gw.url.rsplit('/mcp', 1)[0]}/oauth/callback"
    back = creds.idp.browse(url, callback, user="alice", password="pw")
    # the callback sends the browser through the gateway's own sign-in at the edge IdP before it stores anything
    proved = creds.idp.browse(back, callback, user="alice", password="pw")
    again = creds.idp.browse(back, callback, user="alice", password="pw")
    async with httpx2.AsyncClient(timeout=20) as browser:
        page = await browser.get(proved)
        replay = await browser.get(again)
    assert page.status_code == 200 and "signed in to oauth-srv" in page.text
    assert page.headers["x-frame-options"] == "DENY" and page.headers["cache-control"] == "no-store"
    assert replay.status_code == 400 and "already used" in replay.text

    deadline = time.monotonic() + 15
    while True:
        async with as_user(creds, "alice") as client:
            names = {t.name for t in (await client.list_tools()).tools}
        if "x_oauth-srv_whoami" in names or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.3)
    assert "x_oauth-srv_whoami" in names
    assert await whoami(creds, "alice", "oauth-srv") == {"server": "oauth-srv"}
    claims = jwt_claims(bearers(creds, "oauth")[-1])
    assert claims["sub"] == "alice" and claims["aud"] == creds.urls["oauth"]

    refreshes = creds.idp.token_requests("refresh_token")
    time.sleep(4)  # 33 s tokens: refreshed 30 s before they expire
    assert await whoami(creds, "alice", "oauth-srv") == {"server": "oauth-srv"}
    assert creds.idp.token_requests("refresh_token") == refreshes + 1

    async with as_user(creds, "bob") as client:
        assert not any(t.name.startswith("x_oauth-srv_") for t in (await client.list_tools()).tools)

    async with as_user(creds, "alice") as client:
        out = await client.call_tool("core_auth_logout", {"server": "oauth-srv"})
        assert "Signed out" in out.content[0].text  # type: ignore[union-attr]
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        async with as_user(creds, "alice") as client:
            names = {t.name for t in (await client.list_tools()).tools}
        if "x_oauth-srv_whoami" not in names:
            break
        await asyncio.sleep(0.3)
    assert "x_oauth-srv_whoami" not in names


def test_auth_status_in_the_seeds_format(creds: Creds) -> None:
    done = subprocess.run([str(MUSTER_EDGE), "auth", "status", "--url", creds.gateway.url, "--token",
                           creds.tokens["alice"]], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    lines = {line.split()[0]: line for line in done.stdout.splitlines()}
    assert lines["exchange-srv"].split(maxsplit=1)[1] == "Connected [SSO: Exchanged]"
    assert lines["forward-srv"].split(maxsplit=1)[1] == "Connected [SSO: Forwarded]"
    assert lines["static-srv"].split(maxsplit=1)[1] == "Connected"
    assert lines["oauth-srv"].split(maxsplit=1)[1].startswith("Auth Required")


def test_admission_rules_on_auth(creds: Creds) -> None:
    gw = creds.gateway
    both = manifest("both", "http://127.0.0.1:1/mcp", auth={
        "type": "oauth", "forwardToken": True, "authorizationServer": {"issuer": "https://as.example.com"}})
    exchange = manifest("exchange-and-as", "http://127.0.0.1:1/mcp", auth={
        "type": "oauth", "tokenExchange": {"enabled": True}, "authorizationServer": {"issuer": "https://as.example.com"}})
    plain = manifest("as-without-oauth", "http://127.0.0.1:1/mcp", auth={
        "authorizationServer": {"issuer": "https://as.example.com"}})
    gw.write_manifest("bad-auth.yaml", [both, exchange, plain])
    try:
        gw.wait_for(lambda: sum("bad-auth.yaml" in r for r in gw.status()["refused"]) == 3, what="three refusals")
        refused = " ".join(gw.status()["refused"])
        assert "forwardToken bypasses per-backend OAuth; set one or the other, not both" in refused
        assert "tokenExchange has its own issuer/endpoint config; set one or the other, not both" in refused
        assert "authorizationServer is only valid when type is oauth" in refused
    finally:
        gw.remove_manifest("bad-auth.yaml")


def test_no_token_or_secret_in_any_log(creds: Creds) -> None:
    logs = "".join(p.read_text(errors="replace") for p in creds.gateway.log_path.parent.parent.rglob("*.log"))
    for user, token in creds.tokens.items():
        assert token not in logs and token.split(".")[2][:32] not in logs, user
    for secret in ("exchanger-secret", "oauth-client-secret", "static-bearer-value", ENV_TOKEN):
        assert secret not in creds.gateway.log(), secret
