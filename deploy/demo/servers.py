"""Small upstream MCP servers for the muster-edge demo fleet and its end-to-end tests.

One process serves one server over streamable HTTP at `/mcp`:

    .venv/bin/python deploy/demo/servers.py KIND --port P [--host 127.0.0.1] [--name NAME]
        [--era dual|legacy] [--json-response] [--require-bearer TOKEN] [--record-headers FILE]

KIND is one of:
  kubernetes  fake cluster tools (get_pods, list, logs, kubectl_delete, whoami), a prompt, a resource, a template
  prometheus  query, list_alerts, whoami, a prompt and a resource
  vendor      progress notifications, resource links, embedded resources, a tool name shared with kubernetes
  fixture     the tools, prompts and resources the MCP conformance suite's server scenarios call by name
  jobs        runs tools as tasks: slow_sum (taskSupport "required"), echo ("optional"); the 2025-11-25 task
              methods in the handshake era, the io.modelcontextprotocol/tasks extension in 2026-07-28
              (`--variant no-tasks`: lists slow_sum as required but declares no task support)

Once the socket accepts connections the process prints `READY http://HOST:PORT/mcp` (with the real port when
`--port 0` was given) and serves until SIGTERM or SIGINT, then exits with status 0.

`--era legacy` answers like a pre-2026 server: any request whose MCP-Protocol-Version header names a version
outside the handshake era gets HTTP 400 `Bad Request: Unsupported protocol version`, so `server/discover` is
never answered (sent without that header, it gets the SDK's own `400 Missing session ID`, as in either era).
`--require-bearer TOKEN` answers 401 to any request without `Authorization: Bearer TOKEN`.
`--record-headers FILE` appends one JSON line per HTTP request (method, path, lower-cased headers, JSON
body), before any check, so tests can see exactly what reached the upstream.
"""

import argparse
import asyncio
import base64
import contextlib
import io
import json
import signal
import socket
import struct
import sys
import threading
import time
import urllib.request
import uuid
import warnings
import wave
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Annotated, Any

import anyio
import jwt
import mcp_types as types
import uvicorn
from mcp.server import MCPServer
from mcp.server.context import ServerRequestContext
from mcp.server.mcpserver import Context
from mcp.server.mcpserver.exceptions import ToolError
from mcp.server.streamable_http import EventCallback, EventId, EventMessage, EventStore, StreamId
from mcp.shared.exceptions import MCPDeprecationWarning, MCPError
from mcp_types.version import HANDSHAKE_PROTOCOL_VERSIONS
from pydantic import BaseModel, Field
from starlette.types import ASGIApp, Message, Receive, Scope, Send

KINDS = ("kubernetes", "prometheus", "vendor", "fixture", "jobs")
LEGACY_VERSIONS = frozenset(HANDSHAKE_PROTOCOL_VERSIONS)
READ_ONLY = types.ToolAnnotations(read_only_hint=True, destructive_hint=False, open_world_hint=False)
DESTRUCTIVE = types.ToolAnnotations(read_only_hint=False, destructive_hint=True, idempotent_hint=True)

# The conformance fixtures use sampling, elicitation and logging, which the 2026-07-28 revision deprecates.
warnings.filterwarnings("ignore", category=MCPDeprecationWarning)


# --------------------------------------------------------------------------------------------------------------
# Fake data and media, generated here so that everything is deterministic


def tiny_png(rgb: tuple[int, int, int] = (255, 0, 0)) -> bytes:
    """A valid 1x1 PNG of one colour."""

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

    header = struct.pack(">IIBBBBB", 1, 1, 8, 2, 0, 0, 0)  # width, height, bit depth, RGB, defaults
    pixels = zlib.compress(b"\x00" + bytes(rgb))  # one scanline: filter byte, then the pixel
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", pixels) + chunk(b"IEND", b"")


def tiny_wav() -> bytes:
    """A valid WAV file: 8 samples of 16-bit mono silence at 8 kHz."""
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(8000)
        out.writeframes(b"\x00\x00" * 8)
    return buffer.getvalue()


PNG_B64 = base64.b64encode(tiny_png()).decode()
WAV_B64 = base64.b64encode(tiny_wav()).decode()


def text_block(value: str) -> types.TextContent:
    return types.TextContent(type="text", text=value)


def user(content: types.ContentBlock) -> dict[str, Any]:
    """A prompt message from the user (MCPServer prompts accept dicts)."""
    return {"role": "user", "content": content}


def fake_pods(name: str, namespace: str) -> list[dict[str, Any]]:
    return [
        {"name": f"{name}-{app}-{index}", "namespace": namespace, "status": "Running", "restarts": index}
        for index, app in enumerate(("api", "worker", "cache"))
    ]


# --------------------------------------------------------------------------------------------------------------
# kubernetes


def build_kubernetes(cluster: str, variant: str = "") -> MCPServer:
    """`variant="skewed"`: one tool's description differs and one tool has a `management_cluster` argument,
    the two cases in which Muster's family collapse falls back to per-server names for that tool alone."""
    server = MCPServer(cluster, instructions=f"A fake Kubernetes cluster called {cluster}.", version="0.1.0")

    @server.tool(annotations=READ_ONLY)
    def get_pods(namespace: str = "default") -> dict[str, Any]:
        """List the pods in a namespace."""
        return {"cluster": cluster, "namespace": namespace, "pods": fake_pods(cluster, namespace)}

    @server.tool(name="list", annotations=READ_ONLY)
    def list_objects(kind: str, namespace: str = "default") -> dict[str, Any]:
        """List objects of one kind (pods, services, deployments) in a namespace."""
        if kind.lower() in ("pod", "pods"):
            items = [pod["name"] for pod in fake_pods(cluster, namespace)]
        else:
            items = [f"{cluster}-{kind.lower()}-{index}" for index in range(2)]
        return {"cluster": cluster, "kind": kind, "namespace": namespace, "items": items}

    @server.tool(annotations=READ_ONLY, description=(
        "Read the last lines of a pod's log (this cluster runs a patched logger)." if variant == "skewed"
        else "Read the last lines of a pod's log."))
    def logs(pod: str, namespace: str = "default", tail: int = 10) -> str:
        lines = [f"{cluster}/{namespace}/{pod} line {index}" for index in range(1, max(tail, 0) + 1)]
        return "\n".join(lines)

    @server.tool(annotations=DESTRUCTIVE)
    def kubectl_delete(kind: str, name: str) -> str:
        """Delete an object (pretend: nothing is kept, so nothing is deleted)."""
        return f"{kind}/{name} deleted from {cluster}"

    add_whoami(server, cluster)

    if variant == "skewed":

        @server.tool(annotations=READ_ONLY)
        def switch_context(management_cluster: str) -> dict[str, Any]:
            """A tool that already has a `management_cluster` argument of its own."""
            return {"cluster": cluster, "context": management_cluster}

    @server.prompt()
    def debug_pod(pod: str) -> list[dict[str, Any]]:
        """Ask for help debugging a pod."""
        return [user(text_block(f"Pod {pod} in cluster {cluster} is failing. Read its logs and explain why."))]

    @server.resource(f"k8s://{cluster}/cluster-info", mime_type="text/plain")
    def cluster_info() -> str:
        """Cluster version and endpoint."""
        return f"cluster: {cluster}\nversion: v1.31.0\nnodes: 3\n"

    @server.resource(f"k8s://{cluster}/namespaces/{{namespace}}", mime_type="application/json")
    def namespace_info(namespace: str) -> str:
        """One namespace of the cluster."""
        return json.dumps({"cluster": cluster, "namespace": namespace, "pods": len(fake_pods(cluster, namespace))})

    return server


