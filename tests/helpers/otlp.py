"""A real OTLP trace receiver, in the test's process: OTLP/HTTP (protobuf, POST /v1/traces) and
OTLP/gRPC (``opentelemetry.proto.collector.trace.v1.TraceService``), decoded with
opentelemetry-proto's own message types, so what the tests read is what the SDK's real exporter
sent over the wire. Tests wait on its condition for the spans they expect, never sleep.

Also runnable on its own (bench/tracing.py): ``python tests/helpers/otlp.py --port N`` counts
what it receives until SIGTERM, then prints the count.
"""

from __future__ import annotations

import argparse
import gzip
import signal
import threading
import time
import zlib
from collections.abc import Callable
from concurrent import futures
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2 as pb
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2_grpc as pb_grpc
from opentelemetry.proto.common.v1.common_pb2 import AnyValue

LOOPBACK = "127.0.0.1"
KINDS = {0: "unspecified", 1: "internal", 2: "server", 3: "client", 4: "producer",
         5: "consumer"}


def _value(v: AnyValue) -> Any:
    kind = v.WhichOneof("value")
    if kind == "array_value":
        return [_value(x) for x in v.array_value.values]
    return getattr(v, kind) if kind else None


@dataclass
class Span:
    trace_id: str
    span_id: str
    parent_span_id: str
    name: str
    kind: str
    start_ns: int
    end_ns: int
    status: int  # 0 unset, 1 ok, 2 error
    attributes: dict[str, Any]
    links: list[tuple[str, str]]  # (trace_id, span_id)
    resource: dict[str, Any] = field(default_factory=dict)


def spans_of(request: pb.ExportTraceServiceRequest) -> list[Span]:
    out = []
    for rs in request.resource_spans:
        resource = {a.key: _value(a.value) for a in rs.resource.attributes}
        for ss in rs.scope_spans:
            for s in ss.spans:
                out.append(Span(
                    s.trace_id.hex(), s.span_id.hex(), s.parent_span_id.hex(), s.name,
                    KINDS.get(s.kind, str(s.kind)), s.start_time_unix_nano,
                    s.end_time_unix_nano, s.status.code,
                    {a.key: _value(a.value) for a in s.attributes},
                    [(link.trace_id.hex(), link.span_id.hex()) for link in s.links], resource))
    return out


class Receiver:
    """Collects every span either endpoint receives (or, with ``keep=False``, decodes and
    counts them, as a collector would, keeping none)."""

    def __init__(self, keep: bool = True) -> None:
        self.keep = keep
        self.spans: list[Span] = []
        self.count = 0
        self.requests = 0
        self.raw: list[bytes] = []  # the bodies as sent (to grep for secrets)
        self._changed = threading.Condition()

    def add(self, request: pb.ExportTraceServiceRequest, raw: bytes) -> None:
        spans = spans_of(request)
        with self._changed:
            self.requests += 1
            self.count += len(spans)
            if self.keep:
                self.raw.append(raw)
                self.spans.extend(spans)
            self._changed.notify_all()

    def wait_for(self, check: Callable[[list[Span]], bool], timeout_s: float = 20.0,
                 what: str = "the spans") -> list[Span]:
        with self._changed:
            if not self._changed.wait_for(lambda: check(self.spans), timeout_s):
                names = sorted({s.name for s in self.spans})
                raise AssertionError(f"no {what} within {timeout_s} s; received {names}")
            return list(self.spans)

    def clear(self) -> None:
        with self._changed:
            self.spans.clear()
            self.raw.clear()


class _Handler(BaseHTTPRequestHandler):
    receiver: Receiver

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        encoding = (self.headers.get("Content-Encoding") or "").lower()
        if encoding == "gzip":
            body = gzip.decompress(body)
        elif encoding == "deflate":
            body = zlib.decompress(body)
        if self.path != "/v1/traces":
            self.send_error(404)
            return
        request = pb.ExportTraceServiceRequest.FromString(body)
        self.receiver.add(request, body)
        answer = pb.ExportTraceServiceResponse().SerializeToString()
        self.send_response(200)
        self.send_header("Content-Type", "application/x-protobuf")
        self.send_header("Content-Length", str(len(answer)))
        self.end_headers()
        self.wfile.write(answer)

    def log_message(self, format: str, *args: Any) -> None:  # quiet
        pass


class _TraceService(pb_grpc.TraceServiceServicer):
    def __init__(self, receiver: Receiver) -> None:
        self.receiver = receiver

    def Export(self, request: pb.ExportTraceServiceRequest, context: Any
               ) -> pb.ExportTraceServiceResponse:
        self.receiver.add(request, request.SerializeToString())
        return pb.ExportTraceServiceResponse()


class OtlpReceiver(Receiver):
    """Both endpoints on free loopback ports while the block runs: ``http_endpoint`` (what
    OTEL_EXPORTER_OTLP_ENDPOINT takes for http/protobuf) and ``grpc_endpoint``."""

    def __init__(self, http_port: int = 0, keep: bool = True) -> None:
        super().__init__(keep)
        handler = type("Handler", (_Handler,), {"receiver": self})
        self.http = ThreadingHTTPServer((LOOPBACK, http_port), handler)
        self.http_endpoint = f"http://{LOOPBACK}:{self.http.server_address[1]}"
        self.grpc = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
        pb_grpc.add_TraceServiceServicer_to_server(_TraceService(self), self.grpc)
        port = self.grpc.add_insecure_port(f"{LOOPBACK}:0")
        self.grpc_endpoint = f"http://{LOOPBACK}:{port}"
        self._thread = threading.Thread(target=self.http.serve_forever,
                                        kwargs={"poll_interval": 0.05}, daemon=True)

    def __enter__(self) -> OtlpReceiver:
        self._thread.start()
        self.grpc.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.http.shutdown()
        self.http.server_close()
        self.grpc.stop(None)


def main() -> int:
    p = argparse.ArgumentParser(description="an OTLP/HTTP trace receiver that counts spans")
    p.add_argument("--port", type=int, required=True)
    args = p.parse_args()
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    with OtlpReceiver(args.port, keep=False) as receiver:
        print("ready", flush=True)
        while not stop.wait(0.5):
            pass
        time.sleep(0.1)
        print(f"spans {receiver.count} exports {receiver.requests}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
