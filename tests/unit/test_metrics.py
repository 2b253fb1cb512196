"""The metrics' pure parts: Envoy's access log entry to bounded labels, one exposition for every worker, the
`metrics` setting."""

from __future__ import annotations

import pytest
from envoy.data.accesslog.v3 import accesslog_pb2 as al

from catalog.config import ConfigError, GatewayConfig, parse_config
from extproc import envoy_config
from extproc.access_log import call_facts, outcome
from extproc.metrics import Metrics, merge_workers


def entry(server: str = "kube", method: str = "tools/call", code: int = 200, details: str = "via_upstream",
          duration_ms: int = 30, upstream_ms: tuple[int, int] | None = (5, 25), **flags: bool) -> al.HTTPAccessLogEntry:
    e = al.HTTPAccessLogEntry()
    common = e.common_properties
    fields = common.metadata.filter_metadata["muster_edge"].fields
    if server:
        fields["server"].string_value = server
    if method:
        fields["method"].string_value = method
    common.duration.FromMilliseconds(duration_ms)
    if upstream_ms is not None:
        common.time_to_first_upstream_tx_byte.FromMilliseconds(upstream_ms[0])
        common.time_to_last_upstream_rx_byte.FromMilliseconds(upstream_ms[1])
    for name, value in flags.items():
        setattr(common.response_flags, name, value)
    e.response.response_code.value = code
    e.response.response_code_details = details
    return e


def test_a_routed_call_becomes_bounded_labels_and_both_parts_of_its_time() -> None:
    facts = call_facts(entry(), {"kube"}, {"tools/call"})
    assert facts is not None
    server, method, result, seconds, upstream = facts
    assert (server, method, result) == ("kube", "tools/call", "ok")
    assert seconds == pytest.approx(0.030) and upstream == pytest.approx(0.020)
    # not in the catalog, not a known method: "other", never the value as it came
    assert call_facts(entry(server="evil\"}", method="x/secret"), {"kube"}, {"tools/call"})[:2] == ("other", "other")
    assert call_facts(entry(server=""), {"kube"}, {"tools/call"}) is None  # not routed
    assert call_facts(entry(upstream_ms=None), {"kube"}, {"tools/call"})[4] is None  # never reached an upstream


@pytest.mark.parametrize(("kwargs", "expected"), [
    ({}, "ok"),
    ({"code": 502, "details": "muster_edge_upstream_error"}, "error"),
    ({"code": 200, "details": "muster_edge_upstream_error"}, "error"),  # a lost session, sent with 200
    ({"code": 502, "details": "muster_edge_upstream_refused_credential"}, "refused"),
    ({"code": 401}, "refused"),
    ({"code": 503, "no_healthy_upstream": True}, "unavailable"),
    ({"code": 502, "details": "muster_edge_upstream_error", "upstream_connection_failure": True}, "unavailable"),
    ({"code": 502, "upstream_request_timeout": True}, "timeout"),
    ({"code": 0, "downstream_remote_reset": True}, "cancelled"),
])
def test_outcomes_are_a_fixed_set(kwargs: dict[str, object], expected: str) -> None:
    assert outcome(entry(**kwargs)) == expected  # type: ignore[arg-type]


def test_every_worker_in_one_exposition_with_a_worker_label() -> None:
    one, two = Metrics(), Metrics()
    one.message("request_body", 0.001)
    two.message("request_body", 0.002)
    two.message("no_such_kind", 0.002)
    one.inc("muster_edge_requests_total", method="tools/call", outcome="routed")
    merged = merge_workers({"0": one.render(), "1": two.render(), "2": None})
    lines = merged.splitlines()
    assert 'muster_edge_worker_up{worker="2"} 0' in lines and 'muster_edge_worker_up{worker="0"} 1' in lines
    assert 'muster_edge_processor_message_seconds_count{worker="1",kind="other"} 1.0' in lines
    assert 'muster_edge_requests_total{worker="0",method="tools/call",outcome="routed"} 1' in lines
    # one HELP/TYPE per family, its samples right after it (the format requires a family's lines together)
    assert merged.count("# TYPE muster_edge_processor_message_seconds histogram") == 1
    start = lines.index("# TYPE muster_edge_processor_message_seconds histogram")
    block = [ln for ln in lines[start + 1:start + 200] if ln.startswith("muster_edge_processor_message_seconds")]
    assert any('worker="0"' in ln for ln in block) and any('worker="1"' in ln for ln in block)
    assert all(ln.startswith("#") or "worker=" in ln for ln in lines)


def test_metrics_false_turns_the_histograms_and_the_access_log_off() -> None:
    off = Metrics(histograms=False)
    off.message("request_body", 0.001)
    off.routed_call("kube", "tools/call", "ok", 0.01, 0.005)
    assert "_count{" not in off.render()
    assert parse_config("metrics: false").metrics is False and parse_config("").metrics is True
    with pytest.raises(ConfigError):
        parse_config("metrics: maybe")
    on = envoy_config.public_listeners(GatewayConfig())[0]["filter_chains"][0]["filters"][0]["typed_config"]
    assert on["access_log"][0]["name"] == "envoy.access_loggers.http_grpc"
    no = envoy_config.public_listeners(GatewayConfig(metrics=False))[0]["filter_chains"][0]["filters"][0]
    assert "access_log" not in no["typed_config"]
