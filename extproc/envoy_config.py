"""Envoy configuration rendered from the gateway config and the catalog.

Two shapes: the standalone bootstrap (`bootstrap`), and the pieces a mesh operator adds to an Envoy they
already run (`mesh_pieces`). Upstream clusters live in a file-based CDS document (`cds`) that is replaced
atomically on every catalog change, so servers come and go without a restart.
"""

from __future__ import annotations

import ipaddress
import json
import os
import tempfile
from collections.abc import Sequence
from typing import Any
from urllib.parse import urlsplit

import yaml

from catalog.config import DEFAULT_BRIDGE_PORT, Address, GatewayConfig
from catalog.manifests import MCPServer
from extproc import answer, carried
from extproc.notify import NOTIFY_CLUSTER
from extproc.upstream import RETRY_HEADER, ROUTE_HEADER, cluster_name, origin_cluster_name

CDS_FILE = "cds.yaml"
UPSTREAM_IDLE_S = 4  # under the common 5 s keep-alive of upstream HTTP servers
RDS_FILE = "rds.yaml"  # the public routes, with one route per server (its timeout), next to the clusters
ROUTE_TABLE = "muster_edge_routes"
_HCM = "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"
_ROUTER = {"name": "envoy.filters.http.router",
           "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}
_CA_BUNDLE = "/etc/ssl/certs/ca-certificates.crt"


def _socket(host: str, port: int) -> dict[str, Any]:
    return {"socket_address": {"address": host, "port_value": port}}


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def upstream_cluster(server: MCPServer, bridge: Address | None = None) -> dict[str, Any]:
    """One Envoy cluster per MCPServer, named as the processor's routing header names it.

    stdio and sse servers are served by the gateway's own bridge on loopback (one per replica), so their
    cluster points there; the data path through Envoy is the same as for any streamable-HTTP server.
    """
    if server.bridged:
        where = bridge or Address("127.0.0.1", DEFAULT_BRIDGE_PORT)
        host = f"[{where.host}]" if ":" in where.host else where.host  # an IPv6 bridge address
        return _cluster(cluster_name(server.name), f"http://{host}:{where.port}", server.timeout)
    return _cluster(cluster_name(server.name), server.url, server.timeout)


def origin_cluster(server: MCPServer) -> dict[str, Any]:
    """An sse server's own address, for the bridge's outbound calls through the internal listener."""
    return _cluster(origin_cluster_name(server.name), server.url, server.timeout)


def _cluster(name: str, url: str, timeout: int) -> dict[str, Any]:
    parts = urlsplit(url)
    tls = parts.scheme == "https"
    host = parts.hostname or ""
    port = parts.port or (443 if tls else 80)
    cluster: dict[str, Any] = {
        "@type": "type.googleapis.com/envoy.config.cluster.v3.Cluster",
        "name": name,
        "type": "STATIC" if _is_ip(host) else "STRICT_DNS",
        "connect_timeout": f"{min(timeout, 10)}s",
        "dns_lookup_family": "V4_PREFERRED",
        "circuit_breakers": {"thresholds": [{"max_requests": 10000, "max_pending_requests": 10000,
                                             "max_connections": 10000}]},
        "load_assignment": {"cluster_name": name,
                            "endpoints": [{"lb_endpoints": [{"endpoint": {"address": _socket(host, port)}}]}]},
        # Envoy closes a kept-alive upstream connection before the upstream does (uvicorn and Node close after
        # 5 s idle): a request then never meets a connection the upstream is closing, the one loss a retry could
        # not safely repair for a call that is not read-only or idempotent.
        "typed_extension_protocol_options": {"envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
            "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
            "common_http_protocol_options": {"idle_timeout": f"{UPSTREAM_IDLE_S}s"},
            "explicit_http_config": {"http_protocol_options": {}}}},
    }
    if tls:
        cluster["transport_socket"] = {
            "name": "envoy.transport_sockets.tls",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
                "sni": host,
                "common_tls_context": {"validation_context": {"trusted_ca": {"filename": _CA_BUNDLE}}},
            },
        }
    return cluster


def cds(servers: Sequence[MCPServer], bridge: Address | None = None) -> dict[str, Any]:
    ordered = sorted(servers, key=lambda s: s.name)
    clusters = [upstream_cluster(s, bridge) for s in ordered]
    clusters += [origin_cluster(s) for s in ordered if s.type == "sse"]
    return {"resources": clusters}


_EXT_PROC = "type.googleapis.com/envoy.extensions.filters.http.ext_proc.v3.ExternalProcessor"


# A stream that could not reach a worker (it just died: connection refused or reset before the stream began)
# is opened once more on another worker, so only the streams a dead worker had already taken fail.
_PROCESSOR_RETRY = {
    "retry_on": "connect-failure,refused-stream,reset-before-request,reset", "num_retries": 10,
    "retry_back_off": {"base_interval": "0.01s", "max_interval": "0.1s"},
    "retry_host_predicate": [{"name": "envoy.retry_host_predicates.previous_hosts", "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.retry.host.previous_hosts.v3.PreviousHostsPredicate"}}],
    "host_selection_retry_max_attempts": 3,
}


def _grpc_service(cluster: str) -> dict[str, Any]:
    return {"envoy_grpc": {"cluster_name": cluster}, "timeout": "5s", "retry_policy": _PROCESSOR_RETRY}


def _ext_proc_common() -> dict[str, Any]:
    return {
        "@type": _EXT_PROC,
        "grpc_service": _grpc_service("muster_edge_processor"),
        "failure_mode_allow": False,
        "message_timeout": "2s",
        "max_message_timeout": "90s",
        "mutation_rules": {"allow_all_routing": True, "allow_envoy": True, "disallow_is_error": True},
        "status_on_error": {"code": "ServiceUnavailable"},
    }


BODY_FILTER = "envoy.filters.http.ext_proc"
HEADERS_FILTER = "muster_edge.request_headers"
HEADERS_IN = "muster_edge.headers_in"
HEADERS_OUT = "muster_edge.headers_out"
_MATCHER = "type.googleapis.com/envoy.extensions.common.matching.v3.ExtensionWithMatcher"
_SKIP = {"action": {"name": "skip", "typed_config": {
    "@type": "type.googleapis.com/envoy.extensions.filters.common.matcher.action.v3.SkipFilter"}}}


def _request_is(header: str, value_match: dict[str, Any]) -> dict[str, Any]:
    return {"single_predicate": {
        "input": {"name": header, "typed_config": {
            "@type": "type.googleapis.com/envoy.type.matcher.v3.HttpRequestHeaderMatchInput", "header_name": header}},
        "value_match": value_match}}


# A request without a body (GET streams, DELETE, a POST with content-length 0) goes to the headers filter; every
# other one (a POST with a body) to the body filter. An HTTP/2 POST that ends with its headers and says no
# content-length reaches neither: nothing routes it (the route table answers "not routed").
BODYLESS = {"or_matcher": {"predicate": [
    {"not_matcher": _request_is(":method", {"exact": "POST"})},
    _request_is("content-length", {"exact": "0"}),
]}}


