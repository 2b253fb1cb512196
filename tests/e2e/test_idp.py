"""The test OpenID provider (deploy/idp/idp.mjs, npm `oidc-provider`) on its own, through tests/idp.py.

Pins what the gateway tests rely on: discovery, JWT access tokens per resource (RFC 8707) that verify against
the JWKS, RFC 8693 token exchange, the authorization-code + PKCE flow, refresh tokens, the test switches, and
that the mcp SDK's client_credentials provider can get a token from it.
"""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx2
import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa
from jwt.algorithms import RSAAlgorithm

from tests.idp import (
    GRANT_TOKEN_EXCHANGE,
    TOKEN_TYPE_ACCESS,
    TOKEN_TYPE_ID,
    Idp,
    IdpError,
    forge_token,
    new_code_verifier,
    start_idp,
)

KUBERNETES = "https://kubernetes.cluster-a.test/mcp"
PROMETHEUS = "https://prometheus.cluster-a.test/mcp"
REMOTE = "https://kubernetes.cluster-b.test/mcp"
SDK_MCP = "http://mcp.test/mcp"
REDIRECT = "http://127.0.0.1:1/callback"

CLIENTS: list[dict[str, Any]] = [
    {"client_id": "agent", "client_secret": "agent-secret", "claims": {"groups": ["sre"], "team": "platform"}},
    {"client_id": "robot", "client_secret": "robot-secret", "claims": {"sub": "system:robot"}},
    {
        "client_id": "gateway",
        "client_secret": "gateway-secret",
        "grant_types": ["client_credentials", GRANT_TOKEN_EXCHANGE],
    },
    {
        "client_id": "web",
        "client_secret": "web-secret",
        "grant_types": ["authorization_code", "refresh_token"],
        "redirect_uris": [REDIRECT],
        "scope": "openid email groups offline_access mcp:read mcp:write",
    },
]
RESOURCES: list[dict[str, Any]] = [
    {"audience": KUBERNETES, "scope": "mcp:read mcp:write", "accessTokenTTL": 120},
    {"audience": PROMETHEUS, "scope": "mcp:read"},
    {"audience": REMOTE, "scope": "mcp:read", "accessTokenTTL": 60},
    {"audience": SDK_MCP, "scope": "mcp:read"},
]
USERS: list[dict[str, Any]] = [
    {"sub": "alice", "password": "wonderland", "claims": {"email": "alice@example.test", "groups": ["sre", "dev"]}},
]


@pytest.fixture(scope="module")
def idp(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Idp]:
    with start_idp(
        tmp_path_factory.mktemp("idp"), clients=CLIENTS, resources=RESOURCES, users=USERS, token_exchange=True
    ) as running:
        yield running


def verify(idp: Idp, token: str, audience: str) -> dict[str, Any]:
    """Check the token the way a resource server would: PyJWKClient against the published JWKS."""
    key = jwt.PyJWKClient(idp.jwks_uri).get_signing_key_from_jwt(token)
    claims = jwt.decode(token, key, algorithms=["RS256"], audience=audience, issuer=idp.issuer)
    assert isinstance(claims, dict)
    return claims


def tamper(token: str) -> str:
    """The same token with one claim changed and the old signature kept."""
    header, payload, signature = token.split(".")
    claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    claims["sub"] = "mallory"
    forged = base64.urlsafe_b64encode(json.dumps(claims).encode()).rstrip(b"=").decode()
    return f"{header}.{forged}.{signature}"


def agent_token(idp: Idp, resource: str = KUBERNETES) -> str:
    return idp.client_credentials("agent", "agent-secret", resource=resource, scope="mcp:read")


# ---------------------------------------------------------------------------------------------- discovery


def test_discovery_documents(idp: Idp) -> None:
    openid = httpx2.get(idp.url("/.well-known/openid-configuration")).json()
    oauth = httpx2.get(idp.url("/.well-known/oauth-authorization-server")).json()
    assert openid == oauth
    assert openid["issuer"] == idp.issuer
    assert openid["token_endpoint"] == f"{idp.issuer}/token"
    assert openid["jwks_uri"] == f"{idp.issuer}/jwks"
    assert {"client_credentials", "authorization_code", "refresh_token", GRANT_TOKEN_EXCHANGE} <= set(
        openid["grant_types_supported"]
    )
    assert openid["code_challenge_methods_supported"] == ["S256"]
    assert openid["authorization_response_iss_parameter_supported"] is True


