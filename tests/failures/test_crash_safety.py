"""Crash safety and cursor integrity (issue 14), on real parts: real `materialize` processes killed
with SIGKILL, two working folders against one database, a cursor value in the future, load ids
from a skewed clock, the run lock's connection terminated by Postgres, an application holding a
table lock, a hundred runs' disk use, rows removed from BigQuery outright, runs skipped for longer
than STALE_AFTER, a `--full-refresh` killed after dlt truncated the raw table, and a row that
becomes visible below the checkpoint. The random-kill torture test is in test_torture.py.

No mocks: every fault is a real process, a real lock or a real pg_terminate_backend.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import random
import signal
import subprocess
import time
from pathlib import Path

import psycopg
import pytest
from google.cloud import bigquery

from assets import ALL_ASSETS
from runtime.flow import execute
from runtime.load import open_pipeline
from runtime.local.seed import CASES, insert_rows, seed_workspace, update_rows
from runtime.session import RUN_LOCK_KEY
from runtime.settings import load_settings
from tests.failures.harness import assert_in_step, materialize, spawn, wait_until
from tests.helpers import outcome, sync
from tests.runtime import test_sync
from tests.runtime.test_sync import CORE, GONG_TABLES, live, source

LATER = dt.datetime(2026, 3, 1, 12, 0, 0, 654321, tzinfo=dt.UTC)
#: Far beyond any tolerance: the value a broken connector or a typo writes.
END_OF_TIME = dt.datetime(9999, 12, 31, 23, 59, 59, tzinfo=dt.UTC)

#: raw table → (Gong source table, its primary key).
RAW = {
    "gong__users": ("users", ("id",)),
    "gong__call": ("call", ("id", "workspace_id")),
    "gong__transcript": ("transcript", ("call_id", "index", "workspace_id")),
    "gong__call_speaker": ("call_speaker", ("id", "call_id")),
    "gong__call_participant": ("call_participant", ("id", "call_id")),
}
#: The raw tables each core asset lands.
LANDS = {"users": ["gong__users"], "calls": ["gong__call"], "transcripts": ["gong__transcript"],
         "speakers": ["gong__call_speaker", "gong__call_participant"]}


# -- what "in step" means, shared with test_torture ------------------------------------------


def _quoted(columns: tuple[str, ...]) -> str:
    return ", ".join(f'"{c}"' for c in columns)


def raw_versions(env, raw_table: str) -> dict[tuple, dt.datetime]:
    """Primary key → `_fivetran_synced` of every row of a raw table."""
    _, key = RAW[raw_table]
    return {tuple(r[:-1]): r[-1] for r in env.rows(
        f"SELECT {_quoted(key)}, _fivetran_synced FROM gong_raw.{raw_table}")}  # noqa: S608 - constants


def source_versions(env, raw_table: str, *, before: dt.datetime | None = None) -> dict[tuple, dt.datetime]:
    """Primary key → `_fivetran_synced` of every row BigQuery holds (the latest, should a key be
    there twice), optionally only those synced before `before`."""
    table, key = RAW[raw_table]
    out: dict[tuple, dt.datetime] = {}
    for r in source(env, table):
        if before is not None and r["_fivetran_synced"] > before:
            continue
        k = tuple(r[c] for c in key)
        if k not in out or r["_fivetran_synced"] > out[k]:
            out[k] = r["_fivetran_synced"]
    return out


def assert_raw_mirrors_source(env, tables=RAW) -> None:  # noqa: ANN001
    """Each raw table holds each source key once, at the version BigQuery holds: nothing missing,
    nothing extra, nothing older (a regression) and nothing twice."""
    for raw_table in tables:
        _, key = RAW[raw_table]
        assert env.rows(f"SELECT count(*) - count(DISTINCT ({_quoted(key)})) FROM gong_raw.{raw_table}") == [(0,)], (
            f"gong_raw.{raw_table} holds a key more than once")
        raw, src = raw_versions(env, raw_table), source_versions(env, raw_table)
        missing = {k: v for k, v in src.items() if k not in raw}
        extra = {k: v for k, v in raw.items() if k not in src}
        stale = {k: (raw[k], v) for k, v in src.items() if k in raw and raw[k] != v}
        assert not (missing or extra or stale), (raw_table, {"missing": list(missing)[:5], "extra": list(extra)[:5],
                                                             "raw vs source": list(stale.items())[:5]})


def expected_users(env) -> set[tuple]:
    """The app accounts the pipeline keeps: one per active internal Gong user (email, name)."""
    best: dict[str, dict] = {}
    for u in sorted(live(source(env, "users")), key=lambda u: (-u["_fivetran_synced"].timestamp(), u["id"])):
        email = u["email_address"]
        if not email or email.split("@")[-1].lower() != CASES.internal_domain:
            continue
        best.setdefault(email.lower(), u)
    out = set()
    for u in best.values():
        if u.get("active") is False:
            continue
        full = " ".join(x for x in (u.get("first_name"), u.get("last_name")) if x)
        out.add((u["email_address"].lower(), full or test_sync.name_from_email(u["email_address"])))
    return out


def actual_users(env) -> set[tuple]:
    return set(env.rows("SELECT lower(email), name FROM users"))


def assert_app_in_step(env) -> None:
    """Every app table the core assets fill equals what BigQuery holds, row for row."""
    assert_in_step(env)  # calls, transcripts, speakers
    assert actual_users(env) == expected_users(env)


def checkpoints_from_postgres(env, folder: Path, assets=("users", "calls", "transcripts", "speakers")) -> dict:  # noqa: ANN001
    """Each raw table's checkpoint as a new machine restores it from Postgres (an empty working folder)."""
    settings = load_settings(pipelines_dir=folder)
    found: dict[str, dt.datetime] = {}
    for spec in ALL_ASSETS:
        if spec.name not in assets:
            continue
        pipeline = open_pipeline(spec, settings, env.database_url)
        pipeline.sync_destination()
        resources = next(iter(pipeline.state.get("sources", {}).values()), {}).get("resources", {})
        for src in spec.sources:
            value = resources.get(src.raw_table, {}).get("incremental", {}).get(src.cursor, {}).get("last_value")
            if value is not None:
                found[src.raw_table] = as_time(value)
    return found


