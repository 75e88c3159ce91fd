"""A run killed at any point (SIGKILL: no cleanup, no goodbye) and run again ends with the
destination equal to the source: no lost rows, no duplicates, the checkpoint never ahead of the data.

The process is stopped at a known point by a real obstacle (a stalled network stream, a lock a
concurrent session holds), checked there, killed, and the next run starts from what it left.
"""

from __future__ import annotations

import datetime as dt
import logging
import re
import signal
import subprocess
from pathlib import Path

import psycopg
import pytest

from assets import ALL_ASSETS
from runtime.load import open_pipeline
from runtime.local.seed import CASES, insert_rows, seed_workspace, soft_delete, update_rows
from runtime.settings import load_settings
from tests.failures.harness import assert_in_step, spawn, wait_until
from tests.helpers import outcome, sync
from tests.runtime.test_sync import CORE, GONG_TABLES

LATER = dt.datetime(2026, 3, 1, 12, 0, 0, 654321, tzinfo=dt.UTC)
RAW_KEYS = {
    "gong__users": "id", "gong__call": "id, workspace_id", "gong__transcript": 'call_id, "index", workspace_id',
    "gong__call_speaker": "id, call_id", "gong__call_participant": "id, call_id",
}


@pytest.fixture
def seeded(env, caplog):
    caplog.set_level(logging.INFO)
    seed_workspace(env.bq, project=env.emulator.project, gong_dataset=env.gong_dataset, calls=400, tables=GONG_TABLES)
    return env


def change_the_source(env) -> None:
    """What a later Fivetran sync brings: new rows, updated rows, a soft delete."""
    ws = CASES.workspace_ids[0]
    insert_rows(env.bq, env.gong("call"), [{"id": "9000000000000000001", "workspace_id": ws, "title": "Brand new"}],
                synced_at=LATER)
    update_rows(env.bq, env.gong("call"), {"id": CASES.shared_call_id, "workspace_id": ws}, {"title": "Renamed"}, LATER)
    # A Gong user behind some app speaker gets a new email; one of the app's speakers is deleted.
    user_id = env.rows(
        "SELECT s.user_id FROM gong_raw.gong__call_speaker s JOIN gong_sync.speakers_ids m"
        " ON m.gong_call_id = s.call_id AND m.gong_speaker_id = s.id WHERE s.user_id IS NOT NULL ORDER BY 1 LIMIT 1"
    )[0][0]
    update_rows(env.bq, env.gong("users"), {"id": user_id}, {"email_address": "moved@example.org"}, LATER)
    speaker = env.rows("SELECT m.gong_speaker_id, m.gong_call_id FROM gong_sync.speakers_ids m JOIN speakers s"
                       " ON s.id = m.id ORDER BY 1, 2 LIMIT 1")[0]
    soft_delete(env.bq, env.gong("call_speaker"), {"id": speaker[0], "call_id": speaker[1]}, LATER)


def kill(process: subprocess.Popen) -> None:
    assert process.poll() is None, "the run ended before it could be killed"
    process.send_signal(signal.SIGKILL)
    assert process.wait(30) == -signal.SIGKILL


def blocked_by(conn: psycopg.Connection) -> list[int]:
    with psycopg.connect(conn.info.dsn, autocommit=True) as watcher:
        return [r[0] for r in watcher.execute(
            "SELECT pid FROM pg_stat_activity WHERE %s = ANY(pg_blocking_pids(pid))", (conn.info.backend_pid,)
        ).fetchall()]


def checkpoints_as_a_new_machine_sees_them(env, tmp_path: Path) -> dict[str, str]:
    """Each source's checkpoint restored from Postgres alone, by a pipeline with an empty working folder."""
    settings = load_settings(pipelines_dir=tmp_path / "fresh")
    found = {}
    for spec in ALL_ASSETS:
        if spec.name not in CORE.split(","):
            continue
        pipeline = open_pipeline(spec, settings, env.database_url)
        pipeline.sync_destination()
        resources = next(iter(pipeline.state.get("sources", {}).values()), {}).get("resources", {})
        for source in spec.sources:
            value = resources.get(source.raw_table, {}).get("incremental", {}).get(source.cursor, {}).get("last_value")
            if value is not None:
                found[source.raw_table] = value
    return found


def assert_checkpoints_not_ahead_of_data(env, tmp_path: Path) -> None:
    checkpoints = checkpoints_as_a_new_machine_sees_them(env, tmp_path)
    assert set(checkpoints) == set(RAW_KEYS)
    for table, checkpoint in checkpoints.items():
        newest = env.rows(f"SELECT max(_fivetran_synced) FROM gong_raw.{table}")[0][0]
        assert newest is not None and checkpoint <= newest, (table, checkpoint, newest)


