"""The answer's context in dynamic metadata: flags Envoy's matcher reads, the plan back, the sealed resend."""

from __future__ import annotations

import json

import pytest

from extproc import answer
from extproc.answer import Resend, UnreadableAnswerContext
from extproc.replies import Forward, ResponsePlan
from extproc.sessions import Sealer

SEALER = Sealer(bytes(range(32)))
BODY = '{"jsonrpc":"2.0","id":7,"method":"tools/call","params":{"name":"whoami","arguments":{"q":"é"}}}'.encode()


def forward(**plan: object) -> Forward:
    return Forward("mcp.srv", BODY, {"authorization": "Bearer exchanged"}, ["x-muster-toolset"],
                   ResponsePlan(server="srv", client_id=7, **plan))  # type: ignore[arg-type]


def test_a_call_whose_answer_needs_nothing_sets_no_flag() -> None:
    meta = answer.metadata(forward(), None, SEALER)
    assert set(meta) == {answer.NAMESPACE}
    assert set(meta[answer.NAMESPACE]) == {"server", "rpc_id", "plan"}
    assert meta[answer.NAMESPACE]["server"] == "srv" and json.loads(meta[answer.NAMESPACE]["rpc_id"]) == 7


def test_each_need_sets_the_flag_the_matcher_reads() -> None:
    meta = answer.metadata(forward(upstream_session_owner="ab", namespace="srv", rewrite_body=True), None, SEALER)
    flags = meta[answer.NAMESPACE]
    assert {k for k in answer.FLAGS if flags.get(k) == "1"} == {answer.ON_404, answer.ON_SSE, answer.ON_JSON}


def test_the_plan_and_the_resend_come_back_and_the_bearer_is_never_in_clear() -> None:
    resend = Resend(BODY + b"\xff", {"mcp-method": "tools/call"}, "caller-token-secret")  # not even UTF-8
    meta = answer.metadata(forward(renewable=True, subject="alice"), resend, SEALER)
    assert meta[answer.NAMESPACE][answer.ON_401] == "1"
    assert "resend" not in meta[answer.NAMESPACE]  # its own namespace, given only to the filter acting on a 401
    clear = json.dumps(meta[answer.NAMESPACE]) + json.dumps(meta[answer.RESEND_NAMESPACE])
    assert "caller-token-secret" not in clear and "whoami" not in clear
    assert "caller-token-secret" not in repr(resend)
    plan = answer.read_plan(meta[answer.NAMESPACE])
    assert plan == ResponsePlan(server="srv", client_id=7, renewable=True, subject="alice")
    assert answer.read_resend(meta[answer.RESEND_NAMESPACE], plan, SEALER) == resend


def test_a_resend_sealed_for_another_server_or_user_or_altered_is_refused() -> None:
    meta = answer.metadata(forward(renewable=True, subject="alice"), Resend(BODY, {}, "t"), SEALER)
    sealed = meta[answer.RESEND_NAMESPACE]
    alice = ResponsePlan(server="srv", renewable=True, subject="alice")
    assert answer.read_resend(sealed, ResponsePlan(server="srv", renewable=True, subject="mallory"), SEALER) is None
    assert answer.read_resend(sealed, ResponsePlan(server="other", renewable=True, subject="alice"), SEALER) is None
    token = sealed["resend"]
    altered = {"resend": token[:-2] + ("AA" if token[-2:] != "AA" else "BB")}
    assert answer.read_resend(altered, alice, SEALER) is None
    assert answer.read_resend(sealed, alice, Sealer(bytes(32))) is None
    assert answer.read_resend({}, alice, SEALER) is None


def test_no_plan_means_not_a_routed_call() -> None:
    assert answer.read_plan({}) is None
    assert answer.read_plan({"server": "srv"}) is None


@pytest.mark.parametrize("raw", ["not json", "[1]", '{"server": 1}', '{"server": "s", "renewable": "yes"}',
                                 '{"renewable": true}'])
def test_a_plan_that_cannot_be_read_fails_closed(raw: str) -> None:
    with pytest.raises(UnreadableAnswerContext):
        answer.read_plan({"plan": raw})


def test_fields_a_newer_processor_added_are_ignored() -> None:
    plan = answer.read_plan({"plan": '{"server": "srv", "subject": "a", "future_field": [1, 2]}'})
    assert plan == ResponsePlan(server="srv", subject="a")