def _when(predicate: dict[str, Any], name: str, typed_config: dict[str, Any]) -> dict[str, Any]:
    """A filter Envoy runs only when `predicate` holds (else skipped, at no cost to the processor)."""
    return {"name": name, "typed_config": {
        "@type": _MATCHER,
        "xds_matcher": {"matcher_list": {"matchers": [{"predicate": {"not_matcher": predicate}, "on_match": _SKIP}]}},
        "extension_config": {"name": "envoy.filters.http.ext_proc" if "ExternalProcessor" in typed_config["@type"]
                             else name, "typed_config": typed_config}}}


def _lua(name: str, source: str) -> dict[str, Any]:
    return {"name": name, "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.lua.v3.Lua",
                                           "default_source_code": {"inline_string": source}}}


def headers_in_filter() -> dict[str, Any]:
    """Packs the request headers into dynamic metadata for the body message (extproc/carried.py)."""
    return _lua(HEADERS_IN, carried.headers_in_lua((ROUTE_HEADER, RETRY_HEADER)))


def headers_out_filter() -> dict[str, Any]:
    """Applies the processor's upstream headers after the body message, then routes (extproc/carried.py)."""
    return _lua(HEADERS_OUT, carried.HEADERS_OUT_LUA)


def ext_proc_filter(config: GatewayConfig) -> dict[str, Any]:
    """The request filter for requests with a body: the body alone, one message, with the headers and the verified
    claims in forwarded metadata; never the answer (the answer filters take those)."""
    return _when({"not_matcher": BODYLESS}, BODY_FILTER, {
        **_ext_proc_common(),
        "processing_mode": {
            "request_header_mode": "SKIP", "request_body_mode": "BUFFERED",
            "response_header_mode": "SKIP", "response_body_mode": "NONE",
            "request_trailer_mode": "SKIP", "response_trailer_mode": "SKIP",
        },
        "metadata_options": {
            "forwarding_namespaces": {"untyped": ["envoy.filters.http.jwt_authn", carried.REQUEST_NAMESPACE]},
            "receiving_namespaces": {"untyped": [answer.NAMESPACE, answer.RESEND_NAMESPACE,
                                                 carried.UPSTREAM_NAMESPACE]}},
    })


def headers_filter(config: GatewayConfig) -> dict[str, Any]:
    """The request filter for requests without a body (GET streams, DELETE): the headers message alone."""
    return _when(BODYLESS, HEADERS_FILTER, {
        **_ext_proc_common(),
        "processing_mode": {
            "request_header_mode": "SEND", "request_body_mode": "NONE",
            "response_header_mode": "SKIP", "response_body_mode": "NONE",
            "request_trailer_mode": "SKIP", "response_trailer_mode": "SKIP",
        },
        "metadata_options": {"forwarding_namespaces": {"untyped": ["envoy.filters.http.jwt_authn"]},
                             "receiving_namespaces": {"untyped": [answer.NAMESPACE, answer.RESEND_NAMESPACE]}},
    })


def _metadata_is(key: str, matcher: dict[str, Any]) -> dict[str, Any]:
    return {"single_predicate": {
        "input": {"name": f"metadata_{key}", "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.matching.common_inputs.network.v3.DynamicMetadataInput",
            "filter": answer.NAMESPACE, "path": [{"key": key}]}},
        "custom_match": {"name": "metadata", "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.matching.input_matchers.metadata.v3.Metadata",
            "value": matcher}}}}


def _response_is(name: str, input_type: str, value_match: dict[str, Any], **input_fields: str) -> dict[str, Any]:
    return {"single_predicate": {
        "input": {"name": name, "typed_config": {
            "@type": f"type.googleapis.com/envoy.type.matcher.v3.{input_type}", **input_fields}},
        "value_match": value_match}}


def _status(code: str) -> dict[str, Any]:
    return _response_is("status", "HttpResponseStatusCodeMatchInput", {"exact": code})


def _status_class(value: str) -> dict[str, Any]:
    return _response_is("status_class", "HttpResponseStatusCodeClassMatchInput", {"exact": value})


def _content_type(contains: str) -> dict[str, Any]:
    return _response_is("content_type", "HttpResponseHeaderMatchInput", {"contains": contains, "ignore_case": True},
                        header_name="content-type")


def _all(*predicates: dict[str, Any]) -> dict[str, Any]:
    return {"and_matcher": {"predicate": list(predicates)}}


def _any(*predicates: dict[str, Any]) -> dict[str, Any]:
    return {"or_matcher": {"predicate": list(predicates)}}


def _not(predicate: dict[str, Any]) -> dict[str, Any]:
    return {"not_matcher": predicate}


def _empty_body() -> dict[str, Any]:
    return _response_is("content_length", "HttpResponseHeaderMatchInput", {"exact": "0"},
                        header_name="content-length")


_FLAG = {"string_match": {"exact": "1"}}
_ROUTED = _metadata_is("server", {"present_match": True})
# MCP answers a request with JSON or SSE; 202 (no body) answers a notification or a response.
_READABLE = _any(_content_type("json"), _content_type("event-stream"))
_NOT_202 = _not(_status("202"))
# a request was routed (a notification or a relayed response has no answer to check: its id is null)
_ASKED = _not(_metadata_is("rpc_id", {"string_match": {"exact": "null"}}))
# When an answer needs the processor, from the flags the request's stream left (extproc/answer.py) and the
# response itself: the answer cases, listed once here and in the README ("What the processor sees of a call").
# The three cases never overlap, so at most one answer filter runs for a response.
# The flags are written in the request filter's reply to the request body; the answer filters' matchers first
# run when their own request callbacks do, which headers_out holds back until that reply (it waits for the whole
# body, which the request filter BUFFERs; keep it so: with a streamed request body the matchers would see no flags).
ANSWER_CASES: dict[str, dict[str, Any]] = {
    # decided on the status and headers: every routed 401 (a renewable credential is renewed and the call resent;
    # any other never reaches the client with the upstream's own WWW-Authenticate), a lost upstream session, an
    # upstream failure, an answer that cannot be MCP (no JSON or SSE content type, an empty 2xx), an error whose id
    # must be mapped back (its body then follows on the same stream), a 2026-07-28 upstream's -32020
    "status": _any(
        _all(_ROUTED, _status("401")),
        _all(_metadata_is(answer.ON_404, _FLAG), _status("404")),
        _all(_ROUTED, _status_class("5xx")),
        _all(_ROUTED, _ASKED, _NOT_202, _not(_READABLE)),
        _all(_ROUTED, _ASKED, _status_class("2xx"), _NOT_202, _empty_body()),
        _all(_metadata_is(answer.ON_JSON, _FLAG), _status_class("4xx"), _content_type("json")),
        # a 2026-07-28 tools/call answered 400 JSON: if it is -32020 (HeaderMismatch), the upstream's tools are
        # fetched again, Mcp-Param-* rebuilt from the new schema and the call resent once (its body follows)
        _all(_metadata_is(answer.ON_MISMATCH, _FLAG), _status("400"), _content_type("json")),
    ),
    # a JSON answer to rewrite and check: the whole body in one message, no headers message
    "json": _all(_metadata_is(answer.ON_JSON, _FLAG), _status_class("2xx"), _content_type("json"),
                 _not(_empty_body())),
    # an SSE answer to rewrite and check: each chunk as it comes, no headers message
    "sse": _all(_metadata_is(answer.ON_SSE, _FLAG), _status_class("2xx"), _content_type("event-stream"),
                _not(_empty_body())),
}
_ANSWER_MODES = {
    # an error JSON body is asked for in the reply to its headers (mode_override BUFFERED)
    "status": {"response_header_mode": "SEND", "response_body_mode": "NONE"},
    "json": {"response_header_mode": "SKIP", "response_body_mode": "BUFFERED"},
    "sse": {"response_header_mode": "SKIP", "response_body_mode": "STREAMED"},
}


