"""How `muster-edge run` starts its bridge process: a free loopback port, and death with the gateway."""

from __future__ import annotations

import socket
import sys

from catalog.config import Address, GatewayConfig


def with_port(config: GatewayConfig) -> GatewayConfig:
    """Port 0 in the config means any free loopback port, chosen once here for Envoy and the bridge alike."""
    if config.bridge_listen.port:
        return config
    with socket.socket() as sock:
        sock.bind((config.bridge_listen.host, 0))
        port = sock.getsockname()[1]
    return config.with_overrides(bridge_listen=Address(config.bridge_listen.host, port))


def command(config: GatewayConfig) -> list[str]:
    """The bridge process, for the supervisor (which restarts it like any other child)."""
    return [sys.executable, "-m", "extproc.cli", "bridges", "-c", config.source,
            "--port", str(config.bridge_listen.port)]
