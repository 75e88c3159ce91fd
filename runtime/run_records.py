"""`sync_runs`: one row per asset per run, so a run's figures survive without a metrics backend."""

from __future__ import annotations

import datetime as dt
import json
import threading
from collections.abc import Sequence

import psycopg
from psycopg import sql
from psycopg_pool import ConnectionPool

from observability.events import AssetOutcome, RunInfo
from observability.hooks import Hook
from observability.logs import redact
from runtime.postgres import Catalog

TABLE = "sync_runs"

_DDL = """CREATE TABLE IF NOT EXISTS {} (
    run_id text NOT NULL,
    asset text NOT NULL,
    flow_run_id text,
    started_at timestamptz NOT NULL,
    finished_at timestamptz NOT NULL,
    duration_s double precision NOT NULL,
    status text NOT NULL CHECK (status IN ('success', 'failed', 'skipped', 'cancelled')),
    rows_read bigint NOT NULL DEFAULT 0,
    rows_loaded bigint NOT NULL DEFAULT 0,
    rows_written bigint NOT NULL DEFAULT 0,
    rows_deleted bigint NOT NULL DEFAULT 0,
    rows_synced bigint NOT NULL DEFAULT 0,
    rows_dead_lettered bigint NOT NULL DEFAULT 0,
    schema_changes integer NOT NULL DEFAULT 0,
    errors integer NOT NULL DEFAULT 0,
    checkpoint jsonb,
    error text,
    trace_id text,
    PRIMARY KEY (run_id, asset)
)"""


def ensure_sync_runs(conn: psycopg.Connection, catalog: Catalog) -> None:
    table = catalog.sync_table(TABLE)
    conn.execute(sql.SQL(_DDL).format(table))
    conn.execute(
        sql.SQL("CREATE INDEX IF NOT EXISTS {} ON {} (asset, finished_at DESC)").format(
            sql.Identifier(f"{TABLE}__asset_finished"), table
        )
    )


class SyncRunsRecorder(Hook):
    """Writes each asset's row when it ends (skipped ones too), with the run's trace id."""

    def __init__(self, pool: ConnectionPool, catalog: Catalog) -> None:
        self.pool = pool
        self.catalog = catalog
        self._started: dict[str, dt.datetime] = {}
        self._lock = threading.Lock()

    def run_started(self, run: RunInfo) -> None:
        with self.pool.connection() as conn:
            ensure_sync_runs(conn, self.catalog)

    def asset_started(self, run: RunInfo, asset: str) -> None:
        with self._lock:
            self._started[asset] = dt.datetime.now(dt.UTC)

    def asset_finished(self, run: RunInfo, outcome: AssetOutcome, error: BaseException | None) -> None:
        finished = dt.datetime.now(dt.UTC)
        with self._lock:
            started = self._started.pop(outcome.asset, finished)
        with self.pool.connection() as conn:
            conn.execute(
                sql.SQL(
                    "INSERT INTO {} (run_id, asset, flow_run_id, started_at, finished_at, duration_s, status,"
                    " rows_read, rows_loaded, rows_written, rows_deleted, rows_synced, rows_dead_lettered,"
                    " schema_changes, errors, checkpoint, error, trace_id)"
                    " VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)"
                    " ON CONFLICT (run_id, asset) DO UPDATE SET finished_at = EXCLUDED.finished_at,"
                    " duration_s = EXCLUDED.duration_s, status = EXCLUDED.status, rows_read = EXCLUDED.rows_read,"
                    " rows_loaded = EXCLUDED.rows_loaded, rows_written = EXCLUDED.rows_written,"
                    " rows_deleted = EXCLUDED.rows_deleted, rows_synced = EXCLUDED.rows_synced,"
                    " rows_dead_lettered = EXCLUDED.rows_dead_lettered, schema_changes = EXCLUDED.schema_changes,"
                    " errors = EXCLUDED.errors, checkpoint = EXCLUDED.checkpoint, error = EXCLUDED.error,"
                    " trace_id = EXCLUDED.trace_id"
                ).format(self.catalog.sync_table(TABLE)),
                (
                    run.run_id, outcome.asset, str(run.flow_run_id) if run.flow_run_id else None, started, finished,
                    outcome.duration_s, outcome.status, outcome.rows_read, outcome.rows_loaded, outcome.rows_written,
                    outcome.rows_deleted, outcome.rows_synced, outcome.rows_dead_lettered,
                    outcome.schema_changes, outcome.errors,
                    json.dumps(outcome.checkpoint_after) if outcome.checkpoint_after else None,
                    redact(outcome.error) if outcome.error else None, run.trace_id,
                ),
            )

    def run_finished(self, run: RunInfo, outcomes: Sequence[AssetOutcome], error: BaseException | None) -> None:
        with self._lock:
            self._started.clear()
