"""The RFC 8693 request the gateway sends: Muster's parameters, and the standard ones for other IdPs."""

from __future__ import annotations

import base64

import orjson

from catalog.manifests import TokenExchange
from extproc.credentials import Issued, basic_auth, exchange_form, expected_issuer, expiry_buffer


def jwt_with_type(typ: str) -> str:
    head = base64.urlsafe_b64encode(orjson.dumps({"alg": "RS256", "typ": typ})).rstrip(b"=").decode()
    return f"{head}.e30.sig"


DEX = TokenExchange(enabled=True, dex_token_endpoint="https://dex.b.example/token", connector_id="central-dex")


def test_dex_gets_musters_exact_parameters() -> None:
    form = exchange_form(DEX, jwt_with_type("JWT"), ("kubernetes-b",))
    assert form == {
        "grant_type": "urn:ietf:params:oauth:grant-type:token-exchange",
        "subject_token": jwt_with_type("JWT"),
        "subject_token_type": "urn:ietf:params:oauth:token-type:id_token",
        "requested_token_type": "urn:ietf:params:oauth:token-type:id_token",
        "scope": "openid profile email groups audience:server:client_id:kubernetes-b",
        "connector_id": "central-dex",
    }


def test_a_jwt_access_token_says_so_and_other_idps_get_audience_and_resource() -> None:
    other = TokenExchange(enabled=True, dex_token_endpoint="https://idp.example/token", connector_id="c",
                          scopes="mcp:tools", audience="https://mcp.b.example/mcp", resource="https://mcp.b.example/mcp")
    form = exchange_form(other, jwt_with_type("at+jwt"))
    assert form["subject_token_type"] == "urn:ietf:params:oauth:token-type:access_token"
    assert form["requested_token_type"] == "urn:ietf:params:oauth:token-type:access_token"
    assert (form["audience"], form["resource"], form["scope"]) == (other.audience, other.resource, "mcp:tools")


def test_expected_issuer_defaults_to_the_endpoint_without_token() -> None:
    assert expected_issuer(DEX) == "https://dex.b.example"
    pinned = TokenExchange(enabled=True, dex_token_endpoint="https://proxy.example/dex/token",
                           expected_issuer="https://dex.b.example/")
    assert expected_issuer(pinned) == "https://dex.b.example"


def test_basic_auth_form_encodes_before_base64() -> None:
    assert basic_auth("a b", "s+c:r") == "Basic " + base64.b64encode(b"a+b:s%2Bc%3Ar").decode()


def test_tokens_are_renewed_30_s_early_or_a_quarter_of_a_short_life() -> None:
    assert expiry_buffer(Issued("t", expires_at=1000.0 + 3600, issued_at=1000.0)) == 30
    assert expiry_buffer(Issued("t", expires_at=1000.0 + 40, issued_at=1000.0)) == 10
    assert expiry_buffer(Issued("t", expires_at=1000.0 + 2, issued_at=1000.0)) == 1.0
