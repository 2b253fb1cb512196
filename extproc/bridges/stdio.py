"""One stdio MCP server: started on demand or with the gateway, restarted with backoff, stopped with its group."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from typing import Any

from catalog.manifests import MCPServer
from extproc.bridges import children
from extproc.bridges.relay import UNAVAILABLE, Relay

log = logging.getLogger("muster_edge.bridge")

INIT_TIMEOUT = 10.0  # Muster's fixed stdio initialize timeout
BACKOFF_FIRST = 1.0
BACKOFF_MAX = 30.0
HEALTHY_AFTER = 30.0  # a run this long resets the backoff


class Unavailable(Exception):
    """The server cannot take a request now; the message names it and says why. `status` 401/403: the upstream
    refused the credential, passed on as such (with its challenge) so the processor's own handling applies."""

    code = UNAVAILABLE

    def __init__(self, message: str, status: int = 0, challenge: str = "") -> None:
        super().__init__(message)
        self.status = status
        self.challenge = challenge


class StdioUpstream:
    def __init__(self, server: MCPServer, home: str, resolve: Callable[[str], str],
                 on_change: Callable[[], None] = lambda: None) -> None:
        self.server = server
        self.home = home
        self._resolve = resolve
        self._on_change = on_change
        self.relay = Relay(server.name, self._write)
        self.state = "Stopped"
        self.error = ""
        self.restarts = 0
        self.last_exit: int | None = None
        self.retry_at = 0.0
        self._proc: asyncio.subprocess.Process | None = None
        self._task: asyncio.Task[None] | None = None
        self._ready = asyncio.Event()
        self._stopping = False

    # ---- what the host uses --------------------------------------------------------------------------------
    def start(self) -> None:
        if self._task is None and not self._stopping:
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def relay_for(self, _headers: dict[str, str]) -> Relay:
        """The relay once the process answers; fails at once while it waits to be restarted."""
        self.start()
        if self.state in ("Restarting", "Failed"):
            wait = max(0.0, self.retry_at - time.monotonic())
            raise Unavailable(f"MCP server {self.server.name} is unavailable: {self.error}; "
                              f"next start in {wait:.1f}s")
        try:
            await asyncio.wait_for(self._ready.wait(), INIT_TIMEOUT + 1)
        except TimeoutError:
            raise Unavailable(f"MCP server {self.server.name} is unavailable: not started in time") from None
        if not self._ready.is_set() or self.state != "Running":
            raise Unavailable(f"MCP server {self.server.name} is unavailable: {self.error or self.state}")
        return self.relay

    def status(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.server.name, "type": "stdio", "state": self.state,
                               "command": self.server.command, "autoStart": self.server.auto_start,
                               "restarts": self.restarts}
        if self._proc is not None and self.state == "Running":
            out["pid"] = self._proc.pid
        if self.last_exit is not None:
            out["lastExitCode"] = self.last_exit
        if self.error:
            out["error"] = self.error
        return out

    async def stop(self) -> None:
        self._stopping = True
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
        await self._kill()
        self.relay.close("was removed")
        self._set("Stopped")

    def kill_now(self) -> None:
        if self._proc is not None and self._proc.returncode is None:
            children.kill_group_now(self._proc.pid)

    # ---- the process -------------------------------------------------------------------------------------
    async def _write(self, data: bytes) -> None:
        proc = self._proc
        if proc is None or proc.stdin is None or proc.returncode is not None:
            raise RuntimeError("is not running")
        proc.stdin.write(data + b"\n")
        await proc.stdin.drain()

    def _set(self, state: str, error: str = "") -> None:
        self.state, self.error = state, error
        if state == "Running":
            self._ready.set()
        else:
            self._ready.clear()
        self._on_change()

    async def _run(self) -> None:
        attempt = 0
        while not self._stopping:
            started = time.monotonic()
            reason = await self._once()
            if self._stopping:
                return
            attempt = 0 if time.monotonic() - started >= HEALTHY_AFTER else attempt + 1
            delay = min(BACKOFF_MAX, BACKOFF_FIRST * (2 ** max(0, attempt - 1)))
            self.retry_at = time.monotonic() + delay
            self.restarts += 1
            log.warning("[%s] %s; restarting in %.1fs", self.server.name, reason, delay)
            self._set("Restarting", reason)
            await asyncio.sleep(delay)

    async def _once(self) -> str:
        """Run the process once; returns why it ended."""
        self._set("Starting")
        try:
            env = children.child_env(self.server, self.home, self._resolve)
        except ValueError as exc:
            return f"cannot start: {exc}"
        try:
            proc = await children.spawn(self.server, env, self.home)
        except OSError as exc:
            return f"cannot start {self.server.command!r}: {exc.strerror or exc}"
        self._proc = proc
        log.info("[%s] started %s (pid %d)", self.server.name, self.server.command, proc.pid)
        assert proc.stdout is not None and proc.stderr is not None
        reader = asyncio.get_running_loop().create_task(self._read(proc.stdout))
        errors = asyncio.get_running_loop().create_task(children.log_stderr(self.server.name, proc.stderr))
        try:
            init = asyncio.get_running_loop().create_task(self.relay.initialize(INIT_TIMEOUT))
            done, _ = await asyncio.wait({init, reader}, return_when=asyncio.FIRST_COMPLETED)
            if init not in done:
                init.cancel()
                return await self._ended(proc, "exited during initialize")
            try:
                init.result()
            except (TimeoutError, RuntimeError) as exc:
                await self._kill()
                return await self._ended(proc, f"did not initialize: {exc or 'timed out'}")
            self._set("Running")
            await reader
            return await self._ended(proc, "exited")
        finally:
            reader.cancel()
            await asyncio.wait({errors}, timeout=1)
            errors.cancel()

    async def _ended(self, proc: asyncio.subprocess.Process, what: str) -> str:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(proc.wait(), 2)
        await self._kill()  # what it started goes with it
        self.last_exit = proc.returncode
        reason = f"{what} with code {proc.returncode}" if what.startswith("exited") else what
        self.relay.close(f"is unavailable: {reason}")
        return reason

    async def _read(self, stdout: asyncio.StreamReader) -> None:
        while True:
            try:
                line = await stdout.readline()
            except ValueError:  # a line over the limit
                log.warning("[%s] dropped an over-long message", self.server.name)
                continue
            if not line:
                return
            if line.strip():
                self.relay.deliver(line)

    async def _kill(self) -> None:
        proc = self._proc
        if proc is not None:
            await children.kill_group(proc)
