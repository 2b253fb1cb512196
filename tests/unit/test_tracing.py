"""Tracing: the setting, the Envoy config it adds, and the processor side (continue Envoy's context, spans,
traceparent on the processor's own calls, trace ids in log lines), and off meaning nothing at all."""

from __future__ import annotations

import contextvars
import json
import logging
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import pytest

from catalog.config import Address, ConfigError, TracingConfig, parse_config
from extproc import envoy_config, logs, tracing
from tests.procs import ROOT

ENVOY_PARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


def test_tracing_is_off_unless_set_and_says_what_is_wrong() -> None:
    assert parse_config("").tracing is None
    cfg = parse_config("tracing: {endpoint: 'collector:4317', samplingRatio: 0.25, serviceName: edge}").tracing
    assert cfg == TracingConfig(Address("collector", 4317), False, 0.25, "edge")
    assert parse_config("tracing: {endpoint: 'https://otel.example:4317'}").tracing == \
        TracingConfig(Address("otel.example", 4317), True, 1.0, "muster-edge")
    for bad, field in (("{samplingRatio: 1}", "tracing"), ("{endpoint: 'x:1', samplingRatio: 2}", "samplingRatio"),
                       ("{endpoint: 'ftp://x:1'}", "endpoint"), ("{endpoint: x}", "endpoint"),
                       ("{endpoint: 'x:1', sampling: 1}", "tracing")):
        with pytest.raises(ConfigError, match=field):
            parse_config(f"tracing: {bad}")


def _hcm(boot: dict[str, Any]) -> dict[str, Any]:
    return dict(boot["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"])


def test_envoy_config_gets_a_tracer_only_when_tracing_is_on() -> None:
    off = envoy_config.bootstrap(parse_config(""), [50051], "/tmp/cds")
    assert "tracing" not in _hcm(off) and "request_id_extension" not in _hcm(off) and "layered_runtime" not in off
    assert envoy_config.OTLP_CLUSTER not in json.dumps(off)
    on = envoy_config.bootstrap(parse_config("tracing: {endpoint: '127.0.0.1:4317', samplingRatio: 0.5}"),
                                [50051], "/tmp/cds")
    hcm = _hcm(on)
    sampler = hcm["tracing"]["provider"]["typed_config"]["sampler"]["typed_config"]
    assert sampler["sampling_percentage"] == {"numerator": 500_000, "denominator": "MILLION"}
    assert hcm["tracing"]["provider"]["typed_config"]["service_name"] == "muster-edge-envoy"
    assert hcm["request_id_extension"]["typed_config"]["use_request_id_for_trace_sampling"] is False
    # Envoy exports in batches the processor's size, not every 5 spans (hundreds of export RPCs a second under load)
    runtime = on["layered_runtime"]["layers"][0]["static_layer"]
    assert runtime["tracing.opentelemetry.min_flush_spans"] >= 512
    assert runtime["tracing.opentelemetry.flush_interval_ms"] == 1000
    otlp = next(c for c in on["static_resources"]["clusters"] if c["name"] == envoy_config.OTLP_CLUSTER)
    assert otlp["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"] == \
        {"socket_address": {"address": "127.0.0.1", "port_value": 4317}}


