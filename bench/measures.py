"""The measurements: the raw COPY limits, the source alone, the plain baseline, this project."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import psycopg
import pyarrow as pa
from psycopg import sql

from bench.world import World
from assets.app_schema import TABLES as APP_TABLES
from runtime.bigquery import BigQueryClients, TableReader, connect
from runtime.contract import create_app_schema
from runtime.postgres import Catalog
from runtime.settings import load_settings

#: A sync that takes longer than this has hung (a million rows take about a minute here).
SYNC_TIMEOUT_S = 1800


def _clients(world: World) -> BigQueryClients:
    """The project's own clients on the emulator (the same channel settings as a sync)."""
    emulator = {key.lower(): value for key, value in world.emulator.env().items()}
    return connect(load_settings(bigquery_project=world.project, **emulator))


def read_tables(world: World) -> dict[str, pa.Table]:
    """Every seeded table as one Arrow table in memory (untimed: the COPY limit's input)."""
    clients = _clients(world)
    try:
        return {
            label: pa.concat_tables(
                list(TableReader(clients, world.dataset_of(label), label.split(".", 1)[1]).read(None, "_fivetran_synced", None))
            )
            for label, rows in world.table_rows.items()
            if rows
        }
    finally:
        clients.close()


def copy_limit(url: str, tables: dict[str, pa.Table]) -> float:
    """Seconds to write the rows with one binary COPY per table (ADBC), on one connection."""
    import adbc_driver_postgresql.dbapi as adbc

    with adbc.connect(url) as conn:
        with conn.cursor() as cur:
            cur.execute("CREATE SCHEMA bench_copy")
        conn.commit()
        started = time.perf_counter()
        with conn.cursor() as cur:
            for label, table in tables.items():
                cur.adbc_ingest(label.replace(".", "__"), table, mode="create", db_schema_name="bench_copy")
        conn.commit()
        return time.perf_counter() - started


def dlt_alone(url: str, tables: dict[str, pa.Table], pipelines_dir: Path) -> float:
    """Seconds for dlt alone, tuned, to load the same source rows into plain tables: Arrow in,
    Parquet load files, ADBC's binary COPY out (what dlt can do with no app schema, no merge, no
    raw replica kept in step): the loader this project builds on, measured by itself."""
    import dlt

    pipeline = dlt.pipeline(
        pipeline_name="bench_dlt_alone", pipelines_dir=str(pipelines_dir),
        destination=dlt.destinations.postgres(credentials=url), dataset_name="dlt_alone",
    )
    resources = [
        dlt.resource(_batches(table), name=label.replace(".", "__"), write_disposition="append")
        for label, table in tables.items()
    ]
    started = time.perf_counter()
    pipeline.run(resources, loader_file_format="parquet")
    seconds = time.perf_counter() - started
    # A load that lost rows measured nothing: every row is there, table by table.
    with psycopg.connect(url) as conn:
        for label, table in tables.items():
            query = sql.SQL("SELECT count(*) FROM {}").format(sql.Identifier("dlt_alone", label.replace(".", "__")))
            landed = conn.execute(query).fetchone()[0]
            if landed != table.num_rows:
                raise RuntimeError(f"dlt alone landed {landed} of {table.num_rows} rows of {label}")
    return seconds


def _batches(table: pa.Table):  # noqa: ANN202 - a generator of record batches
    # Batches, as a source hands them over (a whole table would be one Parquet row group).
    yield from table.to_batches(max_chunksize=65_536)


#: Bytes per write of the destination COPY.
_COPY_CHUNK = 1 << 20


def destination_copy_limit(world: World, sync_url: str) -> float:
    """Seconds to write what the sync wrote to the application's tables, with one binary COPY per
    table, into a fresh database with the app's schema (its keys, foreign keys, indexes and
    triggers, as the app deploys it), on one connection.

    The same destination rows into the same tables: the transcripts' full-text trigger runs for
    each row as it does for the sync, so what the app's schema costs is in both sides of the ratio.
    """
    catalog = Catalog(load_settings())
    dumps: dict[str, IO[bytes]] = {}
    try:
        with psycopg.connect(sync_url) as conn:
            for table in APP_TABLES:  # in the order the foreign keys allow
                dumps[table] = tempfile.TemporaryFile()
                query = sql.SQL("COPY {} TO STDOUT (FORMAT binary)").format(catalog.dest_table(table))
                with conn.cursor().copy(query) as copy:
                    for chunk in copy:
                        dumps[table].write(chunk)
        with world.database("copy_app") as url, psycopg.connect(url) as conn:
            create_app_schema(conn, catalog)
            conn.commit()
            started = time.perf_counter()
            for table, dump in dumps.items():
                dump.seek(0)
                query = sql.SQL("COPY {} FROM STDIN (FORMAT binary)").format(catalog.dest_table(table))
                with conn.cursor().copy(query) as copy:
                    while chunk := dump.read(_COPY_CHUNK):
                        copy.write(chunk)
            conn.commit()
            return time.perf_counter() - started
    finally:
        for dump in dumps.values():
            dump.close()


