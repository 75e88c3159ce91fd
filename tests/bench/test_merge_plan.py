"""Incremental work on large tables goes through indexes, not whole-table scans.

dlt's delete-insert merge runs `DELETE FROM raw.t AS d WHERE EXISTS (SELECT 1 FROM staging.t AS s
WHERE d.k = s.k ...)`. Without an index that is a scan of the whole raw table on every run;
`secure_raw_table` gives the table its primary key. The first test lands a realistic transcript
table, changes 1% of it, lands again, and asks Postgres for the plan of the very statement dlt
ran (a statement trigger records its text as it runs).

The second asks the same of the incremental transcripts build after a full sync: building the
app rows of the changed monologues, and finding the app rows whose source rows are gone, must
fetch them by key from the large raw transcript table and the app's transcripts table.
"""

from __future__ import annotations

import datetime as dt
import re
import uuid

import psycopg
from google.cloud import bigquery
from psycopg import sql

from assets.calls import ASSET as CALLS_ASSET
from assets.spec import AssetSpec
from assets.speakers import ASSET as SPEAKERS
from assets.transcripts import ASSET as TRANSCRIPTS
from graph import Selection, default_graph
from observability.events import RunInfo
from observability.hooks import HookSet
from runtime.bigquery import connect
from runtime.build import CHANGED, GONE, ROWS, BuildSql, _stage_changed
from runtime.contract import duplicate_keys_query
from runtime.deletes import DeleteGuard
from runtime.load import LandResult, land
from runtime.local.seed import seed_workspace
from runtime.materialize import RunContext, materialize_asset
from runtime.postgres import Catalog, prepare_schemas, secure_raw_table
from runtime.session import open_session
from runtime.settings import load_settings

#: About 50,000 transcript rows: large enough that a scan of the raw table is the costly plan.
CALLS = 15_000


#: A statement trigger on the raw table keeps the text of every DELETE that runs on it, as the
#: client sent it (`current_query()`): the very statements dlt ran, whatever dlt keeps on disk.
_PROBE = """
    CREATE SCHEMA IF NOT EXISTS probe;
    CREATE TABLE IF NOT EXISTS probe.deletes (at timestamptz NOT NULL DEFAULT clock_timestamp(), query text);
    CREATE OR REPLACE FUNCTION probe.remember() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN INSERT INTO probe.deletes (query) VALUES (current_query()); RETURN NULL; END $$;
    CREATE TRIGGER probe_deletes AFTER DELETE ON {table} FOR EACH STATEMENT EXECUTE FUNCTION probe.remember();
"""


def _merge_delete(conn: psycopg.Connection, raw_table: str) -> str:
    """The DELETE dlt ran for the last merge of `raw_table`, as the probe recorded it."""
    found = []
    for at, query in conn.execute("SELECT at, query FROM probe.deletes ORDER BY at").fetchall():
        for statement in re.split(r";\s*(?:\n|$)|\n", query):  # one statement per line or per `;`
            if re.search(rf"DELETE\s+FROM\s+\S*{raw_table}\S*\s+as\s+d\s+WHERE\s+EXISTS", statement, re.I):
                found.append((at, statement.strip().rstrip(";")))
    assert found, f"no merge DELETE ran on {raw_table}"
    return found[-1][1]


def _change_transcripts(env, where: str, *, deleted: str = "false") -> None:
    """As a later Fivetran sync: the transcripts matching `where` change (those matching
    `deleted` are soft-deleted), synced now (after the seed's rows; a cursor in the future would
    be held back)."""
    synced = bigquery.ScalarQueryParameter("synced", "TIMESTAMP", dt.datetime.now(dt.UTC))
    env.bq.query(
        f"UPDATE `{env.gong('transcript')}` SET topic = 'Renewal', _fivetran_deleted = ({deleted}),"
        f" _fivetran_synced = @synced WHERE {where}",
        job_config=bigquery.QueryJobConfig(query_parameters=[synced]),
    ).result()


def _land_then_change(env, change: str) -> tuple[LandResult, LandResult, Catalog]:
    """Land the seeded transcripts and secure the raw table, then, as a later Fivetran sync,
    change the transcripts matching `change` and land again."""
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
            conn.execute(sql.SQL(_PROBE).format(table=catalog.raw_table(source.raw_table)))
        _change_transcripts(env, change)
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

    with env.connect() as conn:
        delete = _merge_delete(conn, source.raw_table)
        plan = "\n".join(row[0] for row in conn.execute("EXPLAIN " + delete).fetchall())
        rows = conn.execute(f'SELECT count(*) FROM gong_raw."{source.raw_table}"').fetchone()[0]
    assert rows == total
    assert f"{source.raw_table}_pkey on {source.raw_table} d" in plan, plan
    assert f"Seq Scan on {source.raw_table} d" not in plan, plan


