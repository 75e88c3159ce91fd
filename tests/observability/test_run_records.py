"""What a run leaves behind without any telemetry backend: sync_runs rows and Prefect artifacts;
and that with no OTEL_* variables nothing of OpenTelemetry is installed."""

from __future__ import annotations

import datetime as dt
import json
import uuid

import pytest
from opentelemetry import metrics, trace

from observability.logs import redact
from observability.metrics import MetricsHook
from observability.tracing import TracingHook, exporter_choice
from runtime.flow import default_hooks
from runtime.local.seed import CASES, seed_workspace, soft_delete
from tests.helpers import sync

CORE = "users,calls,transcripts,speakers"
LATER = dt.datetime(2026, 3, 1, 12, 0, 0, 654321, tzinfo=dt.UTC)


def artifacts_of(flow_run_id: str) -> dict[str, object]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        found = client.read_artifacts(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[uuid.UUID(flow_run_id)])))
    return {a.key: a for a in found}


def test_a_run_records_sync_runs_and_artifacts_and_installs_no_telemetry_unconfigured(env):
    seed_workspace(env.bq, project=env.emulator.project, gong_dataset=env.gong_dataset, calls=12,
                   tables=["gong.users", "gong.call", "gong.transcript", "gong.call_speaker"])
    hooks = default_hooks()
    assert not [h for h in hooks.hooks if isinstance(h, TracingHook | MetricsHook)]
    report = sync(CORE)
    assert report.status == "success" and report.trace_id is None
    # The global providers are still OpenTelemetry's no-op proxies: nothing exports, nothing waits.
    assert type(trace.get_tracer_provider()).__name__ == "ProxyTracerProvider"
    assert type(metrics.get_meter_provider()).__name__ == "_ProxyMeterProvider"

    landed = {name: env.rows(f"SELECT count(*) FROM {name}")[0][0] for name in CORE.split(",")}
    # Rows the build left out (a call id two workspaces hold) are the asset's errors.
    letters = dict(env.rows("SELECT asset, count(*) FROM gong_sync.dead_letters GROUP BY asset"))
    assert letters == {"calls": 1}
    records = env.rows(
        "SELECT asset, status, rows_read > 0, rows_written, rows_synced, errors, trace_id, checkpoint,"
        " finished_at >= started_at FROM gong_sync.sync_runs WHERE run_id = %s ORDER BY asset", (report.run_id,))
    checkpoints = dict(env.rows("SELECT entity_type, error_details -> 'checkpoints' FROM sync_status"))
    assert records == [(n, "success", True, landed[n], landed[n], letters.get(n, 0), None, checkpoints[n], True)
                       for n in sorted(landed)]
    # The app's sync_status has the same figures: partial where rows went to dead letters.
    status = env.rows("SELECT entity_type, last_sync_status, items_synced, errors_count,"
                      " (error_details ->> 'dead_letters')::int, last_sync_timestamp = (SELECT min(v::timestamptz)"
                      " FROM jsonb_each_text(error_details -> 'checkpoints') c (k, v)) FROM sync_status ORDER BY 1")
    assert status == [(n, "partial" if n in letters else "success", landed[n], letters.get(n, 0), letters.get(n, 0), True)
                      for n in sorted(landed)]

    second = sync(CORE)
    assert env.rows("SELECT count(DISTINCT run_id), count(*) FROM gong_sync.sync_runs") == [(2, 8)]
    assert env.rows("SELECT sum(rows_synced) FROM gong_sync.sync_runs WHERE run_id = %s", (second.run_id,)) == [(0,)]

    found = artifacts_of(report.run_id)
    table = json.loads(found["gong-sync-assets"].data)
    assert {row["asset"]: (row["status"], row["rows_synced"], row["errors"]) for row in table} == {
        n: ("success", landed[n], letters.get(n, 0)) for n in landed
    }
    graph = found["gong-sync-graph"].data
    assert "flowchart LR" in graph and "calls --> speakers" in graph and "users --> speakers" in graph
    assert f'speakers["speakers<br/>{landed["speakers"]} rows · ' in graph
    assert f"| 1 | speakers | users, calls | success | {landed['speakers']} |" in graph
    assert "transcripts --> " not in graph and "speakers --> transcripts" in graph and "calls --> transcripts" in graph

    # A call deleted at the source: the run records what its delete took with it.
    call_id, gong_id, workspace = env.rows(
        "SELECT c.id, c.gong_call_id, c.metadata ->> 'workspace_id' FROM calls c WHERE gong_call_id <> %s"
        " AND EXISTS (SELECT 1 FROM transcripts t WHERE t.call_id = c.id) ORDER BY 2 LIMIT 1", (CASES.shared_call_id,))[0]
    went = {f"public.{table}": env.rows(f"SELECT count(*) FROM {table} WHERE call_id = %s", (call_id,))[0][0]
            for table in ("speakers", "transcripts")}
    assert all(went.values())
    soft_delete(env.bq, env.gong("call"), {"id": gong_id, "workspace_id": workspace}, LATER)
    third = sync("calls")
    assert third.status == "success"
    assert env.rows("SELECT rows_deleted, rows_synced FROM gong_sync.sync_runs WHERE run_id = %s AND asset = 'calls'",
                    (third.run_id,)) == [(1, 1)]
    assert env.rows("SELECT count(*) FROM calls WHERE gong_call_id = %s", (gong_id,)) == [(0,)]
    assert env.rows("SELECT count(*) FROM transcripts WHERE call_id = %s", (call_id,)) == [(0,)]
    assert env.rows("SELECT last_sync_status, items_synced, (error_details ->> 'deleted')::int, error_details -> 'cascade'"
                    " FROM sync_status WHERE entity_type = 'calls'") == [("success", 1, 1, went)]
    assert {row["asset"]: row["rows_synced"] for row in json.loads(artifacts_of(third.run_id)["gong-sync-assets"].data)} == {
        "calls": 1}


@pytest.mark.parametrize(
    ("variables", "traces", "metrics_"),
    [
        ({}, None, None),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4318"}, "otlp", "otlp"),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4318", "OTEL_TRACES_EXPORTER": "none"}, None, "otlp"),
        ({"OTEL_TRACES_EXPORTER": "console", "OTEL_METRICS_EXPORTER": "none"}, "console", None),
        ({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://127.0.0.1:4318/v1/traces"}, "otlp", None),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4318", "OTEL_SDK_DISABLED": "true"}, None, None),
    ],
)
def test_the_standard_variables_choose_the_exporters(monkeypatch, variables, traces, metrics_):
    for name in ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_METRICS_ENDPOINT",
                 "OTEL_TRACES_EXPORTER", "OTEL_METRICS_EXPORTER", "OTEL_SDK_DISABLED"):
        monkeypatch.delenv(name, raising=False)
    for name, value in variables.items():
        monkeypatch.setenv(name, value)
    assert (exporter_choice("traces"), exporter_choice("metrics")) == (traces, metrics_)


def test_passwords_are_taken_out_of_urls_and_keyword_strings():
    text = "load failed: postgresql://loader:S3cr%40t@db:5432/app and host=db password='x y' user=u password=abc"
    assert redact(text) == "load failed: postgresql://loader:***@db:5432/app and host=db password=*** user=u password=***"
