"""Issue 9's security items, with real parts: two gateways (Envoy + processor) sharing a real Redis and one
session key, a real OpenID provider (deploy/idp) as both the edge IdP and the upstreams' authorization server,
and real MCP servers that check their own tokens.

- a per-user OAuth login link opened by another user is refused after the gateway's own sign-in, storing nothing;
- a login state is used once, also when its callback reaches both gateways at the same time;
- the Redis lock is owner-checked, the single-use take and the login rate limit are atomic across stores;
- an upstream's 401 (static header or forwarded token) reaches the client as the gateway's JSON-RPC error naming
  the server, never with the upstream's WWW-Authenticate;
- /status and /metrics need the statusToken from a non-loopback peer (the host's own non-loopback address, so
  the peer really is not loopback), /healthz is open, and no subject appears;
- the 11th core_auth_login of a user within a minute is refused, counted across both gateways.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import json
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import httpx2
import pytest
import redis
from mcp.client.client import Client
from mcp.client.streamable_http import streamable_http_client

from extproc.credentials import MemoryStore, RedisStore
from extproc.sessions import Sealer
from tests.e2e.test_shared_state import start_redis
from tests.gateway_harness import MUSTER_EDGE, Gateway, start_gateway
from tests.idp import Idp, start_idp
from tests.procs import free_port, start_demo_server

MODERN = "2026-07-28"
USERS = ("alice", "bob", "carol", "dave", "eve")
STATUS_TOKEN = "status-token-for-the-test-0123456789"


def own_non_loopback_address() -> str:
    """An address of this host that is not loopback (a connection to it has that address as its peer)."""
    try:
        trie = Path("/proc/net/fib_trie").read_text().splitlines()
    except OSError:
        trie = []
    for before, line in itertools.pairwise(trie):
        if "/32 host LOCAL" in line:
            address = before.split()[-1]
            if not address.startswith("127."):
                return address
    pytest.skip("this host has no non-loopback address to reach its own status listener from")


@dataclass
class Pair:
    a: Gateway
    b: Gateway
    idp: Idp
    redis_url: str
    tokens: dict[str, str]
    callback: str  # the one redirect URI both gateways register (as behind one load balancer)
    oauth_url: str
    static_token_file: Path
    status_host: str
    work: Path

    def on(self, gateway: Gateway, url: str) -> str:
        """The same path and query, sent to this gateway (the browser reaching another replica)."""
        target = urlsplit(gateway.url)
        parts = urlsplit(url)
        return urlunsplit((parts.scheme, target.netloc, parts.path, parts.query, ""))


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pair]:
    work = tmp_path_factory.mktemp("security")
    listen_a, listen_b = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"
    resource = f"http://{listen_a}/mcp"
    callback = f"http://{listen_a}/oauth/callback"
    oauth_port = free_port()
    oauth_url = f"http://127.0.0.1:{oauth_port}/mcp"
    clients: list[dict[str, Any]] = [{"client_id": u, "client_secret": f"{u}-secret"} for u in USERS]
    clients += [{"client_id": "muster-edge", "client_secret": "upstream-client-secret",
                 "grant_types": ["authorization_code", "refresh_token"], "redirect_uris": [callback],
                 "scope": "openid offline_access mcp:tools"},
                {"client_id": "muster-edge-login", "client_secret": "edge-login-secret",
                 "grant_types": ["authorization_code"], "redirect_uris": [callback], "scope": "openid"}]
    resources = [{"audience": resource, "scope": "mcp:tools", "accessTokenTTL": 600},
                 {"audience": oauth_url, "scope": "mcp:tools", "accessTokenTTL": 600}]
    (work / "session-key").write_text(base64.b64encode(b"s" * 32).decode() + "\n")  # both gateways
    (work / "upstream-client-secret").write_text("upstream-client-secret")
    (work / "edge-login-secret").write_text("edge-login-secret")
    (work / "status-token").write_text(STATUS_TOKEN + "\n")
    static_token_file = work / "static-token"
    static_token_file.write_text("static-bearer-value\n")
    status_host = own_non_loopback_address()
    with contextlib.ExitStack() as stack:
        redis_url = stack.enter_context(start_redis(work))
        idp = stack.enter_context(start_idp(work / "idp", clients=clients, resources=resources,
                                            users=[{"sub": u, "password": "pw"} for u in USERS]))
        oauth = stack.enter_context(start_demo_server("prometheus", port=oauth_port, name="oauth-srv",
                                                      require_jwt=idp.issuer, audience=oauth_url))
        static = stack.enter_context(start_demo_server("prometheus", name="static-srv",
                                                       require_bearer="static-bearer-value"))
        forward = stack.enter_context(start_demo_server("vendor", name="forward-srv", require_jwt=idp.issuer,
                                                        audience=resource, max_token_uses=12))
        servers = {
            "oauth-srv": {"url": oauth.url, "auth": {"type": "oauth"}},
            "static-srv": {"url": static.url, "headers": {"Authorization": f"Bearer ${{file:{static_token_file}}}"}},
            "forward-srv": {"url": forward.url, "auth": {"forwardToken": True}},
        }
        common: dict[str, Any] = {
            "auth": {"issuer": idp.issuer, "jwksUri": idp.jwks_uri, "resource": resource},
            "store": {"redis": redis_url}, "sessionKey": {"file": str(work / "session-key")},
            "upstreamOAuth": {"clientId": "muster-edge", "clientSecretFile": str(work / "upstream-client-secret"),
                              "redirectUri": callback},
            "edgeLogin": {"clientId": "muster-edge-login", "clientSecretFile": str(work / "edge-login-secret")},
            "statusToken": {"file": str(work / "status-token")},
            "listTtlMs": 600_000, "listTtlFloorMs": 600_000,
        }
        a = stack.enter_context(start_gateway(work / "a", servers, listen=listen_a, **common))
        status_port = free_port()
        b = stack.enter_context(start_gateway(work / "b", servers, listen=listen_b,
                                              processor={"status": f"{status_host}:{status_port}"}, **common))
        tokens = {u: idp.client_credentials(u, f"{u}-secret", resource=resource, scope="mcp:tools") for u in USERS}
        yield Pair(a, b, idp, redis_url, tokens, callback, oauth.url, static_token_file, status_host, work)


@contextlib.asynccontextmanager
async def as_user(pair: Pair, user: str, gateway: Gateway | None = None) -> AsyncIterator[Client]:
    http = httpx2.AsyncClient(headers={"authorization": f"Bearer {pair.tokens[user]}"}, timeout=30)
    try:
        async with Client(streamable_http_client((gateway or pair.a).url, http_client=http), mode=MODERN) as client:
            yield client
    finally:
        await http.aclose()


async def login_url(pair: Pair, user: str, gateway: Gateway | None = None) -> str:
    async with as_user(pair, user, gateway) as client:
        login = await client.call_tool("core_auth_login", {"server": "oauth-srv"})
    assert not login.is_error, login.content
    return str(login.structured_content["authUrl"])  # type: ignore[index]


async def oauth_status(pair: Pair, user: str, gateway: Gateway | None = None) -> str:
    async with as_user(pair, user, gateway) as client:
        text = (await client.read_resource("auth://status")).contents[0].text  # type: ignore[union-attr]
    return str(next(s for s in json.loads(text)["servers"] if s["name"] == "oauth-srv")["status"])


def upstream_code_exchanges(pair: Pair) -> int:
    """Authorization codes the gateway redeemed at the upstream's authorization server (its `muster-edge` client)."""
    return sum(r["grant_type"] == "authorization_code" and r["client_id"] == "muster-edge"
               for r in pair.idp.recent_requests())


