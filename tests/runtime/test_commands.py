"""The operator's commands that run nothing, driven as a process: what each prints, its exit code."""

from __future__ import annotations

import datetime as dt
import json
import os
import subprocess
import sys
import time
from importlib.metadata import version
from pathlib import Path

import psycopg
import pytest

from runtime.local.seed import seed_workspace
from tests.helpers import outcome, sync

CANARY = "Canary Pa55 word/7d1e"


def materialize(*args: str, env_vars: dict[str, str], timeout: float = 300) -> subprocess.CompletedProcess[str]:
    environ = {k: v for k, v in os.environ.items() if k not in env_vars}
    environ.update(env_vars)
    return subprocess.run(
        [sys.executable, "-m", "runtime.cli", *args],
        env=environ, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL,
    )


def rows_of(stdout: str) -> dict[str, list[str]]:
    """The lines of a per-asset table, by asset."""
    from graph import default_graph

    assets = set(default_graph().names)
    return {line.split()[0]: line.split()[1:] for line in stdout.splitlines() if line.split()[:1] and
            line.split()[0] in assets}


@pytest.fixture
def synced(env):
    """A workspace synced once (emails and opportunities leave rows in dead letters)."""
    seed_workspace(env.bq, project=env.emulator.project, gong_dataset=env.gong_dataset,
                   salesforce_dataset=env.salesforce_dataset, calls=40)
    report = sync("+emails", "+speakers")
    assert outcome(report, "emails").rows_dead_lettered == 2
    return env


# -- --version, --help, --list -----------------------------------------------------------------


def test_version_prints_the_package_version_at_once():
    started = time.monotonic()
    result = materialize("--version", env_vars={"DATABASE_URL": ""})
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"materialize {version('gong-sync')}\n"
    assert time.monotonic() - started < 5


def test_help_shows_examples_and_exit_codes():
    result = materialize("--help", env_vars={})
    assert result.returncode == 0
    assert "examples:" in result.stdout and "materialize --plan -a calls+" in result.stdout
    assert "exit codes:" in result.stdout
    for code in ("0 ", "1 ", "2 ", "130 "):
        assert f"\n  {code}" in result.stdout
    for flag in ("--status", "--dead-letters", "--check", "--plan", "--version", "-q, --quiet", "-v, --verbose"):
        assert flag in result.stdout


def test_list_shows_each_tag_with_its_assets():
    result = materialize("--list", env_vars={})
    assert result.returncode == 0
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["asset", "level", "upstream"]
    tags = {line.split()[0]: line.split(None, 1)[1] for line in lines[lines.index("tags (select with -a tag:NAME):") + 1:]}
    assert tags["salesforce"] == "call_opportunities, opportunities"
    assert tags["gong"] == "call_opportunities, calls, emails, speakers, transcripts, users"


# -- --status ----------------------------------------------------------------------------------


def test_status_before_any_run_says_never(env):
    result = materialize("--status", env_vars=env.vars())
    assert result.returncode == 0, result.stderr
    table = rows_of(result.stdout)
    assert set(table) == {"users", "calls", "opportunities", "emails", "speakers", "transcripts", "call_opportunities"}
    assert all(cells[0] == "never" for cells in table.values())
    assert "no run in progress" in result.stdout


def test_status_after_a_sync_shows_each_asset(synced):
    result = materialize("--status", env_vars=synced.vars())
    assert result.returncode == 0, result.stderr
    header = result.stdout.splitlines()[0].split()
    assert header == ["asset", "status", "checkpoint", "rows", "errors", "dead", "letters", "updated"]
    table = rows_of(result.stdout)
    status = {row[0]: row[1:] for row in synced.rows(
        "SELECT entity_type, last_sync_status, items_synced, errors_count FROM sync_status")}
    emails = table["emails"]
    assert emails[0] == "partial" == status["emails"][0]
    assert emails[2:5] == [str(status["emails"][1]), "2", "2"]  # rows, errors, dead letters
    [(checkpoint,)] = synced.rows("SELECT last_sync_timestamp FROM sync_status WHERE entity_type = 'speakers'")
    assert table["speakers"][0] == "success"
    assert table["speakers"][1] == checkpoint.astimezone(dt.UTC).isoformat(timespec="seconds")
    assert table["opportunities"][4] == "1"
    assert table["transcripts"][0] == "never"  # not selected
    assert table["transcripts"][1:] == ["-", "-", "-", "0", "-"]

    one = materialize("--status", "--asset", "+speakers", env_vars=synced.vars())
    assert one.returncode == 0
    assert set(rows_of(one.stdout)) == {"users", "calls", "speakers"}


