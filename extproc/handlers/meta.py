"""Muster's 11 meta-tools (toolMode meta / both): names, arguments, defaults, output shapes and error texts as
Muster has them (reference §4.2, §4.3), answered from the caller's own view.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from extproc.jsonrpc import INVALID_PARAMS, Message, RpcError
from extproc.replies import Local
from extproc.request import Request

if TYPE_CHECKING:
    from extproc.gateway import Gateway

_STR = {"type": "string"}


def _tool(name: str, description: str, props: dict[str, Any] | None = None,
          required: tuple[str, ...] = ()) -> dict[str, Any]:
    schema: dict[str, Any] = {"type": "object", "properties": props or {}}
    if required:
        schema["required"] = list(required)
    return {"name": name, "description": description, "inputSchema": schema,
            "annotations": {"readOnlyHint": name != "call_tool", "openWorldHint": name == "call_tool"}}


META_TOOLS: tuple[dict[str, Any], ...] = (
    _tool("list_tools", "List all available tools from connected MCP servers"),
    _tool("describe_tool", "Get detailed information about a specific tool",
          {"name": {**_STR, "description": "Name of the tool to describe"}}, ("name",)),
    _tool("list_core_tools", "List all core tools (built-in Muster functionality) with their descriptions and "
                             "schemas",
          {"include_schema": {"type": "boolean", "default": True,
                              "description": "Whether to include the full input schema for each tool"}}),
    _tool("filter_tools", "Filter and search tools by name pattern, description, or a natural-language query "
                          "ranked by relevance",
          {"pattern": {**_STR, "description": "Glob pattern for tool names (e.g. 'core_*', '*workflow*')"},
           "description_filter": {**_STR, "description": "Substring the tool description must contain"},
           "query": {**_STR, "description": "Natural-language query; results are ranked by relevance (BM25)"},
           "labels": {"type": "object", "additionalProperties": _STR,
                      "description": "Labels that must all match (workflow metadata.labels)"},
           "case_sensitive": {"type": "boolean", "default": False,
                              "description": "Whether pattern and description matching is case-sensitive"},
           "include_schema": {"type": "boolean", "default": False,
                              "description": "Whether to include the full input schema for each tool"},
           "limit": {"type": "number", "default": 5, "description": "Maximum number of tools to return"},
           "offset": {"type": "number", "default": 0, "description": "Number of matching tools to skip"}}),
    _tool("call_tool", "Execute a tool with the given arguments",
          {"name": {**_STR, "description": "Name of the tool to execute"},
           "arguments": {"type": "object", "description": "Arguments to pass to the tool"}}, ("name",)),
    _tool("list_resources", "List all available resources from connected MCP servers"),
    _tool("describe_resource", "Get detailed information about a specific resource",
          {"uri": {**_STR, "description": "URI of the resource to describe"}}, ("uri",)),
    _tool("get_resource", "Retrieve the contents of a resource",
          {"uri": {**_STR, "description": "URI of the resource to retrieve"}}, ("uri",)),
    _tool("list_prompts", "List all available prompts from connected MCP servers"),
    _tool("describe_prompt", "Get detailed information about a specific prompt",
          {"name": {**_STR, "description": "Name of the prompt to describe"}}, ("name",)),
    _tool("get_prompt", "Execute a prompt with the given arguments",
          {"name": {**_STR, "description": "Name of the prompt to execute"},
           "arguments": {"type": "object", "description": "Arguments to pass to the prompt",
                         "additionalProperties": _STR}}, ("name",)),
)
META_TOOL_NAMES = frozenset(t["name"] for t in META_TOOLS)


async def call(gw: Gateway, req: Request, msg: Message, name: str, arguments: dict[str, Any]) -> Local:
    """A native tools/call of one meta-tool."""
    raise RpcError(INVALID_PARAMS, f"Unknown tool: {name}")
