"""OpenTelemetry tracing for Jaeger: set up from the standard OTEL_* variables, fed by hooks.

One trace per run. Prefect opens a span for the flow run and one for each task run once a tracer
provider exists, each under the span current where it starts; ours fit in between:

    materialize <selection>          Prefect's flow run
      sync.run                       run id, selection, flow run id, status
        asset-<name>                 Prefect's task run
          asset.materialize          rows read/loaded/written/dead-lettered, bytes, cursors, status, error
            asset.land               (the BigQuery client's own spans), asset.schema per source
                                     table, asset.dead_letters per rejected batch
            asset.wait_upstream      an asset with upstream lands first, then waits here for them
            asset.build              asset.secure_raw, then asset.build_table (with its checks)
        asset.materialize            a skipped asset: no task ran, the span says why (one whose
                                     upstream failed while it landed ends under its task, skipped)

With no exporter configured nothing is installed and the runtime gets no tracing hook at all.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
import threading
import traceback
from collections.abc import Iterator, Sequence

from opentelemetry import context as otel_context
from opentelemetry import propagate
from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SpanExporter
from opentelemetry.trace import Span, Status, StatusCode

from observability.events import AssetOutcome, RunInfo
from observability.hooks import Hook
from observability.logs import redact

TRACER_NAME = "gong_sync"
DEFAULT_SERVICE_NAME = "gong-sync"
log = logging.getLogger("gong_sync.tracing")
_provider: TracerProvider | None = None
_setup_lock = threading.Lock()


def exporter_choice(signal: str) -> str | None:
    """`otlp`, `console` or None for a signal (`traces`, `metrics`), as the OTEL_* variables say.

    OTEL_<SIGNAL>_EXPORTER wins (`none`, `console`, `otlp`); unset, an OTLP endpoint variable
    turns OTLP on. Nothing set means nothing exported.
    """
    if os.environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return None
    names = [n.strip().lower() for n in os.environ.get(f"OTEL_{signal.upper()}_EXPORTER", "").split(",") if n.strip()]
    endpoint = os.environ.get(f"OTEL_EXPORTER_OTLP_{signal.upper()}_ENDPOINT") or os.environ.get(
        "OTEL_EXPORTER_OTLP_ENDPOINT"
    )
    if not names:
        return "otlp" if endpoint else None
    for name in names:
        if name in ("otlp", "console"):
            return name
        if name != "none":
            log.warning("OTEL_%s_EXPORTER=%s is not supported (use otlp, console or none)", signal.upper(), name)
    return None


def otlp_protocol(signal: str) -> str:
    """`grpc` or `http/protobuf` (the default), from OTEL_EXPORTER_OTLP[_<SIGNAL>]_PROTOCOL."""
    value = (
        os.environ.get(f"OTEL_EXPORTER_OTLP_{signal.upper()}_PROTOCOL")
        or os.environ.get("OTEL_EXPORTER_OTLP_PROTOCOL")
        or "http/protobuf"
    ).strip().lower()
    if value not in ("grpc", "http/protobuf"):
        log.warning("OTLP protocol %s is not supported here: using http/protobuf", value)
        return "http/protobuf"
    return value


def resource() -> Resource:
    """service.name from OTEL_SERVICE_NAME or OTEL_RESOURCE_ATTRIBUTES, else `gong-sync`."""
    detected = Resource.create()
    if "OTEL_SERVICE_NAME" in os.environ or "service.name=" in os.environ.get("OTEL_RESOURCE_ATTRIBUTES", ""):
        return detected
    return detected.merge(Resource({"service.name": DEFAULT_SERVICE_NAME}))


def _exporter() -> SpanExporter | None:
    choice = exporter_choice("traces")
    if choice is None:
        return None
    if choice == "console":
        # stderr, one JSON object per line: stdout carries the run summary, and JSON logs stay parseable.
        return ConsoleSpanExporter(out=sys.stderr, formatter=lambda span: span.to_json(indent=None) + "\n")
    # The exporters read their endpoint, headers, timeout and TLS settings from OTEL_* themselves.
    if otlp_protocol("traces") == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter as GrpcExporter

        return GrpcExporter()
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter as HttpExporter

    return HttpExporter()


def setup_tracing() -> TracerProvider | None:
    """Install the global TracerProvider when an exporter is configured; idempotent.

    Call it before a flow starts: Prefect opens its flow-run span before the flow body runs, and
    a span opened without a provider is never recorded.
    """
    global _provider
    with _setup_lock:
        if _provider is not None:
            return _provider
        exporter = _exporter()
        if exporter is None:
            return None
        provider = TracerProvider(resource=resource())
        provider.add_span_processor(BatchSpanProcessor(exporter))
        trace.set_tracer_provider(provider)
        _provider = provider
        return provider


def flush_tracing(timeout_ms: int = 10_000) -> None:
    """Send the spans still buffered (the batch processor exports every few seconds)."""
    if _provider is not None:
        _provider.force_flush(timeout_ms)


def _attribute(value: object) -> object:
    """An attribute value OpenTelemetry accepts, with no secret in it."""
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, bool | int | float):
        return value
    if isinstance(value, list | tuple) and all(isinstance(v, str) for v in value):
        return [redact(v) for v in value]
    return redact(json.dumps(value, default=str, sort_keys=True))


def _record_error(span: Span, error: BaseException, description: str | None = None) -> None:
    """ERROR status and an `exception` event, with any password taken out of the text."""
    span.add_event(
        "exception",
        {
            "exception.type": type(error).__name__,
            "exception.message": redact(str(error)),
            "exception.stacktrace": redact("".join(traceback.format_exception(error))),
        },
    )
    span.set_status(Status(StatusCode.ERROR, redact(description or f"{type(error).__name__}: {error}")))


def _detach(token: object) -> None:
    try:
        otel_context.detach(token)  # type: ignore[arg-type]
    except Exception:  # noqa: BLE001 - a token from another thread (an asset ended by the flow)
        pass


def trace_parent() -> dict[str, str]:
    """The current span as W3C trace-context headers: what another process needs to put its
    spans in this trace (empty when nothing is traced)."""
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    return carrier


@contextlib.contextmanager
def under_trace_parent(carrier: dict[str, str]) -> Iterator[None]:
    """Spans started in the block are children of the span `carrier` names (from trace_parent)."""
    token = otel_context.attach(propagate.extract(carrier)) if carrier else None
    try:
        yield
    finally:
        if token is not None:
            _detach(token)


class TracingHook(Hook):
    """Turns run, asset and step events into spans with row counts, cursors and errors."""

    watches_in_the_asset = True

    def __init__(self, provider: trace.TracerProvider | None = None) -> None:
        self.tracer = trace.get_tracer(TRACER_NAME, tracer_provider=provider)
        self._run_span: Span | None = None
        self._run_token: object | None = None
        self._assets: dict[str, tuple[Span, object]] = {}
        self._lock = threading.Lock()

    def _in_run(self) -> otel_context.Context | None:
        return trace.set_span_in_context(self._run_span) if self._run_span is not None else None

    def run_started(self, run: RunInfo) -> None:
        # The current span is Prefect's flow-run span when the run is a flow: ours goes under it.
        span = self.tracer.start_span(
            "sync.run",
            attributes={
                "sync.run_id": run.run_id,
                "sync.selection": run.selection,
                "sync.assets": list(run.assets),
                **({"prefect.flow_run_id": str(run.flow_run_id)} if run.flow_run_id else {}),
            },
        )
        self._run_span = span
        # Current in the flow's thread: the task runner copies this context into each task's
        # thread, where Prefect opens the task-run span under it.
        self._run_token = otel_context.attach(trace.set_span_in_context(span))
        ctx = span.get_span_context()
        if ctx.is_valid:
            run.trace_id = format(ctx.trace_id, "032x")

    def run_finished(self, run: RunInfo, outcomes: Sequence[AssetOutcome], error: BaseException | None) -> None:
        span = self._run_span
        if span is None:
            return
        failed = [o.asset for o in outcomes if o.status == "failed"]
        skipped = [o.asset for o in outcomes if o.status == "skipped"]
        span.set_attributes({
            "sync.status": "failed" if failed or error is not None else "success",
            "sync.assets_failed": failed,
            "sync.assets_skipped": skipped,
            "sync.rows_synced": sum(o.rows_synced for o in outcomes),
        })
        if error is not None:
            _record_error(span, error)
        elif failed:
            span.set_status(Status(StatusCode.ERROR, f"failed: {', '.join(failed)}"))
        span.end()
        if self._run_token is not None:
            _detach(self._run_token)
        self._run_span = self._run_token = None
        flush_tracing()

    def asset_started(self, run: RunInfo, asset: str) -> None:
        # In a Prefect task thread the current span is the task-run span; elsewhere the run's.
        current = trace.get_current_span()
        parent = None if current.get_span_context().is_valid else self._in_run()
        span = self.tracer.start_span(
            "asset.materialize", context=parent, attributes={"asset.name": asset, "sync.run_id": run.run_id}
        )
        token = otel_context.attach(trace.set_span_in_context(span))
        with self._lock:
            self._assets[asset] = (span, token)

    def asset_finished(self, run: RunInfo, outcome: AssetOutcome, error: BaseException | None) -> None:
        with self._lock:
            entry = self._assets.pop(outcome.asset, None)
        if entry is None:  # a skipped asset never started: give it a span saying why
            span = self.tracer.start_span(
                "asset.materialize", context=self._in_run(),
                attributes={"asset.name": outcome.asset, "sync.run_id": run.run_id},
            )
            token = None
        else:
            span, token = entry
        span.set_attributes({
            "asset.status": outcome.status,
            "asset.rows_read": outcome.rows_read,
            "asset.rows_loaded": outcome.rows_loaded,
            "asset.rows_written": outcome.rows_written,
            "asset.rows_deleted": outcome.rows_deleted,
            "asset.rows_dead_lettered": outcome.rows_dead_lettered,
            "asset.schema_changes": outcome.schema_changes,
            "asset.bytes_read": outcome.bytes_read,
            "asset.duration_s": round(outcome.duration_s, 6),
            "asset.source_tables": sorted(outcome.checkpoint_before.keys() | outcome.checkpoint_after.keys()),
            "asset.cursor_before": _attribute(outcome.checkpoint_before),
            "asset.cursor_after": _attribute(outcome.checkpoint_after),
        })
        if outcome.checkpoint:
            span.set_attribute("asset.checkpoint", outcome.checkpoint)
        # What went with the deletes, table by table (the app's coaching rows among them).
        span.set_attributes({f"asset.cascade.{table}": n for table, n in outcome.cascade.items()})
        if outcome.status == "skipped":
            reason = redact(outcome.error or "upstream failed")
            span.set_attribute("asset.skip_reason", reason)
            span.add_event("skipped", {"reason": reason})
        elif outcome.status == "failed":
            span.set_attributes({
                "asset.error": redact(outcome.error or "failed"),
                "asset.error_type": outcome.error_type or (type(error).__name__ if error else ""),
                "asset.failed_step": outcome.step or "",
            })
            if error is not None:
                _record_error(span, error, outcome.error)
            else:
                span.set_status(Status(StatusCode.ERROR, redact(outcome.error or "failed")))
        span.end()
        if token is not None:
            _detach(token)

    @contextlib.contextmanager
    def step(self, run: RunInfo, asset: str, name: str, **attributes: object) -> Iterator[None]:
        with self.tracer.start_as_current_span(
            f"asset.{name}",
            attributes={"asset.name": asset, **{f"step.{k}": _attribute(v) for k, v in attributes.items()}},
            record_exception=False,
            set_status_on_exception=False,
        ) as span:
            try:
                yield
            except BaseException as exc:
                _record_error(span, exc)
                raise
