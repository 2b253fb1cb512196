"""The ext_proc state machine for one stream: Envoy's messages in, the gateway's decisions out.

The request filter's stream carries request headers, then the whole request body (BUFFERED), and ends there.
An answer filter's stream (only when Envoy's matcher finds the answer needs the processor) carries, with the
plan in dynamic metadata (extproc/answer.py), either the response headers (a status to act on: 401, 404, 5xx)
or the response body to rewrite: BUFFERED for JSON, STREAMED for SSE. This module only translates
between protobuf and the gateway's `Local` / `Forward` decisions.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import orjson
from cachetools import LRUCache
from envoy.config.core.v3 import base_pb2
from envoy.extensions.filters.http.ext_proc.v3 import processing_mode_pb2 as pm
from envoy.service.ext_proc.v3 import external_processor_pb2 as ep
from google.protobuf import json_format

from catalog.policy import Claims
from extproc import answer, cancellation, carried
from extproc.gateway import Gateway
from extproc.jsonrpc import INTERNAL_ERROR, MODERN, RpcError
from extproc.replies import JSON, Forward, Local, ResponsePlan
from extproc.request import Caller, Request
from extproc.rewrite import SseRewriter, Unreadable, mapped_error, read_answer, rewrite_message
from extproc.schema_retry import is_header_mismatch
from extproc.upstream import ROUTE_HEADER

log = logging.getLogger(__name__)

JWT_NAMESPACE = "envoy.filters.http.jwt_authn"
_OVERWRITE = base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD
_SLOW_AFTER_S = 0.3
_EXTENDED = ep.ProcessingResponse()
_EXTENDED.override_message_timeout.FromSeconds(85)  # above a workflow run's bound (at most 80 s)


def _pairs(headers: Any) -> list[tuple[str, str]]:
    return [(h.key, h.raw_value.decode("latin-1") if h.raw_value else h.value) for h in headers.headers]


_callers: LRUCache[tuple[bytes, str], Caller] = LRUCache(maxsize=4096)


def caller_of(request: ep.ProcessingRequest, groups_claim: str = "groups") -> Caller:
    """The verified claims Envoy's jwt_authn put in dynamic metadata (never the raw token).

    Remembered by the metadata's bytes: the same token comes again and again, and converting a payload with
    hundreds of groups is not free.
    """
    fm = request.metadata_context.filter_metadata
    if JWT_NAMESPACE not in fm:
        return Caller()
    raw = fm[JWT_NAMESPACE].SerializeToString(deterministic=True)
    cached = _callers.get((raw, groups_claim))
    if cached is None:
        cached = _callers[(raw, groups_claim)] = _parse_caller(fm[JWT_NAMESPACE], groups_claim)
    return cached


def _parse_caller(metadata: Any, groups_claim: str) -> Caller:
    data = json_format.MessageToDict(metadata)
    payload = data.get("jwt_payload")
    if not isinstance(payload, dict):
        failure = data.get("jwt_failure")
        message = str(failure.get("message", "")) if isinstance(failure, dict) else ""
        return Caller(auth_error=message or ("invalid token" if failure else ""))
    claims = Claims.from_payload(payload, groups_claim)
    exp = payload.get("exp")
    expires_at = float(exp) if isinstance(exp, (int, float)) and not isinstance(exp, bool) else 0.0
    return Caller(subject=claims.subject, claims=claims, verified=True, expires_at=expires_at)


def _strings(msg: ep.ProcessingRequest, namespace: str) -> dict[str, str]:
    """One namespace of the dynamic metadata Envoy forwarded (empty when it sent none)."""
    fm = msg.metadata_context.filter_metadata
    return {k: v.string_value for k, v in fm[namespace].fields.items()} if namespace in fm else {}


def _set(mutation: Any, headers: dict[str, str]) -> None:
    for key, value in headers.items():
        opt = mutation.set_headers.add()
        opt.header.key = key
        opt.header.raw_value = value.encode("latin-1", "replace")
        opt.append_action = _OVERWRITE


def unreadable_context(exc: Exception) -> Local:
    """An answer the processor was asked to handle but cannot: an error, never the answer unprocessed."""
    log.error("answer context unreadable (%s): the call is answered with an error", exc)
    return Local.error(RpcError(INTERNAL_ERROR, "muster-edge could not process the upstream's answer",
                                status=502), MODERN)


def immediate(local: Local) -> ep.ProcessingResponse:
    resp = ep.ProcessingResponse()
    ir = resp.immediate_response
    ir.status.code = local.status  # type: ignore[assignment]
    _set(ir.headers, local.headers)
    ir.body = local.body
    ir.details = local.details
    return resp


class Stream:
    def __init__(self, gateway: Gateway, write: Any) -> None:
        self.gw = gateway
        self._write = write
        self.req = Request()
        self.plan: ResponsePlan | None = None
        self.sse: SseRewriter | None = None
        self.error_status = 0  # an upstream's JSON error answer whose body this stream asked for
        self.resend: answer.Resend | None = None  # kept from the headers message for a 400 that may be -32020
        self._tracked: tuple[tuple[str, str, Any], cancellation.InFlight] | None = None
        self._watched: ResponsePlan | None = None  # a call whose client's disconnect must reach the upstream

    def log_facts(self) -> tuple[str, str, str]:
        """(request id, method, server) for the log lines written while this stream is handled."""
        req = self.req
        return (req.headers.get("x-request-id", ""), req.message.method if req.message is not None else "",
                self.plan.server if self.plan is not None else "")

    async def handle(self, msg: ep.ProcessingRequest) -> ep.ProcessingResponse | None:
        kind = msg.WhichOneof("request")
        if kind == "request_headers":
            return await self._request_headers(msg)
        if kind == "request_body":
            return await self._request_body(msg)
        if kind == "response_headers":
            return await self._response_headers(msg)
        if kind == "response_body":
            return await self._response_body(msg)
        resp = ep.ProcessingResponse()
        if kind == "request_trailers":
            resp.request_trailers.SetInParent()
        elif kind == "response_trailers":
            resp.response_trailers.SetInParent()
        else:
            return None
        return resp

    async def _patient(self, coro: Any) -> Any:
        """Await a decision; if it takes long (upstream I/O), first tell Envoy to wait past message_timeout.

        A timer, not a task per message: the common, immediate decision costs one call_later.
        """
        loop = asyncio.get_running_loop()
        extended: list[asyncio.Task[None]] = []
        timer = loop.call_later(_SLOW_AFTER_S, lambda: extended.append(loop.create_task(self._write(_EXTENDED))))
        try:
            return await coro
        finally:
            timer.cancel()
            for task in extended:
                await task  # the extension must reach Envoy before the answer does

    async def _request_headers(self, msg: ep.ProcessingRequest) -> ep.ProcessingResponse:
        self.req = Request.from_headers(_pairs(msg.request_headers.headers), caller_of(msg, self.gw.groups_claim))
        decision = await self._patient(self.gw.on_headers(self.req, msg.request_headers.end_of_stream))
        if isinstance(decision, Local):
            return immediate(decision)
        resp = ep.ProcessingResponse()
        common = resp.request_headers.response
        if isinstance(decision, Forward):
            self._route(resp, common, decision)
            return resp
        if ROUTE_HEADER in self.req.headers:
            common.header_mutation.remove_headers.append(ROUTE_HEADER)
            common.clear_route_cache = True
        else:
            resp.request_headers.SetInParent()
        return resp

    async def _request_body(self, msg: ep.ProcessingRequest) -> ep.ProcessingResponse:
        carried_headers = not self.req.headers
        if carried_headers:  # the one-message path: no headers message, the headers came in metadata
            packed = _strings(msg, carried.REQUEST_NAMESPACE).get(carried.REQUEST_KEY, "")
            if not packed:
                log.error("a request body came without its headers (no %s metadata): render the Envoy "
                          "configuration again", carried.REQUEST_NAMESPACE)
            self.req = Request.from_headers(carried.unpack(packed), caller_of(msg, self.gw.groups_claim))
            first = await self._patient(self.gw.on_headers(self.req, False))
            if isinstance(first, Local):
                return immediate(first)
            if first is not None:  # a body request is never forwarded on its headers alone: fail closed
                return immediate(unreadable_context(RuntimeError("a forward decided on headers for a body")))
        decision = await self._patient(self.gw.on_body(self.req, msg.request_body.body))
        if isinstance(decision, Local):
            return immediate(decision)
        assert isinstance(decision, Forward)
        resp = ep.ProcessingResponse()
        common = resp.request_body.response
        common.body_mutation.body = decision.body
        self._route(resp, common, decision, carried_headers)
        return resp

    def _route(self, resp: ep.ProcessingResponse, common: Any, decision: Forward, carried_headers: bool = False) \
            -> None:
        """Headers for the upstream, a new route, and what the answer filter will need (dynamic metadata).

        On the one-message path Envoy drops header mutations in a body reply: the headers travel in metadata
        instead, and Envoy's headers_out filter applies them and routes again (extproc/carried.py)."""
        self.plan = decision.plan
        self._tracked = self.gw.track(self.req, decision, self._end_cancelled)
        self._watched = decision.plan if self.gw.watches_disconnect(decision.plan) else None
        if carried_headers:
            fields = resp.dynamic_metadata.fields[carried.UPSTREAM_NAMESPACE].struct_value.fields
            for key, value in carried.upstream_fields(decision.set_headers, decision.remove_headers).items():
                fields[key].string_value = value
        else:
            _set(common.header_mutation, decision.set_headers)
            common.header_mutation.remove_headers.extend(decision.remove_headers)
            common.clear_route_cache = True
        resend = self.gw.resend_for(self.req, decision)
        for namespace, values in answer.metadata(decision, resend, self.gw.sessions.sealer).items():
            fields = resp.dynamic_metadata.fields[namespace].struct_value.fields
            for key, value in values.items():
                fields[key].string_value = value
        if self.req.message is not None:  # for the call histograms (extproc/access_log.py); bounded there
            resp.dynamic_metadata.fields[answer.NAMESPACE].struct_value.fields["method"].string_value = \
                self.req.message.method

    async def _end_cancelled(self) -> None:
        """The client cancelled this request: end it with an ImmediateResponse on this (still open) stream, which
        makes Envoy reset the upstream request; the client has stopped waiting for the answer."""
        client_id = self.plan.client_id if self.plan is not None else None
        await self._write(immediate(Local(200, cancellation.cancelled_body(client_id), {"content-type": JSON},
                                          details="muster_edge_cancelled")))

    def closed(self) -> None:
        """The ext_proc stream ended (its HTTP request is over): nothing of it is left to cancel."""
        if self._tracked is not None:
            self.gw.inflight.done(*self._tracked)
            self._tracked = None
        if self._watched is not None:
            self.gw.request_ended(self._watched)
            self._watched = None

    async def _response_headers(self, msg: ep.ProcessingRequest) -> ep.ProcessingResponse:
        resp = ep.ProcessingResponse()
        if self.plan is None:
            try:
                self.plan = self._answer_plan(msg)
            except answer.UnreadableAnswerContext as exc:
                return immediate(unreadable_context(exc))
        plan = self.plan
        if plan is None:
            resp.response_headers.SetInParent()
            return resp
        headers = dict(_pairs(msg.response_headers.headers))
        status = int(headers.get(":status", "200"))
        ctype = headers.get("content-type", "")
        self.gw.answer_complete(plan)  # this filter's cases all end the answer here (or with its buffered body)
        if status == 401 and plan.renewable:
            resend = answer.read_resend(_strings(msg, answer.RESEND_NAMESPACE), plan, self.gw.sessions.sealer)
            if resend is None:  # never the upstream's own 401 to the client
                return immediate(self.gw.error_for_upstream_status(plan, status, "the call could not be resent"))
            return immediate(await self._patient(self.gw.retry_refused(plan, resend)))
        if status == 401:  # a static or forwarded credential refused: the gateway's error, never the upstream's
            refused = self.gw.error_for_upstream_status(plan, status, "upstream refused the credential")
            refused.details = "muster_edge_upstream_refused_credential"  # also in Envoy's 5xx local-reply body
            return immediate(refused)
        if status == 404 and plan.upstream_session_owner:
            await self.gw.upstream_session_lost(plan)
            return immediate(self.gw.error_for_upstream_status(plan, status, "upstream session not found"))
        answered = "x-envoy-upstream-service-time" in headers
        readable = "json" in ctype or "event-stream" in ctype
        if status >= 500 and not answered:
            if not readable:
                return immediate(self.gw.error_for_upstream_status(plan, status, "no upstream answer"))
            self.gw.upstream_failed(plan, status)  # Envoy's own reply, already a JSON-RPC error (local_reply_config)
        elif status >= 500 and "json" not in ctype:
            return immediate(self.gw.error_for_upstream_status(plan, status, "upstream answered"))
        elif not readable and status != 202:
            return immediate(self.gw.invalid_answer(plan, f"HTTP {status}, content type {ctype[:60]!r}", status))
        elif 200 <= status < 300 and status != 202 and headers.get("content-length") == "0":
            return immediate(self.gw.invalid_answer(plan, "an empty body", status))
        elif status >= 400 and "json" in ctype:  # its body follows on this stream, to be mapped
            if status >= 500:
                self.gw.upstream_failed(plan, status)
            if status == 400 and plan.resend_on_mismatch:  # may be -32020: what a resend needs, for the body message
                self.resend = answer.read_resend(_strings(msg, answer.RESEND_NAMESPACE), plan, self.gw.sessions.sealer)
            self.error_status = status
            resp.response_headers.SetInParent()
            resp.mode_override.response_body_mode = pm.ProcessingMode.BUFFERED
            return resp
        resp.response_headers.SetInParent()
        return resp

    @staticmethod
    def _answer_plan(msg: ep.ProcessingRequest) -> ResponsePlan | None:
        return answer.read_plan(_strings(msg, answer.NAMESPACE))

    async def _response_body(self, msg: ep.ProcessingRequest) -> ep.ProcessingResponse:
        resp = ep.ProcessingResponse()
        common = resp.response_body.response
        body = msg.response_body
        if self.plan is None:
            # the answer filter's first message: SSE comes STREAMED (chunk by chunk), JSON BUFFERED (whole)
            try:
                self.plan = self._answer_plan(msg)
            except answer.UnreadableAnswerContext as exc:
                return immediate(unreadable_context(exc))
            if self.plan is not None and msg.protocol_config.response_body_mode == pm.ProcessingMode.STREAMED:
                self.sse = SseRewriter(self.plan, self.gw.fleet.view(self.plan.subject), self.gw.server_info)
        plan = self.plan
        if plan is None:
            resp.response_body.SetInParent()
            return resp
        if self.sse is not None:
            if body.end_of_stream:
                self.gw.answer_complete(plan)
            out = self.sse.feed(body.body, body.end_of_stream)
            if out:
                common.body_mutation.body = out
            else:
                common.body_mutation.clear_body = True
            return resp
        self.gw.answer_complete(plan)  # a whole (BUFFERED) body
        if self.error_status == 400 and plan.resend_on_mismatch:
            if self.resend is not None and is_header_mismatch(body.body):
                return immediate(await self._patient(self.gw.retry_mismatch(plan, self.resend, body.body)))
            if not plan.rewrite_body:  # asked for only in case it was -32020: any other 400 goes on as it came
                resp.response_body.SetInParent()
                return resp
        if self.error_status:
            status = self.error_status if self.error_status < 500 else 502
            return immediate(Local(status, mapped_error(body.body, plan, self.error_status), {"content-type": JSON},
                                   details="muster_edge_upstream_error"))
        try:
            msg = read_answer(body.body, plan)
        except Unreadable as exc:
            # this filter skips response headers, so they are on their way: the error replaces the body
            common.body_mutation.body = self.gw.invalid_answer(plan, str(exc)).body
            return resp
        new = rewrite_message(msg, plan, self.gw.fleet.view(plan.subject), self.gw.server_info)
        common.body_mutation.body = orjson.dumps(new)
        return resp
