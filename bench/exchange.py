"""Upstream credentials: what an RFC 8693 token exchange costs a call, and how often the IdP is asked.

One gateway with auth on (a real OpenID provider, npm oidc-provider with the token-exchange grant), in front of
fast upstreams served by one process: `static-srv` (a static `Authorization` header from `spec.headers`),
`exchange-srv` (`auth.tokenExchange`: the caller's token is exchanged for one whose audience is the upstream,
600 s lifetime) and `renew-srv` (the same with an 8 s lifetime, which the gateway renews a quarter of its
lifetime before it expires: 6 s of use per token). The upstreams do not validate tokens; what is measured
is the gateway's side.

Steps, with the IdP's token-exchange requests counted after each (tests/idp.py `token_requests`):
  1. one cold call of user A to exchange-srv (exchange + the user's own list fetch + the call);
  2. 1,000 warm calls of A at c=1 to exchange-srv and to static-srv, back to back: the added p50;
  3. 16 concurrent first calls of user B (single flight: one exchange);
  4. 1,000 warm calls of A at c=16 to each;
  5. calls of user C to renew-srv, paced over several token lifetimes: exchanges per lifetime.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import time
from collections import Counter
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from bench import loadgen, procstat, stacks
from bench.cells import Settings
from bench.families import probe
from bench.report import Row, find
from bench.stacks import GatewayStack
from bench.wire import MODERN, Call, Endpoint, Requests, succeeded
from extproc.credentials import Issued, expiry_buffer
from tests.idp import GRANT_TOKEN_EXCHANGE, Idp, start_idp
from tests.procs import free_port

if TYPE_CHECKING:
    from bench.main import Bench

SECTION = "exchange"
CALLS = 1000
ADDED_P50_BUDGET_MS = 0.2
LONG_TTL_S, SHORT_TTL_S = 600, 8
USERS = ("user-a", "user-b", "user-c")
SERVERS = ("static-srv", "exchange-srv", "renew-srv")


def run(bench: Bench) -> None:
    work = bench.work / "exchange"
    listen = f"127.0.0.1:{free_port()}"
    resource = f"http://{listen}/mcp"
    with contextlib.ExitStack() as stack:
        fleet = stack.enter_context(stacks.fast_fleet(SERVERS, 5, label="fleet3"))
        urls = {u.name: u.url for u in fleet.members}
        clients: list[dict[str, Any]] = [{"client_id": u, "client_secret": f"{u}-secret",
                                          "claims": {"groups": ["dev"]}} for u in USERS]
        clients.append({"client_id": "exchanger", "client_secret": "exchanger-secret",
                        "grant_types": ["client_credentials", GRANT_TOKEN_EXCHANGE]})
        resources = [{"audience": resource, "scope": "mcp:tools", "accessTokenTTL": 3600},
                     {"audience": urls["exchange-srv"], "scope": "mcp:tools", "accessTokenTTL": LONG_TTL_S},
                     {"audience": urls["renew-srv"], "scope": "mcp:tools", "accessTokenTTL": SHORT_TTL_S}]
        idp = stack.enter_context(start_idp(work / "idp", clients=clients, resources=resources, token_exchange=True))
        secrets = work / "secrets"
        creds = secrets / "default" / "exchanger-creds"
        creds.mkdir(parents=True, exist_ok=True)
        (creds / "client-id").write_text("exchanger\n")
        (creds / "client-secret").write_text("exchanger-secret\n")

        def exchange(audience: str) -> dict[str, Any]:
            return {"tokenExchange": {"enabled": True, "dexTokenEndpoint": idp.token_endpoint,
                                      "connectorId": "bench", "expectedIssuer": idp.issuer, "audience": audience,
                                      "scopes": "mcp:tools", "clientCredentialsSecretRef": {"name": "exchanger-creds"}}}

        specs = {"static-srv": {"headers": {"Authorization": "Bearer static-bench-credential"}},
                 "exchange-srv": {"auth": exchange(urls["exchange-srv"])},
                 "renew-srv": {"auth": exchange(urls["renew-srv"])}}
        auth = {"issuer": idp.issuer, "jwksUri": idp.jwks_uri, "resource": resource}
        gw = stack.enter_context(stacks.gateway(work / "gw", fleet.members, 1,
                                                {"listen": listen, "auth": auth, "secretsDir": str(secrets)},
                                                specs=specs))
        tokens = {u: idp.client_credentials(u, f"{u}-secret", resource=resource, scope="mcp:tools") for u in USERS}
        Measure(bench, idp, gw, fleet, tokens).all()


class Measure:
    def __init__(self, bench: Bench, idp: Idp, gw: GatewayStack, fleet: stacks.FastFleet,
                 tokens: dict[str, str]) -> None:
        self.bench, self.idp, self.gw, self.fleet, self.tokens = bench, idp, gw, fleet, tokens
        self.upstream = fleet.by_name()

    def requests(self, server: str, user: str) -> Requests:
        return Requests(Endpoint.parse(self.gw.url), MODERN, Call("tools/call", f"x_{server}_echo", {"text": "hi"}),
                        {"authorization": f"Bearer {self.tokens[user]}"})

    def exchanges(self) -> Counter[tuple[str, str]]:
        """Token-exchange requests the IdP answered since the last reset, by (subject, upstream name)."""
        names = {u.url: u.name for u in self.fleet.members}
        return Counter((str(r.get("subject")), names.get(str(r.get("audience")), str(r.get("audience"))))
                       for r in self.idp.recent_requests() if r.get("grant_type") == GRANT_TOKEN_EXCHANGE)

    def calls_seen(self, server: str) -> int:
        return int(self.upstream[server].method_counts().get("tools/call", 0))

    def note(self, text: str) -> None:
        self.bench.notes.append(f"exchange: {text}")

    @staticmethod
    def show(counts: Counter[tuple[str, str]]) -> str:
        return ", ".join(f"{user}->{server} {n}" for (user, server), n in sorted(counts.items())) or "none"

    def all(self) -> None:
        bench = self.bench
        self.idp.reset_counters()
        started = time.monotonic()
        first_seen = self.calls_seen("exchange-srv")
        watch = procstat.Watch(self.gw.processor_pids)
        watch.start()
        # 1. the first call of a user
        cold_ms, ok = asyncio.run(burst(self.requests("exchange-srv", "user-a"), 1))
        self.note(f"step 1, first call of user-a to exchange-srv: {cold_ms[0]:.1f} ms ({'ok' if ok else 'FAILED'});"
                  f" token exchanges: {self.show(self.exchanges())} (a user's first request builds the user's view,"
                  f" which exchanges for every token-exchange server in the catalog); processor peak RSS"
                  f" {watch.peak_rss_mb():.1f} MB")
        # 2 and 4. warm calls, exchange vs static: CALLS measured calls each, in alternating rounds
        rounds = 2 if bench.quick else 4
        counted = Settings(min(bench.settings.warmup_s, 0.3), 120.0, CALLS // rounds, rounds)
        burst_calls = 0
        for step, c in ((2, 1), (4, 16)):
            if step == 4:
                # 3. concurrent first calls of another user
                watch.start()
                before = self.exchanges()
                lat, ok = asyncio.run(burst(self.requests("exchange-srv", "user-b"), 16))
                burst_calls = len(lat)
                got = self.exchanges() - before
                self.note(f"step 3, 16 concurrent first calls of user-b to exchange-srv: slowest {max(lat):.1f} ms,"
                          f" fastest {min(lat):.1f} ms ({'ok' if ok else 'FAILED'}); token exchanges: {self.show(got)};"
                          f" processor peak RSS {watch.peak_rss_mb():.1f} MB")
                n = got[("user-b", "exchange-srv")]
                verdict = "PASS" if n == 1 else "MISS"
                bench.verdicts.append(f"[exch ] user-b: 16 concurrent first calls to exchange-srv: {n} token"
                                      f" exchange(s) for exchange-srv; target 1 (single flight): {verdict}")
            before, seen = self.exchanges(), self.calls_seen("exchange-srv")
            rows = bench.compare(SECTION, "call", MODERN, c, [
                (server.split("-")[0], self.requests(server, "user-a"),
                 probe(self.gw, self.fleet.whole, [self.upstream[server]]))
                for server in ("exchange-srv", "static-srv")], counted)
            for row in rows:
                row.note = (row.note + f" {rounds}x{CALLS // rounds} measured calls").strip()
            self.note(f"step {step}, user-a warm at c={c}: {self.calls_seen('exchange-srv') - seen} calls reached"
                      f" exchange-srv (warm-ups included); token exchanges during them:"
                      f" {self.show(self.exchanges() - before)}")
        total = self.calls_seen("exchange-srv") - first_seen - burst_calls
        n = self.exchanges()[("user-a", "exchange-srv")]
        bench.verdicts.append(
            f"[exch ] user-a: {total} calls to exchange-srv in {time.monotonic() - started:.0f} s (tokens live"
            f" {LONG_TTL_S} s): {n} token exchange(s) for exchange-srv; target 1 per token lifetime:"
            f" {'PASS' if n == 1 else 'MISS'}")
        # 5. renewal
        self.renewal()
        stats = stacks.counters(self.gw.admin_url,
                                r"cluster\.mcp\.(exchange|static|renew)-srv\.upstream_rq_(total|401)$")
        self.note(f"Envoy upstream counters: {json.dumps(stats)}")
        self.note(f"IdP token requests by grant: {json.dumps(self.idp.counters()['token']['by_grant'])}; token"
                  f" exchanges by user and upstream: {self.show(self.exchanges())}")

    def renewal(self) -> None:
        usable = SHORT_TTL_S - expiry_buffer(Issued("", expires_at=SHORT_TTL_S, issued_at=0))
        lifetimes = 2 if self.bench.quick else 4
        count = 200 if self.bench.quick else CALLS
        before = self.exchanges()
        lat, ok, elapsed = asyncio.run(paced(self.requests("renew-srv", "user-c"), count, usable * lifetimes))
        got = self.exchanges() - before
        n = got[("user-c", "renew-srv")]
        expected = math.ceil(elapsed / usable)
        ordered = sorted(lat)
        self.note(f"step 5, user-c: {count} calls to renew-srv paced over {elapsed:.1f} s; its tokens live"
                  f" {SHORT_TTL_S} s and the gateway keeps each {usable} s: token exchanges {self.show(got)}"
                  f" ({'ok' if ok else 'FAILED'}); p50 {ordered[len(ordered) // 2]:.2f} ms, slowest"
                  f" {', '.join(f'{v:.1f}' for v in ordered[-3:])} ms (the first and the renewing calls)")
        self.bench.verdicts.append(
            f"[exch ] user-c: {count} calls to renew-srv over {elapsed:.1f} s, {usable} s of use per token:"
            f" {n} token exchanges; 1 per lifetime = {expected}: {'PASS' if n == expected and ok else 'MISS'}")


async def burst(requests: Requests, n: int) -> tuple[list[float], bool]:
    """`n` concurrent calls on fresh connections, each timed alone (ms); whether all succeeded."""
    conns = [await loadgen.connect(requests.endpoint) for _ in range(n)]
    try:
        async def one(conn: loadgen.ClientConnection, msg_id: int) -> tuple[float, bool]:
            start = time.perf_counter()
            answer = await conn.exchange(requests.build(msg_id))
            return (time.perf_counter() - start) * 1000, succeeded(answer)

        done = await asyncio.gather(*(one(c, i + 1) for i, c in enumerate(conns)))
    finally:
        for conn in conns:
            conn.close()
    return [ms for ms, _ in done], all(ok for _, ok in done)


async def paced(requests: Requests, count: int, seconds: float) -> tuple[list[float], bool, float]:
    """`count` calls on one connection, evenly spread over `seconds` (open loop: a slow call is not waited
    out by the next tick, it only delays it)."""
    conn = await loadgen.connect(requests.endpoint)
    interval = seconds / count
    out: list[float] = []
    ok = True
    start = time.perf_counter()
    try:
        for i in range(count):
            delay = start + i * interval - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            t0 = time.perf_counter()
            answer = await conn.exchange(requests.build(i + 1))
            out.append((time.perf_counter() - t0) * 1000)
            ok = ok and succeeded(answer)
    finally:
        conn.close()
    return out, ok, time.perf_counter() - start


def summary(rows: Sequence[Row]) -> list[str]:
    lines = []
    for c in (1, 16):
        exch = find(rows, "call", "exchange", MODERN, c, section=SECTION)
        static = find(rows, "call", "static", MODERN, c, section=SECTION)
        if exch and static and exch.p50_ms is not None and static.p50_ms is not None and exch.rps and static.rps:
            delta = exch.p50_ms - static.p50_ms
            verdict = f"target < {ADDED_P50_BUDGET_MS} ms: {'PASS' if delta < ADDED_P50_BUDGET_MS else 'MISS'}" \
                if c == 1 else "(shown)"
            lines.append(f"[exch ] {CALLS} warm calls at c={c:<2}: exchange p50 - static p50 = {delta:+.2f} ms"
                         f" ({exch.p50_ms:.2f} vs {static.p50_ms:.2f} ms; p99 {exch.p99_ms or 0:.2f} vs"
                         f" {static.p99_ms or 0:.2f}; req/s x{exch.rps / static.rps:.2f}); procMB"
                         f" {exch.proc_mb or 0:.0f} vs {static.proc_mb or 0:.0f}   {verdict}")
    return lines

