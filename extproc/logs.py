"""Log lines as text or as one JSON object per line, tagged with the HTTP request they belong to.

Each ext_proc stream runs in a task of its own, so a context variable set once per stream tags every line
logged while handling it, with no per-message cost: the request id, method and server are read only when a
line is actually written. Values come from what the gateway already parsed; a header, a token or a tool's
arguments are never copied into a line.
"""

from __future__ import annotations

import contextvars
import logging
import sys
import threading
import time
from collections.abc import Callable
from types import TracebackType
from typing import IO, Any

import orjson

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
# Envoy's own lines in the same shape (its --log-format; %j is the message, JSON-escaped)
ENVOY_JSON_FORMAT = ('{"time":"%Y-%m-%dT%T.%eZ","level":"%l","logger":"envoy.%n","message":"%j",'
                     '"thread":"%t"}')

# () -> (request id, JSON-RPC method, server) of the request being handled, read only when a line is written
RequestFacts = Callable[[], tuple[str, str, str]]
_current: contextvars.ContextVar[RequestFacts | None] = contextvars.ContextVar("muster_edge_request", default=None)


# () -> the current trace id; set by extproc/tracing.py when tracing is on (this module imports no tracing)
_trace_ids: Callable[[], str] | None = None


def set_trace_ids(source: Callable[[], str] | None) -> None:
    """With tracing on, JSON lines carry the trace id of the request they were written for."""
    global _trace_ids
    _trace_ids = source


def tag_request(facts: RequestFacts) -> None:
    """Tag the lines the current task writes from now on (call once per ext_proc stream)."""
    _current.set(facts)


def request_facts() -> tuple[str, str, str]:
    facts = _current.get()
    return facts() if facts is not None else ("", "", "")


class JsonFormatter(logging.Formatter):
    """level, time, logger, message, request_id, server, method (and trace_id with tracing on); an audit line
    keeps its own fields."""

    def format(self, record: logging.LogRecord) -> str:
        request_id, method, server = request_facts()
        line: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            line["message"] = str(fields.get("event", "audit"))
            line.update({k: v for k, v in fields.items() if k not in line})
        if request_id:
            line["request_id"] = request_id
        if method and "method" not in line:
            line["method"] = method
        if server and not line.get("server"):
            line["server"] = server
        if _trace_ids is not None:
            trace_id = _trace_ids()
            if trace_id:
                line["trace_id"] = trace_id
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return orjson.dumps(line).decode()


def configure(fmt: str = "text", level: str = "INFO") -> None:
    """Replace the root handler: every logger of ours (and of our libraries) writes in this one format."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(TEXT_FORMAT))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    logging.getLogger("httpx2").setLevel(logging.WARNING)
    if fmt == "json":  # what Python would write to stderr itself goes through the same format
        logging.captureWarnings(True)
        sys.excepthook = _log_uncaught
        threading.excepthook = lambda args: _log_uncaught(args.exc_type, args.exc_value, args.exc_traceback)


def _log_uncaught(exc_type: type[BaseException], exc: BaseException | None, tb: TracebackType | None) -> None:
    if exc is not None and not issubclass(exc_type, KeyboardInterrupt):
        logging.getLogger("muster_edge").critical("uncaught exception", exc_info=(exc_type, exc, tb))


AUDIT_LOGGER = "muster_edge.audit"


class BatchingHandler(logging.Handler):
    """Formats each line where it is logged (the request it belongs to is known only there) and writes them in
    batches: one write and one flush per `max_lines` lines or `max_delay_s`, not one per line.

    At 4,000 audited calls/s a line-by-line stderr handler is a system call per call on the event loop; here the
    write happens at most every `max_delay_s` (from the next line logged, or from `flush()`, which the processor
    calls on a timer and logging calls at exit). A record marked `urgent` (a refusal) is written at once, with
    whatever waited before it."""

    def __init__(self, stream: IO[str], max_lines: int = 512, max_delay_s: float = 0.25) -> None:
        super().__init__()
        self.stream = stream
        self.max_lines = max_lines
        self.max_delay_s = max_delay_s
        self._lines: list[str] = []
        self._since = 0.0
        self._lock_write = threading.Lock()

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record)
        except Exception:
            self.handleError(record)
            return
        if not self._lines:
            self._since = time.monotonic()
        self._lines.append(line)
        if getattr(record, "urgent", False) or len(self._lines) >= self.max_lines \
                or time.monotonic() - self._since >= self.max_delay_s:
            self.flush()

    def flush(self) -> None:
        with self._lock_write:
            lines, self._lines = self._lines, []
            if not lines:
                return
            try:
                self.stream.write("\n".join(lines) + "\n")
                self.stream.flush()
            except (OSError, ValueError):
                pass  # a closed stream at exit: nothing left to tell


def configure_audit(extra_streams: list[IO[str]] | None = None) -> list[BatchingHandler]:
    """Audit lines through batching handlers (stderr, in the root handler's format, and any file), not through
    the root handler line by line. Returns the handlers, for the processor's flush timer."""
    audit = logging.getLogger(AUDIT_LOGGER)
    root = logging.getLogger()
    formatter = root.handlers[0].formatter if root.handlers else logging.Formatter(TEXT_FORMAT)
    handlers = [BatchingHandler(sys.stderr)]
    handlers[0].setFormatter(formatter)
    for stream in extra_streams or []:
        handler = BatchingHandler(stream)
        handler.setFormatter(logging.Formatter("%(message)s"))
        handlers.append(handler)
    for handler in handlers:
        audit.addHandler(handler)
    audit.propagate = False
    return handlers
