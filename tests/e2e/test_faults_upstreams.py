"""Faulty upstreams behind the real gateway (issue 9 rows 3, 4, 9, 10): what a client sees, and that calls to
the untouched server keep succeeding. Faults are real processes and sockets on loopback; no mocks."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx2

from tests.gateway_harness import Gateway, start_gateway
from tests.procs import free_port, start_demo_server, stop

MODERN = "2026-07-28"
_META = {"io.modelcontextprotocol/protocolVersion": MODERN, "io.modelcontextprotocol/clientCapabilities": {},
         "io.modelcontextprotocol/clientInfo": {"name": "faults", "version": "1"}}


def rpc(url: str, method: str, params: dict[str, Any] | None = None, msg_id: Any = 1,
        timeout: float = 30) -> tuple[int, dict[str, Any]]:
    """One 2026-07-28 request; (HTTP status, the JSON-RPC message answering `msg_id`)."""
    params = {**(params or {}), "_meta": _META}
    headers = {"accept": "application/json, text/event-stream", "content-type": "application/json",
               "mcp-protocol-version": MODERN, "mcp-method": method}
    name = params.get("name") or params.get("uri")
    if isinstance(name, str):
        headers["mcp-name"] = name
    resp = httpx2.post(url, headers=headers, timeout=timeout,
                       json={"jsonrpc": "2.0", "id": msg_id, "method": method, "params": params})
    if "event-stream" in resp.headers.get("content-type", ""):
        messages = [json.loads(line[5:]) for line in resp.text.splitlines() if line.startswith("data:")]
        answer = next((m for m in messages if "id" in m and ("result" in m or "error" in m)), {})
    else:
        answer = resp.json() if resp.content else {}
    return resp.status_code, answer


def tools(gw: Gateway) -> set[str]:
    status, answer = rpc(gw.url, "tools/list", msg_id="list")
    assert status == 200, answer
    return {t["name"] for t in answer["result"]["tools"]}


def ok_call(gw: Gateway, tool: str, arguments: dict[str, Any], msg_id: Any) -> dict[str, Any]:
    status, answer = rpc(gw.url, "tools/call", {"name": tool, "arguments": arguments}, msg_id)
    assert status == 200 and answer.get("id") == msg_id and "result" in answer, (status, answer)
    assert not answer["result"].get("isError"), answer
    return dict(answer["result"])


def assert_unavailable(status: int, answer: dict[str, Any], server: str, msg_id: Any) -> None:
    assert status in (502, 503, 504), (status, answer)
    assert answer.get("id") == msg_id, answer
    err = answer.get("error") or {}
    assert err.get("code") == -32603, answer
    assert err.get("message", "").startswith(f"Upstream server '{server}' "), answer
    assert "Unknown tool" not in err.get("message", ""), answer


def poll(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(Exception):
            if predicate():
                return
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


@contextlib.contextmanager
def hanging_tcp_server() -> Iterator[str]:
    """Accepts TCP connections and never answers (nor closes them)."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(128)
    held: list[socket.socket] = []
    stopping = threading.Event()

    def accept() -> None:
        while not stopping.is_set():
            with contextlib.suppress(OSError):
                conn, _ = srv.accept()
                held.append(conn)

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{srv.getsockname()[1]}/mcp"
    finally:
        stopping.set()
        srv.close()
        for conn in held:
            conn.close()


# ---- row 3: a hung upstream costs a list at most listWaitMs, once -------------------------------------------

