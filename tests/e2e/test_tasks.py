"""Tasks through the gateway: task-required tools routed to the upstream that owns the task, ids sealed and bound to
the caller, in both eras.

Real Envoy, the real processor (two workers), a real OpenID provider for two callers, and real `mcp` SDK upstreams
(the demo's `jobs` kind, deploy/demo/servers.py) that run tools as tasks: `jobs` speaks the 2025-11-25 task
methods (handshake era only),
`jobs26` the 2026 `io.modelcontextprotocol/tasks` extension, `notasks` lists a task-required tool but declares no
task support. Clients are the SDK's: a 2025-11-25 session (task methods with the SDK's own task types) and a
2026-07-28 client whose ClientExtension drives the extension's tasks.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import time
import urllib.request
from collections.abc import AsyncIterator, Awaitable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

import httpx2
import pytest
from mcp.client.client import Client
from mcp.client.extension import ClaimContext, ClientExtension, ResultClaim
from mcp.client.streamable_http import streamable_http_client
from mcp.shared.exceptions import MCPError
from mcp_types import (
    CallToolResult,
    CancelTaskRequest,
    CancelTaskRequestParams,
    CancelTaskResult,
    GetTaskPayloadRequest,
    GetTaskPayloadRequestParams,
    GetTaskRequest,
    GetTaskRequestParams,
    GetTaskResult,
    ListTasksRequest,
    ListTasksResult,
    Request,
    RequestParams,
    Result,
)
from pydantic import ConfigDict

from tests.e2e.test_shared_state import start_redis
from tests.gateway_harness import Gateway, start_gateway
from tests.idp import start_idp
from tests.procs import free_port, start_demo_server

MODERN = "2026-07-28"
EXT = "io.modelcontextprotocol/tasks"
RELATED = "io.modelcontextprotocol/related-task"
USERS = ("alice", "bob")


@dataclass
class Setup:
    gateway: Gateway
    tokens: dict[str, str]
    records: dict[str, Path]


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    work = tmp_path_factory.mktemp("tasks")
    listen = f"127.0.0.1:{free_port()}"
    resource = f"http://{listen}/mcp"
    clients = [{"client_id": u, "client_secret": f"{u}-secret"} for u in USERS]
    with contextlib.ExitStack() as stack:
        idp = stack.enter_context(start_idp(work / "idp", clients=clients,
                                            resources=[{"audience": resource, "scope": "mcp:tools",
                                                        "accessTokenTTL": 600}]))
        records = {name: work / f"{name}.jsonl" for name in ("jobs", "jobs26", "notasks")}
        ups = {name: stack.enter_context(start_demo_server("jobs", name=name, era=era, variant=variant,
                                                           json_response=True, record_headers=records[name])).url
               for name, era, variant in (("jobs", "legacy", ""), ("jobs26", "dual", ""),
                                          ("notasks", "legacy", "no-tasks"))}
        # two processor workers and no store: consecutive task requests land on either worker
        gateway = stack.enter_context(start_gateway(
            work / "gw", ups, listen=listen, listTtlFloorMs=600_000, processor={"workers": 2}, toolMode="both",
            auth={"issuer": idp.issuer, "jwksUri": idp.jwks_uri, "resource": resource}))
        tokens = {u: idp.client_credentials(u, f"{u}-secret", resource=resource, scope="mcp:tools") for u in USERS}
        yield Setup(gateway, tokens, records)


@contextlib.asynccontextmanager
async def as_user(setup: Setup, user: str, mode: str = "legacy",
                  extensions: Sequence[ClientExtension] = ()) -> AsyncIterator[Client]:
    http = httpx2.AsyncClient(headers={"authorization": f"Bearer {setup.tokens[user]}"}, timeout=30)
    try:
        async with Client(streamable_http_client(setup.gateway.url, http_client=http), mode=mode,
                          extensions=list(extensions) or None) as client:
            yield client
    finally:
        await http.aclose()


def answered_per_worker(gw: Gateway, method: str) -> list[int]:
    """How many `method` requests each processor worker answered (its own /metrics)."""
    first = int(gw.status_url.rsplit(":", 1)[1].split("/")[0])
    out = []
    for port in range(first, first + int(gw.config["processor"]["workers"])):
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
            lines = resp.read().decode().splitlines()
        out.append(sum(int(ln.rsplit(" ", 1)[1]) for ln in lines
                       if ln.startswith("muster_edge_requests_total{") and f'method="{method}"' in ln))
    return out


def upstream_task_ids(setup: Setup, name: str, method: str) -> list[str]:
    """The task ids the upstream was sent in `method` requests (from its own log of requests, in order)."""
    path = setup.records[name]
    lines = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
    return [str(r["body"]["params"]["taskId"]) for r in lines
            if isinstance(r.get("body"), dict) and r["body"].get("method") == method]


# ---- the 2025-11-25 task methods, with the SDK's own task types ------------------------------------------------
async def create_task(client: Client, name: str, arguments: dict[str, Any]) -> dict[str, Any]:
    """A task-augmented tools/call. The SDK 2.3 types CreateTaskResult but validates a tools/call answer as a
    CallToolResult, so this one request goes through the session's dispatcher (the same connection and session)."""
    raw = await client.session._dispatcher.send_raw_request(
        "tools/call", {"name": name, "arguments": arguments, "task": {"ttl": 60_000}}, {})
    return dict(raw["task"])


