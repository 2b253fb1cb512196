"""The agent's OAuth login: authorization code + PKCE against the IdP the gateway's protected-resource
metadata names (RFC 9728), dynamic client registration where the IdP offers it (RFC 7591), else a configured
client id; the redirect is a loopback URL (RFC 8252) served for the one callback."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import secrets
import sys
import webbrowser
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs, urlencode, urlsplit

import httpx2

from extproc.agent.tokens import Tokens

SCOPES_FALLBACK = "openid offline_access"


class LoginError(Exception):
    pass


@dataclass
class Provider:
    resource: str
    issuer: str
    authorization_endpoint: str
    token_endpoint: str
    registration_endpoint: str
    scopes: str


def prm_url(gateway_url: str) -> str:
    parts = urlsplit(gateway_url)
    return f"{parts.scheme}://{parts.netloc}/.well-known/oauth-protected-resource{parts.path.rstrip('/')}"


async def discover(http: httpx2.AsyncClient, gateway_url: str) -> Provider:
    resp = await http.get(prm_url(gateway_url))
    if resp.status_code != 200:
        raise LoginError(f"the gateway has no protected-resource metadata ({resp.status_code})")
    prm = resp.json()
    servers = prm.get("authorization_servers") or []
    if not servers:
        raise LoginError("the gateway's protected-resource metadata names no authorization server")
    issuer = str(servers[0]).rstrip("/")
    meta: dict[str, Any] = {}
    for path in ("/.well-known/oauth-authorization-server", "/.well-known/openid-configuration"):
        resp = await http.get(issuer + path)
        if resp.status_code == 200:
            meta = resp.json()
            break
    if not meta.get("authorization_endpoint") or not meta.get("token_endpoint"):
        raise LoginError(f"no OAuth metadata at {issuer}")
    scopes = " ".join(prm.get("scopes_supported") or []) or SCOPES_FALLBACK
    if "offline_access" not in scopes.split() and "offline_access" in (meta.get("scopes_supported") or []):
        scopes += " offline_access"
    return Provider(resource=str(prm.get("resource") or gateway_url), issuer=issuer,
                    authorization_endpoint=meta["authorization_endpoint"], token_endpoint=meta["token_endpoint"],
                    registration_endpoint=str(meta.get("registration_endpoint") or ""), scopes=scopes)


async def register(http: httpx2.AsyncClient, provider: Provider, redirect_uri: str) -> str:
    resp = await http.post(provider.registration_endpoint, json={
        "client_name": "muster-edge agent", "redirect_uris": [redirect_uri], "application_type": "native",
        "grant_types": ["authorization_code", "refresh_token"], "response_types": ["code"],
        "token_endpoint_auth_method": "none"})
    if resp.status_code not in (200, 201):
        raise LoginError(f"dynamic client registration failed ({resp.status_code})")
    return str(resp.json()["client_id"])


class Callback:
    """A loopback HTTP server that waits for the one redirect carrying the code."""

    def __init__(self) -> None:
        self.result: asyncio.Future[dict[str, str]] = asyncio.get_running_loop().create_future()
        self.server: asyncio.Server | None = None

    async def start(self, port: int) -> int:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", port)
        return int(self.server.sockets[0].getsockname()[1])

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            line = (await asyncio.wait_for(reader.readline(), 10)).decode("latin-1")
            while (await asyncio.wait_for(reader.readline(), 10)) not in (b"\r\n", b"\n", b""):
                pass
            target = line.split()[1] if len(line.split()) > 1 else "/"
            query = {k: v[0] for k, v in parse_qs(urlsplit(target).query).items()}
            done = urlsplit(target).path == "/callback" and ("code" in query or "error" in query)
            body = (b"Signed in to muster-edge. You can close this window.\n" if done and "code" in query
                    else b"muster-edge login: nothing to do here.\n")
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: %d\r\n"
                         b"connection: close\r\n\r\n%s" % (len(body), body))
            await writer.drain()
            if done and not self.result.done():
                self.result.set_result(query)
        except (TimeoutError, ConnectionError, IndexError):
            pass
        finally:
            writer.close()

    def close(self) -> None:
        if self.server is not None:
            self.server.close()


@dataclass
class Pending:
    """A login in progress: the URL to open, and the task that finishes it."""

    url: str
    task: asyncio.Task[Tokens]


async def begin(http: httpx2.AsyncClient, gateway_url: str, *, client_id: str = "", port: int = 0,
                open_browser: bool = True, timeout: float = 300) -> Pending:
    provider = await discover(http, gateway_url)
    callback = Callback()
    port = await callback.start(port)
    redirect_uri = f"http://127.0.0.1:{port}/callback"
    if provider.registration_endpoint:
        client_id = await register(http, provider, redirect_uri)
    if not client_id:
        callback.close()
        raise LoginError("the IdP offers no dynamic client registration: configure a client id (--client-id)")
    verifier = secrets.token_urlsafe(48)
    challenge = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).rstrip(b"=").decode()
    state = secrets.token_urlsafe(16)
    params = {"response_type": "code", "client_id": client_id, "redirect_uri": redirect_uri,
              "scope": provider.scopes, "resource": provider.resource, "state": state,
              "code_challenge": challenge, "code_challenge_method": "S256"}
    if "offline_access" in provider.scopes.split():
        params["prompt"] = "consent"
    url = f"{provider.authorization_endpoint}?{urlencode(params)}"

    async def finish() -> Tokens:
        try:
            query = await asyncio.wait_for(callback.result, timeout)
        finally:
            callback.close()
        if query.get("state") != state:
            raise LoginError("the login's state did not match (a stale or forged redirect)")
        if "error" in query:
            raise LoginError(f"the IdP refused the login: {query['error']}")
        resp = await http.post(provider.token_endpoint, data={
            "grant_type": "authorization_code", "code": query["code"], "redirect_uri": redirect_uri,
            "client_id": client_id, "code_verifier": verifier, "resource": provider.resource})
        if resp.status_code != 200:
            raise LoginError(f"the IdP refused the code ({resp.status_code})")
        return Tokens.from_response(resp.json(), provider.token_endpoint, client_id, provider.resource)

    print(f"muster-edge agent: sign in at {url}", file=sys.stderr, flush=True)
    if open_browser:
        with contextlib.suppress(webbrowser.Error):
            webbrowser.open(url)
    return Pending(url, asyncio.get_running_loop().create_task(finish()))


async def refresh(http: httpx2.AsyncClient, tokens: Tokens) -> Tokens | None:
    if not tokens.refresh_token or not tokens.token_endpoint:
        return None
    form = {"grant_type": "refresh_token", "refresh_token": tokens.refresh_token, "client_id": tokens.client_id}
    if tokens.resource:
        form["resource"] = tokens.resource
    try:
        resp = await http.post(tokens.token_endpoint, data=form)
    except httpx2.HTTPError:
        return None
    if resp.status_code != 200:
        return None
    return Tokens.from_response(resp.json(), tokens.token_endpoint, tokens.client_id, tokens.resource,
                                tokens.refresh_token)
