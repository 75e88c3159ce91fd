"""Real parts for every test: one BigQuery emulator, one Postgres server and one Prefect test
server per session; a fresh database and fresh BigQuery datasets per test."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psycopg
import pytest
from psycopg import sql

# Offline before anything imports Prefect or dlt.
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("RUNTIME__DLTHUB_TELEMETRY", "false")

from runtime.local.embedded_pg import EmbeddedPostgres  # noqa: E402
from runtime.local.emulator import BigQueryEmulator  # noqa: E402

#: Variables a test run must not inherit from the developer's shell.
_PROJECT_VARS = (
    "DATABASE_URL", "GONG_DATASET", "SALESFORCE_DATASET", "RAW_SCHEMA", "DESTINATION_SCHEMA",
    "BIGQUERY_EMULATOR_HOST", "BIGQUERY_STORAGE_EMULATOR_HOST", "GOOGLE_APPLICATION_CREDENTIALS",
    "PIPELINES_DIR", "MAX_PARALLEL", "INTERNAL_EMAIL_DOMAINS", "OTEL_EXPORTER_OTLP_ENDPOINT",
    "SLACK_WEBHOOK_URL", "PAGERDUTY_ROUTING_KEY", "PAGERDUTY_EVENTS_URL", "JAEGER_UI_URL",
)


@pytest.fixture(scope="session")
def emulator() -> Iterator[BigQueryEmulator]:
    with BigQueryEmulator() as emu:
        yield emu


@pytest.fixture(scope="session")
def pg_server_url() -> Iterator[str]:
    """An admin URL: TEST_DATABASE_URL's server when given, else an embedded throwaway server."""
    given = os.environ.get("TEST_DATABASE_URL")
    if given:
        yield given
        return
    with EmbeddedPostgres() as server:
        yield server.url


@pytest.fixture(scope="session", autouse=True)
def prefect_server() -> Iterator[None]:
    """One Prefect test server for the session (it costs ~9 s to start)."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=60):
        yield


def _swap_database(url: str, name: str) -> str:
    head, _, _ = url.rpartition("/")
    return f"{head}/{name}"


@dataclass
class Env:
    """One test's world: its database, its datasets and the settings that point at them."""

    database_url: str
    gong_dataset: str
    salesforce_dataset: str
    emulator: BigQueryEmulator
    pipelines_dir: Path

    @property
    def bq(self):  # noqa: ANN201 - google.cloud.bigquery.Client
        return self.emulator.client()

    def vars(self) -> dict[str, str]:
        return {
            "DATABASE_URL": self.database_url,
            "GONG_DATASET": self.gong_dataset,
            "SALESFORCE_DATASET": self.salesforce_dataset,
            "PIPELINES_DIR": str(self.pipelines_dir),
            "RETRY_BACKOFF_BASE": "0.05",
            "RETRY_BACKOFF_MAX": "0.2",
            **self.emulator.env(),
        }

    def connect(self) -> psycopg.Connection:
        return psycopg.connect(self.database_url, autocommit=True)

    def rows(self, query: str, params: object = None) -> list[tuple]:
        with self.connect() as conn:
            return conn.execute(query, params).fetchall()

    def gong(self, table: str) -> str:
        return f"{self.emulator.project}.{self.gong_dataset}.{table}"


@pytest.fixture
def env(emulator: BigQueryEmulator, pg_server_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Env]:
    """A fresh database and fresh dataset names, exported as the pipeline's environment."""
    suffix = uuid.uuid4().hex[:10]
    db = f"t_{suffix}"
    with psycopg.connect(pg_server_url, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(db)))
    world = Env(
        database_url=_swap_database(pg_server_url, db),
        gong_dataset=f"gong_{suffix}",
        salesforce_dataset=f"sf_{suffix}",
        emulator=emulator,
        pipelines_dir=tmp_path / "pipelines",
    )
    for name in _PROJECT_VARS:
        monkeypatch.delenv(name, raising=False)
    for name, value in world.vars().items():
        monkeypatch.setenv(name, value)
    yield world
    with psycopg.connect(pg_server_url, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(db)))
