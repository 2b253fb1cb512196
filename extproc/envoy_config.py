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
from extproc import answer
from extproc.upstream import ROUTE_HEADER, cluster_name, origin_cluster_name

CDS_FILE = "cds.yaml"
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
        return _cluster(cluster_name(server.name), f"http://{where}", server.timeout)
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


def _ext_proc_common() -> dict[str, Any]:
    return {
        "@type": _EXT_PROC,
        "grpc_service": {"envoy_grpc": {"cluster_name": "muster_edge_processor"}, "timeout": "5s"},
        "failure_mode_allow": False,
        "message_timeout": "2s",
        "max_message_timeout": "90s",
        "mutation_rules": {"allow_all_routing": True, "allow_envoy": True, "disallow_is_error": True},
        "status_on_error": {"code": "ServiceUnavailable"},
    }


def ext_proc_filter(config: GatewayConfig) -> dict[str, Any]:
    """The request filter: headers and the whole body, never the answer (the answer filter takes those)."""
    return {
        "name": "envoy.filters.http.ext_proc",
        "typed_config": {
            **_ext_proc_common(),
            "processing_mode": {
                "request_header_mode": "SEND", "request_body_mode": "BUFFERED",
                "response_header_mode": "SKIP", "response_body_mode": "NONE",
                "request_trailer_mode": "SKIP", "response_trailer_mode": "SKIP",
            },
            "metadata_options": {"forwarding_namespaces": {"untyped": ["envoy.filters.http.jwt_authn"]},
                                 "receiving_namespaces": {"untyped": [answer.NAMESPACE, answer.RESEND_NAMESPACE]}},
        },
    }


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


_FLAG = {"string_match": {"exact": "1"}}
# When an answer needs the processor, from the flags the request's stream left (extproc/answer.py) and the
# response itself. The three cases never overlap, so at most one answer filter runs for a response.
# The flags are written in the request filter's reply to the request body; the answer filters' matchers first
# run when their own request callbacks do, which the request filter holds back until that reply because the
# body is BUFFERED (keep it so: with a streamed request body the matchers would see no flags and skip).
ANSWER_CASES: dict[str, dict[str, Any]] = {
    # a refused renewable credential, a lost upstream session, an upstream failure: decided on the status
    "status": {"or_matcher": {"predicate": [
        _all(_metadata_is(answer.ON_401, _FLAG), _status("401")),
        _all(_metadata_is(answer.ON_404, _FLAG), _status("404")),
        _all(_metadata_is("server", {"present_match": True}), _status_class("5xx")),
    ]}},
    # a JSON answer to rewrite: the whole body in one message, no headers message
    "json": _all(_metadata_is(answer.ON_JSON, _FLAG), _status_class("2xx"), _content_type("json")),
    # an SSE answer to rewrite: each chunk as it comes, no headers message
    "sse": _all(_metadata_is(answer.ON_SSE, _FLAG), _status_class("2xx"), _content_type("event-stream")),
}
_ANSWER_MODES = {
    "status": {"response_header_mode": "SEND", "response_body_mode": "NONE"},
    "json": {"response_header_mode": "SKIP", "response_body_mode": "BUFFERED"},
    "sse": {"response_header_mode": "SKIP", "response_body_mode": "STREAMED"},
}


def answer_filter(case: str) -> dict[str, Any]:
    """One answer filter: an ext_proc that Envoy skips unless ANSWER_CASES[case] holds, so a call whose answer
    needs nothing costs two ext_proc messages (request headers and body) and none for its answer."""
    processor = {
        **_ext_proc_common(),
        "processing_mode": {"request_header_mode": "SKIP", "request_body_mode": "NONE",
                            "request_trailer_mode": "SKIP", "response_trailer_mode": "SKIP", **_ANSWER_MODES[case]},
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
    return {
        "name": "envoy.filters.http.body_size_limit",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.body_size_limit.v3.BodySizeLimit",
            "max_request_bytes": config.max_request_bytes,
        },
    }


