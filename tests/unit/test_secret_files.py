"""Secrets as files: rotated values are picked up, references in header values are resolved."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from extproc.credentials import SecretFiles, resolve_value


def test_a_rotated_secret_file_is_read_again(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    files = SecretFiles(str(tmp_path))
    token = tmp_path / "token"
    token.write_text("first\n")
    assert files.read_file(str(token)) == "first"
    token.write_text("second\n")
    os.utime(token, ns=(time.time_ns() + 10**9, time.time_ns() + 10**9))
    assert files.read_file(str(token)) == "first"  # looked at no more than once a second
    monkeypatch.setattr(SecretFiles, "RECHECK_S", 0.0)
    assert files.read_file(str(token)) == "second"


def test_secrets_are_found_as_kubernetes_mounts_them(tmp_path: Path) -> None:
    (tmp_path / "ns" / "creds").mkdir(parents=True)
    (tmp_path / "ns" / "creds" / "client-id").write_text("abc\n")
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "key").write_text("xyz")
    files = SecretFiles(str(tmp_path))
    assert files.secret("ns", "creds", "client-id") == "abc"
    assert files.secret("other-ns", "plain", "key") == "xyz"
    with pytest.raises(FileNotFoundError):
        files.secret("ns", "creds", "client-secret")


def test_header_values_resolve_files_and_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "t").write_text("from-file\n")
    monkeypatch.setenv("MUSTER_EDGE_UNIT_TOKEN", "from-env")
    files = SecretFiles(str(tmp_path))
    assert resolve_value(f"Bearer ${{file:{tmp_path / 't'}}}", files) == "Bearer from-file"
    assert resolve_value("Key ${env:MUSTER_EDGE_UNIT_TOKEN}", files) == "Key from-env"
    assert resolve_value("plain", files) == "plain"
    with pytest.raises(KeyError):
        resolve_value("${env:MUSTER_EDGE_UNIT_MISSING}", files)