def answer_filter(case: str) -> dict[str, Any]:
    """One answer filter: an ext_proc that Envoy skips unless ANSWER_CASES[case] holds, so a call whose answer
    needs nothing costs one ext_proc message (the request body) and none for its answer."""
    processor = {
        **_ext_proc_common(),
        "processing_mode": {"request_header_mode": "SKIP", "request_body_mode": "NONE",
                            "request_trailer_mode": "SKIP", "response_trailer_mode": "SKIP", **_ANSWER_MODES[case]},
        **({"allow_mode_override": True} if case == "status" else {}),
        # the sealed resend (it holds the caller's bearer) goes only where a 401 is acted on
        "metadata_options": {"forwarding_namespaces": {"untyped": [
            answer.NAMESPACE, *([answer.RESEND_NAMESPACE] if case == "status" else [])]}},
    }
    return {
        "name": f"muster_edge.answer_{case}",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.common.matching.v3.ExtensionWithMatcher",
            "xds_matcher": {"matcher_list": {"matchers": [{
                "predicate": {"not_matcher": ANSWER_CASES[case]},
                "on_match": {"action": {"name": "skip", "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.filters.common.matcher.action.v3.SkipFilter"}}},
            }]}},
            "extension_config": {"name": "envoy.filters.http.ext_proc", "typed_config": processor},
        },
    }


def body_size_filter(config: GatewayConfig) -> dict[str, Any]:
    """The one request size limit a client meets (413, on HTTP/1.1 and HTTP/2): every buffer behind it (the
    listener's connection buffer that ext_proc's BUFFERED body fills, the gRPC messages to and from the
    processor) holds at least this much (connection_buffer_limit, extproc/server.py)."""
    return {
        "name": "envoy.filters.http.body_size_limit",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.body_size_limit.v3.BodySizeLimit",
            "max_request_bytes": config.max_request_bytes,
        },
    }


def connection_buffer_limit(config: GatewayConfig) -> int:
    """Envoy's per-connection buffer on the public listeners: ext_proc BUFFERED holds the whole request body in
    it (over it: 413 on HTTP/1.1 below maxRequestBytes), and the answer filters hold a JSON answer to rewrite."""
    return max(1 << 20, config.max_request_bytes + (64 << 10))


def _no_ext_proc() -> dict[str, Any]:
    off = {"@type": "type.googleapis.com/envoy.extensions.filters.http.ext_proc.v3.ExtProcPerRoute", "disabled": True}
    return {BODY_FILTER: off, HEADERS_FILTER: off}


def protected_resource_metadata(config: GatewayConfig) -> dict[str, Any]:
    """RFC 9728 metadata: which authorization servers issue tokens for this gateway, and for what scopes."""
    assert config.auth is not None
    doc: dict[str, Any] = {"resource": config.resource,
                           "authorization_servers": list(config.auth.authorization_servers),
                           "bearer_methods_supported": ["header"], "resource_name": config.server_name}
    scopes = config.auth.scopes_supported or config.auth.required_scopes
    if scopes:
        doc["scopes_supported"] = list(scopes)
    return doc


# A request lost before the upstream could have read it (the connection failed, was refused, or was reset
# before a byte was sent) is retried once. A reset after the request was sent (an upstream closing a kept-alive
# connection as the request arrives looks the same as one crashing mid-call) is retried only for requests the
# processor marked safe to repeat (RETRY_HEADER): reads, and tools the upstream declares read-only or idempotent.
_RETRY_ALWAYS = "reset-before-request,connect-failure,refused-stream"


def retry_policy(repeatable: bool) -> dict[str, Any]:
    return {"retry_on": _RETRY_ALWAYS + (",reset" if repeatable else ""), "num_retries": 1}


def _routed(name: str, route: dict[str, Any], extra: dict[str, Any]) -> list[dict[str, Any]]:
    """The route by the processor's cluster header, twice: for requests marked safe to repeat, and for others."""
    def one(repeatable: bool) -> dict[str, Any]:
        headers = [{"name": ROUTE_HEADER, "present_match": True}]
        if repeatable:
            headers.append({"name": RETRY_HEADER, "string_match": {"exact": "1"}})
        return {"name": f"{name}_repeatable" if repeatable else name,
                "match": {"prefix": "/", "headers": headers},
                "route": {**route, "retry_policy": retry_policy(repeatable)},
                "request_headers_to_remove": [ROUTE_HEADER, RETRY_HEADER], **extra}
    return [one(True), one(False)]


def server_routes(routed: list[dict[str, Any]], servers: Sequence[MCPServer]) -> list[dict[str, Any]]:
    """The routed routes once more per server, before the shared ones: the route idle timeout is the server's
    `timeout`, so it bounds the gap between events of its answers (Envoy has no per-request header for that). A
    server new to the catalog takes the shared routes until the route table is rewritten."""
    out = []
    for server in sorted(servers, key=lambda s: s.name):
        for base in routed:
            route = json.loads(json.dumps(base))
            route["name"] = base["name"].replace("muster_edge_routed", f"muster_edge_routed_{server.name}", 1)
            others = [h for h in route["match"]["headers"] if h["name"] != ROUTE_HEADER]
            route["match"] = {"prefix": "/", "headers": [
                {"name": ROUTE_HEADER, "string_match": {"exact": cluster_name(server.name)}}, *others]}
            route["route"]["idle_timeout"] = f"{server.timeout}s"
            out.append(route)
    return out


def notify_route() -> dict[str, Any]:
    """Listening streams (a GET stream, subscriptions/listen) the processor sent to its own stream endpoint: no
    timeout, and an idle timeout well above the endpoint's keep-alive comments (15 s)."""
    return {"name": "muster_edge_notify",
            "match": {"prefix": "/", "headers": [{"name": ROUTE_HEADER, "string_match": {"exact": NOTIFY_CLUSTER}}]},
            "route": {"cluster": NOTIFY_CLUSTER, "timeout": "0s", "idle_timeout": "60s"},
            "request_headers_to_remove": [ROUTE_HEADER]}


