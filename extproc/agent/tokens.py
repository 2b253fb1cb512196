"""The agent's token cache: one JSON file per gateway URL in the user's config directory, mode 0600."""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import asdict, dataclass
from typing import Any


def config_dir() -> str:
    base = os.environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    return os.path.join(base, "muster-edge", "agent")


@dataclass
class Tokens:
    access_token: str
    refresh_token: str = ""
    expires_at: float = 0.0
    token_endpoint: str = ""
    client_id: str = ""
    resource: str = ""

    def fresh(self, margin: float = 60.0) -> bool:
        return not self.expires_at or self.expires_at - margin > time.time()

    @classmethod
    def from_response(cls, body: dict[str, Any], token_endpoint: str, client_id: str, resource: str,
                      previous_refresh: str = "") -> Tokens:
        expires_in = body.get("expires_in")
        return cls(access_token=str(body["access_token"]),
                   refresh_token=str(body.get("refresh_token") or previous_refresh),
                   expires_at=time.time() + float(expires_in) if expires_in else 0.0,
                   token_endpoint=token_endpoint, client_id=client_id, resource=resource)


def cache_path(url: str) -> str:
    return os.path.join(config_dir(), hashlib.sha256(url.encode()).hexdigest()[:16] + ".json")


def load(url: str) -> Tokens | None:
    try:
        with open(cache_path(url), encoding="utf-8") as fh:
            data = json.load(fh)
        return Tokens(**{k: data[k] for k in Tokens.__dataclass_fields__ if k in data})
    except (OSError, ValueError, TypeError, KeyError):
        return None


def save(url: str, tokens: Tokens) -> str:
    """Written 0600 from the first byte (never readable by others, even briefly)."""
    path = cache_path(url)
    os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        json.dump({**asdict(tokens), "url": url}, fh)
    os.replace(tmp, path)
    return path
