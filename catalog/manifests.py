"""MCPServer manifests (muster.giantswarm.io/v1alpha1) and their admission rules.

Pure: takes already-read YAML text, returns typed servers and the reasons any document was refused.
Every rule Muster's CRD enforces (schema patterns and CEL) is checked here so a manifest that Kubernetes
would refuse is refused by the filesystem catalog too, with the file and field named.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import yaml

API_VERSION = "muster.giantswarm.io/v1alpha1"
KIND = "MCPServer"
TRANSPORTS = ("stdio", "streamable-http", "sse")
SUPPORTED_TRANSPORTS = TRANSPORTS
# stdio and sse servers are reached through the gateway's bridge (extproc/bridges): this authority names it.
BRIDGE_AUTHORITY = "muster-edge-bridge"
BRIDGED = ("stdio", "sse")

_NAME = re.compile(r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")
_PREFIX = re.compile(r"^[a-zA-Z][a-zA-Z0-9_-]*$")
_INSTANCE_ARG = re.compile(r"^[a-zA-Z][a-zA-Z0-9_]*$")
_URL = re.compile(r"^https?://[^\s/$.?#].[^\s]*$")
# Muster requires HTTPS; like Muster's own baseUrl rule, plain HTTP is accepted on loopback only.
_HTTPS = re.compile(r"(https://|http://(127\.0\.0\.1|localhost|\[::1\])(:[0-9]+)?(/|$))\S*")
_ISSUER = re.compile(r"^(https://[^/?#]+|http://(127\.0\.0\.1|localhost|\[::1\])(:[0-9]+)?)(/[^?#]*[^/?#])?$")
_CONNECTOR = re.compile(r"^[a-zA-Z][a-zA-Z0-9_-]*$")


@dataclass(frozen=True)
class Family:
    name: str
    instance_arg: str


@dataclass(frozen=True)
class SecretRef:
    name: str
    namespace: str
    client_id_key: str = "client-id"
    client_secret_key: str = "client-secret"


@dataclass(frozen=True)
class TokenExchange:
    enabled: bool = False
    dex_token_endpoint: str = ""
    expected_issuer: str = ""
    connector_id: str = ""
    scopes: str = "openid profile email groups"
    client_credentials_secret_ref: SecretRef | None = None
    audience: str = ""
    resource: str = ""


@dataclass(frozen=True)
class AuthorizationServer:
    issuer: str
    scopes: str = ""


@dataclass(frozen=True)
class Auth:
    type: str = "none"
    forward_token: bool = False
    required_audiences: tuple[str, ...] = ()
    token_exchange: TokenExchange | None = None
    authorization_server: AuthorizationServer | None = None


@dataclass(frozen=True)
class MCPServer:
    """One upstream MCP server as declared by its manifest."""

    name: str
    namespace: str
    type: str
    source: str
    url: str = ""
    tool_prefix: str = ""
    family: Family | None = None
    description: str = ""
    auto_start: bool = False
    command: str = ""
    args: tuple[str, ...] = ()
    env: Mapping[str, str] = field(default_factory=dict)
    headers: Mapping[str, str] = field(default_factory=dict)
    auth: Auth = Auth()
    timeout: int = 30

    @property
    def server_prefix(self) -> str:
        """Muster's serverPrefix: toolPrefix, else the MCPServer name."""
        return self.tool_prefix or self.name

    @property
    def bridged(self) -> bool:
        """stdio and sse servers are served by the gateway's bridge over streamable HTTP, not reached directly."""
        return self.type in BRIDGED

    @property
    def authority(self) -> str:
        return BRIDGE_AUTHORITY if self.bridged else urlsplit(self.url).netloc

    @property
    def path(self) -> str:
        if self.bridged:
            return f"/bridge/{self.name}"
        parts = urlsplit(self.url)
        return (parts.path or "/") + (f"?{parts.query}" if parts.query else "")


@dataclass(frozen=True)
class AdmissionError:
    """Why one document was refused; str() is the line operators read in logs and status."""

    source: str
    field: str
    message: str
    name: str = ""
    kind: str = "MCPServer"

    def __str__(self) -> str:
        who = f" ({self.kind} {self.name})" if self.name else ""
        return f"{self.source}{who}: {self.field}: {self.message}"