def notify_cluster(config: GatewayConfig) -> dict[str, Any]:
    """Every worker's stream endpoint (its status listener); a stream may land on any of them (its ticket says
    all it needs), the least busy first. Each stream holds one connection for its life."""
    host = config.status_listen.host
    host = "127.0.0.1" if host in ("0.0.0.0", "") else "::1" if host in ("::", "[::]") else host
    ports = [config.status_listen.port + i for i in range(config.workers)]
    return {
        "name": NOTIFY_CLUSTER,
        "type": "STATIC",
        "connect_timeout": "1s",
        "lb_policy": "LEAST_REQUEST",
        "circuit_breakers": {"thresholds": [{"max_requests": 100000, "max_pending_requests": 100000,
                                             "max_connections": 100000}]},
        "load_assignment": {"cluster_name": NOTIFY_CLUSTER, "endpoints": [
            {"lb_endpoints": [{"endpoint": {"address": _socket(host, p)}} for p in ports]}]},
        "outlier_detection": {"split_external_local_origin_errors": True, "consecutive_local_origin_failure": 1,
                              "interval": "1s", "base_ejection_time": "2s", "max_ejection_percent": 50},
    }


def routes(config: GatewayConfig, servers: Sequence[MCPServer] = ()) -> list[dict[str, Any]]:
    """The public routes: protected resource metadata; routed calls by the processor's header (per server, then
    shared); the MCP path."""
    not_routed = ('{"jsonrpc":"2.0","id":null,"error":{"code":-32603,'
                  '"message":"muster-edge: the request was not routed"}}')
    not_found = ('{"jsonrpc":"2.0","id":null,"error":{"code":-32600,'
                 f'"message":{json.dumps("Not Found: the MCP endpoint is " + config.path)}}}}}')
    prm: list[dict[str, Any]] = []
    if config.auth is not None:
        body = json.dumps(protected_resource_metadata(config), separators=(",", ":"))
        prm.append({
            "name": "muster_edge_protected_resource_metadata",
            "match": {"path_separated_prefix": "/.well-known/oauth-protected-resource"},
            "direct_response": {"status": 200, "body": {"inline_string": body}},
            "response_headers_to_add": [{"header": {"key": "content-type", "value": "application/json"}},
                                        {"header": {"key": "cache-control", "value": "public, max-age=300"}}],
            "typed_per_filter_config": _no_ext_proc(),
        })
    callback: list[dict[str, Any]] = []
    if config.upstream_oauth is not None:
        callback.append({"name": "muster_edge_oauth_callback", "match": {"path": config.upstream_oauth.callback_path},
                         "direct_response": {"status": 500, "body": {"inline_string": "not handled\n"}}})
    routed = _routed("muster_edge_routed",
                     {"cluster_header": ROUTE_HEADER, "timeout": "0s", "idle_timeout": "300s",
                      "cluster_not_found_response_code": "SERVICE_UNAVAILABLE"},
                     {"response_headers_to_remove": ["mcp-session-id"]})
    unrouted = {
        "name": "muster_edge_mcp",
        "match": {"path": config.path},
        "direct_response": {"status": 500, "body": {"inline_string": not_routed}},
        "response_headers_to_add": [{"header": {"key": "content-type", "value": "application/json"}}],
    }
    return [*prm, *callback, notify_route(), *server_routes(routed, servers), *routed,
            *pinned_routes(config, unrouted), unrouted,
        {
            "name": "muster_edge_not_found",
            "match": {"prefix": "/"},
            "direct_response": {"status": 404, "body": {"inline_string": not_found}},
            "response_headers_to_add": [{"header": {"key": "content-type", "value": "application/json"}}],
            "typed_per_filter_config": _no_ext_proc(),
        },
    ]


def jwt_filter(config: GatewayConfig) -> dict[str, Any]:
    """Envoy checks the bearer (issuer, audience, expiry, signature from the remote JWKS); the verified payload
    goes to the processor as dynamic metadata. The token is kept for the processor (the RFC 8693 subject
    token); the processor removes it from every routed request unless the MCPServer forwards it."""
    assert config.auth is not None
    auth = config.auth
    return {
        "name": "envoy.filters.http.jwt_authn",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.jwt_authn.v3.JwtAuthentication",
            "providers": {"idp": {
                "issuer": auth.issuer,
                "audiences": list(auth.audiences or (config.resource,)),
                "remote_jwks": {
                    "http_uri": {"uri": auth.jwks_uri, "cluster": "muster_edge_idp", "timeout": "5s"},
                    "cache_duration": "600s",
                    "async_fetch": {"failed_refetch_duration": "5s"},
                    "retry_policy": {"num_retries": 3},
                },
                "forward": True,
                "payload_in_metadata": "jwt_payload",
                "failed_status_in_metadata": "jwt_failure",
                "clock_skew_seconds": auth.clock_skew_s,
                # verified tokens are remembered (until they expire): no signature check per request
                "jwt_cache_config": {"jwt_cache_size": 4096},
            }},
            # Envoy verifies; the processor turns the verdict into the MCP answer (401 with the metadata URL for
            # every failure, 403 for a missing scope) and refuses any request without a verified payload.
            "rules": [
                {"match": {"prefix": "/.well-known/"}},
                *([{"match": {"path": config.upstream_oauth.callback_path}}] if config.upstream_oauth else []),
                {"match": {"prefix": "/"}, "requires": {"requires_any": {"requirements": [
                    {"provider_name": "idp"}, {"allow_missing_or_failed": {}}]}}},
            ],
        },
    }


def idp_cluster(config: GatewayConfig) -> dict[str, Any]:
    assert config.auth is not None
    parts = urlsplit(config.auth.jwks_uri)
    tls = parts.scheme == "https"
    host = parts.hostname or ""
    cluster: dict[str, Any] = {
        "name": "muster_edge_idp",
        "type": "STATIC" if _is_ip(host) else "LOGICAL_DNS",
        "dns_lookup_family": "V4_PREFERRED",
        "connect_timeout": "3s",
        "load_assignment": {"cluster_name": "muster_edge_idp", "endpoints": [{"lb_endpoints": [
            {"endpoint": {"address": _socket(host, parts.port or (443 if tls else 80))}}]}]},
    }
    if tls:
        cluster["transport_socket"] = {"name": "envoy.transport_sockets.tls", "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
            "sni": host,
            "common_tls_context": {"validation_context": {"trusted_ca": {
                "filename": config.auth.jwks_ca_file or _CA_BUNDLE}}}}}
    return cluster


def upstream_failure_mappers() -> list[dict[str, Any]]:
    """Envoy's own 5xx replies for a routed call (upstream down, timed out) become a JSON-RPC error naming the
    server, from what the processor put in dynamic metadata: it need not see such answers itself."""
    server = "%DYNAMIC_METADATA(muster_edge:server)%"
    routed = {"metadata_filter": {"matcher": {"filter": "muster_edge", "path": [{"key": "server"}],
                                              "value": {"present_match": True}},
                                  "match_if_key_not_found": False}}
    # the processor's own answers (an upstream's error mapped, an unreadable answer) already say what failed
    not_processor = {"extension_filter": {"name": "envoy.access_loggers.extension_filters.cel", "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.access_loggers.filters.cel.v3.ExpressionFilter",
        "expression": "!response.code_details.startsWith('muster_edge')"}}}

    def mapper(op: str, status: int, what: str) -> dict[str, Any]:
        body = ('{"jsonrpc":"2.0","id":%DYNAMIC_METADATA(muster_edge:rpc_id)%,"error":{"code":-32603,"message":'
                f'"Upstream server \'{server}\' {what}","data":{{"server":"{server}","status":%RESPONSE_CODE%,'
                '"details":"%RESPONSE_CODE_DETAILS%"}}}')
        return {
            "filter": {"and_filter": {"filters": [
                {"status_code_filter": {"comparison": {"op": op, "value": {
                    "default_value": status, "runtime_key": f"muster_edge.upstream_{status}"}}}}, routed,
                not_processor]}},
            "body_format_override": {"text_format_source": {"inline_string": body},
                                     "content_type": "application/json"},
        }

    # the server route's idle timeout (its `timeout`) firing before the answer started: Envoy says 408
    idle = {**mapper("EQ", 408, "timed out"), "status_code": 504}
    return [mapper("EQ", 504, "timed out"), idle, mapper("EQ", 503, "is unavailable"), mapper("GE", 500, "failed"),
            too_large_mapper()]


