"""The gateway config file: one YAML document that says where things listen and how names are exposed."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field, replace
from typing import Any
from urllib.parse import urlsplit

import yaml

from catalog.policy import Policy, PolicyError, parse_policy

PREFIX_MODES = ("always", "conditional", "never")
TOOL_MODES = ("native", "meta", "both")
LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "[::1]")
# The bridge port rendered for Envoy when the config leaves it to the gateway (`muster-edge render`).
DEFAULT_BRIDGE_PORT = 18081
_PREFIX = re.compile(r"^[a-zA-Z][a-zA-Z0-9_-]*$")
_KNOWN = {
    "apiVersion", "kind", "listen", "path", "internalListen", "envoyAdmin", "processor", "catalog",
    "prefix", "prefixMode", "maxRequestBytes", "sessionKey", "stateDir", "listPageSize", "serverName",
    "instructions", "listTtlMs", "listTtlFloorMs", "allowedOrigins", "listWaitMs", "allowedHosts", "tls",
    "auth", "policy", "audit", "secretsDir", "store", "upstreamOAuth", "restart", "sessions", "edgeLogin",
    "statusToken", "toolMode", "workflows", "bridges", "logFormat", "metrics", "envoyConcurrency", "auditVolume",
}
_KNOWN |= {"xds"}
_KNOWN |= {"workflows"}
_KNOWN |= {"tracing"}
LOG_FORMATS = ("text", "json")
AUDIT_VOLUMES = ("all", "denied", "none")


class ConfigError(ValueError):
    """A gateway config that cannot be used; the message names the file and the field."""


@dataclass(frozen=True)
class Address:
    host: str
    port: int

    def __str__(self) -> str:
        return f"{self.host}:{self.port}"

    @classmethod
    def parse(cls, value: Any, field: str) -> Address:
        if not isinstance(value, str) or ":" not in value:
            raise ConfigError(f"{field}: expected HOST:PORT, got {value!r}")
        host, _, port = value.rpartition(":")
        if not port.isdigit() or not 0 <= int(port) <= 65535 or not host:
            raise ConfigError(f"{field}: expected HOST:PORT, got {value!r}")
        return cls(host.strip("[]"), int(port))


@dataclass(frozen=True)
class TlsConfig:
    """The HTTPS listener: where it listens and the certificate Envoy serves (files, hot-reloaded)."""

    listen: Address
    cert_file: str
    key_file: str


@dataclass(frozen=True)
class AuthConfig:
    """OAuth at the edge: Envoy's jwt_authn checks the bearer; the processor checks scopes on verified claims."""

    issuer: str
    jwks_uri: str
    audiences: tuple[str, ...]
    resource: str
    authorization_servers: tuple[str, ...]
    scopes_supported: tuple[str, ...]
    required_scopes: tuple[str, ...]
    groups_claim: str = "groups"
    jwks_ca_file: str = ""
    clock_skew_s: int = 60


@dataclass(frozen=True)
class UpstreamOAuthConfig:
    """The gateway's own OAuth client at third-party authorization servers (per-user OAuth to upstreams)."""

    client_id: str
    client_secret_file: str = ""
    client_secret_env: str = ""
    callback_path: str = "/oauth/callback"
    redirect_uri: str = ""


@dataclass(frozen=True)
class SessionsConfig:
    """Handshake-era session lifecycle: idle expiry and the per-upstream cap on upstream sessions (per process)."""

    idle_timeout_s: int = 1800
    max_upstream_sessions: int = 4000
    active_window_s: int = 10


@dataclass(frozen=True)
class EdgeLoginConfig:
    """The gateway's own OAuth client at the edge IdP (`auth.issuer`): a per-user OAuth callback stores a token
    only after the browser signs in here as the user who started the login."""

    client_id: str
    client_secret_file: str = ""
    client_secret_env: str = ""
    scopes: str = "openid"


