"""Fleet routing: the same 40 upstreams behind two gateways, one with families and one without.

20 management clusters x 2 families (`kubernetes`, `prometheus`, `instanceArg: management_cluster`) x 40 tools,
served by ONE fast-upstream process (bench/fast_upstream.py --names: one MCP server per path), so the machine's
two cores go to the driver, Envoy and the processor rather than to 40 idle Python processes. The family gateway
exposes 2 x 40 tools (each with an enum of 20 members); the plain gateway puts the very same upstreams under
per-server names (40 x 40 tools). Both run at once and every cell of a ratio is measured back to back in
alternating order.

Measured: warm `tools/list`, and `tools/call` of `echo` on cluster 07's kubernetes server: through the family
(`x_kubernetes_echo` + `management_cluster`, and on the 2026-07-28 wire the `Mcp-Param-Management-Cluster`
header the gateway checks against the body) and by its per-server name (`x_cluster-07-mcp-kubernetes_echo`).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

import httpx2

from bench import stacks
from bench.cells import Probe
from bench.main import CONCURRENCY, describe_list, prime
from bench.report import Row, find
from bench.stacks import GatewayStack, Upstream
from bench.wire import LEGACY, MODERN, Call, Endpoint, Requests

if TYPE_CHECKING:
    from bench.main import Bench

SECTION = "families"
CLUSTERS = 20
FAMILIES = ("kubernetes", "prometheus")
TOOLS = 40
ARG = "management_cluster"
PICK = 7  # the cluster the routed call goes to
TARGET = 1.10  # families may add at most 10% to latency, and take at most 10% of throughput


def member(cluster: int, family: str) -> str:
    return f"cluster-{cluster:02d}-mcp-{family}"


def run(bench: Bench) -> None:
    names = [member(i, f) for f in FAMILIES for i in range(1, CLUSTERS + 1)]
    specs = {member(i, f): {"family": {"name": f, "instanceArg": ARG}} for f in FAMILIES
             for i in range(1, CLUSTERS + 1)}
    wires = (MODERN,) if bench.quick else (MODERN, LEGACY)
    with contextlib.ExitStack() as stack:
        fleet = stack.enter_context(stacks.fast_fleet(names, TOOLS, shared_descriptions=True, label="fleet40"))
        started = time.monotonic()
        fam = stack.enter_context(stacks.gateway(bench.work / "gw-families", fleet.members, 1, specs=specs))
        fam_up = time.monotonic() - started
        started = time.monotonic()
        plain = stack.enter_context(stacks.gateway(bench.work / "gw-no-families", fleet.members, 1))
        plain_up = time.monotonic() - started
        bench.notes.append(f"families: one fast-upstream process serves all {len(names)} upstreams"
                           f" (pid {fleet.whole.pid}, RSS {rss_mb(fleet.whole.pid):.0f} MB); gateway start to every"
                           f" upstream listed: {fam_up:.1f} s with families, {plain_up:.1f} s without")
        bench.notes.append(f"families tools/list with families: {describe_list(fam.url)}")
        bench.notes.append(f"families tools/list without families: {describe_list(plain.url)}")
        pick = member(PICK, "kubernetes")
        bench.notes.append(f"families routing check: {routing_check(fam.url, plain.url, pick)}")
        fam_call = Call("tools/call", "x_kubernetes_echo", {"text": "hello", ARG: pick},
                        {"mcp-param-management-cluster": pick})
        plain_call = Call("tools/call", f"x_{pick}_echo", {"text": "hello"})
        listing = Call("tools/list")
        picked = [u for u in fleet.members if u.name == pick]
        for gw, call in ((fam, fam_call), (plain, plain_call)):
            for wire in wires:
                prime(Requests(Endpoint.parse(gw.url), wire, call))
                prime(Requests(Endpoint.parse(gw.url), wire, listing))
        for method, fam_c, plain_c, clusters in (("call", fam_call, plain_call, picked),
                                                  ("list", listing, listing, fleet.members)):
            for c in CONCURRENCY:
                for wire in wires:
                    bench.compare(SECTION, method, wire, c, [
                        ("family", Requests(Endpoint.parse(fam.url), wire, fam_c), probe(fam, fleet.whole, clusters)),
                        ("no-family", Requests(Endpoint.parse(plain.url), wire, plain_c),
                         probe(plain, fleet.whole, clusters)),
                    ], bench.section_settings)
        bench.gateway_stats(fam, "families gateway")
        bench.gateway_stats(plain, "no-families gateway")


def probe(gw: GatewayStack, whole: Upstream, members: Sequence[Upstream]) -> Probe:
    """The gateway's processes, the upstream process once, and Envoy's counters of the clusters involved."""
    return Probe(processor_pids=gw.processor_pids, envoy_pids=gw.envoy_pids, upstreams=[whole],
                 admin_url=gw.admin_url, clusters=[f"mcp.{u.name}" for u in members], ext_proc=True)


def rss_mb(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def routing_check(fam_url: str, plain_url: str, pick: str) -> str:
    """One `op_001` call each way (its answer names the server that ran it), plus the header the gateway must
    refuse when it disagrees with the body: the benchmarked paths do reach cluster 07 and nothing else."""
    meta = {"io.modelcontextprotocol/protocolVersion": MODERN, "io.modelcontextprotocol/clientCapabilities": {}}
    base = {"accept": "application/json, text/event-stream", "content-type": "application/json",
            "mcp-protocol-version": MODERN, "mcp-method": "tools/call"}
    out = []
    with httpx2.Client(timeout=10) as http:
        for label, url, name, args, extra in (
                ("family", fam_url, "x_kubernetes_op_001", {"namespace": "ns", ARG: pick},
                 {"mcp-param-management-cluster": pick}),
                ("family, header for another cluster", fam_url, "x_kubernetes_op_001", {"namespace": "ns", ARG: pick},
                 {"mcp-param-management-cluster": member(PICK + 1, "kubernetes")}),
                ("per-server name", plain_url, f"x_{pick}_op_001", {"namespace": "ns"}, {})):
            body = {"jsonrpc": "2.0", "id": 1, "method": "tools/call",
                    "params": {"name": name, "arguments": args, "_meta": meta}}
            resp = http.post(url, json=body, headers={**base, "mcp-name": name, **extra})
            try:
                answer = resp.json()
                text = answer["result"]["content"][0]["text"] if "result" in answer else \
                    f"error {answer['error']['code']}"
            except (ValueError, KeyError, IndexError, TypeError):
                text = resp.text[:120]
            out.append(f"{label}: HTTP {resp.status_code} {text!r}")
    return "; ".join(out)


def summary(rows: Sequence[Row]) -> list[str]:
    lines = []
    for method in ("call", "list"):
        for wire in (MODERN, LEGACY):
            for c in CONCURRENCY:
                fam = find(rows, method, "family", wire, c, section=SECTION)
                plain = find(rows, method, "no-family", wire, c, section=SECTION)
                if not (fam and plain and fam.p50_ms and plain.p50_ms and fam.p99_ms and plain.p99_ms and fam.rps
                        and plain.rps):
                    continue
                p50, p99, rps = fam.p50_ms / plain.p50_ms, fam.p99_ms / plain.p99_ms, fam.rps / plain.rps
                verdict = "PASS" if p50 <= TARGET and p99 <= TARGET and rps >= 1 / TARGET else "MISS"
                lines.append(f"[fam  ] tools/{method:4} {wire:10} c={c:<2} family/no-family: p50 x{p50:.2f}"
                             f" ({fam.p50_ms:.2f} vs {plain.p50_ms:.2f} ms), p99 x{p99:.2f}, req/s x{rps:.2f}"
                             f" ({fam.rps:.0f} vs {plain.rps:.0f}); procMB {fam.proc_mb or 0:.0f} vs"
                             f" {plain.proc_mb or 0:.0f}   target p50,p99 <= x{TARGET:.2f}, req/s >= x{1 / TARGET:.2f}:"
                             f" {verdict}")
    return lines
