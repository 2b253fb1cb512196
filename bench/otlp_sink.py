"""A stand-in OpenTelemetry collector for the tracing benchmark: OTLP/gRPC TraceService that counts what it gets.

    python -m bench.otlp_sink --port 0      # prints `READY <grpc port> <stats port>`

No collector binary installs here. It runs as its own process so decoding the spans it receives costs the load
driver nothing; `GET http://127.0.0.1:<stats port>/` answers {"spans": N, "exports": M, "services": {...}}.
"""

from __future__ import annotations

import argparse
import http.server
import json
import signal
import threading
from collections import Counter
from concurrent import futures
from typing import Any

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc


class Sink(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self) -> None:
        self.services: Counter[str] = Counter()
        self.exports = 0
        self.lock = threading.Lock()

    def Export(self, request: Any, context: Any) -> Any:
        got: Counter[str] = Counter()
        for rs in request.resource_spans:
            service = next((a.value.string_value for a in rs.resource.attributes if a.key == "service.name"), "")
            got[service] += sum(len(ss.spans) for ss in rs.scope_spans)
        with self.lock:
            self.services.update(got)
            self.exports += 1
        return trace_service_pb2.ExportTraceServiceResponse()

    def stats(self) -> dict[str, Any]:
        with self.lock:
            return {"spans": sum(self.services.values()), "exports": self.exports, "services": dict(self.services)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args()
    sink = Sink()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(sink, server)
    port = server.add_insecure_port(f"127.0.0.1:{args.port}")
    server.start()

    class Stats(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = json.dumps(sink.stats()).encode()
            self.send_response(200)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    stats = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Stats)
    threading.Thread(target=stats.serve_forever, daemon=True).start()
    print(f"READY {port} {stats.server_address[1]}", flush=True)
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    signal.signal(signal.SIGINT, lambda *_: done.set())
    done.wait()
    server.stop(None)


if __name__ == "__main__":
    main()
