"""Rewriting upstream answers: ids, result type, server info, error codes, URIs, and SSE across chunk boundaries."""

from __future__ import annotations

import copy
import random
import re
from typing import Any

import orjson
import pytest

from catalog.view import View
from extproc import jsonrpc
from extproc.replies import ResponsePlan
from extproc.rewrite import (
    SseRewriter,
    Unreadable,
    invalid_answer,
    mapped_error,
    namespaced,
    original_request_id,
    read_answer,
    rewrite_json,
    rewrite_message,
    split_namespaced,
)
from tests.unit.factories import server, snap, view_of

INFO = {"name": "muster-edge", "version": "0.1.0"}


def prefixed_view() -> View:
    return view_of([(server("a"), snap("a", resources=[{"uri": "file:///r"}])), (server("b"), snap("b"))])


def unprefixed_view() -> View:
    return view_of([(server("a"), snap("a", resources=[{"uri": "file:///r"}]))], mode="conditional")


VIEW = prefixed_view()


def plan(**kw: Any) -> ResponsePlan:
    return ResponsePlan(**{"server": "a", **kw})


def result(res: dict[str, Any], msg_id: Any = "up-1") -> dict[str, Any]:
    return {"jsonrpc": "2.0", "id": msg_id, "result": res}


def rewrite(msg: dict[str, Any], p: ResponsePlan, view: View = VIEW) -> dict[str, Any]:
    return rewrite_message(copy.deepcopy(msg), p, view, INFO)


# ---- ids, result type, server info ------------------------------------------------------------------------------

def test_id_is_restored_when_the_plan_says_so() -> None:
    assert rewrite(result({}), plan(client_id=7, restore_id=True))["id"] == 7
    assert rewrite(result({}), plan(client_id="abc", restore_id=True))["id"] == "abc"


def test_id_is_kept_otherwise() -> None:
    assert rewrite(result({}), plan(client_id=7))["id"] == "up-1"


def test_error_id_is_restored_too() -> None:
    msg = {"jsonrpc": "2.0", "id": "up-1", "error": {"code": -32603, "message": "boom"}}
    assert rewrite(msg, plan(client_id=3, restore_id=True))["id"] == 3


def test_modern_client_gets_result_type_and_server_info() -> None:
    out = rewrite(result({"content": []}), plan(modern_client=True))
    assert out["result"]["resultType"] == "complete"
    assert out["result"]["_meta"] == {jsonrpc.META_SERVER_INFO: INFO}


def test_modern_client_keeps_an_upstream_result_type_and_other_meta() -> None:
    out = rewrite(result({"resultType": "incomplete", "_meta": {"k": 1}}), plan(modern_client=True))
    assert out["result"]["resultType"] == "incomplete"
    assert out["result"]["_meta"] == {"k": 1, jsonrpc.META_SERVER_INFO: INFO}


def test_modern_client_server_info_replaces_the_upstreams() -> None:
    out = rewrite(result({"_meta": {jsonrpc.META_SERVER_INFO: {"name": "upstream"}}}), plan(modern_client=True))
    assert out["result"]["_meta"][jsonrpc.META_SERVER_INFO] == INFO


def test_legacy_client_gets_neither_result_type_nor_server_info() -> None:
    out = rewrite(result({"content": []}), plan())
    assert out["result"] == {"content": []}


def test_legacy_resource_not_found_becomes_invalid_params_for_modern_clients() -> None:
    msg = {"jsonrpc": "2.0", "id": 1, "error": {"code": -32002, "message": "Resource not found", "data": {"u": 1}}}
    out = rewrite(msg, plan(modern_client=True))
    assert out["error"] == {"code": -32602, "message": "Resource not found", "data": {"u": 1}}


def test_legacy_resource_not_found_is_kept_for_legacy_clients() -> None:
    msg = {"jsonrpc": "2.0", "id": 1, "error": {"code": -32002, "message": "Resource not found"}}
    assert rewrite(msg, plan())["error"]["code"] == -32002


@pytest.mark.parametrize("code", [-32601, -32603, -32000, -32020])
def test_other_error_codes_are_kept(code: int) -> None:
    msg = {"jsonrpc": "2.0", "id": 1, "error": {"code": code, "message": "m"}}
    assert rewrite(msg, plan(modern_client=True))["error"]["code"] == code


# ---- URIs --------------------------------------------------------------------------------------------------------