def add_whoami(server: MCPServer, name: str) -> None:
    @server.tool(annotations=READ_ONLY, structured_output=False)
    def whoami() -> str:
        """Name this upstream server (tests use it to prove which upstream answered)."""
        return json.dumps({"server": name})


# --------------------------------------------------------------------------------------------------------------
# prometheus


def build_prometheus(name: str) -> MCPServer:
    server = MCPServer(name, instructions=f"A fake Prometheus called {name}.", version="0.1.0")
    alerts = [
        {"alert": "KubePodCrashLooping", "severity": "warning", "source": name},
        {"alert": "NodeDiskPressure", "severity": "critical", "source": name},
    ]

    @server.tool(annotations=READ_ONLY)
    def query(promql: str) -> dict[str, Any]:
        """Run an instant PromQL query."""
        value = len(promql) % 10  # deterministic, and different per query
        return {"source": name, "query": promql, "result": [{"metric": {"job": name}, "value": value}]}

    @server.tool(annotations=READ_ONLY)
    def list_alerts() -> dict[str, Any]:
        """List the firing alerts."""
        return {"alerts": alerts}

    add_whoami(server, name)

    @server.prompt()
    def investigate_alert(alert: str) -> list[dict[str, Any]]:
        """Ask for an investigation of a firing alert."""
        return [user(text_block(f"Alert {alert} fires in {name}. Find the cause."))]

    @server.resource(f"prom://{name}/targets", mime_type="application/json")
    def targets() -> str:
        """The scrape targets."""
        return json.dumps({"source": name, "targets": [{"job": "kubelet", "health": "up"}]})

    return server


# --------------------------------------------------------------------------------------------------------------
# vendor

VENDOR_README = "vendor://docs/readme"


def build_vendor(name: str) -> MCPServer:
    server = MCPServer(name, instructions="A vendor server with the harder features.", version="0.1.0")

    @server.tool(annotations=READ_ONLY, structured_output=False)
    async def slow_count(ctx: Context, n: int = 3) -> str:
        """Count to n, sending one progress notification per step."""
        for step in range(1, n + 1):
            await ctx.report_progress(step, n, f"step {step} of {n}")
            await asyncio.sleep(0.02)
        return f"counted to {n}"

    @server.tool(annotations=READ_ONLY, structured_output=False)
    def make_link() -> list[types.ContentBlock]:
        """Return a link to the vendor's readme and the readme itself, embedded."""
        link = types.ResourceLink(type="resource_link", uri=VENDOR_README, name="readme", mime_type="text/markdown")
        embedded = types.EmbeddedResource(
            type="resource",
            resource=types.TextResourceContents(uri=VENDOR_README, mime_type="text/markdown", text=readme(name)),
        )
        return [text_block("The readme:"), link, embedded]

    @server.tool(annotations=READ_ONLY, structured_output=False)
    def echo(text: str) -> str:
        """Echo the text back."""
        return text

    add_whoami(server, name)

    @server.tool(annotations=READ_ONLY)
    def get_pods() -> dict[str, Any]:
        """The vendor's own pods (same tool name as the kubernetes server's)."""
        return {"vendor": name, "pods": [f"{name}-agent-0"]}

    def beta_feature() -> str:
        """A tool that comes and goes (see toggle_beta)."""
        return "beta"

    listed_by = handshake_sessions(server)

    @server.tool(structured_output=False)
    async def toggle_beta(ctx: Context) -> str:
        """Add or remove the tool `beta_feature`, then announce that the tool list changed."""
        if any(tool.name == "beta_feature" for tool in server._tool_manager.list_tools()):
            server.remove_tool("beta_feature")
            state = "removed"
        else:
            server.add_tool(beta_feature, annotations=READ_ONLY, structured_output=False)
            state = "added"
        await ctx.notify_tools_changed()  # 2026-07-28 listen streams
        for session in list(listed_by.values()):  # handshake-era sessions, on their GET streams
            with contextlib.suppress(Exception):
                await session.send_tool_list_changed()
        return f"beta_feature {state}"

    @server.resource(VENDOR_README, mime_type="text/markdown")
    def vendor_readme() -> str:
        """How to use the vendor server."""
        return readme(name)

    @server.prompt()
    def summarize(topic: str) -> list[dict[str, Any]]:
        """Ask for a summary of a topic."""
        return [user(text_block(f"Summarize {topic} in three sentences."))]

    return server


def handshake_sessions(server: MCPServer) -> dict[int, Any]:
    """The handshake-era sessions that listed the tools (a gateway's own session among them; the newest 100).
    The SDK's notify_tools_changed reaches 2026-07-28 listen streams only; these are told on their GET streams."""
    lowlevel = server._lowlevel_server
    entry = lowlevel._request_handlers["tools/list"]
    sessions: dict[int, Any] = {}

    async def tools_list(ctx: ServerRequestContext[Any], params: Any) -> Any:
        if ctx.protocol_version in HANDSHAKE_PROTOCOL_VERSIONS:
            sessions.pop(id(ctx.session), None)
            sessions[id(ctx.session)] = ctx.session
            while len(sessions) > 100:
                sessions.pop(next(iter(sessions)))
        return await entry.handler(ctx, params)

    lowlevel.add_request_handler("tools/list", entry.params_type, tools_list)  # type: ignore[arg-type]
    return sessions


