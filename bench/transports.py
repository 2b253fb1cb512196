"""stdio upstreams through the bridge vs the same server over streamable HTTP, through the real gateway.

    .venv/bin/python -m bench.transports [--calls 1500]

Prints p50/p90 of a routed `tools/call` (2026-07-28 wire, one client, sequential) to deploy/demo/servers.py's
vendor server reached (a) over streamable HTTP and (b) as a stdio child served by the gateway's bridge, and
the bridge process's memory (RSS and PSS from /proc) with 1, 5 and 10 stdio servers: what a stdio upstream
costs beyond its own process.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx2
import orjson
import yaml

from tests.gateway_harness import Gateway, manifest, start_gateway
from tests.procs import PYTHON, SERVERS, start_demo_server

MODERN = "2026-07-28"


def call(http: httpx2.Client, url: str, tool: str, i: int) -> float:
    body = {"jsonrpc": "2.0", "id": i, "method": "tools/call", "params": {
        "name": tool, "arguments": {"text": "ping"},
        "_meta": {"io.modelcontextprotocol/protocolVersion": MODERN,
                  "io.modelcontextprotocol/clientCapabilities": {},
                  "io.modelcontextprotocol/clientInfo": {"name": "bench", "version": "0"}}}}
    headers = {"content-type": "application/json", "accept": "application/json, text/event-stream",
               "mcp-protocol-version": MODERN, "mcp-method": "tools/call", "mcp-name": tool}
    start = time.perf_counter()
    resp = http.post(url, content=orjson.dumps(body), headers=headers)
    elapsed = time.perf_counter() - start
    if resp.status_code != 200 or b'"ping"' not in resp.content:
        raise SystemExit(f"{tool}: unexpected answer {resp.status_code} {resp.content[:200]!r}")
    return elapsed


def bridge_pid(gw: Gateway) -> int:
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            cmd = (entry / "cmdline").read_bytes().split(b"\0")
            if b"bridges" in cmd and str(gw.config_path).encode() in cmd:
                return int(entry.name)
    raise SystemExit("bridge process not found")


def memory_kb(pid: int) -> tuple[int, int]:
    """(RSS, PSS) in kB."""
    rollup = Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()
    values = {line.split(":")[0]: int(line.split()[1]) for line in rollup[1:] if line.split()[1].isdigit()}
    return values["Rss"], values["Pss"]


def stdio_spec(name: str) -> dict[str, Any]:
    return {"type": "stdio", "url": None, "command": str(PYTHON), "autoStart": True,
            "args": [str(SERVERS), "vendor", "--transport", "stdio", "--name", name]}


def wait_running(gw: Gateway, names: list[str]) -> None:
    def ok() -> bool:
        status = {s["name"]: s for s in gw.status()["servers"]}
        return all((status.get(n) or {}).get("process", {}).get("state") == "Running" for n in names)
    gw.wait_for(ok, 60, "stdio servers running")


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--calls", type=int, default=1500)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as stack:
        up = stack.enter_context(start_demo_server("vendor", name="http"))
        gw = stack.enter_context(start_gateway(Path(tmp), {"http": up.url, "s1": stdio_spec("s1")}))
        wait_running(gw, ["s1"])
        pid = bridge_pid(gw)
        memory = {1: memory_kb(pid)}
        times: dict[str, list[float]] = {"x_http_echo": [], "x_s1_echo": []}
        with httpx2.Client(timeout=30) as http:
            for tool in times:
                for i in range(100):  # warm-up: connections, caches
                    call(http, gw.url, tool, i)
            for i in range(args.calls):
                for tool in times:
                    times[tool].append(call(http, gw.url, tool, i))
        for count in (5, 10):
            names = [f"s{i}" for i in range(1, count + 1)]
            for name in names[1:]:
                if not (gw.catalog / f"{name}.yaml").exists():
                    spec = stdio_spec(name)
                    (gw.catalog / f"{name}.yaml").write_text(yaml.safe_dump(manifest(name, spec.pop("url"), **spec)))
            wait_running(gw, names)
            time.sleep(1)
            memory[count] = memory_kb(pid)
    p50 = {t: statistics.median(v) * 1000 for t, v in times.items()}
    p90 = {t: statistics.quantiles(v, n=10)[-1] * 1000 for t, v in times.items()}
    print(f"routed tools/call, {args.calls} sequential calls each, interleaved (ms):")
    print(f"  streamable HTTP upstream   p50 {p50['x_http_echo']:.3f}  p90 {p90['x_http_echo']:.3f}")
    print(f"  stdio upstream via bridge  p50 {p50['x_s1_echo']:.3f}  p90 {p90['x_s1_echo']:.3f}")
    print(f"  added by the bridge        p50 {p50['x_s1_echo'] - p50['x_http_echo']:+.3f}")
    print("bridge process memory (kB) with N stdio servers (their own processes not counted):")
    for count, (rss, pss) in memory.items():
        print(f"  N={count:<3} RSS {rss:>7}  PSS {pss:>7}  "
              f"per server: RSS {rss / count:>8.0f}  PSS {pss / count:>8.0f}")
    marginal = (memory[10][0] - memory[1][0]) / 9
    print(f"  marginal RSS per extra stdio server: {marginal:.0f} kB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
