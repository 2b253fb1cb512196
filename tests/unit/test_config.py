"""The gateway config file: defaults, paths relative to the file, and errors that name the field."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from catalog.config import Address, ConfigError, GatewayConfig, load_config, parse_config


def test_empty_config_gives_the_defaults() -> None:
    cfg = parse_config("")
    assert cfg.listen == Address("127.0.0.1", 8080)
    assert cfg.path == "/mcp"
    assert cfg.internal_listen == Address("127.0.0.1", 18080)
    assert cfg.envoy_admin == Address("127.0.0.1", 9901)
    assert cfg.processor_listen == Address("127.0.0.1", 50051)
    assert cfg.status_listen == Address("127.0.0.1", 9902)
    assert cfg.workers == 1
    assert (cfg.prefix, cfg.prefix_mode) == ("x", "always")
    assert cfg.max_request_bytes == 4 * 1024 * 1024
    assert (cfg.list_page_size, cfg.list_ttl_ms, cfg.list_ttl_floor_ms, cfg.list_wait_ms) == (0, 60_000, 5_000, 5_000)
    assert (cfg.session_key_file, cfg.session_key_env) == ("", "")
    assert cfg.server_name == "muster-edge"
    assert cfg.allowed_origins == ()
    assert cfg.public_url == "http://127.0.0.1:8080/mcp"


def test_without_a_file_relative_paths_resolve_against_the_working_directory() -> None:
    cfg = parse_config("")
    assert cfg.catalog_dir == os.path.join(os.getcwd(), "servers")
    assert cfg.state_dir == os.path.join(os.getcwd(), ".state")


def test_relative_paths_resolve_against_the_config_files_folder(tmp_path: Path) -> None:
    source = str(tmp_path / "conf" / "gateway.yaml")
    cfg = parse_config("catalog: servers\nstateDir: ../state\nsessionKey: {file: keys/session.key}\n", source)
    assert cfg.catalog_dir == str(tmp_path / "conf" / "servers")
    assert cfg.state_dir == str(tmp_path / "state")
    assert cfg.session_key_file == str(tmp_path / "conf" / "keys" / "session.key")
    assert cfg.source == source


def test_absolute_paths_are_kept(tmp_path: Path) -> None:
    cfg = parse_config("catalog: /srv/catalog\nsessionKey: {file: /run/key}\n", str(tmp_path / "g.yaml"))
    assert (cfg.catalog_dir, cfg.session_key_file) == ("/srv/catalog", "/run/key")


def test_default_catalog_folder_is_beside_the_config_file(tmp_path: Path) -> None:
    cfg = parse_config("", str(tmp_path / "g.yaml"))
    assert cfg.catalog_dir == str(tmp_path / "servers")


def test_all_fields_are_read() -> None:
    text = """