def raw_call(pair: Pair, user: str, tool: str, msg_id: Any) -> dict[str, Any]:
    meta = {"io.modelcontextprotocol/protocolVersion": MODERN, "io.modelcontextprotocol/clientCapabilities": {}}
    headers = {"accept": "application/json, text/event-stream", "content-type": "application/json",
               "authorization": f"Bearer {pair.tokens[user]}", "mcp-protocol-version": MODERN,
               "mcp-method": "tools/call", "mcp-name": tool}
    return {"url": pair.a.url, "headers": headers, "json": {
        "jsonrpc": "2.0", "id": msg_id, "method": "tools/call", "params": {"name": tool, "arguments": {},
                                                                          "_meta": meta}}}


# ---------------------------------------------------------------------------------------------- the callback


async def test_a_login_link_completed_by_another_user_is_refused_and_stores_nothing(pair: Pair) -> None:
    url = await login_url(pair, "alice")
    before = upstream_code_exchanges(pair)
    # bob opens alice's link: he signs in at the upstream's authorization server, comes back to the gateway,
    # which sends his browser through its own sign-in at the edge IdP, where he is bob
    back = pair.idp.browse(url, pair.callback, user="bob", password="pw")
    async with httpx2.AsyncClient(timeout=20, follow_redirects=False) as browser:
        first = await browser.get(back)
    assert first.status_code == 302 and first.headers["location"].startswith(pair.idp.authorization_endpoint)
    assert "set-cookie" not in first.headers  # no cookie stands in for proof: the sign-in is the proof
    proved = pair.idp.browse(back, pair.callback, user="bob", password="pw")
    async with httpx2.AsyncClient(timeout=20) as browser:
        page = await browser.get(proved)
    assert page.status_code == 400 and "started by another user" in page.text and "nothing was stored" in page.text
    assert upstream_code_exchanges(pair) == before  # bob's upstream code was never redeemed
    assert await oauth_status(pair, "alice") == "Auth Required"
    assert await oauth_status(pair, "bob") == "Auth Required"
    for user in ("alice", "bob"):
        async with as_user(pair, user) as client:
            assert not any(t.name.startswith("x_oauth-srv_") for t in (await client.list_tools()).tools)
    assert not redis.Redis.from_url(pair.redis_url).keys("muster-edge:oauth:*")  # no token for anyone