def test_status_with_an_unreachable_database_is_one_line_and_exit_2(env):
    from runtime.local.emulator import free_port

    url = f"postgresql://someone:{CANARY.replace(' ', '%20').replace('/', '%2F')}@127.0.0.1:{free_port()}/nope"
    started = time.monotonic()
    result = materialize("--status", env_vars={**env.vars(), "DATABASE_URL": url})
    assert result.returncode == 2
    assert time.monotonic() - started < 15
    assert result.stdout == ""
    assert result.stderr.startswith("materialize: DATABASE_URL: nothing accepts connections at 127.0.0.1:")
    assert len(result.stderr.strip().splitlines()) == 1
    assert "Canary" not in result.stderr


def test_status_with_a_password_libpq_cannot_parse_never_prints_it(env):
    head, _, tail = env.database_url.partition("@")
    url = f"postgresql://postgres:{CANARY}@{tail}"  # a space, unquoted: not a valid URL
    result = materialize("--status", env_vars={**env.vars(), "DATABASE_URL": url})
    assert result.returncode == 2
    assert "DATABASE_URL" in result.stderr
    assert "Canary" not in result.stdout + result.stderr and "7d1e" not in result.stdout + result.stderr
    assert "Traceback" not in result.stderr


def test_status_without_database_url_names_it(env):
    result = materialize("--status", env_vars={**env.vars(), "DATABASE_URL": ""})
    assert result.returncode == 2
    assert "DATABASE_URL is not set" in result.stderr


# -- --dead-letters ----------------------------------------------------------------------------


def test_dead_letters_on_a_fresh_database_says_nothing(env):
    result = materialize("--dead-letters", env_vars=env.vars())
    assert result.returncode == 0, result.stderr
    assert result.stdout == "nothing in dead letters\n"


def test_dead_letters_lists_each_assets_rows_with_a_count(synced):
    result = materialize("--dead-letters", env_vars=synced.vars())
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "emails: 2 dead letter(s)\n" in out
    assert "opportunities: 1 dead letter(s)\n" in out
    assert "calls: 1 dead letter(s)\n" in out  # the other workspace's copy of a call id
    assert out.index("calls: 1") < out.index("opportunities: 1") < out.index("emails: 2")  # graph order
    header = out.splitlines()[0]
    assert header.split() == ["asset", "source", "table", "key", "first", "error", "when"]
    letters = synced.rows("SELECT source_table, primary_key, errors FROM gong_sync.dead_letters WHERE asset = 'emails'")
    lines = [line for line in out.splitlines() if line.startswith("emails ")]
    assert len(lines) == 2
    for source_table, primary_key, errors in letters:
        key = f"id={primary_key['id']}" if primary_key else "(no key)"
        assert any(source_table in line and key in line and errors[0]["field"] in line for line in lines), (lines, letters)
    assert any("id: missing" in line for line in lines)


def test_dead_letters_of_one_asset(synced):
    result = materialize("--dead-letters", "--asset", "emails", env_vars=synced.vars())
    assert result.returncode == 0, result.stderr
    assert "emails: 2 dead letter(s)" in result.stdout
    assert "opportunities" not in result.stdout
    none = materialize("--dead-letters", "--asset", "users", env_vars=synced.vars())
    assert none.returncode == 0
    assert none.stdout == "nothing in dead letters for users\n"


def test_dead_letters_of_an_unknown_asset_is_exit_2(env):
    result = materialize("--dead-letters", "--asset", "emial", env_vars=env.vars())
    assert result.returncode == 2
    assert "did you mean 'email" in result.stderr


# -- --schema-changes --------------------------------------------------------------------------


