"""Derived builds: turn raw landed rows into a destination table, incrementally, in Postgres."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from decimal import Decimal

import psycopg
from psycopg import sql

from assets.errors import BuildError
from assets.spec import AssetSpec
from runtime.postgres import Catalog, table_exists
from runtime.settings import Settings


@dataclass
class BuildResult:
    """What one build changed in the destination table."""

    upserted: int = 0
    deleted: int = 0
    full: bool = False
    loaded_through: dict[str, str] = field(default_factory=dict)
    #: (level, message, number of rows, a few example keys) per check that found rows.
    checks: list[tuple[str, str, int, list[str]]] = field(default_factory=list)


#: Example keys a check logs; the count says how many there were in all.
CHECK_EXAMPLES = 5
log = logging.getLogger("gong_sync.build")


def _run_checks(conn: psycopg.Connection, spec: AssetSpec, fmt: dict, params: dict) -> list:
    found = []
    for check in spec.build.checks:
        rows = conn.execute(sql.SQL(check.sql).format(**fmt), params).fetchall()
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


def _keys(spec: AssetSpec) -> sql.Composable:
    return sql.SQL(", ").join(map(sql.Identifier, spec.primary_key))


def _key_match(spec: AssetSpec, left: str, right: str) -> sql.Composable:
    return sql.SQL(" AND ").join(
        sql.SQL("{}.{} = {}.{}").format(sql.Identifier(left), sql.Identifier(k), sql.Identifier(right), sql.Identifier(k))
        for k in spec.primary_key
    )


def build_asset(conn: psycopg.Connection, catalog: Catalog, spec: AssetSpec, settings: Settings, *, full: bool) -> BuildResult:
    """Bring the destination table up to date with the raw tables, in one transaction.

    Only rows whose inputs arrived since the last build are recomputed (`changed_keys`); the
    first build and a full refresh recompute all and drop destination rows with no live input.
    The per-input watermark moves in the same transaction, so a crash before commit leaves the
    next build to redo the work, and one after it leaves nothing undone.
    """
    missing = [t for t in spec.build.inputs if not table_exists(conn, catalog.raw_name, t)]
    if missing:
        raise BuildError(
            f"{spec.name}: raw table(s) {', '.join(f'{catalog.raw_name}.{t}' for t in missing)} not landed yet; "
            f"materialize its upstream first (--asset +{spec.name})"
        )
    dest = catalog.dest_table(spec.table)
    fmt = {"raw": catalog.raw, "dest": catalog.dest}
    rows_sql = sql.SQL(spec.build.rows).format(**fmt)
    result = BuildResult()
    # One snapshot for the whole build: the watermark read and the rows built agree.
    conn.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
    try:
        with conn.transaction():
            previous = conn.execute(
                sql.SQL("SELECT loaded_through FROM {} WHERE asset = %s FOR UPDATE").format(catalog.watermarks),
                (spec.name,),
            ).fetchone()
            result.full = full or previous is None
            current = {
                t: conn.execute(
                    sql.SQL("SELECT coalesce(max(_dlt_load_id::numeric), 0)::text FROM {}").format(catalog.raw_table(t))
                ).fetchone()[0]
                for t in spec.build.inputs
            }
            params: dict[str, object] = {s: list(v) if isinstance(v := getattr(settings, s), tuple) else v for s in spec.build_settings}
            conn.execute("DROP VIEW IF EXISTS _build_rows")
            conn.execute("DROP TABLE IF EXISTS _build_rows, _build_changed")
            empty = result.full and not conn.execute(sql.SQL("SELECT EXISTS (SELECT 1 FROM {})").format(dest)).fetchone()[0]
            if empty:
                # First build into an empty table: one INSERT … SELECT, no staging copy, nothing to
                # compare or delete. Checks read the freshly written rows through a view.
                result.upserted = _insert_all(conn, spec, dest, rows_sql, params)
                conn.execute(sql.SQL("CREATE TEMP VIEW _build_rows AS SELECT * FROM {}").format(dest))
            elif result.full:
                conn.execute(sql.SQL("CREATE TEMP TABLE _build_rows ON COMMIT DROP AS {}").format(rows_sql), params)
                conn.execute("ANALYZE _build_rows")
            else:
                params.update({t: Decimal(previous[0].get(t, "0")) for t in spec.build.inputs})
                stage_changed_rows(conn, spec, fmt, params)
            result.checks = _run_checks(conn, spec, fmt, params)
            if empty:
                conn.execute("DROP VIEW _build_rows")
            else:
                result.upserted = _upsert(conn, spec, dest)
                result.deleted = _delete_dropped(conn, spec, dest, full=result.full)
            conn.execute(
                sql.SQL(
                    "INSERT INTO {} (asset, loaded_through, built_at) VALUES (%s, %s, now())"
                    " ON CONFLICT (asset) DO UPDATE SET loaded_through = EXCLUDED.loaded_through, built_at = now()"
                ).format(catalog.watermarks),
                (spec.name, json.dumps(current)),
            )
            result.loaded_through = current
    except psycopg.errors.UndefinedColumn as exc:
        raise BuildError(f"{spec.name}: build SQL names a column the raw tables lack: {exc.diag.message_primary}") from None
    except (psycopg.errors.SyntaxError, psycopg.errors.UndefinedTable, psycopg.errors.DatatypeMismatch) as exc:
        raise BuildError(f"{spec.name}: build failed: {exc.diag.message_primary}") from None
    finally:
        conn.isolation_level = None
    return result


def stage_changed_rows(conn: psycopg.Connection, spec: AssetSpec, fmt: dict, params: dict) -> None:
    """Temp tables of the keys whose inputs changed since the watermarks (`_build_changed`) and of
    their rows as built now (`_build_rows`), analyzed: without statistics Postgres guesses their
    sizes from nothing, and the statements that read them (checks, upsert, delete) plan on a guess.
    """
    changed = sql.SQL(spec.build.changed_keys).format(**fmt)
    # Name the key columns as the destination does, whatever the declaration called them.
    conn.execute(
        sql.SQL("CREATE TEMP TABLE _build_changed ON COMMIT DROP AS SELECT DISTINCT * FROM ({}) k ({})").format(
            changed, _keys(spec)
        ),
        params,
    )
    # Before the rows are built: knowing the changed keys are few, Postgres fetches their rows by
    # primary key instead of hashing the whole raw table (11k of 857k speakers: 0.6 s -> 0.2 s).
    conn.execute("ANALYZE _build_changed")
    conn.execute(
        sql.SQL("CREATE TEMP TABLE _build_rows ON COMMIT DROP AS SELECT r.* FROM ({}) r JOIN _build_changed USING ({})").format(
            sql.SQL(spec.build.rows).format(**fmt), _keys(spec)
        ),
        params,
    )
    conn.execute("ANALYZE _build_rows")


def _insert_all(conn: psycopg.Connection, spec: AssetSpec, dest: sql.Composable, rows_sql: sql.Composable,
                params: dict) -> int:
    built = [sql.Identifier(c) for c in spec.built_columns]
    touched = [sql.Identifier(c.name) for c in spec.columns if c.touched]
    return conn.execute(
        sql.SQL("INSERT INTO {} ({}) SELECT {} FROM ({}) r").format(
            dest,
            sql.SQL(", ").join(built + touched),
            sql.SQL(", ").join([*(sql.SQL("r.{}").format(c) for c in built), *(sql.SQL("now()") for _ in touched)]),
            rows_sql,
        ),
        params,
    ).rowcount


def _upsert(conn: psycopg.Connection, spec: AssetSpec, dest: sql.Composable) -> int:
    """Insert new rows and update changed ones; an identical row is left alone (not rewritten).

    `touched` columns (updated_at) are stamped with now() and kept out of the comparison, so they
    move only when something else in the row does.
    """
    built = [sql.Identifier(c) for c in spec.built_columns]
    touched = [sql.Identifier(c.name) for c in spec.columns if c.touched]
    non_key = [sql.Identifier(c) for c in spec.built_columns if c not in spec.primary_key]
    if non_key:
        conflict = sql.SQL("DO UPDATE SET {} WHERE ({}) IS DISTINCT FROM ({})").format(
            sql.SQL(", ").join(
                [sql.SQL("{} = EXCLUDED.{}").format(c, c) for c in non_key]
                + [sql.SQL("{} = now()").format(c) for c in touched]
            ),
            sql.SQL(", ").join(sql.SQL("d.{}").format(c) for c in non_key),
            sql.SQL(", ").join(sql.SQL("EXCLUDED.{}").format(c) for c in non_key),
        )
    else:
        conflict = sql.SQL("DO NOTHING")
    cur = conn.execute(
        sql.SQL("INSERT INTO {} AS d ({}) SELECT {} FROM _build_rows ON CONFLICT ({}) {}").format(
            dest,
            sql.SQL(", ").join(built + touched),
            sql.SQL(", ").join([*built, *(sql.SQL("now()") for _ in touched)]),
            _keys(spec),
            conflict,
        )
    )
    return cur.rowcount


def _delete_dropped(conn: psycopg.Connection, spec: AssetSpec, dest: sql.Composable, *, full: bool) -> int:
    """Remove destination rows whose input is gone or soft-deleted."""
    return conn.execute(delete_dropped_query(spec, dest, full=full)).rowcount


def delete_dropped_query(spec: AssetSpec, dest: sql.Composable, *, full: bool) -> sql.Composed:
    """The DELETE of destination rows with no live row in `_build_rows` (among the changed keys
    unless `full`).

    Incremental: the keys that changed but built no row are a set difference, computed once
    (hashed or sorted) and then found in the destination by its primary key. A NOT EXISTS per
    changed destination row left the choice to the planner's estimate of a multi-column join,
    which it puts at one row: it then scanned `_build_rows` once per changed key (11k speakers:
    3.4 s, whatever the statistics).
    """
    if full:
        return sql.SQL("DELETE FROM {} d WHERE NOT EXISTS (SELECT 1 FROM _build_rows r WHERE {})").format(
            dest, _key_match(spec, "r", "d")
        )
    return sql.SQL(
        "DELETE FROM {} d USING (SELECT {keys} FROM _build_changed EXCEPT SELECT {keys} FROM _build_rows) g WHERE {}"
    ).format(dest, _key_match(spec, "g", "d"), keys=_keys(spec))
