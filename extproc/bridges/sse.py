"""sse upstreams (2024-11-05 HTTP+SSE) behind the bridge: filled in below."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from catalog.config import GatewayConfig
from catalog.manifests import MCPServer


class SseFactory:
    def __init__(self, config: GatewayConfig) -> None:
        self.config = config

    def make(self, server: MCPServer, on_change: Callable[[], None]) -> Any:
        return None
