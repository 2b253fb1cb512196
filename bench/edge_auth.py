"""Edge security: what OAuth at the edge and a 30-rule tool policy cost a call.

A real OpenID provider (npm oidc-provider, tests/idp.py) issues a client_credentials JWT for the gateway's
resource URL. Three gateways in front of the same five fast upstreams (one process, 20 tools each) run at once:
`auth+pol` (Envoy's jwt_authn against the provider's JWKS, `requiredScopes`, and a policy of 29 deny rules
that do not match the caller's calls, then one allow rule that does, so every decision walks all 30), `auth`
(the same OAuth, the default policy: splits the cost between the two) and `open` (neither). Requests to the
first two carry the bearer; `open` gets the same bytes without it. The targets compare `auth+pol` with `open`.
"""

from __future__ import annotations

import contextlib
import json
import re
import urllib.request
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import httpx2

from bench import stacks
from bench.families import probe
from bench.main import CONCURRENCY, describe_list, prime
from bench.report import Row, find
from bench.wire import LEGACY, MODERN, Call, Endpoint, Requests
from tests.idp import start_idp
from tests.procs import free_port

if TYPE_CHECKING:
    from bench.main import Bench

SECTION = "auth"
SERVERS = [f"a{i:02d}" for i in range(1, 6)]
TOOLS = 20
USER, SECRET = "bench-dev", "bench-dev-secret"
RPS_FLOOR = 0.85  # at most 15% lower throughput
P50_BUDGET_MS = 0.3  # at most 0.3 ms more p50
TEAMS = ("interns", "auditors", "contractors", "support", "finance", "marketing", "sales", "legal", "hr", "qa")


def policy() -> dict[str, Any]:
    """29 deny rules of the kinds README shows (tool/original/server/family globs, subjects, groups, scopes,
    annotations), none of which matches the bench caller (groups [dev], scope mcp:tools), then one allow."""
    rules: list[dict[str, Any]] = []
    for team in TEAMS:
        rules.append({"name": f"{team}-read-only", "effect": "deny", "match": {"groups": [team], "readOnly": False}})
        rules.append({"name": f"no-prod-for-{team}", "effect": "deny",
                      "match": {"server": ["*-prod", "*-prod-*"], "groups": [team]}})
    rules += [
        {"name": "no-kubectl-delete", "effect": "deny", "match": {"original": "kubectl_delete"}},
        {"name": "no-helm", "effect": "deny", "match": {"original": ["*_helm_chart", "helm_*"]}},
        {"name": "no-capi", "effect": "deny", "match": {"original": "capi_*"}},
        {"name": "no-flux-reconcile", "effect": "deny", "match": {"tool": "x_*_reconcile_flux_*"}},
        {"name": "no-deletes", "effect": "deny", "match": {"tool": ["x_*_delete_*", "x_*_*_delete"]}},
        {"name": "no-robots", "effect": "deny", "match": {"subject": ["robot-*", "ci-bot"]}},
        {"name": "no-vendor", "effect": "deny", "match": {"server": "vendor", "groups": ["dev"]}},
        {"name": "admin-scope-audited", "effect": "deny", "match": {"scopes": ["mcp:admin"], "destructive": True}},
        {"name": "no-legacy-family", "effect": "deny", "match": {"family": "legacy-*"}},
    ]
    assert len(rules) == 29
    rules.append({"name": "developers", "effect": "allow", "match": {"groups": ["dev"], "scopes": ["mcp:tools"]}})
    return {"rules": rules}


def run(bench: Bench) -> None:
    work = bench.work / "auth"
    listen = f"127.0.0.1:{free_port()}"
    resource = f"http://{listen}/mcp"
    auth_port = free_port()  # the auth-only gateway: same issuer, its own resource URL as an extra audience
    wires = (MODERN,) if bench.quick else (MODERN, LEGACY)
    with contextlib.ExitStack() as stack:
        idp = stack.enter_context(start_idp(
            work / "idp", clients=[{"client_id": USER, "client_secret": SECRET, "claims": {"groups": ["dev"]}}],
            resources=[{"audience": resource, "scope": "mcp:tools", "accessTokenTTL": 3600}]))
        fleet = stack.enter_context(stacks.fast_fleet(SERVERS, TOOLS, label="fleet5"))
        auth = {"issuer": idp.issuer, "jwksUri": idp.jwks_uri, "resource": resource,
                "requiredScopes": ["mcp:tools"], "scopesSupported": ["mcp:tools"]}
        auth_only = {**auth, "resource": f"http://127.0.0.1:{auth_port}/mcp", "audiences": [resource]}
        secured = stack.enter_context(stacks.gateway(work / "gw-auth", fleet.members, 1,
                                                     {"listen": listen, "auth": auth, "policy": policy()}))
        only_auth = stack.enter_context(stacks.gateway(work / "gw-auth-only", fleet.members, 1,
                                                       {"listen": f"127.0.0.1:{auth_port}", "auth": auth_only}))
        plain = stack.enter_context(stacks.gateway(work / "gw-open", fleet.members, 1))
        token = idp.client_credentials(USER, SECRET, resource=resource, scope="mcp:tools")
        bearer = {"authorization": f"Bearer {token}"}
        bench.notes.append(f"auth: token of {len(token)} bytes for {resource}; {refusal_check(secured.url)}")
        bench.notes.append(f"auth tools/list with auth+policy: {list_as(secured.url, bearer)}")
        bench.notes.append(f"auth tools/list open: {describe_list(plain.url)}")
        call = Call("tools/call", f"x_{SERVERS[0]}_echo", {"text": "hello"})
        listing = Call("tools/list")
        for wire in wires:
            for c_ in (call, listing):
                prime(Requests(Endpoint.parse(secured.url), wire, c_, bearer))
                prime(Requests(Endpoint.parse(only_auth.url), wire, c_, bearer))
                prime(Requests(Endpoint.parse(plain.url), wire, c_))
        before = decisions(secured.status_urls[0])
        for method, c_, clusters, method_wires in (("call", call, fleet.members[:1], wires),
                                                   ("list", listing, fleet.members, (MODERN,))):
            for c in CONCURRENCY:
                for wire in method_wires:
                    bench.compare(SECTION, method, wire, c, [
                        ("auth+pol", Requests(Endpoint.parse(secured.url), wire, c_, bearer),
                         probe(secured, fleet.whole, clusters)),
                        ("auth", Requests(Endpoint.parse(only_auth.url), wire, c_, bearer),
                         probe(only_auth, fleet.whole, clusters)),
                        ("open", Requests(Endpoint.parse(plain.url), wire, c_), probe(plain, fleet.whole, clusters)),
                    ], bench.section_settings)
        after = decisions(secured.status_urls[0])
        grown = {k: v - before.get(k, 0) for k, v in after.items() if v - before.get(k, 0)}
        bench.notes.append(f"auth policy decisions during the cells (processor /metrics): {json.dumps(grown)}")
        jwt = stacks.counters(secured.admin_url, r"jwt_authn\.")
        bench.notes.append(f"auth Envoy jwt_authn counters: {json.dumps({k: v for k, v in jwt.items() if v})}")