def _materialize(selection: str) -> dict[str, str]:
    """Every asset of `selection`, in graph order, through the runtime's own materialization
    (land, secure, build), as a flow run does, without a Prefect server. Returns each status."""
    settings = load_settings()
    graph = default_graph()
    names = Selection.parse([selection]).resolve_ordered(graph)
    subgraph = graph.subgraph(names)
    run = RunInfo(run_id=str(uuid.uuid4()), selection=selection, assets=tuple(names))
    with open_session(settings, subgraph) as session:
        ctx = RunContext(settings=settings, url=session.url, clients=session.clients, pool=session.pool,
                         catalog=session.catalog, hooks=HookSet(), run=run, graph=subgraph,
                         guard=DeleteGuard.of(settings))
        return {name: materialize_asset(subgraph.spec(name), ctx).status for name in subgraph.names}


def _watermark_params(since: dict, spec: AssetSpec = TRANSCRIPTS) -> dict[str, object]:
    """The `{x_new}` parameters `build_asset` takes from the asset's watermark: the load order
    (a Postgres sequence) each raw table was built through, kept under "order"."""
    order = since.get("order")
    assert isinstance(order, dict), f"an incremental build's watermark holds the raw tables' load order: {since}"
    return {f"w_{s.slot_name}": int(order.get(s.raw_table, 0)) for s in spec.build.inputs}


def _incremental_build(conn: psycopg.Connection, catalog: Catalog, spec: AssetSpec) -> BuildSql:
    """What build_asset sets up for an incremental build of `spec`: its parameters and `{changed}`."""
    settings = load_settings()
    since = conn.execute(
        sql.SQL("SELECT loaded_through FROM {} WHERE asset = %s").format(catalog.watermarks), (spec.name,)
    ).fetchone()[0]
    params = _watermark_params(since, spec)
    params.update({f"s_{s}": list(v) if isinstance(v := getattr(settings, s), tuple) else v for s in spec.settings})
    params["full"] = False
    build = BuildSql(catalog, spec, params)
    _stage_changed(conn, spec, build)
    return build


def _plan(conn: psycopg.Connection, build: BuildSql, query: sql.Composable) -> str:
    return "\n".join(row[0] for row in build.run(conn, sql.SQL("EXPLAIN {}").format(query)).fetchall())


def _scans(plan: str, table: str) -> list[str]:
    """The plan's lines that read `table` (by any access method), without the cost figures."""
    return [line.split("  (")[0].strip().removeprefix("->").strip() for line in plan.splitlines()
            if re.search(rf"Scan.* on {re.escape(table)}\b", line)]


def _unkeyed(plan: str, table: str) -> list[str]:
    """The plan's reads of `table` that take no key: a Seq Scan, or an index scan with no Index
    Cond (a walk of the whole index in key order, which reads every row as surely)."""
    lines = plan.splitlines()
    found = []
    for i, line in enumerate(lines):
        if not re.search(rf"Scan.* on {re.escape(table)}\b", line):
            continue
        depth = len(line) - len(line.lstrip())
        details = []
        for below in lines[i + 1:]:
            if len(below) - len(below.lstrip()) <= depth or below.lstrip().startswith("->"):
                break
            details.append(below.strip())
        if not any(d.startswith(("Index Cond:", "Recheck Cond:")) for d in details):
            found.append(line.split("  (")[0].strip().removeprefix("->").strip())
    return found


