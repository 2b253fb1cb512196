"""Prometheus counters for the processor, rendered in the text exposition format (no dependency)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable

_HELP = {
    "muster_edge_policy_decisions_total": "Tool policy decisions on tools/call, by decision, rule and server.",
    "muster_edge_requests_total": "JSON-RPC requests handled by the processor, by method and outcome.",
    "muster_edge_upstream_errors_total": "Routed calls that failed at the upstream, by server and HTTP status.",
    "muster_edge_upstream_retries_total": "Calls sent once more after an upstream refused a renewable credential "
                                          "(401), by server and outcome.",
}


class Metrics:
    def __init__(self) -> None:
        self._counts: Counter[tuple[str, tuple[tuple[str, str], ...]]] = Counter()
        # more families rendered from live state (gauges, counters kept elsewhere), each already in text format
        self.collectors: list[Callable[[], str]] = []

    def inc(self, name: str, **labels: str) -> None:
        self._counts[(name, tuple(sorted(labels.items())))] += 1

    def value(self, name: str, **labels: str) -> int:
        return self._counts[(name, tuple(sorted(labels.items())))]

    def render(self) -> str:
        lines: list[str] = []
        for name, text in _HELP.items():
            lines += [f"# HELP {name} {text}", f"# TYPE {name} counter"]
            for (metric, labels), count in sorted(self._counts.items()):
                if metric == name:
                    rendered = ",".join(f'{k}="{_escape(v)}"' for k, v in labels)
                    lines.append(f"{name}{{{rendered}}} {count}")
        return "\n".join(lines) + "\n" + "".join(collect() for collect in self.collectors)


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