def assert_raw_has_no_duplicates(env) -> None:
    for table, key in RAW_KEYS.items():
        assert env.rows(f"SELECT count(*) = count(DISTINCT ({key})) FROM gong_raw.{table}") == [(True,)], table


def test_killed_while_reading_from_bigquery(seeded, storage_proxy, subprocess_env, tmp_path):
    storage_proxy.stall(after_bytes=100_000)  # the stream hangs part-way through a table
    process = spawn("--asset", CORE, environ=subprocess_env, log_path=tmp_path / "run.log")
    try:
        wait_until(lambda: storage_proxy.stalled, 120, "a read to stall")
        kill(process)
    finally:
        process.kill()
        storage_proxy.resume()
    report = sync(CORE)
    assert report.status == "success", [o.error for o in report.outcomes]
    assert_in_step(seeded)
    assert_raw_has_no_duplicates(seeded)


def test_killed_while_loading_into_postgres(seeded, subprocess_env, tmp_path, caplog):
    assert sync(CORE).status == "success"
    change_the_source(seeded)
    holder = seeded.connect()
    holder.execute("BEGIN")
    # dlt marks a load complete with one row in _dlt_loads, after its data and its state: the
    # run stops right there, with the rows merged and the load not yet complete.
    holder.execute("LOCK TABLE gong_raw._dlt_loads IN EXCLUSIVE MODE")
    process = spawn("--asset", "calls", environ=subprocess_env, log_path=tmp_path / "run.log")
    try:
        wait_until(lambda: blocked_by(holder), 120, "the load to wait on _dlt_loads")
        assert seeded.rows("SELECT title FROM gong_raw.gong__call WHERE id = '9000000000000000001'") == [("Brand new",)]
        assert_checkpoints_not_ahead_of_data(seeded, tmp_path)
        kill(process)
    finally:
        process.kill()
        holder.execute("ROLLBACK")
        holder.close()
    report = sync(CORE)
    assert report.status == "success", [o.error for o in report.outcomes]
    # The package the killed run left is dealt with first (finished, or discarded and read again).
    assert re.search(r"calls: (finishing|discarding) 1 load package\(s\) left by an interrupted run", caplog.text)
    assert_in_step(seeded)
    assert_raw_has_no_duplicates(seeded)
    assert_checkpoints_not_ahead_of_data(seeded, tmp_path)


def test_killed_between_landing_and_building(seeded, subprocess_env, tmp_path):
    assert sync(CORE).status == "success"
    change_the_source(seeded)
    holder = seeded.connect()
    holder.execute("BEGIN")
    # Every build starts by locking its watermark row: the run stops after landing, before building.
    holder.execute("LOCK TABLE gong_sync.asset_watermarks IN EXCLUSIVE MODE")
    process = spawn("--asset", "calls", environ=subprocess_env, log_path=tmp_path / "run.log")
    try:
        wait_until(lambda: blocked_by(holder), 120, "the build to wait for its watermark")
        assert seeded.rows("SELECT title FROM gong_raw.gong__call WHERE id = '9000000000000000001'") == [("Brand new",)]
        assert seeded.rows("SELECT title FROM calls WHERE gong_call_id = '9000000000000000001'") == []
        assert_checkpoints_not_ahead_of_data(seeded, tmp_path)
        kill(process)
    finally:
        process.kill()
        holder.execute("ROLLBACK")
        holder.close()
    report = sync(CORE)
    assert report.status == "success", [o.error for o in report.outcomes]
    # Nothing new to read for calls: the build alone brings the landed rows to the destination.
    assert outcome(report, "calls").rows_loaded == 0
    assert outcome(report, "calls").rows_written >= 2
    # The speaker deleted at the source goes once; sync_status says what went with it.
    speakers = outcome(report, "speakers")
    assert speakers.rows_deleted == 1
    assert seeded.rows("SELECT (error_details ->> 'deleted')::int, error_details -> 'cascade' FROM sync_status"
                       " WHERE entity_type = 'speakers'") == [(1, speakers.cascade)]
    assert_in_step(seeded)
    assert_raw_has_no_duplicates(seeded)


@pytest.mark.parametrize("delay_s", [0.5, 2.0])
def test_killed_at_an_arbitrary_moment_of_a_first_run(seeded, subprocess_env, tmp_path, delay_s):
    log = tmp_path / "run.log"
    process = spawn("--asset", CORE, environ=subprocess_env, log_path=log)
    try:
        wait_until(lambda: "asset.start" in log.read_text(errors="replace"), 120, "the first asset to start")
        try:
            process.wait(delay_s)
        except subprocess.TimeoutExpired:
            pass
        kill(process)
    finally:
        process.kill()
    report = sync(CORE)
    assert report.status == "success", [o.error for o in report.outcomes]
    assert_in_step(seeded)
    assert_raw_has_no_duplicates(seeded)
    assert_checkpoints_not_ahead_of_data(seeded, tmp_path)
