"""Per-user OAuth to third-party MCP servers (`auth.type: oauth`): discovery, login, callback, refresh, logout.

The authorization server comes from the MCPServer's `authorizationServer` override, or from the upstream's
RFC 9728 metadata (its 401 `WWW-Authenticate: resource_metadata=…`, else the well-known paths), then its
RFC 8414 / OpenID metadata; S256 PKCE is required. The login state is sealed (AES-GCM) and used once (an atomic
take from the store, so two replicas cannot both accept it); tokens are stored per (user, issuer), sealed, in the
same store as exchanged tokens (memory, or Redis/Valkey), and refreshed before they expire.

Whoever opens a login link completes it, so the link alone does not say whose account comes back. With `auth`
on, the callback therefore first sends the browser through the gateway's own sign-in at the edge IdP
(authorization code + PKCE, `edgeLogin` client); the upstream code is redeemed and stored only when the ID
token's subject is the subject sealed in the login state. A cookie set when the link was opened would prove
nothing: it is set in whichever browser opened it.
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
import jwt
import orjson
from cachetools import TTLCache

from catalog.config import UpstreamOAuthConfig
from catalog.manifests import MCPServer
from extproc.credentials import EXPIRY_BUFFER_S, TokenStore, basic_auth
from extproc.sessions import Sealer
from extproc.upstream import ROUTE_HEADER, cluster_name

log = logging.getLogger(__name__)

_STATE_AAD = b"muster-edge/oauth-state/v1"
_EDGE_AAD = b"muster-edge/oauth-edge-login/v1"
STATE_TTL_S = 600
LOGIN_LIMIT = 10  # core_auth_login attempts per user per LOGIN_WINDOW_S (Muster's rate limit)
LOGIN_WINDOW_S = 60.0
_CHALLENGE_PARAM = re.compile(r'(\w+)="([^"]*)"')


class OAuthError(Exception):
    """A login that cannot go on; the message is safe to show to the user (no token, no secret)."""


@dataclass(frozen=True)
class EdgeLogin:
    """The gateway as an OAuth client of its own edge IdP (`auth.issuer`): proves who completes a login."""

    issuer: str
    jwks_uri: str
    client_id: str
    client_secret: str
    scopes: str = "openid"
    leeway_s: int = 60


@dataclass(frozen=True)
class Outcome:
    """What the callback did: sent the browser on to the edge sign-in (`redirect`), or stored a token."""

    redirect: str = ""
    subject: str = ""
    server: MCPServer | None = None


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
                 sealer: Sealer, http: httpx2.AsyncClient, internal: httpx2.AsyncClient,
                 edge: EdgeLogin | None = None) -> None:
        self.config = config
        self.client_secret = client_secret
        self.redirect_uri = redirect_uri
        self.edge = edge
        self._store = store
        self._sealer = sealer
        self._http = http
        self._internal = internal
        self._servers: TTLCache[str, AuthServer] = TTLCache(maxsize=1024, ttl=1800)
        self._edge_meta: TTLCache[str, dict[str, Any]] = TTLCache(maxsize=1, ttl=1800)
        self._edge_keys: TTLCache[str, jwt.PyJWK] = TTLCache(maxsize=64, ttl=600)

    async def login_allowed(self, subject: str) -> int:
        """Count one core_auth_login of this user (shared through the store): attempts left, or -1 if refused."""
        key = "ratelimit:login:" + hashlib.sha256(subject.encode()).hexdigest()
        return await self._store.hit(key, LOGIN_LIMIT, LOGIN_WINDOW_S)

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

    async def callback(self, query: dict[str, str], servers: dict[str, MCPServer]) -> Outcome:
        """The browser's return: from the upstream's authorization server (state sealed with _STATE_AAD), then,
        with an edge login, from the edge IdP (state sealed with _EDGE_AAD)."""
        token = query.get("state", "")
        edge_state = self._sealer.open(token, _EDGE_AAD) if token else None
        if edge_state is not None:
            return await self._edge_return(query, orjson.loads(edge_state), servers)
        if "error" in query:
            raise OAuthError(f"the authorization server refused: {query['error']}")
        payload = self._sealer.open(token, _STATE_AAD) if token else None
        if payload is None:
            raise OAuthError("invalid or tampered state")
        state = orjson.loads(payload)
        if time.time() - state["t"] > STATE_TTL_S:
            raise OAuthError("the login took too long; start it again")
        if await self._store.get(f"oauth-state:{state['n']}") is None:  # early answer; the atomic take comes last
            raise OAuthError("this login link was already used")
        server = servers.get(state["v"])
        if server is None:
            raise OAuthError(f"server {state['v']!r} is no longer in the catalog")
        found = await self.auth_server(server)
        if "iss" in query and query["iss"].rstrip("/") != found.issuer.rstrip("/"):
            raise OAuthError("the authorization response came from another issuer")
        code = query.get("code", "")
        if not code:
            raise OAuthError("the authorization server sent no code")
        if self.edge is None:  # a gateway without `auth`: every caller is the same anonymous user
            if await self._store.take(f"oauth-state:{state['n']}") is None:
                raise OAuthError("this login link was already used")
            return await self._finish(state, code, servers)
        return Outcome(redirect=await self._edge_login_url(state, code))

    async def _edge_login_url(self, state: dict[str, Any], code: str) -> str:
        """Where the browser proves whose it is: the gateway's own sign-in at the edge IdP. The upstream code
        travels sealed in the edge state and is redeemed only after that proof."""
        assert self.edge is not None
        meta = await self._edge_metadata()
        verifier, challenge = _pkce()
        nonce = secrets.token_urlsafe(24)
        sealed = self._sealer.seal(orjson.dumps({"u": state, "c": code, "k": verifier, "n": nonce,
                                                 "t": int(time.time())}), _EDGE_AAD)
        params = {"response_type": "code", "client_id": self.edge.client_id, "redirect_uri": self.redirect_uri,
                  "scope": self.edge.scopes, "state": sealed, "nonce": nonce, "code_challenge": challenge,
                  "code_challenge_method": "S256"}
        return f"{meta['authorization_endpoint']}?{urlencode(params)}"

    async def _edge_return(self, query: dict[str, str], edge: dict[str, Any],
                           servers: dict[str, MCPServer]) -> Outcome:
        assert self.edge is not None
        if time.time() - min(edge["t"], edge["u"]["t"]) > STATE_TTL_S:
            raise OAuthError("the login took too long; start it again")
        if "error" in query:
            raise OAuthError(f"the gateway's sign-in refused: {query['error']}")
        if "iss" in query and query["iss"].rstrip("/") != self.edge.issuer.rstrip("/"):
            raise OAuthError("the gateway's sign-in answer came from another issuer")
        meta = await self._edge_metadata()
        form = {"grant_type": "authorization_code", "code": query.get("code", ""),
                "redirect_uri": self.redirect_uri, "code_verifier": edge["k"]}
        headers = {}
        if self.edge.client_secret:
            headers["authorization"] = basic_auth(self.edge.client_id, self.edge.client_secret)
        else:
            form["client_id"] = self.edge.client_id
        try:
            resp = await self._http.post(str(meta["token_endpoint"]), data=form, headers=headers, timeout=10.0)
        except httpx2.HTTPError as exc:
            raise OAuthError(f"the gateway's identity provider is unreachable ({type(exc).__name__})") from None
        if resp.status_code != 200:
            raise OAuthError(f"the gateway's sign-in failed: HTTP {resp.status_code}")
        try:
            id_token = str(resp.json()["id_token"])
        except (ValueError, KeyError, TypeError):
            raise OAuthError("the gateway's identity provider sent no ID token") from None
        subject = await self._verified_subject(id_token, edge["n"])
        state = edge["u"]
        if await self._store.take(f"oauth-state:{state['n']}") is None:
            raise OAuthError("this login link was already used")
        if subject != state["s"]:
            log.warning("oauth: a sign-in to %s was completed by another user than the one who started it; "
                        "refused, nothing stored", state["v"])
            raise OAuthError("this sign-in link was started by another user, so nothing was stored. Start the "
                             "sign-in from your own agent (core_auth_login).")
        return await self._finish(state, edge["c"], servers)

    async def _edge_metadata(self) -> dict[str, Any]:
        assert self.edge is not None
        meta = self._edge_meta.get("meta")
        if meta is None:
            meta = self._edge_meta["meta"] = await self._metadata(self.edge.issuer)
        return meta

    async def _verified_subject(self, id_token: str, nonce: str) -> str:
        """The ID token's `sub`, after checking signature (the edge IdP's JWKS), issuer, audience, expiry, nonce."""
        assert self.edge is not None
        try:
            kid = str(jwt.get_unverified_header(id_token).get("kid", ""))
            key = self._edge_keys.get(kid) or await self._fetch_key(kid)
            claims = jwt.decode(id_token, key, algorithms=[key.algorithm_name], audience=self.edge.client_id,
                                leeway=self.edge.leeway_s, options={"require": ["exp", "iat", "sub"]})
        except (jwt.PyJWTError, KeyError, ValueError) as exc:
            raise OAuthError(f"the gateway's sign-in returned an ID token that does not verify ({exc})") from None
        if str(claims.get("iss", "")).rstrip("/") != self.edge.issuer.rstrip("/"):
            raise OAuthError("the gateway's sign-in returned an ID token from another issuer")
        if claims.get("nonce") != nonce:
            raise OAuthError("the gateway's sign-in returned an ID token for another request")
        return str(claims["sub"])

    async def _fetch_key(self, kid: str) -> jwt.PyJWK:
        assert self.edge is not None
        try:
            doc = (await self._http.get(self.edge.jwks_uri, timeout=10.0)).json()
        except (httpx2.HTTPError, ValueError):
            raise OAuthError("the gateway's identity provider keys are unavailable") from None
        for raw in doc.get("keys", []) if isinstance(doc, dict) else []:
            with contextlib.suppress(jwt.PyJWKError, jwt.InvalidKeyError, KeyError, ValueError, TypeError):
                if raw.get("use", "sig") == "sig" and raw.get("kid"):
                    self._edge_keys[str(raw["kid"])] = jwt.PyJWK(raw)
        found = self._edge_keys.get(kid)
        if found is None:
            raise KeyError(f"no key {kid!r} in the identity provider's JWKS")
        return found

    async def _finish(self, state: dict[str, Any], code: str, servers: dict[str, MCPServer]) -> Outcome:
        server = servers.get(state["v"])
        if server is None:
            raise OAuthError(f"server {state['v']!r} is no longer in the catalog")
        found = await self.auth_server(server)
        form = {"grant_type": "authorization_code", "code": code, "redirect_uri": self.redirect_uri,
                "code_verifier": state["k"], "resource": server.url}
        await self._token_request(found, form, state["s"])
        log.info("oauth: a user signed in to %s", server.name)
        return Outcome(subject=str(state["s"]), server=server)

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