def test_resource_link_and_embedded_resource_uris_are_mapped() -> None:
    msg = result({"content": [
        {"type": "text", "text": "see file:///r", "uri": "file:///r"},
        {"type": "resource_link", "uri": "file:///r", "name": "r"},
        {"type": "resource", "resource": {"uri": "file:///other", "text": "t"}},
    ]})
    content = rewrite(msg, plan(map_uris=True))["result"]["content"]
    assert content[0] == {"type": "text", "text": "see file:///r", "uri": "file:///r"}
    assert content[1]["uri"] == "x+a+file:///r"
    assert content[2]["resource"]["uri"] == "x+a+file:///other"


def test_resources_read_contents_uris_are_mapped() -> None:
    msg = result({"contents": [{"uri": "file:///r", "text": "hi"}, {"uri": "file:///r#2", "blob": "AA=="}]})
    contents = rewrite(msg, plan(map_uris=True))["result"]["contents"]
    assert [c["uri"] for c in contents] == ["x+a+file:///r", "x+a+file:///r#2"]


def test_prompt_message_resources_are_mapped() -> None:
    msg = result({"messages": [{"role": "user", "content": {"type": "resource", "resource": {"uri": "file:///r"}}},
                               {"role": "user", "content": {"type": "resource_link", "uri": "file:///s"}}]})
    messages = rewrite(msg, plan(map_uris=True))["result"]["messages"]
    assert messages[0]["content"]["resource"]["uri"] == "x+a+file:///r"
    assert messages[1]["content"]["uri"] == "x+a+file:///s"


def test_uris_are_mapped_exactly_once() -> None:
    msg = result({"content": [{"type": "resource_link", "uri": "file:///r"}],
                  "contents": [{"uri": "file:///r"}]})
    out = rewrite(msg, plan(map_uris=True))["result"]
    assert out["content"][0]["uri"] == "x+a+file:///r"
    assert out["contents"][0]["uri"] == "x+a+file:///r"


def test_mapped_uris_resolve_back_to_the_upstream() -> None:
    out = rewrite(result({"content": [{"type": "resource_link", "uri": "file:///r"}]}), plan(map_uris=True, server="b"))
    assert VIEW.resolve_uri(out["result"]["content"][0]["uri"]) == ("b", "file:///r")


def test_uris_are_untouched_without_map_uris() -> None:
    msg = result({"content": [{"type": "resource_link", "uri": "file:///r"}], "contents": [{"uri": "file:///r"}]})
    assert rewrite(msg, plan()) == msg


def test_uris_of_an_unprefixed_server_stay_as_they_are() -> None:
    msg = result({"content": [{"type": "resource_link", "uri": "file:///r"}]})
    assert rewrite(msg, plan(map_uris=True), unprefixed_view()) == msg


def test_resources_updated_notification_uri_is_mapped() -> None:
    note = {"jsonrpc": "2.0", "method": "notifications/resources/updated", "params": {"uri": "file:///r"}}
    assert rewrite(note, plan(map_uris=True))["params"]["uri"] == "x+a+file:///r"
    assert rewrite(note, plan())["params"]["uri"] == "file:///r"


def test_other_notifications_are_untouched() -> None:
    note = {"jsonrpc": "2.0", "method": "notifications/message", "params": {"uri": "file:///r", "data": "x"}}
    assert rewrite(note, plan(map_uris=True, modern_client=True, restore_id=True, client_id=1)) == note


def test_server_to_client_request_keeps_its_own_id() -> None:
    req = {"jsonrpc": "2.0", "id": 9, "method": "sampling/createMessage", "params": {}}
    assert rewrite(req, plan(restore_id=True, client_id=1, modern_client=True)) == req


# ---- rewrite_json -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("body", [b"", b"{", b"not json", b"[1,2]", b'"text"', b"42"])
def test_rewrite_json_of_something_that_is_not_an_object_is_none(body: bytes) -> None:
    assert rewrite_json(body, plan(restore_id=True, client_id=1), VIEW, INFO) is None


def test_rewrite_json_rewrites_the_message() -> None:
    body = orjson.dumps(result({"content": [{"type": "resource_link", "uri": "file:///r"}]}))
    out = rewrite_json(body, plan(restore_id=True, client_id=5, map_uris=True, modern_client=True), VIEW, INFO)
    assert out is not None
    msg = orjson.loads(out)
    assert msg["id"] == 5
    assert msg["result"]["content"][0]["uri"] == "x+a+file:///r"
    assert msg["result"]["resultType"] == "complete"