def readme(name: str) -> str:
    return f"# {name}\n\nCall `slow_count` to see progress and `make_link` to see resource links.\n"


# --------------------------------------------------------------------------------------------------------------
# fixture: what the conformance suite's server scenarios call by name

JSON_SCHEMA_2020_12 = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "type": "object",
    "$defs": {
        "address": {
            "$anchor": "addressDef",
            "type": "object",
            "properties": {"street": {"type": "string"}, "city": {"type": "string"}},
        }
    },
    "properties": {
        "name": {"type": "string"},
        "address": {"$ref": "#/$defs/address"},
        "contactMethod": {"type": "string", "enum": ["phone", "email"]},
        "phone": {"type": "string"},
        "email": {"type": "string"},
    },
    "allOf": [{"anyOf": [{"required": ["phone"]}, {"required": ["email"]}]}],
    "if": {"properties": {"contactMethod": {"const": "phone"}}, "required": ["contactMethod"]},
    "then": {"required": ["phone"]},
    "else": {"required": ["email"]},
    "additionalProperties": False,
}


def form(message: str, properties: dict[str, Any], required: list[str] | None = None) -> types.ElicitRequest:
    schema: dict[str, Any] = {"type": "object", "properties": properties}
    if required:
        schema["required"] = required
    return types.ElicitRequest(params=types.ElicitRequestFormParams(message=message, requested_schema=schema))


def sampling(prompt: str, max_tokens: int) -> types.CreateMessageRequest:
    message = types.SamplingMessage(role="user", content=text_block(prompt))
    return types.CreateMessageRequest(
        params=types.CreateMessageRequestParams(messages=[message], max_tokens=max_tokens)
    )


def ask(requests: dict[str, types.InputRequest], state: str | None = None) -> types.InputRequiredResult:
    return types.InputRequiredResult(input_requests=requests, request_state=state)


def answered(ctx: Context, *keys: str) -> dict[str, Any] | None:
    """The responses for every key, or None when one is missing (then the caller asks again)."""
    responses = ctx.input_responses or {}
    if any(key not in responses for key in keys):
        return None
    return {key: responses[key] for key in keys}


def elicited(response: Any, field: str) -> Any:
    content = getattr(response, "content", None) or {}
    return content.get(field)


def sampled(response: Any) -> str:
    content = getattr(response, "content", None)
    return getattr(content, "text", None) or str(content)


def build_fixture(name: str) -> MCPServer:
    server = MCPServer(name, instructions="Conformance fixture server.", version="0.1.0")
    add_content_fixtures(server)
    add_notification_fixtures(server)
    add_client_request_fixtures(server)
    add_input_required_fixtures(server)
    add_schema_fixtures(server)
    add_resource_fixtures(server)
    add_prompt_fixtures(server)
    add_legacy_handlers(server)
    return server


def add_content_fixtures(server: MCPServer) -> None:
    @server.tool(structured_output=False)
    def test_simple_text() -> str:
        """Returns one text block."""
        return "This is a simple text response for testing."

    @server.tool(structured_output=False)
    def test_image_content() -> list[types.ContentBlock]:
        """Returns one PNG image."""
        return [types.ImageContent(type="image", data=PNG_B64, mime_type="image/png")]

    @server.tool(structured_output=False)
    def test_audio_content() -> list[types.ContentBlock]:
        """Returns one WAV clip."""
        return [types.AudioContent(type="audio", data=WAV_B64, mime_type="audio/wav")]

    @server.tool(structured_output=False)
    def test_embedded_resource() -> list[types.ContentBlock]:
        """Returns an embedded text resource."""
        contents = types.TextResourceContents(
            uri="test://embedded-resource", mime_type="text/plain", text="This is an embedded resource content."
        )
        return [types.EmbeddedResource(type="resource", resource=contents)]

    @server.tool(structured_output=False)
    def test_multiple_content_types() -> list[types.ContentBlock]:
        """Returns text, an image and an embedded resource."""
        contents = types.TextResourceContents(
            uri="test://mixed-content-resource", mime_type="application/json", text='{"test":"data","value":123}'
        )
        return [
            text_block("Multiple content types test:"),
            types.ImageContent(type="image", data=PNG_B64, mime_type="image/png"),
            types.EmbeddedResource(type="resource", resource=contents),
        ]

    @server.tool(structured_output=False)
    def test_error_handling() -> str:
        """Always fails."""
        raise ToolError("This tool intentionally returns an error for testing")


def add_notification_fixtures(server: MCPServer) -> None:
    @server.tool(structured_output=False)
    async def test_tool_with_logging(ctx: Context) -> str:
        """Sends three info log messages while it runs."""
        for index, message in enumerate(("Tool execution started", "Tool processing data", "Tool execution completed")):
            if index:
                await asyncio.sleep(0.05)
            await ctx.info(message)
        return "Logging tool finished"

    @server.tool(structured_output=False)
    async def test_tool_with_progress(ctx: Context) -> str:
        """Reports progress 0, 50 and 100 of 100."""
        for index, progress in enumerate((0, 50, 100)):
            if index:
                await asyncio.sleep(0.05)
            await ctx.report_progress(progress, 100, f"{progress}%")
        return "Progress tool finished"

    @server.tool(structured_output=False)
    async def test_logging_tool(ctx: Context) -> str:
        """Logs at info level; on 2026-07-28 nothing may reach a request that did not opt in to a log level."""
        await ctx.info("test_logging_tool ran")
        return "Logged once"

    @server.tool(structured_output=False)
    async def test_trigger_tool_change(ctx: Context) -> str:
        """Announces a tools list change to subscriptions/listen streams (the list itself stays stable)."""
        await ctx.notify_tools_changed()
        return "tools/list_changed published"

    @server.tool(structured_output=False)
    async def test_trigger_resource_update(ctx: Context) -> str:
        """Announces that test://watched-resource changed, to subscriptions/listen streams that follow it."""
        await ctx.notify_resource_updated("test://watched-resource")
        return "resources/updated published"

    @server.tool(structured_output=False)
    async def test_trigger_prompt_change(ctx: Context) -> str:
        """Announces a prompts list change to subscriptions/listen streams (the list itself stays stable)."""
        await ctx.notify_prompts_changed()
        return "prompts/list_changed published"

    @server.tool(structured_output=False)
    async def test_reconnection(ctx: Context) -> str:
        """Closes its SSE stream mid-call so the client resumes with Last-Event-ID."""
        await ctx.info("Before disconnect")
        await ctx.close_sse_stream()
        await asyncio.sleep(0.2)
        await ctx.info("After reconnect")
        return "Reconnection test completed"