def test_schema_changes_with_nothing_recorded_says_so(synced):
    result = materialize("--schema-changes", env_vars=synced.vars())
    assert result.returncode == 0, result.stderr
    assert result.stdout == "no schema changes recorded\n"


# -- --plan ------------------------------------------------------------------------------------


def test_plan_before_any_run_reads_from_the_start(env):
    seed_workspace(env.bq, project=env.emulator.project, gong_dataset=env.gong_dataset,
                   salesforce_dataset=env.salesforce_dataset, calls=40)
    result = materialize("--plan", "--asset", "+speakers", env_vars=env.vars())
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert out.startswith("plan: 3 asset(s) in 2 level(s), 4 source table(s); nothing was run\n")
    assert "from the start (never synced)" in out
    assert "the run lock is free" in out
    # Nothing was created: no bookkeeping, no app tables.
    assert env.rows("SELECT count(*) FROM pg_namespace WHERE nspname IN ('gong_raw', 'gong_sync')") == [(0,)]
    assert env.rows("SELECT to_regclass('public.sync_status') IS NULL") == [(True,)]


def test_plan_after_a_sync_shows_order_checkpoints_and_source_rows(synced):
    result = materialize("--plan", "--asset", "+speakers", env_vars=synced.vars())
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("level "))
    table = [line.split() for line in lines[start + 1:start + 6]]
    # Level 0 first (calls, users, each with its one source), then speakers with its two.
    assert [row[:3] for row in table[:2]] == [["0", "calls", f"{synced.gong_dataset}.call"],
                                              ["0", "users", f"{synced.gong_dataset}.users"]]
    assert table[2][:3] == ["1", "speakers", f"{synced.gong_dataset}.call_speaker"]
    assert table[3][0] == f"{synced.gong_dataset}.call_participant"
    [(details,)] = synced.rows("SELECT error_details FROM sync_status WHERE entity_type = 'calls'")
    assert table[0][3] == details["checkpoints"]["gong__call"]
    assert int(table[0][4]) == synced.bq.get_table(synced.gong("call")).num_rows > 0

    assert "each read past a checkpoint starts LATE_ROW_WINDOW (900 s) below it" in result.stdout

    full = materialize("--plan", "--asset", "calls", "--full-refresh", env_vars=synced.vars())
    assert full.returncode == 0
    assert "from the start (--full-refresh)" in full.stdout
    assert "LATE_ROW_WINDOW" not in full.stdout


def test_plan_names_a_missing_source_table(synced):
    synced.bq.delete_table(synced.gong("call_speaker"))
    result = materialize("--plan", "--asset", "speakers", env_vars=synced.vars())
    assert result.returncode == 0, result.stderr
    assert (f"speakers: source table prefect-data-warehouse.{synced.gong_dataset}.call_speaker does not exist:"
            " `materialize` would stop before any work (exit 2); a scheduled run fails this asset") in result.stdout


# -- --check -----------------------------------------------------------------------------------


def lines_of(result: subprocess.CompletedProcess[str]) -> dict[str, str]:
    """`--check` output: each check's name → its whole line."""
    return {line.split(":", 1)[0].split(None, 1)[1]: line for line in result.stdout.splitlines()[:-1]}


def test_check_on_an_empty_database_passes_and_creates_nothing(env):
    seed_workspace(env.bq, project=env.emulator.project, gong_dataset=env.gong_dataset,
                   salesforce_dataset=env.salesforce_dataset, calls=40)
    result = materialize("--check", env_vars=env.vars())
    assert result.returncode == 0, result.stdout + result.stderr
    checks = lines_of(result)
    assert checks["postgres"].startswith("ok      postgres: connected to 127.0.0.1:")
    assert "free" in checks["run lock"]
    assert "first run creates" in checks["schema gong_raw"]
    assert "the first run creates the whole contract" in checks["app tables"]
    assert f"source {env.gong_dataset}.call (calls)" in checks
    assert result.stdout.splitlines()[-1].startswith("all ") and "checks passed; nothing was run" in result.stdout
    assert all(line.startswith("ok ") for line in result.stdout.splitlines()[:-1])
    assert env.rows("SELECT count(*) FROM pg_namespace WHERE nspname IN ('gong_raw', 'gong_sync')") == [(0,)]
    assert env.rows("SELECT to_regclass('public.calls') IS NULL") == [(True,)]


