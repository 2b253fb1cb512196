"""JSON-RPC for both MCP eras: parsing, the classify ladder, HTTP status per era, and the routing-header codec."""

from __future__ import annotations

import base64
from typing import Any

import orjson
import pytest
from mcp.shared.inbound import decode_header_value as sdk_decode
from mcp.shared.inbound import encode_header_value as sdk_encode

from extproc import jsonrpc
from extproc.jsonrpc import (
    HANDSHAKE_VERSIONS,
    HEADER_MISMATCH,
    INTERNAL_ERROR,
    INVALID_PARAMS,
    INVALID_REQUEST,
    LATEST_MODERN,
    LEGACY,
    META_CAPABILITIES,
    META_VERSION,
    METHOD_NOT_FOUND,
    MODERN,
    PARSE_ERROR,
    UNSUPPORTED_VERSION,
    RpcError,
    check_param_headers,
    classify,
    decode_header_value,
    encode_header_value,
    param_headers,
)


def rpc_error(fn: Any, *args: Any) -> RpcError:
    with pytest.raises(RpcError) as exc:
        fn(*args)
    return exc.value


def request(method: str = "tools/list", params: dict[str, Any] | None = None, **extra: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"jsonrpc": "2.0", "id": 1, "method": method}
    if params is not None:
        body["params"] = params
    body.update(extra)
    return body


def envelope(version: str = LATEST_MODERN, **more: Any) -> dict[str, Any]:
    return {META_VERSION: version, META_CAPABILITIES: {}, **more}


def modern_headers(method: str = "tools/list", version: str = LATEST_MODERN, **more: str) -> dict[str, str]:
    return {"mcp-protocol-version": version, "mcp-method": method, **more}


# ---- parse ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("body", [b"", b"{", b"{'a': 1}", b"\xff\xfe", b'{"a":1}x', b"nul"])
def test_parse_error_is_32700(body: bytes) -> None:
    err = rpc_error(jsonrpc.parse, body)
    assert err.code == PARSE_ERROR and err.message.startswith("Parse error")


def test_parse_returns_the_object() -> None:
    assert jsonrpc.parse(b'{"jsonrpc":"2.0","id":1,"method":"ping"}') == {"jsonrpc": "2.0", "id": 1, "method": "ping"}


# ---- classify: shape -------------------------------------------------------------------------------------------

def test_batch_is_invalid_request() -> None:
    err = rpc_error(classify, [request()], {})
    assert err.code == INVALID_REQUEST and "batch" in err.message


def test_empty_batch_is_invalid_request() -> None:
    assert rpc_error(classify, [], {}).code == INVALID_REQUEST


@pytest.mark.parametrize("obj", ["tools/list", 5, None, True, {"id": 1, "method": "ping"},
                                 {"jsonrpc": "1.0", "id": 1, "method": "ping"}])
def test_non_object_or_wrong_version_is_invalid_request(obj: Any) -> None:
    assert rpc_error(classify, obj, {}).code == INVALID_REQUEST


@pytest.mark.parametrize("obj", [
    {"jsonrpc": "2.0", "id": 1},
    {"jsonrpc": "2.0", "id": 1, "method": ""},
    {"jsonrpc": "2.0", "id": 1, "method": 5},
    {"jsonrpc": "2.0", "id": None, "method": "ping"},
    {"jsonrpc": "2.0", "id": True, "method": "ping"},
    {"jsonrpc": "2.0", "id": 1.5, "method": "ping"},
    {"jsonrpc": "2.0", "id": [1], "method": "ping"},
    {"jsonrpc": "2.0", "id": 1, "method": "ping", "params": [1, 2]},
    {"jsonrpc": "2.0", "id": 1, "method": "ping", "params": "x"},
])
def test_malformed_request_is_invalid_request(obj: dict[str, Any]) -> None:
    assert rpc_error(classify, obj, {}).code == INVALID_REQUEST