class Contact(BaseModel):
    username: str = Field(description="User's response")
    email: str = Field(description="User's email address")


def add_client_request_fixtures(server: MCPServer) -> None:
    """Tools that ask the client something over the back-channel (handshake era)."""

    @server.tool(structured_output=False)
    async def test_sampling(prompt: str, ctx: Context) -> str:
        """Asks the client's LLM to answer the prompt."""
        message = types.SamplingMessage(role="user", content=text_block(prompt))
        result = await ctx.session.create_message([message], max_tokens=100, related_request_id=ctx.request_id)
        return f"LLM response: {sampled(result)}"

    @server.tool(structured_output=False)
    async def test_elicitation(message: str, ctx: Context) -> str:
        """Asks the user for a username and an email address."""
        result = await ctx.elicit(message, Contact)
        content = result.data.model_dump() if result.action == "accept" else {}
        return f"User response: action={result.action}, content={json.dumps(content)}"

    defaults = {
        "name": {"type": "string", "description": "User name", "default": "John Doe"},
        "age": {"type": "integer", "description": "User age", "default": 30},
        "score": {"type": "number", "description": "User score", "default": 95.5},
        "status": {"type": "string", "enum": ["active", "inactive", "pending"], "default": "active"},
        "verified": {"type": "boolean", "description": "Verified", "default": True},
    }
    choices = ("option1", "option2", "option3")
    enums = {
        "untitledSingle": {"type": "string", "enum": list(choices)},
        "titledSingle": {
            "type": "string",
            "oneOf": [{"const": f"value{i}", "title": f"{word} Option"} for i, word in ((1, "First"), (2, "Second"))],
        },
        "legacyEnum": {
            "type": "string",
            "enum": ["opt1", "opt2", "opt3"],
            "enumNames": ["Option One", "Option Two", "Option Three"],
        },
        "untitledMulti": {"type": "array", "items": {"type": "string", "enum": list(choices)}},
        "titledMulti": {
            "type": "array",
            "items": {
                "anyOf": [{"const": f"value{i}", "title": f"{w} Choice"} for i, w in ((1, "First"), (2, "Second"))]
            },
        },
    }

    async def elicit_raw(ctx: Context, message: str, properties: dict[str, Any]) -> str:
        schema = {"type": "object", "properties": properties}
        result = await ctx.session.elicit_form(message, schema, related_request_id=ctx.request_id)
        return f"Elicitation completed: action={result.action}, content={json.dumps(result.content or {})}"

    @server.tool(structured_output=False)
    async def test_elicitation_sep1034_defaults(ctx: Context) -> str:
        """Elicits a form whose fields all carry defaults (SEP-1034)."""
        return await elicit_raw(ctx, "Please review the defaults", defaults)

    @server.tool(structured_output=False)
    async def test_elicitation_sep1330_enums(ctx: Context) -> str:
        """Elicits a form with the five enum shapes (SEP-1330)."""
        return await elicit_raw(ctx, "Please pick options", enums)

    @server.tool(structured_output=False)
    def test_missing_capability(ctx: Context) -> str:
        """Needs the sampling capability; fails with -32021 when the client did not declare it."""
        capabilities = ctx.client_capabilities
        if capabilities is None or capabilities.sampling is None:
            required = types.ClientCapabilities(sampling=types.SamplingCapability())
            data = types.MissingRequiredClientCapabilityErrorData(required_capabilities=required)
            raise MCPError(
                code=types.MISSING_REQUIRED_CLIENT_CAPABILITY,
                message="This tool needs the sampling capability",
                data=data.model_dump(by_alias=True, mode="json", exclude_none=True),
            )
        return "The client declared sampling"


NAME_FORM = {"name": {"type": "string"}}


def greet_after_asking(ctx: Context) -> str | types.InputRequiredResult:
    """Ask for the user's name through an InputRequiredResult; greet once it comes back."""
    got = answered(ctx, "user_name")
    if got is None:
        return ask({"user_name": form("What is your name?", NAME_FORM, ["name"])})
    return f"Hello, {elicited(got['user_name'], 'name')}!"


