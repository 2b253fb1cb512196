"""stdio and sse upstreams through the gateway's bridge, `muster-edge bridge` and `muster-edge agent`: real
processes only (the npm reference server, servers written with the mcp SDK, the real Envoy and IdP)."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx2
import jwt
import mcp_types as types
import pytest
from mcp import Client
from mcp.client.stdio import StdioServerParameters, stdio_client
from mcp.client.streamable_http import streamable_http_client
from mcp.shared.exceptions import MCPError

from tests.e2e.conftest import connect
from tests.gateway_harness import Gateway, start_gateway
from tests.idp import GRANT_TOKEN_EXCHANGE, start_idp
from tests.procs import PYTHON, ROOT, SERVERS, free_port, start_demo_server

MODERN = "2026-07-28"
LEGACY = "legacy"
EVERYTHING = ROOT / ".tools/node/node_modules/@modelcontextprotocol/server-everything/dist/index.js"
NODE = shutil.which("node") or "/usr/bin/node"


def stdio_spec(command: str | os.PathLike[str], *args: str | os.PathLike[str], **spec: Any) -> dict[str, Any]:
    return {"url": None, "type": "stdio", "command": os.fspath(command), "args": [os.fspath(a) for a in args],
            **spec}


def sdk_stdio(kind: str = "vendor", name: str = "local", **spec: Any) -> dict[str, Any]:
    return stdio_spec(PYTHON, SERVERS, kind, "--transport", "stdio", "--name", name, **spec)


def everything_stdio(**spec: Any) -> dict[str, Any]:
    return stdio_spec(NODE, EVERYTHING, "stdio", **spec)


@contextlib.contextmanager
def gateway(tmp_path: Path, servers: dict[str, dict[str, Any]], **config: Any) -> Iterator[Gateway]:
    with start_gateway(tmp_path, {n: _clean(s) for n, s in servers.items()}, **config) as gw:
        yield gw


def _clean(spec: dict[str, Any]) -> dict[str, Any]:
    """The harness wants a url key; stdio manifests have none."""
    return dict(spec)


def wait(predicate: Callable[[], Any], timeout: float = 20, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        with contextlib.suppress(Exception):
            last = predicate()
            if last:
                return last
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what} (last: {last!r})")


def process_state(gw: Gateway, name: str) -> dict[str, Any]:
    entry = gw.server_state(name) or {}
    return dict(entry.get("process") or {})


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def in_group(pgid: int) -> list[int]:
    """Live processes of a process group (a /proc scan)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as fh:
                fields = fh.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            found.append(int(entry))
    return found


def text(result: Any) -> str:
    return "".join(getattr(c, "text", "") for c in result.content)


SECRET = "stdio-secret-value-4711"


