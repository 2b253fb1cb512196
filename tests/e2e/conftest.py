"""A shared demo fleet behind one real gateway, for the end-to-end tests that only read from it."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from mcp.client.client import Client

from tests.gateway_harness import Gateway, start_gateway
from tests.procs import DemoServer, start_demo_server

MODES = ["legacy", "2026-07-28"]


@dataclass
class Fleet:
    gateway: Gateway
    servers: dict[str, DemoServer]
    records: dict[str, Path]


@pytest.fixture(scope="session")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    """kubernetes (dual era, SSE), prometheus (dual era, JSON answers), vendor (handshake era only)."""
    work = tmp_path_factory.mktemp("fleet")
    records = {name: work / f"{name}.headers.jsonl" for name in ("kubernetes", "prometheus", "vendor")}
    with contextlib.ExitStack() as stack:
        servers = {
            "kubernetes": stack.enter_context(start_demo_server("kubernetes", name="kubernetes",
                                                                record_headers=records["kubernetes"])),
            "prometheus": stack.enter_context(start_demo_server("prometheus", name="prometheus", json_response=True,
                                                                record_headers=records["prometheus"])),
            "vendor": stack.enter_context(start_demo_server("vendor", name="vendor", era="legacy",
                                                            record_headers=records["vendor"])),
        }
        gateway = stack.enter_context(start_gateway(work / "gw", {n: s.url for n, s in servers.items()},
                                                    listTtlFloorMs=600_000))
        yield Fleet(gateway, servers, records)


@contextlib.asynccontextmanager
async def connect(url: str, mode: str) -> AsyncIterator[Client]:
    async with Client(url, mode=mode) as client:
        yield client
