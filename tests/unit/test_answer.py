"""The answer's context in dynamic metadata: flags Envoy's matcher reads, the plan back, the sealed resend."""

from __future__ import annotations

import json

from extproc import answer
from extproc.answer import Resend
from extproc.replies import Forward, ResponsePlan
from extproc.sessions import Sealer

SEALER = Sealer(bytes(range(32)))
BODY = '{"jsonrpc":"2.0","id":7,"method":"tools/call","params":{"name":"whoami","arguments":{"q":"é"}}}'.encode()


def forward(**plan: object) -> Forward:
    return Forward("mcp.srv", BODY, {"authorization": "Bearer exchanged"}, ["x-muster-toolset"],
                   ResponsePlan(server="srv", client_id=7, **plan))  # type: ignore[arg-type]


def test_a_call_whose_answer_needs_nothing_sets_no_flag() -> None:
    meta = answer.metadata(forward(), None, SEALER)
    assert set(meta) == {"server", "rpc_id", "plan"}
    assert meta["server"] == "srv" and json.loads(meta["rpc_id"]) == 7


def test_each_need_sets_the_flag_the_matcher_reads() -> None:
    meta = answer.metadata(forward(upstream_session_owner="ab", namespace="srv", rewrite_body=True), None, SEALER)
    assert {k for k in answer.FLAGS if meta.get(k) == "1"} == {answer.ON_404, answer.ON_SSE, answer.ON_JSON}


def test_the_plan_and_the_resend_come_back_and_the_bearer_is_never_in_clear() -> None:
    resend = Resend(BODY, {"mcp-method": "tools/call"}, "caller-token-secret")
    meta = answer.metadata(forward(renewable=True, subject="alice"), resend, SEALER)
    assert meta[answer.ON_401] == "1"
    assert not any("caller-token-secret" in v or "whoami" in v for k, v in meta.items() if k != "plan")
    plan, back = answer.read(meta, SEALER)
    assert plan == ResponsePlan(server="srv", client_id=7, renewable=True, subject="alice")
    assert back == resend


def test_a_resend_sealed_for_another_server_or_user_or_altered_is_refused() -> None:
    meta = answer.metadata(forward(renewable=True, subject="alice"), Resend(BODY, {}, "t"), SEALER)
    other_user = {**meta, "plan": meta["plan"].replace('"alice"', '"mallory"')}
    assert answer.read(other_user, SEALER)[1] is None
    altered = {**meta, "resend": meta["resend"][:-2] + ("AA" if meta["resend"][-2:] != "AA" else "BB")}
    assert answer.read(altered, SEALER)[1] is None
    assert answer.read(meta, Sealer(bytes(32)))[1] is None


def test_metadata_that_is_not_ours_gives_no_plan() -> None:
    assert answer.read({}, SEALER) == (None, None)
    assert answer.read({"plan": "not json"}, SEALER) == (None, None)
    assert answer.read({"plan": '{"unknown": 1}'}, SEALER) == (None, None)
