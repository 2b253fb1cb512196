"""Sealed task ids: they route by themselves, open only for their caller, and resist tampering; the view leaves
out task-required tools an upstream cannot run as tasks."""

from __future__ import annotations

import time

from catalog.task_support import reachable_tools, task_support, upstream_task_kind
from extproc.sessions import Sealer
from extproc.task_ids import EXTENSION_TASKS, LEGACY_TASKS, MAX_AGE_S, TaskIds, TaskIndex, TaskRef, modern_task

KEY = bytes(range(32))


def test_a_sealed_id_opens_for_its_caller_only_and_carries_its_route() -> None:
    ids = TaskIds(Sealer(KEY))
    sealed = ids.seal(TaskRef("jobs", "t-1", LEGACY_TASKS, "alice"))
    ref = ids.open(sealed, "alice")
    assert ref is not None and (ref.server, ref.upstream_id, ref.kind) == ("jobs", "t-1", LEGACY_TASKS)
    assert "t-1" not in sealed and "jobs" not in sealed
    assert ids.open(sealed, "bob") is None
    assert TaskIds(Sealer(bytes(32))).open(sealed, "alice") is None  # another gateway's key
    # a character in the middle: the last one may carry only base64 padding bits, which decode the same
    middle = len(sealed) // 2
    assert ids.open(sealed[:middle] + ("A" if sealed[middle] != "A" else "B") + sealed[middle + 1:], "alice") is None
    assert ids.open(None, "alice") is None and ids.open("", "alice") is None and ids.open("x" * 5000, "alice") is None
    old = ids.seal(TaskRef("jobs", "t-1", LEGACY_TASKS, "alice", int(time.time()) - MAX_AGE_S - 10))
    assert ids.open(old, "alice") is None


def test_the_index_is_per_caller_and_bounded() -> None:
    index = TaskIndex(max_callers=2, per_caller=2)
    for n in range(3):
        index.add(TaskRef("jobs", f"t-{n}", LEGACY_TASKS, "alice"), f"sealed-{n}")
    assert index.of("alice") == {("jobs", "t-1"): "sealed-1", ("jobs", "t-2"): "sealed-2"}
    assert index.of("bob") == {}
    index.add(TaskRef("jobs", "b", LEGACY_TASKS, "bob"), "sb")
    index.add(TaskRef("jobs", "c", LEGACY_TASKS, "carol"), "sc")
    assert index.of("alice") == {}  # the least recently used caller fell out
    index.drop("bob", "jobs", "b")
    assert index.of("bob") == {}


def test_which_upstreams_run_tasks() -> None:
    assert upstream_task_kind(False, {"tasks": {"requests": {"tools": {"call": {}}}}}) == LEGACY_TASKS
    assert upstream_task_kind(False, {"tasks": {"list": {}}}) is None
    assert upstream_task_kind(True, {"extensions": {EXTENSION_TASKS: {}}}) == EXTENSION_TASKS
    assert upstream_task_kind(True, {"tasks": {"requests": {"tools": {"call": {}}}}}) is None
    assert task_support({"execution": {"taskSupport": "required"}}) == "required"
    assert task_support({"execution": {"taskSupport": "sometimes"}}) == "forbidden"
    assert task_support({}) == "forbidden"


def test_task_required_tools_an_upstream_cannot_run_are_left_out_with_a_reason() -> None:
    tools = [{"name": "slow", "execution": {"taskSupport": "required"}}, {"name": "echo"}]
    problems: list[str] = []
    assert [t["name"] for t in reachable_tools("jobs", False, {}, tools, problems)] == ["echo"]
    assert len(problems) == 1 and "'slow'" in problems[0] and "'jobs'" in problems[0]
    caps = {"tasks": {"requests": {"tools": {"call": {}}}}}
    assert reachable_tools("jobs", False, caps, tools, problems := []) is tools and not problems


def test_a_2025_task_in_the_extensions_shape() -> None:
    task = {"taskId": "t-1", "status": "working", "createdAt": "a", "lastUpdatedAt": "b", "ttl": 60_500,
            "pollInterval": 50}
    assert modern_task(task, "sealed") == {"taskId": "sealed", "status": "working", "createdAt": "a",
                                           "lastUpdatedAt": "b", "ttlSeconds": 60, "pollIntervalMilliseconds": 50}
    assert modern_task({**task, "ttl": None}, "s")["ttlSeconds"] is None