class _Refused(Exception):
    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field
        self.message = message
        self.name = ""


def _obj(value: Any, path: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise _Refused(path, "must be an object")
    return value


def _str(spec: Mapping[str, Any], key: str, path: str, default: str = "") -> str:
    value = spec.get(key, default)
    if value is None:
        return default
    if not isinstance(value, str):
        raise _Refused(f"{path}.{key}", "must be a string")
    return value


def _bool(spec: Mapping[str, Any], key: str, path: str) -> bool:
    value = spec.get(key, False)
    if not isinstance(value, bool):
        raise _Refused(f"{path}.{key}", "must be true or false")
    return value


def _str_map(spec: Mapping[str, Any], key: str, path: str) -> dict[str, str]:
    value = _obj(spec.get(key), f"{path}.{key}")
    for k, v in value.items():
        if not isinstance(k, str) or not isinstance(v, str):
            raise _Refused(f"{path}.{key}", "must map strings to strings")
    return dict(value)


def _match(pattern: re.Pattern[str], value: str, path: str) -> None:
    if not pattern.fullmatch(value):
        raise _Refused(path, f"{value!r} does not match {pattern.pattern}")


def _unknown(spec: Mapping[str, Any], known: Iterable[str], path: str) -> None:
    extra = sorted(set(spec) - set(known))
    if extra:
        raise _Refused(f"{path}.{extra[0]}", "unknown field")


def _parse_family(raw: Any) -> Family | None:
    if raw is None:
        return None
    spec = _obj(raw, "spec.family")
    _unknown(spec, ("name", "instanceArg"), "spec.family")
    name = _str(spec, "name", "spec.family")
    arg = _str(spec, "instanceArg", "spec.family")
    if not name:
        raise _Refused("spec.family.name", "is required when family is set")
    if not arg:
        raise _Refused("spec.family.instanceArg", "is required when family is set")
    _match(_PREFIX, name, "spec.family.name")
    _match(_INSTANCE_ARG, arg, "spec.family.instanceArg")
    return Family(name=name, instance_arg=arg)


def _parse_token_exchange(raw: Any, namespace: str) -> TokenExchange | None:
    if raw is None:
        return None
    p = "spec.auth.tokenExchange"
    spec = _obj(raw, p)
    known = ("enabled", "dexTokenEndpoint", "expectedIssuer", "connectorId", "scopes",
             "clientCredentialsSecretRef", "audience", "resource")
    _unknown(spec, known, p)
    endpoint = _str(spec, "dexTokenEndpoint", p)
    issuer = _str(spec, "expectedIssuer", p)
    connector = _str(spec, "connectorId", p)
    if endpoint:
        _match(_HTTPS, endpoint, f"{p}.dexTokenEndpoint")
    if issuer:
        _match(_HTTPS, issuer, f"{p}.expectedIssuer")
    if connector:
        _match(_CONNECTOR, connector, f"{p}.connectorId")
    ref = None
    if spec.get("clientCredentialsSecretRef") is not None:
        rp = f"{p}.clientCredentialsSecretRef"
        rs = _obj(spec["clientCredentialsSecretRef"], rp)
        _unknown(rs, ("name", "namespace", "clientIdKey", "clientSecretKey"), rp)
        ref_name = _str(rs, "name", rp)
        if not ref_name:
            raise _Refused(f"{rp}.name", "is required")
        ref = SecretRef(
            name=ref_name,
            namespace=_str(rs, "namespace", rp) or namespace,
            client_id_key=_str(rs, "clientIdKey", rp) or "client-id",
            client_secret_key=_str(rs, "clientSecretKey", rp) or "client-secret",
        )
    return TokenExchange(
        enabled=_bool(spec, "enabled", p),
        dex_token_endpoint=endpoint,
        expected_issuer=issuer,
        connector_id=connector,
        scopes=_str(spec, "scopes", p, "openid profile email groups") or "openid profile email groups",
        client_credentials_secret_ref=ref,
        audience=_str(spec, "audience", p),
        resource=_str(spec, "resource", p),
    )


def _parse_auth(raw: Any, namespace: str) -> Auth:
    if raw is None:
        return Auth()
    p = "spec.auth"
    spec = _obj(raw, p)
    _unknown(spec, ("type", "forwardToken", "requiredAudiences", "tokenExchange", "authorizationServer"), p)
    kind = _str(spec, "type", p, "none") or "none"
    if kind not in ("oauth", "none"):
        raise _Refused(f"{p}.type", f"unsupported value {kind!r} (supported: oauth, none)")
    audiences = spec.get("requiredAudiences") or []
    if not isinstance(audiences, list) or not all(isinstance(a, str) for a in audiences):
        raise _Refused(f"{p}.requiredAudiences", "must be a list of strings")
    exchange = _parse_token_exchange(spec.get("tokenExchange"), namespace)
    auth_server = None
    if spec.get("authorizationServer") is not None:
        ap = f"{p}.authorizationServer"
        a = _obj(spec["authorizationServer"], ap)
        _unknown(a, ("issuer", "scopes"), ap)
        issuer = _str(a, "issuer", ap)
        if not issuer:
            raise _Refused(f"{ap}.issuer", "is required")
        _match(_ISSUER, issuer, f"{ap}.issuer")
        if any(c.isspace() for c in issuer):
            raise _Refused(f"{ap}.issuer", "must not contain white space")
        auth_server = AuthorizationServer(issuer=issuer, scopes=_str(a, "scopes", ap))
    forward = _bool(spec, "forwardToken", p)
    # Muster's CEL rules on spec.auth, with its messages.
    if auth_server is not None and kind != "oauth":
        raise _Refused(f"{p}.authorizationServer", "authorizationServer is only valid when type is oauth")
    if auth_server is not None and forward:
        raise _Refused(p, "forwardToken bypasses per-backend OAuth; set one or the other, not both")
    if auth_server is not None and exchange is not None and exchange.enabled:
        raise _Refused(p, "tokenExchange has its own issuer/endpoint config; set one or the other, not both")
    return Auth(
        type=kind,
        forward_token=forward,
        required_audiences=tuple(audiences),
        token_exchange=exchange,
        authorization_server=auth_server,
    )


_SPEC_FIELDS = ("type", "toolPrefix", "family", "description", "autoStart", "command", "args", "url",
                "env", "headers", "auth", "timeout")


def metadata_name(meta: dict[str, Any]) -> str:
    """metadata.name of any catalog resource (MCPServer, Workflow): required, and a Kubernetes name."""
    name = meta.get("name")
    if not isinstance(name, str) or not name:
        raise _Refused("metadata.name", "name is required")
    if len(name) > 253 or not _NAME.fullmatch(name):
        raise _Refused("metadata.name",
                       f"{name!r} is not a valid Kubernetes name (lower-case letters, digits, '-', '.')")
    return name


def parse_server(doc: Any, source: str) -> MCPServer:
    """Validate one YAML document as an MCPServer; raises AdmissionError-carrying _Refused."""
    root = _obj(doc, "document")
    if root.get("apiVersion") != API_VERSION:
        raise _Refused("apiVersion", f"must be {API_VERSION!r}, got {root.get('apiVersion')!r}")
    if root.get("kind") != KIND:
        raise _Refused("kind", f"must be {KIND!r}, got {root.get('kind')!r}")
    meta = _obj(root.get("metadata"), "metadata")
    name = metadata_name(meta)
    namespace = meta.get("namespace") or "default"
    if not isinstance(namespace, str):
        raise _Refused("metadata.namespace", "must be a string")
    try:
        return _parse_spec(root, name, namespace, source)
    except _Refused as refused:
        refused.name = name
        raise


def _parse_spec(root: Mapping[str, Any], name: str, namespace: str, source: str) -> MCPServer:
    spec = _obj(root.get("spec"), "spec")
    _unknown(spec, _SPEC_FIELDS, "spec")
    kind = _str(spec, "type", "spec")
    if not kind:
        raise _Refused("spec.type", "type is required")
    if kind not in TRANSPORTS:
        raise _Refused("spec.type", f"unsupported MCP server type: {kind} (supported: stdio, streamable-http, sse)")
    tool_prefix = _str(spec, "toolPrefix", "spec")
    if tool_prefix:
        _match(_PREFIX, tool_prefix, "spec.toolPrefix")
    description = _str(spec, "description", "spec")
    if len(description) > 500:
        raise _Refused("spec.description", "must be at most 500 characters")
    args = spec.get("args")
    if args is not None and (not isinstance(args, list) or not all(isinstance(a, str) for a in args)):
        raise _Refused("spec.args", "must be a list of strings")
    url = _str(spec, "url", "spec")
    if url:
        _match(_URL, url, "spec.url")
    timeout = spec.get("timeout", 30)
    if isinstance(timeout, bool) or not isinstance(timeout, int) or not 1 <= timeout <= 300:
        raise _Refused("spec.timeout", "must be a whole number of seconds from 1 to 300")
    # Muster's CEL rules on the MCPServer object, with its messages.
    if kind == "stdio" and "command" not in spec:
        raise _Refused("spec.command", "command is required when type is stdio")
    if kind != "stdio" and "url" not in spec:
        raise _Refused("spec.url", "url is required when type is streamable-http or sse")
    if kind != "stdio" and "args" in spec:
        raise _Refused("spec.args", "args field is only allowed when type is stdio")
    if kind == "stdio" and "headers" in spec:
        raise _Refused("spec.headers", "headers field is only allowed when type is streamable-http or sse")
    auth = _parse_auth(spec.get("auth"), namespace)
    if kind == "stdio" and auth.type != "none":
        raise _Refused("spec.auth",
                       "auth configuration is only supported for remote server types (streamable-http or sse)")
    if kind == "stdio" and not _str(spec, "command", "spec").strip():
        raise _Refused("spec.command", "command must not be empty")
    return MCPServer(
        name=name,
        namespace=namespace,
        type=kind,
        source=source,
        url=url,
        tool_prefix=tool_prefix,
        family=_parse_family(spec.get("family")),
        description=description,
        auto_start=_bool(spec, "autoStart", "spec"),
        command=_str(spec, "command", "spec"),
        args=tuple(args or ()),
        env=_str_map(spec, "env", "spec"),
        headers=_str_map(spec, "headers", "spec"),
        auth=auth,
        timeout=timeout,
    )


@dataclass(frozen=True)
class LoadResult:
    servers: tuple[MCPServer, ...]
    errors: tuple[AdmissionError, ...]
    workflows: tuple[Any, ...] = ()  # catalog.workflows.Workflow, admitted by extproc.catalog_files


def _documents(text: str) -> tuple[list[Any], str]:
    """The documents of a YAML stream up to the first syntax error, and that error (if any)."""
    docs: list[Any] = []
    try:
        for doc in yaml.safe_load_all(text):
            docs.append(doc)
    except yaml.YAMLError as exc:
        return docs, str(exc).replace("\n", " ")
    return docs, ""


def load_documents(files: Iterable[tuple[str, str]]) -> LoadResult:
    """Admit every document of every (source, text) pair; one bad document never refuses another."""
    servers: dict[str, MCPServer] = {}
    errors: list[AdmissionError] = []
    for source, text in sorted(files):
        docs, broken = _documents(text)
        if broken:
            errors.append(AdmissionError(source if len(docs) == 0 else f"{source}[{len(docs)}]", "document",
                                         f"invalid YAML: {broken}"))
        several = len([d for d in docs if d is not None]) > 1 or bool(broken)
        for index, doc in enumerate(docs):
            if doc is None or (isinstance(doc, dict) and doc.get("kind") == "Workflow"):
                continue  # Workflows are admitted by catalog.workflows
            where = f"{source}[{index}]" if several else source
            try:
                server = parse_server(doc, where)
            except _Refused as refused:
                errors.append(AdmissionError(where, refused.field, refused.message, refused.name))
                continue
            if server.name in servers:
                first = servers[server.name].source
                errors.append(AdmissionError(where, "metadata.name",
                                             f"duplicate MCPServer name (first defined in {first})", server.name))
                continue
            servers[server.name] = server
    return LoadResult(tuple(servers[n] for n in sorted(servers)), tuple(errors))
