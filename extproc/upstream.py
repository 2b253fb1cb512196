"""The processor's own calls to upstream MCP servers, always through Envoy's internal listener.

Egress belongs to Envoy: every call here is an HTTP request to the internal listener with the routing header
naming the upstream's cluster, so mTLS, circuit breakers and stats stay in one place. Speaks both eras:
`server/discover` first, `initialize` when the upstream is not modern.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import httpx2
import orjson

from catalog.manifests import MCPServer
from extproc import jsonrpc, tracing
from extproc.jsonrpc import LATEST_HANDSHAKE, LATEST_MODERN, LEGACY, MODERN

log = logging.getLogger(__name__)

ROUTE_HEADER = "x-muster-edge-cluster"
# set to "1" on a request safe to send twice: Envoy then also retries it once after a reset (envoy_config)
RETRY_HEADER = "x-muster-edge-retry"
# what the processor's own calls may repeat: reads (initialize opens a session; it is not repeated)
REPEATABLE = frozenset(("server/discover", "ping", "tools/list", "prompts/list", "resources/list",
                        "resources/templates/list", "resources/read", "prompts/get", "completion/complete"))
CLIENT_INFO = {"name": "muster-edge", "version": "0.1.0"}
MAX_PAGES = 100


def cluster_name(server: str) -> str:
    return f"mcp.{server}"


def origin_cluster_name(server: str) -> str:
    """An sse server's own address (the bridge's outbound calls); `mcp.<name>` is the bridge in front of it."""
    return f"mcp-origin.{server}"


class UpstreamError(Exception):
    """The upstream could not be reached or answered something that is not MCP."""


class UpstreamAuthError(UpstreamError):
    """The upstream refused the credential (HTTP 401/403)."""


class UpstreamRpcError(UpstreamError):
    """The upstream answered with a JSON-RPC error."""

    def __init__(self, code: int, message: str, data: Any = None) -> None:
        super().__init__(f"{message} ({code})")
        self.code = code
        self.message = message
        self.data = data


@dataclass
class Handshake:
    """What the gateway negotiated with one upstream."""

    era: str
    version: str
    session_id: str = ""
    capabilities: dict[str, Any] = field(default_factory=dict)
    instructions: str = ""
    server_info: dict[str, Any] = field(default_factory=dict)
    ttl_ms: int | None = None
    auth: dict[str, str] = field(default_factory=dict)
    shared_owner: str = ""  # in the store under this gateway session (extproc/continuity.py): shared by processes


def _sse_messages(text: str) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    data: list[str] = []
    for line in [*text.splitlines(), ""]:
        if not line:
            if data:
                try:
                    msg = orjson.loads("\n".join(data))
                except orjson.JSONDecodeError:
                    msg = None
                if isinstance(msg, dict):
                    out.append(msg)
                data = []
        elif line.startswith("data:"):
            data.append(line[5:].lstrip(" ") if line.startswith("data: ") else line[5:])
    return out


class UpstreamClient:
    def __init__(self, internal: str) -> None:
        self._http = httpx2.AsyncClient(
            base_url=f"http://{internal}",
            timeout=httpx2.Timeout(30.0),
            limits=httpx2.Limits(max_connections=256, max_keepalive_connections=64),
        )
        self._ids = itertools.count(1)

    async def aclose(self) -> None:
        await self._http.aclose()

    def headers(self, server: MCPServer, *, era: str, version: str, session_id: str = "", method: str = "",
                name: str | None = None, auth: Mapping[str, str] | None = None) -> dict[str, str]:
        out = {
            "host": server.authority,
            ROUTE_HEADER: cluster_name(server.name),
            "accept": "application/json, text/event-stream",
            "content-type": "application/json",
            "mcp-protocol-version": version,
        }
        out.update(auth or {})
        if method in REPEATABLE:
            out[RETRY_HEADER] = "1"
        if era == MODERN and method:
            out["mcp-method"] = method
            if name is not None:
                out["mcp-name"] = jsonrpc.encode_header_value(name)
        if session_id:
            out["mcp-session-id"] = session_id
        return out

    async def _post(self, server: MCPServer, body: dict[str, Any], headers: dict[str, str],
                    timeout: float | None) -> httpx2.Response:
        if tracing.ON:
            tracing.inject(headers)
        try:
            return await self._http.post(server.path, content=orjson.dumps(body), headers=headers,
                                         timeout=timeout or float(server.timeout))
        except httpx2.TimeoutException as exc:
            raise UpstreamError(f"timed out after {timeout or server.timeout}s") from exc
        except httpx2.HTTPError as exc:
            raise UpstreamError(f"unreachable: {type(exc).__name__}") from exc

    async def request(self, server: MCPServer, hs: Handshake, method: str, params: dict[str, Any] | None = None,
                      *, timeout: float | None = None) -> tuple[dict[str, Any], httpx2.Response]:
        """One JSON-RPC request; returns the result object (raises on a JSON-RPC error)."""
        params = dict(params or {})
        if hs.era == MODERN:
            meta = dict(params.get("_meta") or {})
            meta.update({jsonrpc.META_VERSION: hs.version, jsonrpc.META_CAPABILITIES: {},
                         jsonrpc.META_CLIENT_INFO: CLIENT_INFO})
            params["_meta"] = meta
        msg_id = next(self._ids)
        key = jsonrpc.NAME_BEARING.get(method)
        headers = self.headers(server, era=hs.era, version=hs.version, session_id=hs.session_id, method=method,
                               name=params.get(key) if key else None, auth=hs.auth)
        resp = await self._post(server, {"jsonrpc": "2.0", "id": msg_id, "method": method, "params": params},
                                headers, timeout)
        return self._answer(resp, msg_id), resp

    @staticmethod
    def answer(resp: httpx2.Response, msg_id: int) -> dict[str, Any]:
        """The result of request `msg_id` in an upstream's answer (JSON or SSE); raises on a JSON-RPC error."""
        return UpstreamClient._answer(resp, msg_id)

    @staticmethod
    def _answer(resp: httpx2.Response, msg_id: int) -> dict[str, Any]:
        if resp.status_code in (401, 403):
            raise UpstreamAuthError(f"HTTP {resp.status_code}: the upstream refused the credential")
        ctype = resp.headers.get("content-type", "")
        messages: list[dict[str, Any]] = []
        if "text/event-stream" in ctype:
            messages = _sse_messages(resp.text)
        elif "json" in ctype:
            try:
                parsed = orjson.loads(resp.content)
            except orjson.JSONDecodeError:
                parsed = None
            if isinstance(parsed, dict):
                messages = [parsed]
        for msg in messages:
            if msg.get("id") == msg_id or ("error" in msg and msg.get("id") is None):
                if "error" in msg and isinstance(msg["error"], dict):
                    err = msg["error"]
                    raise UpstreamRpcError(int(err.get("code", jsonrpc.INTERNAL_ERROR)), str(err.get("message", "")),
                                           err.get("data"))
                result = msg.get("result")
                if isinstance(result, dict):
                    return result
        snippet = resp.text[:120].replace("\n", " ") if resp.content else ""
        raise UpstreamError(f"HTTP {resp.status_code} without a JSON-RPC answer {snippet!r}".rstrip())

    async def raw_post(self, server: MCPServer, body: bytes, headers: Mapping[str, str]) -> tuple[int, str, bytes]:
        """Send a prepared request as it is and return (status, content type, body): for one retry."""
        out = dict(headers)
        out["host"] = server.authority
        out[ROUTE_HEADER] = cluster_name(server.name)
        if tracing.ON:
            tracing.inject(out)
        try:
            resp = await self._http.post(server.path, content=body, headers=out, timeout=float(server.timeout))
        except httpx2.TimeoutException as exc:
            raise UpstreamError(f"timed out after {server.timeout}s") from exc
        except httpx2.HTTPError as exc:
            raise UpstreamError(f"unreachable: {type(exc).__name__}") from exc
        return resp.status_code, resp.headers.get("content-type", "application/json"), resp.content

    async def notify(self, server: MCPServer, hs: Handshake, method: str, params: dict[str, Any] | None = None) -> None:
        headers = self.headers(server, era=hs.era, version=hs.version, session_id=hs.session_id, auth=hs.auth)
        body: dict[str, Any] = {"jsonrpc": "2.0", "method": method}
        if params:
            body["params"] = params
        await self._post(server, body, headers, None)

    async def probe(self, server: MCPServer, auth: Mapping[str, str] | None = None) -> Handshake:
        """Learn the upstream's era: a modern DiscoverResult keeps it modern, anything else means initialize."""
        modern = Handshake(era=MODERN, version=LATEST_MODERN, auth=dict(auth or {}))
        try:
            result, _ = await self.request(server, modern, "server/discover")
        except UpstreamAuthError:
            raise
        except UpstreamRpcError:
            result = {}
        except UpstreamError as exc:
            if "unreachable" in str(exc) or "timed out" in str(exc):
                raise
            result = {}
        versions = result.get("supportedVersions") or []
        if LATEST_MODERN in versions:
            meta = result.get("_meta") or {}
            return Handshake(era=MODERN, version=LATEST_MODERN, capabilities=result.get("capabilities") or {},
                             instructions=result.get("instructions") or "",
                             server_info=meta.get(jsonrpc.META_SERVER_INFO) or {}, ttl_ms=result.get("ttlMs"),
                             auth=dict(auth or {}))
        return await self.initialize(server, auth=auth)

    async def initialize(self, server: MCPServer, capabilities: dict[str, Any] | None = None,
                         log_level: str = "", auth: Mapping[str, str] | None = None) -> Handshake:
        """Open a handshake-era session, declaring the capabilities of the client it serves (if any)."""
        params = {"protocolVersion": LATEST_HANDSHAKE, "capabilities": capabilities or {}, "clientInfo": CLIENT_INFO}
        headers = self.headers(server, era=LEGACY, version=LATEST_HANDSHAKE, auth=auth)
        del headers["mcp-protocol-version"]
        msg_id = next(self._ids)
        resp = await self._post(server, {"jsonrpc": "2.0", "id": msg_id, "method": "initialize", "params": params},
                                headers, None)
        result = self._answer(resp, msg_id)
        version = str(result.get("protocolVersion") or LATEST_HANDSHAKE)
        if version not in jsonrpc.HANDSHAKE_VERSIONS:
            raise UpstreamError(f"upstream negotiated an unknown protocol version {version!r}")
        hs = Handshake(era=LEGACY, version=version, session_id=resp.headers.get("mcp-session-id", ""),
                       capabilities=result.get("capabilities") or {}, instructions=result.get("instructions") or "",
                       server_info=result.get("serverInfo") or {}, auth=dict(auth or {}))
        await self.notify(server, hs, "notifications/initialized")
        if log_level and "logging" in hs.capabilities:
            await self.request(server, hs, "logging/setLevel", {"level": log_level})
        return hs

    async def list_all(self, server: MCPServer, hs: Handshake, method: str, key: str) -> tuple[list[dict[str, Any]],
                                                                                           int | None]:
        """Every page of one list, in the upstream's order, and the smallest ttlMs it gave."""
        items: list[dict[str, Any]] = []
        ttls: list[int] = []
        cursor: str | None = None
        for _ in range(MAX_PAGES):
            params: dict[str, Any] = {} if cursor is None else {"cursor": cursor}
            result, _ = await self.request(server, hs, method, params)
            page = result.get(key) or []
            items.extend(i for i in page if isinstance(i, dict))
            if isinstance(result.get("ttlMs"), int):
                ttls.append(result["ttlMs"])
            cursor = result.get("nextCursor")
            if cursor is None:
                break
        return items, (min(ttls) if ttls else None)

    async def delete_session(self, server: MCPServer, hs: Handshake) -> None:
        headers = self.headers(server, era=LEGACY, version=hs.version, session_id=hs.session_id, auth=hs.auth)
        try:
            await self._http.delete(server.path, headers=headers, timeout=5.0)
        except httpx2.HTTPError as exc:
            log.info("ending upstream session on %s failed: %s", server.name, type(exc).__name__)

    async def events(self, server: MCPServer, hs: Handshake,
                     uris: Sequence[str] = ()) -> AsyncIterator[dict[str, Any]]:
        """Server-to-client notifications about lists: the legacy GET stream or a modern subscriptions/listen
        (which also names the resource URIs to follow; a legacy session subscribes to those itself)."""
        headers = self.headers(server, era=hs.era, version=hs.version, session_id=hs.session_id, auth=hs.auth)
        headers["accept"] = "text/event-stream" if hs.era == LEGACY else "application/json, text/event-stream"
        if hs.era == LEGACY:
            request = self._http.build_request("GET", server.path, headers=headers, timeout=httpx2.Timeout(None))
        else:
            params = {"notifications": {"toolsListChanged": True, "promptsListChanged": True,
                                        "resourcesListChanged": True, **({"resourceSubscriptions": list(uris)}
                                                                         if uris else {})},
                      "_meta": {jsonrpc.META_VERSION: hs.version, jsonrpc.META_CAPABILITIES: {},
                                jsonrpc.META_CLIENT_INFO: CLIENT_INFO}}
            headers["mcp-method"] = "subscriptions/listen"
            body = {"jsonrpc": "2.0", "id": next(self._ids), "method": "subscriptions/listen", "params": params}
            request = self._http.build_request("POST", server.path, headers=headers, content=orjson.dumps(body),
                                               timeout=httpx2.Timeout(None))
        resp = await self._http.send(request, stream=True)
        try:
            if resp.status_code != 200 or "text/event-stream" not in resp.headers.get("content-type", ""):
                raise UpstreamError(f"no event stream (HTTP {resp.status_code})")
            data: list[str] = []
            async for line in resp.aiter_lines():
                if line.startswith("data:"):
                    data.append(line[5:].lstrip(" "))
                elif not line and data:
                    try:
                        msg = orjson.loads("\n".join(data))
                    except orjson.JSONDecodeError:
                        msg = None
                    data = []
                    if isinstance(msg, dict):
                        yield msg
        finally:
            await resp.aclose()