def test_endpoints_name_the_issuer_whatever_the_host(idp: Idp) -> None:
    document = httpx2.get(f"http://localhost:{idp.port}/.well-known/oauth-authorization-server").json()
    assert document["token_endpoint"] == idp.token_endpoint


def test_jwks_publishes_one_fresh_rsa_key(idp: Idp) -> None:
    (key,) = idp.jwks()["keys"]
    assert key["kty"] == "RSA"
    assert key["alg"] == "RS256"
    assert "d" not in key


# ---------------------------------------------------------------------------------------------- client_credentials


def test_client_credentials_with_resource_is_a_verifiable_jwt(idp: Idp) -> None:
    token = agent_token(idp)
    assert jwt.get_unverified_header(token)["typ"] == "at+jwt"
    claims = verify(idp, token, KUBERNETES)
    assert claims["aud"] == KUBERNETES
    assert claims["sub"] == "agent"
    assert claims["client_id"] == "agent"
    assert claims["scope"] == "mcp:read"
    assert claims["groups"] == ["sre"]
    assert claims["team"] == "platform"
    assert claims["jti"]


def test_second_resource_gets_its_own_audience(idp: Idp) -> None:
    claims = verify(idp, agent_token(idp, PROMETHEUS), PROMETHEUS)
    assert claims["aud"] == PROMETHEUS
    with pytest.raises(jwt.InvalidAudienceError):
        verify(idp, agent_token(idp, PROMETHEUS), KUBERNETES)


def test_resource_ttl_is_honoured(idp: Idp) -> None:
    kubernetes = verify(idp, agent_token(idp, KUBERNETES), KUBERNETES)
    prometheus = verify(idp, agent_token(idp, PROMETHEUS), PROMETHEUS)
    assert kubernetes["exp"] - kubernetes["iat"] == 120
    assert prometheus["exp"] - prometheus["iat"] == 300  # the default


def test_scopes_outside_the_resource_are_dropped(idp: Idp) -> None:
    token = idp.client_credentials("agent", "agent-secret", resource=PROMETHEUS, scope="mcp:read mcp:write")
    assert verify(idp, token, PROMETHEUS)["scope"] == "mcp:read"


def test_client_can_override_the_subject(idp: Idp) -> None:
    token = idp.client_credentials("robot", "robot-secret", resource=KUBERNETES)
    claims = verify(idp, token, KUBERNETES)
    assert claims["sub"] == "system:robot"
    assert claims["client_id"] == "robot"


def test_unknown_resource_is_invalid_target(idp: Idp) -> None:
    with pytest.raises(IdpError) as caught:
        idp.client_credentials("agent", "agent-secret", resource="https://unknown.test/mcp")
    assert (caught.value.status, caught.value.error) == (400, "invalid_target")


def test_wrong_client_secret_is_401(idp: Idp) -> None:
    with pytest.raises(IdpError) as caught:
        idp.client_credentials("agent", "wrong", resource=KUBERNETES)
    assert (caught.value.status, caught.value.error) == (401, "invalid_client")


# ---------------------------------------------------------------------------------------------- token exchange


def test_token_exchange_for_another_audience(idp: Idp) -> None:
    answer = idp.token_exchange("gateway", "gateway-secret", agent_token(idp), audience=REMOTE, connector_id="central")
    assert answer["issued_token_type"] == TOKEN_TYPE_ACCESS
    assert answer["token_type"] == "Bearer"
    assert answer["expires_in"] == 60
    claims = verify(idp, answer["access_token"], REMOTE)
    assert claims["aud"] == REMOTE
    assert claims["sub"] == "agent"
    assert claims["act"] == {"sub": "gateway"}
    assert claims["client_id"] == "gateway"
    assert claims["groups"] == ["sre"]
    assert claims["connector_id"] == "central"
    assert claims["scope"] == "mcp:read"


def test_token_exchange_by_resource_and_chained(idp: Idp) -> None:
    first = idp.token_exchange("gateway", "gateway-secret", agent_token(idp), resource=PROMETHEUS)["access_token"]
    second = idp.token_exchange("gateway", "gateway-secret", first, resource=REMOTE)["access_token"]
    claims = verify(idp, second, REMOTE)
    assert claims["sub"] == "agent"
    assert claims["act"] == {"sub": "gateway", "act": {"sub": "gateway"}}
    assert "connector_id" not in claims


