"""Transient failures are retried with backoff and logged; permanent ones fail at once.

Every fault is real: backends terminated in Postgres, connections reset or refused by a proxy,
a concurrent writer, HTTP errors answered in front of the emulator, a stream cut mid-read.
"""

from __future__ import annotations

import datetime as dt
import logging
import re
import threading
import time
import uuid
from urllib.parse import urlsplit

import psycopg
import pytest
from psycopg import sql

from runtime.flow import sync_flow
from runtime.local.seed import CASES, insert_rows, seed_workspace
from tests.failures.harness import AtStep, run_with_faults, wait_until
from tests.helpers import outcome, sync
from tests.runtime.test_sync import GONG_TABLES, actual_calls, actual_transcripts, expected_calls, expected_transcripts

LATER = dt.datetime(2026, 3, 1, 12, 0, 0, 654321, tzinfo=dt.UTC)
#: The app's calls as the app sees them: uuid, Gong id and a few written values.
CALL_ROWS = "SELECT id, gong_call_id, title, processed_at FROM calls ORDER BY id"
CALL_STATUS = "SELECT last_sync_status, error_details ->> 'error' FROM sync_status WHERE entity_type = 'calls'"


@pytest.fixture
def seeded(env, caplog):
    caplog.set_level(logging.INFO)
    seed_workspace(env.bq, project=env.emulator.project, gong_dataset=env.gong_dataset, calls=40, tables=["gong.call"])
    return env


def retry_lines(caplog, what: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "gong_sync.retry" and r.getMessage().startswith(what)]


def assert_calls_in_step(env) -> None:
    assert actual_calls(env) == expected_calls(env)
    assert env.rows("SELECT count(*) = count(DISTINCT (id, workspace_id)) FROM gong_raw.gong__call") == [(True,)]


def terminate_run_backends(env) -> int:
    """pg_terminate_backend on every connection of the run except the one holding its lock."""
    with env.connect() as conn:
        killed = conn.execute(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE datname = current_database()"
            " AND pid <> pg_backend_pid()"
            " AND pid NOT IN (SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND granted)"
        ).fetchone()[0]
    return killed


def blocked_by(env, pid: int) -> list[int]:
    with env.connect() as conn:
        return [r[0] for r in conn.execute(
            "SELECT pid FROM pg_stat_activity WHERE %s = ANY(pg_blocking_pids(pid))", (pid,)
        ).fetchall()]


def test_backends_terminated_before_the_build_are_retried_and_the_run_succeeds(seeded, caplog):
    killed: list[int] = []
    report = run_with_faults("calls", faults=[AtStep("calls", "build", lambda: killed.append(terminate_run_backends(seeded)))])
    assert killed and killed[0] >= 1
    assert outcome(report, "calls").status == "success", outcome(report, "calls").error
    lines = retry_lines(caplog, "calls: build")
    assert len(lines) >= 1
    assert re.fullmatch(
        r"calls: build: attempt 1 of 4 failed \(TransientError: (AdminShutdown|OperationalError): .+\); retrying in \d+\.\d\ds", lines[0]
    ), lines
    assert_calls_in_step(seeded)


def lock_holder_ports(env) -> frozenset[int]:
    """Where the run lock's connection comes from (its client port), as Postgres sees it."""
    return frozenset(r[0] for r in env.rows(
        "SELECT a.client_port FROM pg_stat_activity a JOIN pg_locks l ON l.pid = a.pid"
        " WHERE l.locktype = 'advisory' AND l.granted AND a.datname = current_database()"
    ))


def test_connections_reset_while_landing_are_retried(seeded, pg_proxy, caplog):
    cut: list[int] = []

    def reset_all_but_the_lock() -> None:
        # The run lock's own connection is spared: losing it stops a run on purpose (another run
        # may take the lock), which is no transient failure to retry.
        spared = lock_holder_ports(seeded)
        assert len(spared) == 1
        cut.append(pg_proxy.cut(sparing=spared))

    report = run_with_faults("calls", faults=[AtStep("calls", "land", reset_all_but_the_lock)])
    assert cut and cut[0] >= 1
    assert outcome(report, "calls").status == "success", outcome(report, "calls").error
    assert any(re.fullmatch(r"calls: land: attempt 1 of 4 failed \(.+\); retrying in \d+\.\d\ds", line)
               for line in retry_lines(caplog, "calls: land")), caplog.text[-3000:]
    assert_calls_in_step(seeded)


class _AcceptOnRetry(logging.Handler):
    """Lets the proxy accept connections again as soon as the first retry is announced."""

    def __init__(self, proxy) -> None:  # noqa: ANN001
        super().__init__()
        self.proxy = proxy

    def emit(self, record: logging.LogRecord) -> None:
        if "attempt 1 of 4 failed" in record.getMessage():
            self.proxy.accept()