async def test_the_owner_completes_the_login_and_a_wrong_edge_sign_in_does_not_pass(pair: Pair) -> None:
    url = await login_url(pair, "dave")
    back = pair.idp.browse(url, pair.callback, user="dave", password="pw")
    proved = pair.idp.browse(back, pair.callback, user="dave", password="pw")
    async with httpx2.AsyncClient(timeout=20) as browser:
        forged = await browser.get(proved.replace("state=", "state=x"))
        page = await browser.get(proved)
    assert forged.status_code == 400 and "invalid or tampered state" in forged.text
    assert page.status_code == 200 and "signed in to oauth-srv" in page.text
    assert await oauth_status(pair, "dave") == "Connected"


async def test_a_login_state_used_at_once_on_two_gateways_sharing_redis_succeeds_once(pair: Pair) -> None:
    url = await login_url(pair, "alice")
    back = pair.idp.browse(url, pair.callback, user="alice", password="pw")
    before = upstream_code_exchanges(pair)
    # four browsers' worth of returns with the one state (each through its own edge sign-in as alice), two per
    # gateway, sent at the same moment
    gateways = (pair.a, pair.b, pair.a, pair.b)
    returns = [pair.on(gw, pair.idp.browse(pair.on(gw, back), pair.callback, user="alice", password="pw"))
               for gw in gateways]
    async with httpx2.AsyncClient(timeout=30) as browser:
        pages = await asyncio.gather(*(browser.get(u) for u in returns))
    ok = [p for p in pages if p.status_code == 200]
    assert len(ok) == 1 and "signed in to oauth-srv" in ok[0].text, [p.text[-200:] for p in pages]
    assert all(p.status_code == 400 and "already used" in p.text for p in pages if p is not ok[0])
    assert upstream_code_exchanges(pair) == before + 1
    # the replica that stored the token sees it at once (the other one on its next list refresh)
    assert await oauth_status(pair, "alice", gateways[pages.index(ok[0])]) == "Connected"


# ---------------------------------------------------------------------------------------------- stores


async def test_the_redis_lock_is_released_only_by_its_owner(pair: Pair) -> None:
    sealer = Sealer(b"k" * 32)
    first, second = RedisStore(pair.redis_url, sealer, "lock-test:"), RedisStore(pair.redis_url, sealer, "lock-test:")
    plain = redis.Redis.from_url(pair.redis_url)
    assert await first.lock("exchange:x", 0.3)
    assert not await second.lock("exchange:x", 0.3)
    await second.unlock("exchange:x")  # not its lock: it stays
    assert plain.exists("lock-test:lock:exchange:x")
    deadline = time.monotonic() + 5
    while not await second.lock("exchange:x", 30) and time.monotonic() < deadline:
        await asyncio.sleep(0.05)  # the first holder's lock expires (it crashed, or took too long)
    await first.unlock("exchange:x")  # the late first holder must not delete the second's lock
    assert plain.exists("lock-test:lock:exchange:x")
    await second.unlock("exchange:x")
    assert not plain.exists("lock-test:lock:exchange:x")


@pytest.mark.parametrize("shared", [True, False])
async def test_take_is_single_use_and_the_window_is_shared(pair: Pair, shared: bool) -> None:
    sealer = Sealer(b"t" * 32)
    memory = MemoryStore()
    stores = [RedisStore(pair.redis_url, sealer, "take-test:") for _ in range(2)] if shared else [memory, memory]
    await stores[0].set("oauth-state:n", b"1", 60)
    taken = await asyncio.gather(*(stores[i % 2].take("oauth-state:n") for i in range(20)))
    assert taken.count(b"1") == 1 and taken.count(None) == 19
    lefts = await asyncio.gather(*(stores[i % 2].hit(f"rate:{shared}", 10, 60) for i in range(12)))
    assert sorted(lefts) == [-1, -1, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9]


# ---------------------------------------------------------------------------------------------- upstream 401s


