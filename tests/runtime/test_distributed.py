"""The flow on a distributed task runner: each asset a task on a Dask worker process, taking plain
values and opening its own connections, fills the same rows as the thread runner in one process."""

from __future__ import annotations

import psycopg
import pytest
from psycopg import sql

from runtime.flow import sync_flow
from runtime.local.seed import seed_workspace
from tests.helpers import outcome, report_of

#: Every app table's rows with the pipeline's generated ids and sync times replaced by the
#: natural keys they stand for: what two databases filled from the same sources must share.
APP_ROWS = {
    "users": "SELECT email, name, role FROM users",
    "calls": "SELECT gong_call_id, title, scheduled_at, duration_seconds, call_type, product, metadata, prefect_reps,"
             " date FROM calls",
    "speakers": "SELECT c.gong_call_id, s.name, s.email, s.company_side, s.talk_time_seconds,"
                " s.talk_time_percentage, u.email, s.role FROM speakers s JOIN calls c ON c.id = s.call_id"
                " LEFT JOIN users u ON u.id = s.manager_id",
    "transcripts": "SELECT c.gong_call_id, t.sequence_number, t.start_time_ms, t.text, t.sentiment, t.topics,"
                   " t.chunk_metadata, t.full_text_search::text, s.name FROM transcripts t"
                   " JOIN calls c ON c.id = t.call_id LEFT JOIN speakers s ON s.id = t.speaker_id",
    "opportunities": "SELECT gong_opportunity_id, name, account_name, owner_email, stage, close_date, amount,"
                     " health_score, metadata FROM opportunities",
    "emails": "SELECT e.gong_email_id, o.gong_opportunity_id, e.subject, e.sender_email, e.recipients, e.sent_at,"
              " e.body_snippet, e.metadata FROM emails e LEFT JOIN opportunities o ON o.id = e.opportunity_id",
    "call_opportunities": "SELECT c.gong_call_id, o.gong_opportunity_id FROM call_opportunities co"
                          " JOIN calls c ON c.id = co.call_id JOIN opportunities o ON o.id = co.opportunity_id",
    "sync_status": "SELECT entity_type, last_sync_status, items_synced, errors_count FROM sync_status",
}


def _export(variables: dict[str, str]) -> None:
    """Runs in each worker (a bound `os.environ.update` would update a pickled copy)."""
    import os

    os.environ.update(variables)


def app_rows(url: str) -> dict[str, list[tuple]]:
    with psycopg.connect(url) as conn:
        return {table: sorted(conn.execute(query).fetchall(), key=repr) for table, query in APP_ROWS.items()}


@pytest.fixture(scope="module")
def dask_cluster():
    """A local Dask cluster of two worker processes (one thread each), started once for the module."""
    distributed = pytest.importorskip("distributed")
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster:
        yield cluster


def test_a_dask_run_fills_the_same_rows_as_the_thread_runner_and_reports_failures(env, dask_cluster, monkeypatch):
    import distributed
    from prefect_dask import DaskTaskRunner

    seed_workspace(env.bq, project=env.emulator.project, gong_dataset=env.gong_dataset,
                   salesforce_dataset=env.salesforce_dataset, calls=40)
    on_dask = sync_flow.with_options(task_runner=DaskTaskRunner(address=dask_cluster.scheduler_address))
    # The workers read their settings from their own environment, as a deployment's workers do:
    # they were started before this test's, so each run hands them the test's variables.
    with dask_cluster.get_client() as client:
        client.run(_export, env.vars())

    with dask_cluster.get_client() as client, distributed.get_task_stream(client) as tasks:
        report = report_of(on_dask(assets=["*"], return_state=True))
    assert report.status == "success", [(o.asset, o.error) for o in report.outcomes]
    # Every asset was a task on the cluster's workers, not a thread of this process.
    assert len(tasks.data) == len(report.outcomes)
    assert {t["worker"] for t in tasks.data} <= set(dask_cluster.scheduler_info["workers"])
    assert {o.asset: o.status for o in report.outcomes} == {
        n: "success" for n in ("users", "calls", "speakers", "transcripts", "opportunities", "emails",
                               "call_opportunities")}
    assert outcome(report, "transcripts").rows_written > 0
    on_dask_rows = app_rows(env.database_url)

    # The same sources into a second database, on the thread runner in this process.
    threaded_db = f"{env.database_url.rsplit('/', 1)[1]}_threads"
    admin = env.database_url
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(threaded_db)))
    threaded_url = f"{admin.rsplit('/', 1)[0]}/{threaded_db}"
    try:
        monkeypatch.setenv("DATABASE_URL", threaded_url)
        monkeypatch.setenv("PIPELINES_DIR", str(env.pipelines_dir.parent / "threads"))
        assert report_of(sync_flow(assets=["*"], return_state=True)).status == "success"
        threaded_rows = app_rows(threaded_url)
    finally:
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(threaded_db)))
        monkeypatch.setenv("DATABASE_URL", env.database_url)
        monkeypatch.setenv("PIPELINES_DIR", str(env.pipelines_dir))
    assert {t: len(r) for t, r in on_dask_rows.items()} == {t: len(r) for t, r in threaded_rows.items()}
    assert all(on_dask_rows[t] for t in APP_ROWS), {t: len(r) for t, r in on_dask_rows.items()}
    assert on_dask_rows == threaded_rows

    # A failure on a worker comes back as the asset's outcome: named, its downstream skipped,
    # its siblings untouched, the run failed.
    env.bq.delete_table(env.gong("users"))
    report = report_of(on_dask(assets=["users", "calls", "speakers"], return_state=True))
    assert report.status == "failed"
    users = outcome(report, "users")
    assert users.status == "failed" and f"{env.gong_dataset}.users does not exist" in users.error
    assert outcome(report, "speakers").status == "skipped" and "users" in outcome(report, "speakers").error
    assert outcome(report, "calls").status == "success"
    assert env.rows("SELECT last_sync_status FROM sync_status WHERE entity_type = 'users'") == [("failed",)]


