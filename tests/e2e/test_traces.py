"""Traces: one trace holds Envoy's request span, the processor's spans and the context the upstream received.

No OpenTelemetry collector binary installs here, so the test runs its own OTLP receiver: a gRPC server
implementing the OpenTelemetry protocol's own TraceService (opentelemetry-proto), which is what Envoy's tracer and
the processor's exporter send to. The upstream (a demo MCP server) records the headers of every request it gets.
"""

from __future__ import annotations

import json
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from concurrent import futures
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import grpc
import httpx2
import pytest
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

from tests.e2e.test_gateway import modern_body, modern_headers
from tests.gateway_harness import Gateway, start_gateway
from tests.procs import start_demo_server

T = TypeVar("T")
ARGUMENT = "ns-arg-41c9d2"
CALLER_TOKEN = "caller-token-5e0b7a"


@dataclass(frozen=True)
class Span:
    service: str
    name: str
    trace_id: str
    span_id: str
    parent_id: str
    attributes: dict[str, Any]


class Receiver(trace_service_pb2_grpc.TraceServiceServicer):
    """An OTLP/gRPC trace receiver that keeps every span it is sent."""

    def __init__(self) -> None:
        self.spans: list[Span] = []
        self._lock = threading.Lock()

    def Export(self, request: Any, context: Any) -> Any:
        got = []
        for rs in request.resource_spans:
            service = next((a.value.string_value for a in rs.resource.attributes if a.key == "service.name"), "")
            for ss in rs.scope_spans:
                for s in ss.spans:
                    attrs = {a.key: getattr(a.value, a.value.WhichOneof("value")) for a in s.attributes
                             if a.value.WhichOneof("value")}
                    got.append(Span(service, s.name, s.trace_id.hex(), s.span_id.hex(), s.parent_span_id.hex(),
                                    attrs))
        with self._lock:
            self.spans.extend(got)
        return trace_service_pb2.ExportTraceServiceResponse()

    def of_trace(self, trace_id: str) -> list[Span]:
        with self._lock:
            return [s for s in self.spans if s.trace_id == trace_id]


@contextmanager
def otlp_receiver() -> Iterator[tuple[Receiver, int]]:
    receiver = Receiver()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(receiver, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield receiver, port
    finally:
        server.stop(None)


def poll(get: Callable[[], T | None], what: str, timeout: float = 20) -> T:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = get()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def recorded(path: Path, method: str) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    lines = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in lines if isinstance(r.get("body"), dict) and r["body"].get("method") == method]


def traceparent(record: dict[str, Any]) -> tuple[str, str] | None:
    """(trace id, parent span id) of the traceparent a recorded request carried."""
    value = record["headers"].get("traceparent")
    if not value:
        return None
    _, trace_id, span_id, _ = value.split("-")
    return trace_id, span_id


def call(gw: Gateway, http: httpx2.Client, request_id: str) -> None:
    body = modern_body("tools/call", {"name": "x_kubernetes_get_pods", "arguments": {"namespace": ARGUMENT}})
    extra = {"x-request-id": request_id, "authorization": f"Bearer {CALLER_TOKEN}"}
    resp = http.post(gw.url, json=body, headers=modern_headers("tools/call", "x_kubernetes_get_pods", **extra))
    assert resp.status_code == 200, resp.text
    assert "error" not in resp.json(), resp.text


def list_tools(gw: Gateway, http: httpx2.Client) -> None:
    resp = http.post(gw.url, json=modern_body("tools/list"), headers=modern_headers("tools/list"))
    assert resp.status_code == 200, resp.text


