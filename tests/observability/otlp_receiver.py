"""Tiny OTLP receivers on loopback that decode the official protobuf, standing in for Jaeger.

`OtlpReceiver` takes OTLP/HTTP: POST /v1/traces, /v1/metrics and /v1/logs (protobuf, gzipped or
not, as the SDK's exporters send them); `OtlpGrpcReceiver` takes OTLP/gRPC. Both keep the decoded
requests; `spans()` and `metrics()` flatten them.
"""

from __future__ import annotations

import gzip
import threading
import time
from concurrent import futures
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import grpc
from google.protobuf.json_format import MessageToDict
from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import ExportLogsServiceRequest, ExportLogsServiceResponse
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
    ExportMetricsServiceRequest,
    ExportMetricsServiceResponse,
)
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2_grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2_grpc
from opentelemetry.proto.common.v1.common_pb2 import AnyValue

_KINDS = {
    "/v1/traces": (ExportTraceServiceRequest, ExportTraceServiceResponse),
    "/v1/metrics": (ExportMetricsServiceRequest, ExportMetricsServiceResponse),
    "/v1/logs": (ExportLogsServiceRequest, ExportLogsServiceResponse),
}


def value(any_value: AnyValue) -> object:
    """An OTLP AnyValue as a plain Python value."""
    kind = any_value.WhichOneof("value")
    if kind == "array_value":
        return [value(v) for v in any_value.array_value.values]
    if kind == "kvlist_value":
        return {kv.key: value(kv.value) for kv in any_value.kvlist_value.values}
    return getattr(any_value, kind) if kind else None


def attributes(key_values) -> dict[str, object]:  # noqa: ANN001 - repeated KeyValue
    return {kv.key: value(kv.value) for kv in key_values}


@dataclass
class Span:
    """One received span, flattened: ids as hex, attributes and events as dicts."""

    name: str
    trace_id: str
    span_id: str
    parent_id: str
    attributes: dict[str, object]
    status_code: int  # 0 unset, 1 ok, 2 error
    status_message: str
    events: list[tuple[str, dict[str, object]]]
    resource: dict[str, object]
    scope: str
    start_ns: int
    end_ns: int


@dataclass
class Point:
    """One received metric data point: name, kind, attributes and its value (sum, count...)."""

    name: str
    kind: str
    attributes: dict[str, object]
    value: float
    count: int = 0
    unit: str = ""


class _Received:
    """What a receiver got: the decoded export requests, by path, and their raw bytes."""

    def __init__(self) -> None:
        self.requests: list[tuple[str, object]] = []
        self.raw: list[bytes] = []
        self._lock = threading.Lock()

    def _keep(self, path: str, request: object, body: bytes) -> None:
        with self._lock:
            self.requests.append((path, request))
            self.raw.append(body)

    def __enter__(self):  # noqa: ANN204
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        raise NotImplementedError

    def clear(self) -> None:
        with self._lock:
            self.requests.clear()
            self.raw.clear()

    def _of(self, path: str) -> list:
        with self._lock:
            return [r for p, r in self.requests if p == path]

    def spans(self) -> list[Span]:
        out = []
        for request in self._of("/v1/traces"):
            for rs in request.resource_spans:
                resource = attributes(rs.resource.attributes)
                for ss in rs.scope_spans:
                    for s in ss.spans:
                        out.append(Span(
                            name=s.name, trace_id=s.trace_id.hex(), span_id=s.span_id.hex(),
                            parent_id=s.parent_span_id.hex(), attributes=attributes(s.attributes),
                            status_code=s.status.code, status_message=s.status.message,
                            events=[(e.name, attributes(e.attributes)) for e in s.events],
                            resource=resource, scope=ss.scope.name,
                            start_ns=s.start_time_unix_nano, end_ns=s.end_time_unix_nano,
                        ))
        return out

    def metrics(self) -> list[Point]:
        out = []
        for request in self._of("/v1/metrics"):
            for rm in request.resource_metrics:
                for sm in rm.scope_metrics:
                    for m in sm.metrics:
                        kind = m.WhichOneof("data")
                        for p in getattr(m, kind).data_points:
                            if kind == "histogram":
                                out.append(Point(m.name, kind, attributes(p.attributes), p.sum, p.count, m.unit))
                            else:
                                number = p.as_double if p.WhichOneof("value") == "as_double" else p.as_int
                                out.append(Point(m.name, kind, attributes(p.attributes), number, 0, m.unit))
        return out

    def as_text(self) -> str:
        """Everything received, decoded to JSON text: what a test searches for secrets."""
        with self._lock:
            return "\n".join(str(MessageToDict(r)) for _, r in self.requests) + "\n" + "\n".join(
                b.decode("utf-8", "replace") for b in self.raw
            )

    def wait_for(self, predicate, timeout: float = 15.0) -> bool:  # noqa: ANN001 - () -> bool
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate():
                return True
            time.sleep(0.05)
        return predicate()


class OtlpReceiver(_Received):
    """OTLP/HTTP on 127.0.0.1, a free port; `endpoint` is what OTEL_EXPORTER_OTLP_ENDPOINT takes."""

    def __init__(self) -> None:
        super().__init__()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's naming
                kinds = _KINDS.get(self.path)
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                if self.headers.get("Content-Encoding") == "gzip":
                    body = gzip.decompress(body)
                if kinds is None or self.headers.get("Content-Type") != "application/x-protobuf":
                    self.send_response(404)
                    self.end_headers()
                    return
                request = kinds[0]()
                request.ParseFromString(body)
                receiver._keep(self.path, request, body)
                reply = kinds[1]().SerializeToString()
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)

            def log_message(self, *args: object) -> None:  # quiet
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    @property
    def endpoint(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


class OtlpGrpcReceiver(_Received):
    """OTLP/gRPC (traces and metrics) on 127.0.0.1, a free port, without TLS."""

    def __init__(self) -> None:
        super().__init__()
        receiver = self

        class Traces(trace_service_pb2_grpc.TraceServiceServicer):
            def Export(self, request, context):  # noqa: ANN001, ANN201, N802 - gRPC's naming
                receiver._keep("/v1/traces", request, request.SerializeToString())
                return ExportTraceServiceResponse()

        class Metrics(metrics_service_pb2_grpc.MetricsServiceServicer):
            def Export(self, request, context):  # noqa: ANN001, ANN201, N802
                receiver._keep("/v1/metrics", request, request.SerializeToString())
                return ExportMetricsServiceResponse()

        self._server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(Traces(), self._server)
        metrics_service_pb2_grpc.add_MetricsServiceServicer_to_server(Metrics(), self._server)
        self.port = self._server.add_insecure_port("127.0.0.1:0")
        self._server.start()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def close(self) -> None:
        self._server.stop(grace=None)