@pytest.mark.parametrize(
    "subject",
    [
        pytest.param(lambda idp: tamper(agent_token(idp)), id="tampered"),
        pytest.param(lambda idp: forge_token({"iss": idp.issuer, "sub": "agent", "aud": KUBERNETES}), id="unknown-key"),
        pytest.param(lambda idp: "not-a-jwt", id="garbage"),
    ],
)
def test_token_exchange_rejects_bad_subject_tokens(idp: Idp, subject: Any) -> None:
    with pytest.raises(IdpError) as caught:
        idp.token_exchange("gateway", "gateway-secret", subject(idp), audience=REMOTE)
    assert (caught.value.status, caught.value.error) == (400, "invalid_grant")


def test_token_exchange_errors(idp: Idp) -> None:
    subject = agent_token(idp)
    with pytest.raises(IdpError) as caught:
        idp.token_exchange("gateway", "wrong", subject, audience=REMOTE)
    assert (caught.value.status, caught.value.error) == (401, "invalid_client")
    with pytest.raises(IdpError) as caught:
        idp.token_exchange("gateway", "gateway-secret", subject)
    assert (caught.value.status, caught.value.error) == (400, "invalid_request")
    with pytest.raises(IdpError) as caught:
        idp.token_exchange("gateway", "gateway-secret", subject, audience="https://unknown.test/mcp")
    assert (caught.value.status, caught.value.error) == (400, "invalid_target")
    with pytest.raises(IdpError) as caught:  # a client without the grant
        idp.token_exchange("agent", "agent-secret", subject, audience=REMOTE)
    assert caught.value.status == 400