def test_materialize_on_a_dask_scheduler_puts_the_workers_spans_in_the_runs_trace(env, dask_cluster):
    """As an operator runs it: `materialize` with DASK_SCHEDULER_ADDRESS set and a Prefect API."""
    from tests.observability.otlp_receiver import OtlpReceiver
    from tests.observability.test_telemetry import CANARY, cli_env, materialize, one, printed_trace_id

    seed_workspace(env.bq, project=env.emulator.project, gong_dataset=env.gong_dataset, calls=12,
                   tables=["gong.users", "gong.call"])
    with OtlpReceiver() as receiver:
        environ = cli_env(env, receiver, DASK_SCHEDULER_ADDRESS=dask_cluster.scheduler_address)
        with dask_cluster.get_client() as client:
            client.run(_export, {k: v for k, v in environ.items() if k in env.vars() or k.startswith(("OTEL_", "DATABASE"))})
        result = materialize("--asset", "users,calls", environ=environ)
        assert result.returncode == 0, result.stderr[-3000:]
        trace_id = printed_trace_id(result.stdout)
        assert receiver.wait_for(lambda: sum(s.name == "asset.materialize" for s in receiver.spans()) == 2
                                 and any(s.name == "sync.run" for s in receiver.spans()))
        spans = receiver.spans()
        run = one(s for s in spans if s.name == "sync.run")
        assert run.trace_id == trace_id
        for name, table in (("users", "users"), ("calls", "calls")):
            # Sent by a worker process, under the flow's run span, with its steps and row counts.
            asset = one(s for s in spans if s.name == "asset.materialize" and s.attributes["asset.name"] == name)
            assert asset.trace_id == trace_id and asset.parent_id == run.span_id
            assert asset.attributes["asset.status"] == "success"
            assert asset.attributes["asset.rows_written"] == env.rows(f"SELECT count(*) FROM {table}")[0][0] > 0
            assert {s.name for s in spans if s.parent_id == asset.span_id} == {"asset.land", "asset.build"}
        assert CANARY not in receiver.as_text() + result.stdout + result.stderr


def test_an_asset_job_checks_the_run_lock_by_its_holders_session(env):
    """A worker has no handle on the flow's lock connection: it checks, from its own connection,
    that the session which took the run lock still holds it (a pid alone could be a new session)."""
    import datetime as dt
    import uuid

    from observability.events import RunInfo
    from runtime.local.mutations import update_rows
    from runtime.remote import AssetJob, run_job
    from runtime.session import RUN_LOCK_KEY, lock_holder
    from tests.helpers import sync

    seed_workspace(env.bq, project=env.emulator.project, gong_dataset=env.gong_dataset, calls=12, tables=["gong.users"])
    assert sync("users").status == "success"
    user = next(iter(env.bq.query(f"SELECT id, email_address FROM `{env.gong('users')}` LIMIT 1").result()))
    later = dt.datetime(2026, 3, 1, 12, tzinfo=dt.UTC)

    def job(holder) -> AssetJob:  # noqa: ANN001 - a LockHolder
        run = RunInfo(run_id=str(uuid.uuid4()), selection="users", assets=("users",))
        return AssetJob(asset="users", run=run, lock=holder)

    def name() -> str:
        return env.rows("SELECT name FROM users WHERE email = %s", (user["email_address"].lower(),))[0][0]

    with psycopg.connect(env.database_url, autocommit=True) as held:
        held.execute("SELECT pg_advisory_lock(%s)", (RUN_LOCK_KEY,))
        holder = lock_holder(held)
        update_rows(env.bq, env.gong("users"), {"id": user["id"]}, {"first_name": "Ada", "last_name": "Lovelace"}, later)
        result = run_job(job(holder))
        assert (result.outcome.status, result.outcome.rows_written) == ("success", 1)
        assert name() == "Ada Lovelace"
    # The holder's session has ended (its lock went with it): the job stops before it lands.
    update_rows(env.bq, env.gong("users"), {"id": user["id"]}, {"first_name": "Grace", "last_name": "Hopper"},
                later + dt.timedelta(hours=1))
    result = run_job(job(holder))
    assert (result.outcome.status, result.outcome.error_type, result.outcome.step) == ("failed", "RunLockLost", "land")
    assert "no longer held" in result.outcome.error
    assert name() == "Ada Lovelace"
