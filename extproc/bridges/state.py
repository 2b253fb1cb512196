"""The bridge's status file, read by the processor so a stdio or sse server's process state shows in /status."""

from __future__ import annotations

import os
from typing import Any

import orjson

STATUS_FILE = "status.json"


def status_path(state_dir: str) -> str:
    return os.path.join(state_dir, "bridges", STATUS_FILE)


def read_status(state_dir: str) -> dict[str, dict[str, Any]]:
    """What the bridge last wrote about its servers, by name."""
    try:
        with open(status_path(state_dir), "rb") as fh:
            data = orjson.loads(fh.read())
    except (OSError, orjson.JSONDecodeError):
        return {}
    return {s["name"]: s for s in data.get("servers", []) if isinstance(s, dict) and "name" in s}


def with_bridges(status: dict[str, Any], state_dir: str) -> dict[str, Any]:
    """Each bridged server's entry gains `process` (state, pid, restarts, last exit code, error)."""
    bridged = read_status(state_dir)
    for entry in status.get("servers", []):
        found = bridged.get(entry.get("name", ""))
        if found is not None:
            entry["process"] = {k: v for k, v in found.items() if k != "name"}
    return status
