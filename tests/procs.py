"""Start and stop helper processes for tests: free ports, a generic spawn-until-ready, the demo servers.

Every process started here is stopped (terminate, then kill) when its context manager exits, even when the
test fails, so no process outlives the test that needed it.
"""

from __future__ import annotations

import contextlib
import os
import selectors
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PYTHON = ROOT / ".venv" / "bin" / "python"
SERVERS = ROOT / "deploy" / "demo" / "servers.py"


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago (the kernel's choice)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


@dataclass
class Spawned:
    """A running process and the line it printed when it became ready."""

    proc: subprocess.Popen[str]
    ready_line: str
    output: list[str] = field(default_factory=list)

    @property
    def pid(self) -> int:
        return self.proc.pid


class SpawnError(RuntimeError):
    pass


def _read_until(proc: subprocess.Popen[str], prefix: str, timeout: float, seen: list[str]) -> str:
    """Read stdout lines until one starts with `prefix`; fail on exit or timeout."""
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout
    with selectors.DefaultSelector() as selector:
        selector.register(proc.stdout, selectors.EVENT_READ)
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise SpawnError(f"no line starting with {prefix!r} within {timeout}s; output so far: {seen}")
            if not selector.select(remaining):
                continue
            line = proc.stdout.readline()
            if not line:
                raise SpawnError(f"process exited ({proc.wait()}) before {prefix!r}; output: {seen}")
            seen.append(line.rstrip("\n"))
            if line.startswith(prefix):
                return line.strip()


def stop(proc: subprocess.Popen[str], timeout: float = 5) -> int:
    """SIGTERM, wait, then SIGKILL the process group if it is still there. Returns the exit code."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout)
    for stream in (proc.stdout, proc.stderr):
        if stream is not None:
            stream.close()
    return int(proc.returncode)


@contextlib.contextmanager
def spawn(
    cmd: Sequence[str | os.PathLike[str]],
    ready_line_prefix: str,
    timeout: float = 20,
    *,
    env: dict[str, str] | None = None,
    cwd: str | os.PathLike[str] | None = None,
    stderr: int | None = subprocess.DEVNULL,
) -> Iterator[Spawned]:
    """Run `cmd`, wait until it prints a stdout line starting with `ready_line_prefix`, stop it on exit.

    The child gets its own process group so that a forced kill also takes its children. stderr is
    discarded by default (pass `stderr=None` to inherit it, e.g. while debugging).
    """
    proc = subprocess.Popen(
        [str(part) for part in cmd],
        stdout=subprocess.PIPE,
        stderr=stderr,
        stdin=subprocess.DEVNULL,
        text=True,
        bufsize=1,
        env=env,
        cwd=cwd,
        start_new_session=True,
    )
    try:
        seen: list[str] = []
        line = _read_until(proc, ready_line_prefix, timeout, seen)
        yield Spawned(proc, line, seen)
    finally:
        stop(proc)


@dataclass
class DemoServer:
    """A running deploy/demo/servers.py process."""

    kind: str
    url: str
    port: int
    process: Spawned


@contextlib.contextmanager
def start_demo_server(
    kind: str,
    port: int | None = None,
    *,
    host: str = "127.0.0.1",
    name: str | None = None,
    era: str = "dual",
    json_response: bool = False,
    require_bearer: str | None = None,
    record_headers: str | os.PathLike[str] | None = None,
    timeout: float = 20,
) -> Iterator[DemoServer]:
    """Start one demo MCP server (see deploy/demo/servers.py) and stop it on exit.

    `port=None` lets the server pick a free port itself (no race); the real URL is in `.url`.
    """
    cmd: list[str | os.PathLike[str]] = [PYTHON if PYTHON.exists() else sys.executable, SERVERS, kind]
    cmd += ["--port", str(port or 0), "--host", host, "--era", era]
    if name:
        cmd += ["--name", name]
    if json_response:
        cmd.append("--json-response")
    if require_bearer:
        cmd += ["--require-bearer", require_bearer]
    if record_headers:
        cmd += ["--record-headers", os.fspath(record_headers)]
    with spawn(cmd, "READY ", timeout) as spawned:
        url = spawned.ready_line.split(" ", 1)[1]
        actual_port = int(url.rsplit(":", 1)[1].split("/", 1)[0])
        yield DemoServer(kind=kind, url=url, port=actual_port, process=spawned)