def test_hung_upstream_costs_one_list_wait_once(tmp_path: Path) -> None:
    wait_ms = 3000
    with contextlib.ExitStack() as stack:
        k8s = stack.enter_context(start_demo_server("kubernetes", name="kubernetes"))
        hung = stack.enter_context(hanging_tcp_server())
        gw = stack.enter_context(start_gateway(tmp_path, {"kubernetes": k8s.url}, listWaitMs=wait_ms))
        assert "x_kubernetes_get_pods" in tools(gw)
        gw.add_server("hung", hung)
        poll(lambda: gw.server_state("hung") is not None, 10, "the hung server in the catalog")
        durations = []
        for i in range(6):
            started = time.monotonic()
            names = tools(gw)
            durations.append(time.monotonic() - started)
            assert "x_kubernetes_get_pods" in names and not any(n.startswith("x_hung_") for n in names)
            ok_call(gw, "x_kubernetes_get_pods", {}, f"k8s-{i}")
        # the first list may wait for the new server (at most listWaitMs); none after it waits again
        assert durations[0] < wait_ms / 1000 + 2, durations
        assert all(d < wait_ms / 1000 / 2 for d in durations[1:]), durations
        # a call to it is "unavailable", naming it, never "Unknown tool"
        status, answer = rpc(gw.url, "tools/call", {"name": "x_hung_anything", "arguments": {}}, "call-hung")
        assert_unavailable(status, answer, "hung", "call-hung")


# ---- row 4: a cataloged upstream that is down or frozen is "unavailable", never "Unknown tool" ----------------

def test_down_or_frozen_upstream_is_unavailable_not_unknown(tmp_path: Path) -> None:
    port = free_port()
    with contextlib.ExitStack() as stack:
        k8s = stack.enter_context(start_demo_server("kubernetes", name="kubernetes"))
        kube = stack.enter_context(start_demo_server("kubernetes", port=port, name="kube"))
        prom = stack.enter_context(start_demo_server("prometheus", name="prom"))
        gw = stack.enter_context(start_gateway(tmp_path, {
            "kubernetes": k8s.url, "kube": kube.url, "prom": {"url": prom.url, "timeout": 2}}))
        names = tools(gw)
        assert {"x_kube_get_pods", "x_prom_query"} <= names and "x_kube_kubectl_delete" not in names
        _, listed = rpc(gw.url, "resources/list", msg_id="resources")
        targets = next(r["uri"] for r in listed["result"]["resources"] if r["uri"].endswith("prom://prom/targets"))

        # killed: its tools stay listed (stale), calls to them, its prompts and resources are "unavailable"
        stop(kube.process.proc)
        status, answer = rpc(gw.url, "tools/call", {"name": "x_kube_get_pods", "arguments": {}}, "kube-1")
        assert_unavailable(status, answer, "kube", "kube-1")
        poll(lambda: (gw.server_state("kube") or {}).get("stale") is True, 10, "kube stale in the status")
        assert "x_kube_get_pods" in tools(gw)
        for i in range(3):
            status, answer = rpc(gw.url, "tools/call", {"name": "x_kube_get_pods", "arguments": {}}, f"kube-{i + 2}")
            assert_unavailable(status, answer, "kube", f"kube-{i + 2}")
            assert answer["error"]["message"] == "Upstream server 'kube' is unavailable"
        # a tool the policy denies stays unknown, down or not (no denied name leaks)
        status, answer = rpc(gw.url, "tools/call", {"name": "x_kube_kubectl_delete",
                                                    "arguments": {"kind": "pod", "name": "a"}}, "denied")
        assert answer["id"] == "denied" and answer["error"]["code"] == -32602
        assert answer["error"]["message"] == "Unknown tool: x_kube_kubectl_delete"
        ok_call(gw, "x_kubernetes_get_pods", {}, "untouched-1")

        # back on the same port: it recovers on its own
        stack.enter_context(start_demo_server("kubernetes", port=port, name="kube"))
        poll(lambda: "result" in rpc(gw.url, "tools/call", {"name": "x_kube_get_pods", "arguments": {}}, "r")[1],
             15, "kube to recover")

        # frozen: the first call waits its timeout (2 s), then calls fail fast while it stays listed
        os.kill(prom.process.pid, signal.SIGSTOP)
        try:
            status, answer = rpc(gw.url, "tools/call", {"name": "x_prom_query", "arguments": {"promql": "up"}},
                                 "prom-1")
            assert_unavailable(status, answer, "prom", "prom-1")
            for method, params in (("tools/call", {"name": "x_prom_query", "arguments": {"promql": "up"}}),
                                   ("prompts/get", {"name": "x_prom_investigate_alert",
                                                    "arguments": {"alert": "a"}}),
                                   ("resources/read", {"uri": targets})):
                started = time.monotonic()
                status, answer = rpc(gw.url, method, params, f"prom-{method}")
                assert_unavailable(status, answer, "prom", f"prom-{method}")
                assert time.monotonic() - started < 1.5, "a call to a known-frozen server waited again"
            assert "x_prom_query" in tools(gw)
            ok_call(gw, "x_kubernetes_get_pods", {}, "untouched-2")
        finally:
            os.kill(prom.process.pid, signal.SIGCONT)
        poll(lambda: "result" in rpc(gw.url, "tools/call", {"name": "x_prom_query",
                                                            "arguments": {"promql": "up"}}, "r")[1],
             15, "prom to recover")
        ok_call(gw, "x_kubernetes_get_pods", {}, "untouched-3")


