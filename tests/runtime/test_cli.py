"""`materialize` as an operator runs it: exit codes, messages, and no secret in any output."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import psycopg
import pytest

from runtime.local.emulator import free_port
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


def test_a_url_without_password_uses_libpq_s_own_sources(env, password_role):
    """A password from PGPASSWORD (or ~/.pgpass, or trust): the URL carries none, and dlt's
    loads connect as the pipeline's own connections do."""
    seed_workspace(env.bq, project=env.emulator.project, gong_dataset=env.gong_dataset, calls=10, tables=["gong.users"])
    with psycopg.connect(env.database_url, autocommit=True) as conn:
        conn.execute(f"GRANT CREATE ON DATABASE {conn.info.dbname} TO {password_role}")
        conn.execute(f"GRANT ALL ON SCHEMA public TO {password_role}")
    url = with_password(env.database_url, "", user=password_role).replace(f"{password_role}:@", f"{password_role}@")
    assert f"{password_role}@" in url
    try:
        result = materialize("--asset", "users", env_vars={**env.vars(), "DATABASE_URL": url, "PGPASSWORD": CANARY})
        assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
        assert env.rows("SELECT count(*) FROM gong_raw.gong__users")[0][0] > 0
        assert env.rows("SELECT count(*) FROM users")[0][0] > 0
        assert CANARY not in result.stdout + result.stderr
    finally:  # what the role made goes to the test's owner, so the role can be dropped
        with psycopg.connect(env.database_url, autocommit=True) as conn:
            conn.execute(f"REASSIGN OWNED BY {password_role} TO CURRENT_USER")
            conn.execute(f"DROP OWNED BY {password_role}")


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

    # A source table the selection needs is a setting to fix: exit 2 before any work, one line.
    env.bq.delete_table(env.gong("call_speaker"))
    before = env.rows("SELECT id, talk_time_seconds FROM speakers ORDER BY id")
    failed = materialize("--asset", "speakers", env_vars=env.vars())
    assert failed.returncode == 2, failed.stdout + failed.stderr
    (message,) = [line for line in failed.stderr.splitlines() if line.startswith("materialize: ")]
    assert message == (f"materialize: speakers: source table prefect-data-warehouse.{env.gong_dataset}.call_speaker"
                       " does not exist (set GONG_DATASET) (narrow the selection with --asset to run the rest)")
    assert "Traceback" not in failed.stderr and "run.start" not in failed.stderr
    assert env.rows("SELECT id, talk_time_seconds FROM speakers ORDER BY id") == before


#: A password libpq's URL parser cannot take unencoded: a space, a slash, an at sign, a hash.
AWKWARD = "Can ary/Pa55@w#rd?7d1e"


def canary_parts() -> list[str]:
    """Pieces of the awkward password, any of which in an output would be a leak."""
    return ["Can ary", "ary/Pa55", "Pa55@w", "w#rd", "rd?7d1e"]


def bad_settings(env) -> dict[str, tuple[dict[str, str], str]]:  # noqa: ANN001 - the env fixture
    host_port_db = env.database_url.split("@", 1)[1]
    return {
        "malformed url": ({"DATABASE_URL": "postgres://nope"}, "materialize: DATABASE_URL: unknown host nope (no such name)"),
        "unknown host": ({"DATABASE_URL": "postgresql://postgres@no-such-host.invalid:5432/test"},
                         "materialize: DATABASE_URL: unknown host no-such-host.invalid (no such name)"),
        "bad port": ({"DATABASE_URL": "postgresql://postgres@127.0.0.1:99999/test"},
                     "materialize: DATABASE_URL: the port is not a number from 1 to 65535; percent-encode"),
        "unencoded password": ({"DATABASE_URL": f"postgresql://postgres:{AWKWARD}@{host_port_db}"},
                               "materialize: DATABASE_URL cannot be read as postgresql://USER:PASSWORD@HOST:PORT/DATABASE"),
        "password with a slash": ({"DATABASE_URL": f"postgresql://postgres:Can/ary@{host_port_db}"},
                                  "materialize: DATABASE_URL: the port is not a number from 1 to 65535"),
        "number setting": ({"LOCK_TIMEOUT": "soon"}, "materialize: invalid settings: LOCK_TIMEOUT:"),
        "several hosts": ({"DATABASE_URL": f"postgresql://postgres@127.0.0.1,{host_port_db}"},
                          "materialize: DATABASE_URL names several hosts: name one"),
        "missing table": ({"EMAIL_TABLE": "no_such_email"},
                          f"materialize: emails: source table prefect-data-warehouse.{env.gong_dataset}.no_such_email "
                          "does not exist (set GONG_DATASET, EMAIL_TABLE)"),
    }