def add_input_required_fixtures(server: MCPServer) -> None:
    """2026-07-28 multi-round-trip tools: they return InputRequiredResult instead of calling the client."""

    @server.tool(structured_output=False)
    def test_input_required_result_elicitation(ctx: Context) -> str | types.InputRequiredResult:
        """Asks for a name, then greets."""
        return greet_after_asking(ctx)

    @server.tool(structured_output=False)
    def test_input_required_result_sampling(ctx: Context) -> str | types.InputRequiredResult:
        """Asks the client's LLM a question."""
        got = answered(ctx, "capital_question")
        if got is None:
            return ask({"capital_question": sampling("What is the capital of France?", 100)})
        return f"The model said: {sampled(got['capital_question'])}"

    @server.tool(structured_output=False)
    def test_input_required_result_list_roots(ctx: Context) -> str | types.InputRequiredResult:
        """Asks for the client's roots."""
        got = answered(ctx, "client_roots")
        if got is None:
            return ask({"client_roots": types.ListRootsRequest()})
        roots = [str(root.uri) for root in getattr(got["client_roots"], "roots", [])]
        return f"Client roots: {', '.join(roots) or '(none)'}"

    @server.tool(structured_output=False)
    def test_input_required_result_request_state(ctx: Context) -> str | types.InputRequiredResult:
        """Round-trips requestState."""
        got = answered(ctx, "confirm")
        if got is None or ctx.request_state != "awaiting-confirm":
            return ask({"confirm": form("Please confirm", {"ok": {"type": "boolean"}}, ["ok"])}, "awaiting-confirm")
        return f"state-ok: confirmed={elicited(got['confirm'], 'ok')}"

    @server.tool(structured_output=False)
    def test_input_required_result_multiple_inputs(ctx: Context) -> str | types.InputRequiredResult:
        """Asks for an elicitation, a sampling and the roots at once."""
        got = answered(ctx, "user_name", "greeting", "client_roots")
        if got is None:
            requests: dict[str, types.InputRequest] = {
                "user_name": form("What is your name?", NAME_FORM, ["name"]),
                "greeting": sampling("Generate a greeting", 50),
                "client_roots": types.ListRootsRequest(),
            }
            return ask(requests, "multiple")
        return f"All inputs received: {elicited(got['user_name'], 'name')} / {sampled(got['greeting'])}"

    @server.tool(structured_output=False)
    def test_input_required_result_multi_round(ctx: Context) -> str | types.InputRequiredResult:
        """Two rounds of questions, with evolving requestState."""
        if ctx.request_state == "round-2" and (got := answered(ctx, "step2")):
            return f"Both rounds complete: favourite colour {elicited(got['step2'], 'color')}"
        if ctx.request_state == "round-1" and answered(ctx, "step1"):
            colour = {"color": {"type": "string"}}
            return ask({"step2": form("Step 2: What is your favorite color?", colour, ["color"])}, "round-2")
        return ask({"step1": form("Step 1: What is your name?", NAME_FORM, ["name"])}, "round-1")

    @server.tool(structured_output=False)
    def test_input_required_result_tampered_state(ctx: Context) -> str | types.InputRequiredResult:
        """Round-trips requestState; the SDK seals it, so a tampered state is rejected before this runs."""
        got = answered(ctx, "confirm")
        if got is None or ctx.request_state != "tamper-test":
            return ask({"confirm": form("Please confirm", {"ok": {"type": "boolean"}}, ["ok"])}, "tamper-test")
        return "state-ok"

    @server.tool(structured_output=False)
    def test_streaming_elicitation(ctx: Context) -> str | types.InputRequiredResult:
        """Needs the user's name; on 2026-07-28 it asks through an InputRequiredResult, never a request."""
        return greet_after_asking(ctx)

    @server.tool(structured_output=False)
    def test_input_required_result_capabilities(ctx: Context) -> str | types.InputRequiredResult:
        """Asks only for what the client declared it can answer."""
        capabilities = ctx.client_capabilities or types.ClientCapabilities()
        wanted: dict[str, types.InputRequest] = {}
        if capabilities.sampling is not None:
            wanted["sample"] = sampling("Say hello", 20)
        if capabilities.elicitation is not None:
            wanted["ask"] = form("What is your name?", NAME_FORM, ["name"])
        if capabilities.roots is not None:
            wanted["roots"] = types.ListRootsRequest()
        if not wanted or answered(ctx, *wanted):
            return "Declared-capability inputs answered"
        return ask(wanted)

    @server.prompt()
    def test_input_required_result_prompt(ctx: Context) -> list[dict[str, Any]] | types.InputRequiredResult:
        """A prompt that first needs context from the user."""
        got = answered(ctx, "user_context")
        if got is None:
            context_form = {"context": {"type": "string"}}
            return ask({"user_context": form("What context should the prompt use?", context_form, ["context"])})
        return [user(text_block(f"Use this context: {elicited(got['user_context'], 'context')}"))]


def add_schema_fixtures(server: MCPServer) -> None:
    @server.tool(structured_output=False)
    def json_schema_2020_12_tool(
        name: str | None = None,
        address: dict[str, Any] | None = None,
        contactMethod: str | None = None,
        phone: str | None = None,
        email: str | None = None,
    ) -> str:
        """Carries a JSON Schema 2020-12 input schema."""
        return json.dumps({"name": name, "contactMethod": contactMethod, "phone": phone, "email": email})

    # The SDK derives input schemas from signatures; this fixture must advertise the exact 2020-12 document.
    tool = server._tool_manager.get_tool("json_schema_2020_12_tool")
    assert tool is not None
    tool.parameters = JSON_SCHEMA_2020_12

    @server.tool(structured_output=False)
    def test_param_header(
        region: Annotated[str, Field(json_schema_extra={"x-mcp-header": "Region"})],
        note: str = "",
    ) -> str:
        """Mirrors `region` into the Mcp-Param-Region header (SEP-2243)."""
        return f"region={region} note={note}"


def add_resource_fixtures(server: MCPServer) -> None:
    @server.resource("test://static-text", mime_type="text/plain")
    def static_text() -> str:
        """A static text resource."""
        return "This is the content of the static text resource."

    @server.resource("test://static-binary", mime_type="image/png")
    def static_binary() -> bytes:
        """A static binary resource (a PNG)."""
        return tiny_png()

    @server.resource("test://watched-resource", mime_type="text/plain")
    def watched() -> str:
        """A resource clients may subscribe to."""
        return "Watched resource content"

    @server.resource("test://template/{id}/data", mime_type="application/json")
    def template_data(id: str) -> str:
        """Data for one id."""
        return json.dumps({"id": id, "templateTest": True, "data": f"Data for ID: {id}"}, separators=(",", ":"))

    @server.completion()
    async def complete(
        ref: types.PromptReference | types.ResourceTemplateReference,
        argument: types.CompletionArgument,
        context: types.CompletionContext | None,
    ) -> types.Completion:
        words = ("paris", "park", "party", "test", "testing")
        values = [word for word in words if word.startswith(argument.value)]
        return types.Completion(values=values, total=len(values), has_more=False)


