"""Settings of the hot path: Envoy's worker threads, the audit volume, and the batching audit writer."""

from __future__ import annotations

import io
import logging

import pytest

from catalog.config import ConfigError, parse_config
from extproc.logs import BatchingHandler
from extproc.supervisor import envoy_concurrency


def test_envoy_concurrency_and_audit_volume_settings() -> None:
    config = parse_config("envoyConcurrency: 2\nauditVolume: denied\n")
    assert (config.envoy_concurrency, envoy_concurrency(config), config.audit_volume) == (2, 2, "denied")
    default = parse_config("{}")
    assert default.audit_volume == "all" and 1 <= envoy_concurrency(default) <= 4
    with pytest.raises(ConfigError, match="auditVolume"):
        parse_config("auditVolume: some\n")
    with pytest.raises(ConfigError, match="envoyConcurrency"):
        parse_config("envoyConcurrency: -1\n")


class CountingStream(io.StringIO):
    writes = 0

    def write(self, s: str) -> int:
        self.writes += 1
        return super().write(s)


def batching_logger(name: str, max_lines: int, max_delay_s: float) -> tuple[logging.Logger, CountingStream,
                                                                           BatchingHandler]:
    stream = CountingStream()
    handler = BatchingHandler(stream, max_lines=max_lines, max_delay_s=max_delay_s)
    handler.setFormatter(logging.Formatter("%(message)s"))
    log = logging.Logger(name)
    log.addHandler(handler)
    return log, stream, handler


def test_batching_handler_writes_lines_in_batches() -> None:
    log, stream, handler = batching_logger("batching-test", 10, 3600)
    for i in range(25):
        log.info("line %d", i)
    assert stream.writes == 2  # two full batches of 10
    handler.flush()
    assert stream.writes == 3
    assert stream.getvalue().splitlines() == [f"line {i}" for i in range(25)]


def test_batching_handler_writes_a_late_line_after_its_delay() -> None:
    log, stream, _ = batching_logger("batching-late", 1000, 0.0)
    log.info("now")
    assert stream.getvalue() == "now\n"


def test_batching_handler_writes_an_urgent_line_at_once() -> None:
    log, stream, _ = batching_logger("batching-urgent", 1000, 3600)
    log.info("allowed")
    assert stream.getvalue() == ""
    log.info("denied", extra={"urgent": True})
    assert stream.getvalue() == "allowed\ndenied\n"
