"""Traces, metrics and logs of real `materialize` runs, received on loopback as OTLP protobuf.

Each run is the CLI in a subprocess, configured only by the standard OTEL_* variables, as an
operator runs it; Postgres is reached with a canary password that must appear nowhere.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import pty
import re
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterable
from urllib.parse import urlsplit, urlunsplit

import pytest

from runtime.local.seed import CASES, seed_workspace, soft_delete
from tests.helpers import app_holds_lock
from tests.observability.otlp_receiver import OtlpGrpcReceiver, OtlpReceiver, Point, Span

CANARY = "Otel-Canary-Pa55-9f3b"
CORE_TABLES = ["gong.users", "gong.call", "gong.transcript", "gong.call_speaker"]
CORE = ["users", "calls", "transcripts", "speakers"]
JAEGER = "http://127.0.0.1:16686"
LATER = dt.datetime(2026, 3, 1, 12, 0, 0, 654321, tzinfo=dt.UTC)


def canary_url(url: str) -> str:
    """The same database, with the canary as password (trust auth accepts any)."""
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, f"{parts.username}:{CANARY}@{parts.hostname}:{parts.port}", parts.path, "", ""))


def cli_env(env, receiver, **extra: str) -> dict[str, str]:
    from prefect.settings import PREFECT_API_URL

    environ = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    environ.update(env.vars())
    environ.update({
        "DATABASE_URL": canary_url(env.database_url),
        "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint,
        "OTEL_SERVICE_NAME": "gong-sync-test",
        "JAEGER_UI_URL": JAEGER,
        # The session's Prefect test server, not a temporary one per call.
        "PREFECT_API_URL": PREFECT_API_URL.value() or "",
        **extra,
    })
    return environ


def materialize(*args: str, environ: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "runtime.cli", *args], env=environ, capture_output=True, text=True,
        timeout=300, stdin=subprocess.DEVNULL,
    )


def one(items: Iterable[Span]) -> Span:
    found = list(items)
    assert len(found) == 1, [s.name for s in found]
    return found[0]


def latest(points: list[Point], name: str) -> dict[tuple[str, str], Point]:
    """The last exported point of a cumulative instrument, per (asset, status)."""
    out: dict[tuple[str, str], Point] = {}
    for p in points:
        if p.name == name:
            out[(p.attributes["asset"], p.attributes["status"])] = p
    return out


def bq_count(env, table: str) -> int:
    return list(env.bq.query(f"SELECT count(*) FROM `{env.gong(table)}`").result())[0][0]


def printed_trace_id(stdout: str) -> str:
    match = re.search(r"^trace id ([0-9a-f]{32})$", stdout, re.M)
    assert match, stdout
    return match.group(1)


def prefect_logs_and_artifacts(flow_run_id: str) -> str:
    """Everything the run sent to the Prefect API: log lines and artifacts, as text."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId, LogFilter, LogFilterFlowRunId

    with get_client(sync_client=True) as client:
        logs = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[uuid.UUID(flow_run_id)])))
        artifacts = client.read_artifacts(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[uuid.UUID(flow_run_id)])))
    return "\n".join([*(log.message for log in logs), *(json.dumps(a.data, default=str) for a in artifacts)])


@pytest.fixture
def receiver():
    with OtlpReceiver() as r:
        yield r


