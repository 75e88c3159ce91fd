"""OpenTelemetry metrics, exported by OTLP: rows synced, errors, duration, dead letters, schema changes.

Every instrument is labelled by `asset` and `status`. Set up from the same OTEL_* variables as the
traces (OTEL_METRICS_EXPORTER, OTEL_EXPORTER_OTLP_[METRICS_]ENDPOINT/PROTOCOL); the figures are
pushed at the end of each run, and every OTEL_METRIC_EXPORT_INTERVAL (60 s) in a long-lived worker.
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Sequence

from opentelemetry import metrics
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import ConsoleMetricExporter, MetricExporter, PeriodicExportingMetricReader

from observability.events import AssetOutcome, RunInfo
from observability.hooks import Hook
from observability.tracing import exporter_choice, otlp_protocol, resource

METER_NAME = "gong_sync"
#: Seconds an asset takes: from a no-change run of a small table to a first load of a big one.
DURATION_BUCKETS = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)
_provider: MeterProvider | None = None
_setup_lock = threading.Lock()


def _exporter() -> MetricExporter | None:
    choice = exporter_choice("metrics")
    if choice is None:
        return None
    if choice == "console":
        return ConsoleMetricExporter(out=sys.stderr, formatter=lambda data: data.to_json(indent=None) + "\n")
    if otlp_protocol("metrics") == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter as GrpcExporter

        return GrpcExporter()
    from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter as HttpExporter

    return HttpExporter()


def setup_metrics() -> MeterProvider | None:
    """Install the global MeterProvider when an exporter is configured; idempotent."""
    global _provider
    with _setup_lock:
        if _provider is not None:
            return _provider
        exporter = _exporter()
        if exporter is None:
            return None
        provider = MeterProvider(resource=resource(), metric_readers=[PeriodicExportingMetricReader(exporter)])
        metrics.set_meter_provider(provider)
        _provider = provider
        return provider


def flush_metrics(timeout_ms: int = 10_000) -> None:
    if _provider is not None:
        _provider.force_flush(timeout_ms)


class MetricsHook(Hook):
    """Adds each finished asset's figures to the instruments; pushes them when the run ends."""

    def __init__(self, provider: MeterProvider) -> None:
        self.provider = provider
        meter = provider.get_meter(METER_NAME)
        self.rows_synced = meter.create_counter(
            "rows_synced", unit="{row}", description="Destination rows written or deleted")
        self.errors_count = meter.create_counter(
            "errors_count", unit="{error}", description="Failed assets plus rows sent to dead letters")
        self.duration_seconds = meter.create_histogram(
            "duration_seconds", unit="s", description="Time to materialize one asset",
            explicit_bucket_boundaries_advisory=list(DURATION_BUCKETS))
        self.dead_letters = meter.create_counter(
            "dead_letters", unit="{row}", description="Rows that failed validation and went to dead_letters")
        self.schema_changes = meter.create_counter(
            "schema_changes", unit="{change}", description="Source schema changes seen and handled")

    def asset_finished(self, run: RunInfo, outcome: AssetOutcome, error: BaseException | None) -> None:
        labels = {"asset": outcome.asset, "status": outcome.status}
        self.rows_synced.add(outcome.rows_synced, labels)
        self.errors_count.add(outcome.errors, labels)
        self.dead_letters.add(outcome.rows_dead_lettered, labels)
        self.schema_changes.add(outcome.schema_changes, labels)
        if outcome.status != "skipped":  # a skipped asset took no time: it would skew the histogram
            self.duration_seconds.record(outcome.duration_s, labels)

    def run_finished(self, run: RunInfo, outcomes: Sequence[AssetOutcome], error: BaseException | None) -> None:
        self.provider.force_flush(10_000)
