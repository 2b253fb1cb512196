"""What the processor needs to see an upstream's answer, carried from the request's stream in dynamic metadata.

The request's ext_proc stream never asks for the response: that costs a gRPC message on every call, and most
answers need nothing. A second ext_proc filter (the answer filter) runs only when Envoy's matcher finds, in the
metadata written here and the response's status and content type, that this answer does need the processor
(a 401 for a renewable credential, a lost upstream session, SSE or JSON to rewrite, an upstream 5xx). That
stream is new and may reach another worker, so everything it needs travels with the request: the plan in clear,
and what a resend after a 401 needs sealed (it holds the caller's bearer and the call's arguments).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields

import orjson

from extproc.replies import Forward, ResponsePlan
from extproc.sessions import Sealer

NAMESPACE = "muster_edge"
# Metadata keys Envoy's matcher reads (envoy_config.answer_filter): "1" when that kind of answer needs the processor.
ON_401 = "on401"
ON_404 = "on404"
ON_SSE = "sse"
ON_JSON = "json"
FLAGS = (ON_401, ON_404, ON_SSE, ON_JSON)
_RETRY_AAD = b"muster-edge retry v1|"
MAX_RETRY_TOKEN = 16 << 20
_PLAN_FIELDS = tuple(f.name for f in fields(ResponsePlan))


@dataclass(frozen=True)
class Resend:
    """What sending a call once more after a 401 needs: the upstream body and headers (credential left out)."""

    body: bytes
    headers: dict[str, str]
    bearer: str


def metadata(fwd: Forward, resend: Resend | None, sealer: Sealer) -> dict[str, str]:
    """The `muster_edge` dynamic metadata of a routed request (also read by Envoy's local-reply mappers)."""
    plan = fwd.plan
    out = {"server": plan.server, "rpc_id": orjson.dumps(plan.client_id).decode(),
           "plan": orjson.dumps({name: getattr(plan, name) for name in _PLAN_FIELDS}).decode()}
    if plan.renewable and resend is not None:
        out[ON_401] = "1"
        payload = orjson.dumps({"b": resend.body.decode("utf-8", "surrogateescape"), "h": resend.headers,
                                "t": resend.bearer})
        out["resend"] = sealer.seal(payload, _RETRY_AAD + plan.server.encode() + b"|" + plan.subject.encode())
    if plan.upstream_session_owner:
        out[ON_404] = "1"
    if plan.rewrite_sse:
        out[ON_SSE] = "1"
    if plan.rewrite_body:
        out[ON_JSON] = "1"
    return out


def read(fields: Mapping[str, str], sealer: Sealer) -> tuple[ResponsePlan | None, Resend | None]:
    """The plan (and resend) back from the metadata the answer's stream was given; None for anything not ours."""
    raw = fields.get("plan")
    if not raw:
        return None, None
    try:
        data = orjson.loads(raw)
        plan = ResponsePlan(**data)
    except (orjson.JSONDecodeError, TypeError):
        return None, None
    token = fields.get("resend", "")
    if not (plan.renewable and token):
        return plan, None
    opened = sealer.open(token, _RETRY_AAD + plan.server.encode() + b"|" + plan.subject.encode(),
                         max_len=MAX_RETRY_TOKEN)
    if opened is None:
        return plan, None
    sent = orjson.loads(opened)
    return plan, Resend(sent["b"].encode("utf-8", "surrogateescape"), sent["h"], sent["t"])