def test_a_run_exports_one_trace_with_row_counts_metrics_and_json_logs(env, receiver):
    seed_workspace(env.bq, project=env.emulator.project, gong_dataset=env.gong_dataset, calls=12, tables=CORE_TABLES)
    result = materialize("--asset", ",".join(CORE), "--log-format", "json", environ=cli_env(env, receiver))
    assert result.returncode == 0, result.stderr[-3000:]

    # The summary prints the trace id and where to open it.
    trace_id = printed_trace_id(result.stdout)
    assert f"trace {JAEGER}/trace/{trace_id}" in result.stdout
    assert receiver.wait_for(lambda: any(s.name == "sync.run" for s in receiver.spans()))
    spans = receiver.spans()
    assert {s.trace_id for s in spans} == {trace_id}, "one trace per run, and nothing outside it"
    assert {s.resource.get("service.name") for s in spans} == {"gong-sync-test"}

    # Prefect's flow-run span is the root; our run span is its child; each task-run span sits under
    # the run span and holds the asset's span, which holds its steps.
    flow = one(s for s in spans if s.attributes.get("prefect.run.type") == "flow")
    assert flow.parent_id == "" and flow.name == "materialize calls,speakers,transcripts,users"
    run = one(s for s in spans if s.name == "sync.run")
    assert run.parent_id == flow.span_id
    flow_run_id = flow.attributes["prefect.run.id"]
    assert run.attributes["sync.run_id"] == run.attributes["prefect.flow_run_id"] == flow_run_id
    assert run.attributes["sync.selection"] == "calls,speakers,transcripts,users"
    assert run.attributes["sync.status"] == "success" and run.status_code != 2

    landed = {name: env.rows(f"SELECT count(*) FROM {name}")[0][0] for name in CORE}
    checkpoints = dict(env.rows("SELECT entity_type, error_details -> 'checkpoints' FROM sync_status"))
    # Rows the build left out (a call id two workspaces hold) are in dead letters: the asset's errors.
    letters = {n: env.rows("SELECT count(*) FROM gong_sync.dead_letters WHERE asset = %s", (n,))[0][0] for n in CORE}
    assert letters == {"users": 0, "calls": 1, "transcripts": 0, "speakers": 0}
    read = {"users": bq_count(env, "users"), "calls": bq_count(env, "call")}
    for name in CORE:
        task = one(s for s in spans if s.name == f"asset-{name}")
        assert task.parent_id == run.span_id
        asset = one(s for s in spans if s.name == "asset.materialize" and s.attributes["asset.name"] == name)
        assert asset.parent_id == task.span_id
        assert asset.attributes["asset.status"] == "success"
        assert landed[name] > 0 and asset.attributes["asset.rows_written"] == landed[name]
        assert asset.attributes["asset.rows_dead_lettered"] == letters[name]
        assert asset.attributes["asset.rows_deleted"] == 0 and not [k for k in asset.attributes if "cascade" in k]
        assert asset.attributes["asset.bytes_read"] > 0
        assert json.loads(asset.attributes["asset.cursor_before"]) == {t: None for t in checkpoints[name]}
        assert json.loads(asset.attributes["asset.cursor_after"]) == checkpoints[name]
        steps = {s.name: s for s in spans if s.parent_id == asset.span_id}
        # An asset with upstream lands first, then waits for them, then builds.
        waits = {"asset.wait_upstream"} if name in ("speakers", "transcripts") else set()
        assert set(steps) == {"asset.land", "asset.build"} | waits
        ordered = [s.name for s in sorted(steps.values(), key=lambda s: s.start_ns)]
        assert ordered == ["asset.land", *waits, "asset.build"], ordered
        assert all(s.start_ns >= asset.start_ns and s.end_ns <= asset.end_ns for s in steps.values())
        # Landing checks each source table's schema; building secures the raw tables, then builds.
        schema_checks = [s for s in spans if s.parent_id == steps["asset.land"].span_id and s.name == "asset.schema"]
        assert sorted(s.attributes["step.table"] for s in schema_checks) == sorted(checkpoints[name])
        assert [s.name for s in sorted((s for s in spans if s.parent_id == steps["asset.build"].span_id),
                                       key=lambda s: s.start_ns)] == ["asset.secure_raw", "asset.build_table"]
        if name in read:
            assert asset.attributes["asset.rows_read"] == read[name]

    # Metrics: the same figures, labelled by asset and status.
    assert receiver.wait_for(lambda: latest(receiver.metrics(), "duration_seconds"))
    points = receiver.metrics()
    rows_synced = latest(points, "rows_synced")
    assert {k: int(p.value) for k, p in rows_synced.items()} == {(n, "success"): landed[n] for n in CORE}
    assert {k: int(p.value) for k, p in latest(points, "errors_count").items()} == {(n, "success"): letters[n] for n in CORE}
    durations = latest(points, "duration_seconds")
    assert {k: p.count for k, p in durations.items()} == {(n, "success"): 1 for n in CORE}
    assert all(p.unit == "s" and 0 < p.value < 120 for p in durations.values())
    assert set(latest(points, "dead_letters")) == set(latest(points, "schema_changes")) == set(rows_synced)

    # sync_runs keeps them without a metrics backend.
    records = env.rows("SELECT asset, status, rows_synced, errors, trace_id, started_at <= finished_at"
                       " FROM gong_sync.sync_runs WHERE run_id = %s ORDER BY asset", (flow_run_id,))
    assert records == sorted((n, "success", landed[n], letters[n], trace_id, True) for n in CORE)

    # Logs: every console line is one JSON object; each asset ends with its rows and checkpoint.
    lines = [json.loads(line) for line in result.stderr.splitlines() if line.strip()]
    ends = {e["asset"]: e for e in lines if e.get("event") == "asset.end"}
    assert {n: ends[n]["rows_written"] for n in CORE} == landed
    assert all(ends[n]["duration_s"] > 0 and ends[n]["checkpoint"] != "-" for n in CORE)
    run_end = [e for e in lines if e.get("event") == "run.end"]
    assert len(run_end) == 1 and run_end[0]["trace_id"] == trace_id
    assert run_end[0]["trace_url"] == f"{JAEGER}/trace/{trace_id}"
    # Not a terminal: no progress line, no control characters.
    assert not re.search(r"[\r\x1b]", result.stdout + result.stderr)

    emitted = "\n".join([
        result.stdout, result.stderr, receiver.as_text(), prefect_logs_and_artifacts(flow_run_id),
        json.dumps(env.rows("SELECT * FROM gong_sync.sync_runs"), default=str),
    ])
    assert "asset.materialize" in emitted and CANARY not in emitted

    # A call deleted at the source: its span, its log line and the summary count what went with it.
    call_id, gong_id, workspace = env.rows(
        "SELECT c.id, c.gong_call_id, c.metadata ->> 'workspace_id' FROM calls c WHERE gong_call_id <> %s"
        " AND EXISTS (SELECT 1 FROM transcripts t WHERE t.call_id = c.id) ORDER BY 2 LIMIT 1", (CASES.shared_call_id,))[0]
    went = {f"public.{table}": env.rows(f"SELECT count(*) FROM {table} WHERE call_id = %s", (call_id,))[0][0]
            for table in ("speakers", "transcripts")}
    assert all(went.values())
    soft_delete(env.bq, env.gong("call"), {"id": gong_id, "workspace_id": workspace}, LATER)
    receiver.clear()
    again = materialize("--asset", "calls", "--log-format", "json", environ=cli_env(env, receiver))
    assert again.returncode == 0, again.stderr[-3000:]
    trace_id = printed_trace_id(again.stdout)
    assert receiver.wait_for(lambda: any(s.name == "sync.run" and s.trace_id == trace_id for s in receiver.spans()))
    calls = one(s for s in receiver.spans() if s.name == "asset.materialize" and s.trace_id == trace_id)
    assert calls.attributes["asset.rows_deleted"] == 1
    assert {k.removeprefix("asset.cascade."): v for k, v in calls.attributes.items()
            if k.startswith("asset.cascade.")} == went
    lines = [json.loads(line) for line in again.stderr.splitlines() if line.strip()]
    (end,) = [e for e in lines if e.get("event") == "asset.end"]
    assert (end["rows_deleted"], end["cascade"]) == (1, went)
    listed = ", ".join(f"{table} {n}" for table, n in sorted(went.items()))
    assert f"calls: 1 deleted; with them went: {listed}" in again.stdout
    assert env.rows("SELECT error_details -> 'cascade' FROM sync_status WHERE entity_type = 'calls'") == [(went,)]


