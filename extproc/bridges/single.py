"""`muster-edge bridge -- COMMAND ARGS…`: one stdio MCP server served over streamable HTTP at /mcp.

For a stdio server in a pod of its own (deploy/kubernetes/stdio-bridge.yaml): the gateway then points an
MCPServer of type `streamable-http` at its Service. Same relay and supervision as the gateway's own bridge.
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile

from catalog.config import Address
from catalog.manifests import MCPServer
from extproc.bridges.host import BridgeHost, serve


def run_single(args: argparse.Namespace) -> int:
    argv = list(args.argv[1:] if args.argv[:1] == ["--"] else args.argv)
    if not argv:
        raise SystemExit("muster-edge bridge: give the stdio server's command after --")
    env: dict[str, str] = {}
    for item in args.env:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SystemExit(f"muster-edge bridge: --env {item!r}: expected KEY=VALUE")
        env[key] = value
    server = MCPServer(name=args.name, namespace="default", type="stdio", source="command line",
                       command=argv[0], args=tuple(argv[1:]), env=env, auto_start=True)
    listen = Address.parse(args.listen, "--listen")
    state = args.home or tempfile.mkdtemp(prefix="muster-edge-bridge-")
    host = BridgeHost(state, "/var/run/secrets", alias={"/mcp": server.name})

    async def main() -> None:
        await host.apply([server])
        await serve(host, listen.host, listen.port, None)

    asyncio.run(main())
    return 0
