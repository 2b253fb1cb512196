"""Execution records: private to their caller, bounded in number and size."""

from __future__ import annotations

import secrets

from catalog.config import WorkflowSettings
from extproc.executions import Executions, bounded
from extproc.sessions import Sealer


def record(i: int, workflow: str = "w", status: str = "completed", big: int = 0) -> dict:
    return {"id": f"e{i}", "workflow_name": workflow, "status": status, "input": {},
            "steps": [{"step_id": "a", "tool": "t", "status": "completed", "result": "x" * big}]}


async def test_private_newest_first_and_bounded_in_number() -> None:
    store = Executions(WorkflowSettings(max_executions=3), Sealer(secrets.token_bytes(32)))
    for i in range(5):
        await store.put("alice", record(i, status="failed" if i == 4 else "completed"))
    await store.put("bob", record(9))
    page, total = await store.list("alice")
    assert [r["id"] for r in page] == ["e4", "e3"] and total == 2  # e0-e2 fell off (3 newest kept overall)
    assert await store.get("bob", "e4") is None
    assert (await store.get("alice", "e4"))["status"] == "failed"  # type: ignore[index]
    page, total = await store.list("alice", status="completed")
    assert [r["id"] for r in page] == ["e3"]


def test_a_large_record_loses_its_step_results_first() -> None:
    import orjson
    raw = bounded(record(1, big=300_000), 256 * 1024)
    out = orjson.loads(raw)
    assert len(raw) <= 256 * 1024 and out["truncated"] is True and "result" not in out["steps"][0]
    assert out["steps"][0]["status"] == "completed"