def as_time(value: object) -> dt.datetime:
    if isinstance(value, str):
        value = dt.datetime.fromisoformat(value)
    assert isinstance(value, dt.datetime), value
    return value if value.tzinfo else value.replace(tzinfo=dt.UTC)


def assert_checkpoints_at_the_data(env, folder: Path, tables=RAW) -> None:  # noqa: ANN001
    """No checkpoint ahead of the data (and, after a clean run, none behind it either): each equals
    the newest `_fivetran_synced` its raw table holds."""
    checkpoints = checkpoints_from_postgres(env, folder)
    for raw_table in tables:
        newest = env.rows(f"SELECT max(_fivetran_synced) FROM gong_raw.{raw_table}")[0][0]  # noqa: S608
        assert raw_table in checkpoints, (raw_table, checkpoints)
        assert newest is not None, f"{raw_table}: checkpoint {checkpoints[raw_table]} over an empty raw table"
        assert checkpoints[raw_table] <= newest, f"{raw_table}: checkpoint {checkpoints[raw_table]} ahead of data {newest}"
        assert checkpoints[raw_table] == newest, f"{raw_table}: checkpoint {checkpoints[raw_table]} behind data {newest}"


# -- processes and locks ----------------------------------------------------------------------


def kill(process: subprocess.Popen) -> None:
    process.send_signal(signal.SIGKILL)
    assert process.wait(30) == -signal.SIGKILL


def run_lock_pids(env) -> list[int]:
    """Backends holding the pipeline's run lock (pg_try_advisory_lock(RUN_LOCK_KEY))."""
    return [r[0] for r in env.rows(
        "SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND granted"
        " AND ((classid::bigint << 32) | objid::bigint) = %s AND database ="
        " (SELECT oid FROM pg_database WHERE datname = current_database())", (RUN_LOCK_KEY,))]


def wait_for_lock_release(env, timeout: float = 30) -> None:
    """A killed process's backends end once Postgres sees the socket close; wait for that."""
    wait_until(lambda: not run_lock_pids(env), timeout, "the killed run's lock to be released")


def blocked_by(env, pid: int) -> list[int]:
    return [r[0] for r in env.rows("SELECT pid FROM pg_stat_activity WHERE %s = ANY(pg_blocking_pids(pid))", (pid,))]


def tail(path: Path, chars: int = 4000) -> str:
    return path.read_text(errors="replace")[-chars:] if path.exists() else ""


def delete_from_bigquery(env, table: str, keys: list[dict]) -> int:
    """A hard delete (no `_fivetran_deleted` flag): a connector re-sync or a manual clean-up."""
    removed = 0
    for key in keys:
        where = " AND ".join(f"`{c}` = @{c}" for c in key)
        params = [bigquery.ScalarQueryParameter(c, "STRING", v) for c, v in key.items()]
        job = env.bq.query(f"DELETE FROM `{env.gong(table)}` WHERE {where}",
                           job_config=bigquery.QueryJobConfig(query_parameters=params))
        job.result()
        removed += job.num_dml_affected_rows or 0
    return removed


@pytest.fixture
def seeded(env, caplog):
    caplog.set_level(logging.INFO)
    seed_workspace(env.bq, project=env.emulator.project, gong_dataset=env.gong_dataset, calls=40, tables=GONG_TABLES)
    return env


@pytest.fixture
def calls_only(env, caplog):
    caplog.set_level(logging.INFO)
    seed_workspace(env.bq, project=env.emulator.project, gong_dataset=env.gong_dataset, calls=40, tables=["gong.call"])
    return env


def plain_calls(env, n: int) -> list[dict]:
    """`n` live calls that are neither the shared call id nor soft-deleted: safe to change."""
    counts: dict[str, int] = {}
    rows = live(source(env, "call"))
    for r in rows:
        counts[r["id"]] = counts.get(r["id"], 0) + 1
    picked = sorted((r for r in rows if counts[r["id"]] == 1), key=lambda r: r["id"])[:n]
    assert len(picked) == n
    return picked