def _no_ext_proc() -> dict[str, Any]:
    return {"envoy.filters.http.ext_proc": {
        "@type": "type.googleapis.com/envoy.extensions.filters.http.ext_proc.v3.ExtProcPerRoute", "disabled": True}}


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


def routes(config: GatewayConfig) -> list[dict[str, Any]]:
    """The public routes: protected resource metadata; routed calls by the processor's header; the MCP path."""
    not_routed = ('{"jsonrpc":"2.0","id":null,"error":{"code":-32603,'
                  '"message":"muster-edge: the request was not routed"}}')
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
    return [*prm, *callback,
        {
            "name": "muster_edge_routed",
            "match": {"prefix": "/", "headers": [{"name": ROUTE_HEADER, "present_match": True}]},
            "route": {"cluster_header": ROUTE_HEADER, "timeout": "0s", "idle_timeout": "300s",
                      "cluster_not_found_response_code": "SERVICE_UNAVAILABLE"},
            "request_headers_to_remove": [ROUTE_HEADER],
            "response_headers_to_remove": ["mcp-session-id"],
        },
        {
            "name": "muster_edge_mcp",
            "match": {"path": config.path},
            "direct_response": {"status": 500, "body": {"inline_string": not_routed}},
            "response_headers_to_add": [{"header": {"key": "content-type", "value": "application/json"}}],
        },
        {
            "name": "muster_edge_not_found",
            "match": {"prefix": "/"},
            "direct_response": {"status": 404, "body": {"inline_string": "not found\n"}},
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

    def mapper(op: str, status: int, what: str) -> dict[str, Any]:
        body = ('{"jsonrpc":"2.0","id":%DYNAMIC_METADATA(muster_edge:rpc_id)%,"error":{"code":-32603,"message":'
                f'"Upstream server \'{server}\' {what}","data":{{"server":"{server}","status":%RESPONSE_CODE%,'
                '"details":"%RESPONSE_CODE_DETAILS%"}}}')
        return {
            "filter": {"and_filter": {"filters": [
                {"status_code_filter": {"comparison": {"op": op, "value": {
                    "default_value": status, "runtime_key": f"muster_edge.upstream_{status}"}}}}, routed]}},
            "body_format_override": {"text_format_source": {"inline_string": body},
                                     "content_type": "application/json"},
        }

    return [mapper("EQ", 504, "timed out"), mapper("EQ", 503, "is unavailable"), mapper("GE", 500, "failed")]


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

    def mapper(value: str, when: dict[str, Any]) -> dict[str, Any]:
        return {"filter": when, "headers_to_add": [{"header": {"key": "www-authenticate", "value": value},
                                                     "append_action": "OVERWRITE_IF_EXISTS_OR_ADD"}]}

    invalid = f'Bearer error="invalid_token", {challenge[len("Bearer "):]}'
    return {"mappers": [*upstream_failure_mappers(),
                        mapper(invalid, {"and_filter": {"filters": [unauthorized, has_token]}}),
                        mapper(challenge, unauthorized)]}


def http_connection_manager(stat_prefix: str, virtual_host: dict[str, Any], filters: list[dict[str, Any]],
                            local_reply: dict[str, Any] | None = None) -> dict[str, Any]:
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
    return hcm


def http_filters(config: GatewayConfig) -> list[dict[str, Any]]:
    auth = [jwt_filter(config)] if config.auth is not None else []
    return [body_size_filter(config), *auth, ext_proc_filter(config), *map(answer_filter, ANSWER_CASES)]


def public_listeners(config: GatewayConfig) -> list[dict[str, Any]]:
    """The plain listener (`listen`, for local tools) and, with `tls`, the HTTPS one: the same chain on both."""
    vhost = {"name": "mcp", "domains": ["*"], "routes": routes(config)}
    filters = [*http_filters(config), _ROUTER]
    replies = local_replies(config) if config.auth is not None else {"mappers": upstream_failure_mappers()}
    out = [{
        "name": "muster_edge_public",
        "address": _socket(config.listen.host, config.listen.port),
        "per_connection_buffer_limit_bytes": 1 << 20,
        "filter_chains": [{"filters": [http_connection_manager("muster_edge", vhost, filters, replies)]}],
    }]
    if config.tls is not None:
        folder = os.path.dirname(config.tls.cert_file)
        out.append({
            "name": "muster_edge_https",
            "address": _socket(config.tls.listen.host, config.tls.listen.port),
            "per_connection_buffer_limit_bytes": 1 << 20,
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
                "filters": [http_connection_manager("muster_edge_https", vhost, filters, replies)],
            }],
        })
    return out


