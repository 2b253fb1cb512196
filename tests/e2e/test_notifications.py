"""Change notifications through the real gateway (Envoy + processor), to real SDK clients, in both eras.

A handshake-era client's GET stream and a 2026-07-28 client's subscriptions/listen are served by the processor's
own stream endpoint; each client is told once, and only about what it can see.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx2
import orjson
import pytest
from mcp.client.client import Client
from mcp.client.streamable_http import streamable_http_client
from mcp.shared.subscriptions import ResourceUpdated, ToolsListChanged

from tests import conformance
from tests.gateway_harness import Gateway, start_gateway
from tests.idp import Idp, start_idp
from tests.procs import DemoServer, free_port, start_demo_server

TIMEOUT = 15.0


@dataclass
class Setup:
    gateway: Gateway
    vendor: DemoServer
    fixture: DemoServer


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    work = tmp_path_factory.mktemp("notify")
    with contextlib.ExitStack() as stack:
        vendor = stack.enter_context(start_demo_server("vendor", name="vendor"))
        fixture = stack.enter_context(start_demo_server("fixture", name="fixture"))
        gateway = stack.enter_context(start_gateway(work / "gw", {"vendor": vendor.url, "fixture": fixture.url},
                                                    listTtlFloorMs=600_000))
        yield Setup(gateway, vendor, fixture)


@dataclass
class Inbox:
    """The notifications one handshake-era client received, by method."""

    methods: list[str] = field(default_factory=list)
    params: list[dict[str, Any]] = field(default_factory=list)

    async def handler(self, message: Any) -> None:
        root = getattr(message, "root", message)
        method = getattr(root, "method", None)
        if isinstance(method, str) and method.startswith("notifications/"):
            self.methods.append(method)
            params = getattr(root, "params", None)
            self.params.append(params.model_dump(by_alias=True, exclude_none=True) if params is not None else {})

    def count(self, method: str) -> int:
        return self.methods.count(method)


async def until(predicate: Callable[[], Any], what: str, timeout: float = TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def worker_status(gateway: Gateway) -> list[dict[str, Any]]:
    """Every worker's /status (worker i listens on the status port + i)."""
    host, port = gateway.config["processor"]["status"].rsplit(":", 1)
    workers = int(gateway.config["processor"].get("workers", 1))
    return [httpx2.get(f"http://{host}:{int(port) + i}/status", timeout=5).json() for i in range(workers)]


def listening(gateway: Gateway) -> int:
    return sum(int(s["notifications"]["listening"]) for s in worker_status(gateway))


def listening_gauge(gateway: Gateway) -> float:
    """`muster_edge_listening_clients` summed over the workers, as Prometheus scrapes it (/metrics/all)."""
    host, port = gateway.config["processor"]["status"].rsplit(":", 1)
    text = httpx2.get(f"http://{host}:{port}/metrics/all", timeout=5).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("muster_edge_listening_clients"))


@contextlib.asynccontextmanager
async def legacy_client(gateway: Gateway, inbox: Inbox) -> AsyncIterator[Client]:
    before = listening(gateway)
    async with Client(gateway.url, mode="legacy", message_handler=inbox.handler) as client:
        await until(lambda: listening(gateway) > before, "the GET stream to open")
        yield client


async def tool_names(client: Client) -> set[str]:
    return {t.name for t in (await client.list_tools()).tools}


def test_capabilities_declare_list_changed_and_subscribe(setup: Setup) -> None:
    async def main() -> None:
        for mode in ("legacy", "auto"):  # auto: server/discover first, as 2026-07-28 clients do
            async with Client(setup.gateway.url, mode=mode) as client:
                assert client.session.protocol_version == ("2025-11-25" if mode == "legacy" else "2026-07-28")
                caps = client.session.server_capabilities
                assert caps is not None
                assert caps.tools is not None and caps.tools.list_changed
                assert caps.prompts is not None and caps.prompts.list_changed
                assert caps.resources is not None and caps.resources.list_changed and caps.resources.subscribe

    asyncio.run(main())


