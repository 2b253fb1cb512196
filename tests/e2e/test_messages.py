"""ext_proc messages per request kind, both eras, through real Envoy (its own ext_proc counters).

Every request costs the processor one message for the request: the body (its headers carried in metadata,
extproc/carried.py), or the headers for a request without a body (GET, DELETE). An answer costs one stream and
one message more only in an answer case (envoy_config.ANSWER_CASES): here, the URIs of a server that offers
resources (`prom`) are mapped back. `fast` offers tools only, so its answers need nothing.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx2
import pytest

from bench.stacks import fast_upstream
from tests.gateway_harness import Gateway, start_gateway
from tests.procs import start_demo_server

MODERN = "2026-07-28"
HANDSHAKE = "2025-11-25"
ACCEPT = {"accept": "application/json, text/event-stream", "content-type": "application/json"}
ENVELOPE = {"io.modelcontextprotocol/protocolVersion": MODERN, "io.modelcontextprotocol/clientCapabilities": {}}
N = 3


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    with fast_upstream("fast") as fast, start_demo_server("prometheus", name="prom", json_response=True) as prom, \
            start_gateway(tmp_path_factory.mktemp("messages"), {"fast": fast.url, "prom": prom.url},
                          prefixMode="always") as gw:  # names: x_fast_echo, x_prom_list_alerts, ...
        gw.wait_for(lambda: all(s["state"] == "Connected" for s in gw.status()["servers"])
                    and len(gw.status()["servers"]) == 2, what="both servers connected")
        yield gw


def cost(gw: Gateway, send: Any) -> tuple[int, int, int]:
    """(HTTP requests, ext_proc streams, ext_proc messages) that N sends of one request cost."""
    send()  # warm: the first call of a kind may open upstream sessions
    before = gw.processor_traffic()
    for _ in range(N):
        send()
    requests, streams, messages = (b - a for a, b in zip(before, gw.processor_traffic(), strict=True))
    return requests, streams, messages


def modern(gw: Gateway, method: str, params: dict[str, Any] | None = None, name: str = "",
           notification: bool = False) -> httpx2.Response:
    body: dict[str, Any] = {"jsonrpc": "2.0", "method": method, "params": {**(params or {}), "_meta": ENVELOPE}}
    if not notification:
        body["id"] = 7
    headers = {**ACCEPT, "mcp-protocol-version": MODERN, "mcp-method": method}
    if name:
        headers["mcp-name"] = name
    resp = httpx2.post(gw.url, content=json.dumps(body), headers=headers, timeout=30)
    assert resp.status_code == (202 if notification else 200), resp.text
    assert notification or "result" in resp.json(), resp.text
    return resp


class Legacy:
    """A handshake-era session at the gateway."""

    def __init__(self, gw: Gateway) -> None:
        self.gw = gw
        self.http = httpx2.Client(timeout=30, headers=ACCEPT)
        self.session = ""

    def initialize(self) -> None:
        init = {"jsonrpc": "2.0", "id": 0, "method": "initialize", "params": {
            "protocolVersion": HANDSHAKE, "capabilities": {}, "clientInfo": {"name": "messages", "version": "1"}}}
        resp = self.http.post(self.gw.url, content=json.dumps(init), headers={"mcp-session-id": ""})
        assert resp.status_code == 200, resp.text
        self.session = resp.headers["mcp-session-id"]
        self.http.headers.update({"mcp-session-id": self.session, "mcp-protocol-version": HANDSHAKE})

    def send(self, method: str, params: dict[str, Any] | None = None, notification: bool = False) -> None:
        body: dict[str, Any] = {"jsonrpc": "2.0", "method": method, "params": params or {}}
        if not notification:
            body["id"] = 9
        resp = self.http.post(self.gw.url, content=json.dumps(body))
        assert resp.status_code == (202 if notification else 200), resp.text
        assert notification or "result" in resp.json(), resp.text


def listen(legacy: Legacy) -> None:
    """Opens the session's notification stream (served by the processor's notify listener) and leaves it."""
    with legacy.http.stream("GET", legacy.gw.url, headers={"accept": "text/event-stream"}) as resp:
        assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/event-stream")


def test_modern_wire_one_message_per_request(gw: Gateway) -> None:
    counts = {
        "server/discover": cost(gw, lambda: modern(gw, "server/discover")),
        "tools/list": cost(gw, lambda: modern(gw, "tools/list")),
        "notification": cost(gw, lambda: modern(gw, "notifications/progress",
                                                {"progressToken": "t", "progress": 1}, notification=True)),
        "tools/call": cost(gw, lambda: modern(gw, "tools/call", {"name": "x_fast_echo", "arguments": {"text": "hi"}},
                                              name="x_fast_echo")),
        # prom offers resources: its answers carry URIs to map back (an answer case: one stream more)
        "tools/call (URIs to map)": cost(gw, lambda: modern(gw, "tools/call", {"name": "x_prom_list_alerts",
                                                                               "arguments": {}},
                                                            name="x_prom_list_alerts")),
        "prompts/get": cost(gw, lambda: modern(gw, "prompts/get", {"name": "x_prom_investigate_alert",
                                                                  "arguments": {"alert": "a"}},
                                               name="x_prom_investigate_alert")),
        "resources/read": cost(gw, lambda: modern(gw, "resources/read", {"uri": resource_uri(gw)},
                                                  name=resource_uri(gw))),
    }
    one = (N, N, N)
    answered = (N, 2 * N, 2 * N)
    assert counts == {"server/discover": one, "tools/list": one, "notification": one,
                      "tools/call": one, "tools/call (URIs to map)": answered, "prompts/get": answered,
                      "resources/read": answered}, counts


def test_handshake_era_one_message_per_request(gw: Gateway) -> None:
    legacy = Legacy(gw)
    legacy.initialize()
    counts = {
        "initialize": cost(gw, legacy.initialize),
        "notifications/initialized": cost(gw, lambda: legacy.send("notifications/initialized", notification=True)),
        "tools/list": cost(gw, lambda: legacy.send("tools/list")),
        "ping": cost(gw, lambda: legacy.send("ping")),
        "tools/call": cost(gw, lambda: legacy.send("tools/call", {"name": "x_fast_echo", "arguments": {"text": "x"}})),
        "prompts/get": cost(gw, lambda: legacy.send("prompts/get", {"name": "x_prom_investigate_alert",
                                                                   "arguments": {"alert": "a"}})),
        "resources/read": cost(gw, lambda: legacy.send("resources/read", {"uri": resource_uri(gw)})),
        "GET (the notification stream)": cost(gw, lambda: listen(legacy)),
    }
    one = (N, N, N)
    answered = (N, 2 * N, 2 * N)
    assert counts == {"initialize": one, "notifications/initialized": one, "tools/list": one, "ping": one,
                      "tools/call": one, "prompts/get": answered, "resources/read": answered,
                      "GET (the notification stream)": one}, counts

    def end() -> None:
        legacy.initialize()
        assert legacy.http.delete(gw.url).status_code == 200

    # each DELETE follows an initialize: one message each (the body of the one, the headers of the other)
    assert cost(gw, end) == (2 * N, 2 * N, 2 * N)


def test_a_forged_routing_header_never_routes(gw: Gateway) -> None:
    """headers_in strips the routing headers a client sends (the processor cannot: it sees no headers message)."""
    body = {"jsonrpc": "2.0", "id": 1, "method": "tools/call",
            "params": {"name": "nope", "arguments": {}, "_meta": ENVELOPE}}
    headers = {**ACCEPT, "mcp-protocol-version": MODERN, "mcp-method": "tools/call", "mcp-name": "nope",
               "x-muster-edge-cluster": "mcp.fast", "x-muster-edge-retry": "1"}
    resp = httpx2.post(gw.url, content=json.dumps(body), headers=headers, timeout=30)
    assert "error" in resp.json() and resp.json()["id"] == 1, resp.text
    # a POST that never reaches the processor (an empty body) is not routed either
    resp = httpx2.post(gw.url, content=b"", headers={**headers, "content-length": "0"}, timeout=30)
    assert "error" in resp.json(), resp.text


_uri: list[str] = []


def resource_uri(gw: Gateway) -> str:
    """prom's resource as the gateway exposes it (read once from resources/list)."""
    if not _uri:
        listed = modern(gw, "resources/list").json()["result"]["resources"]
        _uri.append(next(r["uri"] for r in listed if "targets" in r["uri"]))
    return _uri[0]


