"""Merging changes into a large raw table finds the rows to replace through its primary key.

dlt's delete-insert merge runs `DELETE FROM raw.t AS d WHERE EXISTS (SELECT 1 FROM staging.t AS s
WHERE d.k = s.k ...)`. Without an index that is a scan of the whole raw table on every run;
`secure_raw_table` gives the table its primary key. This test lands a realistic transcript table,
changes 1% of it, lands again, and asks Postgres for the plan of the very statement dlt wrote.
The second test asks the same of the build's DELETE of dropped destination rows.
"""

from __future__ import annotations

import re
from decimal import Decimal
from pathlib import Path

from psycopg import sql

from assets.transcripts import ASSET as TRANSCRIPTS
from runtime.bigquery import connect
from runtime.build import build_asset, delete_dropped_query, stage_changed_rows
from runtime.load import LandResult, land
from runtime.local.seed import seed_workspace
from runtime.postgres import Catalog, prepare_schemas, secure_raw_table
from runtime.settings import load_settings

#: About 50,000 transcript rows: large enough that a scan of the raw table is the costly plan.
CALLS = 15_000


def _merge_delete(pipelines_dir: Path, raw_table: str) -> str:
    """The DELETE dlt wrote for the last merge of `raw_table` (kept with the completed package)."""
    found = []
    for path in pipelines_dir.rglob("*.sql"):
        for statement in path.read_text().splitlines():  # one statement per line
            if re.search(rf"DELETE\s+FROM\s+\S*{raw_table}\S*\s+as\s+d\s+WHERE\s+EXISTS", statement, re.I):
                found.append((path.stat().st_mtime, statement.strip()))
    assert found, f"no merge DELETE for {raw_table} under the pipelines folder"
    return max(found)[1]


def _land_then_change(env, change: str, *, build: bool = False) -> tuple[LandResult, LandResult, Catalog]:
    """Land the seeded transcripts and secure the raw table (with `build`: build the destination
    too, analyzed as autovacuum leaves it), then, as a later Fivetran sync, change the transcripts
    matching `change` and land again."""
    seed_workspace(env.bq, project=env.emulator.project, gong_dataset=env.gong_dataset, calls=CALLS,
                   tables=["gong.transcript"])
    settings = load_settings()
    clients = connect(settings)
    catalog = Catalog(settings)
    source = TRANSCRIPTS.sources[0]
    try:
        with env.connect() as conn:
            prepare_schemas(conn, catalog, [TRANSCRIPTS])
        first = land(TRANSCRIPTS, settings, clients, env.database_url)
        with env.connect() as conn:
            secure_raw_table(conn, catalog, source)
            if build:
                build_asset(conn, catalog, TRANSCRIPTS, settings, full=False)
                # As autovacuum does after a large first build: the planner knows the tables' sizes.
                conn.execute(sql.SQL("ANALYZE {}").format(catalog.dest_table(TRANSCRIPTS.table)))
                conn.execute(sql.SQL("ANALYZE {}").format(catalog.raw_table(source.raw_table)))
        env.bq.query(
            f"UPDATE `{env.gong('transcript')}` SET topic = 'Renewal', "
            f"_fivetran_synced = TIMESTAMP '2027-01-01 00:00:00.000001+00' WHERE {change}"
        ).result()
        second = land(TRANSCRIPTS, settings, clients, env.database_url)
    finally:
        clients.close()
    return first, second, catalog


def test_merge_into_a_large_raw_table_uses_the_primary_key(env) -> None:
    source = TRANSCRIPTS.sources[0]
    # 1% of the calls' transcripts change.
    first, second, _ = _land_then_change(env, "MOD(CAST(call_id AS INT64), 100) = 7")
    total = first.rows_loaded[source.raw_table]
    changed = second.rows_loaded[source.raw_table]
    assert total > 45_000 and 0 < changed < total / 50

    delete = _merge_delete(env.pipelines_dir, source.raw_table)
    with env.connect() as conn:
        plan = "\n".join(row[0] for row in conn.execute("EXPLAIN " + delete).fetchall())
        rows = conn.execute(f'SELECT count(*) FROM gong_raw."{source.raw_table}"').fetchone()[0]
    assert rows == total
    assert f"{source.raw_table}_pkey on {source.raw_table} d" in plan, plan
    assert f"Seq Scan on {source.raw_table} d" not in plan, plan


def test_an_incremental_build_reads_its_built_rows_once_to_find_dropped_ones(env) -> None:
    # The build's DELETE of rows whose input is gone compares the changed keys with the rows built
    # for them, two temp tables. Planned on an estimate of one row, it scanned the built rows once
    # per changed key: 10k changed transcripts took 6 s, 11k speakers 3.4 s.
    _, _, catalog = _land_then_change(env, "MOD(CAST(call_id AS INT64), 20) = 3", build=True)

    with env.connect() as conn, conn.transaction(force_rollback=True):
        since = conn.execute(
            sql.SQL("SELECT loaded_through FROM {} WHERE asset = 'transcripts'").format(catalog.watermarks)
        ).fetchone()[0]
        params = {table: Decimal(value) for table, value in since.items()}
        stage_changed_rows(conn, TRANSCRIPTS, {"raw": catalog.raw, "dest": catalog.dest}, params)
        changed = conn.execute("SELECT count(*) FROM _build_changed").fetchone()[0]
        delete = delete_dropped_query(TRANSCRIPTS, catalog.dest_table(TRANSCRIPTS.table), full=False)
        plan = [row[0] for row in conn.execute(sql.SQL("EXPLAIN ANALYZE {}").format(delete)).fetchall()]
    assert changed > 2_000
    scans = [line for line in plan if "Scan on _build_rows" in line]
    assert scans and all("loops=1)" in line for line in scans), "\n".join(plan)
