"""Sealed session ids and list cursors: AEAD round trips, tampering, binding to the caller, expiry, keys."""

from __future__ import annotations

import base64
import logging
import re
import secrets
from pathlib import Path

import pytest

from extproc import sessions
from extproc.sessions import Cursors, Sealer, SessionRecord, Sessions, load_key

KEY = bytes(range(32))
AAD = b"muster-edge/test"


@pytest.fixture
def sealer() -> Sealer:
    return Sealer(KEY)


def _raw(token: str) -> bytes:
    return base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))


def _token(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


# ---- Sealer ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("payload", [b"", b"x", secrets.token_bytes(100), b"\x00" * 1000])
def test_seal_then_open_returns_the_payload(sealer: Sealer, payload: bytes) -> None:
    assert sealer.open(sealer.seal(payload, AAD), AAD) == payload


def test_sealed_token_is_unpadded_base64url(sealer: Sealer) -> None:
    token = sealer.seal(b"payload", AAD)
    assert re.fullmatch(r"[A-Za-z0-9_-]+", token)
    assert len(_raw(token)) == 12 + len(b"payload") + 16


def test_the_same_payload_seals_differently_each_time(sealer: Sealer) -> None:
    assert sealer.seal(b"same", AAD) != sealer.seal(b"same", AAD)


def test_every_flipped_bit_is_refused(sealer: Sealer) -> None:
    raw = _raw(sealer.seal(b"subject=alice", AAD))
    for index in range(len(raw)):
        for bit in (0x01, 0x80):
            tampered = raw[:index] + bytes([raw[index] ^ bit]) + raw[index + 1:]
            assert sealer.open(_token(tampered), AAD) is None, (index, bit)


@pytest.mark.parametrize("cut", [1, 4, 16, 20])
def test_truncated_token_is_refused(sealer: Sealer, cut: int) -> None:
    token = sealer.seal(b"subject=alice", AAD)
    assert sealer.open(token[:-cut], AAD) is None


def test_extended_token_is_refused(sealer: Sealer) -> None:
    token = sealer.seal(b"subject=alice", AAD)
    assert sealer.open(token + "AAAA", AAD) is None


def test_wrong_aad_is_refused(sealer: Sealer) -> None:
    assert sealer.open(sealer.seal(b"p", AAD), b"muster-edge/other") is None


def test_another_key_is_refused(sealer: Sealer) -> None:
    assert Sealer(bytes(32)).open(sealer.seal(b"p", AAD), AAD) is None


@pytest.mark.parametrize("token", ["", "a", "%%%%", "A" * 10, "A" * 5000, "ü" * 40])
def test_garbage_is_refused(sealer: Sealer, token: str) -> None:
    assert sealer.open(token, AAD) is None


def test_token_with_a_foreign_character_is_refused(sealer: Sealer) -> None:
    token = sealer.seal(b"subject=alice", AAD)
    assert sealer.open(token[:5] + "!!!!" + token[5:], AAD) is None


# ---- Sessions --------------------------------------------------------------------------------------------------

def test_mint_then_open_gives_the_session(sealer: Sealer) -> None:
    store = Sessions(sealer)
    session_id, nonce = store.mint("alice", "2025-11-25")
    token = store.open(session_id, "alice")
    assert token is not None
    assert (token.subject, token.protocol_version, token.nonce) == ("alice", "2025-11-25", nonce)
    assert len(nonce) == 16


def test_session_id_is_visible_ascii_without_the_subject_in_clear(sealer: Sealer) -> None:
    session_id, _ = Sessions(sealer).mint("alice@example.com", "2025-11-25")
    assert re.fullmatch(r"[\x21-\x7e]+", session_id)
    assert "alice" not in session_id and b"alice" not in _raw(session_id)


def test_two_mints_give_different_sessions(sealer: Sealer) -> None:
    store = Sessions(sealer)
    (id1, n1), (id2, n2) = store.mint("alice", "v"), store.mint("alice", "v")
    assert id1 != id2 and n1 != n2


def test_session_is_bound_to_its_subject(sealer: Sealer) -> None:
    store = Sessions(sealer)
    session_id, _ = store.mint("alice", "2025-11-25")
    assert store.open(session_id, "bob") is None
    assert store.open(session_id, "") is None
    assert store.open(session_id, "alice") is not None


def test_anonymous_session_opens_only_anonymously(sealer: Sealer) -> None:
    store = Sessions(sealer)
    session_id, _ = store.mint("", "2025-11-25")
    assert store.open(session_id, "") is not None
    assert store.open(session_id, "alice") is None


def test_ended_session_no_longer_opens(sealer: Sealer) -> None:
    store = Sessions(sealer)
    session_id, nonce = store.mint("alice", "v")
    other_id, _ = store.mint("alice", "v")
    store.record(nonce).log_level = "debug"
    ended = store.end(nonce)
    assert isinstance(ended, SessionRecord) and ended.log_level == "debug"
    assert store.open(session_id, "alice") is None
    assert store.open(other_id, "alice") is not None


def test_session_from_another_replica_with_the_same_key_opens(sealer: Sealer) -> None:
    session_id, _ = Sessions(sealer).mint("alice", "v")
    assert Sessions(Sealer(KEY)).open(session_id, "alice") is not None


def test_session_sealed_with_another_key_is_refused(sealer: Sealer) -> None:
    session_id, _ = Sessions(Sealer(bytes(32))).mint("alice", "v")
    assert Sessions(sealer).open(session_id, "alice") is None


def test_session_expires_after_max_age(sealer: Sealer, monkeypatch: pytest.MonkeyPatch) -> None:
    now = 1_800_000_000.0
    monkeypatch.setattr(sessions.time, "time", lambda: now)
    store = Sessions(sealer, max_age_s=3600)
    session_id, _ = store.mint("alice", "v")
    monkeypatch.setattr(sessions.time, "time", lambda: now + 3600)
    assert store.open(session_id, "alice") is not None
    monkeypatch.setattr(sessions.time, "time", lambda: now + 3601)
    assert store.open(session_id, "alice") is None


def test_record_is_kept_per_session(sealer: Sealer) -> None:
    store = Sessions(sealer)
    _, n1 = store.mint("a", "v")
    _, n2 = store.mint("a", "v")
    store.record(n1).log_level = "info"
    assert store.record(n1).log_level == "info"
    assert store.record(n2).log_level == ""
    assert store.record(b"unknown-nonce-00").log_level == ""


def test_session_id_is_not_a_cursor_and_a_cursor_is_not_a_session(sealer: Sealer) -> None:
    store, cursors = Sessions(sealer), Cursors(sealer)
    session_id, _ = store.mint("alice", "v")
    assert cursors.read("tools/list", session_id) is None
    assert store.open(cursors.make("tools/list", 1, 2), "") is None


def test_ended_session_stays_ended_after_many_more_end(sealer: Sealer) -> None:
    store = Sessions(sealer, max_sessions=2)
    minted = [store.mint("alice", "v") for _ in range(3)]
    for _, nonce in minted:
        store.end(nonce)
    assert store.open(minted[0][0], "alice") is None


# ---- Cursors ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("view", "offset"), [(0, 0), (1, 50), (2**64 - 1, 2**32 - 1)])
def test_cursor_round_trip(sealer: Sealer, view: int, offset: int) -> None:
    cursors = Cursors(sealer)
    parsed = cursors.read("tools/list", cursors.make("tools/list", view, offset))
    assert parsed is not None
    assert (parsed.method, parsed.view, parsed.offset) == ("tools/list", view, offset)


def test_cursor_for_another_method_is_refused(sealer: Sealer) -> None:
    cursors = Cursors(sealer)
    assert cursors.read("prompts/list", cursors.make("tools/list", 1, 10)) is None


def test_tampered_cursor_is_refused(sealer: Sealer) -> None:
    cursors = Cursors(sealer)
    raw = bytearray(_raw(cursors.make("tools/list", 1, 10)))
    raw[14] ^= 0x01
    assert cursors.read("tools/list", _token(bytes(raw))) is None


def test_cursor_from_another_key_is_refused(sealer: Sealer) -> None:
    assert Cursors(sealer).read("tools/list", Cursors(Sealer(bytes(32))).make("tools/list", 1, 1)) is None


@pytest.mark.parametrize("cursor", ["", "not-a-cursor", "0"])
def test_garbage_cursor_is_refused(sealer: Sealer, cursor: str) -> None:
    assert Cursors(sealer).read("tools/list", cursor) is None


# ---- load_key --------------------------------------------------------------------------------------------------

def test_load_key_from_a_file(tmp_path: Path) -> None:
    path = tmp_path / "session.key"
    path.write_text(base64.b64encode(KEY).decode() + "\n")
    assert load_key(file=str(path)) == KEY


def test_load_key_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GW_TEST_KEY", " " + base64.b64encode(KEY).decode() + " ")
    assert load_key(env="GW_TEST_KEY") == KEY


def test_file_wins_over_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "k"
    path.write_text(base64.b64encode(KEY).decode())
    monkeypatch.setenv("GW_TEST_KEY", base64.b64encode(bytes(32)).decode())
    assert load_key(file=str(path), env="GW_TEST_KEY") == KEY


@pytest.mark.parametrize("value", [None, "", "   "])
def test_load_key_from_an_unset_or_empty_env_is_an_error(monkeypatch: pytest.MonkeyPatch, value: str | None) -> None:
    if value is None:
        monkeypatch.delenv("GW_TEST_KEY", raising=False)
    else:
        monkeypatch.setenv("GW_TEST_KEY", value)
    with pytest.raises(ValueError, match="GW_TEST_KEY"):
        load_key(env="GW_TEST_KEY")


@pytest.mark.parametrize("value", ["not base64!", "QUJD*", base64.urlsafe_b64encode(b"\xfb" * 32).decode()])
def test_load_key_refuses_invalid_base64(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    monkeypatch.setenv("GW_TEST_KEY", value)
    with pytest.raises(ValueError, match="not valid base64"):
        load_key(env="GW_TEST_KEY")


@pytest.mark.parametrize("size", [16, 31, 33, 64])
def test_load_key_refuses_a_key_that_is_not_32_bytes(monkeypatch: pytest.MonkeyPatch, size: int) -> None:
    monkeypatch.setenv("GW_TEST_KEY", base64.b64encode(bytes(size)).decode())
    with pytest.raises(ValueError, match=f"32 bytes, got {size}"):
        load_key(env="GW_TEST_KEY")


def test_load_key_of_a_missing_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(OSError):
        load_key(file=str(tmp_path / "missing.key"))


def test_without_configuration_a_random_key_is_used_with_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="extproc.sessions"):
        first, second = load_key(), load_key()
    assert len(first) == 32 and len(second) == 32 and first != second
    assert any("random key" in r.getMessage() for r in caplog.records)


def test_load_key_from_an_empty_file_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "empty.key"
    path.write_text("\n")
    with pytest.raises(ValueError):
        load_key(file=str(path))
