"""The bridge's relay: client ids renumbered towards the peer and restored, messages routed to their request,
and a stdio child's environment built from the manifest alone."""

from __future__ import annotations

import asyncio
from pathlib import Path

import orjson
import pytest

from catalog.manifests import MCPServer
from extproc.bridges.children import child_env
from extproc.bridges.refs import resolve
from extproc.bridges.relay import Relay


def relay_with_wire() -> tuple[Relay, list[dict[str, object]]]:
    wire: list[dict[str, object]] = []

    async def send(data: bytes) -> None:
        wire.append(orjson.loads(data))

    return Relay("srv", send), wire


async def test_two_clients_with_the_same_id_each_get_their_own_answer() -> None:
    relay, wire = relay_with_wire()
    first = await relay.request({"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {"name": "a"}})
    second = await relay.request({"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {"name": "b"}})
    assert wire[0]["id"] != wire[1]["id"]
    relay.deliver(orjson.dumps({"jsonrpc": "2.0", "id": wire[1]["id"], "result": {"who": "b"}}))
    relay.deliver(orjson.dumps({"jsonrpc": "2.0", "id": wire[0]["id"], "result": {"who": "a"}}))
    assert first.queue.get_nowait() == {"jsonrpc": "2.0", "id": 1, "result": {"who": "a"}}
    assert second.queue.get_nowait() == {"jsonrpc": "2.0", "id": 1, "result": {"who": "b"}}


async def test_progress_goes_to_the_request_that_asked_for_it_and_a_server_request_keeps_its_id() -> None:
    relay, _wire = relay_with_wire()
    slow = await relay.request({"jsonrpc": "2.0", "id": "a", "method": "tools/call",
                                "params": {"name": "slow", "_meta": {"progressToken": "t1"}}})
    newest = await relay.request({"jsonrpc": "2.0", "id": "b", "method": "tools/call", "params": {"name": "x"}})
    relay.deliver(b'{"jsonrpc":"2.0","method":"notifications/progress","params":{"progressToken":"t1","progress":1}}')
    relay.deliver(b'{"jsonrpc":"2.0","id":7,"method":"elicitation/create","params":{"message":"?"}}')
    assert slow.queue.get_nowait()["method"] == "notifications/progress"
    assert newest.queue.get_nowait() == {"jsonrpc": "2.0", "id": 7, "method": "elicitation/create",
                                         "params": {"message": "?"}}


async def test_when_the_peer_goes_every_request_in_flight_gets_an_error_naming_the_server() -> None:
    relay, _ = relay_with_wire()
    call = await relay.request({"jsonrpc": "2.0", "id": 3, "method": "tools/call", "params": {}})
    relay.close("is unavailable: exited with code 1")
    answer = call.queue.get_nowait()
    assert answer["id"] == 3 and answer["error"]["message"] == "MCP server srv is unavailable: exited with code 1"


async def test_a_failed_write_is_answered_at_once() -> None:
    async def broken(_data: bytes) -> None:
        raise RuntimeError("is not running")

    call = await Relay("srv", broken).request({"jsonrpc": "2.0", "id": 9, "method": "ping"})
    answer = await asyncio.wait_for(call.queue.get(), 1)
    assert answer["id"] == 9 and "srv" in answer["error"]["message"]


def test_a_child_gets_path_home_lang_and_its_manifest_env_only() -> None:
    server = MCPServer(name="s", namespace="default", type="stdio", source="x", command="c",
                       env={"TOKEN": "${env:SECRET}", "PLAIN": "v"})
    base = {"PATH": "/bin", "LANG": "C.UTF-8", "SECRET": "s3", "AWS_SECRET_ACCESS_KEY": "no", "HOME": "/root"}
    env = child_env(server, "/state/home/s", lambda v: "s3" if v == "${env:SECRET}" else v, base)
    assert env == {"PATH": "/bin", "HOME": "/state/home/s", "LANG": "C.UTF-8", "TOKEN": "s3", "PLAIN": "v"}


def test_an_unresolvable_env_value_names_the_variable_not_the_value() -> None:
    server = MCPServer(name="s", namespace="default", type="stdio", source="x", command="c",
                       env={"TOKEN": "${env:MISSING}"})

    def resolve(_v: str) -> str:
        raise KeyError("environment variable MISSING is not set")

    with pytest.raises(ValueError, match="env TOKEN: environment variable MISSING is not set"):
        child_env(server, "/h", resolve, {})


def test_env_references_resolve_from_the_environment_and_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "token").write_text("from-file\n")
    monkeypatch.setenv("BRIDGE_TEST_VALUE", "from-env")
    assert resolve(f"a ${{env:BRIDGE_TEST_VALUE}} b ${{file:{tmp_path / 'token'}}}") == "a from-env b from-file"
    with pytest.raises(OSError, match="cannot read"):
        resolve(f"${{file:{tmp_path / 'missing'}}}")