def test_configured_signing_key_and_subject_token_checks(tmp_path: Path) -> None:
    """With `jwks` in the config the provider signs with that key; tokens signed with it but expired or from
    another issuer are still refused as subject tokens."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    jwk = {**RSAAlgorithm.to_jwk(key, as_dict=True), "kid": "configured", "alg": "RS256", "use": "sig"}
    with start_idp(tmp_path, clients=CLIENTS, resources=RESOURCES, token_exchange=True, jwks={"keys": [jwk]}) as idp:
        assert [published["kid"] for published in idp.jwks()["keys"]] == ["configured"]
        assert jwt.get_unverified_header(agent_token(idp))["kid"] == "configured"

        def signed(**claims: Any) -> str:
            now = int(time.time())
            payload = {"iss": idp.issuer, "sub": "agent", "iat": now, "exp": now + 60, **claims}
            return jwt.encode(payload, key, algorithm="RS256", headers={"kid": "configured", "typ": "at+jwt"})

        exchanged = idp.token_exchange("gateway", "gateway-secret", signed(groups=["ops"]), audience=REMOTE)
        assert verify(idp, exchanged["access_token"], REMOTE)["groups"] == ["ops"]
        for bad in (signed(exp=int(time.time()) - 60), signed(iss="https://other.test")):
            with pytest.raises(IdpError) as caught:
                idp.token_exchange("gateway", "gateway-secret", bad, audience=REMOTE)
            assert caught.value.error == "invalid_grant"


# ---------------------------------------------------------------------------------------------- test switches


def test_counters_count_token_requests_by_grant(idp: Idp) -> None:
    idp.reset_counters()
    subject = agent_token(idp)
    idp.token_exchange("gateway", "gateway-secret", subject, audience=REMOTE, connector_id="central")
    idp.token_exchange("gateway", "gateway-secret", subject, audience=REMOTE)
    with pytest.raises(IdpError):
        idp.client_credentials("agent", "wrong", resource=KUBERNETES)
    token = idp.counters()["token"]
    assert token == {"total": 4, "errors": 1, "by_grant": {"client_credentials": 2, GRANT_TOKEN_EXCHANGE: 2}}
    assert idp.token_requests(GRANT_TOKEN_EXCHANGE) == 2
    exchange = idp.recent_requests()[1]
    assert exchange["connector_id"] == "central"
    assert exchange["subject"] == "agent"
    idp.reset_counters()
    assert idp.token_requests() == 0


def test_set_down_makes_the_token_endpoint_503(idp: Idp) -> None:
    idp.set_down(True)
    try:
        with pytest.raises(IdpError) as caught:
            agent_token(idp)
        assert caught.value.status == 503
        assert httpx2.get(idp.jwks_uri).status_code == 200  # only the token endpoint is down
        idp.set_down(True, everything=True)
        assert httpx2.get(idp.jwks_uri).status_code == 503
    finally:
        idp.set_down(False)
    assert agent_token(idp)
    assert idp.counters()["mode"] == "ok"


# ---------------------------------------------------------------------------------------------- browser flow


def log_in(idp: Idp, verifier: str, scope: str = "openid email groups mcp:read mcp:write") -> str:
    return idp.login_flow(
        "web",
        REDIRECT,
        user="alice",
        password="wonderland",
        resource=KUBERNETES,
        scope=scope,
        code_verifier=verifier,
        state="xyz",
    )


def test_login_flow_code_gives_a_jwt_with_the_users_claims(idp: Idp) -> None:
    verifier = new_code_verifier()
    code = log_in(idp, verifier)
    tokens = idp.exchange_code("web", "web-secret", code, redirect_uri=REDIRECT, code_verifier=verifier,
                               resource=KUBERNETES)
    claims = verify(idp, tokens["access_token"], KUBERNETES)
    assert claims["sub"] == "alice"
    assert claims["email"] == "alice@example.test"
    assert claims["groups"] == ["sre", "dev"]
    assert claims["client_id"] == "web"
    assert set(claims["scope"].split()) == {"mcp:read", "mcp:write"}
    assert "refresh_token" not in tokens
    id_token = jwt.decode(tokens["id_token"], options={"verify_signature": False})
    assert id_token["sub"] == "alice"


def test_login_flow_wrong_pkce_verifier_is_invalid_grant(idp: Idp) -> None:
    code = log_in(idp, new_code_verifier())
    with pytest.raises(IdpError) as caught:
        idp.exchange_code("web", "web-secret", code, redirect_uri=REDIRECT, code_verifier=new_code_verifier(),
                          resource=KUBERNETES)
    assert (caught.value.status, caught.value.error) == (400, "invalid_grant")


def test_login_flow_wrong_password_is_refused(idp: Idp) -> None:
    with pytest.raises(IdpError) as caught:
        idp.login_flow("web", REDIRECT, user="alice", password="nope", resource=KUBERNETES, scope="openid",
                       code_verifier=new_code_verifier(), state="s")
    assert caught.value.status == 401


def test_refresh_token_with_offline_access(idp: Idp) -> None:
    verifier = new_code_verifier()
    code = log_in(idp, verifier, scope="openid offline_access mcp:read")
    tokens = idp.exchange_code("web", "web-secret", code, redirect_uri=REDIRECT, code_verifier=verifier,
                               resource=KUBERNETES)
    refreshed = idp.refresh("web", "web-secret", tokens["refresh_token"], resource=KUBERNETES)
    claims = verify(idp, refreshed["access_token"], KUBERNETES)
    assert claims["sub"] == "alice"
    assert claims["groups"] == ["sre", "dev"]
    assert claims["scope"] == "mcp:read"


def test_exchange_of_a_users_token_keeps_the_user(idp: Idp) -> None:
    verifier = new_code_verifier()
    code = log_in(idp, verifier)
    user_token = idp.exchange_code("web", "web-secret", code, redirect_uri=REDIRECT, code_verifier=verifier,
                                   resource=KUBERNETES)["access_token"]
    claims = verify(idp, idp.token_exchange("gateway", "gateway-secret", user_token, audience=REMOTE)["access_token"],
                    REMOTE)
    assert (claims["sub"], claims["email"], claims["groups"]) == ("alice", "alice@example.test", ["sre", "dev"])
    assert claims["act"] == {"sub": "gateway"}


def test_exchange_of_an_id_token(idp: Idp) -> None:
    verifier = new_code_verifier()
    code = log_in(idp, verifier)
    tokens = idp.exchange_code("web", "web-secret", code, redirect_uri=REDIRECT, code_verifier=verifier,
                               resource=KUBERNETES)
    answer = idp.token_exchange("gateway", "gateway-secret", tokens["id_token"], audience=REMOTE,
                                subject_token_type=TOKEN_TYPE_ID)
    claims = verify(idp, answer["access_token"], REMOTE)
    assert (claims["sub"], claims["groups"]) == ("alice", ["sre", "dev"])
    assert "nonce" not in claims and "at_hash" not in claims
    with pytest.raises(IdpError) as caught:  # an access token presented as an ID token
        idp.token_exchange("gateway", "gateway-secret", tokens["access_token"], audience=REMOTE,
                           subject_token_type=TOKEN_TYPE_ID)
    assert caught.value.error == "invalid_grant"