def test_check_after_a_sync_passes_and_says_who_holds_the_lock(synced):
    from runtime.session import RUN_LOCK_KEY

    with synced.connect() as holder:
        holder.execute("SELECT pg_advisory_lock(%s)", (RUN_LOCK_KEY,))
        result = materialize("--check", "--asset", "+speakers", env_vars=synced.vars())
    assert result.returncode == 0, result.stdout + result.stderr
    checks = lines_of(result)
    assert "held by another run: backend pid" in checks["run lock"]
    assert checks["app tables"].startswith("ok ")
    assert "fit what the selection writes" in checks["app tables"]
    assert checks["tables of public"].startswith("ok ")


def test_check_names_what_fails_and_how_to_fix_it(synced, pg_server_url):
    """A role without DELETE on calls, a source table gone, an app column of the wrong type."""
    from urllib.parse import urlsplit, urlunsplit

    with synced.connect() as conn:
        conn.execute("ALTER TABLE calls ALTER COLUMN title TYPE integer USING NULL")
    with psycopg.connect(pg_server_url, autocommit=True) as admin:
        admin.execute("DROP ROLE IF EXISTS gs_check_role")
        admin.execute("CREATE ROLE gs_check_role LOGIN")
    try:
        with synced.connect() as conn:
            conn.execute("GRANT USAGE ON SCHEMA public, gong_raw, gong_sync TO gs_check_role")
            conn.execute("GRANT SELECT, INSERT, UPDATE ON ALL TABLES IN SCHEMA public TO gs_check_role")
            conn.execute("GRANT DELETE ON ALL TABLES IN SCHEMA public TO gs_check_role")
            conn.execute("REVOKE DELETE ON calls FROM gs_check_role")
        synced.bq.delete_table(synced.gong("call_speaker"))
        parts = urlsplit(synced.database_url)
        url = urlunsplit((parts.scheme, f"gs_check_role@{parts.hostname}:{parts.port}", parts.path, "", ""))
        result = materialize("--check", "--asset", "+speakers", env_vars={**synced.vars(), "DATABASE_URL": url})
        assert result.returncode == 2, result.stdout + result.stderr
        out = result.stdout
        assert "FAILED  table public.calls: gs_check_role lacks DELETE: GRANT DELETE ON public.calls TO gs_check_role" in out
        assert "FAILED  schema gong_raw: gs_check_role lacks CREATE: GRANT CREATE ON SCHEMA gong_raw TO gs_check_role" in out
        assert "FAILED  app tables: public.calls.title: expected character varying or text, found integer" in out
        assert (f"FAILED  source {synced.gong_dataset}.call_speaker (speakers): prefect-data-warehouse."
                f"{synced.gong_dataset}.call_speaker does not exist") in out
        assert out.splitlines()[-1].endswith("checks failed; nothing was run")
        assert f"ok      source {synced.gong_dataset}.call (calls)" in out
        assert "Traceback" not in result.stderr
    finally:
        with synced.connect() as conn:
            conn.execute("DROP OWNED BY gs_check_role")
        with psycopg.connect(pg_server_url, autocommit=True) as admin:
            admin.execute("DROP ROLE IF EXISTS gs_check_role")


def test_check_with_a_bad_database_url_fails_that_check_and_goes_on(env):
    seed_workspace(env.bq, project=env.emulator.project, gong_dataset=env.gong_dataset, calls=12,
                   tables=["gong.users", "gong.call"])
    url = env.database_url.rsplit("/", 1)[0] + "/no_such_db"
    result = materialize("--check", "--asset", "calls", env_vars={**env.vars(), "DATABASE_URL": url})
    assert result.returncode == 2
    checks = lines_of(result)
    assert checks["postgres"].startswith("FAILED  postgres: DATABASE_URL: database no_such_db does not exist")
    assert checks["bigquery"].startswith("ok ")
    assert checks[f"source {env.gong_dataset}.call (calls)"].startswith("ok ")


# -- --replay-dead-letters prints each line once -----------------------------------------------


