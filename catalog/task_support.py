"""Which upstream tools need tasks, and which upstreams can run them (2025-11-25 `execution.taskSupport`, the 2026
`io.modelcontextprotocol/tasks` extension). Pure: the view drops a task-required tool its server cannot run as a
task, and says so in its problems (the status), so such a tool is never listed and then broken."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

LEGACY_TASKS = "2025-11-25"
"""The upstream speaks the 2025-11-25 task methods (tasks/get|result|cancel|list, params.task)."""
EXTENSION_TASKS = "io.modelcontextprotocol/tasks"
"""The upstream speaks the 2026 extension (resultType "task", tasks/get|update|cancel)."""


def upstream_task_kind(era_is_modern: bool, capabilities: Any) -> str | None:
    """Which task protocol an upstream serves, from what it declared (None: no tasks for tools/call)."""
    caps = capabilities if isinstance(capabilities, Mapping) else {}
    if era_is_modern:
        extensions = caps.get("extensions")
        return EXTENSION_TASKS if isinstance(extensions, Mapping) and EXTENSION_TASKS in extensions else None
    tasks = caps.get("tasks")
    requests = tasks.get("requests") if isinstance(tasks, Mapping) else None
    tools = requests.get("tools") if isinstance(requests, Mapping) else None
    return LEGACY_TASKS if isinstance(tools, Mapping) and "call" in tools else None


def task_support(tool: Any) -> str:
    """A tool's `execution.taskSupport`: "forbidden" when absent or malformed."""
    execution = tool.get("execution") if isinstance(tool, Mapping) else None
    value = execution.get("taskSupport") if isinstance(execution, Mapping) else None
    return value if value in ("optional", "required") else "forbidden"


def reachable_tools(server: str, era_is_modern: bool, capabilities: Any, tools: Sequence[dict[str, Any]],
                    problems: list[str]) -> Sequence[dict[str, Any]]:
    """`tools` without the task-required ones this upstream cannot run as tasks (each one named in `problems`)."""
    if upstream_task_kind(era_is_modern, capabilities) is not None:
        return tools
    required = [t for t in tools if task_support(t) == "required"]
    if not required:
        return tools
    for tool in required:
        problems.append(f"tool {tool.get('name')!r} of server {server!r} is not listed: it requires tasks "
                        "(execution.taskSupport: required) and the server declares no task support for tools/call "
                        "(capabilities.tasks.requests.tools.call, or the io.modelcontextprotocol/tasks extension)")
    return [t for t in tools if task_support(t) != "required"]