@pytest.mark.parametrize("case", ["malformed url", "unknown host", "bad port", "unencoded password",
                                  "password with a slash", "number setting", "several hosts",
                                  "missing table"])
def test_each_bad_setting_is_exit_2_at_once_in_one_line_naming_it(env, case):
    seed_workspace(env.bq, project=env.emulator.project, gong_dataset=env.gong_dataset,
                   salesforce_dataset=env.salesforce_dataset, calls=10)
    changed, expected = bad_settings(env)[case]
    started = time.monotonic()
    result = materialize(env_vars={**env.vars(), **changed})
    elapsed = time.monotonic() - started
    output = result.stdout + result.stderr
    assert result.returncode == 2, output[-3000:]
    (message,) = [line for line in result.stderr.splitlines() if line.startswith("materialize: ")]
    assert message.startswith(expected), message
    # At once: nothing retried (the bound is 5 s; this machine is shared, so the test
    # only rules out the retry loop, which takes the backoff's seconds).
    assert "attempt 2 of" not in output and "Traceback" not in output
    assert elapsed < 30, elapsed
    assert not any(part in output for part in canary_parts()), output
    assert env.rows("SELECT to_regclass('public.calls') IS NULL") == [(True,)]  # nothing was done


def test_a_closed_port_is_retried_then_exit_1_in_one_line(env):
    from urllib.parse import quote

    port = free_port()
    url = f"postgresql://postgres:{quote(AWKWARD, safe='')}@127.0.0.1:{port}/test"  # encoded, as the README says
    assert f"127.0.0.1:{port}/" in url
    result = materialize("--asset", "users", env_vars={**env.vars(), "DATABASE_URL": url})
    output = result.stdout + result.stderr
    assert result.returncode == 1, output[-3000:]
    assert "connect: attempt 3 of 4 failed" in output  # it was retried: Postgres may be starting
    (message,) = [line for line in result.stderr.splitlines() if line.startswith("materialize: ")]
    assert message == f"materialize: DATABASE_URL: nothing accepts connections at 127.0.0.1:{port} (is Postgres running?)"
    assert "Traceback" not in output
    assert not any(part in output for part in canary_parts() + [quote(AWKWARD, safe='')]), output


def test_a_closed_emulator_port_is_retried_then_exit_1_in_one_line(env):
    port = free_port()
    closed = {"BIGQUERY_EMULATOR_HOST": f"http://127.0.0.1:{port}", "BIGQUERY_STORAGE_EMULATOR_HOST": f"127.0.0.1:{port}",
              "BIGQUERY_TIMEOUT": "3"}
    result = materialize("--asset", "users", env_vars={**env.vars(), **closed})
    output = result.stdout + result.stderr
    assert result.returncode == 1, output[-3000:]
    (message,) = [line for line in result.stderr.splitlines() if line.startswith("materialize: ")]
    assert message == (f"materialize: no answer from the emulator at http://127.0.0.1:{port} (BIGQUERY_EMULATOR_HOST) "
                       f"within 3 s (BIGQUERY_TIMEOUT) for dataset prefect-data-warehouse.{env.gong_dataset}: RetryError")
    assert "attempt 3 of 4 failed" in output  # retried: the emulator may be starting
    assert "Traceback" not in output


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