def refusal_check(url: str) -> str:
    """Without a token the secured gateway must answer 401 (so the figures are really with auth on)."""
    body = {"jsonrpc": "2.0", "id": 1, "method": "tools/list", "params": {}}
    headers = {"accept": "application/json, text/event-stream", "content-type": "application/json",
               "mcp-protocol-version": "2025-11-25"}
    resp = httpx2.post(url, json=body, headers=headers, timeout=10)
    return f"without a token: HTTP {resp.status_code} {resp.headers.get('www-authenticate', '')[:60]!r}..."


def list_as(url: str, headers: dict[str, str]) -> str:
    requests = Requests(Endpoint.parse(url), MODERN, Call("tools/list"), headers)
    resp = httpx2.post(url, content=requests.body(1), headers=requests.headers, timeout=30)
    try:
        tools = resp.json()["result"]["tools"]
    except (ValueError, KeyError, TypeError):
        return f"HTTP {resp.status_code} {resp.text[:200]!r}"
    return f"{len(tools)} tools, {len(resp.content) / 1024:.0f} KiB per answer"


def decisions(status_url: str) -> dict[str, float]:
    """muster_edge_policy_decisions_total by (decision, rule), from the processor's /metrics."""
    try:
        with urllib.request.urlopen(status_url.replace("/status", "/metrics"), timeout=5) as resp:
            text = resp.read().decode()
    except OSError:
        return {}
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("muster_edge_policy_decisions_total{"):
            labels, _, value = line.rpartition(" ")
            found = dict(re.findall(r'(\w+)="([^"]*)"', labels))
            key = f"{found.get('decision')}:{found.get('rule')}"
            out[key] = out.get(key, 0.0) + float(value)
    return out


def summary(rows: Sequence[Row]) -> list[str]:
    lines = []
    for method in ("call", "list"):
        for wire in (MODERN, LEGACY):
            for c in CONCURRENCY:
                on = find(rows, method, "auth+pol", wire, c, section=SECTION)
                off = find(rows, method, "open", wire, c, section=SECTION)
                if not (on and off and on.p50_ms is not None and off.p50_ms is not None and on.rps and off.rps):
                    continue
                delta, ratio = on.p50_ms - off.p50_ms, on.rps / off.rps
                if method == "call":
                    ok = delta <= P50_BUDGET_MS if c == 1 else ratio >= RPS_FLOOR
                    goal = f"p50 target <= +{P50_BUDGET_MS} ms" if c == 1 else f"req/s target >= x{RPS_FLOOR}"
                    verdict = f"{goal}: {'PASS' if ok else 'MISS'}"
                else:
                    verdict = "(shown, no target)"
                lines.append(f"[auth ] tools/{method:4} {wire:10} c={c:<2} auth+policy vs open: p50 {delta:+.2f} ms"
                             f" ({on.p50_ms:.2f} vs {off.p50_ms:.2f}), req/s x{ratio:.2f} ({on.rps:.0f} vs"
                             f" {off.rps:.0f}); procMB {on.proc_mb or 0:.0f} vs {off.proc_mb or 0:.0f}   {verdict}")
                mid = find(rows, method, "auth", wire, c, section=SECTION)
                if mid and mid.p50_ms is not None and mid.rps:
                    lines.append(f"[auth ]   of which OAuth alone (auth vs open): p50"
                                 f" {mid.p50_ms - off.p50_ms:+.2f} ms, req/s x{mid.rps / off.rps:.2f}; the policy"
                                 f" (auth+pol vs auth): p50 {on.p50_ms - mid.p50_ms:+.2f} ms, req/s"
                                 f" x{on.rps / mid.rps:.2f}; processor CPU us/request {off.proc_us or 0:.0f} open,"
                                 f" {mid.proc_us or 0:.0f} auth, {on.proc_us or 0:.0f} auth+pol; Envoy"
                                 f" {off.envoy_us or 0:.0f}, {mid.envoy_us or 0:.0f}, {on.envoy_us or 0:.0f}")
    return lines
