"""The benchmark run: start every target in front of the same upstreams, measure, print tables and ratios.

Sections, in order (each prints its table as soon as it is done); `--only` picks some of them:
  core:
  0. calibration: the load driver's own ceiling (raw asyncio vs httpx2) and the SDK demo server as shipped;
  1. tools/call latency and throughput at c=1 and c=16: direct, plain Envoy, Envoy's MCP filters (the
     contender), the gateway with 1 (and 2) processor workers, on the modern and the legacy wire, against the
     fast upstream and the mcp SDK upstream;
  2. warm tools/list through the gateway with 10 upstreams x 50 tools (and the contender beside it);
  3. the processor alone: ext_proc cycles straight to one worker over gRPC.
  families: 20 clusters x 2 families x 40 tools, with and without families (bench/families.py);
  auth: OAuth at the edge with a real IdP and a 30-rule policy, with and without (bench/edge_auth.py);
  exchange: RFC 8693 token exchange vs a static Authorization header, IdP requests counted (bench/exchange.py);
  metrics: routed tools/call with metrics on vs off (bench/metrics_cost.py);
  tracing: tools/call with tracing off, at sampling ratio 0 and at 1.0 (bench/tracing.py);
  scaling: tools/call at c=16 with 1, 2 processor workers x Envoy concurrency 1, 2 (the fast upstream), and the
     CPU seconds per 1,000 calls of each process (the README's per-core sizing figures).
Everything runs on 127.0.0.1 with free ports and is stopped on exit, error, Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any, NoReturn

import httpx2

from bench import loadgen, stacks
from bench.cells import Probe, Settings, measure_http, measure_processor, merge
from bench.report import LEGEND, Row, find, ratios, table
from bench.stacks import GatewayStack, Upstream
from bench.wire import LEGACY, MODERN, Call, Endpoint, Requests

SECTIONS = ("core", "families", "auth", "exchange", "metrics", "tracing", "scaling")
SCALING = ((1, 1), (1, 2), (2, 1), (2, 2))  # (processor workers, Envoy worker threads)
CONCURRENCY = (1, 16)
LIST_UPSTREAMS, LIST_TOOLS = 10, 50
GATEWAY_1 = "gateway 1w"
GATEWAY_2 = "gateway 2w"


def say(text: str = "") -> None:
    print(text, flush=True)


class Bench:
    def __init__(self, settings: Settings, work: Path, *, quick: bool, two_workers: bool) -> None:
        self.settings = settings
        self.work = work
        self.quick = quick
        self.two_workers = two_workers
        self.rows: list[Row] = []
        self.notes: list[str] = []
        self.verdicts: list[str] = []  # summary lines a section computes itself (not from rows)

    @property
    def section_settings(self) -> Settings:
        """The families, auth and exchange comparisons: shorter windows in more alternating rounds than the core
        cells, so a drift of the shared machine (other tenants' test runs) weighs on both sides of a ratio alike."""
        return Settings(0.2, 0.5, 200_000, 2) if self.quick else Settings(0.3, 1.5, 500_000, 4)

    def add(self, row: Row) -> Row:
        self.rows.append(row)
        status = f"FAILED {row.failure[:80]}" if row.failure else (
            f"p50 {row.p50_ms:.2f} ms  {row.rps:.0f} req/s" if row.p50_ms is not None and row.rps else "done")
        say(f"  . {row.section:10} {row.upstream:8} {row.target:11} {row.wire:10} c={row.concurrency:<3} {status}")
        return row

    # ---- section 0 -----------------------------------------------------------------------------------------
    def calibration(self, fast: Upstream) -> None:
        s = self.settings
        requests = Requests(Endpoint.parse(fast.url), MODERN, Call("tools/call", fast.tool, fast.arguments))
        probe = Probe(upstreams=[fast])
        raw = measure_http(Row("calibration", "fast", "direct raw", MODERN, 16), requests, 16, s, probe)
        self.add(raw)
        row = Row("calibration", "fast", "direct hx2", MODERN, 16)
        try:
            outcome = asyncio.run(loadgen.run_httpx2(requests, 16, warmup_s=s.warmup_s, measure_s=s.measure_s))
            row.p50_ms, row.p99_ms, row.rps = outcome.percentile_ms(0.5), outcome.percentile_ms(0.99), outcome.rps
            row.driver_us = outcome.driver_cpu_s * 1e6 / max(outcome.count, 1)
            row.note = "httpx2 driver: same loop through httpx2.AsyncClient"
        except (RuntimeError, OSError, httpx2.HTTPError) as exc:
            row.failure = str(exc)
        self.add(row)
        with stacks.sdk_upstream("sdkshipped", as_shipped=True) as shipped:
            req = Requests(Endpoint.parse(shipped.url), MODERN, Call("tools/call", shipped.tool, shipped.arguments))
            short = Settings(s.warmup_s, min(s.measure_s, 1.5), s.max_requests, 1)
            row = measure_http(Row("calibration", "sdk", "shipped", MODERN, 1), req, 1, short,
                               Probe(upstreams=[shipped]))
            row.note = "deploy/demo/servers.py as tests start it (no TCP_NODELAY)"
            self.add(row)

    # ---- section 1 -----------------------------------------------------------------------------------------
    def tools_call(self, upstreams: Sequence[Upstream]) -> None:
        """Every target runs at once, and the cells of one (upstream, c, wire) run back to back, so a slow
        drift of the machine (other tenants, CPU clocks) moves all targets of a ratio together."""
        with contextlib.ExitStack() as stack:
            plain = stack.enter_context(stacks.plain_envoy(self.work, upstreams))
            rival = stack.enter_context(stacks.contender(self.work, upstreams))
            shapes = [(GATEWAY_1, 1)] + ([(GATEWAY_2, 2)] if self.two_workers else [])
            gateways = {label: stack.enter_context(stacks.gateway(self.work / f"gw{n}", upstreams, n))
                        for label, n in shapes}
            for up in upstreams:
                call = Call("tools/call", up.tool, up.arguments)
                targets: list[tuple[str, str, Call, Probe]] = [
                    ("direct", up.url, call, Probe(upstreams=[up])),
                    ("envoy", plain.urls[up.name], call,
                     Probe(envoy_pids=[plain.pid], upstreams=[up], admin_url=plain.admin_url, clusters=[up.name])),
                ]
                targets += [(label, gw.url, Call("tools/call", f"x_{up.name}_{up.tool}", up.arguments),
                             self.gateway_probe(gw, [up])) for label, gw in gateways.items()]
                targets.append(("contender", rival.urls[up.name],
                                Call("tools/call", f"{up.name}__{up.tool}", up.arguments),
                                Probe(envoy_pids=[rival.pid], upstreams=[up], admin_url=rival.admin_url,
                                      clusters=[up.name])))
                for _, url, target_call, _ in targets:
                    prime(Requests(Endpoint.parse(url), LEGACY, target_call))  # the wire every target answers
                for c in CONCURRENCY:
                    for wire in (MODERN, LEGACY):
                        group = [t for t in targets if not (self.quick and t[0] == "direct" and wire == LEGACY)]
                        self.measure_group(up.name, wire, c, group)
            self.contender_stats(rival.admin_url)
            for label, gw in gateways.items():
                self.gateway_stats(gw, label)

    def measure_group(self, upstream: str, wire: str, c: int, group: Sequence[tuple[str, str, Call, Probe]]) -> None:
        self.compare("tools/call", upstream, wire, c,
                     [(name, Requests(Endpoint.parse(url), wire, call), probe) for name, url, call, probe in group])

    def compare(self, section: str, label: str, wire: str, c: int, group: Sequence[tuple[str, Requests, Probe]],
                settings: Settings | None = None) -> list[Row]:
        """The targets of one ratio, back to back, in `rounds` passes that alternate the order (A B C, C B A),
        so a drift during the group weighs on every target alike; a target that fails is not retried."""
        s = settings or self.settings
        results: dict[str, list[Row]] = {name: [] for name, *_ in group}
        for round_no in range(s.rounds):
            for name, requests, probe in group if round_no % 2 == 0 else reversed(group):
                if results[name] and results[name][-1].failure:
                    continue
                results[name].append(measure_http(Row(section, label, name, wire, c), requests, c, s, probe))
        return [self.add(merge(results[name])) for name, *_ in group]

    @staticmethod
    def gateway_probe(gw: GatewayStack, upstreams: Sequence[Upstream]) -> Probe:
        return Probe(processor_pids=gw.processor_pids, envoy_pids=gw.envoy_pids, upstreams=upstreams,
                     admin_url=gw.admin_url, clusters=[f"mcp.{u.name}" for u in upstreams], ext_proc=True)

    def gateway_stats(self, gw: GatewayStack, label: str) -> None:
        stats = stacks.counters(gw.admin_url, r"ext_proc\.(streams_started|stream_msgs_sent|stream_msgs_received|"
                                              r"immediate_responses_sent|streams_failed|message_timeouts)$")
        short: dict[str, int] = {}
        for name, value in stats.items():  # summed over the gateway's listeners (stat prefixes)
            if name.startswith("http."):
                key = name.rsplit(".", 1)[-1]
                short[key] = short.get(key, 0) + value
        self.notes.append(f"{label} ext_proc totals over its run: {json.dumps(short)}")

    def contender_stats(self, admin_url: str) -> None:
        stats = stacks.counters(admin_url, r"http\.contender\.mcp")
        short = {k.split("http.contender.", 1)[1]: v for k, v in stats.items() if v}
        self.notes.append(f"contender filter counters over its run: {json.dumps(short)}")

    # ---- sections 2 and 3 ----------------------------------------------------------------------------------
    def lists_and_processor(self, upstreams: Sequence[Upstream], tools_each: int) -> None:
        s = self.settings
        label = f"{len(upstreams)}x{tools_each}"
        listing = Call("tools/list")
        with stacks.gateway(self.work / "gw-list", upstreams, 1) as gw:
            self.notes.append(f"gateway tools/list: {describe_list(gw.url)}")
            for wire in (MODERN, LEGACY):
                for c in CONCURRENCY:
                    self.add(measure_http(Row("tools/list", label, GATEWAY_1, wire, c),
                                          Requests(Endpoint.parse(gw.url), wire, listing), c, s,
                                          self.gateway_probe(gw, upstreams)))
            authority = gw.url.split("/")[2]
            tool = f"x_{upstreams[0].name}_{upstreams[0].tool}"
            for scenario in ("tools_list", "ping", "tools_call"):
                for c in CONCURRENCY:
                    base = Row("processor", label, "ext_proc", scenario, c)
                    self.add(measure_processor(base, gw.processor_listen[0], scenario, tool, authority, c, s,
                                               gw.processor_pids))
        with stacks.echo_processor() as (listen, pid):  # gRPC-Python's own floor, beside the real worker
            for c in CONCURRENCY:
                base = Row("processor", label, "echo floor", "tools_call", c)
                self.add(measure_processor(base, listen, "tools_call", tool, authority, c, s, [pid]))
        with stacks.contender(self.work, upstreams, tag="-list") as rival:
            url = rival.urls[upstreams[0].name]
            self.notes.append(f"contender tools/list: {describe_list(url, legacy=True)}")
            for c in CONCURRENCY:
                self.add(measure_http(Row("tools/list", label, "contender", LEGACY, c),
                                      Requests(Endpoint.parse(url), LEGACY, listing), c, s,
                                      Probe(envoy_pids=[rival.pid], upstreams=upstreams, admin_url=rival.admin_url,
                                            clusters=[u.name for u in upstreams])))

    # ---- scaling -------------------------------------------------------------------------------------------
    def scaling(self, upstream: Upstream) -> None:
        """One gateway shape at a time (each alone on the machine), the same calls to the same upstream."""
        call = Call("tools/call", f"x_{upstream.name}_{upstream.tool}", upstream.arguments)
        for workers, threads in SCALING:
            label = f"{workers}w x {threads}t"
            with stacks.gateway(self.work / f"scale-{workers}-{threads}", [upstream], workers,
                                {"envoyConcurrency": threads}) as gw:
                requests = Requests(Endpoint.parse(gw.url), MODERN, call)
                prime(requests)
                self.add(measure_http(Row("scaling", upstream.name, label, MODERN, 16), requests, 16,
                                      Settings(self.settings.warmup_s, self.settings.measure_s,
                                               self.settings.max_requests, 1), self.gateway_probe(gw, [upstream])))

    def scaling_summary(self) -> list[str]:
        lines = []
        for row in self.rows:
            if row.section != "scaling" or row.failure or not row.rps:
                continue
            proc = f"{row.proc_us / 1000:.2f}" if row.proc_us else "-"
            envoy = f"{row.envoy_us / 1000:.2f}" if row.envoy_us else "-"
            up = f"{row.upstream_us / 1000:.2f}" if row.upstream_us else "-"
            per_core = (f"; per CPU-second: processor {1e6 / row.proc_us:.0f} calls, Envoy {1e6 / row.envoy_us:.0f}"
                        f" calls" if row.proc_us and row.envoy_us else "")
            lines.append(f"[scale] {row.target:9} {row.rps:6.0f} calls/s at c=16; CPU s per 1,000 calls: processor"
                         f" {proc}, Envoy {envoy}, upstream {up}{per_core}; other load {row.other_pct or 0:.0f}%")
        return lines

    # ---- output --------------------------------------------------------------------------------------------
    def summary(self, upstreams: Sequence[str]) -> str:
        gateways = [GATEWAY_1] + ([GATEWAY_2] if self.two_workers else [])
        lines = ["", "RATIOS (same run, same upstream)"]
        raw = find(self.rows, "fast", "direct raw", MODERN, 16, section="calibration")
        hx2 = find(self.rows, "fast", "direct hx2", MODERN, 16, section="calibration")
        if raw and hx2 and raw.rps and hx2.rps and raw.driver_us and hx2.driver_us:
            lines.append(f"[drv ] load driver ceiling (direct, fast upstream, c=16): raw asyncio {raw.rps:.0f} req/s at"
                         f" {raw.driver_us:.0f} us CPU/req; httpx2 {hx2.rps:.0f} req/s at {hx2.driver_us:.0f} us/req"
                         f" -> the raw driver is used")
        lines += ratios(self.rows, upstreams, gateways)
        fleet = f"{LIST_UPSTREAMS}x{LIST_TOOLS}"
        rival = {c: find(self.rows, fleet, "contender", LEGACY, c, section="tools/list") for c in CONCURRENCY}
        for wire in (MODERN, LEGACY):
            row = find(self.rows, fleet, GATEWAY_1, wire, 1, section="tools/list")
            if row and row.p50_ms is not None:
                lines.append(f"[{fleet}] {GATEWAY_1} {wire:10} warm tools/list p50 at c=1 = {row.p50_ms:6.2f} ms"
                             f"   target < 3 ms: {'PASS' if row.p50_ms < 3 else 'MISS'}")
            row16 = find(self.rows, fleet, GATEWAY_1, wire, 16, section="tools/list")
            c1, c16 = rival[1], rival[16]
            if row and row16 and c1 and c16 and row.p50_ms and c1.p50_ms and row16.rps and c16.rps:
                lines.append(f"[{fleet}] contender  legacy     tools/list p50 at c=1 = {c1.p50_ms:6.2f} ms"
                             f" ({c1.upstream_rq or 0:.0f} upstream requests per list); gateway {wire} req/s /"
                             f" contender at c=16 = {row16.rps / c16.rps:.2f}")
        for row in self.rows:
            if row.section == "processor" and not row.failure and row.proc_us:
                target = f"; target <= 400 us: {'PASS' if row.proc_us <= 400 else 'MISS'}" \
                    if row.wire == "tools_call" and row.target == "ext_proc" else ""
                if row.target == "echo floor":
                    target = " (an echo servicer: gRPC-Python's own cost, no parsing or deciding)"
                lines.append(f"[proc ] {row.target:10} {row.wire:10} c={row.concurrency:<2} {row.rps:7.0f} cycles/s"
                             " wall,"
                             f" {1e6 / row.proc_us:6.0f} cycles per processor CPU-second (one core),"
                             f" {row.proc_us:4.0f} us CPU per cycle, {row.xp_msgs:.0f} messages/cycle, peak RSS"
                             f" {row.proc_mb:.1f} MB{target}")
        lines += self.scaling_summary()
        return "\n".join(lines)


def prime(requests: Requests, seconds: float = 1.0) -> None:
    """Load a freshly started target for a moment before its first measured cell (connection pools, caches,
    CPU clocks), so that cell does not pay for the start."""
    with contextlib.suppress(RuntimeError, OSError, ConnectionError):
        asyncio.run(loadgen.run(requests, 8, warmup_s=seconds, measure_s=0.0, max_requests=8))


def describe_list(url: str, *, legacy: bool = False) -> str:
    """How many tools one list answer holds and how big it is (checks the list is complete)."""
    requests = Requests(Endpoint.parse(url), LEGACY if legacy else MODERN, Call("tools/list"))
    headers = requests.headers
    with httpx2.Client(timeout=30) as client:
        if legacy:
            hello = {"jsonrpc": "2.0", "id": 0, "method": "initialize",
                     "params": {"protocolVersion": "2025-11-25", "capabilities": {},
                                "clientInfo": {"name": "bench", "version": "1"}}}
            answer = client.post(url, json=hello, headers=headers)
            headers["mcp-session-id"] = answer.headers.get("mcp-session-id", "")
            headers["mcp-protocol-version"] = answer.json()["result"]["protocolVersion"]
        resp = client.post(url, content=requests.body(1), headers=headers)
    try:
        tools = resp.json()["result"]["tools"]
    except (ValueError, KeyError, TypeError):
        return f"HTTP {resp.status_code} {resp.text[:200]!r}"
    schema = json.dumps(tools[0].get("inputSchema")) if tools else "-"
    return f"{len(tools)} tools, {len(resp.content) / 1024:.0f} KiB per answer, first schema {schema[:90]}"


def header(settings: Settings, quick: bool) -> str:
    envoy = subprocess.run([str(stacks.ENVOY), "--version"], capture_output=True, text=True, check=False)
    version = envoy.stdout.strip().split("version:")[-1].strip().split("/")[1] if "/" in envoy.stdout else "?"
    load = os.getloadavg()
    return (f"{code_state()}\n"
            f"muster-edge bench ({'quick' if quick else 'full'}): {os.cpu_count()} CPUs shared by driver, Envoy,"
            f" processor and upstreams; load average {load[0]:.2f} at start\nEnvoy {version} --concurrency"
            f" {stacks.ENVOY_CONCURRENCY} everywhere; Python {sys.version.split()[0]}; per cell: warm-up"
            f" {settings.warmup_s}s, window {settings.measure_s}s x {settings.rounds} round(s) in alternating order"
            f" (closed loop, 1 keep-alive HTTP/1.1 connection per client)\nAbsolute numbers are pessimistic"
            f" (everything shares the CPUs); compare within a run.")


def core(bench: Bench) -> None:
    """Sections 0 to 3."""
    with contextlib.ExitStack() as stack:
        fast = stack.enter_context(stacks.fast_upstream("fast"))
        sdk = stack.enter_context(stacks.sdk_upstream("sdk"))
        say("\n[0] calibration")
        bench.calibration(fast)
        say("[1] tools/call")
        bench.tools_call([fast, sdk])
    with contextlib.ExitStack() as stack:
        fleet = [stack.enter_context(stacks.fast_upstream(f"s{i:02d}", tools=LIST_TOOLS))
                 for i in range(1, LIST_UPSTREAMS + 1)]
        say(f"[2,3] tools/list with {LIST_UPSTREAMS} upstreams x {LIST_TOOLS} tools; the processor alone")
        bench.lists_and_processor(fleet, LIST_TOOLS)


def code_state() -> str:
    """Which code was measured: the commit, and the files changed beside it (others edit the tree meanwhile)."""
    def git(*args: str) -> str:
        done = subprocess.run(["git", *args], cwd=Path(__file__).resolve().parent.parent, capture_output=True,
                              text=True, check=False)
        return done.stdout.strip() if done.returncode == 0 else ""

    commit = git("rev-parse", "--short", "HEAD") or "?"
    changed = [line[3:] for line in git("status", "--porcelain").splitlines()
               if line[3:].startswith(("catalog/", "extproc/", "envoy/", "proto/"))]
    return f"code: commit {commit}" + (f", uncommitted changes in {', '.join(changed)}" if changed else ", clean")


def _stop_on_sigterm(signum: int, frame: Any) -> NoReturn:
    raise KeyboardInterrupt  # unwinds every context manager, which stops every process


@contextlib.contextmanager
def workdir(keep: str | None) -> Iterator[Path]:
    if keep:
        path = Path(keep).resolve()
        path.mkdir(parents=True, exist_ok=True)
        yield path
        return
    with tempfile.TemporaryDirectory(prefix="muster-edge-bench-") as tmp:
        yield Path(tmp)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="short windows, fewer cells (about 3 minutes with every section)")
    parser.add_argument("--no-two-workers", action="store_true", help="skip the 2-worker gateway (full run)")
    parser.add_argument("--json", metavar="PATH", help="also write every row as JSON")
    parser.add_argument("--workdir", metavar="DIR", help="keep configs and logs here instead of a temp dir")
    parser.add_argument("--only", metavar="LIST", default=",".join(SECTIONS),
                        help=f"comma-separated sections to run, of {', '.join(SECTIONS)} (default: all)")
    args = parser.parse_args(argv)
    only = [part.strip() for part in args.only.split(",") if part.strip()]
    unknown = [part for part in only if part not in SECTIONS]
    if unknown or not only:
        parser.error(f"--only: unknown section {', '.join(unknown) or '(none given)'}; known: {', '.join(SECTIONS)}")
    signal.signal(signal.SIGTERM, _stop_on_sigterm)
    # A shell starts background jobs with SIGINT ignored; take it back so `kill -INT` stops the run cleanly too.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    settings = Settings(0.3, 1.0, 200_000, 1) if args.quick else Settings(0.5, 2.0, 500_000, 2)
    bench = Bench(settings, Path(), quick=args.quick, two_workers=not args.quick and not args.no_two_workers)
    from bench import edge_auth, exchange, families, metrics_cost  # they import this module: not at its top
    from bench import tracing as tracing_bench

    started = time.monotonic()
    more = bench.section_settings
    say(header(settings, args.quick) + f"\nsections: {', '.join(only)} (families and auth cells: warm-up"
        f" {more.warmup_s}s, window {more.measure_s}s x {more.rounds} rounds in alternating order; exchange cells:"
        " 1,000 measured calls per target in alternating rounds)")
    try:
        with workdir(args.workdir) as work:
            bench.work = work
            if "core" in only:
                core(bench)
            if "families" in only:
                say(f"[fam] {families.CLUSTERS} clusters x {len(families.FAMILIES)} families x {families.TOOLS}"
                    " tools, with and without families")
                families.run(bench)
            if "auth" in only:
                say("[auth] OAuth at the edge (real IdP) + 30-rule policy, vs neither")
                edge_auth.run(bench)
            if "exchange" in only:
                say("[exch] token exchange vs static Authorization header")
                exchange.run(bench)
            if "metrics" in only:
                say("[metr] routed tools/call with metrics on vs off")
                metrics_cost.run(bench)
            if "tracing" in only:
                say("[trace] tools/call with tracing off, at sampling ratio 0 and 1.0")
                tracing_bench.run(bench)
            if "scaling" in only:
                say(f"[scale] tools/call at c=16, processor workers x Envoy threads: {SCALING}")
                with stacks.fast_upstream("fast") as fast:
                    bench.scaling(fast)
    except KeyboardInterrupt:
        say("\ninterrupted: every process the benchmark started has been stopped")
        return 130
    sections = (("calibration", "CALIBRATION: the load driver's ceiling, and the SDK upstream as shipped"),
                ("tools/call", "TOOLS/CALL (same request body everywhere; only the tool name differs)"),
                ("tools/list", "WARM TOOLS/LIST, 10 upstreams x 50 tools"),
                ("processor", "PROCESSOR ALONE (gRPC straight to one worker; wire column = scenario; xp msg ="
                              " messages per cycle)"),
                ("families", "FAMILIES: 20 clusters x 2 families x 40 tools (family) vs the same 40 servers under"
                             " per-server names (no-family); upstream column = call (tools/call echo on cluster 07)"
                             " or list (warm tools/list)"),
                ("auth", "EDGE SECURITY: jwt_authn (real IdP) + 30-rule policy (auth+pol) vs neither (open); 5"
                         " upstreams x 20 tools; upstream column = call or list"),
                ("scaling", "SCALING: tools/call at c=16 (fast upstream, 2026-07-28 wire); target = processor"
                            " workers x Envoy worker threads, one gateway at a time"),
                ("exchange", f"UPSTREAM CREDENTIALS: {exchange.CALLS} calls of one user per cell, to a token-exchange"
                             " upstream (exchange = exchange-srv) and to one with a static Authorization header"
                             " (static = static-srv)"),
                ("metrics", "METRICS: the same gateway with metrics on (histograms + Envoy's access log to the"
                            " processor) and off, fast upstream"),
                ("tracing", "TRACING: one fast upstream; trace off (no tracing setting), trace 0.0 / 1.0 (Envoy's"
                            " tracer + the processor's SDK at that sampling ratio, OTLP to bench/otlp_sink.py)"))
    for key, title in sections:
        chosen = [r for r in bench.rows if r.section == key]
        if chosen:
            say("\n" + table(chosen, title))
    say("\n" + LEGEND)
    say(bench.summary(["fast", "sdk"]))
    for line in (families.summary(bench.rows) + edge_auth.summary(bench.rows) + exchange.summary(bench.rows)
                 + metrics_cost.summary(bench.rows) + tracing_bench.summary(bench.rows)):
        say(line)
    for line in bench.verdicts:
        say(line)
    say("\nNOTES")
    for note in bench.notes:
        say(f"- {note}")
    say(f"\nfinished in {time.monotonic() - started:.0f}s")
    if args.json:
        Path(args.json).write_text(json.dumps([asdict(r) for r in bench.rows], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