def test_legacy_get_stream_told_once_when_an_upstream_tool_list_changes(setup: Setup) -> None:
    async def main() -> None:
        inbox = Inbox()
        async with legacy_client(setup.gateway, inbox) as client:
            had_beta = "x_vendor_beta_feature" in await tool_names(client)
            await client.call_tool("x_vendor_toggle_beta", {})
            await until(lambda: inbox.count("notifications/tools/list_changed") >= 1, "tools/list_changed")
            assert ("x_vendor_beta_feature" in await tool_names(client)) != had_beta
            # a second, unrelated list_changed would show up with the next toggle's: one per event
            await client.call_tool("x_vendor_toggle_beta", {})
            await until(lambda: inbox.count("notifications/tools/list_changed") >= 2, "the second tools/list_changed")
            assert ("x_vendor_beta_feature" in await tool_names(client)) == had_beta
            assert inbox.count("notifications/tools/list_changed") == 2
            assert inbox.count("notifications/prompts/list_changed") == 0
            assert inbox.count("notifications/resources/list_changed") == 0

    asyncio.run(main())


def test_listen_acknowledges_and_tells_only_what_was_asked(setup: Setup) -> None:
    async def main() -> None:
        async with Client(setup.gateway.url, mode="2026-07-28") as client, \
                client.listen(tools_list_changed=True) as sub:
            assert sub.honored.tools_list_changed and not sub.honored.prompts_list_changed
            await client.call_tool("x_vendor_toggle_beta", {})
            event = await asyncio.wait_for(sub.__anext__(), TIMEOUT)
            assert isinstance(event, ToolsListChanged)

    asyncio.run(main())


def test_listen_wire_format(setup: Setup) -> None:
    """The raw stream: the acknowledgement first, with the listen id as subscriptionId on every frame."""
    async def main() -> None:
        meta = {"io.modelcontextprotocol/protocolVersion": "2026-07-28",
                "io.modelcontextprotocol/clientCapabilities": {}}
        body = {"jsonrpc": "2.0", "id": "sub-7", "method": "subscriptions/listen",
                "params": {"notifications": {"toolsListChanged": True, "promptsListChanged": False}, "_meta": meta}}
        headers = {"accept": "application/json, text/event-stream", "content-type": "application/json",
                   "mcp-protocol-version": "2026-07-28", "mcp-method": "subscriptions/listen"}
        frames: list[dict[str, Any]] = []
        async with httpx2.AsyncClient(timeout=TIMEOUT) as http, \
                http.stream("POST", setup.gateway.url, content=orjson.dumps(body), headers=headers) as resp:
            assert resp.status_code == 200
            assert resp.headers["content-type"].startswith("text/event-stream")
            async for line in resp.aiter_lines():
                if line.startswith("data:"):
                    frames.append(orjson.loads(line[5:]))
                    break
        ack = frames[0]
        assert ack["method"] == "notifications/subscriptions/acknowledged"
        assert ack["params"]["notifications"] == {"toolsListChanged": True}
        assert ack["params"]["_meta"]["io.modelcontextprotocol/subscriptionId"] == "sub-7"

    asyncio.run(main())


def test_stream_endpoint_refuses_a_request_without_a_ticket(setup: Setup) -> None:
    status = setup.gateway.config["processor"]["status"]
    resp = httpx2.post(f"http://{status}/notify", headers={"x-muster-edge-listen": "forged"}, timeout=5)
    assert resp.status_code == 403


def test_get_without_a_session_is_refused(setup: Setup) -> None:
    resp = httpx2.get(setup.gateway.url, headers={"accept": "text/event-stream", "mcp-session-id": "nope"}, timeout=5)
    assert resp.status_code in (400, 404)
    assert "error" in resp.json()