# -- 3. a cursor value in the future ---------------------------------------------------------


def test_a_future_cursor_goes_to_dead_letters_alerts_and_never_becomes_the_checkpoint(calls_only, alert_sink, tmp_path):
    env = calls_only
    first = outcome(sync("calls"), "calls")
    assert first.status == "success", first.error
    before = first.checkpoint_after["gong__call"]
    ws = CASES.workspace_ids[0]
    future_id = "9100000000000000001"
    insert_rows(env.bq, env.gong("call"), [{"id": future_id, "workspace_id": ws, "title": "From the year 9999"}],
                synced_at=END_OF_TIME)

    # The future row alone: nothing lands, the checkpoint stays where it was.
    report = sync("calls")
    calls = outcome(report, "calls")
    assert calls.status == "success", calls.error
    assert calls.checkpoint_before["gong__call"] == before
    assert calls.checkpoint_after["gong__call"] == before
    assert calls.rows_dead_lettered == 1
    [(row_id, errors)] = env.rows("SELECT row ->> 'id', errors FROM gong_sync.dead_letters WHERE asset = 'calls'"
                                  " AND source_table = 'call' AND errors::text LIKE '%%in the future%%'")
    assert row_id == future_id
    assert errors[0]["field"] == "_fivetran_synced" and "FUTURE_CURSOR_TOLERANCE" in errors[0]["error"], errors
    assert env.rows("SELECT 1 FROM gong_raw.gong__call WHERE id = %s", (future_id,)) == []
    assert env.rows("SELECT 1 FROM calls WHERE gong_call_id = %s", (future_id,)) == []
    notices = [m["text"] for m in alert_sink.slack() if "FUTURE_CURSOR_TOLERANCE" in m.get("text", "")]
    assert notices and "calls: 1 row(s) of gong__call" in notices[0], alert_sink.slack()

    # The rows that come after it are not hidden by it: they land, and the checkpoint is theirs.
    new_id = "9100000000000000002"
    insert_rows(env.bq, env.gong("call"), [{"id": new_id, "workspace_id": ws, "title": "After the future row"}],
                synced_at=LATER)
    renamed = plain_calls(env, 1)[0]
    update_rows(env.bq, env.gong("call"), {"id": renamed["id"], "workspace_id": renamed["workspace_id"]},
                {"title": "Renamed after the future row"}, LATER)
    calls = outcome(sync("calls"), "calls")
    assert calls.status == "success", calls.error
    assert calls.rows_loaded == 2
    assert calls.checkpoint_after["gong__call"] == LATER.isoformat(timespec="microseconds")
    assert env.rows("SELECT title FROM calls WHERE gong_call_id = %s", (new_id,)) == [("After the future row",)]
    assert env.rows("SELECT title FROM calls WHERE gong_call_id = %s", (renamed["id"],)) == [
        ("Renamed after the future row",)]
    assert env.rows("SELECT 1 FROM gong_raw.gong__call WHERE id = %s", (future_id,)) == []
    # What Postgres holds (what any machine resumes from) is not the future value either.
    assert checkpoints_from_postgres(env, tmp_path / "new-machine", assets=("calls",)) == {"gong__call": LATER}
    assert test_sync.actual_calls(env) == {c for c in test_sync.expected_calls(env) if c[0] != future_id}


# -- 4. clock skew ---------------------------------------------------------------------------


def _skew_load_id(env, load_id: str, seconds: float) -> str:
    """Rewrite a completed load's id as a machine whose clock is `seconds` behind would have
    written it: in the raw rows, in dlt's state row and in dlt's record of the load."""
    whole, _, frac = load_id.partition(".")
    skewed = f"{float(load_id) - seconds:.{len(frac)}f}" if frac else str(int(whole) - int(seconds))
    with env.connect() as conn, conn.transaction():
        tables = [r[0] for r in conn.execute(
            "SELECT table_name FROM information_schema.columns WHERE table_schema = 'gong_raw'"
            " AND column_name = '_dlt_load_id'").fetchall()]
        for table in tables:
            conn.execute(f'UPDATE gong_raw."{table}" SET _dlt_load_id = %s WHERE _dlt_load_id = %s', (skewed, load_id))
        conn.execute("UPDATE gong_raw._dlt_loads SET load_id = %s WHERE load_id = %s", (skewed, load_id))
    return skewed