# ---- SSE --------------------------------------------------------------------------------------------------------

def sse_events(stream: bytes) -> list[dict[str, str]]:
    """A WHATWG-conformant reading of an SSE stream (incomplete trailing event discarded)."""
    lines = re.split(r"\r\n|\r|\n", stream.decode())[:-1]
    events: list[dict[str, str]] = []
    data: list[str] = []
    fields: dict[str, str] = {}
    for line in lines:
        if line == "":
            if data:
                events.append({**fields, "data": "\n".join(data)})
            data, fields = [], {}
            continue
        if line.startswith(":"):
            continue
        name, _, value = line.partition(":")
        value = value[1:] if value.startswith(" ") else value
        if name == "data":
            data.append(value)
        else:
            fields[name] = value
    return events


SSE_PLAN = ResponsePlan(server="a", client_id=42, restore_id=True, modern_client=True, map_uris=True)


def upstream_response(n: int) -> bytes:
    return orjson.dumps(result({"content": [{"type": "resource_link", "uri": f"file:///r{n}"}]}, msg_id=f"up-{n}"))


STREAM = b"".join([
    b": keep-alive\n\n",
    b"event: message\nid: 1\ndata: " + upstream_response(1) + b"\n\n",
    b"data: not json at all\n\n",
    b'data: {"jsonrpc":"2.0",\ndata: "method":"notifications/resources/updated",\n'
    b'data: "params":{"uri":"file:///u"}}\n\n',
    b"event: message\r\ndata: " + upstream_response(2) + b"\r\n\r\n",
    b"data:[1,2,3]\n\n",
    b"retry: 1000\n\n",
    b"data: " + upstream_response(3) + b"\n\n",
])


def whole(stream: bytes, p: ResponsePlan = SSE_PLAN) -> bytes:
    return SseRewriter(p, VIEW, INFO).feed(stream, True)


def chunked(stream: bytes, sizes: list[int], p: ResponsePlan = SSE_PLAN) -> bytes:
    rw = SseRewriter(p, VIEW, INFO)
    out, pos = [], 0
    for size in sizes:
        out.append(rw.feed(stream[pos:pos + size], False))
        pos += size
    out.append(rw.feed(stream[pos:], True))
    return b"".join(out)


def test_sse_events_are_rewritten() -> None:
    events = sse_events(whole(STREAM))
    assert [e["data"][:1] for e in events] == ["{", "n", "{", "{", "[", "{"]
    first = orjson.loads(events[0]["data"])
    assert (events[0]["event"], events[0]["id"]) == ("message", "1")
    assert first["id"] == 42
    assert first["result"]["content"][0]["uri"] == "x+a+file:///r1"
    assert first["result"]["resultType"] == "complete"
    assert orjson.loads(events[2]["data"])["params"]["uri"] == "x+a+file:///u"
    assert orjson.loads(events[3]["data"])["result"]["content"][0]["uri"] == "x+a+file:///r2"
    assert orjson.loads(events[5]["data"])["id"] == 42


def test_sse_output_of_a_simple_event_is_exact() -> None:
    body = orjson.dumps({"jsonrpc": "2.0", "id": "up", "result": {}})
    out = whole(b"event: message\ndata: " + body + b"\n\n", ResponsePlan(server="a", client_id=1, restore_id=True))
    assert out == b'event: message\ndata: {"jsonrpc":"2.0","id":1,"result":{}}\n\n'


def test_sse_non_json_and_dataless_events_pass_through_byte_for_byte() -> None:
    stream = b": c\n\ndata: hello\r\n\r\nretry: 5\n\ndata: [1]\n\ndata: {broken\n\nevent: x\ndata:\n\n"
    assert whole(stream) == stream


def test_sse_feeding_byte_by_byte_equals_rewriting_at_once() -> None:
    assert chunked(STREAM, [1] * len(STREAM)) == whole(STREAM)


def test_sse_feeding_random_chunks_equals_rewriting_at_once() -> None:
    rng = random.Random(20260728)
    expected = whole(STREAM)
    for _ in range(300):
        sizes, left = [], len(STREAM)
        while left > 0:
            size = rng.randint(0, min(left, 40))
            sizes.append(size)
            left -= size
        assert chunked(STREAM, sizes) == expected, sizes