@dataclass(frozen=True)
class WorkflowSettings:
    """Workflow runs and their records (Muster's retention: newest 10,000, 21 days, 256 KB per record).

    A run is bounded by timeout_s (at most 80 s): under the 85 s the processor asks Envoy to wait for a slow
    answer, itself under Envoy's ext_proc max_message_timeout (90 s)."""

    timeout_s: int = 60
    max_executions: int = 10_000
    retention_days: int = 21
    max_record_bytes: int = 256 * 1024


@dataclass(frozen=True)
class TracingConfig:
    """OTLP/gRPC export of traces (Envoy's and the processor's spans) to a collector; absent = tracing off."""

    endpoint: Address
    tls: bool = False
    sampling_ratio: float = 1.0
    service_name: str = "muster-edge"

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://{self.endpoint}"


@dataclass(frozen=True)
class GatewayConfig:
    source: str = ""
    listen: Address = Address("127.0.0.1", 8080)
    path: str = "/mcp"
    internal_listen: Address = Address("127.0.0.1", 18080)
    envoy_admin: Address = Address("127.0.0.1", 9901)
    processor_listen: Address = Address("127.0.0.1", 50051)
    workers: int = 1
    envoy_concurrency: int = 0  # Envoy's worker threads (--concurrency); 0: min(cpus, 4)
    status_listen: Address = Address("127.0.0.1", 9902)
    catalog_dir: str = "servers"
    prefix: str = "x"
    prefix_mode: str = "always"
    max_request_bytes: int = 4 * 1024 * 1024
    session_key_file: str = ""
    session_key_env: str = ""
    state_dir: str = ".state"
    list_page_size: int = 0
    list_ttl_ms: int = 60_000
    list_ttl_floor_ms: int = 5_000
    list_wait_ms: int = 5_000
    server_name: str = "muster-edge"
    instructions: str = ""
    workflows: WorkflowSettings = field(default_factory=WorkflowSettings)
    allowed_origins: tuple[str, ...] = ()
    allowed_hosts: tuple[str, ...] = ()
    tls: TlsConfig | None = None
    auth: AuthConfig | None = None
    policy: Policy = field(default_factory=Policy)
    audit_log: str = ""
    audit_volume: str = "all"  # which policy decisions get an audit line: all | denied | none
    secrets_dir: str = ""
    redis_url: str = ""
    upstream_oauth: UpstreamOAuthConfig | None = None
    restart_max_crashes: int = 5
    restart_window_s: int = 60
    sessions: SessionsConfig = field(default_factory=SessionsConfig)
    edge_login: EdgeLoginConfig | None = None
    status_token_file: str = ""
    status_token_env: str = ""
    tool_mode: str = "native"
    # Where the bridge serving stdio and sse servers listens (loopback, per replica); port 0: any free port.
    bridge_listen: Address = Address("127.0.0.1", 0)
    bridge_idle_seconds: int = 300
    bridge_max_connections: int = 100
    log_format: str = "text"
    # latency histograms (and Envoy's access log to the processor that feeds the call histograms); counters stay
    metrics: bool = True
    tracing: TracingConfig | None = None
    # Envoy gets the catalog's clusters and routes over gRPC xDS (ADS) from the processor, not from files
    xds: bool = False

    @property
    def callback_url(self) -> str:
        """Where authorization servers send the browser back after a per-user login."""
        oauth = self.upstream_oauth
        if oauth is None:
            return ""
        if oauth.redirect_uri:
            return oauth.redirect_uri
        parts = urlsplit(self.public_url)
        return f"{parts.scheme}://{parts.netloc}{oauth.callback_path}"

    @property
    def public_url(self) -> str:
        """The URL agents use: the HTTPS listener when there is one."""
        if self.tls is not None:
            host = "localhost" if self.tls.listen.host in ("127.0.0.1", "0.0.0.0") else self.tls.listen.host
            return f"https://{host}:{self.tls.listen.port}{self.path}"
        return f"http://{self.listen}{self.path}"

    @property
    def plain_url(self) -> str:
        return f"http://{self.listen}{self.path}"

    @property
    def prm_url(self) -> str:
        """The path-suffixed protected resource metadata URL of the MCP endpoint (RFC 9728 §3.1)."""
        parts = urlsplit(self.resource)
        return f"{parts.scheme}://{parts.netloc}/.well-known/oauth-protected-resource{parts.path}"

    @property
    def resource(self) -> str:
        """The gateway's OAuth resource identifier (RFC 8707 / RFC 9728)."""
        return self.auth.resource if self.auth is not None and self.auth.resource else self.public_url

    def with_overrides(self, **changes: Any) -> GatewayConfig:
        return replace(self, **changes)