def test_a_change_landed_with_a_load_id_from_a_slow_clock_is_still_built(seeded):
    env = seeded
    assert sync(CORE).status == "success"
    user_id = env.rows(
        "SELECT s.user_id FROM gong_raw.gong__call_speaker s JOIN gong_sync.speakers_ids m"
        " ON m.gong_call_id = s.call_id AND m.gong_speaker_id = s.id WHERE s.user_id IS NOT NULL"
        " GROUP BY 1 ORDER BY count(*) DESC, 1 LIMIT 1")[0][0]
    newest_before = env.rows("SELECT max(load_id) FROM gong_raw._dlt_loads")[0][0]
    update_rows(env.bq, env.gong("users"), {"id": user_id}, {"email_address": "moved@example.org"}, LATER)

    # Machine B (its clock 10 minutes slow) lands the changed user; the speakers are not built yet.
    landed = outcome(sync("users"), "users")
    assert landed.status == "success" and landed.rows_loaded == 1, landed
    [(load_id,)] = env.rows("SELECT _dlt_load_id FROM gong_raw.gong__users WHERE id = %s", (user_id,))
    skewed = _skew_load_id(env, load_id, 600)
    assert float(skewed) < float(newest_before), "the skewed load id must look older than the last build's loads"
    assert env.rows("SELECT count(*) FROM speakers WHERE email = 'moved@example.org'") == [(0,)]

    report = sync("speakers")
    speakers = outcome(report, "speakers")
    assert speakers.status == "success", speakers.error
    assert speakers.rows_written >= 1
    emails = {r[0] for r in env.rows(
        "SELECT s.email FROM speakers s JOIN gong_sync.speakers_ids m ON m.id = s.id"
        " JOIN gong_raw.gong__call_speaker r ON r.id = m.gong_speaker_id AND r.call_id = m.gong_call_id"
        " WHERE r.user_id = %s", (user_id,))}
    assert emails == {"moved@example.org"}
    assert test_sync.actual_speakers(env) == test_sync.expected_speakers(env)


# -- 6. a table lock the application holds ---------------------------------------------------


@pytest.mark.parametrize("asset,table", [("users", "users"), ("calls", "calls")])
def test_a_held_table_lock_fails_the_asset_in_seconds_naming_table_and_holder(seeded, monkeypatch, asset, table):
    env = seeded
    assert outcome(sync("+" + asset), asset).status == "success"
    if asset == "users":
        user = next(u for u in live(source(env, "users")) if u["email_address"].endswith("@" + CASES.internal_domain))
        update_rows(env.bq, env.gong("users"), {"id": user["id"]}, {"first_name": "Locked", "last_name": "Out"}, LATER)
    else:
        call = plain_calls(env, 1)[0]
        update_rows(env.bq, env.gong("call"), {"id": call["id"], "workspace_id": call["workspace_id"]},
                    {"title": "Waiting for the app"}, LATER)
    monkeypatch.setenv("LOCK_TIMEOUT", "2")
    holder = env.connect()
    try:
        holder.execute("BEGIN")
        holder.execute(f"LOCK TABLE public.{table} IN ACCESS EXCLUSIVE MODE")
        started = time.monotonic()
        report = sync(asset)
        took = time.monotonic() - started
    finally:
        holder.execute("ROLLBACK")
        holder_pid = holder.info.backend_pid
        holder.close()
    failed = outcome(report, asset)
    assert failed.status == "failed", failed
    print(f"{asset}: failed after {took:.1f} s with LOCK_TIMEOUT=2: {failed.error}")
    assert took < 20, f"the run took {took:.0f} s with LOCK_TIMEOUT=2"
    assert "LOCK_TIMEOUT" in failed.error, failed.error
    assert f"public.{table}" in failed.error or f"{table} AccessExclusiveLock" in failed.error, failed.error
    assert f"pid {holder_pid}" in failed.error, failed.error
    # Once the application lets go, the next run brings the change.
    assert outcome(sync(asset), asset).status == "success"
    if asset == "users":
        assert actual_users(env) == expected_users(env)
    else:
        assert test_sync.actual_calls(env) == test_sync.expected_calls(env)


# -- stale: runs skipped on a held run lock for longer than STALE_AFTER ----------------------


def test_runs_skipped_on_a_held_lock_past_stale_after_send_a_notice(calls_only, alert_sink, subprocess_env):
    env = calls_only
    assert sync("calls").status == "success"
    time.sleep(1.1)
    holder = env.connect()
    try:
        assert holder.execute("SELECT pg_try_advisory_lock(%s)", (RUN_LOCK_KEY,)).fetchone()[0]
        alert_sink.clear()
        environ = {**subprocess_env, "SLACK_WEBHOOK_URL": alert_sink.slack_url, "STALE_AFTER": "1"}
        result = materialize("--asset", "calls", environ=environ)
        assert result.returncode == 0, result.stdout + result.stderr[-3000:]
        assert "skipped: another run holds the lock on" in result.stdout, result.stdout
        notices = [m["text"] for m in alert_sink.slack()]
        assert any("no successful sync since" in t for t in notices), notices
        # Within STALE_AFTER a skipped run is normal: no notice.
        alert_sink.clear()
        result = materialize("--asset", "calls", environ={**environ, "STALE_AFTER": "3600"})
        assert result.returncode == 0 and "skipped: another run holds the lock" in result.stdout, result.stdout
        assert not [m for m in alert_sink.slack() if "no successful sync since" in m.get("text", "")]
    finally:
        holder.close()


# -- 8. rows removed from BigQuery outright --------------------------------------------------


