"""The processor's Prometheus metrics: the original counters (hand-rendered, names unchanged) and prometheus_client
histograms and gauges (latency by server, method and outcome; fan-out; list cache; token exchanges; workflow runs;
processor time per ext_proc message kind).

Label values are bounded: server names from the catalog, known methods ("other" for anything else), fixed
outcomes and kinds. Never a subject, a token, a tool argument or free text. The per-call work is a dict lookup
and prometheus_client's observe (about 0.7 us each, measured); `metrics: false` turns every histogram off.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Mapping
from typing import Any

from prometheus_client import CollectorRegistry, Gauge, Histogram, disable_created_metrics, generate_latest
from prometheus_client import Counter as PromCounter

disable_created_metrics()  # no *_created series: they double the output and nobody alerts on them

_HELP = {
    "muster_edge_policy_decisions_total": "Tool policy decisions on tools/call, by decision, rule and server.",
    "muster_edge_requests_total": "JSON-RPC requests handled by the processor, by method and outcome.",
    "muster_edge_upstream_errors_total": "Routed calls that failed at the upstream, by server and HTTP status.",
    "muster_edge_upstream_retries_total": "Calls sent once more after an upstream refused a renewable credential "
                                          "(401), by server and outcome.",
}

# From 0.5 ms (a warm decision) to a minute (a slow tool, a workflow).
SECONDS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
# The processor's own time per message: from 50 us up.
MESSAGE_SECONDS = (0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, 5.0)
MESSAGE_KINDS = frozenset(("request_headers", "request_body", "response_headers", "response_body",
                           "request_trailers", "response_trailers"))
# How a routed call ended, as Envoy saw it (extproc/access_log.py).
CALL_OUTCOMES = ("ok", "error", "refused", "unavailable", "timeout", "cancelled")
OTHER = "other"


class Metrics:
    def __init__(self, histograms: bool = True) -> None:
        self._counts: Counter[tuple[str, tuple[tuple[str, str], ...]]] = Counter()
        # more families rendered from live state (gauges, counters kept elsewhere), each already in text format
        self.collectors: list[Callable[[], str]] = []
        self.histograms = histograms
        self.registry = CollectorRegistry(auto_describe=False)
        reg = self.registry
        self.call_duration = Histogram(
            "muster_edge_call_duration_seconds", "Routed calls as Envoy saw them, from the request's first byte to "
            "the answer's last, by server, method and outcome.", ("server", "method", "outcome"),
            registry=reg, buckets=SECONDS)
        self.upstream_duration = Histogram(
            "muster_edge_call_upstream_seconds", "The upstream's part of a routed call (request sent to answer "
            "received), by server and method.", ("server", "method"), registry=reg, buckets=SECONDS)
        self.gateway_duration = Histogram(
            "muster_edge_call_gateway_seconds", "The gateway's part of a routed call (Envoy and the processor: the "
            "call's duration minus the upstream's part), by server and method.", ("server", "method"),
            registry=reg, buckets=SECONDS)
        self.message_duration = Histogram(
            "muster_edge_processor_message_seconds", "Time the processor took to answer one ext_proc message, by "
            "message kind (upstream waits included: a token exchange, a list fan-out).", ("kind",),
            registry=reg, buckets=MESSAGE_SECONDS)
        self.fetch_duration = Histogram(
            "muster_edge_fanout_seconds", "One upstream's part of a list fan-out (handshake and every list page), "
            "by server and outcome.", ("server", "outcome"), registry=reg, buckets=SECONDS)
        self.list_cache = Histogram(
            "muster_edge_list_cache_seconds", "Lists answered at the edge, by list and cache result (hit: the "
            "page was already rendered; miss: rendered from the merged view), with the time the processor took.",
            ("list", "result"), registry=reg, buckets=MESSAGE_SECONDS)
        self.exchange_duration = Histogram(
            "muster_edge_token_exchange_seconds", "RFC 8693 token exchanges at an IdP (count: _count), by server "
            "and outcome (ok, failed).", ("server", "outcome"), registry=reg, buckets=SECONDS)
        self.workflow_duration = Histogram(
            "muster_edge_workflow_execution_seconds", "Workflow executions (count: _count), by workflow and status "
            "(completed, failed).", ("workflow", "status"), registry=reg, buckets=SECONDS)
        self.listening_clients = Gauge(
            "muster_edge_listening_clients", "Clients holding a notification stream open on this worker.",
            registry=reg)
        self.access_log_batches = PromCounter(
            "muster_edge_access_log_batches", "Batches of Envoy's access log of routed calls this worker received.",
            registry=reg)
        self.access_log_entries = PromCounter(
            "muster_edge_access_log_entries", "Entries (routed calls) in those batches.", registry=reg)
        self._children: dict[tuple[Any, ...], Any] = {}
        self._list_ages: Callable[[], Mapping[str, float]] = dict

    # ---- the original counters ---------------------------------------------------------------------------
    def inc(self, name: str, **labels: str) -> None:
        self._counts[(name, tuple(sorted(labels.items())))] += 1

    def value(self, name: str, **labels: str) -> int:
        return self._counts[(name, tuple(sorted(labels.items())))]

    # ---- histograms (cheap: a cached child per label set) -------------------------------------------------
    def _observe(self, metric: Histogram, labels: tuple[str, ...], seconds: float) -> None:
        key = (id(metric), *labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*labels)
        child.observe(seconds)

    def message(self, kind: str, seconds: float) -> None:
        if self.histograms:
            self._observe(self.message_duration, (kind if kind in MESSAGE_KINDS else OTHER,), seconds)

    def routed_call(self, server: str, method: str, outcome: str, seconds: float,
                    upstream_seconds: float | None) -> None:
        """One routed call from Envoy's access log; labels already bounded by the caller (access_log.py)."""
        if not self.histograms:
            return
        self._observe(self.call_duration, (server, method, outcome), seconds)
        if upstream_seconds is not None:
            self._observe(self.upstream_duration, (server, method), upstream_seconds)
            self._observe(self.gateway_duration, (server, method), max(0.0, seconds - upstream_seconds))

    def fetched(self, server: str, seconds: float, ok: bool) -> None:
        if self.histograms:
            self._observe(self.fetch_duration, (server, "ok" if ok else "failed"), seconds)

    def listed(self, method: str, hit: bool, seconds: float) -> None:
        if self.histograms:
            self._observe(self.list_cache, (method.split("/")[-2] if "/" in method else OTHER,
                                            "hit" if hit else "miss"), seconds)

    def exchanged(self, server: str, seconds: float, ok: bool) -> None:
        if self.histograms:
            self._observe(self.exchange_duration, (server, "ok" if ok else "failed"), seconds)

    def workflow(self, workflow: str, status: str, seconds: float) -> None:
        if self.histograms:
            self._observe(self.workflow_duration,
                          (workflow, status if status in ("completed", "failed") else OTHER), seconds)

    def listening(self, delta: int) -> None:
        """The notification channel's hook: +1 when a client's stream opens on this worker, -1 when it ends."""
        self.listening_clients.inc(delta)

    def list_ages(self, ages: Callable[[], Mapping[str, float]]) -> None:
        """Where the age of each upstream's cached lists comes from (read at scrape time)."""
        self._list_ages = ages

    # ---- exposition -----------------------------------------------------------------------------------------
    def render(self) -> str:
        lines: list[str] = []
        for name, text in _HELP.items():
            lines += [f"# HELP {name} {text}", f"# TYPE {name} counter"]
            for (metric, labels), count in sorted(self._counts.items()):
                if metric == name:
                    rendered = ",".join(f'{k}="{_escape(v)}"' for k, v in labels)
                    lines.append(f"{name}{{{rendered}}} {count}")
        ages = self._list_ages()
        lines += ["# HELP muster_edge_list_cache_age_seconds Age of each upstream's cached lists (tools, prompts, "
                  "resources), by server.", "# TYPE muster_edge_list_cache_age_seconds gauge"]
        lines += [f'muster_edge_list_cache_age_seconds{{server="{_escape(s)}"}} {age:.3f}'
                  for s, age in sorted(ages.items())]
        return ("\n".join(lines) + "\n" + generate_latest(self.registry).decode()
                + "".join(collect() for collect in self.collectors))


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def with_worker(worker: str, text: str, families: dict[str, list[str]]) -> None:
    """Add one worker's exposition to `families` (family name -> lines), every sample labelled worker="N"."""
    current = ""
    for line in text.splitlines():
        if not line:
            continue
        if line.startswith("#"):
            parts = line.split(" ", 3)
            if len(parts) >= 3 and parts[1] in ("HELP", "TYPE"):
                current = parts[2]
                family = families.setdefault(current, [])
                if line not in family[:2]:
                    family.append(line)
            continue
        name, brace, rest = line.partition("{")
        if brace:
            sample = f'{name}{{worker="{worker}",{rest}' if not rest.startswith("}") else \
                f'{name}{{worker="{worker}"{rest}'
        else:
            metric, _, value = line.partition(" ")
            sample = f'{metric}{{worker="{worker}"}} {value}'
        families.setdefault(current or name, []).append(sample)


def merge_workers(texts: Mapping[str, str | None]) -> str:
    """One exposition for every worker (worker label -> its /metrics, None when it did not answer), plus
    muster_edge_worker_up per worker. Each family's samples stay together, as the format requires."""
    families: dict[str, list[str]] = {}
    for worker, text in sorted(texts.items(), key=lambda kv: int(kv[0]) if kv[0].isdigit() else 0):
        if text is not None:
            with_worker(worker, text, families)
    up = ["# HELP muster_edge_worker_up 1 when this worker's metrics were read for this scrape, else 0.",
          "# TYPE muster_edge_worker_up gauge"]
    up += [f'muster_edge_worker_up{{worker="{w}"}} {0 if t is None else 1}' for w, t in sorted(texts.items())]
    return "\n".join([*up, *(line for lines in families.values() for line in lines)]) + "\n"