def test_response_posted_to_the_gateway_is_400_in_both_eras() -> None:
    err = rpc_error(classify, {"jsonrpc": "2.0", "id": 1, "result": {}}, {})
    assert err.code == INVALID_REQUEST
    assert (err.http_status(LEGACY), err.http_status(MODERN)) == (400, 400)


def test_null_params_count_as_empty() -> None:
    msg = classify(request("ping", None) | {"params": None}, {})
    assert msg.params == {}


# ---- classify: eras ---------------------------------------------------------------------------------------------

def test_no_version_header_is_legacy_with_the_default_version() -> None:
    msg = classify(request("initialize", {"protocolVersion": "2025-06-18"}), {})
    assert (msg.era, msg.version, msg.method, msg.id) == (LEGACY, "2025-03-26", "initialize", 1)
    assert msg.is_notification is False


@pytest.mark.parametrize("version", HANDSHAKE_VERSIONS)
def test_handshake_version_header_is_legacy(version: str) -> None:
    msg = classify(request("tools/list"), {"mcp-protocol-version": version})
    assert (msg.era, msg.version) == (LEGACY, version)


def test_legacy_does_not_require_the_envelope_or_routing_headers() -> None:
    msg = classify(request("tools/call", {"name": "x_a_get"}), {"mcp-protocol-version": "2025-11-25"})
    assert msg.era == LEGACY and msg.params == {"name": "x_a_get"}


def test_modern_request_is_classified_with_its_envelope() -> None:
    meta = {**envelope(), "io.modelcontextprotocol/clientInfo": {"name": "c"}}
    msg = classify(request("tools/list", {"_meta": meta}), modern_headers())
    assert (msg.era, msg.version, msg.method) == (MODERN, LATEST_MODERN, "tools/list")
    assert msg.meta == meta


def test_message_meta_is_empty_when_absent_or_not_an_object() -> None:
    assert classify(request("ping"), {}).meta == {}
    assert classify(request("ping", {"_meta": "x"}), {}).meta == {}


@pytest.mark.parametrize("method", ["tools/call", "prompts/get"])
def test_modern_name_bearing_request_needs_the_matching_mcp_name(method: str) -> None:
    params = {"name": "x_a_get", "_meta": envelope()}
    msg = classify(request(method, params), modern_headers(method, **{"mcp-name": "x_a_get"}))
    assert msg.params["name"] == "x_a_get"


def test_modern_resources_read_compares_mcp_name_with_the_uri() -> None:
    uri = "x+a+file:///etc/hosts"
    msg = classify(request("resources/read", {"uri": uri, "_meta": envelope()}),
                   modern_headers("resources/read", **{"mcp-name": uri}))
    assert msg.params["uri"] == uri


def test_modern_mcp_name_is_compared_after_base64_decoding() -> None:
    name = "wörk"
    msg = classify(request("tools/call", {"name": name, "_meta": envelope()}),
                   modern_headers("tools/call", **{"mcp-name": encode_header_value(name)}))
    assert msg.params["name"] == name


def test_modern_name_bearing_request_without_a_name_skips_the_mcp_name_check() -> None:
    msg = classify(request("tools/call", {"_meta": envelope()}), modern_headers("tools/call"))
    assert msg.era == MODERN


def test_modern_notification_needs_no_envelope() -> None:
    body = {"jsonrpc": "2.0", "method": "notifications/cancelled", "params": {"requestId": 1}}
    msg = classify(body, {"mcp-protocol-version": LATEST_MODERN})
    assert msg.is_notification and msg.era == MODERN and msg.id is None


def test_legacy_notification_is_a_notification() -> None:
    msg = classify({"jsonrpc": "2.0", "method": "notifications/initialized"}, {})
    assert msg.is_notification and msg.era == LEGACY


def test_string_id_is_kept() -> None:
    assert classify(request("ping") | {"id": "abc"}, {}).id == "abc"


# ---- classify: the modern ladder, in order ------------------------------------------------------------------