def test_an_incremental_transcripts_build_fetches_changed_and_gone_rows_by_key(env) -> None:
    seed_workspace(env.bq, project=env.emulator.project, gong_dataset=env.gong_dataset, calls=CALLS,
                   tables=["gong.users", "gong.call", "gong.call_speaker", "gong.transcript"])
    statuses = _materialize("+transcripts")
    assert statuses == {"calls": "success", "users": "success", "speakers": "success", "transcripts": "success"}
    settings = load_settings()
    catalog = Catalog(settings)
    source = TRANSCRIPTS.sources[0]
    raw, app = source.raw_table, TRANSCRIPTS.table
    with env.connect() as conn:
        # As autovacuum does after a large first sync: the planner knows the tables' sizes.
        conn.execute("ANALYZE")
        total = conn.execute(sql.SQL("SELECT count(*) FROM {}").format(catalog.dest_table(app))).fetchone()[0]
    assert total > 45_000

    # 2% of the calls' transcripts change; a quarter of those are soft-deleted.
    _change_transcripts(env, "MOD(CAST(call_id AS INT64), 50) = 3",
                        deleted="MOD(CAST(call_id AS INT64), 200) = 3")
    clients = connect(settings)
    try:
        landed = land(TRANSCRIPTS, settings, clients, env.database_url)
    finally:
        clients.close()
    assert 0 < landed.rows_loaded[raw] < total / 20

    with env.connect() as conn, conn.transaction(force_rollback=True):
        # What build_asset does for an incremental build, up to the statements asked about.
        since = conn.execute(
            sql.SQL("SELECT loaded_through FROM {} WHERE asset = %s").format(catalog.watermarks), (TRANSCRIPTS.name,)
        ).fetchone()[0]
        params = _watermark_params(since)
        params.update({f"s_{s}": list(v) if isinstance(v := getattr(settings, s), tuple) else v
                       for s in TRANSCRIPTS.settings})
        params["full"] = False
        build = BuildSql(catalog, TRANSCRIPTS, params)
        _stage_changed(conn, TRANSCRIPTS, build)
        changed = conn.execute(sql.SQL("SELECT count(*) FROM {}").format(CHANGED)).fetchone()[0]
        assert changed == landed.rows_loaded[raw]

        # Building the changed rows: the rows SQL joined to the changed keys, as `_stage_rows`.
        keys = sql.SQL(", ").join(map(sql.Identifier, TRANSCRIPTS.source_key))
        rows = sql.SQL("SELECT r.* FROM ({}) r JOIN {} USING ({})").format(build(TRANSCRIPTS.build.rows), CHANGED, keys)
        built = _plan(conn, build, rows)
        build.run(conn, sql.SQL("CREATE TEMP TABLE {} ON COMMIT DROP AS {}").format(ROWS, rows))
        conn.execute(sql.SQL("ANALYZE {}").format(ROWS))
        # Finding the gone ones: changed keys that built no row (a set difference), then the app
        # rows they name, as `_gone_query` and the build's `gone` SQL.
        conn.execute(sql.SQL(
            "CREATE TEMP TABLE {} ON COMMIT DROP AS SELECT {k} FROM {} EXCEPT SELECT {k} FROM {}"
        ).format(GONE, CHANGED, ROWS, k=keys))
        conn.execute(sql.SQL("ANALYZE {}").format(GONE))
        gone_keys = conn.execute(sql.SQL("SELECT count(*) FROM {}").format(GONE)).fetchone()[0]
        gone = _plan(conn, build, build(TRANSCRIPTS.build.gone))
        # The check that the keys written identify one app row each (`_check_keys`).
        shared = _plan(conn, build, duplicate_keys_query(catalog, app, TRANSCRIPTS.natural_key, sql.SQL(
            "SELECT {} FROM {}").format(sql.SQL(", ").join(map(sql.Identifier, TRANSCRIPTS.natural_key)), ROWS)))
        rejects = [_plan(conn, build, build(t)) for t in (TRANSCRIPTS.build.rejects, TRANSCRIPTS.build.reject_scope)]
        found = build.run(conn, sql.SQL("SELECT count(*) FROM ({}) g").format(
            build(TRANSCRIPTS.build.gone))).fetchone()[0]
        # Soft-deleted monologues of live calls have an app row to delete; those of the seed's
        # soft-deleted calls (about one in 61) never had one.
        expected = conn.execute(sql.SQL(
            "SELECT count(*) FROM {g} g WHERE EXISTS (SELECT 1 FROM {c} c JOIN {t} a ON a.call_id = c.id"
            " WHERE c.gong_call_id = g.gong_call_id AND a.sequence_number = g.sequence_number)").format(
            g=GONE, c=catalog.dest_table("calls"), t=catalog.dest_table(app))).fetchone()[0]

    assert 0 < gone_keys < changed and 0 < found == expected <= gone_keys
    for what, plan in (("building the changed rows", built), ("finding the gone rows", gone)):
        for table in (raw, app):
            scans = _scans(plan, table)
            assert not any("Seq Scan" in s for s in scans), f"{what}: a scan of all of {table}\n{plan}"
        assert any("Index" in s for s in _scans(plan, app)), f"{what}: {app} is not read by index\n{plan}"
    assert any("Index" in s for s in _scans(built, raw)), f"building reads {raw} not by index\n{built}"
    assert _scans(shared, app) and not _unkeyed(shared, app), f"checking the written keys reads all of {app}\n{shared}"
    for plan in rejects:  # monologues whose index the app cannot hold: the newly landed rows only
        assert not _unkeyed(plan, raw), f"dead-letter rejects read all of {raw}\n{plan}"