listen: 0.0.0.0:9000
path: /gw/
internalListen: 127.0.0.1:19000
envoyAdmin: 127.0.0.1:9001
processor: {listen: 127.0.0.1:50000, workers: 4, status: 127.0.0.1:9003}
prefix: muster
prefixMode: conditional
maxRequestBytes: 2048
sessionKey: {env: GW_KEY}
listPageSize: 50
listTtlMs: 1000
listTtlFloorMs: 10
listWaitMs: 500
serverName: edge
instructions: be nice
allowedOrigins: [https://app.example]
"""
    cfg = parse_config(text)
    assert cfg.listen == Address("0.0.0.0", 9000)
    assert cfg.path == "/gw"
    assert cfg.processor_listen == Address("127.0.0.1", 50000) and cfg.workers == 4
    assert cfg.status_listen == Address("127.0.0.1", 9003)
    assert (cfg.prefix, cfg.prefix_mode) == ("muster", "conditional")
    assert cfg.max_request_bytes == 2048
    assert cfg.session_key_env == "GW_KEY" and cfg.session_key_file == ""
    assert (cfg.list_page_size, cfg.list_ttl_ms, cfg.list_ttl_floor_ms, cfg.list_wait_ms) == (50, 1000, 10, 500)
    assert (cfg.server_name, cfg.instructions) == ("edge", "be nice")
    assert cfg.allowed_origins == ("https://app.example",)
    assert cfg.public_url == "http://0.0.0.0:9000/gw"


def test_root_path_stays_slash() -> None:
    assert parse_config("path: /\n").path == "/"


def test_ipv6_address_loses_its_brackets() -> None:
    assert parse_config("listen: '[::1]:8443'\n").listen == Address("::1", 8443)


def test_address_str_is_host_colon_port() -> None:
    assert str(Address("10.0.0.1", 80)) == "10.0.0.1:80"


@pytest.mark.parametrize("mode", ["always", "conditional", "never"])
def test_every_prefix_mode_is_accepted(mode: str) -> None:
    assert parse_config(f"prefixMode: {mode}\n").prefix_mode == mode


def test_bad_prefix_mode_names_the_field_and_the_value() -> None:
    with pytest.raises(ConfigError) as exc:
        parse_config("prefixMode: sometimes\n", "gw.yaml")
    assert str(exc.value) == "gw.yaml: prefixMode: must be one of always, conditional, never, got 'sometimes'"


@pytest.mark.parametrize(("text", "field"), [
    ("listen: localhost\n", "listen"),
    ("listen: 'localhost:http'\n", "listen"),
    ("listen: '127.0.0.1:65536'\n", "listen"),
    ("listen: ':8080'\n", "listen"),
    ("listen: 8080\n", "listen"),
    ("internalListen: nope\n", "internalListen"),
    ("envoyAdmin: '1.2.3.4:'\n", "envoyAdmin"),
    ("processor: {listen: nowhere}\n", "processor.listen"),
    ("processor: {status: 'a:b'}\n", "processor.status"),
])
def test_bad_address_names_the_field(text: str, field: str) -> None:
    with pytest.raises(ConfigError) as exc:
        parse_config(text, "gw.yaml")
    assert str(exc.value).startswith(f"gw.yaml: {field}: expected HOST:PORT")


def test_unknown_field_is_named() -> None:
    with pytest.raises(ConfigError) as exc:
        parse_config("listen: 127.0.0.1:1\nprefixmode: never\n", "gw.yaml")
    assert str(exc.value) == "gw.yaml: prefixmode: unknown field"


@pytest.mark.parametrize(("text", "needle"), [
    ("prefix: 9x\n", "prefix:"),
    ("prefix: ''\n", "prefix:"),
    ("prefix: 5\n", "prefix:"),
    ("path: mcp\n", "path:"),
    ("sessionKey: {vault: x}\n", "sessionKey:"),
    ("sessionKey: secret\n", "sessionKey:"),
    ("allowedOrigins: https://a.example\n", "allowedOrigins:"),
    ("processor: [a]\n", "processor:"),
    ("processor: {workers: 0}\n", "workers:"),
    ("processor: {workers: 65}\n", "workers:"),
    ("maxRequestBytes: 100\n", "maxRequestBytes:"),
    ("listWaitMs: true\n", "listWaitMs:"),
    ("listTtlMs: -1\n", "listTtlMs:"),
    ("listPageSize: 1.5\n", "listPageSize:"),
])
def test_bad_values_name_the_field(text: str, needle: str) -> None:
    with pytest.raises(ConfigError) as exc:
        parse_config(text, "gw.yaml")
    message = str(exc.value)
    assert message.startswith("gw.yaml: ") and needle in message


def test_invalid_yaml_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match=r"^gw\.yaml: invalid YAML"):
        parse_config("listen: [\n", "gw.yaml")


def test_config_that_is_not_a_mapping_is_refused() -> None:
    with pytest.raises(ConfigError, match="must be a mapping"):
        parse_config("- listen\n", "gw.yaml")


def test_config_error_is_a_value_error() -> None:
    assert issubclass(ConfigError, ValueError)


def test_load_config_reads_the_file_and_resolves_beside_it(tmp_path: Path) -> None:
    path = tmp_path / "gw.yaml"
    path.write_text("catalog: fleet\nprefix: y\n")
    cfg = load_config(str(path))
    assert (cfg.prefix, cfg.catalog_dir, cfg.source) == ("y", str(tmp_path / "fleet"), str(path))


def test_load_config_of_a_missing_file_names_it(tmp_path: Path) -> None:
    missing = str(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="cannot read the gateway config") as exc:
        load_config(missing)
    assert str(exc.value).startswith(missing)


def test_with_overrides_replaces_only_the_given_fields() -> None:
    cfg = parse_config("prefix: y\n")
    changed = cfg.with_overrides(prefix_mode="never")
    assert (changed.prefix, changed.prefix_mode, cfg.prefix_mode) == ("y", "never", "always")
    assert isinstance(changed, GatewayConfig)


def test_prefix_with_trailing_newline_is_refused() -> None:
    with pytest.raises(ConfigError):
        parse_config('prefix: "x\\n"\n', "gw.yaml")


# ---- allowedHosts ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("listen", ["127.0.0.1:8080", "localhost:8080", "'[::1]:8080'"])
def test_loopback_listener_allows_only_loopback_host_names_by_default(listen: str) -> None:
    assert parse_config(f"listen: {listen}\n").allowed_hosts == ("localhost", "127.0.0.1", "[::1]")


def test_non_loopback_listener_has_no_default_host_list() -> None:
    assert parse_config("listen: 0.0.0.0:8080\n").allowed_hosts == ()


def test_explicit_allowed_hosts_are_lower_cased() -> None:
    cfg = parse_config("listen: 0.0.0.0:8080\nallowedHosts: [MCP.Example.com, gw.local]\n")
    assert cfg.allowed_hosts == ("mcp.example.com", "gw.local")


def test_explicit_empty_allowed_hosts_stay_empty_on_loopback() -> None:
    assert parse_config("allowedHosts: []\n").allowed_hosts == ()


@pytest.mark.parametrize("value", ["mcp.example.com", "[1, 2]", "{a: b}"])
def test_bad_allowed_hosts_name_the_field(value: str) -> None:
    with pytest.raises(ConfigError, match=r"^gw\.yaml: allowedHosts: "):
        parse_config(f"allowedHosts: {value}\n", "gw.yaml")
