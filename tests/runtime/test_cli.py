"""`materialize` as an operator runs it: exit codes, messages, and no secret in any output."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import psycopg
import pytest

from runtime.local.seed import seed_workspace

CANARY = "Canary-Pa55word-7d1e"


def materialize(*args: str, env_vars: dict[str, str], timeout: int = 300) -> subprocess.CompletedProcess[str]:
    from prefect.settings import PREFECT_API_URL

    environ = {k: v for k, v in os.environ.items() if k not in env_vars}
    environ.update(env_vars)
    # Reuse the session's Prefect test server instead of starting a temporary one per call.
    environ["PREFECT_API_URL"] = PREFECT_API_URL.value() or ""
    return subprocess.run(
        [sys.executable, "-m", "runtime.cli", *args],
        env=environ, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL,
    )


def with_password(url: str, password: str, user: str | None = None, database: str | None = None) -> str:
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(url)
    netloc = f"{user or parts.username}:{password}@{parts.hostname}:{parts.port}"
    return urlunsplit((parts.scheme, netloc, f"/{database}" if database else parts.path, "", ""))


def test_list_prints_each_asset_with_upstream_and_level(env):
    result = materialize("--list", env_vars=env.vars())
    assert result.returncode == 0
    lines = {line.split()[0]: line.split()[1:] for line in result.stdout.splitlines()[1:]}
    assert lines["speakers"] == ["1", "users,", "calls"]
    assert lines["users"] == ["0", "-"]


def test_unknown_asset_fails_with_did_you_mean_and_exit_2(env):
    result = materialize("--asset", "speakrs", env_vars=env.vars())
    assert result.returncode == 2
    assert "did you mean 'speakers'?" in result.stderr


def test_missing_database_url_is_named(env):
    result = materialize(env_vars={**env.vars(), "DATABASE_URL": ""})
    assert result.returncode == 2
    assert "DATABASE_URL is not set" in result.stderr


def test_missing_database_is_named(env):
    url = with_password(env.database_url, CANARY, database="no_such_db")
    result = materialize(env_vars={**env.vars(), "DATABASE_URL": url})
    assert result.returncode == 2
    assert "database no_such_db does not exist" in result.stderr
    assert CANARY not in result.stdout + result.stderr


@pytest.fixture
def password_role(env, pg_server_url):
    """A role that must give its password: a rule for it goes on top of the server's pg_hba."""
    with psycopg.connect(pg_server_url, autocommit=True) as conn:
        hba = Path(conn.execute("SHOW hba_file").fetchone()[0])
        if not os.access(hba, os.W_OK):
            pytest.skip("this server's pg_hba.conf is not writable by the tests")
        original = hba.read_text()
        conn.execute(f"CREATE ROLE gs_pw_role LOGIN PASSWORD '{CANARY}'")
        hba.write_text("host all gs_pw_role 127.0.0.1/32 scram-sha-256\n" + original)
        conn.execute("SELECT pg_reload_conf()")
    yield "gs_pw_role"
    with psycopg.connect(pg_server_url, autocommit=True) as conn:
        hba.write_text(original)
        conn.execute("SELECT pg_reload_conf()")
        conn.execute("DROP ROLE gs_pw_role")


def test_rejected_password_names_user_and_server_not_the_password(env, password_role):
    url = with_password(env.database_url, "wrong-" + CANARY, user=password_role)
    result = materialize(env_vars={**env.vars(), "DATABASE_URL": url})
    assert result.returncode == 2
    host_port = url.split("@")[1].split("/")[0]
    assert f"password rejected for user {password_role} at {host_port}" in result.stderr
    assert CANARY not in result.stdout + result.stderr


def test_missing_credentials_file_is_named(env, tmp_path):
    missing = tmp_path / "nope" / "key.json"
    vars_ = {**env.vars(), "BIGQUERY_EMULATOR_HOST": "", "BIGQUERY_STORAGE_EMULATOR_HOST": "",
             "GOOGLE_APPLICATION_CREDENTIALS": str(missing)}
    result = materialize(env_vars=vars_)
    assert result.returncode == 2
    assert f"GOOGLE_APPLICATION_CREDENTIALS: file {missing} does not exist" in result.stderr


