"""Builds: derive an app table's rows from the raw tables, incrementally, in Postgres, in place.

App tables are upserted, never truncated or re-created: a row keeps its identity (uuid) for as
long as its source row lives, and the app's own tables hang off it with ON DELETE CASCADE.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field

import psycopg
from psycopg import sql

from assets import ALL_ASSETS
from assets.app_schema import TABLES
from assets.errors import BuildError
from assets.spec import FUNCTIONS, AssetSpec, slots_of
from runtime.contract import shared_keys
from runtime.deletes import DeleteGuard, delete_rows
from runtime.postgres import LOAD_ORDER, Catalog, table_exists
from runtime.settings import Settings

log = logging.getLogger("gong_sync.build")

#: Example keys a check logs; the count says how many there were in all.
CHECK_EXAMPLES = 5
#: The build's temp tables (dropped at commit), behind the `{rows}`, `{changed}`, `{gone}` slots.
ROWS, CHANGED, GONE = (sql.Identifier(n) for n in ("_gs_rows", "_gs_changed", "_gs_gone"))

_ID_MAPS = {spec.name for spec in ALL_ASSETS if spec.id_map}
# Every setting a build reads must exist: checked here, when the runtime first loads.
for _spec in ALL_ASSETS:
    _named = _spec.settings | {s.table_setting for s in _spec.sources if s.table_setting}
    for _name in _named - set(Settings.model_fields):
        raise RuntimeError(f"asset {_spec.name}: names unknown setting {_name!r}")
    for _text in _spec.build.texts:
        for _slot in (s for s in slots_of(_text) if s.startswith("ids_")):
            if _slot.removeprefix("ids_") not in _ID_MAPS:
                raise RuntimeError(f"asset {_spec.name}: {{{_slot}}} names an asset without an id map")


@dataclass
class BuildResult:
    """What one build changed in the app table."""

    upserted: int = 0
    deleted: int = 0
    full: bool = False
    #: Rows of other tables that went with the deletes: `schema.table` → rows.
    cascade: dict[str, int] = field(default_factory=dict)
    #: Source rows the build left out on purpose, now in dead letters.
    rejected: int = 0
    loaded_through: dict[str, int] = field(default_factory=dict)
    #: (level, message, number of rows, a few example keys) per check that found rows.
    checks: list[tuple[str, str, int, list[str]]] = field(default_factory=list)


@dataclass
class BuildSql:
    """An asset's build SQL with its slots filled, and the parameters its placeholders take."""

    catalog: Catalog
    spec: AssetSpec
    params: dict[str, object]

    def __call__(self, text: str) -> sql.Composed:
        # `full` is a literal, not a parameter: the planner folds `false OR key IN (…changed…)`
        # to the key lookup only when it sees the value (as a parameter it planned a scan).
        slots: dict[str, sql.Composable] = {"rows": ROWS, "changed": CHANGED, "gone": GONE,
                                            "full": sql.Literal(bool(self.params.get("full")))}
        for source in self.spec.build.inputs:
            raw = self.catalog.raw_table(source.raw_table)
            slots[source.slot_name] = raw
            slots[f"{source.slot_name}_new"] = sql.SQL("(SELECT * FROM {} WHERE {} > {})").format(
                raw, sql.Identifier(LOAD_ORDER), sql.Placeholder(f"w_{source.slot_name}")
            )
        slots.update({f"app_{t}": self.catalog.dest_table(t) for t in TABLES})
        slots.update({f"fn_{f}": self.catalog.function(f) for f in FUNCTIONS})
        slots.update({f"ids_{a}": self.catalog.id_map(a) for a in _ID_MAPS})
        slots.update({f"setting_{s}": sql.Placeholder(f"s_{s}") for s in self.spec.settings})
        return sql.SQL(text).format(**slots)

    def run(self, conn: psycopg.Connection, text: str | sql.Composable, **extra: object) -> psycopg.Cursor:
        """Execute build SQL (or a statement wrapping it); only the parameters it names are sent."""
        query = self(text) if isinstance(text, str) else text
        names = _placeholders(query)
        return conn.execute(query, {k: v for k, v in {**self.params, **extra}.items() if k in names})


def _placeholders(query: sql.Composable) -> set[str]:
    if isinstance(query, sql.Placeholder):
        return {query._obj}
    if isinstance(query, sql.Composed):
        return set().union(*(_placeholders(part) for part in query._obj))
    return set()