def test_manifest_added_and_removed_tells_once_each(setup: Setup, tmp_path: Path) -> None:
    async def main() -> None:
        inbox = Inbox()
        with start_demo_server("prometheus", name="extra") as extra:
            async with legacy_client(setup.gateway, inbox) as client:
                setup.gateway.add_server("extra", extra.url)
                await until(lambda: inbox.count("notifications/tools/list_changed") >= 1, "list_changed on add")
                assert any(n.startswith("x_extra_") for n in await tool_names(client))
                setup.gateway.remove_manifest("extra.yaml")
                await until(lambda: inbox.count("notifications/tools/list_changed") >= 2, "list_changed on remove")
                assert not any(n.startswith("x_extra_") for n in await tool_names(client))
                assert inbox.count("notifications/tools/list_changed") == 2

    asyncio.run(main())


def test_resources_updated_reaches_subscribers_with_the_exposed_uri(setup: Setup) -> None:
    async def exposed_watched(client: Client) -> str:
        uris = [str(r.uri) for r in (await client.list_resources()).resources]
        return next(u for u in uris if u.endswith("watched-resource"))

    async def main() -> None:
        async with Client(setup.gateway.url, mode="2026-07-28") as client:
            uri = await exposed_watched(client)
            assert uri != "test://watched-resource"  # prefixMode always: the gateway's own form
            async with client.listen(resource_subscriptions=[uri]) as sub:
                assert sub.honored.resource_subscriptions == [uri]
                got: list[Any] = []

                async def next_event() -> None:
                    got.append(await sub.__anext__())

                waiter = asyncio.ensure_future(next_event())
                deadline = time.monotonic() + TIMEOUT
                while not waiter.done() and time.monotonic() < deadline:  # the upstream subscription opens async
                    await client.call_tool("x_fixture_test_trigger_resource_update", {})
                    await asyncio.wait([waiter], timeout=0.5)
                assert waiter.done(), "no resources/updated"
                assert isinstance(got[0], ResourceUpdated) and got[0].uri == uri

        inbox = Inbox()
        async with legacy_client(setup.gateway, inbox) as client:
            uri = await exposed_watched(client)
            await client.session.subscribe_resource(uri)
            deadline = time.monotonic() + TIMEOUT
            while not inbox.count("notifications/resources/updated") and time.monotonic() < deadline:
                await client.call_tool("x_fixture_test_trigger_resource_update", {})
                await asyncio.sleep(0.5)
            index = inbox.methods.index("notifications/resources/updated")
            assert inbox.params[index]["uri"] == uri
            await client.session.unsubscribe_resource(uri)

    asyncio.run(main())


def test_listening_clients_release_what_they_held(setup: Setup) -> None:
    async def main() -> None:
        base = listening(setup.gateway)
        async with Client(setup.gateway.url, mode="2026-07-28") as client, \
                client.listen(tools_list_changed=True, prompts_list_changed=True):
            await until(lambda: listening(setup.gateway) == base + 1, "the stream to be held")
            assert listening_gauge(setup.gateway) == base + 1
        await until(lambda: listening(setup.gateway) == base, "the stream to be released")
        assert listening_gauge(setup.gateway) == base
        assert worker_status(setup.gateway)[0]["notifications"]["upstreamSubscriptions"] == 0

    asyncio.run(main())


# ---------------------------------------------------------------------------------------------- conformance

SUBSCRIPTION_CHECKS = {
    "2026-07-28": ("server-stateless", [
        "sep-2575-server-sends-subscription-ack", "sep-2575-server-tags-subscription-id",
        "sep-2575-server-honors-notification-filter", "sep-2575-server-sends-tools-list-changed-on-subscription",
        "sep-2575-server-sends-prompts-list-changed-on-subscription"]),
}


@pytest.mark.skipif(not conformance.available(), reason="the conformance suite is not installed (make node)")
def test_conformance_subscription_and_list_changed_checks_pass(tmp_path: Path) -> None:
    with contextlib.ExitStack() as stack:
        fixture = stack.enter_context(start_demo_server("fixture", name="fixture"))
        gw = stack.enter_context(start_gateway(tmp_path / "gw", {"fixture": fixture.url}, prefixMode="never"))
        for version, (scenario, wanted) in SUBSCRIPTION_CHECKS.items():
            out = tmp_path / version
            conformance.run_conformance_detailed(gw.url, version, out, scenario=scenario)
            statuses = checks_by_id(out)
            assert {c: statuses.get(c) for c in wanted} == dict.fromkeys(wanted, "SUCCESS")
        for scenario in ("resources-subscribe", "resources-unsubscribe"):
            result = conformance.run_conformance_detailed(gw.url, "2025-11-25", tmp_path / scenario,
                                                          scenario=scenario)
            assert result[scenario].passed and not result[scenario].statuses["SKIPPED"], result[scenario]


