"""deploy/demo/servers.py, unchanged except that its listening socket gets TCP_NODELAY.

servers.py creates its socket as `socket.socket(AF_INET, SOCK_STREAM)` (protocol 0) and serves it on the
default asyncio loop; asyncio only sets TCP_NODELAY on sockets whose protocol is IPPROTO_TCP, so accepted
connections keep Nagle's algorithm. uvicorn writes the response head and body separately, the body waits for
the ACK of the head, and the client's delayed ACK holds that for ~40 ms: every request after the first on a
keep-alive connection takes 40+ ms, direct or through Envoy. The benchmark wants the SDK's real cost, so this
wrapper sets TCP_NODELAY on the listening socket (Linux copies it to accepted sockets) and runs the demo
server's own `main`. `run.py` also measures the server as shipped, once, to show the difference.

    .venv/bin/python -m bench.sdk_upstream prometheus --port 0 --name sdk --json-response
"""

from __future__ import annotations

import importlib.util
import socket
import sys
from pathlib import Path
from typing import Any

SERVERS = Path(__file__).resolve().parent.parent / "deploy" / "demo" / "servers.py"


def load_demo_servers() -> Any:
    spec = importlib.util.spec_from_file_location("muster_edge_demo_servers", SERVERS)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load {SERVERS}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main(argv: list[str] | None = None) -> int:
    demo = load_demo_servers()
    shipped_listen = demo.listen

    def listen(host: str, port: int) -> socket.socket:
        sock = shipped_listen(host, port)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock

    demo.listen = listen
    return int(demo.main(argv))


if __name__ == "__main__":
    sys.exit(main())