def _run_checks(conn: psycopg.Connection, spec: AssetSpec, build: BuildSql) -> list:
    found = []
    for check in spec.build.checks:
        rows = build.run(conn, check.sql).fetchall()
        if not rows:
            continue
        examples = [f"{key} ({detail})" if detail else str(key) for key, detail in rows[:CHECK_EXAMPLES]]
        found.append((check.level, check.message, len(rows), examples))
        log.log(
            logging.ERROR if check.level == "error" else logging.WARNING,
            "%s: %d row(s): %s: %s%s", spec.name, len(rows), check.message, ", ".join(examples),
            ", ..." if len(rows) > CHECK_EXAMPLES else "",
        )
    return found


def _names(columns) -> sql.Composable:  # noqa: ANN001
    return sql.SQL(", ").join(map(sql.Identifier, columns))


def match(columns, left: str, right: str) -> sql.Composable:  # noqa: ANN001
    """`left.c = right.c AND …` over `columns`."""
    return sql.SQL(" AND ").join(
        sql.SQL("{}.{} = {}.{}").format(sql.Identifier(left), sql.Identifier(c), sql.Identifier(right), sql.Identifier(c))
        for c in columns
    )


def build_asset(
    conn: psycopg.Connection, catalog: Catalog, spec: AssetSpec, settings: Settings, *, full: bool,
    guard: DeleteGuard, run_id: str | None = None,
) -> BuildResult:
    """Bring the app table up to date with the raw tables, in one transaction.

    Only rows whose inputs arrived since the last build are recomputed (`changed`); the first
    build and a full refresh recompute all and delete app rows with no live source row. The
    per-input watermark moves in the same transaction, so a crash before commit leaves the next
    build to redo the work, and one after it leaves nothing undone.
    """
    missing = [s.raw_table for s in spec.build.inputs if not table_exists(conn, catalog.raw_name, s.raw_table)]
    if missing:
        raise BuildError(
            f"{spec.name}: raw table(s) {', '.join(f'{catalog.raw_name}.{t}' for t in missing)} not landed yet; "
            f"materialize its upstream first (--asset +{spec.name})"
        )
    app = catalog.dest_table(spec.table)
    result = BuildResult()
    # One snapshot for the whole build: the watermark read and the rows built agree.
    conn.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
    try:
        with conn.transaction():
            previous = conn.execute(
                sql.SQL("SELECT loaded_through FROM {} WHERE asset = %s FOR UPDATE").format(catalog.watermarks),
                (spec.name,),
            ).fetchone()
            # Watermarks are the raw tables' load order (a Postgres sequence), kept under "order";
            # a watermark of another kind (dlt's load ids, before) means one full rebuild, in place.
            current = {
                s.raw_table: conn.execute(
                    sql.SQL("SELECT coalesce(max({}), 0) FROM {}").format(
                        sql.Identifier(LOAD_ORDER), catalog.raw_table(s.raw_table)
                    )
                ).fetchone()[0]
                for s in spec.build.inputs
            }
            seen = (previous[0] or {}).get("order") if previous else None
            result.full = full or seen is None
            seen = {} if result.full else seen
            params: dict[str, object] = {f"w_{s.slot_name}": int(seen.get(s.raw_table, 0)) for s in spec.build.inputs}
            params.update({f"s_{s}": list(v) if isinstance(v := getattr(settings, s), tuple) else v for s in spec.settings})
            params["full"] = result.full
            build = BuildSql(catalog, spec, params)
            conn.execute("DROP TABLE IF EXISTS _gs_rows, _gs_changed, _gs_gone")
            empty = result.full and not conn.execute(sql.SQL("SELECT EXISTS (SELECT 1 FROM {})").format(app)).fetchone()[0]
            if empty and not spec.id_map and not spec.build.checks:
                # First build into an empty table: one INSERT … SELECT, no staging copy, nothing to
                # compare or delete. `{changed}` exists (empty) for SQL that names it beside `{full}`.
                _stage_changed(conn, spec, build, none=True)
                result.upserted = _insert(conn, spec, app, build, build(spec.build.rows))
            else:
                _stage_rows(conn, spec, build, full=result.full)
                _check_keys(conn, catalog, spec, full=result.full)
                result.checks = _run_checks(conn, spec, build)
                result.upserted = _update(conn, spec, app) + _insert(
                    conn, spec, app, build, sql.SQL("SELECT * FROM {}").format(ROWS))
                if spec.id_map:
                    conn.execute(
                        sql.SQL("INSERT INTO {} ({keys}, id) SELECT {keys}, id FROM {} ON CONFLICT DO NOTHING").format(
                            catalog.id_map(spec.name), ROWS, keys=_names(spec.source_key)
                        )
                    )
                if spec.deletes and not empty:
                    deleted = delete_rows(conn, catalog, spec, _gone_query(conn, spec, app, build, full=result.full),
                                          build, guard)
                    result.deleted, result.cascade = deleted.rows, deleted.cascade
            if spec.build.rejects:
                result.rejected = _dead_letter_rejects(conn, catalog, spec, build, run_id)
            for statement in spec.build.after:
                build.run(conn, statement)
            conn.execute(
                sql.SQL(
                    "INSERT INTO {} (asset, loaded_through, built_at) VALUES (%s, %s, now())"
                    " ON CONFLICT (asset) DO UPDATE SET loaded_through = EXCLUDED.loaded_through, built_at = now()"
                ).format(catalog.watermarks),
                (spec.name, json.dumps({"order": current})),
            )
            result.loaded_through = current
    except psycopg.errors.LockNotAvailable:
        raise BuildError(f"{spec.name}: waited LOCK_TIMEOUT ({settings.lock_timeout:g} s) for a table lock and gave up;"
                         f" nothing was written. {lock_holders(conn, catalog)}") from None
    except psycopg.errors.UndefinedColumn as exc:
        raise BuildError(f"{spec.name}: build SQL names a column the raw tables lack: {exc.diag.message_primary}") from None
    except (psycopg.errors.SyntaxError, psycopg.errors.UndefinedTable, psycopg.errors.DatatypeMismatch,
            psycopg.errors.IntegrityError) as exc:
        raise BuildError(f"{spec.name}: build failed: {type(exc).__name__}: {exc.diag.message_primary}") from None
    finally:
        conn.isolation_level = None
    return result


