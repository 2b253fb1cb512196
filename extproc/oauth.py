"""Per-user OAuth to third-party MCP servers (`auth.type: oauth`): discovery, login, callback, refresh, logout.

The authorization server comes from the MCPServer's `authorizationServer` override, or from the upstream's
RFC 9728 metadata (its 401 `WWW-Authenticate: resource_metadata=…`, else the well-known paths), then its
RFC 8414 / OpenID metadata; S256 PKCE is required. The login state is sealed (AES-GCM) and used once; tokens
are stored per (user, issuer), sealed, in the same store as exchanged tokens (memory, or Redis/Valkey), and
refreshed before they expire.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import logging
import re
import secrets
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlencode, urlsplit

import httpx2
import orjson
from cachetools import TTLCache

from catalog.config import UpstreamOAuthConfig
from catalog.manifests import MCPServer
from extproc.credentials import EXPIRY_BUFFER_S, TokenStore, basic_auth
from extproc.sessions import Sealer
from extproc.upstream import ROUTE_HEADER, cluster_name

log = logging.getLogger(__name__)

_STATE_AAD = b"muster-edge/oauth-state/v1"
STATE_TTL_S = 600
_CHALLENGE_PARAM = re.compile(r'(\w+)="([^"]*)"')


class OAuthError(Exception):
    """A login that cannot go on; the message is safe to show to the user (no token, no secret)."""


@dataclass(frozen=True)
class AuthServer:
    issuer: str
    authorization_endpoint: str
    token_endpoint: str
    scopes: str


def _pkce() -> tuple[str, str]:
    verifier = secrets.token_urlsafe(48)
    challenge = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).rstrip(b"=").decode()
    return verifier, challenge


def _key(subject: str, issuer: str) -> str:
    raw = f"{subject}\0{issuer.rstrip('/')}".encode()
    return "oauth:" + hashlib.sha256(raw).hexdigest()


class UserTokens:
    def __init__(self, config: UpstreamOAuthConfig, client_secret: str, redirect_uri: str, store: TokenStore,
                 sealer: Sealer, http: httpx2.AsyncClient, internal: httpx2.AsyncClient) -> None:
        self.config = config
        self.client_secret = client_secret
        self.redirect_uri = redirect_uri
        self._store = store
        self._sealer = sealer
        self._http = http
        self._internal = internal
        self._servers: TTLCache[str, AuthServer] = TTLCache(maxsize=1024, ttl=1800)

    # ---- discovery ---------------------------------------------------------------------------------------
    async def auth_server(self, server: MCPServer) -> AuthServer:
        cached = self._servers.get(server.name)
        if cached is not None:
            return cached
        pinned = server.auth.authorization_server
        if pinned is not None:
            issuer, scopes = pinned.issuer, pinned.scopes
        else:
            issuer, scopes = await self._from_resource_metadata(server)
        meta = await self._metadata(issuer)
        if str(meta.get("issuer", "")).rstrip("/") != issuer.rstrip("/"):
            raise OAuthError(f"authorization server metadata names issuer {meta.get('issuer')!r}, not {issuer!r}")
        if "S256" not in (meta.get("code_challenge_methods_supported") or []):
            raise OAuthError(f"authorization server {issuer} does not offer S256 PKCE")
        found = AuthServer(issuer, str(meta["authorization_endpoint"]), str(meta["token_endpoint"]), scopes)
        self._servers[server.name] = found
        return found

    async def _upstream_get(self, server: MCPServer, path: str) -> httpx2.Response:
        """A request to the upstream through Envoy's internal listener (egress stays in Envoy)."""
        headers = {"host": server.authority, ROUTE_HEADER: cluster_name(server.name)}
        return await self._internal.get(path, headers=headers, timeout=10.0)

    async def _from_resource_metadata(self, server: MCPServer) -> tuple[str, str]:
        paths = []
        probe = await self._internal.post(server.path, content=b'{"jsonrpc":"2.0","id":0,"method":"ping"}', headers={
            "host": server.authority, ROUTE_HEADER: cluster_name(server.name), "content-type": "application/json",
            "accept": "application/json, text/event-stream"}, timeout=10.0)
        challenge = dict(_CHALLENGE_PARAM.findall(probe.headers.get("www-authenticate", "")))
        if "resource_metadata" in challenge:
            parts = urlsplit(challenge["resource_metadata"])
            if parts.netloc == server.authority:
                paths.append(parts.path + (f"?{parts.query}" if parts.query else ""))
        mcp_path = urlsplit(server.url).path.rstrip("/")
        paths += [f"/.well-known/oauth-protected-resource{mcp_path}", "/.well-known/oauth-protected-resource"]
        for path in paths:
            resp = await self._upstream_get(server, path)
            if resp.status_code == 200:
                try:
                    doc = resp.json()
                    issuer = str(doc["authorization_servers"][0])
                except (ValueError, KeyError, IndexError, TypeError):
                    continue
                return issuer, " ".join(doc.get("scopes_supported") or [])
        raise OAuthError(f"Cannot authenticate to '{server.name}': RFC 9728 protected resource metadata not found. "
                         "On the MCPServer set spec.auth.type=oauth and spec.auth.authorizationServer.issuer")

    async def _metadata(self, issuer: str) -> dict[str, Any]:
        parts = urlsplit(issuer.rstrip("/"))
        base, path = f"{parts.scheme}://{parts.netloc}", parts.path
        if path:
            urls = [f"{base}/.well-known/oauth-authorization-server{path}",
                    f"{base}/.well-known/openid-configuration{path}", f"{base}{path}/.well-known/openid-configuration"]
        else:
            urls = [f"{base}/.well-known/oauth-authorization-server", f"{base}/.well-known/openid-configuration"]
        for url in urls:
            try:
                resp = await self._http.get(url, timeout=10.0)
            except httpx2.HTTPError:
                continue
            if resp.status_code == 200:
                doc = resp.json()
                if isinstance(doc, dict) and "authorization_endpoint" in doc and "token_endpoint" in doc:
                    return doc
        raise OAuthError(f"no authorization server metadata found for {issuer}")

    # ---- login -------------------------------------------------------------------------------------------
    async def login_url(self, server: MCPServer, subject: str) -> str:
        found = await self.auth_server(server)
        verifier, challenge = _pkce()
        nonce = secrets.token_urlsafe(24)
        state = self._sealer.seal(orjson.dumps({"s": subject, "v": server.name, "k": verifier, "n": nonce,
                                                "t": int(time.time()), "i": found.issuer}), _STATE_AAD)
        await self._store.set(f"oauth-state:{nonce}", b"1", STATE_TTL_S)
        params = {"response_type": "code", "client_id": self.config.client_id, "redirect_uri": self.redirect_uri,
                  "state": state, "code_challenge": challenge, "code_challenge_method": "S256",
                  "resource": server.url}
        if found.scopes:
            params["scope"] = found.scopes
            if "offline_access" in found.scopes.split():
                params["prompt"] = "consent"  # OpenID Connect issues refresh tokens only after consent
        return f"{found.authorization_endpoint}?{urlencode(params)}"

    async def callback(self, query: dict[str, str], servers: dict[str, MCPServer]) -> tuple[str, MCPServer]:
        """Finish a login from the browser's redirect; returns (subject, server)."""
        if "error" in query:
            raise OAuthError(f"the authorization server refused: {query['error']}")
        payload = self._sealer.open(query.get("state", ""), _STATE_AAD)
        if payload is None:
            raise OAuthError("invalid or tampered state")
        state = orjson.loads(payload)
        if time.time() - state["t"] > STATE_TTL_S:
            raise OAuthError("the login took too long; start it again")
        if await self._store.get(f"oauth-state:{state['n']}") is None:
            raise OAuthError("this login link was already used")
        await self._store.delete(f"oauth-state:{state['n']}")
        server = servers.get(state["v"])
        if server is None:
            raise OAuthError(f"server {state['v']!r} is no longer in the catalog")
        found = await self.auth_server(server)
        if "iss" in query and query["iss"].rstrip("/") != found.issuer.rstrip("/"):
            raise OAuthError("the authorization response came from another issuer")
        form = {"grant_type": "authorization_code", "code": query.get("code", ""), "redirect_uri": self.redirect_uri,
                "code_verifier": state["k"], "resource": server.url}
        await self._token_request(found, form, state["s"])
        log.info("oauth: %s signed in to %s", state["s"] or "anonymous", server.name)
        return str(state["s"]), server

    async def _token_request(self, found: AuthServer, form: dict[str, str], subject: str) -> dict[str, Any]:
        headers = {}
        if self.client_secret:
            headers["authorization"] = basic_auth(self.config.client_id, self.client_secret)
        else:
            form = {**form, "client_id": self.config.client_id}
        try:
            resp = await self._http.post(found.token_endpoint, data=form, headers=headers, timeout=10.0)
        except httpx2.HTTPError as exc:
            raise OAuthError(f"token endpoint unreachable ({type(exc).__name__})") from None
        if resp.status_code != 200:
            error = ""
            with contextlib.suppress(ValueError, AttributeError):
                error = str(resp.json().get("error", ""))
            raise OAuthError(f"token request failed: HTTP {resp.status_code} {error}".rstrip())
        answer = resp.json()
        expires_in = answer.get("expires_in")
        record = {"access_token": answer["access_token"], "refresh_token": answer.get("refresh_token", ""),
                  "expires_at": time.time() + float(expires_in) if isinstance(expires_in, (int, float)) else 0,
                  "issuer": found.issuer}
        await self._store.set(_key(subject, found.issuer), orjson.dumps(record), 30 * 86400)
        return record

    # ---- use ---------------------------------------------------------------------------------------------
    async def token_for(self, server: MCPServer, subject: str) -> str | None:
        """The user's access token for this server's issuer, refreshed when it is about to expire."""
        try:
            found = await self.auth_server(server)
        except (OAuthError, httpx2.HTTPError):
            return None
        raw = await self._store.get(_key(subject, found.issuer))
        if raw is None:
            return None
        record = orjson.loads(raw)
        if record["expires_at"] and record["expires_at"] - EXPIRY_BUFFER_S < time.time():
            if not record.get("refresh_token"):
                return None
            try:
                record = await self._token_request(found, {"grant_type": "refresh_token",
                                                           "refresh_token": record["refresh_token"],
                                                           "resource": server.url}, subject)
            except OAuthError as exc:
                log.info("oauth: refreshing %s's token for %s failed: %s", subject, server.name, exc)
                return None
        return str(record["access_token"])

    async def expire(self, server: MCPServer, subject: str) -> None:
        """A 401 with this token: keep the refresh token, forget that the access token is still good."""
        found = self._servers.get(server.name)
        if found is None:
            return
        raw = await self._store.get(_key(subject, found.issuer))
        if raw is not None:
            record = orjson.loads(raw)
            record["expires_at"] = 1
            await self._store.set(_key(subject, found.issuer), orjson.dumps(record), 30 * 86400)

    async def logout(self, server: MCPServer, subject: str) -> bool:
        try:
            found = await self.auth_server(server)
        except OAuthError:
            return False
        existed = await self._store.get(_key(subject, found.issuer)) is not None
        await self._store.delete(_key(subject, found.issuer))
        return existed
