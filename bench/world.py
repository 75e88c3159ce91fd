"""The benchmark's local parts: a restartable emulator, Postgres, a Prefect server, seeded data."""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import signal
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
from google.cloud import bigquery
from psycopg import sql

from assets.app_schema import TABLES as APP_TABLES
from runtime.local.embedded_pg import EmbeddedPostgres
from runtime.local.emulator import BigQueryEmulator, free_port
from runtime.local.seed import DEFAULT_DATASETS, SOURCE_SCHEMAS, seed_workspace
from runtime.local.source_schema import table_label
from runtime.settings import Settings

#: Monologues per call in the synthetic workspace (2 to 5, uniformly): calls for N transcript rows.
TRANSCRIPTS_PER_CALL = 3.5
#: The tables that grow with N; every other source table is seeded at the demo's size so that
#: every asset has data, while the transcripts dominate the row count.
SCALED_TABLES = ("gong.users", "gong.call", "gong.transcript", "gong.call_speaker")
SMALL_CALLS = 200

#: Per scaled table: which rows the 1% change touches (ids are a large base plus a running number,
#: so the number modulo 100 picks 1% of the rows) and the column that really changes.
_ONE_PERCENT = {
    "gong.users": ("MOD(CAST(id AS INT64), 100) = @bucket", "title = @note"),
    "gong.call": ("MOD(CAST(id AS INT64), 100) = @bucket", "brief = @note"),
    "gong.transcript": ("MOD(CAST(call_id AS INT64), 100) = @bucket", "topic = @note"),
    "gong.call_speaker": ("MOD(CAST(id AS INT64), 100) = @bucket", "talk_time = talk_time + 1"),
}

_OFFLINE = {
    "DO_NOT_TRACK": "1",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "RUNTIME__DLTHUB_TELEMETRY": "false",
}
_PREFECT_START_TIMEOUT_S = 90


def calls_for(rows: int) -> int:
    """Calls whose transcripts come to about `rows` rows."""
    return max(SMALL_CALLS, round(rows / TRANSCRIPTS_PER_CALL))


class PrefectServer:
    """A local Prefect server (SQLite under `home`), as the hourly deployment's worker has one."""

    def __init__(self, home: Path) -> None:
        self.home = home
        self.port = free_port()
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/api"

    def start(self) -> PrefectServer:
        self.home.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, **_OFFLINE, "PREFECT_HOME": str(self.home)}
        env.pop("PREFECT_API_URL", None)
        log = open(self.home / "server.log", "ab")  # noqa: SIM115 - the server keeps it for its life
        # Its own session: the server starts uvicorn as a child, and stop() ends both together.
        self._process = subprocess.Popen(
            [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(self.port)],
            env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )
        log.close()
        deadline = time.monotonic() + _PREFECT_START_TIMEOUT_S
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise RuntimeError(f"prefect server exited with code {self._process.returncode}; see {self.home}")
            with contextlib.suppress(OSError):
                with opener.open(f"{self.api_url}/health", timeout=1) as response:
                    if response.status == 200:
                        return self
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"prefect server did not answer within {_PREFECT_START_TIMEOUT_S} s")

    def stop(self) -> None:
        process, self._process = self._process, None
        if process is None or process.poll() is not None:
            return
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(15)


