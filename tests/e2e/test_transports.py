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

import pytest
from mcp.shared.exceptions import MCPError

from tests.e2e.conftest import connect
from tests.gateway_harness import Gateway, start_gateway
from tests.procs import PYTHON, ROOT, SERVERS

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


@pytest.mark.parametrize("mode", [MODERN, LEGACY])
async def test_stdio_servers_from_npm_and_the_sdk_are_listed_and_called(tmp_path: Path, mode: str) -> None:
    servers = {"everything": everything_stdio(autoStart=True), "local": sdk_stdio(toolPrefix="loc")}
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
        state = process_state(gw, "everything")
        assert state["state"] == "Running" and state["pid"] > 0
        assert "env" not in json.dumps(state).lower()
        assert "[local]" in gw.log() or "[everything]" in gw.log()


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


async def test_a_sigkilled_gateway_leaves_no_process(tmp_path: Path) -> None:
    servers = {"everything": everything_stdio(autoStart=True), "local": sdk_stdio(autoStart=True)}
    with gateway(tmp_path, servers) as gw:
        pids = [wait(lambda n=n: process_state(gw, n).get("pid"), what=f"{n} running") for n in servers]
        assert all(in_group(p) for p in pids)
        os.kill(gw.process.pid, signal.SIGKILL)
        wait(lambda: not any(in_group(p) for p in pids), what="every stdio process group to be gone")