def test_reconcile_removes_hard_deleted_rows_under_the_mass_delete_guard(calls_only, monkeypatch):
    env = calls_only
    assert sync("calls").status == "success"
    victim, *others = plain_calls(env, 13)
    assert delete_from_bigquery(env, "call", [{"id": victim["id"], "workspace_id": victim["workspace_id"]}]) == 1

    # Without --reconcile nothing says the row is gone.
    assert outcome(sync("calls"), "calls").rows_deleted == 0
    assert env.rows("SELECT 1 FROM calls WHERE gong_call_id = %s", (victim["id"],)) == [(1,)]

    calls = outcome(sync("calls", reconcile=True), "calls")
    assert calls.status == "success", calls.error
    assert calls.rows_reconciled == 1
    assert calls.rows_deleted == 1
    assert env.rows("SELECT 1 FROM calls WHERE gong_call_id = %s", (victim["id"],)) == []
    assert env.rows("SELECT (error_details ->> 'deleted')::int FROM sync_status WHERE entity_type = 'calls'") == [(1,)]
    assert test_sync.actual_calls(env) == test_sync.expected_calls(env)

    # Many at once is a mass delete: blocked, nothing deleted, until a run allows it.
    monkeypatch.setenv("MASS_DELETE_MIN_ROWS", "5")
    many = others[:12]
    assert delete_from_bigquery(env, "call", [{"id": c["id"], "workspace_id": c["workspace_id"]} for c in many]) == 12
    before = env.rows("SELECT gong_call_id FROM calls ORDER BY 1")
    blocked = outcome(sync("calls", reconcile=True), "calls")
    assert blocked.status == "failed"
    assert blocked.error_type == "MassDeleteBlocked", blocked
    assert "would delete 12 of" in blocked.error and "Nothing was deleted" in blocked.error, blocked.error
    assert env.rows("SELECT gong_call_id FROM calls ORDER BY 1") == before
    allowed = outcome(sync("calls", allow_mass_delete=True), "calls")
    assert allowed.status == "success", allowed.error
    assert allowed.rows_deleted == 12
    assert test_sync.actual_calls(env) == test_sync.expected_calls(env)


# -- 5. the run lock's connection terminated -------------------------------------------------


def test_a_run_whose_lock_connection_is_terminated_stops_exits_1_and_the_next_run_proceeds(
        seeded, alert_sink, subprocess_env, tmp_path):
    env = seeded
    assert sync(CORE).status == "success"
    call = plain_calls(env, 1)[0]
    update_rows(env.bq, env.gong("call"), {"id": call["id"], "workspace_id": call["workspace_id"]},
                {"title": "After the lock came back"}, LATER)
    alert_sink.clear()
    holder = env.connect()
    holder.execute("BEGIN")
    # Every build starts by locking its watermark row: the first asset waits there, the lock held.
    holder.execute("LOCK TABLE gong_sync.asset_watermarks IN EXCLUSIVE MODE")
    log = tmp_path / "run.log"
    environ = {**subprocess_env, "MAX_PARALLEL": "1", "SLACK_WEBHOOK_URL": alert_sink.slack_url}
    process = spawn("--asset", CORE, environ=environ, log_path=log)
    try:
        wait_until(lambda: blocked_by(env, holder.info.backend_pid), 120, "the first build to wait on its watermark")
        [lock_pid] = run_lock_pids(env)
        assert env.rows("SELECT pg_terminate_backend(%s)", (lock_pid,)) == [(True,)]
        wait_until(lambda: not run_lock_pids(env), 30, "the lock's backend to end")
        holder.execute("ROLLBACK")
        code = process.wait(120)
    finally:
        if process.poll() is None:
            kill(process)
        holder.close()
    output = tail(log, 20000)
    assert code == 1, output[-4000:]
    statuses = {line.split()[0]: line.split()[1] for line in output.splitlines()
                if line.split()[:1] and line.split()[0] in ("users", "calls", "transcripts", "speakers")
                and len(line.split()) > 2 and line.split()[1] in ("success", "failed", "skipped")}
    assert set(statuses) == {"users", "calls", "transcripts", "speakers"}, output[-4000:]
    # The asset that was mid-build when the lock went finishes at its safe point; the next one to
    # start finds the lock gone and fails; the rest never start.
    [failed] = [a for a, s in statuses.items() if s == "failed"]
    assert f"{failed}: the run lock's connection is gone" in output, output[-4000:]
    skipped = [a for a, s in statuses.items() if s == "skipped"]
    assert skipped, statuses
    for asset in skipped:
        assert f"{asset}: not started: the run lock" in output, output[-4000:]
    assert any("the run lock" in str(m) for m in alert_sink.slack()), alert_sink.slack()

    # The lock is free again: the next run takes it and brings everything in step.
    result = materialize("--asset", CORE, environ=subprocess_env)
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
    assert "status success" in result.stdout, result.stdout
    assert_app_in_step(env)
    assert env.rows("SELECT title FROM calls WHERE gong_call_id = %s", (call["id"],)) == [("After the lock came back",)]


# -- 7. disk use over a hundred runs ---------------------------------------------------------


def folder_size(folder: Path) -> tuple[int, int]:
    """(bytes, files) under a folder."""
    size = files = 0
    for path in folder.rglob("*"):
        if path.is_file():
            size += path.stat().st_size
            files += 1
    return size, files


