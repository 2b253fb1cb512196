"""What the processor needs to see an upstream's answer, carried from the request's stream in dynamic metadata.

The request's ext_proc stream never asks for the response: that costs a gRPC message on every call, and most
answers need nothing. Three answer filters (ext_proc, envoy_config.ANSWER_CASES) run only when Envoy's matcher
finds, in the flags written here and the response's status and content type, that this answer does need the
processor (a 401 for a renewable credential, a lost upstream session, SSE or JSON to rewrite, an upstream 5xx).
Their streams are new and may reach another worker, so everything they need travels with the request: the plan
in clear in NAMESPACE, and what a resend after a 401 needs sealed in RESEND_NAMESPACE (it holds the caller's
bearer and the call's arguments), which only the filter that acts on a 401 is given.
"""

from __future__ import annotations

import base64
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

import orjson

from extproc.replies import Forward, ResponsePlan
from extproc.sessions import Sealer

NAMESPACE = "muster_edge"
RESEND_NAMESPACE = "muster_edge.resend"
# Metadata keys Envoy's matcher reads (envoy_config.ANSWER_CASES): "1" when that kind of answer needs the processor.
ON_401 = "on401"
ON_404 = "on404"
ON_SSE = "sse"
ON_JSON = "json"
ON_MISMATCH = "on32020"  # a 400 JSON answer may be -32020: refetch the upstream's tools, rebuild Mcp-Param-*, resend
FLAGS = (ON_401, ON_404, ON_SSE, ON_JSON, ON_MISMATCH)
_RESEND_AAD = b"muster-edge resend v1|"
# Written by the processor itself, never by a client; Envoy's request body limit bounds what it holds.
_MAX_RESEND_TOKEN = 1 << 30
_PLAN_TYPES: dict[str, type | tuple[type, ...]] = {
    f.name: (str if f.type == "str" else bool if f.type == "bool" else object) for f in fields(ResponsePlan)}


class UnreadableAnswerContext(Exception):
    """The metadata names a plan this processor cannot read (another version, or damage): fail closed."""


@dataclass(frozen=True)
class Resend:
    """What sending a call once more needs (after a 401, or an upstream's -32020): the upstream body and headers
    (credential left out)."""

    body: bytes
    headers: dict[str, str]
    bearer: str = field(repr=False)


def _aad(plan: ResponsePlan) -> bytes:
    return _RESEND_AAD + plan.server.encode() + b"|" + plan.subject.encode()


def metadata(fwd: Forward, resend: Resend | None, sealer: Sealer) -> dict[str, dict[str, str]]:
    """The dynamic metadata of a routed request, by namespace (NAMESPACE is also read by Envoy's local replies)."""
    plan = fwd.plan
    out = {"server": plan.server, "rpc_id": orjson.dumps(plan.client_id).decode(),
           "plan": orjson.dumps({name: getattr(plan, name) for name in _PLAN_TYPES}).decode()}
    sealed: dict[str, str] = {}
    if resend is not None:
        if plan.renewable:
            out[ON_401] = "1"
        if plan.resend_on_mismatch:
            out[ON_MISMATCH] = "1"
        payload = orjson.dumps({"b": base64.b64encode(resend.body).decode(), "h": resend.headers, "t": resend.bearer})
        sealed["resend"] = sealer.seal(payload, _aad(plan))
    if plan.upstream_session_owner:
        out[ON_404] = "1"
    if plan.rewrite_sse:
        out[ON_SSE] = "1"
    if plan.rewrite_body:
        out[ON_JSON] = "1"
    return {NAMESPACE: out, RESEND_NAMESPACE: sealed} if sealed else {NAMESPACE: out}


def read_plan(fields_: Mapping[str, str]) -> ResponsePlan | None:
    """The plan back; None when the metadata holds none (not a routed call). Raises UnreadableAnswerContext for
    a plan that is there but cannot be read."""
    raw = fields_.get("plan")
    if raw is None:
        return None
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise UnreadableAnswerContext("not JSON") from None
    if not isinstance(data, dict):
        raise UnreadableAnswerContext("not an object")
    known: dict[str, Any] = {k: v for k, v in data.items() if k in _PLAN_TYPES}
    wrong = [k for k, v in known.items() if not isinstance(v, _PLAN_TYPES[k])]
    if wrong or not isinstance(known.get("server"), str):
        raise UnreadableAnswerContext(f"bad fields: {', '.join(wrong) or 'server'}")
    return ResponsePlan(**known)


def read_resend(fields_: Mapping[str, str], plan: ResponsePlan, sealer: Sealer) -> Resend | None:
    """The sealed resend, opened; None when there is none or it does not open for this plan (server, subject)."""
    token = fields_.get("resend", "")
    opened = sealer.open(token, _aad(plan), max_len=_MAX_RESEND_TOKEN) if token else None
    if opened is None:
        return None
    try:
        sent = orjson.loads(opened)
        return Resend(base64.b64decode(sent["b"]), dict(sent["h"]), str(sent["t"]))
    except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
        return None
