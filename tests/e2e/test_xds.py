"""xDS: one processor serves the catalog's clusters and routes to several real Envoys over gRPC ADS. A manifest added
or removed reaches every Envoy; an Envoy started later converges; a new server is listed only once every connected
Envoy has acknowledged its cluster (one that rejects it, or does not answer, holds the listing back); two whole
replicas behind one Redis make one token exchange per token lifetime."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx2
import redis
import yaml

from catalog.config import parse_config
from extproc import envoy_config
from extproc.upstream import cluster_name
from tests.e2e.conftest import connect
from tests.e2e.test_catalog_live import mcp_error
from tests.e2e.test_shared_state import start_redis
from tests.gateway_harness import MUSTER_EDGE, manifest, start_gateway
from tests.idp import GRANT_TOKEN_EXCHANGE, start_idp
from tests.procs import PYTHON, ROOT, SERVERS, free_port, free_port_block, start_demo_server, stop

MODERN = "2026-07-28"
ENVOY = ROOT / ".venv" / "bin" / "envoy"


def get_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=5) as resp:
        return json.loads(resp.read())


def until(predicate: Callable[[], Any], what: str, timeout: float = 20) -> Any:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        with contextlib.suppress(Exception):
            last = predicate()
            if last:
                return last
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what} (last: {last!r})")


async def auntil(predicate: Callable[[], Any], what: str, timeout: float = 20) -> Any:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        with contextlib.suppress(Exception):
            last = await predicate()
            if last:
                return last
        await asyncio.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what} (last: {last!r})")


@dataclass
class Envoy:
    node: str
    url: str
    admin: str
    proc: subprocess.Popen[bytes]

    def clusters(self) -> set[str]:
        with urllib.request.urlopen(f"{self.admin}/clusters?format=json", timeout=5) as resp:
            return {c["name"] for c in json.loads(resp.read())["cluster_statuses"]}


@dataclass
class Setup:
    """One processor (xds: true) and the Envoys it feeds; its own upstream calls go through the first Envoy."""

    root: Path
    catalog: Path
    raw: dict[str, Any]
    processor_port: int
    status_url: str
    envoys: list[Envoy] = field(default_factory=list)
    stack: contextlib.ExitStack = field(default_factory=contextlib.ExitStack)

    def status(self) -> dict[str, Any]:
        return dict(get_json(self.status_url))

    def server(self, name: str) -> dict[str, Any] | None:
        return next((s for s in self.status()["servers"] if s["name"] == name), None)

    def acked_nodes(self) -> dict[str, int]:
        return {n["node"]: n["ackedServers"] for n in self.status()["xds"]["connected"]}

    def add(self, name: str, url: str | None, **spec: Any) -> None:
        tmp = self.catalog / f".{name}.tmp"
        tmp.write_text(yaml.safe_dump(manifest(name, url or "", **spec)))
        tmp.rename(self.catalog / f"{name}.yaml")

    def remove(self, name: str) -> None:
        (self.catalog / f"{name}.yaml").unlink()

    def start_envoy(self, node: str, internal_port: int | None = None, bridge: str = "") -> Envoy:
        listen, admin = free_port(), free_port()
        raw = {**self.raw, "listen": f"127.0.0.1:{listen}", "envoyAdmin": f"127.0.0.1:{admin}",
               "internalListen": f"127.0.0.1:{internal_port or free_port()}"}
        config = parse_config(yaml.safe_dump(raw), str(self.root / "gateway.yaml"))
        doc = envoy_config.bootstrap(config, [self.processor_port], str(self.root / f"cds-{node}"), node_id=node)
        if bridge:  # where this Envoy says its own bridge listens
            doc["node"]["metadata"][envoy_config.NODE_BRIDGE_KEY] = bridge
        path = self.root / f"envoy-{node}.yaml"
        path.write_text(envoy_config.dump(doc))
        log = (self.root / f"envoy-{node}.log").open("w")
        proc = subprocess.Popen([str(ENVOY), "-c", str(path), "--disable-hot-restart", "--concurrency", "1",
                                 "--log-level", "warn"], stdout=log, stderr=log, start_new_session=True)
        self.stack.callback(stop, proc)
        envoy = Envoy(node, f"http://127.0.0.1:{listen}/mcp", f"http://127.0.0.1:{admin}", proc)
        until(lambda: urllib.request.urlopen(f"{envoy.admin}/ready", timeout=1).status == 200, f"{node} ready")
        self.envoys.append(envoy)
        return envoy


@contextlib.contextmanager
def xds_setup(tmp_path: Path, servers: dict[str, str], bridge: bool = False) -> Iterator[Setup]:
    catalog = tmp_path / "servers"
    catalog.mkdir(parents=True)
    for name, url in servers.items():
        (catalog / f"{name}.yaml").write_text(yaml.safe_dump(manifest(name, url)))
    internal = free_port()
    port = free_port_block(1, avoid=[internal])
    status_port = free_port()
    raw: dict[str, Any] = {"xds": True, "catalog": "./servers", "stateDir": "./state", "listTtlFloorMs": 1000,
                           "internalListen": f"127.0.0.1:{internal}",
                           "processor": {"listen": f"127.0.0.1:{port}", "status": f"127.0.0.1:{status_port}"}}
    bridge_port = free_port()
    if bridge:
        raw["bridges"] = {"listen": f"127.0.0.1:{bridge_port}"}
    (tmp_path / "gateway.yaml").write_text(yaml.safe_dump(raw))
    setup = Setup(tmp_path, catalog, raw, port, f"http://127.0.0.1:{status_port}/status")
    with setup.stack:
        if bridge:  # the stdio bridge beside the first Envoy (on its loopback)
            bridges = subprocess.Popen([str(MUSTER_EDGE), "bridges", "-c", str(tmp_path / "gateway.yaml"),
                                        "--port", str(bridge_port)], stdout=subprocess.DEVNULL,
                                       stderr=(tmp_path / "bridges.log").open("w"), cwd=tmp_path,
                                       start_new_session=True)
            setup.stack.callback(stop, bridges)
        log = (tmp_path / "processor.log").open("w")
        proc = subprocess.Popen([str(MUSTER_EDGE), "processor", "-c", str(tmp_path / "gateway.yaml"), "--port",
                                 str(port), "--status-port", str(status_port)], stdout=log, stderr=log,
                                cwd=tmp_path, start_new_session=True)
        setup.stack.callback(stop, proc)
        until(lambda: urllib.request.urlopen(f"http://127.0.0.1:{status_port}/healthz", timeout=1).status == 200,
              "the processor")
        setup.start_envoy("envoy-a", internal_port=internal)  # the processor's own calls go through this one
        yield setup


async def whoami(url: str, tool: str) -> Any:
    async with connect(url, MODERN) as client:
        result = await client.call_tool(tool, {})
    return json.loads(result.content[0].text)  # type: ignore[union-attr]


async def names(url: str) -> set[str]:
    async with connect(url, MODERN) as client:
        return {t.name for t in (await client.list_tools()).tools}


async def test_two_envoys_follow_the_catalog_and_a_later_envoy_converges(tmp_path: Path) -> None:
    with contextlib.ExitStack() as stack:
        one = stack.enter_context(start_demo_server("kubernetes", name="one"))
        two = stack.enter_context(start_demo_server("prometheus", name="two"))
        setup = stack.enter_context(xds_setup(tmp_path, {"one": one.url}))
        a = setup.envoys[0]
        b = setup.start_envoy("envoy-b")
        until(lambda: setup.acked_nodes() == {"envoy-a": 1, "envoy-b": 1}, "both Envoys acknowledge the catalog")
        for envoy in (a, b):
            assert await whoami(envoy.url, "x_one_whoami") == {"server": "one"}

        setup.add("two", two.url)
        for envoy in (a, b):  # listed and routed through both
            await auntil(lambda e=envoy: whoami(e.url, "x_two_whoami"), f"x_two_whoami through {envoy.node}")
            assert await whoami(envoy.url, "x_two_whoami") == {"server": "two"}
            assert cluster_name("two") in envoy.clusters()
        assert setup.acked_nodes() == {"envoy-a": 2, "envoy-b": 2}

        c = setup.start_envoy("envoy-c")  # started after the change: it has the cluster at once
        assert cluster_name("two") in c.clusters()
        assert await whoami(c.url, "x_two_whoami") == {"server": "two"}

        setup.remove("two")
        for envoy in (a, b, c):
            until(lambda e=envoy: cluster_name("two") not in e.clusters(), f"{envoy.node} drops the cluster")
        assert "x_two_whoami" not in await names(b.url)
        try:
            await whoami(b.url, "x_two_whoami")
            raise AssertionError("a removed server's tool was served")
        except BaseException as exc:  # the SDK wraps the JSON-RPC error in task groups
            error = mcp_error(exc)
            assert error is not None and "Unknown tool: x_two_whoami" in str(error), exc
        assert await whoami(c.url, "x_one_whoami") == {"server": "one"}
        # every Envoy held one ADS stream; versions are content hashes, the same for every Envoy
        served = setup.status()["xds"]["servedHere"]
        assert sorted(s["node"] for s in served) == ["envoy-a", "envoy-b", "envoy-c"]
        assert len({s["Cluster"]["acked"] for s in served}) == 1


async def test_an_envoy_that_rejects_or_does_not_acknowledge_holds_back_the_listing(tmp_path: Path) -> None:
    with contextlib.ExitStack() as stack:
        one = stack.enter_context(start_demo_server("kubernetes", name="one"))
        four = stack.enter_context(start_demo_server("prometheus", name="four"))
        setup = stack.enter_context(xds_setup(tmp_path, {"one": one.url}, bridge=True))
        a = setup.envoys[0]
        # envoy-d names a bridge address its own Envoy cannot use: it rejects (NACKs) the update that brings the
        # first bridged (stdio) cluster, which points there (every Envoy's bridged clusters point at its own bridge)
        d = setup.start_envoy("envoy-d", bridge="[fe80::1%nosuch0]:5")
        until(lambda: setup.acked_nodes() == {"envoy-a": 1, "envoy-d": 1}, "both Envoys acknowledge the catalog")

        setup.add("three", None, type="stdio", command=str(PYTHON),
                  args=[str(SERVERS), "prometheus", "--transport", "stdio", "--name", "three"], autoStart=True)
        held = until(lambda: (s := setup.server("three")) and "envoy-d (rejected it" in s.get("error", "") and s,
                     "three held back by envoy-d's NACK")
        assert "envoy-a" not in held["error"] and "malformed IP address" in held["error"], held
        assert not any(n.startswith("x_three_") for n in await names(a.url))
        rejected = next(n for n in setup.status()["xds"]["connected"] if n["node"] == "envoy-d")
        assert rejected["ackedServers"] == 1 and "malformed IP address" in rejected["rejected"], rejected

        stop(d.proc)  # the Envoy that rejected it goes away: nothing holds the listing back any more
        await auntil(lambda: whoami(a.url, "x_three_whoami"), "x_three_whoami once envoy-d is gone")
        assert await whoami(a.url, "x_three_whoami") == {"server": "three"}

        b = setup.start_envoy("envoy-b")
        until(lambda: setup.acked_nodes().get("envoy-b") == 2, "envoy-b acknowledges")
        os.kill(b.proc.pid, signal.SIGSTOP)  # connected, but it answers nothing
        try:
            setup.add("four", four.url)
            until(lambda: "envoy-b (no ACK yet)" in ((setup.server("four") or {}).get("error") or ""),
                  "four held back by envoy-b")
            assert not any(n.startswith("x_four_") for n in await names(a.url))
        finally:
            os.kill(b.proc.pid, signal.SIGCONT)
        await auntil(lambda: whoami(b.url, "x_four_whoami"), "x_four_whoami through envoy-b once it acknowledges")
        assert await whoami(a.url, "x_four_whoami") == {"server": "four"}


async def test_two_replicas_behind_one_redis_exchange_once_per_token_lifetime(tmp_path: Path) -> None:
    """Two whole gateways (Envoy + processor each, `muster-edge run`) with one catalog and one Redis: the second
    starts later and converges on the same clusters, a manifest added later reaches both, and one caller's calls
    spread over both replicas cause one token exchange per lifetime of the exchanged token."""
    listen_a, listen_b, upstream_port = free_port(), free_port(), free_port()
    resources = [f"http://127.0.0.1:{p}/mcp" for p in (listen_a, listen_b)]
    audience = f"http://127.0.0.1:{upstream_port}/mcp"
    secrets = tmp_path / "secrets" / "default" / "exchanger"
    secrets.mkdir(parents=True)
    (secrets / "client-id").write_text("exchanger")
    (secrets / "client-secret").write_text("exchanger-secret")
    key = tmp_path / "session.key"
    key.write_text("MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY=")  # both replicas seal with one key
    catalog = tmp_path / "catalog"
    catalog.mkdir()
    with contextlib.ExitStack() as stack:
        redis_url = stack.enter_context(start_redis(tmp_path))
        idp = stack.enter_context(start_idp(
            tmp_path / "idp", token_exchange=True,
            clients=[{"client_id": "zoe", "client_secret": "z"},
                     {"client_id": "exchanger", "client_secret": "exchanger-secret",
                      "grant_types": ["client_credentials", GRANT_TOKEN_EXCHANGE]}],
            resources=[*({"audience": r, "scope": "mcp:tools"} for r in resources),
                       {"audience": audience, "scope": "mcp:tools", "accessTokenTTL": 8}]))
        stack.enter_context(start_demo_server("kubernetes", port=upstream_port, name="k8s", require_jwt=idp.issuer,
                                              audience=audience))
        other = stack.enter_context(start_demo_server("prometheus", name="other"))
        exchange = {"enabled": True, "dexTokenEndpoint": idp.token_endpoint, "connectorId": "central-dex",
                    "audience": audience, "scopes": "mcp:tools", "clientCredentialsSecretRef": {"name": "exchanger"}}
        (catalog / "k8s.yaml").write_text(yaml.safe_dump(manifest("k8s", audience,
                                                                   auth={"tokenExchange": exchange})))

        def replica(name: str, listen: int) -> Any:
            return stack.enter_context(start_gateway(
                tmp_path / name, None, listen=f"127.0.0.1:{listen}", xds=True, catalog=str(catalog),
                store={"redis": redis_url}, sessionKey={"file": str(key)}, secretsDir=str(tmp_path / "secrets"),
                listTtlMs=600_000, listTtlFloorMs=600_000,
                auth={"issuer": idp.issuer, "jwksUri": idp.jwks_uri, "resource": resources[0],
                      "audiences": resources}))

        gw_a = replica("a", listen_a)
        token = idp.client_credentials("zoe", "z", resource=resources[0])
        gw_b = replica("b", listen_b)  # starts later: converges on the same clusters

        meta = {"io.modelcontextprotocol/protocolVersion": MODERN, "io.modelcontextprotocol/clientCapabilities": {}}

        def call(gw: Any, i: int, tool: str = "x_k8s_whoami") -> dict[str, Any]:
            return {"url": gw.url, "headers": {
                "accept": "application/json, text/event-stream", "content-type": "application/json",
                "authorization": f"Bearer {token}", "mcp-protocol-version": MODERN, "mcp-method": "tools/call",
                "mcp-name": tool}, "json": {"jsonrpc": "2.0", "id": i, "method": "tools/call",
                                            "params": {"name": tool, "arguments": {}, "_meta": meta}}}

        def exchanges() -> int:
            return sum(r["grant_type"] == GRANT_TOKEN_EXCHANGE for r in idp.recent_requests())

        async with httpx2.AsyncClient(timeout=60) as http:
            # one exchanged token (8 s, used until 2 s before it expires) serves both replicas: one exchange ...
            answers = [await http.post(**call(gw_a if i % 2 else gw_b, i)) for i in range(20)]
            assert all(r.status_code == 200 and '\\"server\\": \\"k8s\\"' in r.text for r in answers), answers[0].text
            assert exchanges() == 1, idp.recent_requests()
            # ... per token lifetime: once it is gone from Redis, the next calls on both replicas exchange once more
            shared = redis.Redis.from_url(redis_url)
            until(lambda: not shared.keys("muster-edge:exchange:*"), "the exchanged token to expire", 15)
            answers = [await http.post(**call(gw_a if i % 2 else gw_b, i)) for i in range(20)]
            assert all(r.status_code == 200 and '\\"server\\": \\"k8s\\"' in r.text for r in answers), answers[0].text
            assert exchanges() == 2, idp.recent_requests()

            # a manifest added to the one catalog: each replica lists it once both Envoys (Redis) acknowledged it
            tmp = catalog / ".other.tmp"
            tmp.write_text(yaml.safe_dump(manifest("other", other.url)))
            tmp.rename(catalog / "other.yaml")
            for gw in (gw_a, gw_b):
                await auntil(lambda g=gw: _served(http, call(g, 99, "x_other_whoami")), f"x_other_whoami on {gw.url}")
            nodes = {n["node"] for n in gw_a.status()["xds"]["connected"]}
            assert len(nodes) == 2, nodes  # both replicas' Envoys, seen from replica a
        assert token not in gw_a.log() and token not in gw_b.log()


async def _served(http: httpx2.AsyncClient, request: dict[str, Any]) -> bool:
    answer = await http.post(**request)
    return answer.status_code == 200 and '\\"server\\": \\"other\\"' in answer.text


async def test_workers_of_one_replica_share_the_envoys_acks(tmp_path: Path) -> None:
    """`muster-edge run` with two workers and no shared store: one worker holds Envoy's ADS stream, and both read
    its ACKs (files in the state folder) before listing a new server."""
    with contextlib.ExitStack() as stack:
        one = stack.enter_context(start_demo_server("kubernetes", name="one"))
        two = stack.enter_context(start_demo_server("prometheus", name="two"))
        gw = stack.enter_context(start_gateway(tmp_path, {"one": one.url}, xds=True, processor={"workers": 2}))
        status_port = int(gw.status_url.rsplit(":", 1)[1].split("/")[0])
        workers = [f"http://127.0.0.1:{status_port + i}/status" for i in (0, 1)]
        until(lambda: all(len(get_json(w)["xds"]["connected"]) == 1 for w in workers), "both workers see Envoy")
        served = [len(get_json(w)["xds"]["servedHere"]) for w in workers]
        assert sorted(served) == [0, 1], served  # one ADS stream, held by one worker
        gw.add_server("two", two.url)
        for worker in workers:
            until(lambda w=worker: next((s for s in get_json(w)["servers"] if s["name"] == "two"), {}).get("state")
                  == "Connected", f"two listed by {worker}")
        for i in range(6):  # streams spread over both workers: every call is routed
            assert await whoami(gw.url, "x_two_whoami") == {"server": "two"}, i
        assert not (gw.config_path.parent / "state" / "envoy" / "cds" / "cds.yaml").exists()  # no file in xDS mode


def test_the_xds_bootstrap_validates_and_ships_no_cluster_files(tmp_path: Path) -> None:
    (tmp_path / "servers").mkdir()
    (tmp_path / "servers" / "one.yaml").write_text(yaml.safe_dump(manifest("one", "http://127.0.0.1:18101/mcp")))
    (tmp_path / "gateway.yaml").write_text(yaml.safe_dump({"catalog": "./servers", "xds": True,
                                                           "processor": {"workers": 2}}))
    done = subprocess.run([str(MUSTER_EDGE), "envoy", "render", "-c", str(tmp_path / "gateway.yaml"), "--out",
                           str(tmp_path / "out")], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["bootstrap.yaml", "mesh.yaml"]
    result = subprocess.run([str(ENVOY), "--mode", "validate", "-c", str(tmp_path / "out" / "bootstrap.yaml"),
                             "--disable-hot-restart"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and "OK" in result.stdout + result.stderr, result.stdout + result.stderr
    boot = yaml.safe_load((tmp_path / "out" / "bootstrap.yaml").read_text())
    assert boot["dynamic_resources"]["ads_config"]["grpc_services"] == [
        {"envoy_grpc": {"cluster_name": envoy_config.XDS_CLUSTER}}]
    xds = next(c for c in boot["static_resources"]["clusters"] if c["name"] == envoy_config.XDS_CLUSTER)
    assert len(xds["load_assignment"]["endpoints"][0]["lb_endpoints"]) == 2  # any worker serves it
    mesh = yaml.safe_load((tmp_path / "out" / "mesh.yaml").read_text())
    assert mesh["cds_config"] == {"ads": {}, "resource_api_version": "V3"} and "ads_config" in mesh


async def test_a_frozen_xds_worker_hands_its_envoy_to_another(tmp_path: Path) -> None:
    """The worker holding Envoy's ADS stream freezes (SIGSTOP): Envoy's keep-alive PING goes unanswered, it
    reconnects to the other worker, which serves the same versions, and a server added meanwhile is listed."""
    with contextlib.ExitStack() as stack:
        one = stack.enter_context(start_demo_server("kubernetes", name="one"))
        two = stack.enter_context(start_demo_server("prometheus", name="two"))
        gw = stack.enter_context(start_gateway(tmp_path, {"one": one.url}, xds=True, processor={"workers": 2}))
        status_port = int(gw.status_url.rsplit(":", 1)[1].split("/")[0])
        workers = [f"http://127.0.0.1:{status_port + i}/status" for i in (0, 1)]
        holder = until(lambda: next((i + 1 for i, w in enumerate(workers) if get_json(w)["xds"]["servedHere"]), 0),
                       "a worker holding Envoy's stream") - 1
        other = workers[1 - holder]
        pid = next(p["pid"] for p in gw.status()["supervisor"]["processes"] if p["name"] == f"processor {holder}")
        os.kill(pid, signal.SIGSTOP)
        try:
            until(lambda: get_json(other)["xds"]["servedHere"], "the other worker takes the stream over", 30)
            gw.add_server("two", two.url)
            until(lambda: next((s for s in get_json(other)["servers"] if s["name"] == "two"), {}).get("state")
                  == "Connected", "two listed by the live worker", 30)
            await auntil(lambda: whoami(gw.url, "x_two_whoami"), "x_two_whoami served", 30)
        finally:
            os.kill(pid, signal.SIGCONT)