@pytest.mark.parametrize("params", [
    {},
    {"_meta": "x"},
    {"_meta": {META_VERSION: LATEST_MODERN}},
    {"_meta": {META_CAPABILITIES: {}}},
])
def test_modern_missing_envelope_keys_is_32602(params: dict[str, Any]) -> None:
    err = rpc_error(classify, request("tools/list", params), modern_headers())
    assert err.code == INVALID_PARAMS
    assert err.http_status(MODERN) == 400


def test_missing_envelope_is_reported_before_header_mismatches() -> None:
    headers = {"mcp-protocol-version": "2099-01-01", "mcp-method": "prompts/list"}
    assert rpc_error(classify, request("tools/list", {}), headers).code == INVALID_PARAMS


def test_version_header_and_body_mismatch_is_32020() -> None:
    err = rpc_error(classify, request("tools/list", {"_meta": envelope("2026-01-01")}), modern_headers())
    assert err.code == HEADER_MISMATCH and "MCP-Protocol-Version" in err.message


@pytest.mark.parametrize("headers", [
    {"mcp-protocol-version": LATEST_MODERN},
    modern_headers("prompts/list"),
    modern_headers("TOOLS/LIST"),
])
def test_method_header_missing_or_different_is_32020(headers: dict[str, str]) -> None:
    err = rpc_error(classify, request("tools/list", {"_meta": envelope()}), headers)
    assert err.code == HEADER_MISMATCH and "Mcp-Method" in err.message


@pytest.mark.parametrize("name_header", [None, "x_a_put", "X_A_GET", "=?base64?!!?=", "=?base64?eF9hX2dldA?="])
def test_name_header_missing_different_or_malformed_is_32020(name_header: str | None) -> None:
    headers = modern_headers("tools/call")
    if name_header is not None:
        headers["mcp-name"] = name_header
    err = rpc_error(classify, request("tools/call", {"name": "x_a_get", "_meta": envelope()}), headers)
    assert err.code == HEADER_MISMATCH and "Mcp-Name" in err.message


def test_unsupported_version_is_32022_with_supported_and_requested() -> None:
    version = "2099-01-01"
    err = rpc_error(classify, request("tools/list", {"_meta": envelope(version)}), modern_headers(version=version))
    assert err.code == UNSUPPORTED_VERSION
    assert err.data == {"supported": [LATEST_MODERN, *reversed(HANDSHAKE_VERSIONS)], "requested": version}
    assert err.data["supported"][:2] == ["2026-07-28", "2025-11-25"]
    assert err.http_status(MODERN) == 400


def test_header_mismatch_is_reported_before_the_unsupported_version() -> None:
    version = "2099-01-01"
    err = rpc_error(classify, request("tools/list", {"_meta": envelope(version)}),
                    modern_headers("prompts/list", version=version))
    assert err.code == HEADER_MISMATCH


def test_non_string_version_in_the_envelope_is_a_mismatch_first() -> None:
    err = rpc_error(classify, request("tools/list", {"_meta": {META_VERSION: 2026, META_CAPABILITIES: {}}}),
                    modern_headers())
    assert err.code == HEADER_MISMATCH


# ---- http status per era ---------------------------------------------------------------------------------------

@pytest.mark.parametrize(("code", "status"), [
    (METHOD_NOT_FOUND, 404), (INVALID_PARAMS, 400), (HEADER_MISMATCH, 400), (UNSUPPORTED_VERSION, 400),
    (PARSE_ERROR, 400), (INVALID_REQUEST, 400), (jsonrpc.MISSING_CAPABILITY, 400),
])
def test_modern_http_status(code: int, status: int) -> None:
    assert RpcError(code, "m").http_status(MODERN) == status


@pytest.mark.parametrize(("code", "status"), [
    (PARSE_ERROR, 400), (INVALID_REQUEST, 400), (METHOD_NOT_FOUND, 200), (INVALID_PARAMS, 200),
    (INTERNAL_ERROR, 200), (HEADER_MISMATCH, 200),
])
def test_legacy_http_status(code: int, status: int) -> None:
    assert RpcError(code, "m").http_status(LEGACY) == status


