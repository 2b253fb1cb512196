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
LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "[::1]")
_PREFIX = re.compile(r"^[a-zA-Z][a-zA-Z0-9_-]*$")
_KNOWN = {
    "apiVersion", "kind", "listen", "path", "internalListen", "envoyAdmin", "processor", "catalog",
    "prefix", "prefixMode", "maxRequestBytes", "sessionKey", "stateDir", "listPageSize", "serverName",
    "instructions", "listTtlMs", "listTtlFloorMs", "allowedOrigins", "listWaitMs", "allowedHosts", "tls",
    "auth", "policy", "audit", "secretsDir", "store", "upstreamOAuth", "logFormat",
}
LOG_FORMATS = ("text", "json")


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
class GatewayConfig:
    source: str = ""
    listen: Address = Address("127.0.0.1", 8080)
    path: str = "/mcp"
    internal_listen: Address = Address("127.0.0.1", 18080)
    envoy_admin: Address = Address("127.0.0.1", 9901)
    processor_listen: Address = Address("127.0.0.1", 50051)
    workers: int = 1
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
    list_wait_ms: int = 10_000
    server_name: str = "muster-edge"
    instructions: str = ""
    allowed_origins: tuple[str, ...] = ()
    allowed_hosts: tuple[str, ...] = ()
    tls: TlsConfig | None = None
    auth: AuthConfig | None = None
    policy: Policy = field(default_factory=Policy)
    audit_log: str = ""
    secrets_dir: str = ""
    redis_url: str = ""
    upstream_oauth: UpstreamOAuthConfig | None = None
    log_format: str = "text"

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
    origins = raw.get("allowedOrigins") or []
    if not isinstance(origins, list) or not all(isinstance(o, str) for o in origins):
        raise ConfigError(f"{source}: allowedOrigins: must be a list of origins")
    hosts = raw.get("allowedHosts")
    if hosts is not None and (not isinstance(hosts, list) or not all(isinstance(h, str) for h in hosts)):
        raise ConfigError(f"{source}: allowedHosts: must be a list of host names")
    listen = Address.parse(raw.get("listen", "127.0.0.1:8080"), f"{source}: listen")
    if hosts is None:
        hosts = list(LOOPBACK_HOSTS) if listen.host in LOOPBACK_HOSTS or listen.host == "::1" else []
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
        list_wait_ms=_int(raw, "listWaitMs", 10_000, 100, 300_000, source),
        server_name=str(raw.get("serverName", "muster-edge")),
        instructions=str(raw.get("instructions", "")),
        allowed_origins=tuple(origins),
        allowed_hosts=tuple(h.lower() for h in hosts),
        tls=_tls(raw.get("tls"), source, path_of),
        auth=_auth(raw.get("auth"), source, path_of),
        policy=_policy(raw.get("policy"), source),
        audit_log=path_of(str(raw["audit"])) if raw.get("audit") else "",
        secrets_dir=path_of(str(raw.get("secretsDir", "secrets"))),
        redis_url=_store(raw.get("store"), source),
        upstream_oauth=_upstream_oauth(raw.get("upstreamOAuth"), source, path_of),
        log_format=log_format,
    )
    return cfg


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