def test_off_imports_no_sdk_and_spans_are_one_shared_no_op() -> None:
    code = ("import sys; from catalog.config import parse_config; from extproc import server, tracing; "
            "tracing.setup(parse_config('').tracing); server.build_gateway(parse_config(''))\n"
            "assert not tracing.ON and tracing.span('x') is tracing.span('y')\n"
            "print(sorted(m for m in sys.modules if m.startswith('opentelemetry.sdk') or 'otlp' in m))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


@pytest.fixture
def exported() -> Iterator[Any]:
    """Tracing on, exporting to memory; off again afterwards (the module's state is process-wide)."""
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    memory = InMemorySpanExporter()
    tracing.setup(TracingConfig(Address("127.0.0.1", 1)), exporter=memory)
    try:
        yield memory
    finally:
        tracing.shutdown()
        logs.set_trace_ids(None)


def test_the_processor_continues_envoys_context_and_passes_its_own_on(exported: Any) -> None:
    def one_stream() -> dict[str, str]:
        tracing.continue_stream([("x-forwarded-for", "192.0.2.2"), ("traceparent", ENVOY_PARENT)])
        carried: dict[str, str] = {}
        with tracing.span("muster_edge.decide", {"mcp.method.name": "tools/list"}):
            with tracing.span("muster_edge.list_fetch", child_only=True):
                tracing.inject(carried)
            with tracing.span("muster_edge.token_exchange", {"muster_edge.server": "github"}):
                pass
            tracing.annotate_current({"muster_edge.outcome": "answered"})
            record = logging.LogRecord("extproc.x", logging.INFO, __file__, 1, "hello", None, None)
            carried["log"] = logs.JsonFormatter().format(record)
        return carried

    carried = contextvars.copy_context().run(one_stream)  # each stream is a task with a context of its own
    with tracing.span("background", child_only=True) as outside:
        assert outside is None  # outside a trace, background work starts none
    assert tracing.current_trace_id() == ""
    tracing._provider.force_flush()
    spans = {s.name: s for s in exported.get_finished_spans()}
    assert set(spans) == {"muster_edge.decide", "muster_edge.list_fetch", "muster_edge.token_exchange"}
    decide, fetch = spans["muster_edge.decide"], spans["muster_edge.list_fetch"]
    _, trace_id, envoy_span, _ = ENVOY_PARENT.split("-")
    assert format(decide.context.trace_id, "032x") == trace_id
    assert format(decide.parent.span_id, "016x") == envoy_span  # under Envoy's ext_proc span
    assert fetch.parent.span_id == spans["muster_edge.token_exchange"].parent.span_id == decide.context.span_id
    assert decide.attributes["muster_edge.outcome"] == "answered"
    # the processor's own upstream call carries its span's context; the log line the trace id
    assert carried["traceparent"] == f"00-{trace_id}-{format(fetch.context.span_id, '016x')}-01"
    assert json.loads(carried["log"])["trace_id"] == trace_id


def test_envoys_unsampled_decision_is_followed(exported: Any) -> None:
    def one_stream() -> dict[str, str]:
        tracing.continue_stream([("traceparent", ENVOY_PARENT[:-2] + "00")])
        carried: dict[str, str] = {}
        with tracing.span("muster_edge.decide") as span:
            assert span is None  # no span at all, the context still flows
            tracing.inject(carried)
        return carried

    assert contextvars.copy_context().run(one_stream)["traceparent"].endswith("-00")
    tracing._provider.force_flush()
    assert not exported.get_finished_spans()


def test_a_malformed_traceparent_is_ignored(exported: Any) -> None:
    good = ENVOY_PARENT
    for bad in ("", "garbage", good.replace("00-", "ff-", 1), good.replace(good.split("-")[1], "0" * 32),
                good.replace(good.split("-")[2], "0" * 16), good + "-extra", good.replace("b7ad", "zzzz")):
        def one_stream(value: str = bad) -> str:
            tracing.continue_stream([("traceparent", value)])
            return tracing.current_trace_id()

        assert contextvars.copy_context().run(one_stream) == "", bad

    def with_state() -> str:
        tracing.continue_stream([("traceparent", good), ("tracestate", "vendor=abc")])
        carried: dict[str, str] = {}
        tracing.inject(carried)
        return carried.get("tracestate", "")

    assert contextvars.copy_context().run(with_state) == "vendor=abc"


def test_the_lean_encoding_is_the_exporters_own(exported: Any) -> None:
    from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans

    from extproc.tracing_export import encode

    def one_stream() -> None:
        tracing.continue_stream([("traceparent", ENVOY_PARENT), ("tracestate", "vendor=abc")])
        with tracing.span("muster_edge.decide", {"n": 3, "ratio": 0.5, "ok": True, "tags": ["a", "b"]}) as span:
            tracing.annotate(span, {"mcp.method.name": "tools/call"})
            with tracing.span("muster_edge.token_exchange"):
                pass
            with pytest.raises(ValueError), tracing.span("muster_edge.resend"):
                raise ValueError("refused")

    contextvars.copy_context().run(one_stream)
    tracing._provider.force_flush()
    spans = exported.get_finished_spans()
    assert len(spans) == 3
    resend = next(s for s in spans if s.name == "muster_edge.resend")
    assert resend.status.status_code.name == "ERROR" and resend.events  # the exception, recorded
    assert encode(spans) == encode_spans(spans)
