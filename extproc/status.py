"""The processor's status endpoint: GET /status (JSON), GET /metrics (Prometheus, this worker), GET /metrics/all
(every worker of this gateway, read from the siblings' status ports at scrape time), GET /healthz.

/healthz is open (probes). /status and /metrics answer a loopback peer, or anyone who sends the `statusToken`
as a bearer; everyone else gets 401. /status never names a user: per-user states are counted, not listed.
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import logging
import os
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any

import orjson

from catalog.config import GatewayConfig
from extproc.credentials import SecretFiles
from extproc.metrics import merge_workers

log = logging.getLogger(__name__)

_MAX_HEADER_LINES = 100
Stream = Callable[[dict[str, str], asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]
_UNAUTHORIZED = b"the status endpoint needs the statusToken as a bearer, or a loopback peer\n"


def status_token(config: GatewayConfig) -> Callable[[], str]:
    """The statusToken as it is now (a mounted Secret may be rotated: the file is re-read when it changes)."""
    if config.status_token_file:
        files = SecretFiles("")
        path = config.status_token_file

        def from_file() -> str:
            try:
                return files.read_file(path)
            except OSError as exc:
                log.error("statusToken file %s unreadable: %s", path, exc.strerror)
                return ""
        return from_file
    if config.status_token_env:
        name = config.status_token_env
        return lambda: os.environ.get(name, "")
    return lambda: ""


def is_loopback(peer: Any) -> bool:
    """True for a peer address in 127.0.0.0/8 or ::1 (also as an IPv4-mapped IPv6 address)."""
    try:
        host = peer[0] if isinstance(peer, tuple) else ""
        address = ipaddress.ip_address(str(host).split("%", 1)[0])
    except (ValueError, IndexError):
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return address.is_loopback


def authorized(peer: Any, authorization: str, token: str) -> bool:
    if is_loopback(peer):
        return True
    scheme, _, presented = authorization.partition(" ")
    return bool(token) and scheme.lower() == "bearer" and hmac.compare_digest(presented.strip().encode(),
                                                                              token.encode())


def redact(status: dict[str, Any]) -> dict[str, Any]:
    """No subject leaves the status endpoint: a per-user server's `users` becomes a count of users by state."""
    servers = []
    for entry in status.get("servers", []):
        users = entry.get("users")
        if isinstance(users, dict):
            entry = {**entry, "users": dict(Counter(str(state) for state in users.values()))}
        servers.append(entry)
    return {**status, "servers": servers}


async def serve_status(host: str, port: int, status: Callable[[], dict[str, Any]],
                       metrics: Callable[[], str] = lambda: "",
                       peer: Callable[[bytes], tuple[int, bytes]] | None = None,
                       token: Callable[[], str] = lambda: "",
                       all_metrics: Callable[[], Awaitable[str]] | None = None,
                       stream: Stream | None = None) -> asyncio.Server:
    """`peer` answers `POST /peer`: messages from sibling workers, sealed with the session key (extproc/peers.py),
    so they need no statusToken. `/metrics` is this worker's; `/metrics/all` (`all_metrics`) every worker's.
    `stream` serves `/notify` (extproc/notify.py: Envoy's listening streams, each with a sealed ticket the endpoint
    checks itself), for as long as the stream lasts."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            line = await asyncio.wait_for(reader.readline(), 5)
            authorization = ""
            length = 0
            headers: dict[str, str] = {}
            for _ in range(_MAX_HEADER_LINES):
                header = await asyncio.wait_for(reader.readline(), 5)
                if header in (b"\r\n", b"\n", b""):
                    break
                name, _, value = header.decode("latin-1").partition(":")
                headers[name.strip().lower()] = value.strip()
                if name.strip().lower() == "authorization":
                    authorization = value.strip()
                elif name.strip().lower() == "content-length" and value.strip().isdigit():
                    length = int(value.strip())
            parts = line.decode("latin-1").split()
            path = parts[1].split("?", 1)[0] if len(parts) > 1 else "/"
            extra = ""
            if path == "/notify" and stream is not None:
                await stream(headers, reader, writer)
                return
            if parts and parts[0] == "POST" and path == "/peer" and peer is not None and 0 < length <= 1 << 20:
                code, body = peer(await asyncio.wait_for(reader.readexactly(length), 5))
                ctype = "application/json"
            elif path == "/healthz":
                code, body, ctype = 200, b"ok\n", "text/plain"
            elif path not in ("/status", "/metrics", "/metrics/all") or (path == "/metrics/all" and
                                                                          all_metrics is None):
                code, body, ctype = 404, b"not found\n", "text/plain"
            elif not authorized(writer.get_extra_info("peername"), authorization, token()):
                code, body, ctype = 401, _UNAUTHORIZED, "text/plain"
                extra = 'www-authenticate: Bearer realm="muster-edge-status"\r\n'
            elif path == "/status":
                code, body, ctype = 200, orjson.dumps(redact(status()), option=orjson.OPT_INDENT_2), \
                    "application/json"
            elif path == "/metrics/all" and all_metrics is not None:
                code, body, ctype = 200, (await all_metrics()).encode(), "text/plain; version=0.0.4"
            else:
                code, body, ctype = 200, metrics().encode(), "text/plain; version=0.0.4"
            writer.write(f"HTTP/1.1 {code} X\r\ncontent-type: {ctype}\r\ncontent-length: {len(body)}\r\n{extra}"
                         "cache-control: no-store\r\nconnection: close\r\n\r\n".encode() + body)
            await writer.drain()
        # ValueError: a line over the reader's limit
        except (TimeoutError, ConnectionError, ValueError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    # a listening stream's ticket carries the caller's groups: lines up to 1 MiB
    return await asyncio.start_server(handle, host, port, limit=1 << 20)


def workers_metrics(config: GatewayConfig, status_port: int,
                    own: Callable[[], str]) -> Callable[[], Awaitable[str]]:
    """GET /metrics/all: every worker's /metrics in one exposition, each sample labelled with its worker (its
    index from the first status port), read from the siblings' status ports at scrape time."""
    first = config.status_listen.port
    host = config.status_listen.host
    host = "127.0.0.1" if host in ("0.0.0.0", "") else "::1" if host in ("::", "[::]") else host.strip("[]")
    token = status_token(config)

    async def scrape() -> str:
        ports = [first + i for i in range(config.workers)] if first <= status_port < first + config.workers \
            else [status_port]
        others = [p for p in ports if p != status_port]
        texts = await asyncio.gather(*(fetch_metrics(host, p, token()) for p in others))
        found: dict[str, str | None] = {str(p - first): t for p, t in zip(others, texts, strict=True)}
        found[str(max(0, status_port - first))] = own()
        return merge_workers(found)

    return scrape


async def fetch_metrics(host: str, port: int, token: str, timeout: float = 2.0) -> str | None:
    """One sibling worker's /metrics (None if it does not answer in time: a frozen or restarting worker)."""
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout)
    except (OSError, TimeoutError):
        return None
    try:
        auth = f"authorization: Bearer {token}\r\n" if token else ""
        writer.write(f"GET /metrics HTTP/1.1\r\nhost: {host}\r\n{auth}connection: close\r\n\r\n".encode())
        raw = await asyncio.wait_for(reader.read(), timeout)
    except (OSError, TimeoutError):
        return None
    finally:
        writer.close()
    head, _, body = raw.partition(b"\r\n\r\n")
    return body.decode("utf-8", "replace") if head.startswith(b"HTTP/1.1 200") else None