@pytest.mark.parametrize("mode", [MODERN, LEGACY])
async def test_stdio_servers_from_npm_and_the_sdk_are_listed_and_called(tmp_path: Path, mode: str,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MUSTER_EDGE_TEST_STDIO_SECRET", SECRET)  # in the gateway's environment, not the child's
    (tmp_path / "greeting").write_text("hello from a file\n")
    env = {"API_TOKEN": "${env:MUSTER_EDGE_TEST_STDIO_SECRET}", "GREETING": f"${{file:{tmp_path / 'greeting'}}}"}
    servers = {"everything": everything_stdio(autoStart=True, env=env), "local": sdk_stdio(toolPrefix="loc")}
    with gateway(tmp_path, servers) as gw:
        async with connect(gw.url, mode) as client:
            names = {t.name for t in (await client.list_tools()).tools}
            assert "x_everything_echo" in names and "x_loc_echo" in names and "x_loc_slow_count" in names
            result = await client.call_tool("x_everything_echo", {"message": "hi from npm"})
            assert "hi from npm" in text(result) and not result.is_error
            result = await client.call_tool("x_loc_echo", {"text": "hi from the sdk"})
            assert text(result) == "hi from the sdk"
            progress: list[float] = []

            async def on_progress(done: float, total: float | None, message: str | None) -> None:
                progress.append(done)

            result = await client.call_tool("x_loc_slow_count", {"n": 3}, progress_callback=on_progress)
            assert text(result) == "counted to 3"
            child_env = json.loads(text(await client.call_tool("x_everything_get-env", {})))
        # Only PATH, a private HOME, LANG and the manifest's env (resolved); nothing else of the gateway's.
        assert set(child_env) - {"PATH", "HOME", "LANG", "API_TOKEN", "GREETING"} <= {"PWD", "OLDPWD", "SHLVL", "_"}
        assert "MUSTER_EDGE_TEST_STDIO_SECRET" not in child_env and child_env["API_TOKEN"] == SECRET
        assert child_env["GREETING"] == "hello from a file" and child_env["HOME"] != os.environ.get("HOME")
        state = process_state(gw, "everything")
        assert state["state"] == "Running" and state["pid"] > 0
        assert SECRET not in json.dumps(gw.status()) and SECRET not in gw.log()
        assert "[everything] Starting default (STDIO) server" in gw.log()  # stderr, with the server's name


async def test_a_killed_stdio_server_fails_cleanly_then_is_restarted_and_removal_stops_it(tmp_path: Path) -> None:
    with gateway(tmp_path, {"local": sdk_stdio(autoStart=True)}) as gw:
        async with connect(gw.url, MODERN) as client:
            assert text(await client.call_tool("x_local_echo", {"text": "one"})) == "one"
            first = wait(lambda: process_state(gw, "local").get("pid"), what="a pid in the status")
            os.killpg(first, signal.SIGKILL)
            wait(lambda: process_state(gw, "local")["state"] != "Running", what="the crash in the status")
            with pytest.raises(MCPError) as gap:  # in the gap: a JSON-RPC error naming the server
                await client.call_tool("x_local_echo", {"text": "gap"})
            assert "MCP server local is unavailable" in gap.value.error.message
            state = wait(lambda: process_state(gw, "local").get("state") == "Running" and process_state(gw, "local"),
                         what="the restart")
            assert state["restarts"] >= 1 and state["pid"] != first and state["lastExitCode"] == -9
            assert text(await client.call_tool("x_local_echo", {"text": "two"})) == "two"
        second = state["pid"]
        gw.remove_manifest("local.yaml")
        wait(lambda: not in_group(second), what="the process group to be gone after the manifest was removed")


async def test_auto_start_false_starts_the_process_on_first_list_not_with_the_gateway(tmp_path: Path) -> None:
    with gateway(tmp_path, {"eager": sdk_stdio(name="eager", autoStart=True),
                            "lazy": sdk_stdio(name="lazy", autoStart=False)}) as gw:
        wait(lambda: process_state(gw, "eager").get("state") == "Running", what="the autoStart server running")
        assert not process_state(gw, "lazy").get("pid"), process_state(gw, "lazy")  # not started yet
        async with connect(gw.url, MODERN) as client:
            names = {t.name for t in (await client.list_tools()).tools}
            assert "x_lazy_echo" in names  # the first list started it and waited for it
            assert text(await client.call_tool("x_lazy_echo", {"text": "hi"})) == "hi"
        assert process_state(gw, "lazy").get("state") == "Running"


async def test_a_sigkilled_gateway_leaves_no_process(tmp_path: Path) -> None:
    servers = {"everything": everything_stdio(autoStart=True), "local": sdk_stdio(autoStart=True)}
    with gateway(tmp_path, servers) as gw:
        pids = [wait(lambda n=n: process_state(gw, n).get("pid"), what=f"{n} running") for n in servers]
        assert all(in_group(p) for p in pids)
        os.kill(gw.process.pid, signal.SIGKILL)
        wait(lambda: not any(in_group(p) for p in pids), what="every stdio process group to be gone")


def sse_spec(url: str, **spec: Any) -> dict[str, Any]:
    return {"url": url, "type": "sse", **spec}


async def accept_contact(context: Any, params: Any) -> types.ElicitResult:
    return types.ElicitResult(action="accept", content={"username": "alice", "email": "alice@example.com"})


@pytest.mark.parametrize("mode", [LEGACY, MODERN])
async def test_an_sse_upstream_with_static_headers_relays_an_elicitation(tmp_path: Path, mode: str) -> None:
    (tmp_path / "token").write_text("sse-static-bearer\n")
    records = tmp_path / "sse.jsonl"
    with contextlib.ExitStack() as stack:
        up = stack.enter_context(start_demo_server("fixture", name="legacy", transport="sse",
                                                   require_bearer="sse-static-bearer", record_headers=records))
        headers = {"Authorization": f"Bearer ${{file:{tmp_path / 'token'}}}"}
        gw = stack.enter_context(gateway(tmp_path / "gw", {"legacy": sse_spec(up.url, headers=headers)}))
        async with Client(gw.url, mode=mode, elicitation_callback=accept_contact) as client:
            names = {t.name for t in (await client.list_tools()).tools}
            assert "x_legacy_test_simple_text" in names
            result = await client.call_tool("x_legacy_test_simple_text", {})
            assert "This is a simple text response for testing." in text(result)
            if mode == LEGACY:  # the 2026-07-28 revision has no server-to-client requests
                result = await client.call_tool("x_legacy_test_elicitation", {"message": "Who are you?"})
                assert "action=accept" in text(result) and "alice@example.com" in text(result), text(result)
        seen = [json.loads(line) for line in records.read_text().splitlines()]
        assert {r["headers"].get("authorization") for r in seen} == {"Bearer sse-static-bearer"}
        assert any(r["path"].startswith("/messages") for r in seen) and any(r["path"] == "/sse" for r in seen)
        assert gw.server_state("legacy")["process"]["state"] == "Connected"  # type: ignore[index]
        assert "sse-static-bearer" not in gw.log() and "sse-static-bearer" not in json.dumps(gw.status())


async def test_an_sse_upstream_with_token_exchange_gets_its_own_token_per_user(tmp_path: Path) -> None:
    listen = f"127.0.0.1:{free_port()}"
    resource = f"http://{listen}/mcp"
    sse_port = free_port()
    audience = f"http://127.0.0.1:{sse_port}/sse"
    users = ("alice", "bob")
    clients: list[dict[str, Any]] = [{"client_id": u, "client_secret": f"{u}-secret"} for u in users]
    clients.append({"client_id": "exchanger", "client_secret": "exchanger-secret",
                    "grant_types": ["client_credentials", GRANT_TOKEN_EXCHANGE]})
    resources = [{"audience": resource, "scope": "mcp:tools", "accessTokenTTL": 600},
                 {"audience": audience, "scope": "mcp:tools", "accessTokenTTL": 600}]
    secrets = tmp_path / "secrets" / "default" / "exchanger-creds"
    secrets.mkdir(parents=True)
    (secrets / "client-id").write_text("exchanger\n")
    (secrets / "client-secret").write_text("exchanger-secret\n")
    records = tmp_path / "sse.jsonl"
    with contextlib.ExitStack() as stack:
        idp = stack.enter_context(start_idp(tmp_path / "idp", clients=clients, resources=resources,
                                            token_exchange=True))
        stack.enter_context(start_demo_server("kubernetes", port=sse_port, name="remote", transport="sse",
                                              require_jwt=idp.issuer, audience=audience, record_headers=records))
        exchange = {"enabled": True, "dexTokenEndpoint": idp.token_endpoint, "connectorId": "central-dex",
                    "expectedIssuer": idp.issuer, "audience": audience, "scopes": "mcp:tools",
                    "clientCredentialsSecretRef": {"name": "exchanger-creds"}}
        gw = stack.enter_context(gateway(
            tmp_path / "gw", {"remote": sse_spec(audience, auth={"tokenExchange": exchange})}, listen=listen,
            secretsDir=str(tmp_path / "secrets"), auth={"issuer": idp.issuer, "jwksUri": idp.jwks_uri,
                                                        "resource": resource}))
        tokens = {u: idp.client_credentials(u, f"{u}-secret", resource=resource, scope="mcp:tools") for u in users}
        for user in users:
            http = httpx2.AsyncClient(headers={"authorization": f"Bearer {tokens[user]}"}, timeout=30)
            try:
                async with Client(streamable_http_client(gw.url, http_client=http), mode=LEGACY) as client:
                    result = await client.call_tool("x_remote_whoami", {})
                    assert json.loads(text(result))["server"] == "remote", text(result)
            finally:
                await http.aclose()
        seen = [json.loads(line) for line in records.read_text().splitlines()]
        bearers = {r["headers"].get("authorization", "")[7:] for r in seen}
        subjects = {jwt.decode(b, options={"verify_signature": False})["sub"] for b in bearers if b}
        assert subjects == set(users) and not bearers & set(tokens.values())  # exchanged, never the caller's
        assert all(jwt.decode(b, options={"verify_signature": False})["aud"] == audience for b in bearers)
        assert gw.server_state("remote")["process"]["connections"] == 2  # type: ignore[index]  # one per user


# ---- muster-edge agent ---------------------------------------------------------------------------------------

MUSTER_EDGE = ROOT / ".venv" / "bin" / "muster-edge"


@contextlib.contextmanager
def protected_gateway(tmp_path: Path, redirect_port: int) -> Iterator[tuple[Gateway, Any, str]]:
    listen = f"127.0.0.1:{free_port()}"
    resource = f"http://{listen}/mcp"
    clients = [{"client_id": "alice", "client_secret": "alice-secret"},
               {"client_id": "agent-cli", "grant_types": ["authorization_code", "refresh_token"],
                "redirect_uris": [f"http://127.0.0.1:{redirect_port}/callback"]}]
    resources = [{"audience": resource, "scope": "mcp:tools", "accessTokenTTL": 600}]
    with contextlib.ExitStack() as stack:
        idp = stack.enter_context(start_idp(tmp_path / "idp", clients=clients, resources=resources,
                                            users=[{"sub": "alice", "password": "pw"}]))
        gw = stack.enter_context(gateway(tmp_path / "gw", {"local": sdk_stdio()}, listen=listen, auth={
            "issuer": idp.issuer, "jwksUri": idp.jwks_uri, "resource": resource, "scopesSupported": ["mcp:tools"]}))
        yield gw, idp, resource


def agent_params(gw: Gateway, home: Path, **env: str) -> StdioServerParameters:
    base = {"PATH": os.environ["PATH"], "HOME": str(home), "XDG_CONFIG_HOME": str(home / ".config"), **env}
    return StdioServerParameters(command=str(MUSTER_EDGE),
                                 args=["--log-level", "WARNING", "agent", "--url", gw.url, "--no-browser",
                                       "--client-id", "agent-cli", "--redirect-port", env.get("PORT", "0")],
                                 env=base)


@pytest.mark.parametrize("mode", [LEGACY, MODERN])
async def test_the_agent_forwards_a_stdio_client_to_the_gateway_with_a_token(tmp_path: Path, mode: str) -> None:
    with protected_gateway(tmp_path, free_port()) as (gw, idp, resource):
        token = idp.client_credentials("alice", "alice-secret", resource=resource, scope="mcp:tools")
        async with Client(stdio_client(agent_params(gw, tmp_path, MUSTER_EDGE_TOKEN=token)), mode=mode) as client:
            names = {t.name for t in (await client.list_tools()).tools}
            assert "x_local_echo" in names and "authenticate_muster" not in names
            assert text(await client.call_tool("x_local_echo", {"text": "through the agent"})) == "through the agent"
            progress: list[float] = []

            async def on_progress(done: float, total: float | None, message: str | None) -> None:
                progress.append(done)

            result = await client.call_tool("x_local_slow_count", {"n": 2}, progress_callback=on_progress)
            assert text(result) == "counted to 2"
        assert token not in gw.log()


async def test_the_agent_login_flow_caches_a_private_token_and_offers_authenticate_muster_until_then(
        tmp_path: Path) -> None:
    port = free_port()
    with protected_gateway(tmp_path, port) as (gw, idp, _resource):
        home = tmp_path / "home"
        async with Client(stdio_client(agent_params(gw, home, PORT=str(port))), mode=LEGACY) as client:
            assert [t.name for t in (await client.list_tools()).tools] == ["authenticate_muster"]
            status = json.loads(text(await client.call_tool("authenticate_muster", {})))
            assert status["status"] == "auth_required" and status["auth_url"].startswith(idp.issuer)
            # The test is the user's browser: sign in, and follow the redirect to the agent's loopback.
            location = idp.browse(status["auth_url"], f"http://127.0.0.1:{port}/callback", user="alice", password="pw")
            async with httpx2.AsyncClient() as browser:
                assert (await browser.get(location)).status_code == 200

            deadline = time.monotonic() + 20
            names: set[str] = set()
            while time.monotonic() < deadline and "x_local_echo" not in names:
                names = {t.name for t in (await client.list_tools()).tools}
            assert "x_local_echo" in names
            assert text(await client.call_tool("x_local_echo", {"text": "signed in"})) == "signed in"
        cached = list((home / ".config" / "muster-edge" / "agent").glob("*.json"))
        assert len(cached) == 1 and (cached[0].stat().st_mode & 0o777) == 0o600
        # A new agent uses the cached token without a login.
        async with Client(stdio_client(agent_params(gw, home)), mode=MODERN) as client:
            assert text(await client.call_tool("x_local_echo", {"text": "cached"})) == "cached"


async def test_an_sse_upstream_that_refuses_the_credential_is_reported_not_hidden(tmp_path: Path) -> None:
    with contextlib.ExitStack() as stack:
        up = stack.enter_context(start_demo_server("fixture", name="locked", transport="sse", require_bearer="right"))
        wrong = {"Authorization": "Bearer wrong"}
        gw = stack.enter_context(gateway(tmp_path / "gw", {"locked": sse_spec(up.url, headers=wrong),
                                                           "local": sdk_stdio()}))
        entry = wait(lambda: (e := gw.server_state("locked")) and e["state"] not in ("Connecting",) and e,
                     what="the refused sse server in the status")
        assert entry["state"] != "Connected" and "401" in json.dumps(entry), entry
        async with connect(gw.url, LEGACY) as client:  # the rest of the fleet keeps serving
            assert text(await client.call_tool("x_local_echo", {"text": "still here"})) == "still here"
