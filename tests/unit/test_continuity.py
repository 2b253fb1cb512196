"""Continuity's pure parts: what a shared upstream session carries, requestState binding without a store,
the routes and clusters that pin a session to a worker, and a resumable SSE stream that ends before its answer."""

from __future__ import annotations

import re
import secrets
from typing import Any

import pytest
import yaml

from catalog.config import GatewayConfig, parse_config
from catalog.view import build_view
from extproc import envoy_config
from extproc.continuity import Continuity, decode_handshake, encode_handshake, state_key
from extproc.peers import Peers
from extproc.replies import ResponsePlan
from extproc.rewrite import SseRewriter
from extproc.sessions import Sealer, Sessions
from extproc.upstream import Handshake


def test_a_shared_handshake_carries_the_session_never_the_credential() -> None:
    hs = Handshake("legacy", "2025-11-25", "sid-1", {"tools": {}}, server_info={"name": "up"},
                   auth={"authorization": "Bearer secret"})
    raw = encode_handshake(hs)
    assert b"secret" not in raw
    back = decode_handshake(raw, "owner-1")
    assert back is not None
    assert (back.era, back.version, back.session_id, back.capabilities, back.auth, back.shared_owner) == \
        ("legacy", "2025-11-25", "sid-1", {"tools": {}}, {}, "owner-1")
    assert decode_handshake(b"{}", "o") is None and decode_handshake(b"not json", "o") is None


def test_state_keys_are_fixed_size_and_stable() -> None:
    assert state_key({"b": 1, "a": [2]}) == state_key({"a": [2], "b": 1})
    assert state_key("x" * 10_000) != state_key("x")
    assert len(state_key("x" * 10_000)) == 64


async def test_without_a_store_a_request_state_is_bound_to_its_first_caller() -> None:
    c = Continuity("", Sealer(secrets.token_bytes(32)))
    assert not c.shared
    assert await c.bind_state("opaque", "zoe")
    assert await c.bind_state("opaque", "zoe")  # its own caller may present it again
    assert not await c.bind_state("opaque", "yan")
    assert await c.bind_state({"other": 1}, "yan")
    assert await c.get("owner", "server") is None and await c.take_owner("owner") == {}


def config(**raw: Any) -> GatewayConfig:
    processor = {"workers": 2, **raw.pop("processor", {})}
    return parse_config(yaml.safe_dump({"processor": processor, **raw}), "/tmp/gateway.yaml")


def test_session_groups_split_the_id_alphabet_among_workers() -> None:
    for workers in (2, 3, 4, 7):
        groups = [re.compile(g + ".*") for g in envoy_config.session_groups(workers)]
        for first in "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_":
            assert sum(bool(g.fullmatch(first + "rest")) for g in groups) == 1, (workers, first)


def test_sealed_session_ids_start_anywhere_in_the_alphabet() -> None:
    sessions = Sessions(Sealer(secrets.token_bytes(32)))
    firsts = {sessions.mint("s", "2025-11-25")[0][0] for _ in range(2000)}
    assert len(firsts) > 50  # uniform over the 64 characters the groups split


def test_without_a_store_sessions_are_pinned_by_route_to_a_worker_cluster() -> None:
    cfg = config()
    routes = envoy_config.routes(cfg)
    pinned = [r for r in routes if r["name"].startswith("muster_edge_mcp_w")]
    assert [r["name"] for r in pinned] == ["muster_edge_mcp_w0", "muster_edge_mcp_w0_resume",
                                           "muster_edge_mcp_w1", "muster_edge_mcp_w1_resume"]
    names = [r["name"] for r in routes]
    assert names.index("muster_edge_mcp_w1_resume") < names.index("muster_edge_mcp")  # before the unpinned one
    override = pinned[2]["typed_per_filter_config"]["envoy.filters.http.ext_proc"]["overrides"]["grpc_service"]
    assert override["envoy_grpc"]["cluster_name"] == "muster_edge_processor_w1"
    clusters = envoy_config.pinned_clusters(cfg, [50051, 50052])
    endpoints = clusters[1]["load_assignment"]["endpoints"]
    assert [(e["priority"], [x["endpoint"]["address"]["socket_address"]["port_value"] for x in e["lb_endpoints"]])
            for e in endpoints] == [(0, [50052]), (1, [50051])]
    assert clusters[1]["health_checks"]


@pytest.mark.parametrize("raw", [{"store": {"redis": "redis://127.0.0.1:6379/0"}}, {"processor": {"workers": 1}}])
def test_with_a_store_or_one_worker_nothing_is_pinned(raw: dict[str, object]) -> None:
    cfg = config(**raw)
    assert not [r for r in envoy_config.routes(cfg) if r["name"].startswith("muster_edge_mcp_w")]
    assert envoy_config.pinned_clusters(cfg, [50051, 50052]) == []


def sse(plan: ResponsePlan, *events: bytes) -> bytes:
    view = build_view([], {}, prefix="x", mode="always")
    return SseRewriter(plan, view, {"name": "gw"}).feed(b"".join(events), True)


def test_a_resumable_stream_may_end_before_its_answer() -> None:
    plan = ResponsePlan(server="up", client_id=7, upstream_id=7, namespace="up")
    out = sse(plan, b"id: 1\ndata: \nretry: 100\n\n",
              b'id: 2\ndata: {"jsonrpc":"2.0","method":"notifications/message","params":{}}\n\n')
    assert b"invalid response" not in out and b"id: up:2" in out  # the client resumes with Last-Event-ID


def test_a_stream_without_event_ids_that_ends_unanswered_is_an_error() -> None:
    plan = ResponsePlan(server="up", client_id=7, upstream_id=7)
    out = sse(plan, b'data: {"jsonrpc":"2.0","method":"notifications/message","params":{}}\n\n')
    assert b"the stream ended without an answer" in out


def test_sibling_messages_claim_a_request_state_and_forget_a_lost_session() -> None:
    sealer = Sealer(secrets.token_bytes(32))
    peers = Peers(sealer)
    states = Continuity("", sealer)
    lost: list[tuple[str, str, str]] = []

    def handle(msg: dict[str, str]) -> tuple[int, bytes]:
        return peers.handle(peers._seal(msg), lambda _e, _r: None, lambda n: n,
                            lambda *a: lost.append(a), lambda k, c: states.claim_here(k, c)[0])

    assert handle({"op": "claim", "key": "k1", "caller": "zoe"}) == (200, b'"zoe"')
    assert handle({"op": "claim", "key": "k1", "caller": "yan"}) == (200, b'"zoe"')  # the first holder stays
    assert handle({"op": "lost", "server": "up", "owner": "ab", "subject": "zoe"}) == (200, b"[]")
    assert lost == [("up", "ab", "zoe")]
    forged = peers.handle(b"not-sealed", lambda _e, _r: None, lambda n: n)
    assert forged[0] == 403