def checks_by_id(out: Path) -> dict[str, str]:
    statuses: dict[str, str] = {}
    for checks in out.glob("*/checks.json"):
        for check in orjson.loads(checks.read_bytes()):
            statuses[check["id"]] = check["status"]
    return statuses


# ---------------------------------------------------------------------------------------------- login, reach


@dataclass
class Signed:
    gateway: Gateway
    idp: Idp
    tokens: dict[str, str]


@pytest.fixture(scope="module")
def signed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Signed]:
    """OAuth at the edge, with one per-user OAuth server (alice signs in to it, bob never does)."""
    work = tmp_path_factory.mktemp("signed")
    listen = f"127.0.0.1:{free_port()}"
    resource = f"http://{listen}/mcp"
    oauth_port = free_port()
    oauth_url = f"http://127.0.0.1:{oauth_port}/mcp"
    clients: list[dict[str, Any]] = [{"client_id": u, "client_secret": f"{u}-secret"} for u in ("alice", "bob")]
    clients += [{"client_id": "muster-edge", "client_secret": "oauth-client-secret",
                 "grant_types": ["authorization_code", "refresh_token"],
                 "redirect_uris": [f"http://{listen}/oauth/callback"], "scope": "openid offline_access mcp:tools"},
                {"client_id": "muster-edge-login", "client_secret": "edge-login-secret",
                 "grant_types": ["authorization_code"], "redirect_uris": [f"http://{listen}/oauth/callback"],
                 "scope": "openid"}]
    resources = [{"audience": resource, "scope": "mcp:tools", "accessTokenTTL": 600},
                 {"audience": oauth_url, "scope": "mcp:tools", "accessTokenTTL": 600}]
    (work / "oauth-client-secret").write_text("oauth-client-secret")
    (work / "edge-login-secret").write_text("edge-login-secret")
    with contextlib.ExitStack() as stack:
        users = [{"sub": "alice", "password": "pw"}, {"sub": "bob", "password": "pw"}]
        idp = stack.enter_context(start_idp(work / "idp", clients=clients, resources=resources, users=users))
        vendor = stack.enter_context(start_demo_server("vendor", name="vendor"))
        oauth = stack.enter_context(start_demo_server("prometheus", port=oauth_port, name="oauth-srv",
                                                      require_jwt=idp.issuer, audience=oauth_url))
        servers = {"vendor": vendor.url, "oauth-srv": {"url": oauth.url, "auth": {"type": "oauth"}}}
        gateway = stack.enter_context(start_gateway(
            work / "gw", servers, listen=listen, listTtlFloorMs=600_000,
            auth={"issuer": idp.issuer, "jwksUri": idp.jwks_uri, "resource": resource},
            upstreamOAuth={"clientId": "muster-edge", "clientSecretFile": str(work / "oauth-client-secret")},
            edgeLogin={"clientId": "muster-edge-login", "clientSecretFile": str(work / "edge-login-secret")}))
        tokens = {u: idp.client_credentials(u, f"{u}-secret", resource=resource, scope="mcp:tools")
                  for u in ("alice", "bob")}
        yield Signed(gateway, idp, tokens)


@contextlib.asynccontextmanager
async def as_user(signed: Signed, user: str, inbox: Inbox) -> AsyncIterator[Client]:
    before = listening(signed.gateway)
    http = httpx2.AsyncClient(headers={"authorization": f"Bearer {signed.tokens[user]}"}, timeout=30)
    try:
        async with Client(streamable_http_client(signed.gateway.url, http_client=http), mode="legacy",
                          message_handler=inbox.handler) as client:
            await until(lambda: listening(signed.gateway) > before, f"{user}'s GET stream to open")
            yield client
    finally:
        await http.aclose()


