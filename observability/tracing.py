"""OpenTelemetry tracing for Jaeger: set up from the standard OTEL_* variables, fed by hooks.

One trace per run: a root span for the run, an `asset.materialize` span per asset and a span per
step under it. With no exporter configured nothing is set up and the hooks cost nothing.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterator, Sequence

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SpanExporter
from opentelemetry.trace import Span, Status, StatusCode

from observability.events import AssetOutcome, RunInfo
from observability.hooks import Hook

TRACER_NAME = "gong_sync"
_provider: TracerProvider | None = None


def _exporter() -> SpanExporter | None:
    choice = os.environ.get("OTEL_TRACES_EXPORTER", "").strip().lower()
    endpoint = os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")
    if choice == "none" or (not choice and not endpoint):
        return None
    if choice == "console":
        return ConsoleSpanExporter()
    protocol = (
        os.environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or os.environ.get("OTEL_EXPORTER_OTLP_PROTOCOL") or "http/protobuf"
    )
    if protocol.strip().lower() == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter as GrpcExporter

        return GrpcExporter()
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter as HttpExporter

    return HttpExporter()


def setup_tracing() -> TracerProvider | None:
    """Install a TracerProvider when an exporter is configured; idempotent. Prefect then adds its
    own flow and task spans to the same provider, so both form one tree."""
    global _provider
    if _provider is not None:
        return _provider
    exporter = _exporter()
    if exporter is None:
        return None
    resource = Resource.create({"service.name": os.environ.get("OTEL_SERVICE_NAME", "gong-sync")})
    provider = TracerProvider(resource=resource)
    provider.add_span_processor(BatchSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    _provider = provider
    return provider


def flush_tracing(timeout_ms: int = 10_000) -> None:
    if _provider is not None:
        _provider.force_flush(timeout_ms)


class TracingHook(Hook):
    """Turns run, asset and step events into spans with row counts, cursors and errors."""

    def __init__(self) -> None:
        self.tracer = trace.get_tracer(TRACER_NAME)
        self._run_span: Span | None = None
        self._run_token: object | None = None
        self._assets: dict[str, tuple[Span, object]] = {}
        self._lock = threading.Lock()

    def run_started(self, run: RunInfo) -> None:
        span = self.tracer.start_span(
            "sync.run",
            attributes={"sync.run_id": run.run_id, "sync.selection": run.selection, "sync.assets": list(run.assets),
                        **({"prefect.flow_run_id": run.flow_run_id} if run.flow_run_id else {})},
        )
        self._run_span = span
        self._run_token = otel_context.attach(trace.set_span_in_context(span))
        ctx = span.get_span_context()
        if ctx.is_valid:
            run.trace_id = format(ctx.trace_id, "032x")

    def run_finished(self, run: RunInfo, outcomes: Sequence[AssetOutcome], error: BaseException | None) -> None:
        span = self._run_span
        if span is None:
            return
        failed = [o.asset for o in outcomes if o.status == "failed"]
        span.set_attribute("sync.assets_failed", failed)
        if error is not None:
            span.record_exception(error)
        if failed or error is not None:
            span.set_status(Status(StatusCode.ERROR, f"failed: {', '.join(failed) or type(error).__name__}"))
        span.end()
        if self._run_token is not None:
            otel_context.detach(self._run_token)
        self._run_span = self._run_token = None
        flush_tracing()

    def asset_started(self, run: RunInfo, asset: str) -> None:
        current = trace.get_current_span()
        # Inside a Prefect task thread the current span is Prefect's task span; elsewhere the run's.
        parent = otel_context.get_current() if current.get_span_context().is_valid else (
            trace.set_span_in_context(self._run_span) if self._run_span else None
        )
        span = self.tracer.start_span("asset.materialize", context=parent, attributes={"asset.name": asset, "sync.run_id": run.run_id})
        token = otel_context.attach(trace.set_span_in_context(span))
        with self._lock:
            self._assets[asset] = (span, token)

    def asset_finished(self, run: RunInfo, outcome: AssetOutcome, error: BaseException | None) -> None:
        with self._lock:
            entry = self._assets.pop(outcome.asset, None)
        if entry is None:  # a skipped asset never started: give it a span saying why
            span = self.tracer.start_span(
                "asset.materialize",
                context=trace.set_span_in_context(self._run_span) if self._run_span else None,
                attributes={"asset.name": outcome.asset, "sync.run_id": run.run_id},
            )
            token = None
        else:
            span, token = entry
        span.set_attributes(
            {
                "asset.status": outcome.status,
                "asset.rows_read": outcome.rows_read,
                "asset.rows_loaded": outcome.rows_loaded,
                "asset.rows_written": outcome.rows_written,
                "asset.rows_deleted": outcome.rows_deleted,
                "asset.rows_dead_lettered": outcome.rows_dead_lettered,
                "asset.bytes_read": outcome.bytes_read,
                "asset.duration_s": outcome.duration_s,
                "asset.cursor_before": str(outcome.checkpoint_before),
                "asset.cursor_after": str(outcome.checkpoint_after),
            }
        )
        if outcome.error:
            span.set_attribute("asset.error", outcome.error)
        if error is not None:
            span.record_exception(error)
        if outcome.status == "failed":
            span.set_status(Status(StatusCode.ERROR, outcome.error or "failed"))
        elif outcome.status == "skipped":
            span.set_attribute("asset.skip_reason", outcome.error or "upstream failed")
        span.end()
        if token is not None:
            otel_context.detach(token)

    @contextlib.contextmanager
    def step(self, run: RunInfo, asset: str, name: str, **attributes: object) -> Iterator[None]:
        with self.tracer.start_as_current_span(
            f"asset.{name}", attributes={"asset.name": asset, **{f"step.{k}": v for k, v in attributes.items()}}
        ):
            # The SDK records the exception and sets ERROR status when the step raises.
            yield