def test_explicit_status_overrides_the_era_table() -> None:
    err = RpcError(INVALID_PARAMS, "m", status=503)
    assert (err.http_status(LEGACY), err.http_status(MODERN)) == (503, 503)


def test_error_and_result_bodies() -> None:
    assert orjson.loads(jsonrpc.error_body(7, -32601, "Method not found")) == {
        "jsonrpc": "2.0", "id": 7, "error": {"code": -32601, "message": "Method not found"}}
    assert orjson.loads(jsonrpc.error_body(None, -32022, "v", {"supported": []}))["error"]["data"] == {"supported": []}
    assert orjson.loads(jsonrpc.result_body("a", {"tools": []})) == {"jsonrpc": "2.0", "id": "a",
                                                                      "result": {"tools": []}}


# ---- header value codec ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("value", ["x_a_get", "", "a b", "file:///etc/hosts?x=1&y=%20", "~!@#$%^&*()"])
def test_plain_visible_ascii_is_sent_as_is(value: str) -> None:
    assert encode_header_value(value) == value
    assert decode_header_value(value) == value


@pytest.mark.parametrize("value", ["wörk", " lead", "trail ", "\tx", "a\nb", "=?base64?YQ==?=", "=?base64??=",
                                   "日本", "a\x7f", "\x00"])
def test_other_values_get_the_base64_sentinel(value: str) -> None:
    encoded = encode_header_value(value)
    assert encoded == "=?base64?" + base64.b64encode(value.encode()).decode() + "?="
    assert decode_header_value(encoded) == value


@pytest.mark.parametrize("value", ["plain", "wörk", " lead", "=?base64?YQ==?=", "", "a\r\nb", "x" * 300])
def test_codec_agrees_with_the_sdk(value: str) -> None:
    assert encode_header_value(value) == sdk_encode(value)
    assert decode_header_value(sdk_encode(value)) == value
    assert sdk_decode(encode_header_value(value)) == value


@pytest.mark.parametrize("header", [
    "=?base64?YR==?=",      # non-zero padding bits: not canonical
    "=?base64?YQ?=",        # missing padding
    "=?base64?/w==?=",      # not UTF-8
    "=?base64?YQ=?=",
])
def test_decode_rejects_malformed_or_non_canonical_base64(header: str) -> None:
    assert decode_header_value(header) is None


@pytest.mark.parametrize("value", ["=?base64?a b?=", "=?base64?é?="])
def test_values_that_look_like_any_sentinel_are_wrapped_like_the_sdk_does(value: str) -> None:
    assert encode_header_value(value) == sdk_encode(value)
    assert decode_header_value(encode_header_value(value)) == value
    assert decode_header_value(value) is None  # a malformed sentinel (the SDK's decoder raises on the second)


def test_decode_leaves_sentinel_lookalikes_with_other_markers_alone() -> None:
    assert decode_header_value("=?BASE64?YQ==?=") == "=?BASE64?YQ==?="
    assert decode_header_value("=?base64?YQ==") == "=?base64?YQ=="


# ---- Mcp-Param-* --------------------------------------------------------------------------------------------

HMAP = {("region",): "Region", ("limit",): "Limit", ("dry",): "Dry", ("opts", "zone"): "Zone"}


def test_param_headers_render_strings_integers_and_booleans() -> None:
    args = {"region": "eu-west", "limit": 42, "dry": True, "opts": {"zone": "b"}}
    assert param_headers(HMAP, args) == {"mcp-param-region": "eu-west", "mcp-param-limit": "42",
                                         "mcp-param-dry": "true", "mcp-param-zone": "b"}


def test_param_headers_encode_non_ascii_and_false() -> None:
    assert param_headers(HMAP, {"region": "zürich", "dry": False}) == {
        "mcp-param-region": encode_header_value("zürich"), "mcp-param-dry": "false"}


