"""stdio MCP server processes: a clean environment, their own process group, death with their parent.

A child gets PATH, a private HOME, LANG and its manifest's `env` (with `${env:…}`/`${file:…}` resolved), nothing
else of the gateway's environment. It runs in a process group of its own so that stopping it also stops what
it started (npx starts node as a grandchild), and it receives SIGKILL if the bridge dies (PR_SET_PDEATHSIG).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import signal
from collections.abc import Callable, Mapping

from catalog.manifests import MCPServer

log = logging.getLogger("muster_edge.bridge")

PR_SET_PDEATHSIG = 1
_libc: ctypes.CDLL | None = None


def die_with_parent(sig: int = signal.SIGKILL) -> Callable[[], None]:
    """A preexec_fn: the child gets `sig` when the thread that started it ends (Linux)."""
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
    libc = _libc
    parent = os.getpid()

    def preexec() -> None:
        libc.prctl(PR_SET_PDEATHSIG, sig, 0, 0, 0)
        if os.getppid() != parent:  # the parent died before prctl took effect
            os.kill(os.getpid(), sig)

    return preexec


def child_env(server: MCPServer, home: str, resolve: Callable[[str], str],
              base: Mapping[str, str] | None = None) -> dict[str, str]:
    """PATH, a private HOME, LANG and the manifest's env; raises KeyError/OSError naming the variable only."""
    base = os.environ if base is None else base
    env = {"PATH": base.get("PATH", "/usr/local/bin:/usr/bin:/bin"), "HOME": home,
           "LANG": base.get("LANG", "C.UTF-8")}
    for key, value in server.env.items():
        try:
            env[key] = resolve(value)
        except (KeyError, OSError) as exc:
            raise ValueError(f"env {key}: {exc.args[0] if exc.args else type(exc).__name__}") from None
    return env


async def spawn(server: MCPServer, env: dict[str, str], home: str) -> asyncio.subprocess.Process:
    os.makedirs(home, mode=0o700, exist_ok=True)
    return await asyncio.create_subprocess_exec(
        server.command, *server.args, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE, env=env, start_new_session=True,
        preexec_fn=die_with_parent(), limit=64 * 1024 * 1024)


async def kill_group(proc: asyncio.subprocess.Process, grace: float = 3.0) -> None:
    """SIGTERM to the child's process group, SIGKILL after `grace`; the group goes even if the leader is gone."""
    pgid = proc.pid
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGTERM)
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(proc.wait(), grace)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(proc.wait(), grace)


def kill_group_now(pid: int) -> None:
    """At exit, without an event loop: SIGKILL a child's process group."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)


async def log_stderr(name: str, stream: asyncio.StreamReader) -> None:
    """Each stderr line of a child goes to the log with the server's name."""
    while True:
        try:
            line = await stream.readline()
        except (ValueError, ConnectionError):
            continue
        if not line:
            return
        log.info("[%s] %s", name, line.decode("utf-8", "replace").rstrip())
