"""Pure logic of the -32020 resend and of cancellation: what is a mismatch, the headers rebuilt from a newer
schema, the ids a cancel names, the bounded tracking of in-flight requests."""

from __future__ import annotations

import json
from typing import Any

from extproc import answer, cancellation, schema_retry
from extproc.answer import Resend
from extproc.replies import Forward, ResponsePlan
from extproc.sessions import Sealer

OLD = [{"name": "lookup", "inputSchema": {"type": "object", "properties": {"region": {"type": "string"}}}}]
NEW = [{"name": "lookup", "inputSchema": {"type": "object", "properties": {
    "region": {"type": "string", "x-mcp-header": "Region"}, "deep": {"type": "object", "properties": {
        "zone": {"type": "integer", "x-mcp-header": "Zone"}}}}}}]


def body(name: str = "lookup", arguments: Any = None, method: str = "tools/call") -> bytes:
    return json.dumps({"jsonrpc": "2.0", "id": 4, "method": method,
                       "params": {"name": name, "arguments": arguments if arguments is not None else
                                  {"region": "eu-west", "deep": {"zone": 3}}}}).encode()


def test_only_a_32020_error_is_a_header_mismatch() -> None:
    assert schema_retry.is_header_mismatch(b'{"jsonrpc":"2.0","id":4,"error":{"code":-32020,"message":"x"}}')
    for other in (b'{"jsonrpc":"2.0","id":4,"error":{"code":-32602,"message":"x"}}', b'{"result":{}}',
                  b"not json", b"[]", b'{"error":"-32020"}'):
        assert not schema_retry.is_header_mismatch(other)


def test_headers_are_rebuilt_from_the_new_schema_and_stale_ones_dropped() -> None:
    sent = {"mcp-method": "tools/call", "mcp-name": "lookup", "mcp-param-stale": "x", "Mcp-Param-Old": "y"}
    rebuilt = schema_retry.rebuilt_headers(sent, body(), NEW)
    assert rebuilt == {"mcp-method": "tools/call", "mcp-name": "lookup", "mcp-param-region": "eu-west",
                       "mcp-param-zone": "3"}
    # a schema without annotations: no Mcp-Param-* at all
    assert schema_retry.rebuilt_headers(sent, body(), OLD) == {"mcp-method": "tools/call", "mcp-name": "lookup"}
    # non-ASCII values travel base64-encoded, as the spec says
    assert schema_retry.rebuilt_headers({}, body(arguments={"region": "é"}), NEW) == {
        "mcp-param-region": "=?base64?w6k=?="}


def test_nothing_to_resend_when_the_tool_is_gone_or_the_body_is_no_tool_call() -> None:
    assert schema_retry.rebuilt_headers({}, body(name="other"), NEW) is None
    assert schema_retry.rebuilt_headers({}, body(method="prompts/get"), NEW) is None
    assert schema_retry.rebuilt_headers({}, b"{", NEW) is None
    assert schema_retry.param_headers_for(NEW, "other", {"region": "x"}) == {}


def test_a_2026_tools_call_carries_its_resend_and_the_flag_the_matcher_reads() -> None:
    sealer = Sealer(bytes(range(32)))
    plan = ResponsePlan(server="srv", client_id=4, resend_on_mismatch=True, subject="alice")
    fwd = Forward("mcp.srv", body(), {}, [], plan)
    meta = answer.metadata(fwd, Resend(body(), {"mcp-name": "lookup"}, "tok"), sealer)
    assert meta[answer.NAMESPACE][answer.ON_MISMATCH] == "1" and answer.ON_401 not in meta[answer.NAMESPACE]
    back = answer.read_plan(meta[answer.NAMESPACE])
    assert back is not None and back.resend_on_mismatch
    resend = answer.read_resend(meta[answer.RESEND_NAMESPACE], back, sealer)
    assert resend is not None and resend.body == body() and resend.bearer == "tok"


async def _noop() -> None:
    return None


def entry(server: str = "srv") -> cancellation.InFlight:
    return cancellation.InFlight(server, 9, "legacy", "owner", "alice", _noop)


def test_a_cancel_finds_its_request_by_session_and_exact_id() -> None:
    tracker = cancellation.Tracker()
    key = tracker.add("s1", 7, entry())
    assert tracker.take("s1", "7") is None  # "7" is not 7
    assert tracker.take("s2", 7) is None  # another session's request
    assert tracker.take("s1", 7) == entry()
    assert tracker.take("s1", 7) is None  # taken once
    first = entry("a")
    key = tracker.add("s1", 8, first)
    tracker.add("s1", 8, entry("b"))  # the id reused by a newer request
    tracker.done(key, first)  # the older stream ending does not forget the newer request
    assert tracker.take("s1", 8) == entry("b")


def test_tracking_is_bounded() -> None:
    tracker = cancellation.Tracker(maxsize=3)
    for i in range(10):
        tracker.add("s", i, entry())
    assert len(tracker) == 3 and tracker.take("s", 0) is None and tracker.take("s", 9) is not None


def test_cancel_params_for_the_upstream() -> None:
    assert cancellation.cancelled_id({"requestId": 3}) == 3
    assert cancellation.cancelled_id({"requestId": "a"}) == "a"
    for bad in ({}, {"requestId": True}, {"requestId": None}, {"requestId": [1]}):
        assert cancellation.cancelled_id(bad) is None
    assert cancellation.upstream_params({"requestId": 3, "reason": "stop"}, 41) == {"requestId": 41, "reason": "stop"}
    assert cancellation.upstream_params({"requestId": 3, "reason": 5}, 41) == {"requestId": 41}
    sent = json.loads(cancellation.cancelled_body(3))
    assert sent == {"jsonrpc": "2.0", "id": 3, "error": {"code": -32800, "message": "Request cancelled by the client"}}
    answers = cancellation.Answers()
    answers.seen("srv", "o", 5)
    assert answers.was_seen("srv", "o", 5) and not answers.was_seen("srv", "o", 5)


def test_family_argument_problems_are_tool_results_listing_the_valid_values() -> None:
    from catalog.view import Route, Target
    from extproc.handlers.calls import ArgumentError, select_target

    members = ["cluster-a-k8s", "cluster-b-k8s"]
    route = Route("x_k8s_get", {m: Target(m, "get", {}) for m in members}, "cluster")
    assert select_target(route, {"cluster": "cluster-b", "q": 1}) == (route.targets["cluster-b-k8s"], {"q": 1})
    for arguments, text in (({}, 'the "cluster" parameter is required'),
                            ({"cluster": "typo"}, 'is not available on server "typo" (available: cluster-a-k8s, '
                                                  'cluster-b-k8s)'),
                            ({"cluster": "cluster"}, '"cluster" matches more than one server')):
        try:
            select_target(route, arguments)
        except ArgumentError as err:
            assert text in err.message and err.code == -32602 and err.data == {"available": members}
            assert err.tool_result() == {"content": [{"type": "text", "text": err.message}], "isError": True,
                                         "structuredContent": {"available": members}}
        else:
            raise AssertionError(f"{arguments} was accepted")