def test_login_and_logout_tell_only_the_caller_who_sees_the_change(signed: Signed) -> None:
    async def main() -> None:
        alice_inbox, bob_inbox = Inbox(), Inbox()
        async with as_user(signed, "alice", alice_inbox) as alice, as_user(signed, "bob", bob_inbox) as bob:
            assert not any(n.startswith("x_oauth-srv_") for n in await tool_names(alice))
            login = await alice.call_tool("core_auth_login", {"server": "oauth-srv"})
            url = login.structured_content["authUrl"]  # type: ignore[index]
            callback = f"{signed.gateway.url.rsplit('/mcp', 1)[0]}/oauth/callback"
            back = signed.idp.browse(url, callback, user="alice", password="pw")
            proved = signed.idp.browse(back, callback, user="alice", password="pw")
            async with httpx2.AsyncClient(timeout=20) as browser:
                assert (await browser.get(proved)).status_code == 200
            await until(lambda: alice_inbox.count("notifications/tools/list_changed") == 1, "alice told of the login")
            assert any(n.startswith("x_oauth-srv_") for n in await tool_names(alice))
            await alice.call_tool("core_auth_logout", {"server": "oauth-srv"})
            await until(lambda: alice_inbox.count("notifications/tools/list_changed") == 2, "alice told of the logout")
            assert not any(n.startswith("x_oauth-srv_") for n in await tool_names(alice))
            # bob, listening all along, saw neither: his view never changed
            await bob.call_tool("x_vendor_echo", {"text": "still here"})
            assert bob_inbox.count("notifications/tools/list_changed") == 0
            assert alice_inbox.count("notifications/tools/list_changed") == 2

    asyncio.run(main())


def test_two_workers_tell_each_client_once(tmp_path: Path) -> None:
    """Every worker follows the upstream itself and tells only the streams it holds: one notification each."""
    async def main(gateway: Gateway) -> None:
        inboxes = [Inbox() for _ in range(4)]
        async with contextlib.AsyncExitStack() as stack:
            clients = [await stack.enter_async_context(legacy_client(gateway, inbox)) for inbox in inboxes]
            held = [s["notifications"]["listening"] for s in worker_status(gateway)]
            assert min(held) >= 1, held  # the streams are spread over both workers
            await clients[0].call_tool("x_vendor_toggle_beta", {})
            await until(lambda: all(i.count("notifications/tools/list_changed") >= 1 for i in inboxes),
                        "every client told")
            await clients[1].call_tool("x_vendor_echo", {"text": "settle"})
            assert [i.count("notifications/tools/list_changed") for i in inboxes] == [1, 1, 1, 1], held

    with start_demo_server("vendor", name="vendor") as vendor, \
            start_gateway(tmp_path / "gw", {"vendor": vendor.url}, processor={"workers": 2}) as gateway:
        asyncio.run(main(gateway))


def test_a_deleted_session_ends_its_get_stream(setup: Setup) -> None:
    async def main() -> None:
        base = listening(setup.gateway)
        init = {"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
            "protocolVersion": "2025-11-25", "capabilities": {}, "clientInfo": {"name": "t", "version": "1"}}}
        accept = {"accept": "application/json, text/event-stream", "content-type": "application/json"}
        async with httpx2.AsyncClient(timeout=TIMEOUT) as http:
            session = (await http.post(setup.gateway.url, content=orjson.dumps(init),
                                       headers=accept)).headers["mcp-session-id"]
            headers = {"mcp-session-id": session, "mcp-protocol-version": "2025-11-25"}
            async with http.stream("GET", setup.gateway.url,
                                   headers={**headers, "accept": "text/event-stream"}) as stream:
                assert stream.status_code == 200
                await until(lambda: listening(setup.gateway) == base + 1, "the GET stream to be held")
                assert (await http.delete(setup.gateway.url, headers=headers)).status_code == 200
                await asyncio.wait_for(stream.aread(), TIMEOUT)  # the stream ends
        await until(lambda: listening(setup.gateway) == base, "the stream to be released")

    asyncio.run(main())


