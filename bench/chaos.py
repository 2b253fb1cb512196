"""The chaos run (issue 9): the gateway under steady load while its parts and its upstreams are broken on purpose.

    .venv/bin/python -m bench.chaos                 # 10 minutes
    .venv/bin/python -m bench.chaos --minutes 2     # a shorter run

`muster-edge run` with 2 processor workers in front of 3 fast upstreams (each its own process); 8 clients
(4 on the 2026-07-28 wire, 4 in the handshake era with a session each) call every upstream's tool in turn,
closed loop. Meanwhile a processor worker is SIGKILLed every minute (alternating), an upstream is restarted
(SIGKILL, then started again on the same port) every 90 s, and a manifest is edited every 30 s.

Every call ends as one of: ok; failed cleanly (a JSON-RPC error with the client's id or, when nothing read
the body, id null, with a message; or a tool result with isError); failed uncleanly (an empty or non-JSON
5xx, a connection reset, a wrong id, or no answer within 30 s). Printed: the three counts, the time to recover
after each fault, and each worker's RSS over the run. Targets: 0 unclean; recovery < 1 s after a worker is
killed, < 3 s after an upstream restarts; RSS flat after warm-up.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx2

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import procstat
from bench.wire import CLIENT_INFO, ENVELOPE, LEGACY_VERSION, MODERN
from tests.gateway_harness import Gateway, manifest, start_gateway
from tests.procs import PYTHON, ROOT, Spawned, spawn

UPSTREAMS = ("s1", "s2", "s3")
ACCEPT = {"accept": "application/json, text/event-stream", "content-type": "application/json"}
CALL_TIMEOUT_S = 30.0


# ---- the upstreams -------------------------------------------------------------------------------------------


@contextlib.contextmanager
def upstream_process(name: str, port: int) -> Iterator[Spawned]:
    with spawn([PYTHON, "-m", "bench.fast_upstream", "--port", str(port), "--name", name, "--tools", "3"],
               "READY ", 20, cwd=ROOT) as proc:
        yield proc


class Upstreams:
    """The 3 upstreams, each restartable on its own port."""

    def __init__(self, stack: contextlib.ExitStack) -> None:
        self.stack = stack
        self.procs: dict[str, Spawned] = {}
        self.ports: dict[str, int] = {}
        self.exits: dict[str, contextlib.ExitStack] = {}

    def start(self, name: str) -> None:
        inner = contextlib.ExitStack()
        proc = inner.enter_context(upstream_process(name, self.ports.get(name, 0)))
        self.ports[name] = int(proc.ready_line.split(" ", 1)[1].rsplit(":", 1)[1].split("/", 1)[0])
        self.procs[name], self.exits[name] = proc, inner
        self.stack.callback(inner.close)

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.ports[name]}/mcp"

    def restart(self, name: str) -> None:
        os.kill(self.procs[name].proc.pid, signal.SIGKILL)
        self.exits[name].close()
        for _ in range(50):  # the port may take a moment to be free again
            try:
                self.start(name)
                return
            except Exception:
                time.sleep(0.1)
        raise RuntimeError(f"upstream {name} did not come back")


# ---- the clients ---------------------------------------------------------------------------------------------


@dataclass
class Tally:
    ok: int = 0
    clean: int = 0
    unclean: int = 0
    unclean_samples: list[str] = field(default_factory=list)
    # (time, server, outcome) of every call that did not succeed, and the last ok time per server
    failures: list[tuple[float, str, str]] = field(default_factory=list)
    ok_times: dict[str, list[float]] = field(default_factory=dict)
    messages: Counter[str] = field(default_factory=Counter)

    def record(self, server: str, outcome: str, detail: str = "") -> None:
        if outcome == "clean":
            self.messages[detail] += 1
        now = time.monotonic()
        if outcome == "ok":
            self.ok += 1
            self.ok_times.setdefault(server, []).append(now)
            return
        if outcome == "clean":
            self.clean += 1
        else:
            self.unclean += 1
            if len(self.unclean_samples) < 10:
                self.unclean_samples.append(detail)
        self.failures.append((now, server, outcome))


def answer_of(resp: httpx2.Response) -> Any:
    """The JSON-RPC message of an answer (JSON, or the last message event of an SSE stream)."""
    if "text/event-stream" in resp.headers.get("content-type", ""):
        found = None
        for line in resp.text.splitlines():
            if line.startswith("data:"):
                with contextlib.suppress(ValueError):
                    doc = json.loads(line[5:])
                    if isinstance(doc, dict) and ("result" in doc or "error" in doc):
                        found = doc
        return found
    return resp.json()


def classify(resp: httpx2.Response, msg_id: Any) -> tuple[str, str]:
    try:
        doc = answer_of(resp)
    except ValueError:
        return "unclean", f"HTTP {resp.status_code} {resp.text[:120]!r}"
    if not isinstance(doc, dict):
        return "unclean", f"HTTP {resp.status_code} no JSON-RPC answer {resp.text[:120]!r}"
    if "result" in doc and doc.get("id") == msg_id:
        result = doc["result"]
        if result.get("isError"):
            text = next((c.get("text", "") for c in result.get("content", []) if isinstance(c, dict)), "")
            return "clean", f"tool result isError: {text[:100]}"
        return "ok", ""
    error = doc.get("error")
    if isinstance(error, dict) and error.get("message") and doc.get("id") in (msg_id, None):
        who = "id null" if doc.get("id") is None else "own id"
        return "clean", f"HTTP {resp.status_code} {error['message'][:100]} ({who})"
    return "unclean", f"HTTP {resp.status_code} {resp.text[:160]!r}"


class Client:
    """One closed-loop caller on one wire."""

    def __init__(self, url: str, era: str, n: int, tally: Tally) -> None:
        self.url, self.era, self.n, self.tally = url, era, n, tally
        self.session = ""
        self.i = 0

    async def _handshake(self, http: httpx2.AsyncClient) -> None:
        self.session = ""
        body = {"jsonrpc": "2.0", "id": f"init-{self.n}", "method": "initialize", "params": {
            "protocolVersion": LEGACY_VERSION, "capabilities": {}, "clientInfo": CLIENT_INFO}}
        resp = await http.post(self.url, json=body, headers=ACCEPT)
        sid = resp.headers.get("mcp-session-id", "")
        if resp.status_code != 200 or not sid:
            raise RuntimeError(f"initialize: HTTP {resp.status_code}")
        headers = {**ACCEPT, "mcp-session-id": sid, "mcp-protocol-version": LEGACY_VERSION}
        await http.post(self.url, json={"jsonrpc": "2.0", "method": "notifications/initialized"}, headers=headers)
        self.session = sid

    def _request(self, server: str, msg_id: str) -> tuple[dict[str, Any], dict[str, str]]:
        tool = f"x_{server}_echo"
        params: dict[str, Any] = {"name": tool, "arguments": {"text": msg_id}}
        if self.era == MODERN:
            return ({"jsonrpc": "2.0", "id": msg_id, "method": "tools/call", "params": {**params, "_meta": ENVELOPE}},
                    {**ACCEPT, "mcp-protocol-version": MODERN, "mcp-method": "tools/call", "mcp-name": tool})
        return ({"jsonrpc": "2.0", "id": msg_id, "method": "tools/call", "params": params},
                {**ACCEPT, "mcp-session-id": self.session, "mcp-protocol-version": LEGACY_VERSION})

    async def run(self, stop: asyncio.Event) -> None:
        async with httpx2.AsyncClient(timeout=CALL_TIMEOUT_S) as http:
            while not stop.is_set():
                if self.era != MODERN and not self.session:
                    try:
                        await self._handshake(http)
                    except Exception:
                        await asyncio.sleep(0.2)  # counted on the calls, not on the handshake
                        continue
                self.i += 1
                server = UPSTREAMS[self.i % len(UPSTREAMS)]
                msg_id = f"{self.era}-{self.n}-{self.i}"
                body, headers = self._request(server, msg_id)
                try:
                    resp = await http.post(self.url, json=body, headers=headers)
                except Exception as exc:
                    self.tally.record(server, "unclean", f"{server}: {exc!r}")
                    continue
                if self.era != MODERN and resp.status_code in (400, 404) and "session" in resp.text.lower():
                    self.session = ""  # the session is gone (an answer the client must act on)
                outcome, detail = classify(resp, msg_id)
                self.tally.record(server, outcome, detail)


# ---- faults and measurements --------------------------------------------------------------------------------


def supervisor_state(gw: Gateway) -> dict[str, Any]:
    return dict(json.loads((gw.config_path.parent / "state" / "supervisor.json").read_text()))


def worker_pids(gw: Gateway) -> dict[str, int]:
    return {p["name"]: int(p["pid"]) for p in supervisor_state(gw)["processes"]
            if p["name"].startswith("processor") and p["pid"]}


def healthz(gw: Gateway, worker: int) -> bool:
    host, port = gw.config["processor"]["status"].rsplit(":", 1)
    try:
        with urllib.request.urlopen(f"http://{host}:{int(port) + worker}/healthz", timeout=0.5) as resp:
            return bool(resp.status == 200)
    except OSError:
        return False


@dataclass
class Fault:
    at: float
    kind: str
    target: str
    back_after: float | None = None  # the part itself is back (worker healthy / upstream answering)
    recovered_after: float | None = None  # calls succeed again (after the last failure the fault caused)
    failures: int = 0


def settle(faults: list[Fault], tally: Tally, window_s: float = 10.0) -> None:
    """Calls ok again after a fault: the time from the fault to the last failure in its window (10 s, or up to
    the next fault; 0 if none), for an upstream to the first ok call to it after its last failure."""
    for i, fault in enumerate(faults):
        end = min([fault.at + window_s, *(f.at for f in faults[i + 1:i + 2])])
        hits = [t for t, server, _ in tally.failures if fault.at <= t < end
                and (fault.kind != "upstream" or server == fault.target)]
        fault.failures = len(hits)
        if fault.kind == "upstream":
            last = max(hits, default=fault.at)
            oks = [t for t in tally.ok_times.get(fault.target, []) if t > last]
            fault.recovered_after = (min(oks) - fault.at) if oks else None
        else:
            fault.recovered_after = (max(hits) - fault.at) if hits else 0.0


async def chaos(minutes: float, work: Path) -> int:
    with contextlib.ExitStack() as stack:
        ups = Upstreams(stack)
        for name in UPSTREAMS:
            ups.start(name)
        gw = stack.enter_context(start_gateway(work, {n: ups.url(n) for n in UPSTREAMS}, processor={"workers": 2},
                                               listTtlFloorMs=1000))
        print(f"gateway {gw.url}; 2 workers; upstreams {', '.join(UPSTREAMS)}; {minutes:g} min", flush=True)
        tally, stop = Tally(), asyncio.Event()
        clients = [Client(gw.url, MODERN if n < 4 else "legacy", n, tally) for n in range(8)]
        load = asyncio.gather(*(c.run(stop) for c in clients))
        start = time.monotonic()
        end = start + minutes * 60
        faults: list[Fault] = []
        rss: dict[str, list[tuple[float, int]]] = {"processor 0": [], "processor 1": []}
        # every 60 s / 90 s / 30 s, offset so that no two faults ever land together (50+60k, 90k, 15+30k)
        next_kill, next_upstream, next_edit, next_rss = start + 50, start + 90, start + 15, start
        kills = edits = restarts = 0
        pending: list[Fault] = []
        while time.monotonic() < end:
            await asyncio.sleep(0.05)
            now = time.monotonic()
            if now >= next_rss:
                next_rss += 5
                for name, pid in worker_pids(gw).items():
                    kb = procstat._status_kb(pid, "VmRSS")
                    if kb:
                        rss[name].append((now - start, kb))
            if now >= next_kill:
                next_kill += 60
                name = f"processor {kills % 2}"
                kills += 1
                os.kill(worker_pids(gw)[name], signal.SIGKILL)
                fault = Fault(time.monotonic(), "worker", name)
                faults.append(fault)
                pending.append(fault)
                print(f"{now - start:6.1f}s  SIGKILL {name}", flush=True)
            if now >= next_upstream:
                next_upstream += 90
                name = UPSTREAMS[restarts % len(UPSTREAMS)]
                restarts += 1
                fault = Fault(time.monotonic(), "upstream", name)
                await asyncio.to_thread(ups.restart, name)
                fault.back_after = time.monotonic() - fault.at
                faults.append(fault)
                print(f"{now - start:6.1f}s  restarted upstream {name}", flush=True)
            if now >= next_edit:
                next_edit += 30
                edits += 1
                target = UPSTREAMS[edits % len(UPSTREAMS)]
                gw.write_manifest(f"{target}.yaml", [manifest(target, ups.url(target), timeout=30 + edits % 2)])
                faults.append(Fault(time.monotonic(), "manifest", target))
                print(f"{now - start:6.1f}s  edited manifest {target}", flush=True)
            for fault in list(pending):
                if healthz(gw, int(fault.target.rsplit(" ", 1)[1])) and \
                        next((p for p in supervisor_state(gw)["processes"] if p["name"] == fault.target),
                             {}).get("state") == "Running":
                    fault.back_after = time.monotonic() - fault.at
                    pending.remove(fault)
        stop.set()
        await asyncio.wait_for(load, CALL_TIMEOUT_S + 5)
        settle(faults, tally)
        report(tally, faults, rss, minutes)
        log = gw.log()
        print(f"\nsupervisor: {log.count('restarting it')} restarts logged, "
              f"{log.count('giving up')} give-ups; tracebacks in the gateway log: {log.count('Traceback')}")
        return 0 if tally.unclean == 0 else 1


def report(tally: Tally, faults: list[Fault], rss: dict[str, list[tuple[float, int]]], minutes: float) -> None:
    total = tally.ok + tally.clean + tally.unclean
    print(f"\n== chaos run: {minutes:g} min, 8 clients (4 on {MODERN}, 4 handshake era), 2 workers, 3 upstreams ==")
    print(f"calls: {total}  ok {tally.ok}  failed with a clean JSON-RPC error {tally.clean}  "
          f"failed uncleanly {tally.unclean}")
    for sample in tally.unclean_samples:
        print(f"  unclean: {sample}")
    for message, count in tally.messages.most_common(8):
        print(f"  clean x{count}: {message}")
    print("\nfault                      failed calls  part back after  calls ok again after")
    for f in faults:
        back = f"{f.back_after:.2f} s" if f.back_after is not None else "-"
        rec = f"{f.recovered_after:.2f} s" if f.recovered_after is not None else "never"
        print(f"{f.kind + ' ' + f.target:<26} {f.failures:>12}  {back:>15}  {rec:>20}")
    print("\nworker RSS (MB) every 5 s (a restarted worker starts again from scratch):")
    for name, series in rss.items():
        if series:
            values = " ".join(f"{kb / 1024:.0f}" for _, kb in series)
            print(f"  {name}: {values}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=10.0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="muster-edge-chaos-") as tmp:
        return asyncio.run(chaos(args.minutes, Path(tmp)))


if __name__ == "__main__":
    sys.exit(main())