@pytest.mark.parametrize("args", [{}, {"region": None}, {"region": ["a"]}, {"region": {"a": 1}}, {"opts": "flat"},
                                  {"opts": {"zone": None}}])
def test_param_headers_skip_absent_null_and_unrenderable_values(args: dict[str, Any]) -> None:
    assert param_headers(HMAP, args) == {}


def test_check_accepts_matching_headers() -> None:
    args = {"region": "zürich", "limit": 42, "dry": False, "opts": {"zone": "b"}}
    check_param_headers(HMAP, args, param_headers(HMAP, args))


def test_check_accepts_when_argument_and_header_are_both_absent() -> None:
    check_param_headers(HMAP, {"other": 1}, {})
    check_param_headers(HMAP, {"region": None}, {})


@pytest.mark.parametrize("header", ["42", "42.0", "42.000"])
def test_check_compares_integers_numerically(header: str) -> None:
    check_param_headers({("n",): "N"}, {"n": 42}, {"mcp-param-n": header})


@pytest.mark.parametrize("header", ["43", "42.5", "forty-two", "", "=?base64?!?="])
def test_check_refuses_a_different_integer(header: str) -> None:
    err = rpc_error(check_param_headers, {("n",): "N"}, {"n": 42}, {"mcp-param-n": header})
    assert err.code == HEADER_MISMATCH


@pytest.mark.parametrize(("value", "header", "ok"), [
    (True, "true", True), (False, "false", True), (True, "True", False), (True, "1", False), (False, "0", False),
    (False, "true", False),
])
def test_check_compares_booleans_exactly(value: bool, header: str, ok: bool) -> None:
    if ok:
        check_param_headers({("b",): "B"}, {"b": value}, {"mcp-param-b": header})
    else:
        assert rpc_error(check_param_headers, {("b",): "B"}, {"b": value}, {"mcp-param-b": header}).code == \
            HEADER_MISMATCH


@pytest.mark.parametrize(("value", "header"), [
    ("eu", "EU"), ("eu", "eu "), ("zürich", "zurich"), ("a", "=?base64?YQ?="),
])
def test_check_refuses_a_different_string(value: str, header: str) -> None:
    assert rpc_error(check_param_headers, {("r",): "R"}, {"r": value}, {"mcp-param-r": header}).code == HEADER_MISMATCH


def test_check_refuses_a_header_without_its_argument() -> None:
    err = rpc_error(check_param_headers, HMAP, {}, {"mcp-param-region": "eu"})
    assert err.code == HEADER_MISMATCH and "absent" in err.message


def test_check_refuses_an_argument_without_its_header() -> None:
    err = rpc_error(check_param_headers, HMAP, {"opts": {"zone": "b"}}, {})
    assert err.code == HEADER_MISMATCH and "mcp-param-zone" in err.message


def test_check_ignores_headers_that_are_not_mapped() -> None:
    check_param_headers(HMAP, {}, {"mcp-param-unknown": "x"})


def test_check_refuses_a_double_encoded_header() -> None:
    value = "é"
    double = encode_header_value(encode_header_value(value))  # decodes to '=?base64?w6k=?=', not 'é'
    with pytest.raises(RpcError):
        check_param_headers({("q",): "Q"}, {"q": value}, {"mcp-param-q": double})


@pytest.mark.parametrize(("value", "header"), [
    (42, "4_2"),
    (42, encode_header_value(" 42")),
    (2**53 + 1, str(2**53)),
])
def test_check_refuses_integers_that_are_only_float_equal(value: int, header: str) -> None:
    with pytest.raises(RpcError):
        check_param_headers({("n",): "N"}, {"n": value}, {"mcp-param-n": header})


def test_integral_float_argument_matches_its_header_and_is_mirrored() -> None:
    check_param_headers({("n",): "N"}, {"n": 42.0}, {"mcp-param-n": "42"})
    assert "mcp-param-n" in param_headers({("n",): "N"}, {"n": 42.0})