def add_prompt_fixtures(server: MCPServer) -> None:
    @server.prompt()
    def test_simple_prompt() -> list[dict[str, Any]]:
        """A prompt without arguments."""
        return [user(text_block("This is a simple prompt for testing."))]

    @server.prompt()
    def test_prompt_with_arguments(
        arg1: Annotated[str, Field(description="First test argument")],
        arg2: Annotated[str, Field(description="Second test argument")],
    ) -> list[dict[str, Any]]:
        """A prompt with two required arguments."""
        return [user(text_block(f"Prompt with arguments: arg1='{arg1}', arg2='{arg2}'"))]

    @server.prompt()
    def test_prompt_with_embedded_resource(
        resourceUri: Annotated[str, Field(description="URI of the resource to embed")],
    ) -> list[dict[str, Any]]:
        """A prompt that embeds a resource."""
        contents = types.TextResourceContents(
            uri=resourceUri, mime_type="text/plain", text="Embedded resource content for testing."
        )
        return [
            user(types.EmbeddedResource(type="resource", resource=contents)),
            user(text_block("Please process the embedded resource above.")),
        ]

    @server.prompt()
    def test_prompt_with_image() -> list[dict[str, Any]]:
        """A prompt that carries an image."""
        return [
            user(types.ImageContent(type="image", data=PNG_B64, mime_type="image/png")),
            user(text_block("Please analyze the image above.")),
        ]


def add_legacy_handlers(server: MCPServer) -> None:
    """Handshake-era methods MCPServer does not register itself: logging/setLevel and resource subscriptions."""
    lowlevel = server._lowlevel_server
    subscriptions: set[str] = set()

    async def set_level(ctx: ServerRequestContext[Any], params: types.SetLevelRequestParams) -> types.EmptyResult:
        return types.EmptyResult()

    async def subscribe(ctx: ServerRequestContext[Any], params: types.SubscribeRequestParams) -> types.EmptyResult:
        subscriptions.add(str(params.uri))
        return types.EmptyResult()

    async def unsubscribe(ctx: ServerRequestContext[Any], params: types.UnsubscribeRequestParams) -> types.EmptyResult:
        subscriptions.discard(str(params.uri))
        return types.EmptyResult()

    lowlevel.add_request_handler("logging/setLevel", types.SetLevelRequestParams, set_level)
    lowlevel.add_request_handler("resources/subscribe", types.SubscribeRequestParams, subscribe)
    lowlevel.add_request_handler("resources/unsubscribe", types.UnsubscribeRequestParams, unsubscribe)


# --------------------------------------------------------------------------------------------------------------
# jobs: tools run as tasks. The SDK 2.3 types tasks but does not dispatch them, so a server middleware on the
# SDK's own runner serves them: the 2025-11-25 methods (tools/call with params.task, tasks/get|result|cancel|list)
# on handshake-era connections, the io.modelcontextprotocol/tasks extension (resultType "task",
# tasks/get|update|cancel) on 2026-07-28 requests that declare it. Tasks are bound to the caller's Authorization
# header: behind a gateway with one credential every gateway caller shares it, so the gateway must bind them.

TASKS_EXT = "io.modelcontextprotocol/tasks"
RELATED_TASK = "io.modelcontextprotocol/related-task"
TASK_SUPPORT = {"slow_sum": "required", "echo": "optional"}


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


class Job:
    def __init__(self, task_id: str, context: str) -> None:
        self.task_id, self.context, self.status = task_id, context, "working"
        self.created = self.updated = _now()
        self.result: dict[str, Any] | None = None
        self.runner: asyncio.Task[None] | None = None
        self.done = asyncio.Event()

    def legacy(self) -> dict[str, Any]:
        return {"taskId": self.task_id, "status": self.status, "createdAt": self.created,
                "lastUpdatedAt": self.updated, "ttl": 600_000, "pollInterval": 50}

    def modern(self) -> dict[str, Any]:
        out: dict[str, Any] = {"taskId": self.task_id, "status": self.status, "createdAt": self.created,
                               "lastUpdatedAt": self.updated, "ttlSeconds": 600, "pollIntervalMilliseconds": 50}
        if self.status == "completed" and self.result is not None:
            out["result"] = self.result
        return out


async def run_job_tool(name: str, arguments: dict[str, Any]) -> str:
    if name == "slow_sum":
        await asyncio.sleep(float(arguments.get("seconds", 0.2)))
        return str(int(arguments["a"]) + int(arguments["b"]))
    return str(arguments.get("text", ""))


class Jobs:
    """The tasks of one jobs server, per authorization context."""

    def __init__(self) -> None:
        self.jobs: dict[str, Job] = {}

    def start(self, context: str, name: str, arguments: dict[str, Any]) -> Job:
        job = Job(f"t-{uuid.uuid4().hex[:12]}", context)
        self.jobs[job.task_id] = job
        job.runner = asyncio.get_running_loop().create_task(self._run(job, name, arguments))
        return job

    async def _run(self, job: Job, name: str, arguments: dict[str, Any]) -> None:
        try:
            text = await run_job_tool(name, arguments)
            job.result = {"content": [{"type": "text", "text": text}], "structuredContent": {"result": text},
                          "isError": False}
            job.status = "completed"
        except asyncio.CancelledError:
            job.status = "cancelled"
        finally:
            job.updated = _now()
            job.done.set()

    def find(self, context: str, params: dict[str, Any]) -> Job:
        task_id = params.get("taskId")
        job = self.jobs.get(task_id) if isinstance(task_id, str) else None
        if job is None or job.context != context:
            raise MCPError(-32602, f"Unknown task: {task_id}")
        return job

    async def method(self, method: str, params: dict[str, Any], context: str, modern: bool) -> Any:
        if method == "tasks/list" and not modern:
            return {"tasks": [j.legacy() for j in self.jobs.values() if j.context == context]}
        job = self.find(context, params)
        if method == "tasks/get":
            return {"resultType": "complete", **job.modern()} if modern else job.legacy()
        if method == "tasks/cancel":
            if job.status in ("completed", "failed", "cancelled"):
                if modern:
                    return {"resultType": "complete"}
                raise MCPError(-32602, f"Task {job.task_id} is already {job.status}")
            if job.runner is not None:
                job.runner.cancel()
                await job.done.wait()
            return {"resultType": "complete"} if modern else job.legacy()
        if method == "tasks/result" and not modern:
            await job.done.wait()
            if job.status != "completed" or job.result is None:
                raise MCPError(-32000, f"Task {job.task_id} was {job.status}")
            return {**job.result, "_meta": {RELATED_TASK: {"taskId": job.task_id}}}
        if method == "tasks/update" and modern:
            return {"resultType": "complete"}
        raise MCPError(-32601, f"Method not found: {method}")