def _int(raw: dict[str, Any], key: str, default: int, lo: int, hi: int, where: str) -> int:
    value = raw.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise ConfigError(f"{where}: {key}: must be a whole number from {lo} to {hi}")
    return value


def _str_list(raw: dict[str, Any], key: str, where: str) -> tuple[str, ...]:
    value = raw.get(key) or []
    if isinstance(value, str):
        value = value.split()
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ConfigError(f"{where}.{key}: must be a list of strings")
    return tuple(value)


def _tls(raw: Any, source: str, path_of: Any) -> TlsConfig | None:
    if raw is None:
        return None
    where = f"{source}: tls"
    if not isinstance(raw, dict) or set(raw) - {"listen", "certFile", "keyFile"}:
        raise ConfigError(f"{where}: expected listen, certFile and keyFile")
    for key in ("certFile", "keyFile"):
        if not isinstance(raw.get(key), str) or not raw[key]:
            raise ConfigError(f"{where}.{key}: is required")
    return TlsConfig(Address.parse(raw.get("listen", "127.0.0.1:8443"), f"{where}.listen"),
                     path_of(raw["certFile"]), path_of(raw["keyFile"]))


def _auth(raw: Any, source: str, path_of: Any) -> AuthConfig | None:
    if raw is None:
        return None
    where = f"{source}: auth"
    known = {"issuer", "jwksUri", "audiences", "resource", "authorizationServers", "scopesSupported",
             "requiredScopes", "groupsClaim", "jwksCaFile", "clockSkewSeconds"}
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: must be a mapping")
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ConfigError(f"{where}.{unknown[0]}: unknown field")
    issuer = raw.get("issuer")
    if not isinstance(issuer, str) or not issuer.startswith(("https://", "http://")):
        raise ConfigError(f"{where}.issuer: the identity provider's issuer URL is required")
    jwks = raw.get("jwksUri")
    if not isinstance(jwks, str) or not jwks.startswith(("https://", "http://")):
        raise ConfigError(f"{where}.jwksUri: the JWKS URL is required (the issuer's jwks_uri)")
    resource = raw.get("resource", "")
    if not isinstance(resource, str):
        raise ConfigError(f"{where}.resource: must be a URL")
    skew = raw.get("clockSkewSeconds", 60)
    if isinstance(skew, bool) or not isinstance(skew, int) or not 1 <= skew <= 600:
        raise ConfigError(f"{where}.clockSkewSeconds: must be 1 to 600 (Envoy reads 0 as its default, 60)")
    return AuthConfig(
        issuer=issuer, jwks_uri=jwks, audiences=_str_list(raw, "audiences", where), resource=resource,
        authorization_servers=_str_list(raw, "authorizationServers", where) or (issuer,),
        scopes_supported=_str_list(raw, "scopesSupported", where),
        required_scopes=_str_list(raw, "requiredScopes", where),
        groups_claim=str(raw.get("groupsClaim", "groups")),
        jwks_ca_file=path_of(raw["jwksCaFile"]) if raw.get("jwksCaFile") else "", clock_skew_s=skew)