def lock_holders(conn: psycopg.Connection, catalog: Catalog) -> str:
    """Who holds locks that block writes on the pipeline's and the app's tables, in one sentence."""
    rows = conn.execute(
        "SELECT l.relation::regclass::text, l.mode, a.pid, a.usename, a.application_name, a.state,"
        " date_trunc('second', now() - coalesce(a.xact_start, a.query_start))::text"
        " FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid JOIN pg_class c ON c.oid = l.relation"
        " JOIN pg_namespace n ON n.oid = c.relnamespace"
        " WHERE l.granted AND l.locktype = 'relation' AND l.pid <> pg_backend_pid()"
        " AND l.mode IN ('ShareLock', 'ShareRowExclusiveLock', 'ExclusiveLock', 'AccessExclusiveLock')"
        " AND n.nspname IN (%s, %s, %s) ORDER BY 1, 3",
        (catalog.dest_name, catalog.raw_name, catalog.sync_name),
    ).fetchall()
    if not rows:
        return "The lock was released before it could be named."
    return "Held by: " + "; ".join(
        f"{table} {mode} by pid {pid} (user {user}, application {app or '-'}, {state or '-'} for {age})"
        for table, mode, pid, user, app, state, age in rows
    )


def _stage_changed(conn: psycopg.Connection, spec: AssetSpec, build: BuildSql, *, none: bool = False) -> None:
    """`{changed}`: the source keys whose inputs landed since the last build (none: an empty one)."""
    build.run(conn, sql.SQL("CREATE TEMP TABLE {} ON COMMIT DROP AS SELECT DISTINCT * FROM ({}) k ({}) {}").format(
        CHANGED, build(spec.build.changed), _names(spec.source_key), sql.SQL("LIMIT 0" if none else "")
    ))
    # Before the rows are built: knowing the changed keys are few, Postgres fetches their rows by
    # key instead of hashing whole raw tables.
    conn.execute(sql.SQL("ANALYZE {}").format(CHANGED))


def _check_keys(conn: psycopg.Connection, catalog: Catalog, spec: AssetSpec, *, full: bool) -> None:
    """The keys the built rows are matched by (identity, natural key) identify one app row each:
    the app owns its tables and may have written a second row under a key. A full build looks at
    the whole table, an incremental one at the keys it writes. A duplicate stops the build before
    it writes anything, naming the rows."""
    written = None if full else (lambda key: sql.SQL("SELECT {} FROM {}").format(_names(key), ROWS))
    problems = shared_keys(conn, catalog, spec.table, spec.matched_keys, written)
    if problems:
        raise BuildError(f"{spec.name}: {problems[0]}; nothing of this build was written")