def test_the_working_folder_stays_bounded_over_a_hundred_runs(env):
    seed_workspace(env.bq, project=env.emulator.project, gong_dataset=env.gong_dataset, calls=10, tables=["gong.call"])
    ws = CASES.workspace_ids[0]
    sizes: dict[int, tuple[int, int]] = {}
    started = time.monotonic()
    for n in range(1, 101):
        insert_rows(env.bq, env.gong("call"), [{"id": f"93{n:017d}", "workspace_id": ws, "title": f"Run {n}"}],
                    synced_at=LATER + dt.timedelta(seconds=n))
        # Every tenth run is a Prefect flow run; the others run the flow's body (`execute`, the
        # same code without the flow-run bookkeeping, which costs a second a run).
        calls = outcome(sync("calls") if n % 10 == 0 else execute(["calls"]), "calls")
        assert calls.status == "success", (n, calls.error)
        assert calls.rows_loaded == (calls.rows_read if n == 1 else 1), (n, calls)
        sizes[n] = folder_size(env.pipelines_dir)
        # No load file outlives its load: the rows are in Postgres.
        leftovers = [p for p in env.pipelines_dir.rglob("*") if p.is_file() and p.suffix in (".parquet", ".gz")
                     or p.is_file() and "/load/loaded/" in str(p) and p.name != "package_state.json"]
        assert not leftovers, (n, leftovers[:5])
    print(f"100 runs in {time.monotonic() - started:.0f} s; working folder after run 5: {sizes[5]},"
          f" after run 100: {sizes[100]} (bytes, files)")
    assert sizes[100][1] <= sizes[5][1], sizes
    assert sizes[100][0] <= sizes[5][0] + 64 * 1024, {k: sizes[k] for k in (1, 5, 10, 50, 100)}
    assert env.rows("SELECT count(*) FROM calls WHERE title LIKE 'Run %%'") == [(100,)]


# -- 2. two working folders (two machines) against one database ------------------------------


def _version(title: str | None) -> int:
    return int(title[1:]) if title and title.startswith("v") and title[1:].isdigit() else 0


def test_two_working_folders_alternating_with_kills_never_regress(seeded, subprocess_env, tmp_path, monkeypatch,
                                                                  caplog):
    env = seeded
    seed = int(os.environ.get("TWO_MACHINES_SEED") or random.SystemRandom().randrange(1 << 32))
    print(f"two machines: seed {seed} (TWO_MACHINES_SEED={seed} replays it)")
    rng = random.Random(seed)
    folders = {"A": tmp_path / "machine-a", "B": tmp_path / "machine-b"}
    tracked = plain_calls(env, 3)
    keys = [{"id": c["id"], "workspace_id": c["workspace_id"]} for c in tracked]
    ids = [c["id"] for c in tracked]
    high = {"raw": dict.fromkeys(ids, 0), "app": dict.fromkeys(ids, 0)}
    history: list[str] = []
    state = {"version": 0}

    def change() -> None:
        state["version"] += 1
        v = state["version"]
        update_rows(env.bq, env.gong("call"), keys, {"title": f"v{v}"}, LATER + dt.timedelta(minutes=v))

    def observe(what: str) -> None:
        seen = {
            "raw": {i: _version(t) for i, t in env.rows("SELECT id, title FROM gong_raw.gong__call WHERE id = ANY(%s)",
                                                         (ids,))},
            "app": {i: _version(t) for i, t in env.rows("SELECT gong_call_id, title FROM calls WHERE gong_call_id = ANY(%s)",
                                                         (ids,))},
        }
        history.append(f"{what}: source v{state['version']}, raw {sorted(seen['raw'].values())},"
                       f" app {sorted(seen['app'].values())}")
        for layer in ("raw", "app"):
            for i in ids:
                now = seen[layer].get(i, 0)
                assert now >= high[layer][i], (f"{layer} row of call {i} went back from v{high[layer][i]} to v{now}",
                                               history)
                high[layer][i] = now

    def run_in_process(machine: str) -> None:
        monkeypatch.setenv("PIPELINES_DIR", str(folders[machine]))
        report = sync(CORE)
        assert report.status == "success", (machine, [o.error for o in report.outcomes], history)
        observe(f"{machine} ran to the end")

    change()
    run_in_process("A")

    # The case of the issue: machine A is killed with a whole package of v2 not yet loaded ...
    change()
    holder = env.connect()
    holder.execute("BEGIN")
    # SHARE: the load's writes wait, reads (the look-back window's) do not.
    holder.execute("LOCK TABLE gong_raw.gong__call IN SHARE MODE")
    log = tmp_path / "a-held.log"
    process = spawn("--asset", CORE, environ={**subprocess_env, "PIPELINES_DIR": str(folders["A"])}, log_path=log)
    try:
        wait_until(lambda: blocked_by(env, holder.info.backend_pid), 120, "machine A's load to wait on gong__call")
        kill(process)
    finally:
        if process.poll() is None:
            kill(process)
        holder.execute("ROLLBACK")
        holder.close()
    wait_for_lock_release(env)
    leftovers = [p for p in folders["A"].rglob("*") if p.is_file() and "/load/normalized/" in str(p)
                 or p.is_file() and "/normalize/extracted/" in str(p)]
    assert leftovers, "machine A's kill left no package behind: the scenario did not happen"
    observe("A killed with a package of v2 pending")
    # ... machine B syncs v3 ...
    change()
    run_in_process("B")
    assert high["raw"] == dict.fromkeys(ids, 3)
    # ... and machine A, started again, must not load its older package over it.
    caplog.clear()
    run_in_process("A")
    assert "calls: discarding" in caplog.text, "machine A did not say what it did with its leftover package"
    assert high["raw"] == dict.fromkeys(ids, 3) and high["app"] == dict.fromkeys(ids, 3)

    # Then the machines take turns, each run killed at a random moment, the source changing between.
    kills = 0
    for turn in range(8):
        machine = "AB"[turn % 2]
        if rng.random() < 0.7:
            change()
        log = tmp_path / f"turn-{turn}-{machine}.log"
        process = spawn("--asset", CORE, environ={**subprocess_env, "PIPELINES_DIR": str(folders[machine])},
                        log_path=log)
        try:
            wait_until(lambda: "asset.start" in tail(log, 10**7) or process.poll() is not None, 120,  # noqa: B023
                       "a run to start its first asset")
            try:
                process.wait(rng.uniform(0.0, 3.0))
            except subprocess.TimeoutExpired:
                pass
            if process.poll() is None:
                kill(process)
                kills += 1
                what = f"{machine} killed"
            else:
                assert process.returncode == 0, (machine, tail(log), history)
                what = f"{machine} ran to the end"
        finally:
            if process.poll() is None:
                kill(process)
        wait_for_lock_release(env)
        observe(what)
    print("\n".join(history))
    assert kills >= 4, history

    # Both machines run to the end: everything equals the source, at its latest version.
    run_in_process("A")
    run_in_process("B")
    assert high["raw"] == dict.fromkeys(ids, state["version"]), history
    assert_raw_mirrors_source(env)
    assert_app_in_step(env)
    assert_checkpoints_at_the_data(env, tmp_path / "new-machine")