def test_unreadable_credentials_file_is_named(env, tmp_path):
    key = tmp_path / "key.json"
    key.write_text("{not json")
    vars_ = {**env.vars(), "BIGQUERY_EMULATOR_HOST": "", "BIGQUERY_STORAGE_EMULATOR_HOST": "",
             "GOOGLE_APPLICATION_CREDENTIALS": str(key)}
    result = materialize(env_vars=vars_)
    assert result.returncode == 2
    assert f"GOOGLE_APPLICATION_CREDENTIALS: file {key} is not a readable service-account key" in result.stderr


def test_missing_dataset_is_named(env):
    result = materialize(env_vars={**env.vars(), "GONG_DATASET": "no_such_dataset"})
    assert result.returncode == 2
    assert "BigQuery dataset prefect-data-warehouse.no_such_dataset not found" in result.stderr


def test_bad_schema_setting_is_named(env):
    result = materialize(env_vars={**env.vars(), "DESTINATION_SCHEMA": "public; drop table x"})
    assert result.returncode == 2
    assert "DESTINATION_SCHEMA" in result.stderr


def test_a_run_prints_the_summary_and_exit_code_follows_the_outcome(env):
    seed_workspace(env.bq, project=env.emulator.project, gong_dataset=env.gong_dataset, calls=12,
                   tables=["gong.users", "gong.call", "gong.transcript", "gong.call_speaker"])
    ok = materialize("--asset", "+speakers", env_vars=env.vars())
    assert ok.returncode == 0, ok.stderr[-3000:]
    table = {line.split()[0]: line.split()[1:] for line in ok.stdout.splitlines() if line.split()[:1]}
    assert table["speakers"][0] == "success"
    speakers = env.rows("SELECT count(*) FROM speakers")[0][0]
    assert int(table["speakers"][3]) == speakers  # the "written" column equals what landed
    assert "transcripts" not in table

    env.bq.delete_table(env.gong("call_speaker"))
    failed = materialize("--asset", "speakers", env_vars=env.vars())
    assert failed.returncode == 1
    assert f"source table prefect-data-warehouse.{env.gong_dataset}.call_speaker does not exist" in failed.stdout


def test_ctrl_c_stops_at_a_safe_point_with_exit_130_and_the_next_run_completes(env, tmp_path):
    """In-process (no Prefect API): Ctrl-C while speakers waits on a table lock the app holds. Nothing
    new starts, the summary says cancelled, exit 130, no traceback; the next run completes."""
    import datetime as dt
    import signal
    import time

    from runtime.local.seed import update_rows
    from tests.helpers import sync
    from tests.runtime.test_sync import GONG_TABLES, assert_in_step, live, source

    seed_workspace(env.bq, project=env.emulator.project, gong_dataset=env.gong_dataset, calls=40, tables=GONG_TABLES)
    assert sync("users,calls,speakers,transcripts").status == "success"
    speaker = live(source(env, "call_speaker"))[0]
    update_rows(env.bq, env.gong("call_speaker"), {"id": speaker["id"], "call_id": speaker["call_id"]},
                {"talk_time": 777.0}, dt.datetime.now(dt.UTC))
    environ = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API")}
    environ.update(env.vars())
    environ["PREFECT_HOME"] = str(tmp_path / "prefect")  # no profile that names an API either
    log = tmp_path / "run.log"
    with psycopg.connect(env.database_url) as app:
        app.execute("LOCK TABLE public.speakers IN ACCESS EXCLUSIVE MODE")  # the app, mid-migration
        with log.open("w") as out:
            proc = subprocess.Popen([sys.executable, "-m", "runtime.cli", "--asset", "users,calls,speakers,transcripts"],
                                    env=environ, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
            deadline = time.monotonic() + 120
            while "asset=speakers" not in log.read_text() and time.monotonic() < deadline:
                time.sleep(0.1)
            time.sleep(1.0)  # speakers is now waiting for the app's lock
            proc.send_signal(signal.SIGINT)
            time.sleep(1.0)
        app.rollback()  # the app lets go; speakers finishes its step, transcripts never starts
    code = proc.wait(timeout=120)
    text = log.read_text()
    assert text.splitlines()[0].startswith("materialize: running in-process"), text[:300]
    assert code == 130, text[-3000:]
    assert "status cancelled" in text and "transcripts  cancelled" in text, text[-3000:]
    assert "Traceback" not in text
    # The next run picks up where it stopped and leaves the app in step with the source.
    again = subprocess.run([sys.executable, "-m", "runtime.cli", "--asset", "users,calls,speakers,transcripts"],
                           env=environ, capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert_in_step(env)
