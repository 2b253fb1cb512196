"""OpenTelemetry traces: the processor continues the trace Envoy started for the HTTP request.

Envoy's tracer (envoy.tracers.opentelemetry) makes the request span and an ext_proc client span per processor
stream, and puts that span's W3C `traceparent` in the stream's gRPC initial metadata (measured on Envoy 1.40, with
request headers SEND and SKIP alike: the context rides on the stream, not on a message, so it reaches the
processor however many messages a request costs). The request headers Envoy sends the processor never carry
Envoy's context. The processor's spans (decision, fan-out, token exchange, resend) are children of that span;
its own calls through the internal listener carry theirs in `traceparent`; a routed request gets Envoy's own
(Envoy's router overwrites any `traceparent` the request has with its span's).

Off by default, and then free: the SDK is never imported, `ON` stays False, `span()` returns one shared
no-op context manager and the hooks return at their first line. Spans are exported by the SDK's batch processor
from its own thread, so the event loop only appends a finished span to a queue.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterable, Mapping, MutableMapping
from contextlib import AbstractContextManager
from typing import Any

from catalog.config import TracingConfig
from extproc import logs

log = logging.getLogger(__name__)

ON = False
TRACER = "muster_edge"
_NULL: AbstractContextManager[None] = contextlib.nullcontext()
_tracer: Any = None
_provider: Any = None
_propagator: Any = None
_trace: Any = None  # the opentelemetry.trace and .context modules, imported by setup()
_context: Any = None
_CARRIED = ("traceparent", "tracestate")

Attributes = Mapping[str, str | int | float | bool]


def setup(config: TracingConfig | None, *, exporter: Any = None) -> None:
    """Start the SDK (only when tracing is configured): a tracer provider that follows Envoy's sampling decision
    (parent-based; a trace the processor starts itself is kept with `samplingRatio`), exporting in batches."""
    global ON, _tracer, _provider, _propagator, _trace, _context
    if config is None:
        return
    from opentelemetry import context, trace
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor
    from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    if exporter is None:
        from extproc.tracing_export import LeanSpanExporter

        exporter = LeanSpanExporter(endpoint=config.url, insecure=not config.tls)
    provider = TracerProvider(resource=Resource.create({"service.name": config.service_name}),
                              sampler=ParentBased(TraceIdRatioBased(config.sampling_ratio)))
    provider.add_span_processor(BatchSpanProcessor(exporter, max_queue_size=8192, schedule_delay_millis=1000,
                                                   max_export_batch_size=512))
    _provider, _tracer, _propagator = provider, provider.get_tracer(TRACER), TraceContextTextMapPropagator()
    _trace, _context = trace, context
    ON = True
    logs.set_trace_ids(current_trace_id)
    log.info("tracing on: OTLP to %s, sampling ratio %g", config.url, config.sampling_ratio)


def shutdown() -> None:
    """Export what is queued and stop the exporter (blocks: call it from a thread)."""
    global ON
    if _provider is not None:
        ON = False
        _provider.shutdown()


def continue_stream(metadata: Iterable[tuple[str, Any]] | None) -> None:
    """Make the trace context Envoy put in an ext_proc stream's gRPC metadata the parent of what the current
    task does (each stream is a task of its own: no detach needed)."""
    if not ON or metadata is None:
        return
    parent = state = ""
    for key, value in metadata:
        if key == "traceparent":
            parent = value
        elif key == "tracestate":
            state = value
    context = _parse_traceparent(parent, state) if isinstance(parent, str) and parent else None
    if context is not None:
        _context.attach(_trace.set_span_in_context(_trace.NonRecordingSpan(context)))


def _parse_traceparent(value: str, state: Any) -> Any:
    """W3C trace context, version 00 (what Envoy sends), parsed without the propagator's regex; None if invalid."""
    parts = value.split("-")
    if len(parts) != 4 or len(parts[0]) != 2 or len(parts[1]) != 32 or len(parts[2]) != 16 or len(parts[3]) != 2:
        return None
    try:
        version, trace_id, span_id, flags = (int(part, 16) for part in parts)
    except ValueError:
        return None
    if version == 0xFF or not trace_id or not span_id:
        return None
    trace_state = _trace.TraceState.from_header([state]) if isinstance(state, str) and state else None
    return _trace.SpanContext(trace_id, span_id, is_remote=True, trace_flags=_trace.TraceFlags(flags & 1),
                              trace_state=trace_state)


def span(name: str, attributes: Attributes | None = None, *, child_only: bool = False) -> AbstractContextManager[Any]:
    """A span around a block (the span, or None when tracing is off or the trace is not sampled). `child_only`:
    only inside a trace, so background work (refreshes, probes) does not start traces of its own."""
    if not ON:
        return _NULL
    parent = _trace.get_current_span().get_span_context()
    if parent.is_valid:
        if not parent.trace_flags.sampled:  # Envoy did not sample this request: no span (the context still flows)
            return _NULL
    elif child_only:
        return _NULL
    return _Current(_tracer.start_span(name, attributes=attributes))


class _Current:
    """The span as the current one for a block, then ended (an exception is recorded on it): the SDK's
    start_as_current_span without its two generator-based context managers."""

    __slots__ = ("_span", "_token")

    def __init__(self, span: Any) -> None:
        self._span = span
        self._token: Any = None

    def __enter__(self) -> Any:
        self._token = _context.attach(_trace.set_span_in_context(self._span))
        return self._span

    def __exit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> None:
        _context.detach(self._token)
        if isinstance(exc, Exception):
            self._span.record_exception(exc)
            self._span.set_status(_trace.Status(_trace.StatusCode.ERROR, f"{type(exc).__name__}: {exc}"))
        self._span.end()


def annotate(target: Any, attributes: Attributes) -> None:
    """Set attributes on a span from `span()` (nothing when it is None, i.e. tracing off)."""
    if target is not None:
        target.set_attributes(attributes)


def annotate_current(attributes: Attributes) -> None:
    """Set attributes on the span the current task is in (the decision span of a call)."""
    if not ON:
        return
    current = _trace.get_current_span()
    if current.is_recording():
        current.set_attributes(attributes)


def inject(headers: MutableMapping[str, str]) -> None:
    """Put the current context in `traceparent` (and `tracestate`) of a request the processor sends itself."""
    if ON and _in_trace():
        _propagator.inject(headers)


def _in_trace() -> bool:
    return bool(_trace.get_current_span().get_span_context().is_valid)


def current_trace_id() -> str:
    """The trace id of the current task's context, for log lines ("" outside a trace or with tracing off)."""
    if _trace is None:
        return ""
    ctx = _trace.get_current_span().get_span_context()
    return format(ctx.trace_id, "032x") if ctx.is_valid else ""