def too_large_mapper() -> dict[str, Any]:
    """body_size_limit's 413 (a body over maxRequestBytes, refused before it is read: id null) as a JSON-RPC
    error. Travels with the upstream mappers so every public listener has it."""
    body = ('{"jsonrpc":"2.0","id":null,"error":{"code":-32600,"message":'
            '"Request body too large: over the gateway\'s maxRequestBytes","data":{"status":413}}}')
    return {"filter": {"status_code_filter": {"comparison": {"op": "EQ", "value": {
                "default_value": 413, "runtime_key": "muster_edge.too_large"}}}},
            "body_format_override": {"text_format_source": {"inline_string": body},
                                     "content_type": "application/json"}}


def _cel(expression: str) -> dict[str, Any]:
    return {"extension_filter": {"name": "envoy.access_loggers.extension_filters.cel", "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.access_loggers.filters.cel.v3.ExpressionFilter",
        "expression": expression}}}


# Envoy's own failures, told apart by their response code details: the processor's answers say muster_edge*,
# a route's direct_response says so, everything else at 5xx is Envoy's (ext_proc_error_*, no_healthy_upstream, ...).
_PROCESSOR_FAILED = "response.code >= 500 && response.code_details.startsWith('ext_proc')"
_ENVOY_FAILED = ("response.code >= 500 && !response.code_details.startsWith('muster_edge')"
                 " && response.code_details != 'direct_response'")


def envoy_failure_mappers() -> list[dict[str, Any]]:
    """Envoy's own 5xx replies that no processor shaped become JSON-RPC errors naming what failed: the processor
    dead, frozen or unreachable (status_on_error 503, message timeout 504), or no healthy upstream / a refused
    connection. When the processor never read the body the id is null; when it did (it routed the call and
    left the client's id in metadata) the client's own id."""
    routed = {"metadata_filter": {"matcher": {"filter": "muster_edge", "path": [{"key": "rpc_id"}],
                                              "value": {"present_match": True}},
                                  "match_if_key_not_found": False}}

    def unrouted(expr: str, message: str) -> dict[str, Any]:
        body = {"jsonrpc": "2.0", "id": None, "error": {"code": -32603, "message": message, "data": {
            "status": "%RESPONSE_CODE%", "details": "%RESPONSE_CODE_DETAILS%"}}}
        return {"filter": _cel(expr),
                "body_format_override": {"json_format": body, "content_type": "application/json"}}

    def with_client_id(expr: str, message: str) -> dict[str, Any]:
        # the id is JSON already (the processor wrote it so); the details can hold any text, so they stay out
        body = ('{"jsonrpc":"2.0","id":%DYNAMIC_METADATA(muster_edge:rpc_id)%,"error":{"code":-32603,'
                f'"message":"{message}","data":{{"status":%RESPONSE_CODE%}}}}}}')
        return {"filter": {"and_filter": {"filters": [_cel(expr), routed]}},
                "body_format_override": {"text_format_source": {"inline_string": body},
                                         "content_type": "application/json"}}

    timed_out = _PROCESSOR_FAILED + " && response.code == 504"
    out = []
    for expr, what in ((timed_out, "muster-edge: the request processor did not answer in time"),
                       (_PROCESSOR_FAILED, "muster-edge: the request processor is unavailable")):
        out += [with_client_id(expr, what), unrouted(expr, what)]
    return out


def envoy_fallback_mapper() -> dict[str, Any]:
    """Any other 5xx Envoy made itself on the public listener (after the upstream mappers, which name a server)."""
    body = {"jsonrpc": "2.0", "id": None, "error": {"code": -32603, "message":
            "muster-edge: Envoy could not serve the request (%RESPONSE_CODE_DETAILS%)",
            "data": {"status": "%RESPONSE_CODE%", "details": "%RESPONSE_CODE_DETAILS%"}}}
    return {"filter": _cel(_ENVOY_FAILED),
            "body_format_override": {"json_format": body, "content_type": "application/json"}}


def public_reply_mappers() -> list[dict[str, Any]]:
    """Every 5xx mapper of the public listeners, most specific first."""
    return [*envoy_failure_mappers(), *upstream_failure_mappers(), envoy_fallback_mapper()]


def local_replies(config: GatewayConfig) -> dict[str, Any]:
    """Every 401 points the client at the protected resource metadata (MCP authorization, RFC 9728)."""
    challenge = f'Bearer resource_metadata="{config.prm_url}"'
    assert config.auth is not None
    scopes = " ".join(config.auth.required_scopes)
    if scopes:
        challenge += f', scope="{scopes}"'

    unauthorized = {"status_code_filter": {"comparison": {
        "op": "EQ", "value": {"default_value": 401, "runtime_key": "muster_edge.unauthorized"}}}}
    has_token = {"header_filter": {"header": {"name": "authorization", "present_match": True}}}

    # jwt_authn's own 401 is plain text: a JSON-RPC error says why in a form every MCP client shows
    body = {"jsonrpc": "2.0", "id": None, "error": {"code": -32600, "message":
            "Unauthorized: this gateway needs a valid bearer token issued for it (%RESPONSE_CODE_DETAILS%)",
            "data": {"status": 401, "details": "%RESPONSE_CODE_DETAILS%"}}}

    def mapper(value: str, when: dict[str, Any]) -> dict[str, Any]:
        return {"filter": when, "headers_to_add": [{"header": {"key": "www-authenticate", "value": value},
                                                     "append_action": "OVERWRITE_IF_EXISTS_OR_ADD"}],
                "body_format_override": {"json_format": body, "content_type": "application/json"}}

    invalid = f'Bearer error="invalid_token", {challenge[len("Bearer "):]}'
    return {"mappers": [*public_reply_mappers(),
                        mapper(invalid, {"and_filter": {"filters": [unauthorized, has_token]}}),
                        mapper(challenge, unauthorized)]}


def route_table(config: GatewayConfig, servers: Sequence[MCPServer]) -> dict[str, Any]:
    """The public listeners' routes as a file-based RDS document, rewritten with the catalog like `cds`."""
    return {"resources": [{
        "@type": "type.googleapis.com/envoy.config.route.v3.RouteConfiguration",
        "name": ROUTE_TABLE,
        "virtual_hosts": [{"name": "mcp", "domains": ["*"], "routes": routes(config, servers)}],
    }]}