def jobs_middleware(jobs: Jobs, declare: bool) -> Callable[..., Any]:
    async def handle(ctx: Any, call_next: Callable[[Any], Any]) -> Any:
        method, params = ctx.method, dict(ctx.params or {})
        modern = ctx.protocol_version not in LEGACY_VERSIONS
        request = getattr(ctx, "request", None)
        context = str(getattr(request, "headers", {}).get("authorization", "")) if request is not None else ""
        if method == "initialize" and declare:
            result = dict(await call_next(ctx))
            result["capabilities"] = {**result.get("capabilities", {}), "tasks": {
                "list": {}, "cancel": {}, "requests": {"tools": {"call": {}}}}}
            return result
        if method == "server/discover" and declare:
            result = dict(await call_next(ctx))
            caps = dict(result.get("capabilities", {}))
            result["capabilities"] = {**caps, "extensions": {**caps.get("extensions", {}), TASKS_EXT: {}}}
            return result
        if method == "tools/list" and not modern:
            result = dict(await call_next(ctx))
            result["tools"] = [{**t, "execution": {"taskSupport": TASK_SUPPORT[t["name"]]}}
                               if t["name"] in TASK_SUPPORT else t for t in result.get("tools", [])]
            return result
        if method == "tools/call":
            name, arguments = params.get("name"), dict(params.get("arguments") or {})
            meta = params.get("_meta") or {}
            caps = meta.get("io.modelcontextprotocol/clientCapabilities") or {}
            if modern and declare and TASKS_EXT in (caps.get("extensions") or {}) and name == "slow_sum":
                return {"resultType": "task", **jobs.start(context, name, arguments).modern()}
            if not modern and declare and "task" in params and name in TASK_SUPPORT:
                return {"task": jobs.start(context, str(name), arguments).legacy()}
            if not modern and name == "slow_sum":
                raise MCPError(-32601, "slow_sum must be called as a task")
            return await call_next(ctx)
        if method.startswith("tasks/") and declare:
            return await jobs.method(method, params, context, modern)
        return await call_next(ctx)

    return handle


def build_jobs(name: str, variant: str = "") -> MCPServer:
    server = MCPServer(name, version="0.1.0", middleware=[jobs_middleware(Jobs(), variant != "no-tasks")])

    @server.tool()
    async def slow_sum(a: int, b: int, seconds: float = 0.2) -> str:
        """Add two numbers slowly (run as a task: 2025-11-25 taskSupport "required")."""
        return await run_job_tool("slow_sum", {"a": a, "b": b, "seconds": seconds})

    @server.tool()
    def echo(text: str) -> str:
        """Say it back (taskSupport "optional")."""
        return text

    return server


BUILDERS: dict[str, Callable[[str], MCPServer]] = {
    "kubernetes": build_kubernetes,
    "prometheus": build_prometheus,
    "vendor": build_vendor,
    "fixture": build_fixture,
    "jobs": build_jobs,
}


# --------------------------------------------------------------------------------------------------------------
# SSE resumability (priming events, Last-Event-ID) for the vendor and fixture servers


class MemoryEventStore(EventStore):
    """Keeps every SSE event in memory so a client can resume a stream with Last-Event-ID."""

    def __init__(self) -> None:
        self._events: list[tuple[StreamId, types.JSONRPCMessage | None]] = []

    async def store_event(self, stream_id: StreamId, message: types.JSONRPCMessage | None) -> EventId:
        self._events.append((stream_id, message))
        return str(len(self._events))

    async def replay_events_after(self, last_event_id: EventId, send_callback: EventCallback) -> StreamId | None:
        if not last_event_id.isdigit() or not 0 < int(last_event_id) <= len(self._events):
            return None
        position = int(last_event_id)
        stream_id = self._events[position - 1][0]
        for index in range(position, len(self._events)):
            event_stream, message = self._events[index]
            if event_stream == stream_id and message is not None:
                await send_callback(EventMessage(message, str(index + 1)))
        return stream_id


# --------------------------------------------------------------------------------------------------------------
# ASGI wrappers: header recording, a static bearer, the legacy-only era


def header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", []):
        if key.lower() == name:
            return value.decode("latin-1").strip()
    return None