# -- a full refresh killed between dlt's truncation and its load ------------------------------


@pytest.mark.parametrize("asset,raw_table", [("users", "gong__users"), ("calls", "gong__call")])
def test_a_full_refresh_killed_after_truncating_the_raw_table_leaves_no_hole(seeded, subprocess_env, tmp_path,
                                                                             asset, raw_table):
    """`--full-refresh` has dlt truncate the raw tables (refresh="drop_data") as its load starts, in
    a transaction of its own, before the rows are loaded and before the load (with its reset
    checkpoint) completes. Killed in between, the next ordinary runs must still end with every
    source row in raw and the app in step, with no manual step."""
    env = seeded
    assert sync(CORE).status == "success"
    table, key = RAW[raw_table]
    row = next(r for r in live(source(env, table)) if r["id"] != CASES.shared_call_id)
    update_rows(env.bq, env.gong(table), {k: row[k] for k in key}, {"first_name": "Before"} if asset == "users"
                else {"title": "Before the refresh"}, LATER)
    assert sync(asset).status == "success"  # a merge: dlt's staging table exists from now on
    assert env.rows(f"SELECT to_regclass('gong_raw_staging.{raw_table}') IS NOT NULL") == [(True,)]
    before = env.rows(f"SELECT count(*) FROM gong_raw.{raw_table}")[0][0]  # noqa: S608 - constants
    holder = env.connect()
    holder.execute("BEGIN")
    # The refresh's load merges through the staging table: it waits there, and is killed there.
    holder.execute(f"LOCK TABLE gong_raw_staging.{raw_table} IN ACCESS EXCLUSIVE MODE")
    process = spawn("--asset", asset, "--full-refresh", environ=subprocess_env, log_path=tmp_path / "refresh.log")
    try:
        wait_until(lambda: blocked_by(env, holder.info.backend_pid), 120, "the refresh's load to wait on staging")
        during = env.rows(f"SELECT count(*) FROM gong_raw.{raw_table}")[0][0]  # noqa: S608
        kill(process)
    finally:
        if process.poll() is None:
            kill(process)
        holder.execute("ROLLBACK")
        holder.close()
    wait_for_lock_release(env)
    result = materialize("--asset", CORE, environ=subprocess_env)
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
    # Later, one speaker's talk time changes: the speakers build reads the raw users and calls again.
    speaker = next(s for s in live(source(env, "call_speaker")) if s["user_id"] and s["call_id"] != CASES.shared_call_id
                   and s["call_id"] in {c["id"] for c in live(source(env, "call"))})
    update_rows(env.bq, env.gong("call_speaker"), {"id": speaker["id"], "call_id": speaker["call_id"]},
                {"talk_time": 77.0}, LATER + dt.timedelta(minutes=1))
    result = materialize("--asset", CORE, environ=subprocess_env)
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
    after = env.rows(f"SELECT count(*) FROM gong_raw.{raw_table}")[0][0]  # noqa: S608
    hole = f"gong_raw.{raw_table}: {before} rows before, {during} while the refresh waited, {after} after two clean runs"
    print(hole)
    assert test_sync.actual_speakers(env) == test_sync.expected_speakers(env), hole
    assert after == before, hole
    assert_raw_mirrors_source(env)
    assert_app_in_step(env)
    assert_checkpoints_at_the_data(env, tmp_path / "new-machine")


