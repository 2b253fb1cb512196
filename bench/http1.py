"""Just enough HTTP/1.1 framing for the benchmark's load driver and its fast upstream.

Both sides of a benchmark must cost as little CPU as possible on a 2-core machine that also runs Envoy and the
processor, so neither uses a general HTTP library on the hot path: requests are pre-rendered bytes, and this
incremental parser only finds where one message ends (Content-Length or chunked) and hands back its parts.
"""

from __future__ import annotations

from dataclasses import dataclass, field

_CRLF = b"\r\n"
_HEAD_END = b"\r\n\r\n"


class FramingError(ValueError):
    """The peer sent something this minimal parser does not understand; the connection is unusable."""


@dataclass
class Message:
    """One parsed request or response. `first` is the start line split in three (method/path/version or
    version/status/reason); header names are lower-cased, a repeated header keeps its last value."""

    first: tuple[str, str, str]
    headers: dict[str, str]
    body: bytes = b""

    @property
    def status(self) -> int:
        return int(self.first[1])

    @property
    def method(self) -> str:
        return self.first[0]

    @property
    def path(self) -> str:
        return self.first[1]


@dataclass
class _Pending:
    message: Message
    length: int = -1  # Content-Length, or -1 for chunked
    chunks: list[bytes] = field(default_factory=list)


class Parser:
    """Feed bytes as they arrive; `feed` returns every message completed so far, in order.

    A request without Content-Length or chunked encoding has no body; so has a 1xx, 204 or 304 response. Any
    other response must be framed (the benchmark never reads until close).
    """

    def __init__(self, *, responses: bool) -> None:
        self._responses = responses
        self._buf = bytearray()
        self._pos = 0
        self._pending: _Pending | None = None

    def feed(self, data: bytes) -> list[Message]:
        self._buf += data
        out: list[Message] = []
        while True:
            message = self._next()
            if message is None:
                break
            out.append(message)
        if self._pos:
            del self._buf[: self._pos]
            self._pos = 0
        return out

    def _next(self) -> Message | None:
        if self._pending is None:
            end = self._buf.find(_HEAD_END, self._pos)
            if end < 0:
                if len(self._buf) - self._pos > 256 * 1024:
                    raise FramingError("header block larger than 256 KiB")
                return None
            self._pending = self._head(bytes(self._buf[self._pos : end]))
            self._pos = end + 4
        pending = self._pending
        if pending.length >= 0:
            if len(self._buf) - self._pos < pending.length:
                return None
            pending.message.body = bytes(self._buf[self._pos : self._pos + pending.length])
            self._pos += pending.length
        elif not self._chunked(pending):
            return None
        self._pending = None
        return pending.message

    def _head(self, raw: bytes) -> _Pending:
        lines = raw.decode("latin-1").split("\r\n")
        parts = lines[0].split(" ", 2)
        if len(parts) < 2:
            raise FramingError(f"bad start line {lines[0]!r}")
        first = (parts[0], parts[1], parts[2] if len(parts) > 2 else "")
        headers: dict[str, str] = {}
        for line in lines[1:]:
            name, sep, value = line.partition(":")
            if not sep:
                raise FramingError(f"bad header line {line!r}")
            headers[name.strip().lower()] = value.strip()
        message = Message(first, headers)
        if "chunked" in headers.get("transfer-encoding", "").lower():
            return _Pending(message, -1)
        if "content-length" in headers:
            return _Pending(message, int(headers["content-length"]))
        if self._responses and not (first[1].startswith("1") or first[1] in ("204", "304")):
            raise FramingError("response without Content-Length or chunked encoding (read-until-close unsupported)")
        return _Pending(message, 0)

    def _chunked(self, pending: _Pending) -> bool:
        """Consume whole chunks from the buffer; True once the terminating chunk and trailers are in."""
        buf = self._buf
        while True:
            line_end = buf.find(_CRLF, self._pos)
            if line_end < 0:
                return False
            size_text = bytes(buf[self._pos : line_end]).split(b";", 1)[0].strip()
            try:
                size = int(size_text, 16)
            except ValueError as exc:
                raise FramingError(f"bad chunk size {size_text!r}") from exc
            if size == 0:
                trailer_end = buf.find(_HEAD_END, line_end)  # at line_end itself when there are no trailers
                if trailer_end < 0:
                    return False
                self._pos = trailer_end + 4
                pending.message.body = b"".join(pending.chunks)
                return True
            data_start = line_end + 2
            if len(buf) < data_start + size + 2:
                return False
            pending.chunks.append(bytes(buf[data_start : data_start + size]))
            self._pos = data_start + size + 2


def render_request(method: str, path: str, headers: dict[str, str], body: bytes = b"") -> bytes:
    """One request as wire bytes, with the Content-Length that matches `body`."""
    lines = [f"{method} {path} HTTP/1.1"]
    lines.extend(f"{name}: {value}" for name, value in headers.items())
    if body or method in ("POST", "PUT", "PATCH"):
        lines.append(f"content-length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def render_response(status: int, headers: list[tuple[bytes, bytes]], body: bytes) -> bytes:
    """One complete response with Content-Length (the fast upstream never streams except for SSE)."""
    out = [b"HTTP/1.1 %d %s" % (status, _REASONS.get(status, b"OK"))]
    out.extend(name + b": " + value for name, value in headers)
    out.append(b"content-length: %d" % len(body))
    return b"\r\n".join(out) + b"\r\n\r\n" + body


_REASONS = {200: b"OK", 202: b"Accepted", 400: b"Bad Request", 404: b"Not Found", 405: b"Method Not Allowed"}
