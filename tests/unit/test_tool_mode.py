"""toolMode in the gateway config, and what core_events lets a caller read (the recorder without a store)."""

from __future__ import annotations

import pytest

from catalog.config import ConfigError, parse_config
from extproc.events import Events


def test_tool_mode_defaults_to_native_and_accepts_the_three_modes() -> None:
    assert parse_config("{}").tool_mode == "native"
    for mode in ("native", "meta", "both"):
        assert parse_config(f"toolMode: {mode}").tool_mode == mode
    with pytest.raises(ConfigError, match="toolMode: must be one of native, meta, both"):
        parse_config("toolMode: hybrid")


async def test_a_caller_reads_only_events_about_servers_it_sees_and_never_another_users() -> None:
    events = Events(limit=3)
    events.record("Catalog", "catalog", "Reloaded", "4 admitted")
    events.record("MCPServer", "secret", "Failed", "secret failed", event_type="Warning")
    events.record("MCPServer", "saas", "LoggedIn", "signed in", subject="alice")
    events.record("MCPServer", "prom", "Connected", "prom is reachable")
    alice = await events.read(subject="alice", servers={"saas", "prom"})
    bob = await events.read(subject="bob", servers={"saas", "prom"})
    assert [e["reason"] for e in alice] == ["LoggedIn", "Connected"]  # bounded: the oldest fell out
    assert [e["reason"] for e in bob] == ["Connected"]
    assert all("subject" not in e and e["timestamp"].endswith("Z") for e in alice)
    assert await events.read(subject="alice", servers={"prom"}, event_type="Warning") == []
    assert len(await events.read(subject="alice", servers={"saas", "prom"}, limit=1)) == 1


def test_edge_tools_registry_replaces_one_kind_at_once() -> None:
    from extproc.edge_tools import EdgeTool, EdgeTools, text_result

    async def handler(ctx: object, arguments: dict[str, object]) -> dict[str, object]:
        return text_result("ok")

    tools = EdgeTools()
    tools.register(EdgeTool({"name": "core_x", "inputSchema": {"type": "object"}}, handler))
    tools.replace("workflow", [EdgeTool({"name": "workflow_a"}, handler, kind="workflow")])
    generation = tools.generation
    tools.replace("workflow", [EdgeTool({"name": "workflow_b"}, handler, kind="workflow")])
    assert tools.names() == {"core_x", "workflow_b"} and tools.generation > generation
    route, target = tools.get("workflow_b").route()  # type: ignore[union-attr]
    assert (route.exposed, target.server, target.original) == ("workflow_b", "muster-edge", "workflow_b")