def parse_config(text: str, source: str = "<config>") -> GatewayConfig:
    """Parse the gateway config; relative paths are resolved against the file's folder."""
    try:
        raw = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{source}: invalid YAML: {exc}") from exc
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: the gateway config must be a mapping")
    unknown = sorted(set(raw) - _KNOWN)
    if unknown:
        raise ConfigError(f"{source}: {unknown[0]}: unknown field")
    base = os.path.dirname(os.path.abspath(source)) if source != "<config>" else os.getcwd()

    def path_of(value: str) -> str:
        return value if os.path.isabs(value) else os.path.normpath(os.path.join(base, value))

    processor = raw.get("processor") or {}
    if not isinstance(processor, dict):
        raise ConfigError(f"{source}: processor: must be a mapping")
    prefix = raw.get("prefix", "x")
    if not isinstance(prefix, str) or not _PREFIX.fullmatch(prefix):
        raise ConfigError(f"{source}: prefix: must match {_PREFIX.pattern}")
    mode = raw.get("prefixMode", "always")
    if mode not in PREFIX_MODES:
        raise ConfigError(f"{source}: prefixMode: must be one of {', '.join(PREFIX_MODES)}, got {mode!r}")
    path = raw.get("path", "/mcp")
    if not isinstance(path, str) or not path.startswith("/"):
        raise ConfigError(f"{source}: path: must start with '/'")
    key = raw.get("sessionKey") or {}
    if not isinstance(key, dict) or set(key) - {"file", "env"}:
        raise ConfigError(f"{source}: sessionKey: expected {{file: PATH}} or {{env: NAME}}")
    status_token = raw.get("statusToken") or {}
    if not isinstance(status_token, dict) or set(status_token) - {"file", "env"} or len(status_token) > 1:
        raise ConfigError(f"{source}: statusToken: expected {{file: PATH}} or {{env: NAME}}")
    origins = raw.get("allowedOrigins") or []
    if not isinstance(origins, list) or not all(isinstance(o, str) for o in origins):
        raise ConfigError(f"{source}: allowedOrigins: must be a list of origins")
    hosts = raw.get("allowedHosts")
    if hosts is not None and (not isinstance(hosts, list) or not all(isinstance(h, str) for h in hosts)):
        raise ConfigError(f"{source}: allowedHosts: must be a list of host names")
    listen = Address.parse(raw.get("listen", "127.0.0.1:8080"), f"{source}: listen")
    if hosts is None:
        hosts = list(LOOPBACK_HOSTS) if listen.host in LOOPBACK_HOSTS or listen.host == "::1" else []
    audit_volume = raw.get("auditVolume", "all")
    if audit_volume not in AUDIT_VOLUMES:
        raise ConfigError(f"{source}: auditVolume: must be one of {', '.join(AUDIT_VOLUMES)}, got {audit_volume!r}")
    log_format = raw.get("logFormat", "text")
    if log_format not in LOG_FORMATS:
        raise ConfigError(f"{source}: logFormat: must be one of {', '.join(LOG_FORMATS)}, got {log_format!r}")
    cfg = GatewayConfig(
        source=source,
        listen=listen,
        path=path.rstrip("/") or "/",
        internal_listen=Address.parse(raw.get("internalListen", "127.0.0.1:18080"), f"{source}: internalListen"),
        envoy_admin=Address.parse(raw.get("envoyAdmin", "127.0.0.1:9901"), f"{source}: envoyAdmin"),
        processor_listen=Address.parse(processor.get("listen", "127.0.0.1:50051"), f"{source}: processor.listen"),
        workers=_int(processor, "workers", 1, 1, 64, f"{source}: processor"),
        envoy_concurrency=_int(raw, "envoyConcurrency", 0, 0, 256, source),
        status_listen=Address.parse(processor.get("status", "127.0.0.1:9902"), f"{source}: processor.status"),
        catalog_dir=path_of(str(raw.get("catalog", "servers"))),
        prefix=prefix,
        prefix_mode=mode,
        max_request_bytes=_int(raw, "maxRequestBytes", 4 * 1024 * 1024, 1024, 64 * 1024 * 1024, source),
        session_key_file=path_of(key["file"]) if key.get("file") else "",
        session_key_env=str(key.get("env", "")),
        state_dir=path_of(str(raw.get("stateDir", ".state"))),
        list_page_size=_int(raw, "listPageSize", 0, 0, 100_000, source),
        list_ttl_ms=_int(raw, "listTtlMs", 60_000, 0, 86_400_000, source),
        list_ttl_floor_ms=_int(raw, "listTtlFloorMs", 5_000, 0, 86_400_000, source),
        list_wait_ms=_int(raw, "listWaitMs", 5_000, 100, 300_000, source),
        server_name=str(raw.get("serverName", "muster-edge")),
        instructions=str(raw.get("instructions", "")),
        workflows=_workflows(raw.get("workflows"), source),
        allowed_origins=tuple(origins),
        allowed_hosts=tuple(h.lower() for h in hosts),
        tls=_tls(raw.get("tls"), source, path_of),
        auth=_auth(raw.get("auth"), source, path_of),
        policy=_policy(raw.get("policy"), source),
        audit_log=path_of(str(raw["audit"])) if raw.get("audit") else "",
        secrets_dir=path_of(str(raw.get("secretsDir", "secrets"))),
        redis_url=_store(raw.get("store"), source),
        upstream_oauth=_upstream_oauth(raw.get("upstreamOAuth"), source, path_of),
        **_restart(raw.get("restart"), source),
        sessions=_sessions(raw.get("sessions"), source),
        edge_login=_edge_login(raw.get("edgeLogin"), source, path_of),
        status_token_file=path_of(str(status_token["file"])) if status_token.get("file") else "",
        status_token_env=str(status_token.get("env", "")),
        tool_mode=_tool_mode(raw.get("toolMode", "native"), source),
        **_bridges(raw.get("bridges"), source),
        log_format=log_format,
        metrics=_bool(raw, "metrics", True, source),
        tracing=_tracing(raw.get("tracing"), source),
        xds=_bool(raw, "xds", False, source),
        audit_volume=audit_volume,
    )
    if cfg.edge_login is not None and cfg.auth is None:
        raise ConfigError(f"{source}: edgeLogin: needs auth (the edge IdP it signs in at is auth.issuer)")
    if cfg.upstream_oauth is not None and cfg.auth is not None and cfg.edge_login is None:
        raise ConfigError(f"{source}: upstreamOAuth: with auth on, edgeLogin is required (the gateway's client at "
                          "auth.issuer): a login callback stores a token only after the browser signs in there as "
                          "the user who started it")
    return cfg