def test_a_failed_asset_has_an_error_span_and_its_downstream_say_why_they_skipped(env, receiver):
    seed_workspace(env.bq, project=env.emulator.project, gong_dataset=env.gong_dataset,
                   salesforce_dataset=env.salesforce_dataset, calls=12)
    with app_holds_lock(env, "calls"):  # the calls build gives up after LOCK_TIMEOUT
        result = materialize("--asset", "users,calls,transcripts,speakers,+emails",
                             environ=cli_env(env, receiver, LOCK_TIMEOUT="1", MAX_PARALLEL="8"))
    assert result.returncode == 1, result.stderr[-3000:]
    trace_id = printed_trace_id(result.stdout)
    assert receiver.wait_for(lambda: any(s.name == "sync.run" for s in receiver.spans()))
    spans = receiver.spans()
    assert {s.trace_id for s in spans} == {trace_id}
    run = one(s for s in spans if s.name == "sync.run")
    assert run.status_code == 2 and run.attributes["sync.assets_failed"] == ["calls"]

    calls = one(s for s in spans if s.name == "asset.materialize" and s.attributes["asset.name"] == "calls")
    gave_up = "calls: waited LOCK_TIMEOUT (1 s) for a table lock and gave up; nothing was written."
    assert calls.status_code == 2 and gave_up in calls.status_message
    assert calls.attributes["asset.status"] == "failed" and calls.attributes["asset.failed_step"] == "build"
    exception = dict(calls.events)["exception"]
    assert exception["exception.type"] == "BuildError" and gave_up in exception["exception.message"]
    build = one(s for s in spans if s.parent_id == calls.span_id and s.name == "asset.build")
    assert build.status_code == 2
    assert one(s for s in spans if s.parent_id == calls.span_id and s.name == "asset.land").status_code != 2
    task = one(s for s in spans if s.span_id == calls.parent_id)
    assert task.name == "asset-calls" and task.status_code == 2

    # Speakers wait for calls; transcripts for calls and speakers. With a slot for every asset,
    # both start at once: they land their own rows while calls runs, wait for it, build nothing.
    for name, raw in (("speakers", "gong__call_speaker"), ("transcripts", "gong__transcript")):
        skipped = one(s for s in spans if s.name == "asset.materialize" and s.attributes["asset.name"] == name)
        assert skipped.attributes["asset.status"] == "skipped"
        reason = skipped.attributes["asset.skip_reason"]
        assert reason.startswith("upstream failed: calls"), reason
        assert reason.endswith("; its own rows were landed and are built by the next run"), reason
        assert skipped.parent_id != run.span_id  # its task ran, and did not fail: it was skipped
        task = one(s for s in spans if s.span_id == skipped.parent_id)
        assert task.name == f"asset-{name}" and task.status_code != 2, (task.name, task.status_code)
        steps = {s.name for s in spans if s.parent_id == skipped.span_id}
        assert {"asset.land", "asset.wait_upstream"} <= steps and "asset.build" not in steps, steps
        assert env.rows(f"SELECT count(*) FROM {name}") == [(0,)]
        assert env.rows(f"SELECT count(*) > 0 FROM gong_raw.{raw}") == [(True,)]
    for name in ("users", "opportunities", "emails"):
        ok = one(s for s in spans if s.name == "asset.materialize" and s.attributes["asset.name"] == name)
        assert ok.status_code != 2 and ok.attributes["asset.status"] == "success"
    emails = one(s for s in spans if s.name == "asset.materialize" and s.attributes["asset.name"] == "emails")
    assert emails.attributes["asset.rows_dead_lettered"] == 2
    emails_land = one(s for s in spans if s.parent_id == emails.span_id and s.name == "asset.land")
    letters = [s for s in spans if s.parent_id == emails_land.span_id and s.name == "asset.dead_letters"]
    assert sum(s.attributes["step.rows"] for s in letters) == 2

    assert receiver.wait_for(lambda: latest(receiver.metrics(), "errors_count"))
    points = receiver.metrics()
    errors = {k: int(p.value) for k, p in latest(points, "errors_count").items()}
    assert errors[("calls", "failed")] == 1 and errors[("emails", "success")] == 2
    assert errors[("transcripts", "skipped")] == 0 and errors[("users", "success")] == 0
    assert int(latest(points, "dead_letters")[("emails", "success")].value) == 2
    assert ("transcripts", "skipped") not in latest(points, "duration_seconds")

    flow_run_id = run.attributes["sync.run_id"]
    records = dict(((a, (s, e)) for a, s, e in env.rows(
        "SELECT asset, status, errors FROM gong_sync.sync_runs WHERE run_id = %s AND trace_id = %s",
        (flow_run_id, trace_id))))
    assert records == {"users": ("success", 0), "calls": ("failed", 1), "transcripts": ("skipped", 0),
                       "speakers": ("skipped", 0), "opportunities": ("success", 1), "emails": ("success", 2)}
    assert re.search(r"asset\.end run_id=\S+ asset=calls status=failed .*step=build error=.*gave up", result.stderr)

    emitted = "\n".join([result.stdout, result.stderr, receiver.as_text(), prefect_logs_and_artifacts(flow_run_id)])
    assert gave_up in emitted and CANARY not in emitted