def test_incremental_calls_and_speakers_builds_fetch_changed_rows_by_key(env) -> None:
    # After a large full sync, 0.5% of the calls and the speakers of another 0.5% change. Building
    # their app rows, and bringing the changed calls' prefect_reps up to date, must fetch them by
    # key: the calls' winner per Gong id was once picked over every raw call, and prefect_reps
    # recomputed from every app speaker, on each run.
    seed_workspace(env.bq, project=env.emulator.project, gong_dataset=env.gong_dataset, calls=CALLS,
                   tables=["gong.users", "gong.call", "gong.call_speaker"])
    assert _materialize("+speakers") == {"calls": "success", "users": "success", "speakers": "success"}
    settings = load_settings()
    catalog = Catalog(settings)
    with env.connect() as conn:
        conn.execute("ANALYZE")  # as autovacuum does after a large first sync
        speakers_total = conn.execute(sql.SQL("SELECT count(*) FROM {}").format(catalog.dest_table("speakers"))).fetchone()[0]
    assert speakers_total > 30_000

    synced = bigquery.ScalarQueryParameter("synced", "TIMESTAMP", dt.datetime.now(dt.UTC))
    for table, change in (("call", "title = 'Renamed' WHERE MOD(CAST(id AS INT64), 200) = 7"),
                          ("call_speaker", "talk_time = talk_time + 1 WHERE MOD(CAST(call_id AS INT64), 200) = 11")):
        env.bq.query(f"UPDATE `{env.gong(table)}` SET {change.replace(' WHERE', ', _fivetran_synced = @synced WHERE')}",
                     job_config=bigquery.QueryJobConfig(query_parameters=[synced])).result()
    clients = connect(settings)
    try:
        for spec in (CALLS_ASSET, SPEAKERS):
            landed = land(spec, settings, clients, env.database_url)
            assert 0 < sum(landed.rows_loaded.values()) < CALLS / 100 * 4
    finally:
        clients.close()

    large = {CALLS_ASSET.name: ["gong__call", "calls"], SPEAKERS.name: ["gong__call_speaker", "speakers", "calls"]}
    for spec in (CALLS_ASSET, SPEAKERS):
        with env.connect() as conn, conn.transaction(force_rollback=True):
            build = _incremental_build(conn, catalog, spec)
            changed = conn.execute(sql.SQL("SELECT count(*) FROM {}").format(CHANGED)).fetchone()[0]
            keys = sql.SQL(", ").join(map(sql.Identifier, spec.source_key))
            rows = sql.SQL("SELECT r.* FROM ({}) r JOIN {} USING ({})").format(build(spec.build.rows), CHANGED, keys)
            built = _plan(conn, build, rows)
            afters = [_plan(conn, build, build(statement)) for statement in spec.build.after]
            # Dead letters: the rows whose reject status may change, and the rejects among them.
            rejects = [_plan(conn, build, build(text)) for text in (spec.build.rejects, spec.build.reject_scope) if text]
            # The plans are for the rows these keys really build.
            assert 0 < build.run(conn, sql.SQL("SELECT count(*) FROM ({}) x").format(rows)).fetchone()[0] <= changed
        for table in large[spec.name]:
            assert not _unkeyed(built, table), f"{spec.name}: all of {table} read\n{built}"
        assert _scans(built, large[spec.name][0]), f"{spec.name}: the raw rows are not read\n{built}"
        for plan in afters:  # prefect_reps: the changed calls' speakers, by the calls' key
            assert not _unkeyed(plan, "speakers"), f"{spec.name}: after: all of speakers read\n{plan}"
        for plan in rejects:  # two workspaces' copies of a call id: the changed ids' only
            assert not _unkeyed(plan, large[spec.name][0]), f"{spec.name}: rejects read all raw rows\n{plan}"
    assert afters, "speakers keeps prefect_reps current after its build"
