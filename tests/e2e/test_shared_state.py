"""Shared state in a real Redis: two processor workers share exchanged tokens, sealed, and exchange once."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx2
import pytest
import redis

from tests.gateway_harness import Gateway, start_gateway
from tests.idp import GRANT_TOKEN_EXCHANGE, Idp, start_idp
from tests.procs import ROOT, free_port, start_demo_server, stop

MODERN = "2026-07-28"


def redis_binary() -> str:
    local = ROOT / ".tools" / "redis-server"
    found = str(local) if local.exists() else shutil.which("redis-server")
    if not found:
        pytest.fail("redis-server is not installed: run `make redis` (make test does)")
    return found


@contextlib.contextmanager
def start_redis(workdir: Path) -> Iterator[str]:
    port = free_port()
    proc = subprocess.Popen([redis_binary(), "--bind", "127.0.0.1", "--port", str(port), "--save", "",
                             "--appendonly", "no", "--dir", str(workdir)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.2):
                break
            time.sleep(0.05)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        stop(proc)


@dataclass
class Shared:
    gateway: Gateway
    idp: Idp
    redis_url: str
    token: str

    def call(self, msg_id: int) -> dict[str, Any]:
        meta = {"io.modelcontextprotocol/protocolVersion": MODERN, "io.modelcontextprotocol/clientCapabilities": {}}
        headers = {"accept": "application/json, text/event-stream", "content-type": "application/json",
                   "authorization": f"Bearer {self.token}", "mcp-protocol-version": MODERN,
                   "mcp-method": "tools/call", "mcp-name": "x_k8s_whoami"}
        return {"url": self.gateway.url, "headers": headers, "json": {
            "jsonrpc": "2.0", "id": msg_id, "method": "tools/call",
            "params": {"name": "x_k8s_whoami", "arguments": {}, "_meta": meta}}}

    def exchanges(self) -> int:
        return sum(r["grant_type"] == GRANT_TOKEN_EXCHANGE for r in self.idp.recent_requests())


@contextlib.contextmanager
def two_workers_with_redis(tmp_path: Path, max_token_uses: int = 0) -> Iterator[Shared]:
    """Two processor workers sharing a real Redis, in front of an upstream that checks its exchanged tokens."""
    listen = f"127.0.0.1:{free_port()}"
    resource = f"http://{listen}/mcp"
    upstream_port = free_port()
    audience = f"http://127.0.0.1:{upstream_port}/mcp"
    secrets = tmp_path / "secrets" / "default" / "exchanger"
    secrets.mkdir(parents=True)
    (secrets / "client-id").write_text("exchanger")
    (secrets / "client-secret").write_text("exchanger-secret")
    with contextlib.ExitStack() as stack:
        url = stack.enter_context(start_redis(tmp_path))
        idp = stack.enter_context(start_idp(
            tmp_path / "idp", token_exchange=True,
            clients=[{"client_id": "zoe", "client_secret": "z"},
                     {"client_id": "exchanger", "client_secret": "exchanger-secret",
                      "grant_types": ["client_credentials", GRANT_TOKEN_EXCHANGE]}],
            resources=[{"audience": resource, "scope": "mcp:tools"}, {"audience": audience, "scope": "mcp:tools"}]))
        stack.enter_context(start_demo_server("kubernetes", port=upstream_port, name="k8s", require_jwt=idp.issuer,
                                              audience=audience, max_token_uses=max_token_uses))
        exchange = {"enabled": True, "dexTokenEndpoint": idp.token_endpoint, "connectorId": "central-dex",
                    "audience": audience, "scopes": "mcp:tools", "clientCredentialsSecretRef": {"name": "exchanger"}}
        gw = stack.enter_context(start_gateway(
            tmp_path / "gw", {"k8s": {"url": audience, "auth": {"tokenExchange": exchange}}}, listen=listen,
            processor={"workers": 2}, store={"redis": url}, secretsDir=str(tmp_path / "secrets"),
            listTtlMs=600_000, listTtlFloorMs=600_000,  # no list refreshes racing the calls for token uses
            auth={"issuer": idp.issuer, "jwksUri": idp.jwks_uri, "resource": resource}))
        yield Shared(gw, idp, url, idp.client_credentials("zoe", "z", resource=resource))


def served_by_k8s(answer: httpx2.Response) -> bool:
    return answer.status_code == 200 and '\\"server\\": \\"k8s\\"' in answer.text


async def test_two_workers_share_one_sealed_exchanged_token(tmp_path: Path) -> None:
    with two_workers_with_redis(tmp_path) as shared:
        gw, idp, url, token = shared.gateway, shared.idp, shared.redis_url, shared.token
        async with httpx2.AsyncClient(timeout=60, limits=httpx2.Limits(max_connections=30)) as http:
            answers = await asyncio.gather(*(http.post(**shared.call(i)) for i in range(30)))
        assert all(served_by_k8s(a) for a in answers), answers[0].text
        assert shared.exchanges() == 1, idp.recent_requests()
        status_port = int(gw.status_url.rsplit(":", 1)[1].split("/")[0])
        async with httpx2.AsyncClient(timeout=5) as http:
            for worker in (0, 1):  # both workers served zoe, with the one token
                status = (await http.get(f"http://127.0.0.1:{status_port + worker}/status")).json()
                assert status["servers"][0]["users"] == {"Connected": 1}, (worker, status)  # counted, never named
        client = redis.Redis.from_url(url)
        keys = client.keys("muster-edge:exchange:*")
        assert len(keys) == 1
        stored = client.get(keys[0])
        assert stored is not None and b"eyJ" not in stored and token.encode() not in stored


async def test_a_refused_token_is_renewed_whichever_worker_sees_the_401(tmp_path: Path) -> None:
    """The answer's own ext_proc stream may reach the other worker: what the resend needs travels sealed in
    Envoy's metadata, so every call still gets its answer. The upstream refuses each token after 20 uses: enough
    for a worker's own list fetch (5) and its event stream to finish on one token while the calls go on."""
    with two_workers_with_redis(tmp_path, max_token_uses=20) as shared:
        async with httpx2.AsyncClient(timeout=60) as http:
            answers = [await http.post(**shared.call(i)) for i in range(300)]
            assert all(served_by_k8s(a) for a in answers), [a.text for a in answers if not served_by_k8s(a)][:1]
            status_port = int(shared.gateway.status_url.rsplit(":", 1)[1].split("/")[0])
            retried = [sum(int(line.rsplit(" ", 1)[1]) for line in
                           (await http.get(f"http://127.0.0.1:{status_port + worker}/metrics")).text.splitlines()
                           if line.startswith('muster_edge_upstream_retries_total{outcome="ok",server="k8s"}'))
                       for worker in (0, 1)]
        # about one call in twenty met a refused token; both workers resent some of them
        assert sum(retried) >= 8 and all(retried), retried
        assert shared.exchanges() >= sum(retried)
        assert shared.token not in shared.gateway.log()
