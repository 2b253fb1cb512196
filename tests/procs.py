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
import threading
import time
from collections.abc import Collection, Iterator, Sequence
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


def free_port_block(count: int, avoid: Collection[int] = (), host: str = "127.0.0.1") -> int:
    """The first of `count` consecutive ports that were all free a moment ago and are not in `avoid` (processor
    workers listen on port, port + 1, ...; the kernel hands out neighbouring ports to consecutive free_port calls)."""
    for _ in range(200):
        first = free_port(host)
        block = range(first, first + count)
        if block[-1] > 65535 or any(p in avoid for p in block):
            continue
        with contextlib.ExitStack() as stack:
            try:
                for port in block[1:]:
                    sock = stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
                    sock.bind((host, port))
            except OSError:
                continue
        return first
    raise RuntimeError(f"no {count} consecutive free ports on {host}")


@dataclass
class Spawned:
    """A running process, the line it printed when it became ready, and its stdout lines so far."""

    proc: subprocess.Popen[bytes]
    ready_line: str
    output: list[str] = field(default_factory=list)

    @property
    def pid(self) -> int:
        return self.proc.pid


class SpawnError(RuntimeError):
    pass


def _read_until(proc: subprocess.Popen[bytes], prefix: str, timeout: float, seen: list[str]) -> tuple[str, bytes]:
    """Read stdout until a line starts with `prefix`; fail on exit or timeout. Returns the line and what follows it.

    Reads the raw descriptor (no Python-side buffering) so that select() never waits on data already read.
    """
    assert proc.stdout is not None
    fd = proc.stdout.fileno()
    deadline = time.monotonic() + timeout
    pending = b""
    with selectors.DefaultSelector() as selector:
        selector.register(fd, selectors.EVENT_READ)
        while True:
            *lines, pending = pending.split(b"\n")
            for index, raw in enumerate(lines):
                line = raw.decode(errors="replace").rstrip("\r")
                seen.append(line)
                if line.startswith(prefix):
                    rest = b"\n".join([*lines[index + 1 :], pending])
                    return line.strip(), rest
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise SpawnError(f"no line starting with {prefix!r} within {timeout}s; output so far: {seen}")
            if not selector.select(remaining):
                continue
            chunk = os.read(fd, 65536)
            if not chunk:
                raise SpawnError(f"process exited ({proc.wait()}) before {prefix!r}; output: {seen}")
            pending += chunk


def _drain(proc: subprocess.Popen[bytes], rest: bytes, seen: list[str], keep: int = 1000) -> None:
    """Keep reading stdout after the ready line so the child never blocks on a full pipe."""
    assert proc.stdout is not None
    fd = proc.stdout.fileno()
    pending = rest
    while True:
        *lines, pending = pending.split(b"\n")
        seen.extend(raw.decode(errors="replace").rstrip("\r") for raw in lines)
        del seen[:-keep]
        try:
            chunk = os.read(fd, 65536)
        except OSError:  # closed by stop()
            return
        if not chunk:
            return
        pending += chunk


def stop(proc: subprocess.Popen[bytes], timeout: float = 5) -> int:
    """SIGTERM the process, wait, SIGKILL it if it lingers, then sweep its process group. Returns its exit code.

    `spawn` starts each child in its own session, so the group holds exactly the child and what it started.
    """
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            proc.wait(timeout)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)  # anything the child left behind
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

    The child gets its own session (process group), so stopping it also stops whatever it started. Its
    stdout keeps being read in the background (last lines in `.output`). stderr is discarded by default; pass
    `stderr=None` to inherit it, or a file descriptor.
    """
    proc = subprocess.Popen(
        [os.fspath(part) for part in cmd],
        stdout=subprocess.PIPE,
        stderr=stderr,
        stdin=subprocess.DEVNULL,
        bufsize=0,
        env=env,
        cwd=cwd,
        start_new_session=True,
    )
    drainer: threading.Thread | None = None
    try:
        seen: list[str] = []
        line, rest = _read_until(proc, ready_line_prefix, timeout, seen)
        drainer = threading.Thread(target=_drain, args=(proc, rest, seen), daemon=True)
        drainer.start()
        yield Spawned(proc, line, seen)
    finally:
        stop(proc)
        if drainer is not None:
            drainer.join(2)
        if proc.stdout is not None:
            proc.stdout.close()


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
    variant: str = "",
    require_jwt: str = "",
    audience: str = "",
    max_token_uses: int = 0,
    transport: str = "streamable-http",
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
    if variant:
        cmd += ["--variant", variant]
    if transport != "streamable-http":
        cmd += ["--transport", transport]
    if require_jwt:
        cmd += ["--require-jwt", require_jwt, "--audience", audience, "--max-token-uses", str(max_token_uses)]
    with spawn(cmd, "READY ", timeout) as spawned:
        url = spawned.ready_line.split(" ", 1)[1]
        actual_port = int(url.rsplit(":", 1)[1].split("/", 1)[0])
        yield DemoServer(kind=kind, url=url, port=actual_port, process=spawned)