def _tracing(raw: Any, source: str) -> TracingConfig | None:
    """`tracing: {endpoint: HOST:PORT | http(s)://HOST:PORT, samplingRatio: 0..1, serviceName}`; absent: off."""
    if raw is None or raw is False:
        return None
    where = f"{source}: tracing"
    if not isinstance(raw, dict) or set(raw) - {"endpoint", "samplingRatio", "serviceName"} or "endpoint" not in raw:
        raise ConfigError(f"{where}: expected {{endpoint: HOST:PORT, samplingRatio: 0..1, serviceName: NAME}}")
    endpoint = raw["endpoint"]
    tls = False
    if isinstance(endpoint, str) and "://" in endpoint:
        scheme, _, rest = endpoint.partition("://")
        if scheme not in ("http", "https") or "/" in rest.rstrip("/"):
            raise ConfigError(f"{where}.endpoint: expected HOST:PORT or http(s)://HOST:PORT, got {endpoint!r}")
        endpoint, tls = rest.rstrip("/"), scheme == "https"
    ratio = raw.get("samplingRatio", 1.0)
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 <= ratio <= 1:
        raise ConfigError(f"{where}.samplingRatio: a number from 0 to 1, got {ratio!r}")
    name = raw.get("serviceName", "muster-edge")
    if not isinstance(name, str) or not name.strip():
        raise ConfigError(f"{where}.serviceName: a non-empty string")
    return TracingConfig(Address.parse(endpoint, f"{where}.endpoint"), tls, float(ratio), name.strip())