@pytest.mark.timeout(120)
def test_one_trace_holds_envoy_the_processor_and_the_upstream(tmp_path: Path) -> None:
    headers_log = tmp_path / "upstream-headers.jsonl"
    with otlp_receiver() as (receiver, otlp_port), \
            start_demo_server("kubernetes", name="kubernetes", record_headers=headers_log) as kube, \
            start_gateway(tmp_path, {"kubernetes": kube.url}, logFormat="json",
                          tracing={"endpoint": f"127.0.0.1:{otlp_port}", "samplingRatio": 1.0}) as gw, \
            httpx2.Client(timeout=30) as http:
        gw.wait_for(lambda: gw.server_state("kubernetes")["state"] == "Connected", what="kubernetes connected")
        call(gw, http, "req-traced-1")

        # the routed call: the upstream got Envoy's context, and the trace has Envoy's and the processor's spans
        routed = poll(lambda: recorded(headers_log, "tools/call"), "the routed call at the upstream")
        carried = traceparent(routed[-1])
        assert carried is not None, f"no traceparent reached the upstream: {routed[-1]['headers']}"
        trace_id, upstream_parent = carried

        def whole_trace() -> list[Span] | None:
            spans = receiver.of_trace(trace_id)
            services = {s.service for s in spans}
            return spans if {"muster-edge-envoy", "muster-edge"} <= services and \
                any(s.span_id == upstream_parent for s in spans) else None

        spans = poll(whole_trace, f"Envoy's and the processor's spans of trace {trace_id} "
                                  f"(received: {[(s.service, s.name, s.trace_id) for s in receiver.spans]})")
        by_id = {s.span_id: s for s in spans}
        envoy = [s for s in spans if s.service == "muster-edge-envoy"]
        assert any(s.parent_id == "" for s in envoy), "Envoy's request span is the root"
        assert by_id[upstream_parent].service == "muster-edge-envoy"  # Envoy's span of the routed request
        decide = next(s for s in spans if s.name == "muster_edge.decide")
        assert decide.service == "muster-edge"
        assert by_id[decide.parent_id].service == "muster-edge-envoy", "the processor continues Envoy's ext_proc span"
        assert decide.attributes["mcp.method.name"] == "tools/call"
        assert decide.attributes["muster_edge.server"] == "kubernetes"
        assert decide.attributes["muster_edge.outcome"] == "routed"
        assert decide.attributes["gen_ai.tool.name"] == "x_kubernetes_get_pods"
        assert decide.attributes["muster_edge.decision"] == "allow"
        assert ARGUMENT not in repr(spans) and CALLER_TOKEN not in repr(spans), "an argument or token in a span"

        # the processor's own upstream calls carry its span's context: a list after the cache expired refreshes
        # the upstream's lists behind it, as a child of that list's decision
        before = len(recorded(headers_log, "tools/list"))
        time.sleep(1.1)  # listTtlFloorMs is 1000 in the harness
        list_tools(gw, http)

        def refetched() -> tuple[str, str] | None:
            fetches = [traceparent(r) for r in recorded(headers_log, "tools/list")[before:]]
            return next((f for f in fetches if f is not None), None)

        list_trace, list_parent = poll(refetched, "a refresh of the upstream's tools carrying traceparent")

        def fetch_span() -> Span | None:
            return next((s for s in receiver.of_trace(list_trace) if s.span_id == list_parent), None)

        fetch = poll(fetch_span, "the processor's list_fetch span")
        assert fetch.name == "muster_edge.list_fetch" and fetch.attributes["muster_edge.server"] == "kubernetes"
        parent = next(s for s in receiver.of_trace(list_trace) if s.span_id == fetch.parent_id)
        assert parent.name == "muster_edge.decide" and parent.attributes["mcp.method.name"] == "tools/list"

        # JSON log lines written for the call carry its trace id beside Envoy's request id
        def audit() -> dict[str, Any] | None:
            for line in gw.log().splitlines():
                if line.startswith("{") and '"req-traced-1"' in line and "muster_edge.audit" in line:
                    return dict(json.loads(line))
            return None

        assert poll(audit, "the call's audit line")["trace_id"] == trace_id
    lines = [json.loads(line) for line in gw.log().splitlines() if line.strip()]  # every line parses
    assert not [line for line in lines if line["level"] == "error"], "the exporter or a worker failed"
    assert CALLER_TOKEN not in gw.log() and ARGUMENT not in gw.log()


@pytest.mark.timeout(120)
def test_tracing_off_sends_no_span_and_adds_no_traceparent(tmp_path: Path) -> None:
    headers_log = tmp_path / "upstream-headers.jsonl"
    with otlp_receiver() as (receiver, _), \
            start_demo_server("kubernetes", name="kubernetes", record_headers=headers_log) as kube, \
            start_gateway(tmp_path, {"kubernetes": kube.url}, logFormat="json") as gw, \
            httpx2.Client(timeout=30) as http:
        gw.wait_for(lambda: gw.server_state("kubernetes")["state"] == "Connected", what="kubernetes connected")
        call(gw, http, "req-untraced-1")
        before = len(recorded(headers_log, "tools/list"))
        time.sleep(1.1)
        list_tools(gw, http)
        poll(lambda: len(recorded(headers_log, "tools/list")) > before, "the refresh behind the list")
        assert not receiver.spans
        requests = [json.loads(line) for line in headers_log.read_text().splitlines() if line.strip()]
        assert requests and not [r for r in requests if "traceparent" in r["headers"]], \
            "with tracing off, nothing adds a traceparent"
        assert not [line for line in gw.log().splitlines() if '"trace_id"' in line]
        assert "tracing on" not in gw.log()


@pytest.mark.timeout(120)
def test_sampling_ratio_zero_passes_an_unsampled_context_and_exports_nothing(tmp_path: Path) -> None:
    headers_log = tmp_path / "upstream-headers.jsonl"
    with otlp_receiver() as (receiver, otlp_port), \
            start_demo_server("kubernetes", name="kubernetes", record_headers=headers_log) as kube, \
            start_gateway(tmp_path, {"kubernetes": kube.url},
                          tracing={"endpoint": f"127.0.0.1:{otlp_port}", "samplingRatio": 0}) as gw, \
            httpx2.Client(timeout=30) as http:
        gw.wait_for(lambda: gw.server_state("kubernetes")["state"] == "Connected", what="kubernetes connected")
        for n in range(3):
            call(gw, http, f"req-unsampled-{n}")
        routed = poll(lambda: recorded(headers_log, "tools/call")[2:], "the routed calls at the upstream")
        assert routed[0]["headers"]["traceparent"].endswith("-00")  # the context, marked not sampled

        def flushes() -> int:
            stats = gw.admin_url + "/stats?filter=^tracing\\.opentelemetry\\."
            with urllib.request.urlopen(stats, timeout=5) as resp:
                found = dict(line.split(": ", 1) for line in resp.read().decode().splitlines() if ": " in line)
            assert found["tracing.opentelemetry.spans_sent"] == "0"
            return int(found["tracing.opentelemetry.timer_flushed"])

        first = flushes()
        poll(lambda: flushes() >= first + 2, "two more flushes of Envoy's tracer")
        assert not receiver.spans