async def get_task(client: Client, task_id: str) -> GetTaskResult:
    return await client.session.send_request(GetTaskRequest(params=GetTaskRequestParams(task_id=task_id)),
                                             GetTaskResult)


async def until_status(client: Client, task_id: str, statuses: tuple[str, ...], timeout: float = 15) -> GetTaskResult:
    deadline = time.monotonic() + timeout
    while True:
        task = await get_task(client, task_id)
        if task.status in statuses or time.monotonic() > deadline:
            return task
        await asyncio.sleep(0.05)


async def refused(call: Awaitable[Any]) -> MCPError:
    with pytest.raises(MCPError) as info:
        await call
    return info.value


async def test_a_task_required_tool_runs_as_a_task_routed_to_its_upstream(setup: Setup) -> None:
    async with as_user(setup, "alice") as client:
        assert client.protocol_version == "2025-11-25"
        caps = client.server_capabilities.model_dump(by_alias=True, exclude_none=True)
        assert caps["tasks"] == {"list": {}, "cancel": {}, "requests": {"tools": {"call": {}}}}
        tools = {t.name: t for t in (await client.list_tools()).tools}
        assert tools["x_jobs_slow_sum"].execution is not None
        assert tools["x_jobs_slow_sum"].execution.task_support == "required"
        task = await create_task(client, "x_jobs_slow_sum", {"a": 2, "b": 3})
        sealed = task["taskId"]
        assert task["status"] == "working"
        done = await until_status(client, sealed, ("completed", "failed"))
        polled = upstream_task_ids(setup, "jobs", "tasks/get")
        assert polled and sealed not in polled  # the upstream sees its own id; the client never does
        assert (done.task_id, done.status) == (sealed, "completed")
        payload = await client.session.send_request(
            GetTaskPayloadRequest(params=GetTaskPayloadRequestParams(task_id=sealed)), CallToolResultWithMeta)
        assert payload.content[0].text == "5"  # type: ignore[union-attr]
        assert (payload.meta or {})[RELATED] == {"taskId": sealed}


class CallToolResultWithMeta(CallToolResult):
    model_config = ConfigDict(extra="allow")


async def test_a_task_id_routes_on_every_worker_and_lists_there_too(setup: Setup) -> None:
    """The sealed id carries what routing needs: whichever worker a poll lands on answers it, and the caller's
    tasks/list holds the task on each worker (the creating worker told its sibling before answering). A session's
    requests stay on one worker (no store: sessions are pinned), so the polls come from new sessions of the same
    caller until both workers have answered."""
    async with as_user(setup, "alice") as client:
        task = await create_task(client, "x_jobs_slow_sum", {"a": 1, "b": 2, "seconds": 0})
    before = answered_per_worker(setup.gateway, "tasks/get")
    lists_before = answered_per_worker(setup.gateway, "tasks/list")
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        async with as_user(setup, "alice") as client:
            got = await get_task(client, task["taskId"])
            assert got.task_id == task["taskId"]
            listed = await client.session.send_request(ListTasksRequest(), ListTasksResult)
            assert task["taskId"] in {t.task_id for t in listed.tasks}
        gets = [a - b for a, b in zip(answered_per_worker(setup.gateway, "tasks/get"), before, strict=True)]
        lists = [a - b for a, b in zip(answered_per_worker(setup.gateway, "tasks/list"), lists_before, strict=True)]
        if all(gets) and all(lists):
            break
    assert all(gets) and all(lists), (gets, lists)


