"""What a handler decides for one HTTP request: answer at the edge, or forward upstream (and how)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from extproc import jsonrpc
from extproc.jsonrpc import RpcError

JSON = "application/json"


@dataclass
class Local:
    """An answer built at the edge (Envoy sends it as an ImmediateResponse)."""

    status: int
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)
    details: str = "muster_edge"

    @classmethod
    def error(cls, err: RpcError, era: str, msg_id: Any = None) -> Local:
        return cls(err.http_status(era), jsonrpc.error_body(msg_id, err.code, err.message, err.data),
                   {"content-type": JSON}, details=f"muster_edge_error_{-err.code}")

    @classmethod
    def result(cls, msg_id: Any, result: Any, headers: dict[str, str] | None = None) -> Local:
        return cls(200, jsonrpc.result_body(msg_id, result), {"content-type": JSON, **(headers or {})})

    @classmethod
    def raw_result(cls, msg_id: Any, result_json: bytes, headers: dict[str, str] | None = None) -> Local:
        """A result already serialised once (cached list pages): only the id is spliced in."""
        body = b'{"jsonrpc":"2.0","id":' + jsonrpc.dumps(msg_id) + b',"result":' + result_json + b"}"
        return cls(200, body, {"content-type": JSON, **(headers or {})})


@dataclass
class ResponsePlan:
    """How the upstream's answer must be changed on its way back (None fields: leave as is)."""

    server: str
    client_id: Any = None
    restore_id: bool = False
    modern_client: bool = False
    map_uris: bool = False
    rewrite_body: bool = False
    upstream_session_owner: str = ""
    namespace: str = ""
    renewable: bool = False
    subject: str = ""
    upstream_id: Any = None  # the id the upstream must answer (None: no answer to check, e.g. a resumed stream)
    resend_on_mismatch: bool = False  # a 2026-07-28 tools/call: an upstream -32020 refetches its tools, resends once

    @property
    def rewrite_sse(self) -> bool:
        """SSE is rewritten also to namespace event ids and server-to-client request ids (legacy clients)."""
        return self.rewrite_body or bool(self.namespace)


@dataclass
class Forward:
    """Route the request upstream with this body and these header changes."""

    cluster: str
    body: bytes
    set_headers: dict[str, str]
    remove_headers: list[str]
    plan: ResponsePlan
    credential_keys: tuple[str, ...] = ()  # which of set_headers carry the upstream credential
