"""The supervisor's restart rules with real (short-lived) child processes: backoff, give-up, what it reports."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pytest

from catalog.config import ConfigError, parse_config
from extproc.supervisor import Children, backoff


def crash_loop(children: Children, crashing: str, until: float = 10.0) -> str | None:
    deadline = time.monotonic() + until
    while time.monotonic() < deadline:
        why = children.supervise(time.monotonic())
        if why is not None or any(c.given_up for c in children.children if c.name == crashing):
            return why
        time.sleep(0.02)
    raise AssertionError("the supervisor neither gave up nor stopped")


def test_backoff_grows_and_is_capped() -> None:
    assert [backoff(n) for n in (1, 2, 3, 4)] == pytest.approx([0.1, 0.3, 0.9, 2.7])
    assert backoff(50) == 10.0


def test_a_crashing_worker_is_restarted_then_given_up_while_the_others_run(tmp_path: Path) -> None:
    state = tmp_path / "supervisor.json"
    children = Children(max_crashes=3, window_s=60, state_file=str(state))
    children.start([sys.executable, "-c", "import sys; sys.exit(3)"], name="processor 1")
    children.start([sys.executable, "-c", "import time; time.sleep(30)"], name="processor 0")
    try:
        assert crash_loop(children, "processor 1") is None  # processor 0 still serves: the gateway keeps running
        doc = json.loads(state.read_text())
        crashed = next(p for p in doc["processes"] if p["name"] == "processor 1")
        assert doc["gaveUp"] == ["processor 1"]
        assert crashed["state"] == "GaveUp" and crashed["restarts"] == 2 and crashed["lastExitCode"] == 3
        assert next(p for p in doc["processes"] if p["name"] == "processor 0")["state"] == "Running"
    finally:
        children.stop()


def test_giving_up_on_envoy_stops_the_gateway(tmp_path: Path) -> None:
    children = Children(max_crashes=1, window_s=60, state_file=str(tmp_path / "s.json"))
    children.start([sys.executable, "-c", "import time; time.sleep(30)"], name="processor 0")
    children.start([sys.executable, "-c", "raise SystemExit(1)"], name="envoy")
    try:
        assert crash_loop(children, "envoy") == "gave up on envoy"
    finally:
        children.stop()


def test_restart_settings_are_read_and_checked() -> None:
    assert parse_config("{}").restart_max_crashes == 5
    cfg = parse_config("restart: {maxCrashes: 2, windowSeconds: 10}")
    assert (cfg.restart_max_crashes, cfg.restart_window_s) == (2, 10)
    for bad in ("restart: {maxCrashes: 0}", "restart: {tries: 3}", "restart: 5"):
        try:
            parse_config(bad)
        except ConfigError as exc:
            assert "restart" in str(exc)
        else:
            raise AssertionError(bad)
