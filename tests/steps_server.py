"""An upstream MCP server for the workflow tests: it counts calls and records how many were in flight at once.

    .venv/bin/python tests/steps_server.py --port 0 [--name NAME]

Prints `READY http://127.0.0.1:PORT/mcp` when it accepts connections. Tools: `slow` (sleeps; in-flight peak),
`hang` (sleeps long; for cancellation), `stats`, `reset`, `echo` (the value and its JSON type), `items`,
`status`, `fail` (an isError result), `ask` (elicitation), `write` (not read-only).
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import mcp_types as types
from mcp.server import MCPServer
from mcp.server.mcpserver import Context
from mcp.server.mcpserver.exceptions import ToolError
from pydantic import BaseModel

_spec = importlib.util.spec_from_file_location("demo_servers", Path(__file__).resolve().parent.parent / "deploy" /
                                               "demo" / "servers.py")
assert _spec is not None and _spec.loader is not None
demo = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(demo)

READ_ONLY = types.ToolAnnotations(read_only_hint=True, destructive_hint=False, open_world_hint=False)
WRITE = types.ToolAnnotations(read_only_hint=False, destructive_hint=True)


def json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, str):
        return "string"
    return "array" if isinstance(value, list) else "object"


class Answer(BaseModel):
    answer: str


def build(name: str) -> MCPServer:
    server = MCPServer(name, version="0.1.0")
    state: dict[str, Any] = {"in_flight": 0, "peak": 0, "calls": Counter(), "finished": Counter()}

    def enter(tool: str) -> None:
        state["calls"][tool] += 1
        state["in_flight"] += 1
        state["peak"] = max(state["peak"], state["in_flight"])

    def leave(tool: str) -> None:
        state["in_flight"] -= 1
        state["finished"][tool] += 1

    @server.tool(annotations=READ_ONLY)
    async def slow(label: str, ms: int = 500) -> dict[str, Any]:
        """Sleep for ms milliseconds; the answer says how many calls were in flight at most meanwhile."""
        enter("slow")
        try:
            await asyncio.sleep(ms / 1000)
            return {"label": label, "server": name, "peak": state["peak"]}
        finally:
            leave("slow")

    @server.tool(annotations=READ_ONLY)
    async def hang(seconds: float = 10) -> dict[str, Any]:
        """Sleep for a long time (a step a client cancels)."""
        enter("hang")
        try:
            await asyncio.sleep(seconds)
            return {"slept": seconds}
        finally:
            leave("hang")

    @server.tool(annotations=READ_ONLY)
    def stats() -> dict[str, Any]:
        """Calls per tool, calls finished per tool, and the in-flight peak so far."""
        return {"server": name, "peak": state["peak"], "in_flight": state["in_flight"],
                "calls": dict(state["calls"]), "finished": dict(state["finished"])}

    @server.tool(annotations=READ_ONLY)
    def reset() -> str:
        """Forget the counters."""
        state.update(in_flight=0, peak=0, calls=Counter(), finished=Counter())
        return "reset"

    @server.tool(annotations=READ_ONLY)
    def echo(value: Any = None, label: str = "") -> dict[str, Any]:
        """The value as it arrived, and its JSON type."""
        enter("echo")
        leave("echo")
        return {"server": name, "label": label, "value": value, "type": json_type(value)}

    @server.tool(annotations=READ_ONLY)
    def items(n: int = 3) -> dict[str, Any]:
        """n names."""
        return {"server": name, "names": [f"item-{i}" for i in range(n)], "count": n}

    @server.tool(annotations=READ_ONLY)
    def status(phase: str = "Running") -> dict[str, Any]:
        """A pod-like status."""
        return {"items": [{"name": f"{name}-pod", "phase": phase}]}

    @server.tool(annotations=READ_ONLY)
    def fail(message: str = "boom") -> str:
        """Always an error result."""
        enter("fail")
        leave("fail")
        raise ToolError(message)

    @server.tool(annotations=READ_ONLY, structured_output=False)
    async def ask(ctx: Context) -> str:
        """Ask the client for input (elicitation)."""
        enter("ask")
        try:
            result = await ctx.elicit("Which one?", Answer)
            return f"answered: {result.action}"
        finally:
            leave("ask")

    @server.tool(annotations=WRITE)
    def write(value: str = "") -> dict[str, Any]:
        """A tool that is not read-only."""
        enter("write")
        leave("write")
        return {"written": value, "server": name}

    return server


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--name", default="steps")
    args = parser.parse_args()
    app = build(args.name).streamable_http_app(host=args.host)
    sock = demo.listen(args.host, args.port)
    port = sock.getsockname()[1]
    asyncio.run(demo.serve(app, sock, lambda: print(f"READY http://{args.host}:{port}/mcp", flush=True)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