def test_a_handshake_era_upstream_list_changed_reaches_both_eras(tmp_path: Path) -> None:
    """The gateway follows a handshake-era upstream on its own session's GET stream."""
    async def main(gateway: Gateway) -> None:
        inbox = Inbox()
        async with legacy_client(gateway, inbox) as client, \
                Client(gateway.url, mode="2026-07-28") as modern_client, \
                modern_client.listen(tools_list_changed=True) as sub:
            await client.call_tool("x_vendor_toggle_beta", {})
            await until(lambda: inbox.count("notifications/tools/list_changed") == 1, "tools/list_changed")
            assert isinstance(await asyncio.wait_for(sub.__anext__(), TIMEOUT), ToolsListChanged)
            assert "x_vendor_beta_feature" in await tool_names(client)

    with start_demo_server("vendor", name="vendor", era="legacy") as vendor, \
            start_gateway(tmp_path / "gw", {"vendor": vendor.url}) as gateway:
        asyncio.run(main(gateway))


def test_a_listening_stream_ends_when_its_bearer_expires(tmp_path: Path) -> None:
    """A stream never outlives the token that opened it: when Envoy would refuse the token (exp + clockSkewSeconds)
    the listen ends with its result, and the same token cannot open another (401: the client renews it)."""
    listen = f"127.0.0.1:{free_port()}"
    resource = f"http://{listen}/mcp"
    with contextlib.ExitStack() as stack:
        idp = stack.enter_context(start_idp(
            tmp_path / "idp", clients=[{"client_id": "carol", "client_secret": "carol-secret"}],
            resources=[{"audience": resource, "scope": "mcp:tools", "accessTokenTTL": 4}]))
        vendor = stack.enter_context(start_demo_server("vendor", name="vendor"))
        gateway = stack.enter_context(start_gateway(
            tmp_path / "gw", {"vendor": vendor.url}, listen=listen,
            auth={"issuer": idp.issuer, "jwksUri": idp.jwks_uri, "resource": resource, "clockSkewSeconds": 1}))
        token = idp.client_credentials("carol", "carol-secret", resource=resource, scope="mcp:tools")
        exp = idp.decode(token, audience=resource)["exp"]
        meta = {"io.modelcontextprotocol/protocolVersion": "2026-07-28",
                "io.modelcontextprotocol/clientCapabilities": {}}
        body = {"jsonrpc": "2.0", "id": "exp-1", "method": "subscriptions/listen",
                "params": {"notifications": {"toolsListChanged": True}, "_meta": meta}}
        headers = {"accept": "application/json, text/event-stream", "content-type": "application/json",
                   "mcp-protocol-version": "2026-07-28", "mcp-method": "subscriptions/listen",
                   "authorization": f"Bearer {token}"}

        async def main() -> list[dict[str, Any]]:
            frames: list[dict[str, Any]] = []
            async with httpx2.AsyncClient(timeout=TIMEOUT) as http, asyncio.timeout(30), \
                    http.stream("POST", gateway.url, content=orjson.dumps(body), headers=headers) as resp:
                assert resp.status_code == 200, await resp.aread()
                async for line in resp.aiter_lines():  # until the gateway ends the stream
                    if line.startswith("data:"):
                        frames.append(orjson.loads(line[5:]))
            return frames

        frames = asyncio.run(main())
        ended = time.time()
        assert frames[0]["method"] == "notifications/subscriptions/acknowledged"
        assert frames[-1] == {"jsonrpc": "2.0", "id": "exp-1", "result": {
            "_meta": {"io.modelcontextprotocol/subscriptionId": "exp-1"}, "resultType": "complete"}}, frames
        assert ended >= exp, "the stream ended before its token expired"
        again = httpx2.post(gateway.url, content=orjson.dumps(body), headers=headers, timeout=TIMEOUT)
        assert again.status_code == 401 and "error" in again.json(), again.text
        assert listening(gateway) == 0