def _rds(cds_dir: str) -> dict[str, Any]:
    return {"route_config_name": ROUTE_TABLE, "config_source": {
        "resource_api_version": "V3",
        "path_config_source": {"path": os.path.join(cds_dir, RDS_FILE), "watched_directory": {"path": cds_dir}}}}


def http_connection_manager(stat_prefix: str, virtual_host: dict[str, Any], filters: list[dict[str, Any]],
                            local_reply: dict[str, Any] | None = None,
                            rds: dict[str, Any] | None = None) -> dict[str, Any]:
    """The HTTP connection manager every listener here uses (and bench/'s plain Envoy, for a fair comparison)."""
    hcm = {
        "name": "envoy.filters.network.http_connection_manager",
        "typed_config": {
            "@type": _HCM,
            "stat_prefix": stat_prefix,
            "codec_type": "AUTO",
            "max_request_headers_kb": 96,
            "request_timeout": "0s",
            "stream_idle_timeout": "300s",
            "normalize_path": True,
            "merge_slashes": True,
            "common_http_protocol_options": {"headers_with_underscores_action": "REJECT_REQUEST"},
            "http2_protocol_options": {"max_concurrent_streams": 256},
            "route_config": {"name": f"{stat_prefix}_routes", "virtual_hosts": [virtual_host]},
            "http_filters": filters,
        },
    }
    if local_reply is not None:
        hcm["typed_config"]["local_reply_config"] = local_reply  # type: ignore[index]
    if rds is not None:
        del hcm["typed_config"]["route_config"]  # type: ignore[attr-defined]
        hcm["typed_config"]["rds"] = rds  # type: ignore[index]
    return hcm


def call_access_log(config: GatewayConfig) -> list[dict[str, Any]]:
    """Envoy's gRPC access log of routed calls, to the processor (extproc/access_log.py feeds the call histograms
    from it): only requests the processor routed (its `muster_edge` metadata names a server), batched by Envoy
    (one gRPC message per second or per 256 KiB per Envoy worker). Off with `metrics: false`."""
    if not config.metrics:
        return []
    return [{
        "name": "envoy.access_loggers.http_grpc",
        "filter": {"metadata_filter": {"matcher": {"filter": answer.NAMESPACE, "path": [{"key": "server"}],
                                                   "value": {"present_match": True}},
                                       "match_if_key_not_found": False}},
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.access_loggers.grpc.v3.HttpGrpcAccessLogConfig",
            "common_config": {"log_name": "muster_edge_calls", "transport_api_version": "V3",
                              "grpc_service": {"envoy_grpc": {"cluster_name": "muster_edge_processor"}},
                              "buffer_flush_interval": "1s", "buffer_size_bytes": 262144}},
    }]


def _with_call_log(config: GatewayConfig, hcm: dict[str, Any]) -> dict[str, Any]:
    logs = call_access_log(config)
    if logs:
        hcm["typed_config"].setdefault("access_log", []).extend(logs)
    return hcm


def http_filters(config: GatewayConfig) -> list[dict[str, Any]]:
    auth = [jwt_filter(config)] if config.auth is not None else []
    return [body_size_filter(config), *auth, headers_in_filter(), ext_proc_filter(config), headers_filter(config),
            headers_out_filter(), *map(answer_filter, ANSWER_CASES)]


def public_listeners(config: GatewayConfig, cds_dir: str | None = None) -> list[dict[str, Any]]:
    """The plain listener (`listen`, for local tools) and, with `tls`, the HTTPS one: the same chain on both;
    with `cds_dir`, their routes come from the route table there (RDS_FILE), else inline without server routes."""
    rds = rds_source(config, cds_dir)
    vhost = {"name": "mcp", "domains": ["*"], "routes": routes(config)}
    filters = [*http_filters(config), _ROUTER]
    replies = local_replies(config) if config.auth is not None else {"mappers": public_reply_mappers()}
    traced = tracing_settings(config)

    def hcm(stat_prefix: str) -> dict[str, Any]:
        manager = http_connection_manager(stat_prefix, vhost, filters, replies, rds)
        manager["typed_config"].update(traced)
        return _with_call_log(config, manager)

    out = [{
        "name": "muster_edge_public",
        "address": _socket(config.listen.host, config.listen.port),
        "per_connection_buffer_limit_bytes": connection_buffer_limit(config),
        "filter_chains": [{"filters": [hcm("muster_edge")]}],
    }]
    if config.tls is not None:
        folder = os.path.dirname(config.tls.cert_file)
        out.append({
            "name": "muster_edge_https",
            "address": _socket(config.tls.listen.host, config.tls.listen.port),
            "per_connection_buffer_limit_bytes": connection_buffer_limit(config),
            "filter_chains": [{
                "transport_socket": {"name": "envoy.transport_sockets.tls", "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext",
                    "common_tls_context": {
                        "alpn_protocols": ["h2", "http/1.1"],
                        "tls_params": {"tls_minimum_protocol_version": "TLSv1_2"},
                        "tls_certificates": [{"certificate_chain": {"filename": config.tls.cert_file},
                                              "private_key": {"filename": config.tls.key_file},
                                              "watched_directory": {"path": folder or "."}}],
                    }}},
                "filters": [hcm("muster_edge_https")],
            }],
        })
    return out


def internal_listener(config: GatewayConfig) -> dict[str, Any]:
    """Where the processor's own upstream calls enter Envoy: no ext_proc, routed by the same header."""
    vhost = {"name": "upstreams", "domains": ["*"], "routes": [
        *_routed("muster_edge_internal_routed",
                 {"cluster_header": ROUTE_HEADER, "timeout": "0s",
                  "cluster_not_found_response_code": "SERVICE_UNAVAILABLE"}, {}),
        {"match": {"prefix": "/"}, "direct_response": {"status": 404}},
    ]}
    return {
        "name": "muster_edge_internal",
        "address": _socket(config.internal_listen.host, config.internal_listen.port),
        "filter_chains": [{"filters": [http_connection_manager("muster_edge_internal", vhost, [_ROUTER])]}],
    }


PROCESSOR_CLUSTER = "muster_edge_processor"
# the sealed session id is URL-safe base64 whose first character comes from a random nonce: uniform over these
_ID_ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
# the ext_proc filters whose streams a pinned session's requests (and their answers) take to its worker
PINNED_FILTERS = (BODY_FILTER, HEADERS_FILTER, *(f"muster_edge.answer_{case}" for case in ANSWER_CASES))


def pins_sessions(config: GatewayConfig) -> bool:
    """Without a store, the workers share no upstream sessions: each handshake-era session is pinned to one."""
    return config.workers > 1 and not config.redis_url