def _stage_rows(conn: psycopg.Connection, spec: AssetSpec, build: BuildSql, *, full: bool) -> None:
    """`{rows}` (the app rows as built now) and `{changed}`, analyzed: without statistics Postgres
    guesses their sizes from nothing, and the statements that read them plan on a guess."""
    rows = build(spec.build.rows)
    if full:
        # Every key is rebuilt; `{changed}` (every key built) is filled after the rows, and exists
        # before them for SQL that names it beside `{full}` (`{full} OR key IN {changed}`).
        _stage_changed(conn, spec, build, none=True)
        build.run(conn, sql.SQL("CREATE TEMP TABLE {} ON COMMIT DROP AS {}").format(ROWS, rows))
        conn.execute(sql.SQL("INSERT INTO {} SELECT DISTINCT {} FROM {}").format(CHANGED, _names(spec.source_key), ROWS))
        conn.execute(sql.SQL("ANALYZE {}").format(CHANGED))
    else:
        _stage_changed(conn, spec, build)
        build.run(conn, sql.SQL("CREATE TEMP TABLE {} ON COMMIT DROP AS SELECT r.* FROM ({}) r JOIN {} USING ({})").format(
            ROWS, rows, CHANGED, _names(spec.source_key)
        ))
    # One source row, one app row: should two claim one identity (two Gong speakers of a call
    # adopting the same earlier row), the first by source key keeps it and the other is logged.
    doubles = conn.execute(
        sql.SQL("DELETE FROM {r} a USING {r} b WHERE {m} AND ({ka}) > ({kb})").format(
            r=ROWS, m=match(spec.identity, "a", "b"),
            ka=sql.SQL(", ").join(sql.SQL("a.{}").format(sql.Identifier(k)) for k in spec.source_key),
            kb=sql.SQL(", ").join(sql.SQL("b.{}").format(sql.Identifier(k)) for k in spec.source_key),
        )
    ).rowcount
    if doubles:
        log.warning("%s: %d source row(s) map to an app row another source row already has; left out", spec.name, doubles)
    conn.execute(sql.SQL("ANALYZE {}").format(ROWS))


def _columns(spec: AssetSpec) -> tuple[list[str], list[str], list[str]]:
    """(always, first, touch) columns, identity left out."""
    of = lambda kind: [c.name for c in spec.columns if c.write == kind and c.name not in spec.identity]  # noqa: E731
    return of("always"), of("first"), of("touch")


def _insert(conn: psycopg.Connection, spec: AssetSpec, app: sql.Composable, build: BuildSql,
            rows: sql.Composable) -> int:
    """Insert the built rows the app table does not have yet."""
    always, first, touch = _columns(spec)
    built = [*spec.identity, *always, *first]
    query = sql.SQL("INSERT INTO {app} ({cols}) SELECT {vals} FROM ({rows}) r WHERE NOT EXISTS "
                    "(SELECT 1 FROM {app} t WHERE {m})").format(
        app=app, rows=rows, m=match(spec.identity, "t", "r"),
        cols=_names([*built, *touch]),
        vals=sql.SQL(", ").join([*(sql.SQL("r.{}").format(sql.Identifier(c)) for c in built),
                                 *(sql.SQL("now()") for _ in touch)]),
    )
    return build.run(conn, query).rowcount


