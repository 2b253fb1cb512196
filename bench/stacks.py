"""Start and stop what a benchmark measures: upstreams, plain Envoy, the contender, the gateway.

Every start is a context manager built on tests/procs.py (`spawn`: own process group, stopped on exit even
on error or Ctrl-C) and tests/gateway_harness.py (`start_gateway`: `muster-edge run` on free loopback ports),
so nothing the benchmark starts outlives it.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench import envoy_configs, procstat
from bench.envoy_configs import Backend
from tests.gateway_harness import start_gateway
from tests.procs import PYTHON, ROOT, free_port, spawn, start_demo_server

ENVOY = ROOT / ".venv" / "bin" / "envoy"
ENVOY_CONCURRENCY = 2  # what `muster-edge run` picks on this machine: min(cpu_count, 4)


def get_json(url: str, timeout: float = 5) -> Any:
    with urllib.request.urlopen(url, timeout=timeout) as resp:
        return json.loads(resp.read())


def counters(admin_url: str, pattern: str) -> dict[str, int]:
    """Envoy counters and gauges whose name matches `pattern` (admin /stats?filter=, a regex)."""
    with urllib.request.urlopen(f"{admin_url}/stats?filter={pattern}", timeout=5) as resp:
        text = resp.read().decode()
    out = {}
    for line in text.splitlines():
        name, sep, value = line.partition(": ")
        if sep and value.strip().lstrip("-").isdigit():
            out[name] = int(value)
    return out


def wait_until(predicate: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            if predicate():
                return
        except Exception as exc:  # not up yet
            last = exc
        time.sleep(0.1)
    raise TimeoutError(f"timed out waiting for {what} ({last})")


# ---- upstreams ---------------------------------------------------------------------------------------------


@dataclass
class Upstream:
    name: str
    kind: str  # "fast" or "sdk"
    url: str
    port: int
    pid: int
    tool: str  # the tool the benchmark calls, as the upstream names it
    arguments: dict[str, Any]

    @property
    def backend(self) -> Backend:
        return Backend(self.name, "127.0.0.1", self.port)

    def method_counts(self) -> dict[str, int]:
        """Requests per JSON-RPC method so far (fast upstream only; empty for the SDK server)."""
        if self.kind != "fast":
            return {}
        return dict(get_json(self.url.replace("/mcp", "/_stats")))

    def last_headers(self) -> dict[str, str]:
        """The headers of the last JSON-RPC request this (fast) upstream received."""
        return dict(get_json(self.url.replace("/mcp", "/_last"))) if self.kind == "fast" else {}


@contextlib.contextmanager
def fast_upstream(name: str, tools: int = 1) -> Iterator[Upstream]:
    cmd: list[str | os.PathLike[str]] = [PYTHON, "-m", "bench.fast_upstream", "--port", "0", "--name", name,
                                         "--tools", str(tools)]
    with spawn(cmd, "READY ", 20, cwd=ROOT) as proc:
        url = proc.ready_line.split(" ", 1)[1]
        port = int(url.rsplit(":", 1)[1].split("/", 1)[0])
        yield Upstream(name, "fast", url, port, proc.pid, "echo", {"text": "hello"})


@dataclass
class FastFleet:
    """Several fast upstreams served by one process (bench/fast_upstream.py --names), each at /NAME/mcp.

    `whole` stands for the process in probes: its CPU once, and its /_stats summed over every member.
    """

    members: list[Upstream]
    whole: Upstream

    def by_name(self) -> dict[str, Upstream]:
        return {u.name: u for u in self.members}


@contextlib.contextmanager
def fast_fleet(names: Sequence[str], tools: int = 1, *, shared_descriptions: bool = False,
               label: str = "fleet") -> Iterator[FastFleet]:
    cmd: list[str | os.PathLike[str]] = [PYTHON, "-m", "bench.fast_upstream", "--port", "0", "--names",
                                         ",".join(names), "--tools", str(tools)]
    if shared_descriptions:
        cmd.append("--shared-descriptions")
    with spawn(cmd, "READY ", 20, cwd=ROOT) as proc:
        root = proc.ready_line.split(" ", 1)[1]  # http://127.0.0.1:PORT/mcp
        port = int(root.rsplit(":", 1)[1].split("/", 1)[0])
        base = root.rsplit("/mcp", 1)[0]
        members = [Upstream(n, "fast", f"{base}/{n}/mcp", port, proc.pid, "echo", {"text": "hello"}) for n in names]
        yield FastFleet(members, Upstream(label, "fast", root, port, proc.pid, "echo", {"text": "hello"}))


@contextlib.contextmanager
def sdk_upstream(name: str, *, as_shipped: bool = False) -> Iterator[Upstream]:
    """The mcp SDK demo server (prometheus kind, both eras, JSON answers so every target can read them).

    By default it runs through bench/sdk_upstream.py (TCP_NODELAY, see there); `as_shipped` runs
    deploy/demo/servers.py exactly as tests/procs.py does.
    """
    if as_shipped:
        with start_demo_server("prometheus", name=name, json_response=True) as server:
            yield Upstream(name, "sdk", server.url, server.port, server.process.pid, "whoami", {})
        return
    cmd: list[str | os.PathLike[str]] = [PYTHON, "-m", "bench.sdk_upstream", "prometheus", "--port", "0",
                                         "--name", name, "--json-response"]
    with spawn(cmd, "READY ", 30, cwd=ROOT) as proc:
        url = proc.ready_line.split(" ", 1)[1]
        port = int(url.rsplit(":", 1)[1].split("/", 1)[0])
        yield Upstream(name, "sdk", url, port, proc.pid, "whoami", {})


# ---- Envoy-only targets ------------------------------------------------------------------------------------


@dataclass
class EnvoyStack:
    urls: dict[str, str]  # upstream name -> URL clients use for it
    admin_url: str
    pid: int


@contextlib.contextmanager
def _run_envoy(workdir: Path, name: str, bootstrap: dict[str, Any], admin_port: int) -> Iterator[int]:
    path = envoy_configs.write_validated(str(ENVOY), workdir / f"{name}.yaml", bootstrap)
    cmd: list[str | os.PathLike[str]] = [
        ENVOY, "-c", path, "--disable-hot-restart", "--concurrency", str(ENVOY_CONCURRENCY),
        "--log-path", "/dev/stdout", "--log-format", "%v", "--log-level", "info",  # ready line on stdout
    ]
    with spawn(cmd, "starting main dispatch loop", 60) as proc:
        wait_until(lambda: urllib.request.urlopen(f"http://127.0.0.1:{admin_port}/ready", timeout=1).status == 200,
                   30, f"{name} Envoy /ready")
        yield proc.pid


@contextlib.contextmanager
def plain_envoy(workdir: Path, upstreams: Sequence[Upstream]) -> Iterator[EnvoyStack]:
    admin = free_port()
    listeners = [(free_port(), u.backend) for u in upstreams]
    with _run_envoy(workdir, "plain-envoy", envoy_configs.plain(admin, listeners), admin) as pid:
        urls = {b.name: f"http://127.0.0.1:{port}/mcp" for port, b in listeners}
        yield EnvoyStack(urls, f"http://127.0.0.1:{admin}", pid)


@contextlib.contextmanager
def contender(workdir: Path, upstreams: Sequence[Upstream], tag: str = "") -> Iterator[EnvoyStack]:
    admin, port = free_port(), free_port()
    boot = envoy_configs.contender(admin, port, [u.backend for u in upstreams])
    with _run_envoy(workdir, f"contender{tag}", boot, admin) as pid:
        url = f"http://127.0.0.1:{port}/mcp"
        yield EnvoyStack({u.name: url for u in upstreams}, f"http://127.0.0.1:{admin}", pid)


# ---- the gateway -------------------------------------------------------------------------------------------


@dataclass
class GatewayStack:
    url: str
    admin_url: str
    status_urls: list[str]
    processor_listen: list[str]
    run_pid: int
    processor_pids: list[int]
    envoy_pids: list[int]
    config_path: Path


@contextlib.contextmanager
def gateway(workdir: Path, upstreams: Sequence[Upstream], workers: int = 1,
            extra: Mapping[str, Any] | None = None, *,
            specs: Mapping[str, Mapping[str, Any]] | None = None) -> Iterator[GatewayStack]:
    """`muster-edge run` in front of `upstreams`; returns once every worker has listed every upstream.

    `specs` adds manifest fields (`family`, `headers`, `auth`, ...) per upstream name. Servers whose lists are
    per user (token exchange) count as ready when the status says `Per user`: their lists are fetched on a
    caller's first request."""
    config: dict[str, Any] = {
        "processor": {"workers": workers},  # start_gateway gives the workers consecutive free ports
        "listTtlMs": 3_600_000,  # no list refresh may land inside a measurement
        "listTtlFloorMs": 3_600_000,
        **(extra or {}),
    }
    servers: dict[str, str | dict[str, Any]] = {}
    for u in upstreams:
        servers[u.name] = {"url": u.url, **(specs or {}).get(u.name, {})}
    with start_gateway(workdir, servers, **config) as gw:
        listen, status = (int(gw.config["processor"][key].rsplit(":", 1)[1]) for key in ("listen", "status"))
        status_urls = [f"http://127.0.0.1:{status + i}/status" for i in range(workers)]

        def connected() -> bool:
            for url in status_urls:
                states = [s.get("state") for s in get_json(url)["servers"]]
                if len(states) != len(upstreams) or any(s not in ("Connected", "Per user") for s in states):
                    return False
            return True

        wait_until(connected, 60, "every processor worker to connect every upstream")
        run_pid = gw.process.pid
        yield GatewayStack(url=gw.url, admin_url=gw.admin_url, status_urls=status_urls,
                           processor_listen=[f"127.0.0.1:{listen + i}" for i in range(workers)], run_pid=run_pid,
                           processor_pids=procstat.processor_pids(run_pid), envoy_pids=procstat.envoy_pids(run_pid),
                           config_path=gw.config_path)


@contextlib.contextmanager
def echo_processor() -> Iterator[tuple[str, int]]:
    """bench/echo_processor.py: (HOST:PORT, pid) of an ext_proc servicer that answers without reading."""
    cmd: list[str | os.PathLike[str]] = [PYTHON, "-m", "bench.echo_processor", "--port", "0"]
    with spawn(cmd, "READY ", 20, cwd=ROOT) as proc:
        yield proc.ready_line.split(" ", 1)[1].strip(), proc.pid