def session_groups(workers: int) -> list[str]:
    """Worker i's share of the session ids, as an RE2 character class on their first character."""
    out = []
    for i in range(workers):
        chars = _ID_ALPHABET[i * len(_ID_ALPHABET) // workers:(i + 1) * len(_ID_ALPHABET) // workers]
        out.append("[" + chars.replace("-", "\\-") + "]")
    return out


def pinned_routes(config: GatewayConfig, unrouted: dict[str, Any]) -> list[dict[str, Any]]:
    """Envoy's gRPC client for ext_proc has no hash policy (1.40: envoy_grpc has cluster_name, authority,
    retry_policy, max_receive_message_length, skip_envoy_headers), so a session is pinned by the route instead:
    the MCP path with an `Mcp-Session-Id` whose first character falls in worker i's share gets the per-route
    ext_proc override whose gRPC service is worker i's cluster (that worker first, the others if it is down)."""
    if not pins_sessions(config):
        return []
    out = []
    for i, group in enumerate(session_groups(config.workers)):
        override = {"@type": "type.googleapis.com/envoy.extensions.filters.http.ext_proc.v3.ExtProcPerRoute",
                    "overrides": {"grpc_service": _grpc_service(f"{PROCESSOR_CLUSTER}_w{i}")}}
        session = {"name": "mcp-session-id", "string_match": {"safe_regex": {"regex": group + ".*"}}}
        # POST and DELETE, and a GET that resumes a stream (Last-Event-ID); a GET that opens the client's
        # notification stream is left to the routes that serve it
        for suffix, methods in (("", {"name": ":method", "string_match": {"exact": "GET"}, "invert_match": True}),
                                ("_resume", {"name": "last-event-id", "present_match": True})):
            out.append({**unrouted, "name": f"muster_edge_mcp_w{i}{suffix}",
                        "match": {"path": config.path, "headers": [session, methods]},
                        "typed_per_filter_config": dict.fromkeys(PINNED_FILTERS, override)})
    return out


def pinned_clusters(config: GatewayConfig, ports: Sequence[int]) -> list[dict[str, Any]]:
    """One cluster per worker for pinned sessions: that worker at priority 0, the others at priority 1, so a
    session whose worker is down or frozen moves on (and opens new upstream sessions there)."""
    if not pins_sessions(config):
        return []
    out = []
    host = config.processor_listen.host
    for i, port in enumerate(ports):
        cluster = processor_cluster(config, ports)
        name = f"{PROCESSOR_CLUSTER}_w{i}"
        cluster["name"] = name
        others = [p for p in ports if p != port]
        cluster["load_assignment"] = {"cluster_name": name, "endpoints": [
            {"priority": 0, "lb_endpoints": [{"endpoint": {"address": _socket(host, port)}}]},
            {"priority": 1, "lb_endpoints": [{"endpoint": {"address": _socket(host, p)}} for p in others]}]}
        out.append(cluster)
    return out


def processor_cluster(config: GatewayConfig, ports: Sequence[int]) -> dict[str, Any]:
    host = config.processor_listen.host
    return {
        "name": "muster_edge_processor",
        "type": "STATIC",
        "connect_timeout": "1s",
        "lb_policy": "LEAST_REQUEST",
        "circuit_breakers": {"thresholds": [{"max_requests": 100000, "max_pending_requests": 100000,
                                             "max_connections": 1000, "max_retries": 100000}]},
        "typed_extension_protocol_options": {"envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
            "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
            "explicit_http_config": {"http2_protocol_options": {
                "max_concurrent_streams": 1000, "connection_keepalive": {"interval": "60s", "timeout": "5s"}}},
        }},
        "load_assignment": {"cluster_name": "muster_edge_processor", "endpoints": [
            {"lb_endpoints": [{"endpoint": {"address": _socket(host, p)}} for p in ports]}]},
        # A frozen worker (SIGSTOP, a stuck event loop) still accepts TCP: only an answer proves it alive. Each
        # worker serves grpc.health.v1; two missed checks a second apart take it out of the balancing.
        "health_checks": [{
            "timeout": "1s", "interval": "1s", "no_traffic_interval": "1s", "unhealthy_interval": "1s",
            "unhealthy_threshold": 2, "healthy_threshold": 1, "grpc_health_check": {},
        }],
        # A dead worker refuses connections: Envoy ejects it at the first refused stream, before the next check.
        "outlier_detection": {
            "split_external_local_origin_errors": True, "consecutive_local_origin_failure": 1,
            "enforcing_consecutive_local_origin_failure": 100, "consecutive_5xx": 0, "enforcing_consecutive_5xx": 0,
            "consecutive_gateway_failure": 0, "enforcing_consecutive_gateway_failure": 0,
            "interval": "1s", "base_ejection_time": "2s", "max_ejection_percent": 50,
        },
    }


OTLP_CLUSTER = "muster_edge_otlp"


def tracing_settings(config: GatewayConfig) -> dict[str, Any]:
    """The public HCM's `tracing` (nothing when tracing is off): Envoy's OpenTelemetry tracer makes the request
    span (sampled at samplingRatio), an upstream span for the routed request (whose context the upstream gets in
    `traceparent`), and an ext_proc client span per processor stream, whose context reaches the processor in the
    stream's gRPC metadata; spans go to the collector over OTLP/gRPC."""
    tracing = config.tracing
    if tracing is None:
        return {}
    return {
        # a client's own x-request-id (any string, kept for log correlation) must not decide sampling: Envoy's
        # default reads the decision from bits of a UUID request id and traces nothing for other ids
        "request_id_extension": {"typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.request_id.uuid.v3.UuidRequestIdConfig",
            "pack_trace_reason": False, "use_request_id_for_trace_sampling": False}},
        # every request reaches the tracer, whose sampler keeps samplingRatio of the traces by trace id (the
        # processor's SDK follows the decision it finds in the context Envoy hands it). No upstream span of its
        # own (one span less per call to make and export): the upstream's traceparent names the request span.
        # The ext_proc client spans stay: with 1.40's emit_client_span: false the processor is handed an
        # unsampled context naming a span that is never exported.
        "tracing": {
            "random_sampling": {"value": 100},
            "spawn_upstream_span": False,
            "provider": {"name": "envoy.tracers.opentelemetry", "typed_config": {
                "@type": "type.googleapis.com/envoy.config.trace.v3.OpenTelemetryConfig",
                "grpc_service": {"envoy_grpc": {"cluster_name": OTLP_CLUSTER}, "timeout": "2s"},
                "service_name": f"{tracing.service_name}-envoy",
                "sampler": {"name": "envoy.tracers.opentelemetry.samplers.trace_id_ratio_based", "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.tracers.opentelemetry.samplers.v3."
                             "TraceIdRatioBasedSamplerConfig",
                    "sampling_percentage": {"numerator": round(tracing.sampling_ratio * 1_000_000),
                                            "denominator": "MILLION"}}},
            }},
        },
    }


def tracing_clusters(config: GatewayConfig) -> list[dict[str, Any]]:
    """The collector, as an HTTP/2 cluster for Envoy's OTLP exporter (none when tracing is off)."""
    tracing = config.tracing
    if tracing is None:
        return []
    host, port = tracing.endpoint.host, tracing.endpoint.port
    cluster: dict[str, Any] = {
        "name": OTLP_CLUSTER,
        "type": "STATIC" if _is_ip(host) else "STRICT_DNS",
        "connect_timeout": "2s",
        "dns_lookup_family": "V4_PREFERRED",
        "typed_extension_protocol_options": {"envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
            "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
            "explicit_http_config": {"http2_protocol_options": {}}}},
        "load_assignment": {"cluster_name": OTLP_CLUSTER,
                            "endpoints": [{"lb_endpoints": [{"endpoint": {"address": _socket(host, port)}}]}]},
    }
    if tracing.tls:
        cluster["transport_socket"] = {"name": "envoy.transport_sockets.tls", "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
            "sni": host, "common_tls_context": {"validation_context": {"trusted_ca": {"filename": _CA_BUNDLE}}}}}
    return [cluster]