def _update(conn: psycopg.Connection, spec: AssetSpec, app: sql.Composable) -> int:
    """Update app rows whose built values differ; an identical row is not rewritten.

    `first` columns are filled only while NULL (processed_at); `touch` columns are stamped with
    now() and kept out of the comparison, so they move only when something else does.
    """
    always, first, touch = _columns(spec)
    if not always and not first:
        return 0
    t = lambda c: sql.SQL("t.{}").format(sql.Identifier(c))  # noqa: E731
    r = lambda c: sql.SQL("r.{}").format(sql.Identifier(c))  # noqa: E731
    sets = [sql.SQL("{} = r.{}").format(sql.Identifier(c), sql.Identifier(c)) for c in always]
    sets += [sql.SQL("{} = coalesce(t.{}, r.{})").format(*(sql.Identifier(c),) * 3) for c in first]
    sets += [sql.SQL("{} = now()").format(sql.Identifier(c)) for c in touch]
    differs = [sql.SQL("({}) IS DISTINCT FROM ({})").format(sql.SQL(", ").join(map(t, always)),
                                                          sql.SQL(", ").join(map(r, always)))] if always else []
    differs += [sql.SQL("t.{} IS NULL").format(sql.Identifier(c)) for c in first]
    return conn.execute(
        sql.SQL("UPDATE {} t SET {} FROM {} r WHERE {} AND ({})").format(
            app, sql.SQL(", ").join(sets), ROWS, match(spec.identity, "t", "r"), sql.SQL(" OR ").join(differs)
        )
    ).rowcount


def _gone_query(conn: psycopg.Connection, spec: AssetSpec, app: sql.Composable, build: BuildSql, *,
                full: bool) -> sql.Composable:
    """The identities of app rows to delete: whose source rows are gone or soft-deleted."""
    if full:
        return sql.SQL("SELECT {} FROM {} t WHERE NOT EXISTS (SELECT 1 FROM {} r WHERE {})").format(
            sql.SQL(", ").join(sql.SQL("t.{}").format(sql.Identifier(k)) for k in spec.identity),
            app, ROWS, match(spec.identity, "r", "t"),
        )
    # `{gone}`: keys that changed but built no row. A set difference, computed once (a NOT EXISTS
    # per key was planned as a loop over the built rows per changed key).
    conn.execute(sql.SQL("CREATE TEMP TABLE {} ON COMMIT DROP AS SELECT {k} FROM {} EXCEPT SELECT {k} FROM {}").format(
        GONE, CHANGED, ROWS, k=_names(spec.source_key)
    ))
    conn.execute(sql.SQL("ANALYZE {}").format(GONE))
    return build(spec.build.gone)


def _dead_letter_rejects(conn: psycopg.Connection, catalog: Catalog, spec: AssetSpec, build: BuildSql,
                         run_id: str | None) -> int:
    """Source rows the build leaves out on purpose go to dead letters with their reason (new or
    changed ones counted); they leave once the build takes them again."""
    source = spec.build.inputs[0]
    # A row the build takes again (its copy became the newer one) leaves dead letters.
    # Only rows in scope can have changed their status: an incremental build looks at those alone.
    # A full build looks at every letter: one whose raw row is gone (a re-landed table) leaves too.
    scope = (sql.SQL(" AND d.row_key IN (SELECT k FROM ({}) s (k))").format(build(spec.build.reject_scope))
             if spec.build.reject_scope and not build.params.get("full") else sql.SQL(""))
    build.run(conn, sql.SQL(
        "DELETE FROM {dl} d WHERE d.asset = {asset} AND d.source_table = {table} AND d.errors -> 0 ->> 'kind' = 'build'"
        "{scope} AND d.row_key NOT IN (SELECT k FROM ({rejects}) x (k, pk, r, reason))"
    ).format(
        dl=catalog.dead_letters, asset=sql.Placeholder("dl_asset"), table=sql.Placeholder("dl_table"),
        rejects=build(spec.build.rejects), scope=scope,
    ), dl_asset=spec.name, dl_table=source.table)
    written = build.run(conn, sql.SQL(
        "INSERT INTO {dl} AS d (asset, source_table, row_key, primary_key, row, errors, run_id)"
        " SELECT {asset}, {table}, k, pk, r, jsonb_build_array(jsonb_build_object('error', reason, 'kind', 'build')),"
        " {run} FROM ({rejects}) x (k, pk, r, reason)"
        " ON CONFLICT (asset, source_table, row_key) DO UPDATE SET row = EXCLUDED.row, errors = EXCLUDED.errors,"
        " run_id = EXCLUDED.run_id, created_at = now() WHERE d.row IS DISTINCT FROM EXCLUDED.row"
    ).format(
        dl=catalog.dead_letters, asset=sql.Placeholder("dl_asset"), table=sql.Placeholder("dl_table"),
        run=sql.Placeholder("dl_run"), rejects=build(spec.build.rejects),
    ), dl_asset=spec.name, dl_table=source.table, dl_run=run_id).rowcount
    if written:
        log.warning("%s: %d source row(s) left out by the build are in dead_letters with their reason", spec.name, written)
    return written