# ---- row 9: a new server is listed only once Envoy routes to it --------------------------------------------

def test_new_server_is_listed_only_once_envoy_routes_to_it(tmp_path: Path) -> None:
    with contextlib.ExitStack() as stack:
        k8s = stack.enter_context(start_demo_server("kubernetes", name="kubernetes"))
        prom = stack.enter_context(start_demo_server("prometheus", name="prom"))
        gw = stack.enter_context(start_gateway(tmp_path, {"kubernetes": k8s.url}, processor={"workers": 2}))
        assert "x_kubernetes_get_pods" in tools(gw)
        gw.add_server("prom", prom.url)
        deadline = time.monotonic() + 20
        listed_calls = 0
        i = 0
        while time.monotonic() < deadline and listed_calls < 20:
            i += 1
            ok_call(gw, "x_kubernetes_get_pods", {}, f"k8s-{i}")
            if "x_prom_query" in tools(gw):
                # listed on one worker: from now on every call succeeds, whichever worker takes it
                ok_call(gw, "x_prom_query", {"promql": "up"}, f"prom-{i}")
                listed_calls += 1
        assert listed_calls == 20, "the new server was never listed"


# ---- row 10: a request lost on a closed kept-alive connection is retried once -------------------------------

class DroppingProxy:
    """A TCP proxy in front of an MCP server that, when armed, closes a kept-alive connection (RST) as the next
    request arrives on it, without reading it: the race of an upstream closing an idle connection."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.armed: bytes | None = None  # drop the next request on a reused connection that holds these bytes
        self.dropped = 0
        self.lock = threading.Lock()
        self.srv = socket.socket()
        self.srv.bind(("127.0.0.1", 0))
        self.srv.listen(128)
        self.port = self.srv.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.srv.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def arm(self, marker: bytes = b"") -> None:
        with self.lock:
            self.armed = marker

    def _take_drop(self, request: bytes) -> bool:
        with self.lock:
            if self.armed is not None and self.armed in request:
                self.armed = None
                self.dropped += 1
                return True
            return False

    def _serve(self, down: socket.socket) -> None:
        up = socket.create_connection(("127.0.0.1", self.target_port))

        def pump_back() -> None:
            with contextlib.suppress(OSError):
                while data := up.recv(65536):
                    down.sendall(data)
            with contextlib.suppress(OSError):
                down.shutdown(socket.SHUT_WR)

        threading.Thread(target=pump_back, daemon=True).start()
        requests = 0
        body_left = 0
        head = b""
        try:
            while data := down.recv(65536, socket.MSG_PEEK):
                if body_left == 0 and not head and requests >= 1 and self._take_drop(data):
                    down.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
                    down.close()
                    up.close()
                    return
                data = down.recv(65536)
                up.sendall(data)
                while data:
                    if body_left:
                        used = min(body_left, len(data))
                        body_left -= used
                        data = data[used:]
                        continue
                    head += data
                    data = b""
                    if b"\r\n\r\n" in head:
                        head, _, data = head.partition(b"\r\n\r\n")
                        requests += 1
                        for line in head.split(b"\r\n"):
                            if line.lower().startswith(b"content-length:"):
                                body_left = int(line.split(b":", 1)[1])
                        head = b""
        except OSError:
            pass
        finally:
            with contextlib.suppress(OSError):
                up.close()
            with contextlib.suppress(OSError):
                down.close()

    def close(self) -> None:
        self.srv.close()


def envoy_stat(gw: Gateway, name: str) -> int:
    with urllib.request.urlopen(f"{gw.admin_url}/stats?filter={name}$", timeout=5) as resp:
        lines = [ln for ln in resp.read().decode().splitlines() if ln.startswith(name + ":")]
    return int(lines[0].split(": ")[1]) if lines else 0


def test_request_lost_on_closed_keepalive_connection_is_retried(tmp_path: Path) -> None:
    with contextlib.ExitStack() as stack:
        k8s = stack.enter_context(start_demo_server("kubernetes", name="kubernetes"))
        prom = stack.enter_context(start_demo_server("prometheus", name="prom", json_response=True))
        proxy = DroppingProxy(prom.port)
        stack.callback(proxy.close)
        gw = stack.enter_context(start_gateway(tmp_path, {"kubernetes": k8s.url,
                                                          "prom": f"http://127.0.0.1:{proxy.port}/mcp"}))
        assert "x_prom_query" in tools(gw)
        for i in range(40):
            if i % 4 == 0:
                proxy.arm()
            ok_call(gw, "x_prom_query", {"promql": f"up{i}"}, f"prom-{i}")  # read-only: resent once
            ok_call(gw, "x_kubernetes_get_pods", {}, f"k8s-{i}")
        assert proxy.dropped >= 3, proxy.dropped
        assert envoy_stat(gw, "cluster.mcp.prom.upstream_rq_retry_success") >= 1


def test_a_call_that_may_have_run_is_not_resent(tmp_path: Path) -> None:
    """toggle_beta declares no hints (not read-only, not idempotent): lost on a reset connection, it is not sent
    again; the client gets an error naming the server, with its own id."""
    with contextlib.ExitStack() as stack:
        k8s = stack.enter_context(start_demo_server("kubernetes", name="kubernetes"))
        vendor = stack.enter_context(start_demo_server("vendor", name="vendor", json_response=True))
        proxy = DroppingProxy(vendor.port)
        stack.callback(proxy.close)
        gw = stack.enter_context(start_gateway(tmp_path, {"kubernetes": k8s.url,
                                                          "vendor": f"http://127.0.0.1:{proxy.port}/mcp"}))
        assert "x_vendor_toggle_beta" in tools(gw)
        proxy.arm(b"toggle_beta")
        failed: list[tuple[int, dict[str, Any]]] = []
        for i in range(30):
            status, answer = rpc(gw.url, "tools/call", {"name": "x_vendor_toggle_beta", "arguments": {}}, f"t-{i}")
            if "error" in answer:
                assert_unavailable(status, answer, "vendor", f"t-{i}")
                failed.append((status, answer))
            ok_call(gw, "x_kubernetes_get_pods", {}, f"k8s-{i}")
            if proxy.dropped:
                break
        assert proxy.dropped == 1 and len(failed) == 1, (proxy.dropped, failed)
        assert envoy_stat(gw, "cluster.mcp.vendor.upstream_rq_retry") == 0
        poll(lambda: "result" in rpc(gw.url, "tools/call", {"name": "x_vendor_echo", "arguments": {"text": "a"}},
                                     "after")[1], 10, "vendor to answer again")
