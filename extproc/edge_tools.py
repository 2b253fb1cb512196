"""Tools answered at the edge (core_*, workflow_*, ...): one registry, so listing, calling and policy treat them
like any routed tool.

Each entry is the tool's MCP definition, an async handler returning an MCP CallToolResult dict, and a predicate
saying whether a given caller has the tool at all (e.g. core_auth_login only while some server needs a per-user
login). The policy (denylist, toolsets, annotation rules) is applied by the gateway on top, with the tool's
`server` as the policy's server fact. No gRPC or ext_proc types here: the workflow engine uses it too.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from catalog.view import Route, Target
from extproc.jsonrpc import MODERN

if TYPE_CHECKING:
    from extproc.gateway import Gateway
    from extproc.request import Request

EDGE_SERVER = "muster-edge"
"""The policy's `server` fact for tools answered at the edge (rules may match `server: muster-edge`)."""


@dataclass
class ToolContext:
    """Who calls and how: the caller's request, the era of its client, and how deep in nested edge calls."""

    gateway: Gateway
    request: Request
    era: str = MODERN
    meta: Mapping[str, Any] = field(default_factory=dict)
    depth: int = 0
    relay: Mapping[str, Any] = field(default_factory=dict)
    """A modern client's `inputResponses`/`requestState`, passed on to the tool its call_tool names."""

    def nested(self) -> ToolContext:
        """For calls an edge tool makes itself (workflow steps): no client input to relay."""
        return ToolContext(self.gateway, self.request, self.era, self.meta, self.depth + 1)


Handler = Callable[[ToolContext, dict[str, Any]], Awaitable[dict[str, Any]]]
Available = Callable[[ToolContext], bool]


def _always(_: ToolContext) -> bool:
    return True


@dataclass(frozen=True)
class EdgeTool:
    definition: Mapping[str, Any]
    handler: Handler
    available: Available = _always
    server: str = EDGE_SERVER
    kind: str = "core"  # core | workflow: list_core_tools lists only `core`

    @property
    def name(self) -> str:
        return str(self.definition["name"])

    @property
    def description(self) -> str:
        return str(self.definition.get("description") or "")

    @property
    def annotations(self) -> Mapping[str, Any]:
        value = self.definition.get("annotations")
        return value if isinstance(value, Mapping) else {}

    def route(self) -> tuple[Route, Target]:
        """The tool as the policy sees a routed one: one target on the edge's own `server`."""
        target = Target(self.server, self.name, dict(self.definition))
        return Route(self.name, {self.server: target}), target


def text_result(text: str, *, error: bool = False, structured: Any = None) -> dict[str, Any]:
    """A CallToolResult with one text content (Muster's tools answer this way)."""
    result: dict[str, Any] = {"content": [{"type": "text", "text": text}], "isError": error}
    if structured is not None:
        result["structuredContent"] = structured
    return result


class EdgeTools:
    """name -> EdgeTool. `generation` changes with every change, so cached list pages keyed on it go stale."""

    def __init__(self) -> None:
        self._tools: dict[str, EdgeTool] = {}
        self.generation = 0

    def register(self, tool: EdgeTool) -> None:
        self._tools[tool.name] = tool
        self.generation += 1

    def unregister(self, name: str) -> None:
        if self._tools.pop(name, None) is not None:
            self.generation += 1

    def replace(self, kind: str, tools: Iterable[EdgeTool]) -> None:
        """Swap every tool of one kind at once (a workflow catalog reload)."""
        kept = {n: t for n, t in self._tools.items() if t.kind != kind}
        kept.update((t.name, t) for t in tools)
        self._tools = kept
        self.generation += 1

    def get(self, name: str) -> EdgeTool | None:
        return self._tools.get(name)

    def __contains__(self, name: object) -> bool:
        return name in self._tools

    def names(self) -> frozenset[str]:
        return frozenset(self._tools)

    def all(self) -> list[EdgeTool]:
        return sorted(self._tools.values(), key=lambda t: (t.kind != "core", t.name))

    def for_caller(self, ctx: ToolContext, allowed: Callable[[EdgeTool], bool]) -> list[EdgeTool]:
        """The tools this caller has: available to it and allowed by the policy (`allowed`)."""
        return [t for t in self.all() if t.available(ctx) and allowed(t)]