def test_the_headers_reach_the_processor_from_metadata(gw: Gateway, tmp_path: Path) -> None:
    """What the checks read comes through: Host/Origin (403), Accept (406), Content-Type (415), header/body
    agreement (Mcp-Name), the session id (404 for an unknown one)."""
    body = json.dumps({"jsonrpc": "2.0", "id": 3, "method": "tools/list", "params": {"_meta": ENVELOPE}})
    base = {**ACCEPT, "mcp-protocol-version": MODERN, "mcp-method": "tools/list"}
    assert httpx2.post(gw.url, content=body, headers={**base, "origin": "http://evil.example"}).status_code == 403
    assert httpx2.post(gw.url, content=body, headers={**base, "accept": "application/json"}).status_code == 406
    assert httpx2.post(gw.url, content=body, headers={**base, "content-type": "text/plain"}).status_code == 415
    wrong = httpx2.post(gw.url, content=body, headers={**base, "mcp-method": "tools/call"})
    assert wrong.json()["error"]["code"] != 0 and wrong.status_code == 400, wrong.text
    ping = json.dumps({"jsonrpc": "2.0", "id": 4, "method": "ping"})
    lost = httpx2.post(gw.url, content=ping, headers={**ACCEPT, "mcp-protocol-version": HANDSHAKE,
                                                      "mcp-session-id": "not-a-session"})
    assert lost.status_code == 404, lost.text


def test_a_header_byte_over_127_is_read_as_before(gw: Gateway) -> None:
    """Metadata strings must be UTF-8: headers_in writes such bytes as Latin-1 (a raw 0xff once made the body
    message unparseable: 503)."""
    body = json.dumps({"jsonrpc": "2.0", "id": 5, "method": "tools/call",
                       "params": {"name": "x_fast_echo", "arguments": {"text": "a"}, "_meta": ENVELOPE}})
    headers = {**ACCEPT, "mcp-protocol-version": MODERN, "mcp-method": "tools/call", "mcp-name": "x_fast_echo"}
    for odd in (b"\xff\xfe", "café".encode()):
        resp = httpx2.post(gw.url, content=body, headers={**headers, "x-odd": odd}, timeout=30)  # type: ignore[dict-item]
        assert resp.status_code == 200 and "result" in resp.json(), resp.text