def _restart(raw: Any, source: str) -> dict[str, Any]:
    """`muster-edge run` restarts a crashed child; it gives up on one that crashed maxCrashes times in
    windowSeconds."""
    if raw is None:
        return {}
    if not isinstance(raw, dict) or set(raw) - {"maxCrashes", "windowSeconds"}:
        raise ConfigError(f"{source}: restart: expected {{maxCrashes: N, windowSeconds: S}}")
    where = f"{source}: restart"
    return {"restart_max_crashes": _int(raw, "maxCrashes", 5, 1, 1000, where),
            "restart_window_s": _int(raw, "windowSeconds", 60, 1, 86_400, where)}
def _sessions(raw: Any, source: str) -> SessionsConfig:
    """`sessions: {idleTimeoutSeconds, maxUpstreamSessions, activeWindowSeconds}`."""
    if raw is None:
        return SessionsConfig()
    known = {"idleTimeoutSeconds", "maxUpstreamSessions", "activeWindowSeconds"}
    if not isinstance(raw, dict) or set(raw) - known:
        raise ConfigError(f"{source}: sessions: expected a mapping of {', '.join(sorted(known))}")
    where = f"{source}: sessions"
    return SessionsConfig(idle_timeout_s=_int(raw, "idleTimeoutSeconds", 1800, 1, 7 * 86_400, where),
                          max_upstream_sessions=_int(raw, "maxUpstreamSessions", 4000, 1, 1_000_000, where),
                          active_window_s=_int(raw, "activeWindowSeconds", 10, 0, 86_400, where))


def _workflows(raw: Any, source: str) -> WorkflowSettings:
    """`workflows: {timeoutSeconds, executions: {max, retentionDays, maxRecordBytes}}`."""
    if raw is None:
        return WorkflowSettings()
    where = f"{source}: workflows"
    if not isinstance(raw, dict) or set(raw) - {"timeoutSeconds", "executions"}:
        raise ConfigError(f"{where}: expected timeoutSeconds and executions")
    ex = raw.get("executions") or {}
    if not isinstance(ex, dict) or set(ex) - {"max", "retentionDays", "maxRecordBytes"}:
        raise ConfigError(f"{where}.executions: expected max, retentionDays and maxRecordBytes")
    return WorkflowSettings(
        timeout_s=_int(raw, "timeoutSeconds", 60, 1, 80, where),
        max_executions=_int(ex, "max", 10_000, 1, 1_000_000, f"{where}.executions"),
        retention_days=_int(ex, "retentionDays", 21, 1, 3650, f"{where}.executions"),
        max_record_bytes=_int(ex, "maxRecordBytes", 256 * 1024, 1024, 16 << 20, f"{where}.executions"))


def _tool_mode(raw: Any, source: str) -> str:
    """native: the fleet's tools; meta: Muster's 11 meta-tools only; both: both, and X-Muster-Tool-Mode picks."""
    if raw not in TOOL_MODES:
        raise ConfigError(f"{source}: toolMode: must be one of {', '.join(TOOL_MODES)}, got {raw!r}")
    return str(raw)


