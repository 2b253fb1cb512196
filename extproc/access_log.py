"""Routed calls as Envoy saw them: Envoy's gRPC access log service (envoy.service.accesslog.v3) feeds the
call histograms.

Most routed answers never reach the processor (the answer filters are matcher-selected), so a call's duration and
the upstream's part of it come from Envoy. Its access logger sends, for each routed request only (it filters on
the `muster_edge` metadata the processor wrote when it routed the call: server and method), one entry with the
timings, the response code and flags; Envoy batches them (one gRPC message holds many entries), so this costs
the processor a fraction of a message per call. Labels are bounded here: a server not in the catalog and a
method the gateway does not know become "other".
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Container
from typing import Any

import grpc
from envoy.data.accesslog.v3 import accesslog_pb2 as al
from envoy.service.accesslog.v3 import als_pb2, als_pb2_grpc

from extproc.metrics import OTHER, Metrics

log = logging.getLogger(__name__)

NAMESPACE = "muster_edge"  # extproc/answer.py: the routed request's plan, read here for server and method
LOG_NAME = "muster_edge_calls"


def _seconds(duration: Any) -> float:
    return float(duration.seconds) + duration.nanos / 1e9


def outcome(entry: al.HTTPAccessLogEntry) -> str:
    """How the call ended, one of metrics.CALL_OUTCOMES: from Envoy's response flags, then the status sent."""
    flags = entry.common_properties.response_flags
    code = entry.response.response_code.value
    if flags.ByteSize():  # rare: reading the flags one by one costs more than this check
        if flags.downstream_connection_termination or flags.downstream_remote_reset:
            return "cancelled"
        if flags.upstream_request_timeout or flags.stream_idle_timeout:
            return "timeout"
        if (flags.no_healthy_upstream or flags.upstream_connection_failure or flags.upstream_overflow
                or flags.upstream_remote_reset or flags.upstream_connection_termination or flags.no_cluster_found):
            return "unavailable"
    if code == 0:
        return "cancelled"
    if code == 504:
        return "timeout"
    if code == 503:
        return "unavailable"
    details = entry.response.response_code_details
    if code in (401, 403) or details == "muster_edge_upstream_refused_credential":
        return "refused"
    # the processor's own error for an upstream answer (an invalid answer, a lost session) may be sent with 200
    if code >= 400 or details.startswith("muster_edge_upstream"):
        return "error"
    return "ok"


def call_facts(entry: al.HTTPAccessLogEntry, servers: Container[str], methods: Container[str]
               ) -> tuple[str, str, str, float, float | None] | None:
    """(server, method, outcome, seconds, upstream seconds or None) of one routed call; None if not routed."""
    common = entry.common_properties
    fm = common.metadata.filter_metadata
    if NAMESPACE not in fm:
        return None
    fields = fm[NAMESPACE].fields
    if "server" not in fields:
        return None
    server = fields["server"].string_value
    method = fields["method"].string_value if "method" in fields else ""
    server = server if server in servers else OTHER
    method = method if method in methods else OTHER
    if common.HasField("duration"):
        total = _seconds(common.duration)
    else:
        total = _seconds(common.time_to_last_downstream_tx_byte)
    upstream = None
    if common.HasField("time_to_first_upstream_tx_byte") and common.HasField("time_to_last_upstream_rx_byte"):
        upstream = max(0.0, _seconds(common.time_to_last_upstream_rx_byte)
                       - _seconds(common.time_to_first_upstream_tx_byte))
    return server, method, outcome(entry), total, upstream


class AccessLogs(als_pb2_grpc.AccessLogServiceServicer):
    """Envoy's access log stream (one per Envoy worker thread, long-lived) into the call histograms."""

    def __init__(self, metrics: Metrics, servers: Callable[[], Container[str]], methods: Container[str]) -> None:
        self.metrics = metrics
        self.servers = servers
        self.methods = methods

    async def StreamAccessLogs(self, request_iterator: Any,
                               context: grpc.aio.ServicerContext) -> als_pb2.StreamAccessLogsResponse:
        try:
            async for msg in request_iterator:
                self.record(msg)
        except Exception as exc:  # Envoy reconnects; a lost batch costs samples, never a call
            log.debug("access log stream ended: %s", exc)
        return als_pb2.StreamAccessLogsResponse()

    def record(self, msg: als_pb2.StreamAccessLogsMessage) -> int:
        """Observe every routed call in one batch; returns how many."""
        servers = self.servers()
        seen = 0
        self.metrics.access_log_batches.inc()
        for entry in msg.http_logs.log_entry:
            facts = call_facts(entry, servers, self.methods)
            if facts is not None:
                self.metrics.routed_call(*facts)
                seen += 1
        self.metrics.access_log_entries.inc(seen)
        return seen