async def test_an_optional_tool_works_plainly_and_as_a_task(setup: Setup) -> None:
    async with as_user(setup, "alice") as client:
        plain = await client.call_tool("x_jobs_echo", {"text": "hi"})
        assert plain.content[0].text == "hi"  # type: ignore[union-attr]
        task = await create_task(client, "x_jobs_echo", {"text": "as a task"})
        assert (await until_status(client, task["taskId"], ("completed",))).status == "completed"
        payload = await client.session.send_request(
            GetTaskPayloadRequest(params=GetTaskPayloadRequestParams(task_id=task["taskId"])), CallToolResult)
        assert payload.content[0].text == "as a task"  # type: ignore[union-attr]


async def test_cancel_reaches_the_upstream(setup: Setup) -> None:
    async with as_user(setup, "alice") as client:
        task = await create_task(client, "x_jobs_slow_sum", {"a": 1, "b": 1, "seconds": 60})
        cancelled = await client.session.send_request(
            CancelTaskRequest(params=CancelTaskRequestParams(task_id=task["taskId"])), CancelTaskResult)
        assert (cancelled.task_id, cancelled.status) == (task["taskId"], "cancelled")
        cancels = upstream_task_ids(setup, "jobs", "tasks/cancel")
        assert cancels and cancels[-1] != task["taskId"] and cancels[-1].startswith("t-")
        assert (await get_task(client, task["taskId"])).status == "cancelled"
        again = await refused(client.session.send_request(
            CancelTaskRequest(params=CancelTaskRequestParams(task_id=task["taskId"])), CancelTaskResult))
        assert again.error.code == -32602  # already terminal (the upstream's answer)


async def test_tasks_list_holds_the_callers_own_tasks_only(setup: Setup) -> None:
    async with as_user(setup, "alice") as alice, as_user(setup, "bob") as bob:
        mine = await create_task(alice, "x_jobs_echo", {"text": "alice's"})
        theirs = await create_task(bob, "x_jobs_echo", {"text": "bob's"})
        alice_ids = {t.task_id for t in (await alice.session.send_request(ListTasksRequest(), ListTasksResult)).tasks}
        bob_ids = {t.task_id for t in (await bob.session.send_request(ListTasksRequest(), ListTasksResult)).tasks}
        assert mine["taskId"] in alice_ids and theirs["taskId"] not in alice_ids
        assert theirs["taskId"] in bob_ids and not alice_ids & bob_ids


async def test_another_callers_replay_of_a_task_id_is_refused(setup: Setup) -> None:
    async with as_user(setup, "alice") as alice, as_user(setup, "bob") as bob:
        task = await create_task(alice, "x_jobs_slow_sum", {"a": 4, "b": 4, "seconds": 1})
        sealed = task["taskId"]
        cancels = len(upstream_task_ids(setup, "jobs", "tasks/cancel"))
        for call in (get_task(bob, sealed),
                     bob.session.send_request(CancelTaskRequest(params=CancelTaskRequestParams(task_id=sealed)),
                                              CancelTaskResult),
                     bob.session.send_request(GetTaskPayloadRequest(params=GetTaskPayloadRequestParams(
                         task_id=sealed)), CallToolResult)):
            err = await refused(call)
            assert err.error.code == -32602 and "Unknown task" in err.error.message
        tampered = sealed[:-2] + ("AA" if not sealed.endswith("AA") else "BB")
        assert (await refused(get_task(alice, tampered))).error.code == -32602
        assert (await until_status(alice, sealed, ("completed",))).status == "completed"  # alice's task untouched
        assert len(upstream_task_ids(setup, "jobs", "tasks/cancel")) == cancels  # nothing reached the upstream