async def test_a_static_header_upstreams_401_is_the_gateways_error_without_its_challenge(pair: Pair) -> None:
    async with as_user(pair, "carol") as client:
        assert "x_static-srv_whoami" in {t.name for t in (await client.list_tools()).tools}
    pair.static_token_file.write_text("rotated-but-not-at-the-upstream\n")  # the Secret rotated on one side only
    try:
        await asyncio.sleep(1.2)  # the header file is looked at again after a second
        async with httpx2.AsyncClient(timeout=30) as http:
            answer = await http.post(**raw_call(pair, "carol", "x_static-srv_whoami", "req-401"))
        assert "www-authenticate" not in answer.headers, answer.headers
        assert answer.status_code == 502, answer.text  # not 401/403: the caller's own token is fine
        body = answer.json()
        assert body["id"] == "req-401" and body["error"]["code"] == -32603
        assert "static-srv" in body["error"]["message"] and body["error"]["data"]["server"] == "static-srv"
        assert "refused" in json.dumps(body["error"]["data"])  # why, in the gateway's words
        assert "demo" not in answer.text  # nothing of the upstream's challenge (realm="demo")
    finally:
        pair.static_token_file.write_text("static-bearer-value\n")


async def test_a_forwarded_token_refused_upstream_is_not_the_gateways_own_401(pair: Pair) -> None:
    """forward-srv accepts each token 12 times, then answers 401 with its own challenge."""
    async with httpx2.AsyncClient(timeout=30) as http:
        answers = [await http.post(**raw_call(pair, "eve", "x_forward-srv_whoami", i)) for i in range(20)]
    assert answers[0].status_code == 200 and "forward-srv" in answers[0].text, answers[0].text
    refused = [a for a in answers if a.status_code != 200 or "error" in a.json()]
    assert refused, [a.text for a in answers]
    for answer in refused:
        assert answer.status_code == 502 and "www-authenticate" not in answer.headers, (answer.status_code,
                                                                                        answer.headers)
        assert "forward-srv" in answer.json()["error"]["message"]


# ---------------------------------------------------------------------------------------------- /status


def status_get(pair: Pair, path: str, *, token: str = "", loopback: bool = False) -> httpx2.Response:
    status = urlsplit(f"http://{pair.b.config['processor']['status']}")
    host = "127.0.0.1" if loopback else status.hostname
    headers = {"authorization": f"Bearer {token}"} if token else {}
    return httpx2.get(f"http://{host}:{status.port}{path}", headers=headers, timeout=5)


async def test_status_needs_the_token_from_a_non_loopback_peer_and_names_no_user(pair: Pair) -> None:
    async with as_user(pair, "alice", pair.b) as client:  # per-user state for two users on gateway b
        await client.list_tools()
    async with as_user(pair, "bob", pair.b) as client:
        await client.list_tools()
    assert status_get(pair, "/healthz").status_code == 200  # probes
    for path in ("/status", "/metrics"):
        refused = status_get(pair, path)
        assert refused.status_code == 401 and "servers" not in refused.text and "muster_edge_" not in refused.text
        assert status_get(pair, path, token="wrong").status_code == 401
        assert status_get(pair, path, token=STATUS_TOKEN).status_code == 200
    answer = status_get(pair, "/status", token=STATUS_TOKEN)
    per_user = {s["name"]: s for s in answer.json()["servers"]}["forward-srv"]
    assert sum(per_user["users"].values()) >= 2
    assert not any(user in answer.text for user in USERS)  # counted, never named
    # the CLI sends the token (the status listener here is not on loopback, so it must)
    done = subprocess.run([str(MUSTER_EDGE), "status", "-c", str(pair.b.config_path)], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0 and '"servers"' in done.stdout and "unreachable" not in done.stdout, done.stdout
    assert not any(user in done.stdout for user in USERS)


def test_loopback_peers_read_status_and_metrics_without_the_token(pair: Pair) -> None:
    status_port = int(pair.a.status_url.rsplit(":", 1)[1].split("/")[0])
    for path in ("/status", "/metrics", "/healthz"):
        assert httpx2.get(f"http://127.0.0.1:{status_port}{path}", timeout=5).status_code == 200
    assert not any(user in httpx2.get(pair.a.status_url, timeout=5).text for user in USERS)


# ---------------------------------------------------------------------------------------------- rate limit


async def test_the_eleventh_login_in_a_minute_is_refused_across_both_gateways(pair: Pair) -> None:
    results = []
    for i in range(11):
        async with as_user(pair, "carol", (pair.a, pair.b)[i % 2]) as client:
            results.append(await client.call_tool("core_auth_login", {"server": "oauth-srv"}))
    assert all(not r.is_error and r.structured_content for r in results[:10]), [r.content for r in results]
    last = results[10]
    text = last.content[0].text  # type: ignore[union-attr]
    assert last.is_error and text.startswith("Rate limit exceeded. Too many authentication attempts.")
    assert text.endswith("Remaining attempts: 0")
    async with as_user(pair, "bob", pair.b) as client:  # per user: bob is not limited by carol's attempts
        assert not (await client.call_tool("core_auth_login", {"server": "oauth-srv"})).is_error