def test_grpc_export_and_live_progress_on_a_terminal(env):
    seed_workspace(env.bq, project=env.emulator.project, gong_dataset=env.gong_dataset, calls=12, tables=CORE_TABLES)
    with OtlpGrpcReceiver() as receiver:
        environ = cli_env(env, receiver, OTEL_EXPORTER_OTLP_PROTOCOL="grpc")
        # stderr is a terminal (the progress line goes there); stdout, the summary, is a pipe.
        master, slave = pty.openpty()
        proc = subprocess.Popen([sys.executable, "-m", "runtime.cli", "--asset", "+speakers"], env=environ,
                                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=slave, text=True)
        os.close(slave)
        chunks: list[bytes] = []

        def drain() -> None:
            while True:
                try:
                    data = os.read(master, 65536)
                except OSError:  # the terminal closed: the process is gone
                    return
                if not data:
                    return
                chunks.append(data)

        reader = threading.Thread(target=drain, daemon=True)
        reader.start()
        stdout, _ = proc.communicate(timeout=300)
        reader.join(timeout=10)
        os.close(master)
        terminal = b"".join(chunks).decode("utf-8", "replace")
        assert proc.returncode == 0, terminal[-3000:]
        trace_id = printed_trace_id(stdout)
        assert receiver.wait_for(lambda: any(s.name == "sync.run" for s in receiver.spans()))
        spans = receiver.spans()
        assert {s.trace_id for s in spans} == {trace_id}
        speakers = one(s for s in spans if s.name == "asset.materialize" and s.attributes["asset.name"] == "speakers")
        assert speakers.attributes["asset.rows_written"] == env.rows("SELECT count(*) FROM speakers")[0][0]
        assert receiver.wait_for(lambda: latest(receiver.metrics(), "rows_synced"))
        assert set(latest(receiver.metrics(), "rows_synced")) == {(n, "success") for n in ("users", "calls", "speakers")}

    # The progress line was drawn in place (carriage return, erase line) with rows read so far,
    # and erased before each log line, which starts on a line of its own.
    calls_read = bq_count(env, "call")
    progress = rf"\r\x1b\[K\d/3 assets done \| running: [a-z, ]+ \| read so far: [^\r]*gong__call {calls_read:,} rows"
    assert re.search(progress, terminal), terminal[-2000:]
    assert re.search(r"\r\x1b\[K3/3 assets done \| running: -\r\x1b\[K", terminal)
    stamp = r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}"
    logs = [part for part in terminal.split("\r\x1b[K") if re.search(stamp, part)]
    assert len(logs) > 5 and [part for part in logs if not re.match(stamp, part)] == []
    assert CANARY not in terminal + stdout