def test_refused_connections_while_landing_are_retried_until_postgres_answers(seeded, pg_proxy, caplog):
    handler = _AcceptOnRetry(pg_proxy)
    logging.getLogger("gong_sync.retry").addHandler(handler)
    try:
        # Open connections stay up; every new one (dlt opens its own) is refused.
        report = run_with_faults("calls", faults=[AtStep("calls", "land", pg_proxy.refuse)])
    finally:
        logging.getLogger("gong_sync.retry").removeHandler(handler)
    assert outcome(report, "calls").status == "success", outcome(report, "calls").error
    lines = retry_lines(caplog, "calls: land")
    assert lines and lines[0].startswith("calls: land: attempt 1 of 4 failed (TransientError: "), lines
    assert "Connection refused" in lines[0]
    assert_calls_in_step(seeded)


def test_a_serialization_failure_in_the_build_is_retried(seeded, caplog):
    assert sync("calls").status == "success"  # the asset's watermark row exists from here on
    insert_rows(seeded.bq, seeded.gong("call"), [{"id": "9000000000000000001", "workspace_id": CASES.workspace_ids[0], "title": "New"}],
                synced_at=LATER)
    writer = seeded.connect()

    def concurrent_update() -> None:
        # Another session updates the watermark row and commits while the build waits for it:
        # the build's REPEATABLE READ snapshot can no longer lock that row.
        writer.execute("BEGIN")
        writer.execute("UPDATE gong_sync.asset_watermarks SET built_at = now() WHERE asset = 'calls'")

        def commit_once_blocking() -> None:
            wait_until(lambda: blocked_by(seeded, writer.info.backend_pid), 60, "the build to wait for the row")
            writer.execute("COMMIT")

        threading.Thread(target=commit_once_blocking, daemon=True).start()

    try:
        report = run_with_faults("calls", faults=[AtStep("calls", "build", concurrent_update)])
    finally:
        writer.close()
    assert outcome(report, "calls").status == "success", outcome(report, "calls").error
    lines = retry_lines(caplog, "calls: build")
    assert lines and lines[0].startswith(
        "calls: build: attempt 1 of 4 failed (TransientError: SerializationFailure: could not serialize access"
    ), lines
    assert_calls_in_step(seeded)
    assert seeded.rows("SELECT title FROM calls WHERE gong_call_id = '9000000000000000001'") == [("New",)]


def test_bigquery_overload_answers_and_a_stream_cut_mid_read_lose_and_double_nothing(env, rest_proxy, storage_proxy):
    seed_workspace(env.bq, project=env.emulator.project, gong_dataset=env.gong_dataset, calls=400, tables=GONG_TABLES)
    # Transcripts are built on the app's calls and speakers: those land first, with no fault.
    assert sync("+speakers").status == "success"
    # The BigQuery client library retries these itself (exponential backoff with jitter); the
    # Storage read resumes a cut stream at its offset.
    rest_proxy.http_errors("503 Service Unavailable", "429 Too Many Requests", "500 Internal Server Error")
    storage_proxy.cut_after(150_000)
    report = sync("transcripts")
    assert outcome(report, "transcripts").status == "success", outcome(report, "transcripts").error
    assert rest_proxy.http_errors_sent == 3
    assert storage_proxy.cuts == 1
    source = env.bq.query(f"SELECT count(*) AS n FROM `{env.gong('transcript')}`").result()
    total = next(iter(source))["n"]
    assert outcome(report, "transcripts").rows_read == total
    assert env.rows("SELECT count(*), count(DISTINCT (call_id, index, workspace_id)) FROM gong_raw.gong__transcript") == [
        (total, total)
    ]
    # Every monologue of the calls the app keeps, each once, with its whole text.
    assert actual_transcripts(env) == expected_transcripts(env)
    assert env.rows("SELECT count(*) = count(DISTINCT (call_id, sequence_number)) FROM transcripts") == [(True,)]


# -- permanent failures ---------------------------------------------------------------------


@pytest.fixture
def limited_role(env, pg_server_url):
    """A login role that owns what it creates but is no superuser; dropped with what it owns."""
    role = f"gs_role_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(pg_server_url, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE ROLE {} LOGIN PASSWORD 'role-pw'").format(sql.Identifier(role)))
    db = env.database_url.rsplit("/", 1)[1]
    with env.connect() as conn:
        conn.execute(sql.SQL("GRANT CONNECT, CREATE ON DATABASE {} TO {}").format(sql.Identifier(db), sql.Identifier(role)))
        conn.execute(sql.SQL("GRANT USAGE, CREATE ON SCHEMA public TO {}").format(sql.Identifier(role)))
    yield role
    with env.connect() as conn:
        conn.execute(sql.SQL("DROP OWNED BY {}").format(sql.Identifier(role)))
    with psycopg.connect(pg_server_url, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(role)))


def _missing_source_table(env, monkeypatch, role):  # noqa: ANN001, ANN202
    env.bq.delete_table(env.gong("call"))
    return "land", "SourceTableMissing", f"source table prefect-data-warehouse.{env.gong_dataset}.call does not exist"