async def plain_response(send: Send, status: int, body: str, extra: list[tuple[bytes, bytes]] | None = None) -> None:
    payload = body.encode()
    headers = [(b"content-type", b"text/plain; charset=utf-8"), (b"content-length", str(len(payload)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers + (extra or [])})
    await send({"type": "http.response.body", "body": payload})


def record_headers(app: ASGIApp, path: Path) -> ASGIApp:
    lock = threading.Lock()

    async def wrapped(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            headers: dict[str, str] = {}
            for key, value in scope.get("headers", []):
                name, text_value = key.decode("latin-1").lower(), value.decode("latin-1")
                headers[name] = f"{headers[name]}, {text_value}" if name in headers else text_value
            chunks: list[bytes] = []
            more = scope["method"] == "POST"
            while more:
                message = await receive()
                chunks.append(message.get("body", b""))
                more = message.get("more_body", False)
            raw = b"".join(chunks)
            try:
                body = json.loads(raw) if raw else None
            except ValueError:
                body = None
            line = json.dumps({"time": time.time(), "method": scope["method"], "path": scope["path"],
                               "headers": headers, "body": body})
            with lock, path.open("a", encoding="utf-8") as out:
                out.write(line + "\n")
            if scope["method"] == "POST":
                replayed = False

                async def replay() -> Message:
                    nonlocal replayed
                    if replayed:
                        return await receive()
                    replayed = True
                    return {"type": "http.request", "body": raw, "more_body": False}

                await app(scope, replay, send)
                return
        await app(scope, receive, send)

    return wrapped


def require_bearer(app: ASGIApp, token: str) -> ASGIApp:
    expected = f"Bearer {token}"

    async def wrapped(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and header(scope, b"authorization") != expected:
            await plain_response(send, 401, "Unauthorized", [(b"www-authenticate", b'Bearer realm="demo"')])
            return
        await app(scope, receive, send)

    return wrapped


def require_jwt(app: ASGIApp, issuer: str, audience: str, public_url: str, max_uses: int = 0) -> ASGIApp:
    """An upstream that validates bearer tokens on its own (signature from the issuer's JWKS, issuer, audience,
    expiry) and, without a valid one, answers 401 pointing at its RFC 9728 metadata. With `max_uses`, a token
    is refused after that many requests (as if revoked), so a gateway must get a new one."""
    uses: dict[str, int] = {}
    discovery = json.loads(urllib.request.urlopen(f"{issuer}/.well-known/openid-configuration", timeout=10).read())
    keys = jwt.PyJWKClient(discovery["jwks_uri"], cache_keys=True)
    base = public_url.split("/mcp", 1)[0]
    metadata_path = "/.well-known/oauth-protected-resource/mcp"
    metadata = json.dumps({"resource": audience, "authorization_servers": [issuer],
                           "scopes_supported": ["mcp:tools", "offline_access"]}).encode()
    challenge = f'Bearer resource_metadata="{base}{metadata_path}"'.encode()

    def valid(authorization: str | None) -> bool:
        scheme, _, token = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not token:
            return False
        try:
            key = keys.get_signing_key_from_jwt(token)
            jwt.decode(token, key.key, algorithms=["RS256", "ES256"], audience=audience, issuer=issuer)
        except (jwt.PyJWTError, OSError):
            return False
        uses[token] = uses.get(token, 0) + 1
        return not max_uses or uses[token] <= max_uses

    async def wrapped(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"].startswith("/.well-known/oauth-protected-resource"):
            headers = [(b"content-type", b"application/json"), (b"content-length", str(len(metadata)).encode())]
            await send({"type": "http.response.start", "status": 200, "headers": headers})
            await send({"type": "http.response.body", "body": metadata})
            return
        if scope["type"] == "http":
            authorization = header(scope, b"authorization")
            ok = await asyncio.to_thread(valid, authorization)
            if not ok:
                error = b', error="invalid_token"' if authorization else b""
                await plain_response(send, 401, "Unauthorized", [(b"www-authenticate", challenge + error)])
                return
        await app(scope, receive, send)

    return wrapped


def legacy_only(app: ASGIApp) -> ASGIApp:
    """Answer like a server that predates 2026-07-28: reject any protocol version it does not know."""

    async def wrapped(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            version = header(scope, b"mcp-protocol-version")
            if version is not None and version not in LEGACY_VERSIONS:
                await plain_response(send, 400, "Bad Request: Unsupported protocol version")
                return
        await app(scope, receive, send)

    return wrapped


# --------------------------------------------------------------------------------------------------------------
# serving


class QuietServer(uvicorn.Server):
    """uvicorn re-raises a captured SIGTERM after shutdown (exit by signal); a demo server exits with status 0."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        previous = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)


def build_server(args: argparse.Namespace) -> MCPServer:
    name = args.name or args.kind
    if args.kind == "jobs":
        return build_jobs(name, args.variant)
    return build_kubernetes(name, args.variant) if args.kind == "kubernetes" else BUILDERS[args.kind](name)


def build_app(args: argparse.Namespace) -> ASGIApp:
    server = build_server(args)
    resumable = args.kind in ("vendor", "fixture") and not args.json_response
    app: ASGIApp
    if args.transport == "sse":
        app = server.sse_app(host=args.host)
    else:
        app = server.streamable_http_app(
            json_response=args.json_response,
            event_store=MemoryEventStore() if resumable else None,
            retry_interval=100 if resumable else None,
            host=args.host,
        )
    if args.era == "legacy":
        app = legacy_only(app)
    if args.require_bearer:
        app = require_bearer(app, args.require_bearer)
    if args.require_jwt:
        app = require_jwt(app, args.require_jwt, args.audience or f"http://{args.host}:{args.port}/mcp",
                          f"http://{args.host}:{args.port}/mcp", args.max_token_uses)
    if args.record_headers:
        app = record_headers(app, Path(args.record_headers))
    return app


def listen(host: str, port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    # Accepted connections inherit it: without it every request after the first on a kept-alive connection
    # (Envoy keeps them) waits ~40 ms for delayed ACKs.
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.bind((host, port))
    sock.listen(128)
    sock.set_inheritable(True)
    return sock


async def serve(app: ASGIApp, sock: socket.socket, on_ready: Callable[[], None]) -> None:
    config = uvicorn.Config(app, log_level="warning", lifespan="on", timeout_graceful_shutdown=2, access_log=False)
    server = QuietServer(config)
    task = asyncio.create_task(server.serve(sockets=[sock]))
    while not server.started and not task.done():
        await asyncio.sleep(0.01)
    if server.started:
        on_ready()
    await task


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("kind", choices=KINDS)
    parser.add_argument("--require-jwt", metavar="ISSUER", default="",
                        help="validate bearer JWTs from this issuer (JWKS from its discovery document)")
    parser.add_argument("--audience", default="", help="with --require-jwt: the audience tokens must carry")
    parser.add_argument("--max-token-uses", type=int, default=0,
                        help="with --require-jwt: refuse a token after this many requests (0: never)")
    parser.add_argument("--variant", default="", choices=("", "skewed", "no-tasks"),
                        help="kubernetes: 'skewed' changes one description and adds a tool with an "
                             "argument named management_cluster (family fallbacks); jobs: 'no-tasks' declares "
                             "no task support")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port (reported on the READY line)")
    parser.add_argument("--transport", choices=("streamable-http", "sse", "stdio"), default="streamable-http",
                        help="sse: the 2024-11-05 HTTP+SSE transport (GET /sse); stdio: serve on stdin/stdout")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--name", help="server name, used in whoami and fake data (default: the kind)")
    parser.add_argument("--era", choices=("dual", "legacy"), default="dual")
    parser.add_argument("--json-response", action="store_true", help="answer POSTs with JSON instead of SSE")
    parser.add_argument("--require-bearer", metavar="TOKEN", help="reject requests without this bearer (401)")
    parser.add_argument("--record-headers", metavar="FILE", help="append one JSON line per HTTP request")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.transport == "stdio":
        anyio.run(build_server(args).run_stdio_async)
        return 0
    app = build_app(args)
    sock = listen(args.host, args.port)
    port = sock.getsockname()[1]
    host = f"[{args.host}]" if ":" in args.host else args.host

    def ready() -> None:
        print(f"READY http://{host}:{port}/{'sse' if args.transport == 'sse' else 'mcp'}", flush=True)

    asyncio.run(serve(app, sock, ready))
    return 0


if __name__ == "__main__":
    sys.exit(main())