async def test_a_task_required_tool_that_cannot_be_reached_is_not_listed_and_the_status_says_why(
        setup: Setup) -> None:
    async with as_user(setup, "alice") as client:
        names = {t.name for t in (await client.list_tools()).tools}
    assert "x_notasks_echo" in names and "x_notasks_slow_sum" not in names
    problems = setup.gateway.status()["viewProblems"]
    why = [p for p in problems if "'slow_sum'" in p and "'notasks'" in p]
    assert why and "requires tasks" in why[0] and "declares no task support" in why[0]


@pytest.mark.parametrize("mode", ["legacy", MODERN])
async def test_call_tool_runs_a_task_required_tool_as_a_task_and_returns_its_result(setup: Setup, mode: str) -> None:
    """The meta-tool call_tool (and workflow steps) want a plain result: the gateway runs the task and waits."""
    gets = len(upstream_task_ids(setup, "jobs", "tasks/result"))
    async with as_user(setup, "bob", mode) as client:
        result = await client.call_tool("call_tool", {"name": "x_jobs_slow_sum", "arguments": {"a": 5, "b": 6}})
    inner = json.loads(result.content[0].text)  # type: ignore[union-attr]
    assert result.is_error is False and inner["isError"] is False and inner["content"][0]["text"] == "11"
    assert len(upstream_task_ids(setup, "jobs", "tasks/result")) == gets + 1  # it ran as a task upstream