def test_replay_prints_its_summary_once(synced):
    result = materialize("--replay-dead-letters", "--asset", "emails", env_vars=synced.vars())
    assert result.returncode == 0, result.stderr[-3000:]
    both = result.stdout + result.stderr
    assert both.count("emails: 0 replayed, 0 superseded by newer rows, 2 still failing") == 1


# -- --demo --clean ----------------------------------------------------------------------------


def test_demo_clean_removes_what_the_demo_made_and_nothing_else(tmp_path):
    from runtime.local.embedded_pg import EmbeddedPostgres

    folder = tmp_path / "demo"
    (folder / "pipelines" / "calls").mkdir(parents=True)
    (folder / "bigquery").mkdir()
    (folder / "bigquery" / "emulator.log").write_text("log")
    server = EmbeddedPostgres(data_dir=folder / "postgres").start()  # left running, as by a killed demo
    try:
        cluster = server.data_dir.parent
        port = server.port
        (folder / "demo-state.json").write_text(json.dumps({"runs": 1, "postgres_cluster": str(cluster)}))
        (folder / "notes.txt").write_text("the user's own file")
        # The subprocess's temp folder: a copy of Postgres's binaries there (as root), unused.
        temp = tmp_path / "tmp"
        (temp / "embedded-pg-bin-0123456789ab" / "bin").mkdir(parents=True)
        env_vars = {"TMPDIR": str(temp)}

        result = materialize("--demo", "--clean", "--demo-dir", str(folder), env_vars=env_vars)

        assert result.returncode == 0, result.stdout + result.stderr
        assert f"demo: removed the demo's Postgres cluster {cluster} (stopped its server, pid " in result.stdout
        assert not cluster.exists()
        with pytest.raises(psycopg.OperationalError):
            psycopg.connect(f"postgresql://postgres@127.0.0.1:{port}/postgres", connect_timeout=3)
        for name in ("demo-state.json", "bigquery", "pipelines"):
            assert not (folder / name).exists()
            assert f"demo: removed {folder / name}\n" in result.stdout
        if os.geteuid() == 0:
            assert not (temp / "embedded-pg-bin-0123456789ab").exists()
            assert f"demo: removed {temp / 'embedded-pg-bin-0123456789ab'} (Postgres binaries" in result.stdout
        # Not the demo's: kept, and said.
        assert (folder / "notes.txt").read_text() == "the user's own file"
        assert f"demo: kept {folder}: it also holds notes.txt, which the demo did not make\n" in result.stdout
    finally:
        cluster.mkdir(exist_ok=True)  # the server object runs pg_ctl from its folder
        server.destroy()

    (folder / "notes.txt").unlink()
    again = materialize("--demo", "--clean", "--demo-dir", str(folder), env_vars=env_vars)
    assert again.returncode == 0
    assert again.stdout == f"demo: removed {folder}\n"
    assert not folder.exists()
    nothing = materialize("--demo", "--clean", "--demo-dir", str(folder), env_vars=env_vars)
    assert nothing.returncode == 0
    assert nothing.stdout == f"demo: nothing to clean in {folder}\n"


def test_clean_without_demo_is_exit_2(tmp_path):
    result = materialize("--clean", "--demo-dir", str(tmp_path), env_vars={})
    assert result.returncode == 2
    assert "--clean goes with --demo" in result.stderr
    assert Path(tmp_path).exists()


def test_demo_clean_keeps_the_emulators_upload_folder_while_an_emulator_runs(tmp_path):
    """The upload folder is shared by every emulator of a temp folder and made only at its start:
    removed under a running one, that emulator's next load job would fail."""
    from runtime.local.emulator import BigQueryEmulator

    temp = tmp_path / "tmp"
    uploads = temp / "bqemu_uploads"
    uploads.mkdir(parents=True)
    folder = tmp_path / "demo"
    env_vars = {"TMPDIR": str(temp)}
    with BigQueryEmulator():
        kept = materialize("--demo", "--clean", "--demo-dir", str(folder), env_vars=env_vars)
        assert kept.returncode == 0, kept.stdout + kept.stderr
        assert uploads.is_dir()
        assert "upload folder" not in kept.stdout
    # Not checked after the stop: other tests' emulators may still run (the folder stays then too).
