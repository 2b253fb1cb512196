"""An `mcp` SDK upstream that runs tool calls as tasks, in both eras, for the task tests.

    python tests/tasks_server.py --port 0 [--era legacy|dual] [--no-tasks-capability]

Tools: `slow_sum(a, b, seconds)` (2025-11-25 `execution.taskSupport: "required"`), `echo(text)` ("optional").
The SDK 2.3 types tasks but does not dispatch them, so the task methods are served by a server middleware on the
SDK's own runner: the 2025-11-25 methods (`tools/call` with `params.task`, `tasks/get|result|cancel|list`) on
handshake-era connections, the `io.modelcontextprotocol/tasks` extension (`resultType: "task"`, `tasks/get|update|
cancel`) on 2026-07-28 requests that declare it. Tasks are bound to the caller's Authorization header (the
gateway's one credential here, so every gateway caller shares one upstream context: the gateway must bind).
`--no-tasks-capability` lists `slow_sum` as required but declares no task capability (unreachable). `GET /seen`
answers the task ids this server handed out and the cancels it received. Prints `READY http://...`.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import hashlib
import json
import secrets
import socket
import sys
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import uvicorn
from mcp.server import MCPServer
from mcp.shared.exceptions import MCPError
from mcp_types.version import HANDSHAKE_PROTOCOL_VERSIONS, MODERN_PROTOCOL_VERSIONS
from starlette.types import ASGIApp, Receive, Scope, Send

EXT = "io.modelcontextprotocol/tasks"
RELATED = "io.modelcontextprotocol/related-task"
TERMINAL = ("completed", "failed", "cancelled")
SUPPORT = {"slow_sum": "required", "echo": "optional"}


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat().replace("+00:00", "Z")


@dataclass
class Job:
    task_id: str
    context: str
    status: str = "working"
    created: str = field(default_factory=_now)
    updated: str = field(default_factory=_now)
    result: dict[str, Any] | None = None
    runner: asyncio.Task[None] | None = None
    done: asyncio.Event = field(default_factory=asyncio.Event)

    def legacy(self) -> dict[str, Any]:
        return {"taskId": self.task_id, "status": self.status, "createdAt": self.created,
                "lastUpdatedAt": self.updated, "ttl": 600_000, "pollInterval": 50}

    def modern(self) -> dict[str, Any]:
        out = {"taskId": self.task_id, "status": self.status, "createdAt": self.created,
               "lastUpdatedAt": self.updated, "ttlSeconds": 600, "pollIntervalMilliseconds": 50}
        if self.status == "completed" and self.result is not None:
            out["result"] = self.result
        return out


class Tasks:
    def __init__(self) -> None:
        self.jobs: dict[str, Job] = {}
        self.issued: list[str] = []
        self.cancelled: list[str] = []

    def start(self, context: str, name: str, arguments: Mapping[str, Any]) -> Job:
        job = Job("t-" + secrets.token_hex(4), context)
        self.jobs[job.task_id] = job
        self.issued.append(job.task_id)
        job.runner = asyncio.get_running_loop().create_task(self._run(job, name, arguments))
        return job

    async def _run(self, job: Job, name: str, arguments: Mapping[str, Any]) -> None:
        try:
            text = await run_tool(name, arguments)
            job.result = {"content": [{"type": "text", "text": text}], "structuredContent": {"result": text},
                          "isError": False}
            job.status = "completed"
        except asyncio.CancelledError:
            job.status = "cancelled"
        finally:
            job.updated = _now()
            job.done.set()

    def find(self, context: str, params: Mapping[str, Any] | None) -> Job:
        task_id = (params or {}).get("taskId")
        job = self.jobs.get(task_id) if isinstance(task_id, str) else None
        if job is None or job.context != context:
            raise MCPError(-32602, f"Unknown task: {task_id}")
        return job


async def run_tool(name: str, arguments: Mapping[str, Any]) -> str:
    if name == "slow_sum":
        await asyncio.sleep(float(arguments.get("seconds", 0.2)))
        return str(int(arguments["a"]) + int(arguments["b"]))
    return str(arguments.get("text", ""))


def context_of(ctx: Any) -> str:
    request = getattr(ctx, "request", None)
    headers = getattr(request, "headers", None) or {}
    return hashlib.sha256(str(headers.get("authorization", "")).encode()).hexdigest()[:16]


def middleware(tasks: Tasks, declare: bool) -> Callable[[Any, Callable[[Any], Awaitable[Any]]], Awaitable[Any]]:
    async def handle(ctx: Any, call_next: Callable[[Any], Awaitable[Any]]) -> Any:
        method, params = ctx.method, dict(ctx.params or {})
        modern = ctx.protocol_version in MODERN_PROTOCOL_VERSIONS
        context = context_of(ctx)
        if method == "initialize":
            result = dict(await call_next(ctx))
            if declare:
                result["capabilities"] = {**result.get("capabilities", {}), "tasks": {
                    "list": {}, "cancel": {}, "requests": {"tools": {"call": {}}}}}
            return result
        if method == "server/discover":
            result = dict(await call_next(ctx))
            if declare:
                caps = dict(result.get("capabilities", {}))
                caps["extensions"] = {**caps.get("extensions", {}), EXT: {}}
                result["capabilities"] = caps
            return result
        if method == "tools/list" and not modern:
            result = dict(await call_next(ctx))
            result["tools"] = [{**t, "execution": {"taskSupport": SUPPORT[t["name"]]}} if t["name"] in SUPPORT else t
                               for t in result.get("tools", [])]
            return result
        if method == "tools/call":
            name, arguments = params.get("name"), params.get("arguments") or {}
            caps = ((params.get("_meta") or {}).get("io.modelcontextprotocol/clientCapabilities") or {})
            if modern and declare and EXT in (caps.get("extensions") or {}) and name == "slow_sum":
                return {"resultType": "task", **tasks.start(context, name, arguments).modern()}
            if not modern and "task" in params and declare and name in SUPPORT:
                return {"task": tasks.start(context, str(name), arguments).legacy()}
            if not modern and name == "slow_sum":
                raise MCPError(-32601, "slow_sum must be called as a task")
            return await call_next(ctx)
        if method.startswith("tasks/") and declare:
            return await task_method(tasks, method, params, context, modern)
        return await call_next(ctx)

    return handle


async def task_method(tasks: Tasks, method: str, params: dict[str, Any], context: str, modern: bool) -> Any:
    if method == "tasks/list" and not modern:
        return {"tasks": [j.legacy() for j in tasks.jobs.values() if j.context == context]}
    job = tasks.find(context, params)
    if method == "tasks/get":
        return {"resultType": "complete", **job.modern()} if modern else job.legacy()
    if method == "tasks/cancel":
        tasks.cancelled.append(job.task_id)
        if job.status in TERMINAL:
            if modern:
                return {"resultType": "complete"}
            raise MCPError(-32602, f"Task {job.task_id} is already {job.status}")
        if job.runner is not None:
            job.runner.cancel()
            await job.done.wait()
        return {"resultType": "complete"} if modern else job.legacy()
    if method == "tasks/result" and not modern:
        await job.done.wait()
        if job.status != "completed" or job.result is None:
            raise MCPError(-32000, f"Task {job.task_id} was {job.status}")
        return {**job.result, "_meta": {RELATED: {"taskId": job.task_id}}}
    if method == "tasks/update" and modern:
        return {"resultType": "complete"}
    raise MCPError(-32601, f"Method not found: {method}")


def build(era: str, declare: bool) -> ASGIApp:
    tasks = Tasks()
    server = MCPServer("tasks-upstream", version="0.1.0", middleware=[middleware(tasks, declare)])

    @server.tool()
    async def slow_sum(a: int, b: int, seconds: float = 0.2) -> str:
        """Add two numbers slowly (a task: 2025-11-25 taskSupport required)."""
        return await run_tool("slow_sum", {"a": a, "b": b, "seconds": seconds})

    @server.tool()
    def echo(text: str) -> str:
        """Say it back (taskSupport optional)."""
        return text

    app = server.streamable_http_app(json_response=True, host="127.0.0.1")

    async def wrapped(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] == "/seen":
            body = json.dumps({"issued": tasks.issued, "cancelled": tasks.cancelled}).encode()
            await send({"type": "http.response.start", "status": 200,
                        "headers": [(b"content-type", b"application/json")]})
            await send({"type": "http.response.body", "body": body})
            return
        if scope["type"] == "http" and era == "legacy":
            version = dict(scope["headers"]).get(b"mcp-protocol-version", b"").decode()
            if version and version not in HANDSHAKE_PROTOCOL_VERSIONS:
                await send({"type": "http.response.start", "status": 400,
                            "headers": [(b"content-type", b"text/plain")]})
                await send({"type": "http.response.body", "body": b"Bad Request: Unsupported protocol version"})
                return
        await app(scope, receive, send)

    return wrapped


async def main(port: int, era: str, declare: bool) -> None:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", port))
    sock.listen(128)
    config = uvicorn.Config(build(era, declare), log_level="warning", lifespan="on", access_log=False)
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve(sockets=[sock]))
    while not server.started and not task.done():
        await asyncio.sleep(0.01)
    print(f"READY http://127.0.0.1:{sock.getsockname()[1]}/mcp", flush=True)
    await task


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--era", choices=("legacy", "dual"), default="dual")
    parser.add_argument("--no-tasks-capability", action="store_true")
    args = parser.parse_args()
    asyncio.run(main(args.port, args.era, not args.no_tasks_capability))
    sys.exit(0)