# -- a late row below the checkpoint (issue 14, "Late rows") ---------------------------------


def test_a_row_that_becomes_visible_below_the_checkpoint_is_still_read(calls_only):
    env = calls_only
    first = outcome(sync("calls"), "calls")
    assert first.status == "success", first.error
    checkpoint = dt.datetime.fromisoformat(first.checkpoint_after["gong__call"])
    # A batch still landing while we read: its row carries a cursor a few seconds below the
    # checkpoint, and becomes visible only after the run that set that checkpoint.
    late_id = "9200000000000000001"
    insert_rows(env.bq, env.gong("call"), [{"id": late_id, "workspace_id": CASES.workspace_ids[0],
                                            "title": "Landed late"}], synced_at=checkpoint - dt.timedelta(seconds=5))
    calls = outcome(sync("calls"), "calls")
    assert calls.status == "success", calls.error
    assert env.rows("SELECT title FROM gong_raw.gong__call WHERE id = %s", (late_id,)) == [("Landed late",)]
    assert env.rows("SELECT title FROM calls WHERE gong_call_id = %s", (late_id,)) == [("Landed late",)]
    # Read again by the look-back, not written twice: the raw rows stay as they are (same row
    # versions), nothing is loaded, nothing built.
    assert env.rows("SELECT count(*) - count(DISTINCT (id, workspace_id)) FROM gong_raw.gong__call") == [(0,)]
    raw_versions = env.rows("SELECT id, xmin::text FROM gong_raw.gong__call ORDER BY id")
    again = outcome(sync("calls"), "calls")
    assert (again.status, again.rows_loaded, again.rows_written) == ("success", 0, 0)
    assert again.rows_read >= 1  # the window was read
    assert env.rows("SELECT id, xmin::text FROM gong_raw.gong__call ORDER BY id") == raw_versions
    assert again.checkpoint_after == calls.checkpoint_after  # the checkpoint never moves back


def test_a_late_change_to_a_row_with_a_two_column_key_is_read_and_the_window_can_be_turned_off(env, monkeypatch):
    """The window works on composite keys (call_speaker: id, call_id) and on updates of rows already
    landed; LATE_ROW_WINDOW=0 reads strictly past the checkpoint, as before."""
    seed_workspace(env.bq, project=env.emulator.project, gong_dataset=env.gong_dataset, calls=20, tables=GONG_TABLES)
    first = sync("users,calls,speakers")
    assert first.status == "success"
    checkpoint = dt.datetime.fromisoformat(outcome(first, "speakers").checkpoint_after["gong__call_speaker"])
    one, other = sorted(live(source(env, "call_speaker")), key=lambda r: (r["call_id"], r["id"]))[:2]

    def talk_time(row: dict) -> list[tuple]:
        return env.rows("SELECT talk_time FROM gong_raw.gong__call_speaker WHERE id = %s AND call_id = %s",
                        (row["id"], row["call_id"]))

    update_rows(env.bq, env.gong("call_speaker"), {"id": one["id"], "call_id": one["call_id"]},
                {"talk_time": 4321.0}, checkpoint - dt.timedelta(seconds=30))
    speakers = outcome(sync("speakers"), "speakers")
    assert (speakers.status, speakers.rows_loaded) == ("success", 1)
    assert talk_time(one) == [(4321.0,)]
    assert env.rows("SELECT s.talk_time_seconds FROM speakers s JOIN gong_sync.speakers_ids m ON m.id = s.id"
                    " WHERE m.gong_call_id = %s AND m.gong_speaker_id = %s", (one["call_id"], one["id"])) == [(4321,)]

    monkeypatch.setenv("LATE_ROW_WINDOW", "0")
    update_rows(env.bq, env.gong("call_speaker"), {"id": other["id"], "call_id": other["call_id"]},
                {"talk_time": 1234.0}, checkpoint - dt.timedelta(seconds=30))
    assert outcome(sync("speakers"), "speakers").status == "success"
    assert talk_time(other) == [(other["talk_time"],)]  # below the checkpoint: not read


def test_a_raw_table_locked_by_another_session_fails_the_window_s_read_naming_the_timeout(calls_only, monkeypatch):
    """The look-back window reads the raw table before landing: a session holding it (a VACUUM
    FULL, an ALTER) makes that read give up after LOCK_TIMEOUT, said as such, not as Postgres down."""
    env = calls_only
    assert outcome(sync("calls"), "calls").status == "success"
    monkeypatch.setenv("LOCK_TIMEOUT", "1")
    with psycopg.connect(env.database_url) as holder:  # a transaction, held until rollback
        holder.execute("LOCK TABLE gong_raw.gong__call IN ACCESS EXCLUSIVE MODE")
        calls = outcome(sync("calls"), "calls")
        holder.rollback()
    assert calls.status == "failed"
    assert "gong__call: reading the look-back window gave up after LOCK_TIMEOUT (1 s)" in calls.error
    assert "nothing accepts connections" not in calls.error
    assert outcome(sync("calls"), "calls").status == "success"  # the next run, once the lock is gone