@pytest.mark.parametrize("inside", range(5))
def test_sse_crlf_separator_split_anywhere_is_found(inside: int) -> None:
    event = b"data: " + upstream_response(1) + b"\r\n\r\n"
    split = len(event) - 4 + inside
    rw = SseRewriter(SSE_PLAN, VIEW, INFO)
    first = rw.feed(event[:split], False)
    if inside < 4:
        assert first == b""
    else:
        assert first.endswith(b"\r\n\r\n")
    out = first + rw.feed(event[split:], False)
    assert out.endswith(b"\r\n\r\n")
    assert orjson.loads(sse_events(out)[0]["data"])["id"] == 42
    assert rw.feed(b"", True) == b""


def test_sse_incomplete_event_is_held_until_the_end() -> None:
    rw = SseRewriter(SSE_PLAN, VIEW, INFO)
    assert rw.feed(b"data: " + upstream_response(1), False) == b""
    out = rw.feed(b"", True)
    assert orjson.loads(out.removeprefix(b"data: "))["id"] == 42


def test_sse_flush_at_end_of_an_unterminated_non_json_event_is_untouched() -> None:
    rw = SseRewriter(SSE_PLAN, VIEW, INFO)
    assert rw.feed(b"data: partial", False) == b""
    assert rw.feed(b"", True) == b"data: partial"


def test_sse_complete_events_are_released_as_soon_as_their_separator_arrives() -> None:
    rw = SseRewriter(SSE_PLAN, VIEW, INFO)
    first = rw.feed(b"data: " + upstream_response(1) + b"\n\ndata: " + upstream_response(2)[:10], False)
    assert len(sse_events(first)) == 1
    assert orjson.loads(sse_events(first)[0]["data"])["id"] == 42


def test_sse_cr_cr_separator_is_a_boundary() -> None:
    rw = SseRewriter(SSE_PLAN, VIEW, INFO)
    out = rw.feed(b"data: x\r\rdata: y", False)
    assert out == b"data: x\r\r"


def test_sse_event_with_cr_line_endings_is_rewritten() -> None:
    out = whole(b"event: message\rdata: " + upstream_response(1) + b"\r\r")
    assert orjson.loads(sse_events(out)[0]["data"])["id"] == 42


def test_sse_event_ended_by_lf_then_crlf_is_delivered() -> None:
    out = whole(b"data: " + upstream_response(1) + b"\n\r\n")
    events = sse_events(out)
    assert len(events) == 1 and orjson.loads(events[0]["data"])["id"] == 42


# ---- namespaced server-to-client ids -------------------------------------------------------------------------

@pytest.mark.parametrize("msg_id", [9, "s", "a:b", 0])
def test_namespaced_request_id_round_trips(msg_id: Any) -> None:
    raw = orjson.dumps(msg_id).decode()
    split = split_namespaced(namespaced("k8s-a", raw))
    assert split == ("k8s-a", raw)
    assert original_request_id(split[1]) == msg_id


@pytest.mark.parametrize("value", [5, None, "plain", ":x", "a:", ""])
def test_split_namespaced_refuses_what_was_not_namespaced(value: Any) -> None:
    assert split_namespaced(value) is None


@pytest.mark.parametrize("raw", ["true", "null", "1.5", "[1]", "not json"])
def test_original_request_id_keeps_text_that_is_not_an_id(raw: str) -> None:
    assert original_request_id(raw) == raw


def test_server_to_client_request_id_is_namespaced_when_the_plan_says_so() -> None:
    req = {"jsonrpc": "2.0", "id": 9, "method": "elicitation/create", "params": {}}
    assert rewrite(req, plan(namespace="a"))["id"] == "a:9"
    assert rewrite(req | {"id": "s"}, plan(namespace="a"))["id"] == 'a:"s"'


def test_sse_event_ids_are_namespaced_when_the_plan_says_so() -> None:
    out = whole(b"id: 17\ndata: hello\n\n", ResponsePlan(server="a", namespace="a"))
    assert sse_events(out) == [{"id": "a:17", "data": "hello"}]


# ---- answers the gateway cannot read (issue 9 row 5) ----------------------------------------------------------

CHECKED = ResponsePlan(server="bad", client_id="mine", restore_id=True, upstream_id=13948)


def _error_of(body: bytes) -> dict[str, Any]:
    msg = orjson.loads(body)
    assert msg["id"] == "mine" and msg["error"]["data"]["server"] == "bad", msg
    return dict(msg["error"])