def internal_listener(config: GatewayConfig) -> dict[str, Any]:
    """Where the processor's own upstream calls enter Envoy: no ext_proc, routed by the same header."""
    vhost = {"name": "upstreams", "domains": ["*"], "routes": [
        {"match": {"prefix": "/", "headers": [{"name": ROUTE_HEADER, "present_match": True}]},
         "route": {"cluster_header": ROUTE_HEADER, "timeout": "0s",
                   "cluster_not_found_response_code": "SERVICE_UNAVAILABLE"},
         "request_headers_to_remove": [ROUTE_HEADER]},
        {"match": {"prefix": "/"}, "direct_response": {"status": 404}},
    ]}
    return {
        "name": "muster_edge_internal",
        "address": _socket(config.internal_listen.host, config.internal_listen.port),
        "filter_chains": [{"filters": [http_connection_manager("muster_edge_internal", vhost, [_ROUTER])]}],
    }


def processor_cluster(config: GatewayConfig, ports: Sequence[int]) -> dict[str, Any]:
    host = config.processor_listen.host
    return {
        "name": "muster_edge_processor",
        "type": "STATIC",
        "connect_timeout": "1s",
        "lb_policy": "LEAST_REQUEST",
        "circuit_breakers": {"thresholds": [{"max_requests": 100000, "max_pending_requests": 100000,
                                             "max_connections": 1000}]},
        "typed_extension_protocol_options": {"envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
            "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
            "explicit_http_config": {"http2_protocol_options": {
                "max_concurrent_streams": 1000, "connection_keepalive": {"interval": "60s", "timeout": "5s"}}},
        }},
        "load_assignment": {"cluster_name": "muster_edge_processor", "endpoints": [
            {"lb_endpoints": [{"endpoint": {"address": _socket(host, p)}} for p in ports]}]},
    }


def bootstrap(config: GatewayConfig, ports: Sequence[int], cds_dir: str) -> dict[str, Any]:
    """The standalone gateway: public listener, internal listener, processor cluster, file-based CDS."""
    return {
        "node": {"id": "muster-edge", "cluster": "muster-edge"},
        "admin": {"address": _socket(config.envoy_admin.host, config.envoy_admin.port)},
        "overload_manager": {"resource_monitors": [{
            "name": "envoy.resource_monitors.global_downstream_max_connections",
            "typed_config": {"@type": "type.googleapis.com/envoy.extensions.resource_monitors."
                                      "downstream_connections.v3.DownstreamConnectionsConfig",
                             "max_active_downstream_connections": 50000}}]},
        "dynamic_resources": {"cds_config": {
            "resource_api_version": "V3",
            "path_config_source": {"path": os.path.join(cds_dir, CDS_FILE), "watched_directory": {"path": cds_dir}},
        }},
        "static_resources": {
            "listeners": [*public_listeners(config), internal_listener(config)],
            "clusters": [processor_cluster(config, ports), *([idp_cluster(config)] if config.auth else [])],
        },
    }


def mesh_pieces(config: GatewayConfig, ports: Sequence[int], cds_dir: str) -> dict[str, Any]:
    """What a mesh operator adds to an Envoy they already run, each piece under its own key."""
    return {
        "http_filters": http_filters(config),
        "routes": routes(config),
        "clusters": [processor_cluster(config, ports), *([idp_cluster(config)] if config.auth else [])],
        **({"local_reply_config": local_replies(config)} if config.auth else {}),
        "listeners": [internal_listener(config)],
        "cds_config": bootstrap(config, ports, cds_dir)["dynamic_resources"]["cds_config"],
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