async def test_an_older_handshake_client_is_not_offered_task_required_tools(setup: Setup) -> None:
    """A 2025-06-18 client cannot create tasks: required tools are left out of its list, not listed and broken."""
    http = httpx2.AsyncClient(headers={"authorization": f"Bearer {setup.tokens['alice']}",
                                       "accept": "application/json, text/event-stream"}, timeout=30)
    try:
        init = await http.post(setup.gateway.url, json={"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
            "protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "old", "version": "1"}}})
        assert "tasks" not in init.json()["result"]["capabilities"]
        sid = init.headers["mcp-session-id"]
        headers = {"mcp-session-id": sid, "mcp-protocol-version": "2025-06-18"}
        listed = await http.post(setup.gateway.url, headers=headers,
                                 json={"jsonrpc": "2.0", "id": 2, "method": "tools/list"})
        names = {t["name"] for t in listed.json()["result"]["tools"]}
        assert "x_jobs_echo" in names and "x_jobs_slow_sum" not in names
    finally:
        await http.aclose()


async def test_upstream_sessions_are_not_told_of_client_hosted_tasks(setup: Setup) -> None:
    """The gateway does not relay client-hosted tasks, so a client's `tasks` capability stays at the edge."""
    http = httpx2.AsyncClient(headers={"authorization": f"Bearer {setup.tokens['bob']}",
                                       "accept": "application/json, text/event-stream"}, timeout=30)
    caps = {"elicitation": {"form": {}}, "tasks": {"requests": {"elicitation": {"create": {}}}}}
    try:
        init = await http.post(setup.gateway.url, json={"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
            "protocolVersion": "2025-11-25", "capabilities": caps, "clientInfo": {"name": "c", "version": "1"}}})
        headers = {"mcp-session-id": init.headers["mcp-session-id"], "mcp-protocol-version": "2025-11-25"}
        called = await http.post(setup.gateway.url, headers=headers, json={
            "jsonrpc": "2.0", "id": 2, "method": "tools/call", "params": {"name": "x_jobs_echo",
                                                                          "arguments": {"text": "x"}}})
        assert called.status_code == 200 and '"x"' in called.text
    finally:
        await http.aclose()
    lines = [json.loads(line) for line in setup.records["jobs"].read_text().splitlines()]
    told = [r["body"]["params"]["capabilities"] for r in lines
            if isinstance(r.get("body"), dict) and r["body"].get("method") == "initialize"
            and "elicitation" in r["body"]["params"].get("capabilities", {})]
    assert told and all("tasks" not in c for c in told)


# ---- the 2026 extension, driven by an SDK ClientExtension ------------------------------------------------------
class CreatedTask(Result):
    model_config = ConfigDict(extra="allow")
    result_type: Literal["task"] = "task"  # type: ignore[assignment]
    task_id: str
    status: str


class ExtGetTaskParams(RequestParams):
    task_id: str


class ExtGetTask(Request[ExtGetTaskParams, Literal["tasks/get"]]):
    """tasks/get as the extension sends it: Mcp-Name carries the task id."""

    method: Literal["tasks/get"] = "tasks/get"
    params: ExtGetTaskParams
    name_param: ClassVar[str | None] = "taskId"


class ExtCancelTask(Request[ExtGetTaskParams, Literal["tasks/cancel"]]):
    method: Literal["tasks/cancel"] = "tasks/cancel"
    params: ExtGetTaskParams
    name_param: ClassVar[str | None] = "taskId"


class DetailedTask(Result):
    model_config = ConfigDict(extra="allow")
    task_id: str
    status: str


class Tasks(ClientExtension):
    """The client side of io.modelcontextprotocol/tasks: a `resultType: "task"` answer is polled with tasks/get."""

    identifier = EXT

    def __init__(self) -> None:
        self.created: list[str] = []
        self.polls: list[DetailedTask] = []

    def claims(self) -> Sequence[ResultClaim[Any]]:
        return [ResultClaim(result_type="task", model=CreatedTask, resolve=self._resolve)]

    async def _resolve(self, created: CreatedTask, ctx: ClaimContext) -> CallToolResult:
        self.created.append(created.task_id)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            task = await ctx.session.send_request(ExtGetTask(params=ExtGetTaskParams(task_id=created.task_id)),
                                                  DetailedTask)
            self.polls.append(task)
            if task.status == "completed":
                return CallToolResult.model_validate((task.model_extra or {})["result"])
            if task.status in ("failed", "cancelled"):
                raise AssertionError(f"task {task.status}")
            await asyncio.sleep(0.05)
        raise AssertionError("the task did not complete")


async def test_2026_extension_tasks_are_sealed_and_polled(setup: Setup) -> None:
    ext = Tasks()
    async with as_user(setup, "alice", MODERN, [ext]) as client:
        assert EXT in (await client.session.send_discover(MODERN))["capabilities"]["extensions"]
        result = await client.call_tool("x_jobs26_slow_sum", {"a": 20, "b": 22})
        assert result.content[0].text == "42"  # type: ignore[union-attr]
        created = len(ext.created)  # the upstream answers echo at once (its choice): a plain result comes back
        assert (await client.call_tool("x_jobs26_echo", {"text": "now"})).content[0].text == "now"  # type: ignore[union-attr]
        assert len(ext.created) == created
    sealed = ext.created[-1]
    polled = upstream_task_ids(setup, "jobs26", "tasks/get")
    assert polled and sealed not in polled
    assert all(p.task_id == sealed for p in ext.polls)
    async with as_user(setup, "bob", MODERN, [Tasks()]) as other:
        err = await refused(other.session.send_request(ExtGetTask(params=ExtGetTaskParams(task_id=sealed)),
                                                       DetailedTask))
        assert err.error.code == -32602


async def test_2026_client_runs_a_2025_task_required_tool_through_the_bridge(setup: Setup) -> None:
    ext = Tasks()
    async with as_user(setup, "alice", MODERN, [ext]) as client:
        assert "x_jobs_slow_sum" in {t.name for t in (await client.list_tools()).tools}
        result = await client.call_tool("x_jobs_slow_sum", {"a": 1, "b": 6})
        assert result.content[0].text == "7"  # type: ignore[union-attr]
        assert ext.polls[-1].status == "completed" and ext.polls[-1].task_id == ext.created[-1]
        task = await client.session.send_request(ExtGetTask(params=ExtGetTaskParams(task_id=ext.created[-1])),
                                                 DetailedTask)
        assert task.status == "completed"
    async with as_user(setup, "alice", MODERN) as plain:  # no extension declared: not offered the required tool
        names = {t.name for t in (await plain.list_tools()).tools}
        assert "x_jobs_echo" in names and "x_jobs_slow_sum" not in names
        assert (await plain.call_tool("x_jobs26_slow_sum", {"a": 1, "b": 1})).content[0].text == "2"  # type: ignore[union-attr]
        err = await refused(plain.call_tool("x_jobs_slow_sum", {"a": 1, "b": 1}))  # called anyway: told what it lacks
        assert err.error.code == -32021
        assert err.error.data == {"requiredCapabilities": {"extensions": {EXT: {}}}}


async def test_2026_cancel_is_acknowledged_and_reaches_the_upstream(setup: Setup) -> None:
    seen: list[str] = []

    class Holder(Tasks):
        async def _resolve(self, created: CreatedTask, ctx: ClaimContext) -> CallToolResult:
            seen.append(created.task_id)
            await ctx.session.send_request(ExtCancelTask(params=ExtGetTaskParams(task_id=created.task_id)), Result)
            return CallToolResult(content=[], is_error=True)

    async with as_user(setup, "alice", MODERN, [Holder()]) as client:
        await client.call_tool("x_jobs26_slow_sum", {"a": 1, "b": 1, "seconds": 60})
    cancels = upstream_task_ids(setup, "jobs26", "tasks/cancel")
    assert seen and cancels and cancels[-1] != seen[-1] and cancels[-1].startswith("t-")




# ---- two replicas sharing a store ------------------------------------------------------------------------------
async def test_two_replicas_sharing_a_store_route_and_list_each_others_tasks(tmp_path: Path) -> None:
    """A task started through one gateway replica is polled, fetched and listed through another (same sealing key,
    one Redis): the sealed id routes by itself, the caller's list comes from the store; another caller gets
    nothing."""
    listens = [f"127.0.0.1:{free_port()}" for _ in range(2)]
    resources = [f"http://{listen}/mcp" for listen in listens]
    key = tmp_path / "session-key"
    key.write_text(base64.b64encode(bytes(range(32))).decode())
    clients = [{"client_id": u, "client_secret": f"{u}-secret"} for u in USERS]
    with contextlib.ExitStack() as stack:
        redis_url = stack.enter_context(start_redis(tmp_path))
        idp = stack.enter_context(start_idp(tmp_path / "idp", clients=clients,
                                            resources=[{"audience": r, "scope": "mcp:tools"} for r in resources]))
        jobs = stack.enter_context(start_demo_server("jobs", name="jobs", era="legacy", json_response=True))
        gateways = [stack.enter_context(start_gateway(
            tmp_path / f"gw{i}", {"jobs": jobs.url}, listen=listens[i], listTtlFloorMs=600_000,
            store={"redis": redis_url}, sessionKey={"file": str(key)},
            auth={"issuer": idp.issuer, "jwksUri": idp.jwks_uri, "resource": resources[i]})) for i in range(2)]
        replicas = [Setup(gw, {u: idp.client_credentials(u, f"{u}-secret", resource=resources[i], scope="mcp:tools")
                               for u in USERS}, {}) for i, gw in enumerate(gateways)]
        async with as_user(replicas[0], "alice") as first:
            task = await create_task(first, "x_jobs_slow_sum", {"a": 30, "b": 12})
        async with as_user(replicas[1], "alice") as second, as_user(replicas[1], "bob") as bob:
            assert (await until_status(second, task["taskId"], ("completed",))).status == "completed"
            payload = await second.session.send_request(
                GetTaskPayloadRequest(params=GetTaskPayloadRequestParams(task_id=task["taskId"])), CallToolResult)
            assert payload.content[0].text == "42"  # type: ignore[union-attr]
            listed = await second.session.send_request(ListTasksRequest(), ListTasksResult)
            assert task["taskId"] in {t.task_id for t in listed.tasks}
            assert (await refused(get_task(bob, task["taskId"]))).error.code == -32602
            assert task["taskId"] not in {t.task_id for t in
                                          (await bob.session.send_request(ListTasksRequest(), ListTasksResult)).tasks}
