"""How `muster-edge run` starts its bridge process: a free loopback port, and death with the gateway."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys

from catalog.config import Address, GatewayConfig
from extproc.bridges.children import die_with_parent


def with_port(config: GatewayConfig) -> GatewayConfig:
    """Port 0 in the config means any free loopback port, chosen once here for Envoy and the bridge alike."""
    if config.bridge_listen.port:
        return config
    with socket.socket() as sock:
        sock.bind((config.bridge_listen.host, 0))
        port = sock.getsockname()[1]
    return config.with_overrides(bridge_listen=Address(config.bridge_listen.host, port))


def start(config: GatewayConfig, env: dict[str, str]) -> subprocess.Popen[bytes]:
    """The bridge gets SIGTERM when the gateway dies (even by SIGKILL) and then stops its children's groups."""
    return subprocess.Popen([sys.executable, "-m", "extproc.cli", "bridges", "-c", config.source,
                             "--port", str(config.bridge_listen.port)], env=env,
                            preexec_fn=die_with_parent(signal.SIGTERM))