def source_read(world: World) -> tuple[float, int]:
    """Seconds and rows to read every seeded table through the Storage Read API (TableReader)."""
    clients = _clients(world)
    rows = 0
    try:
        started = time.perf_counter()
        for label, count in world.table_rows.items():
            if count:
                reader = TableReader(clients, world.dataset_of(label), label.split(".", 1)[1])
                for table in reader.read(None, "_fivetran_synced", None):
                    rows += table.num_rows
        return time.perf_counter() - started, rows
    finally:
        clients.close()


@dataclass
class Baseline:
    """The plain baseline on a subset: REST query pages to dict rows, then dlt's defaults."""

    rows: int
    query_s: float
    load_s: float

    @property
    def seconds(self) -> float:
        return self.query_s + self.load_s


def plain_baseline(world: World, url: str, pipelines_dir: Path, fraction: float) -> Baseline:
    """What a user would write: `client.query(...).result()` per table, then `pipeline.run(rows)`.

    dlt runs with its defaults: append, `insert_values`, and JSON arrays unnested into child tables.
    Only `fraction` of each table is moved (REST paging is slow); rows/s is extrapolated from it.
    """
    import dlt

    client = world.client()
    pipeline = dlt.pipeline(
        pipeline_name="bench_baseline", pipelines_dir=str(pipelines_dir),
        destination=dlt.destinations.postgres(credentials=url), dataset_name="baseline",
    )
    rows = 0
    query_s = load_s = 0.0
    try:
        for label, count in world.table_rows.items():
            limit = max(1, round(count * fraction)) if count else 0
            if not limit:
                continue
            table = label.split(".", 1)[1]
            started = time.perf_counter()
            result = client.query(f"SELECT * FROM `{world.project}.{world.dataset_of(label)}.{table}` LIMIT {limit}").result()
            data = [dict(row.items()) for row in result]
            query_s += time.perf_counter() - started
            started = time.perf_counter()
            pipeline.run(data, table_name=label.replace(".", "__"))
            load_s += time.perf_counter() - started
            rows += len(data)
    finally:
        client.close()
    return Baseline(rows=rows, query_s=query_s, load_s=load_s)


@dataclass
class SyncRun:
    """One `materialize` process: wall time, the time inside it, its peak memory and outcomes."""

    wall_s: float
    import_s: float
    run_s: float
    peak_rss_mb: float
    rows_read: int
    rows_loaded: int
    #: Rows of the application's tables inserted or updated, and deleted.
    rows_written: int
    rows_deleted: int
    outcomes: list[dict]


def project_sync(env: dict[str, str], selection: str, folder: Path, name: str) -> SyncRun:
    """Run the real flow in a subprocess (`python -m bench.child`); fail loudly unless it succeeded."""
    folder.mkdir(parents=True, exist_ok=True)
    out, log = folder / f"{name}.json", folder / f"{name}.log"
    out.unlink(missing_ok=True)
    repo = Path(__file__).resolve().parent.parent
    env = {**env, "PYTHONPATH": os.pathsep.join(filter(None, [str(repo), env.get("PYTHONPATH")]))}
    with log.open("wb") as sink:
        started = time.perf_counter()
        process = subprocess.Popen(
            [sys.executable, "-m", "bench.child", str(out), selection],
            env=env, cwd=repo, stdin=subprocess.DEVNULL, stdout=sink, stderr=subprocess.STDOUT,
        )
        try:
            process.wait(SYNC_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
            raise RuntimeError(f"sync {name} did not finish within {SYNC_TIMEOUT_S} s; see {log}") from None
        wall = time.perf_counter() - started
    report = json.loads(out.read_text()) if out.exists() else {}
    if process.returncode != 0 or report.get("status") != "success":
        tail = log.read_text(errors="replace")[-3000:]
        raise RuntimeError(f"sync {name} ended with code {process.returncode}, status {report.get('status')}:\n{tail}")
    outcomes = report["outcomes"]
    return SyncRun(
        wall_s=wall,
        import_s=report["import_s"],
        run_s=report["run_s"],
        peak_rss_mb=report["peak_rss_mb"],
        rows_read=sum(o["rows_read"] for o in outcomes),
        rows_loaded=sum(o["rows_loaded"] for o in outcomes),
        rows_written=sum(o["rows_written"] for o in outcomes),
        rows_deleted=sum(o["rows_deleted"] for o in outcomes),
        outcomes=outcomes,
    )
