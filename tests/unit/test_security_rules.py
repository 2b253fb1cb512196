"""The pure rules behind issue 9's security items: who may read /status, what it shows, and the config checks."""

from __future__ import annotations

import pytest

from catalog.config import ConfigError, parse_config
from extproc.status import authorized, is_loopback, redact

AUTH = "auth: {issuer: https://idp.example, jwksUri: https://idp.example/keys}\n"
OAUTH = "upstreamOAuth: {clientId: gw}\n"


@pytest.mark.parametrize(("peer", "loopback"), [
    (("127.0.0.1", 5), True), (("127.3.2.1", 5), True), (("::1", 5, 0, 0), True), (("::ffff:127.0.0.1", 5, 0, 0), True),
    (("192.0.2.2", 5), False), (("10.0.0.1", 5), False), (("::ffff:10.0.0.1", 5, 0, 0), False), (None, False),
    (("not-an-ip", 5), False)])
def test_loopback_peers(peer: object, loopback: bool) -> None:
    assert is_loopback(peer) is loopback


def test_a_remote_peer_needs_the_exact_token() -> None:
    remote = ("192.0.2.2", 4000)
    assert authorized(remote, "Bearer s3cret", "s3cret") and authorized(remote, "bearer s3cret", "s3cret")
    assert not authorized(remote, "Bearer wrong", "s3cret")
    assert not authorized(remote, "Basic s3cret", "s3cret")
    assert not authorized(remote, "", "s3cret")
    assert not authorized(remote, "Bearer ", "")  # no token configured: only loopback
    assert authorized(("127.0.0.1", 1), "", "")


def test_status_counts_users_and_never_names_them() -> None:
    status = {"servers": [{"name": "fwd", "state": "Per user", "users": {"alice": "Connected", "bob": "Connected",
                                                                          "carol": "Auth Required"}},
                          {"name": "plain", "state": "Connected"}], "refused": []}
    shown = redact(status)
    assert shown["servers"][0]["users"] == {"Connected": 2, "Auth Required": 1}
    assert shown["servers"][1] == {"name": "plain", "state": "Connected"}
    assert not any(name in str(shown) for name in ("alice", "bob", "carol"))


def test_per_user_oauth_with_auth_needs_the_edge_login_client() -> None:
    with pytest.raises(ConfigError, match="edgeLogin is required"):
        parse_config(AUTH + OAUTH)
    config = parse_config(AUTH + OAUTH + "edgeLogin: {clientId: gw-login, clientSecretEnv: EDGE_SECRET}\n")
    assert config.edge_login is not None and config.edge_login.scopes == "openid"
    assert parse_config(OAUTH).edge_login is None  # no auth: every caller is the same anonymous user
    with pytest.raises(ConfigError, match="needs auth"):
        parse_config(OAUTH + "edgeLogin: {clientId: gw-login}\n")
    with pytest.raises(ConfigError, match="must include openid"):
        parse_config(AUTH + OAUTH + "edgeLogin: {clientId: gw-login, scopes: profile}\n")


def test_status_token_is_a_file_or_an_env_reference() -> None:
    assert parse_config("statusToken: {env: STATUS_TOKEN}\n").status_token_env == "STATUS_TOKEN"
    assert parse_config("statusToken: {file: /run/token}\n").status_token_file == "/run/token"
    for bad in ("statusToken: s3cret\n", "statusToken: {value: s3cret}\n", "statusToken: {file: a, env: B}\n"):
        with pytest.raises(ConfigError, match="statusToken"):
            parse_config(bad)