def _bridges(raw: Any, source: str) -> dict[str, Any]:
    """`bridges: {listen, idleSeconds, maxConnections}`: the loopback bridge for stdio and sse servers."""
    if raw is None:
        return {}
    if not isinstance(raw, dict) or set(raw) - {"listen", "idleSeconds", "maxConnections"}:
        raise ConfigError(f"{source}: bridges: expected listen, idleSeconds and maxConnections")
    out: dict[str, Any] = {
        "bridge_idle_seconds": _int(raw, "idleSeconds", 300, 1, 86_400, f"{source}: bridges"),
        "bridge_max_connections": _int(raw, "maxConnections", 100, 1, 100_000, f"{source}: bridges"),
    }
    if "listen" in raw:
        out["bridge_listen"] = Address.parse(raw["listen"], f"{source}: bridges.listen")
    return out


def _bool(raw: dict[str, Any], key: str, default: bool, source: str) -> bool:
    value = raw.get(key, default)
    if not isinstance(value, bool):
        raise ConfigError(f"{source}: {key}: must be true or false")
    return value


def _store(raw: Any, source: str) -> str:
    """Where shared state lives: `{redis: redis://host:6379/0}` (Redis or Valkey), else in memory."""
    if raw is None:
        return ""
    if not isinstance(raw, dict) or set(raw) - {"redis"}:
        raise ConfigError(f"{source}: store: expected {{redis: URL}}")
    url = raw.get("redis", "")
    if not isinstance(url, str) or not url.startswith(("redis://", "rediss://", "unix://")):
        raise ConfigError(f"{source}: store.redis: must be a redis://, rediss:// or unix:// URL")
    return url


def _upstream_oauth(raw: Any, source: str, path_of: Any) -> UpstreamOAuthConfig | None:
    if raw is None:
        return None
    where = f"{source}: upstreamOAuth"
    known = {"clientId", "clientSecretFile", "clientSecretEnv", "callbackPath", "redirectUri"}
    if not isinstance(raw, dict) or set(raw) - known:
        raise ConfigError(f"{where}: expected {', '.join(sorted(known))}")
    if not isinstance(raw.get("clientId"), str) or not raw["clientId"]:
        raise ConfigError(f"{where}.clientId: is required (the gateway's client at upstream authorization servers)")
    callback = raw.get("callbackPath", "/oauth/callback")
    if not isinstance(callback, str) or not callback.startswith("/"):
        raise ConfigError(f"{where}.callbackPath: must start with '/'")
    return UpstreamOAuthConfig(
        client_id=raw["clientId"],
        client_secret_file=path_of(raw["clientSecretFile"]) if raw.get("clientSecretFile") else "",
        client_secret_env=str(raw.get("clientSecretEnv", "")), callback_path=callback,
        redirect_uri=str(raw.get("redirectUri", "")))


def _edge_login(raw: Any, source: str, path_of: Any) -> EdgeLoginConfig | None:
    if raw is None:
        return None
    where = f"{source}: edgeLogin"
    known = {"clientId", "clientSecretFile", "clientSecretEnv", "scopes"}
    if not isinstance(raw, dict) or set(raw) - known:
        raise ConfigError(f"{where}: expected {', '.join(sorted(known))}")
    if not isinstance(raw.get("clientId"), str) or not raw["clientId"]:
        raise ConfigError(f"{where}.clientId: is required (the gateway's client at the edge IdP, auth.issuer)")
    scopes = raw.get("scopes", "openid")
    if not isinstance(scopes, str) or "openid" not in scopes.split():
        raise ConfigError(f"{where}.scopes: must include openid (the proof is the ID token's subject)")
    return EdgeLoginConfig(
        client_id=raw["clientId"],
        client_secret_file=path_of(raw["clientSecretFile"]) if raw.get("clientSecretFile") else "",
        client_secret_env=str(raw.get("clientSecretEnv", "")), scopes=scopes)


def _policy(raw: Any, source: str) -> Policy:
    try:
        return parse_policy(raw)
    except PolicyError as exc:
        raise ConfigError(f"{source}: {exc}") from None


def load_config(path: str) -> GatewayConfig:
    try:
        with open(path, encoding="utf-8") as fh:
            text = fh.read()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the gateway config: {exc.strerror}") from exc
    return parse_config(text, path)