def tracing_runtime(config: GatewayConfig) -> dict[str, Any]:
    """Envoy's OpenTelemetry tracer exports every 5 s by default; once a second keeps a trace's Envoy and
    processor spans arriving together (the processor's batch is sent every second too). It also exports as soon
    as 5 spans wait (`min_flush_spans`): at 1,000 traced calls a second that is ~600 export RPCs a second, each
    costing Envoy and the collector a gRPC call, so it waits for a batch of the processor's size (512) instead."""
    if config.tracing is None:
        return {}
    return {"layered_runtime": {"layers": [
        {"name": "muster_edge_tracing", "static_layer": {"tracing.opentelemetry.flush_interval_ms": 1000,
                                                         "tracing.opentelemetry.min_flush_spans": 512}},
        {"name": "admin", "admin_layer": {}}]}}


def bootstrap(config: GatewayConfig, ports: Sequence[int], cds_dir: str,
              node_id: str = "muster-edge") -> dict[str, Any]:
    """The standalone gateway: public listener, internal listener, processor cluster, and the catalog's clusters
    and routes from files (CDS_FILE, RDS_FILE) or, with `xds: true`, from the processor over ADS."""
    return {
        "node": envoy_node(config, node_id),
        "admin": {"address": _socket(config.envoy_admin.host, config.envoy_admin.port)},
        "overload_manager": {"resource_monitors": [{
            "name": "envoy.resource_monitors.global_downstream_max_connections",
            "typed_config": {"@type": "type.googleapis.com/envoy.extensions.resource_monitors."
                                      "downstream_connections.v3.DownstreamConnectionsConfig",
                             "max_active_downstream_connections": 50000}}]},
        "dynamic_resources": dynamic_resources(config, cds_dir),
        "static_resources": {
            "listeners": [*public_listeners(config, cds_dir), internal_listener(config)],
            "clusters": [processor_cluster(config, ports), *pinned_clusters(config, ports), notify_cluster(config),
                         *([idp_cluster(config)] if config.auth else []), *tracing_clusters(config),
                         *xds_clusters(config, ports)],
        },
        **tracing_runtime(config),
    }


def mesh_pieces(config: GatewayConfig, ports: Sequence[int], cds_dir: str) -> dict[str, Any]:
    """What a mesh operator adds to an Envoy they already run, each piece under its own key."""
    return {
        "http_filters": http_filters(config),
        "routes": routes(config),
        "clusters": [processor_cluster(config, ports), *pinned_clusters(config, ports), notify_cluster(config),
                     *([idp_cluster(config)] if config.auth else []), *xds_clusters(config, ports)],
        "local_reply_config": local_replies(config) if config.auth else {"mappers": public_reply_mappers()},
        "listeners": [internal_listener(config)],
        **mesh_xds_pieces(config, ports, cds_dir),
        "access_log": call_access_log(config),
    }


class _NoAliases(yaml.SafeDumper):
    """Shared sub-documents are written out in full: Envoy configs are read by people too."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


def dump(doc: Any) -> str:
    return yaml.dump(doc, Dumper=_NoAliases, sort_keys=False, default_flow_style=False)


def write_atomic(path: str, text: str) -> None:
    """Replace a file in one rename, so Envoy's directory watch never reads half a file."""
    folder = os.path.dirname(path) or "."
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=".yaml")
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write(text)
    os.replace(tmp, path)


def processor_ports(config: GatewayConfig) -> list[int]:
    return [config.processor_listen.port + i for i in range(config.workers)]


# ---- the catalog's clusters and routes over gRPC xDS (`xds: true`) -----------------------------------------------

XDS_CLUSTER = "muster_edge_xds"
NODE_BRIDGE_KEY = "muster_edge_bridge"  # node metadata: where this Envoy's own bridge listens (per replica)


def envoy_node(config: GatewayConfig, node_id: str = "muster-edge") -> dict[str, Any]:
    """Envoy's node: its id names it in the processor's ACK tracking (unique per Envoy: `--service-node` overrides
    it), and its metadata carries its own bridge's loopback address, so xDS points bridged clusters there."""
    node: dict[str, Any] = {"id": node_id, "cluster": "muster-edge"}
    if config.xds:
        bridge = config.bridge_listen if config.bridge_listen.port else Address("127.0.0.1", DEFAULT_BRIDGE_PORT)
        node["metadata"] = {NODE_BRIDGE_KEY: str(bridge)}
    return node


def dynamic_resources(config: GatewayConfig, cds_dir: str) -> dict[str, Any]:
    if not config.xds:
        return {"cds_config": {
            "resource_api_version": "V3",
            "path_config_source": {"path": os.path.join(cds_dir, CDS_FILE), "watched_directory": {"path": cds_dir}},
        }}
    return {
        # one aggregated stream to one processor worker; any worker serves the same versions (content hashes)
        "ads_config": {"api_type": "GRPC", "transport_api_version": "V3", "set_node_on_first_message_only": True,
                       "grpc_services": [{"envoy_grpc": {"cluster_name": XDS_CLUSTER}}]},
        "cds_config": {"ads": {}, "resource_api_version": "V3"},
    }


def rds_source(config: GatewayConfig, cds_dir: str | None) -> dict[str, Any] | None:
    """Where the public listeners' route table comes from: the processor's ADS stream, the RDS file, or inline."""
    if config.xds:
        return {"route_config_name": ROUTE_TABLE, "config_source": {"ads": {}, "resource_api_version": "V3"}}
    return _rds(cds_dir) if cds_dir is not None else None


def xds_clusters(config: GatewayConfig, ports: Sequence[int]) -> list[dict[str, Any]]:
    """The processor workers once more, as the xDS server: a cluster of its own, so the one long-lived ADS
    stream never shares a connection (or balancing and health settings) with the per-request ext_proc streams."""
    if not config.xds:
        return []
    host = config.processor_listen.host
    return [{
        "name": XDS_CLUSTER,
        "type": "STATIC" if _is_ip(host) else "STRICT_DNS",
        "connect_timeout": "1s",
        "typed_extension_protocol_options": {"envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
            "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
            # a frozen worker still holds the TCP connection: its missed PING answer moves the stream to another
            "explicit_http_config": {"http2_protocol_options": {
                "connection_keepalive": {"interval": "5s", "timeout": "3s"}}}}},
        "load_assignment": {"cluster_name": XDS_CLUSTER, "endpoints": [
            {"lb_endpoints": [{"endpoint": {"address": _socket(host, p)}} for p in ports]}]},
    }]


def mesh_xds_pieces(config: GatewayConfig, ports: Sequence[int], cds_dir: str) -> dict[str, Any]:
    """The mesh operator's Envoy takes its upstream clusters from the same source as the standalone gateway."""
    pieces: dict[str, Any] = {"cds_config": dynamic_resources(config, cds_dir)["cds_config"]}
    if config.xds:
        pieces["ads_config"] = dynamic_resources(config, cds_dir)["ads_config"]
    return pieces