class World:
    """Everything one benchmark run shares; a context manager that stops what it started."""

    def __init__(self, folder: Path, database_url: str | None = None) -> None:
        self.folder = folder
        self.emulator = BigQueryEmulator(data_dir=folder / "bigquery")
        self.prefect = PrefectServer(folder / "prefect")
        self._given_url = database_url
        self._postgres: EmbeddedPostgres | None = None
        self.admin_url = database_url or ""
        self.gong_dataset = DEFAULT_DATASETS["gong"]
        self.salesforce_dataset = DEFAULT_DATASETS["salesforce"]
        self.table_rows: dict[str, int] = {}

    def __enter__(self) -> World:
        self.folder.mkdir(parents=True, exist_ok=True)
        self.emulator.start()
        if not self._given_url:
            self._postgres = EmbeddedPostgres().start()
            self.admin_url = self._postgres.url
        self.prefect.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.prefect.stop()
        self.emulator.stop()
        if self._postgres is not None:
            self._postgres.destroy()

    # -- BigQuery ------------------------------------------------------------------------------

    @property
    def project(self) -> str:
        return self.emulator.project

    def client(self) -> bigquery.Client:
        return self.emulator.client()

    def restart_emulator(self) -> None:
        """The emulator keeps every query result and read session in memory: start it afresh."""
        self.emulator.stop()
        self.emulator.start()

    def seed(self, rows: int, monologue_bytes: tuple[int, int] | None = None) -> dict[str, int]:
        """About `rows` transcript rows with their calls, speakers and users; the rest small.

        `monologue_bytes=(low, high)`: each monologue's text size (None: the demo's short ones).
        """
        client = self.client()
        names = dict(project=self.project, gong_dataset=self.gong_dataset, salesforce_dataset=self.salesforce_dataset)
        counts = seed_workspace(client, **names, calls=calls_for(rows), tables=SCALED_TABLES,
                                monologue_bytes=monologue_bytes)
        others = [table_label(k) for k in SOURCE_SCHEMAS if table_label(k) not in SCALED_TABLES]
        counts.update(seed_workspace(client, **names, calls=SMALL_CALLS, tables=others))
        client.close()
        self.table_rows = counts
        return counts

    def dataset_of(self, label: str) -> str:
        return self.gong_dataset if label.startswith("gong.") else self.salesforce_dataset

    def change_one_percent(self, bucket: int) -> int:
        """As a Fivetran sync would: change 1% of each scaled table's rows, with a new `_fivetran_synced`."""
        client = self.client()
        changed = 0
        for label, (where, assignment) in _ONE_PERCENT.items():
            ref = f"`{self.project}.{self.gong_dataset}.{label.split('.', 1)[1]}`"
            latest = next(iter(client.query(f"SELECT MAX(_fivetran_synced) FROM {ref}").result()))[0]
            synced = max(dt.datetime.now(dt.UTC), latest + dt.timedelta(seconds=1))
            params = [
                bigquery.ScalarQueryParameter("bucket", "INT64", bucket % 100),
                bigquery.ScalarQueryParameter("note", "STRING", f"benchmark change {bucket}"),
                bigquery.ScalarQueryParameter("synced", "TIMESTAMP", synced),
            ]
            query = f"UPDATE {ref} SET {assignment}, _fivetran_synced = @synced WHERE {where}"
            job = client.query(query, job_config=bigquery.QueryJobConfig(query_parameters=params))
            job.result()
            changed += job.num_dml_affected_rows or 0
        client.close()
        return changed

    # -- Postgres ------------------------------------------------------------------------------

    def server_version(self) -> str:
        with psycopg.connect(self.admin_url, autocommit=True) as conn:
            return conn.execute("SHOW server_version").fetchone()[0]

    @contextlib.contextmanager
    def database(self, purpose: str) -> Iterator[str]:
        """A fresh database for one measurement, dropped afterwards."""
        name = f"bench_{purpose}_{uuid.uuid4().hex[:8]}"
        with psycopg.connect(self.admin_url, autocommit=True) as conn:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        head, _, _ = self.admin_url.rpartition("/")
        try:
            yield f"{head}/{name}"
        finally:
            with psycopg.connect(self.admin_url, autocommit=True) as conn:
                conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))

    def app_rows(self, database_url: str) -> dict[str, int]:
        """Rows in each of the application's tables the sync fills (DESTINATION_SCHEMA, `public`)."""
        schema = os.environ.get("DESTINATION_SCHEMA") or Settings.model_fields["destination_schema"].default
        with psycopg.connect(database_url, autocommit=True) as conn:
            return {
                table: conn.execute(sql.SQL("SELECT count(*) FROM {}.{}").format(
                    sql.Identifier(schema), sql.Identifier(table))).fetchone()[0]
                for table in APP_TABLES
            }

    # -- the pipeline's environment ------------------------------------------------------------

    def sync_env(self, database_url: str, pipelines_dir: Path, *, own_prefect: bool = True) -> dict[str, str]:
        """The pipeline's settings for a run against this world (a Prefect server, or ephemeral)."""
        env = {key: value for key, value in os.environ.items() if key != "PREFECT_API_URL"}
        env.update(_OFFLINE)
        env.update(self.emulator.env())
        env.update({
            "DATABASE_URL": database_url,
            "GONG_DATASET": self.gong_dataset,
            "SALESFORCE_DATASET": self.salesforce_dataset,
            "PIPELINES_DIR": str(pipelines_dir),
            "PREFECT_HOME": str(self.prefect.home),
        })
        if own_prefect:
            env["PREFECT_API_URL"] = self.prefect.api_url
        return env