@pytest.mark.parametrize(("body", "why"), [
    (b"", "an empty body"), (b"  \n", "an empty body"), (b"<html>", "not JSON"),
    (b'{"jsonrpc": "2.0", "id":', "not JSON"),
    (b"[]", "not a JSON-RPC 2.0 message"), (b'{"id": 13948, "result": {}}', "not a JSON-RPC 2.0 message"),
    (b'{"jsonrpc": "2.0", "id": 13948}', "neither a result nor an error"),
    (b'{"jsonrpc": "2.0", "id": 13948, "error": {"code": "x", "message": 1}}', "a malformed error object"),
    (b'{"jsonrpc": "2.0", "id": 7, "result": {}}', "answered id 7, not the call's"),
    (b'{"jsonrpc": "2.0", "id": "13948", "result": {}}', "answered id \"13948\", not the call's"),
])
def test_an_answer_that_is_not_the_response_to_this_call_is_unreadable(body: bytes, why: str) -> None:
    with pytest.raises(Unreadable, match=re.escape(why)):
        read_answer(body, CHECKED)


def test_the_response_to_this_call_is_read() -> None:
    assert read_answer(b'{"jsonrpc": "2.0", "id": 13948, "result": {"x": 1}}', CHECKED)["result"] == {"x": 1}
    assert read_answer(b'{"jsonrpc": "2.0", "id": 1, "result": {}}', plan())["id"] == 1  # no id to check


def test_an_unreadable_answer_becomes_an_error_naming_the_server_with_the_clients_id() -> None:
    error = _error_of(invalid_answer(CHECKED, "not JSON", 200))
    assert error["code"] == jsonrpc.INTERNAL_ERROR
    assert error["message"] == "Upstream server 'bad' answered with an invalid response"
    assert error["data"] == {"server": "bad", "details": "not JSON", "status": 200}


def test_an_upstream_error_keeps_its_code_and_message_under_the_clients_id() -> None:
    body = b'{"jsonrpc": "2.0", "id": 13948, "error": {"code": -32000, "message": "on fire", "data": [1]}}'
    error = _error_of(mapped_error(body, CHECKED, 500))
    assert error == {"code": -32000, "message": "Upstream server 'bad': on fire",
                     "data": {"server": "bad", "status": 500, "upstream": [1]}}
    assert _error_of(mapped_error(b"oops", CHECKED, 500))["data"]["details"] == "not JSON"
    assert "a result" in _error_of(mapped_error(b'{"jsonrpc": "2.0", "id": 13948, "result": {}}', CHECKED, 500)
                                   )["data"]["details"]


def _events(out: bytes) -> list[dict[str, Any]]:
    return [orjson.loads(ln[6:]) for ln in out.split(b"\n") if ln.startswith(b"data: ") and ln[6:].strip()]


def test_sse_checks_each_event_and_ends_with_an_error_when_the_answer_never_comes() -> None:
    note = b'event: message\ndata: {"jsonrpc":"2.0","method":"notifications/message","params":{}}\n\n'
    answer_ = b'event: message\ndata: {"jsonrpc":"2.0","id":13948,"result":{}}\n\n'
    rw = SseRewriter(CHECKED, VIEW, INFO)
    out = rw.feed(note, False) + rw.feed(b"", True)
    assert _events(out)[0]["method"] == "notifications/message"
    assert "ended without an answer" in _error_of(orjson.dumps(_events(out)[1]))["data"]["details"]
    rw = SseRewriter(CHECKED, VIEW, INFO)
    assert _events(rw.feed(note + answer_, False) + rw.feed(b"", True))[1] == {"jsonrpc": "2.0", "id": "mine",
                                                                            "result": {}}
    rw = SseRewriter(CHECKED, VIEW, INFO)  # a bad event ends the answer: nothing after it is passed on
    out = rw.feed(b"data: {oops\n\n" + answer_, False) + rw.feed(note, True)
    assert len(_events(out)) == 1 and "not a JSON-RPC message" in _error_of(out.split(b"data: ")[1])["data"]["details"]
    rw = SseRewriter(CHECKED, VIEW, INFO)
    out = rw.feed(answer_.replace(b"13948", b"1"), True)
    assert "not the call's" in _error_of(orjson.dumps(_events(out)[0]))["data"]["details"]
    rw = SseRewriter(CHECKED, VIEW, INFO)
    assert "inside an event" in _events(rw.feed(b'data: {"jsonrpc":', True))[0]["error"]["data"]["details"]