def _sql_error(env, monkeypatch, role):  # noqa: ANN001, ANN202
    # The app's migrations added a rule the new row breaks: the build's SQL can no longer write it.
    # (A column whose type no longer fits is caught before any work: see the test below.)
    with env.connect() as conn:
        conn.execute("ALTER TABLE calls ADD CONSTRAINT calls_title_not_new CHECK (title <> 'New')")
    return ("build", "BuildError",
            'CheckViolation: new row for relation "calls" violates check constraint "calls_title_not_new"')


def _permission_denied(env, monkeypatch, role):  # noqa: ANN001, ANN202
    with env.connect() as conn:
        conn.execute(sql.SQL("REVOKE INSERT, UPDATE ON calls FROM {}").format(sql.Identifier(role)))
    return "build", "PermanentError", "InsufficientPrivilege: permission denied for table calls"


@pytest.mark.parametrize("break_it", [_missing_source_table, _sql_error, _permission_denied])
def test_permanent_failures_fail_at_once_without_retries(seeded, limited_role, monkeypatch, caplog, break_it):
    parts = urlsplit(seeded.database_url)
    monkeypatch.setenv("DATABASE_URL", parts._replace(netloc=f"{limited_role}:role-pw@{parts.hostname}:{parts.port}").geturl())
    assert sync("calls").status == "success"
    if break_it is not _missing_source_table:  # something new for the build to write
        insert_rows(seeded.bq, seeded.gong("call"), [{"id": "9000000000000000001", "workspace_id": CASES.workspace_ids[0], "title": "New"}],
                    synced_at=LATER)
    before = seeded.rows(CALL_ROWS)
    step, error_type, message = break_it(seeded, monkeypatch, limited_role)
    # Long backoffs: a retry would show in the time taken as well as in the log.
    monkeypatch.setenv("RETRY_BACKOFF_BASE", "5")
    monkeypatch.setenv("RETRY_BACKOFF_MAX", "5")
    started = time.monotonic()
    report = sync("calls")
    calls = outcome(report, "calls")
    assert calls.status == "failed"
    assert (calls.step, calls.error_type) == (step, error_type)
    assert message in calls.error
    assert retry_lines(caplog, "calls:") == []
    assert time.monotonic() - started < 30
    assert seeded.rows(CALL_ROWS) == before
    assert seeded.rows(CALL_STATUS) == [("failed", calls.error)]


def test_an_app_table_that_no_longer_fits_stops_the_run_at_once_without_retries(seeded, monkeypatch, caplog):
    assert sync("calls").status == "success"
    new = {"id": "9000000000000000001", "workspace_id": CASES.workspace_ids[0], "title": "New"}
    insert_rows(seeded.bq, seeded.gong("call"), [new], synced_at=LATER)
    # Someone changed a column the pipeline writes: the contract check stops the run before any work.
    with seeded.connect() as conn:
        conn.execute("ALTER TABLE calls ALTER COLUMN title TYPE integer USING NULL")
    before = seeded.rows(CALL_ROWS)
    status_before = seeded.rows("SELECT * FROM sync_status")
    monkeypatch.setenv("RETRY_BACKOFF_BASE", "5")
    monkeypatch.setenv("RETRY_BACKOFF_MAX", "5")
    started = time.monotonic()
    state = sync_flow(assets=["calls"], return_state=True)
    assert state.is_failed()
    error = state.result(raise_on_failure=False)
    assert type(error).__name__ == "ContractError", error
    assert "public.calls.title: expected character varying or text, found integer" in str(error)
    assert "nothing was done" in str(error)
    assert retry_lines(caplog, "connect") == [] and retry_lines(caplog, "calls:") == []
    assert time.monotonic() - started < 30
    assert seeded.rows(CALL_ROWS) == before
    assert seeded.rows("SELECT * FROM sync_status") == status_before
    assert seeded.rows("SELECT count(*) FROM gong_raw.gong__call WHERE id = '9000000000000000001'") == [(0,)]


def test_a_hung_bigquery_stream_ends_at_its_deadline_and_fails_the_asset(env, storage_proxy, monkeypatch):
    seed_workspace(env.bq, project=env.emulator.project, gong_dataset=env.gong_dataset, calls=40, tables=["gong.call"])
    monkeypatch.setenv("BIGQUERY_TIMEOUT", "2")
    monkeypatch.setenv("BIGQUERY_READ_TIMEOUT", "2")
    monkeypatch.setenv("RETRIES", "1")
    storage_proxy.stall(after_bytes=0)  # the Storage API never answers
    started = time.monotonic()
    try:
        report = sync("calls")
    finally:
        storage_proxy.resume()
    calls = outcome(report, "calls")
    assert calls.status == "failed"
    assert calls.error.endswith("no answer within 2 s (BIGQUERY_TIMEOUT)"), calls.error
    # Two attempts of a 2 s deadline, not the library's 10 minutes or a day.
    assert time.monotonic() - started < 60
    assert env.rows(CALL_STATUS) == [("failed", calls.error)]
