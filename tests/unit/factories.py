"""Small builders shared by the unit tests: MCPServer objects, upstream snapshots, tool and prompt definitions."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from catalog.manifests import Family, MCPServer
from catalog.view import UpstreamSnapshot, View, build_view

Json = dict[str, Any]


def server(name: str, *, tool_prefix: str = "", family: str | None = None, instance_arg: str = "cluster") -> MCPServer:
    return MCPServer(
        name=name,
        namespace="default",
        type="streamable-http",
        source=f"{name}.yaml",
        url=f"http://{name}.example/mcp",
        tool_prefix=tool_prefix,
        family=Family(family, instance_arg) if family else None,
    )


def tool(name: str, description: str = "", *, properties: Json | None = None,
         required: Sequence[str] | None = None) -> Json:
    schema: Json = {"type": "object", "properties": dict(properties or {})}
    if required is not None:
        schema["required"] = list(required)
    return {"name": name, "description": description, "inputSchema": schema}


def prompt(name: str, description: str = "", arguments: Sequence[Json] = ()) -> Json:
    return {"name": name, "description": description, "arguments": list(arguments)}


def snap(name: str, *, tools: Iterable[Json] = (), prompts: Iterable[Json] = (), resources: Iterable[Json] = (),
         templates: Iterable[Json] = (), ok: bool = True, generation: int = 1, ttl_ms: int | None = None,
         capabilities: Json | None = None) -> UpstreamSnapshot:
    return UpstreamSnapshot(
        server=name, ok=ok, tools=tuple(tools), prompts=tuple(prompts), resources=tuple(resources),
        templates=tuple(templates), generation=generation, ttl_ms=ttl_ms, capabilities=capabilities or {},
        error="" if ok else "down",
    )


def view_of(pairs: Sequence[tuple[MCPServer, UpstreamSnapshot]], *, mode: str = "always", prefix: str = "x",
            default_ttl_ms: int = 60_000) -> View:
    return build_view([s for s, _ in pairs], {s.name: sn for s, sn in pairs}, prefix=prefix, mode=mode,
                      default_ttl_ms=default_ttl_ms)


def names(items: Iterable[Json]) -> list[str]:
    return [item["name"] for item in items]
