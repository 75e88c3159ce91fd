"""The application's tables, before any work: created in an empty database, checked in any other.

Against a database where the app's migrations ran, every column the selected assets write must
exist with a compatible type and no column they leave alone may be NOT NULL without a default.
Every problem is reported at once, naming table, column, expected and found; the run stops with
exit 2 before anything is written. The keys they upsert and adopt on must identify one row: a
table the pipeline has never built (an earlier importer's rows) is checked whole here; once built,
each build checks the keys it writes (`shared_keys`), through the key's index.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import psycopg
from psycopg import sql

from assets import app_schema
from assets.errors import ConfigError
from assets.spec import INTEGER, JSONB, TEXT, TIMESTAMPTZ, AssetSpec, Column, col
from runtime.postgres import Catalog

log = logging.getLogger("gong_sync.contract")

#: The app's `sync_status`, as the pipeline writes it (one row per asset, keyed by entity_type).
SYNC_STATUS: tuple[Column, ...] = (
    col("entity_type", TEXT),
    col("last_sync_timestamp", TIMESTAMPTZ),
    col("last_sync_status", TEXT),
    col("items_synced", INTEGER),
    col("errors_count", INTEGER),
    col("error_details", JSONB),
    col("updated_at", TIMESTAMPTZ),
)


class ContractError(ConfigError):
    """The application's tables do not have the shape the pipeline writes; nothing was done."""


@dataclass(frozen=True)
class Expected:
    """What the pipeline needs of one app table."""

    table: str
    columns: tuple[Column, ...]
    #: Column sets that must identify one row (the identity it upserts on, the key it adopts by).
    unique: tuple[tuple[str, ...], ...]
    #: The asset that builds it (None: sync_status, which every asset writes).
    asset: str | None = None


def expectations(specs: Iterable[AssetSpec]) -> list[Expected]:
    """The contract tables a selection writes, and sync_status, which every asset writes."""
    out = []
    for spec in specs:
        written = {c.name: c for c in spec.columns}
        identity = tuple(written.get(k) or col(k, ("uuid",)) for k in spec.identity if k not in written)
        out.append(Expected(spec.table, identity + spec.columns, spec.matched_keys, spec.name))
    out.append(Expected("sync_status", SYNC_STATUS, (("entity_type",),)))
    return out


def ensure_contract(conn: psycopg.Connection, catalog: Catalog, specs: Iterable[AssetSpec]) -> None:
    """Create the whole app schema in a database that has none of it; then check what is there."""
    expected = expectations(specs)
    with conn.transaction():
        # Two runs starting on an empty database must not both create it.
        conn.execute("SELECT pg_advisory_xact_lock(hashtext('gong_sync.contract'))")
        present = existing_tables(conn, catalog.dest_name)
        if not present:
            create_app_schema(conn, catalog)
            return
    problems: list[str] = []
    built = built_assets(conn, catalog)
    for exp in expected:
        if exp.table not in present:
            problems.append(f"{catalog.dest_name}.{exp.table}: table missing (the application's migrations create it)")
            continue
        problems += check_table(conn, catalog, exp, built)
    if problems:
        raise ContractError(
            f"the application's tables in schema {catalog.dest_name} do not match what the pipeline writes"
            f" ({len(problems)} problem(s)); nothing was done:\n  " + "\n  ".join(problems)
        )


def existing_tables(conn: psycopg.Connection, schema: str) -> set[str]:
    rows = conn.execute(
        "SELECT c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace"
        " WHERE n.nspname = %s AND c.relname = ANY(%s) AND c.relkind IN ('r', 'p')",
        (schema, list(app_schema.TABLES)),
    ).fetchall()
    return {r[0] for r in rows}


def create_app_schema(conn: psycopg.Connection, catalog: Catalog) -> None:
    """The contract, exactly as APP_SCHEMA.md: enums, tables, keys, FKs, defaults, indexes, triggers."""
    app = catalog.dest
    conn.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(app))
    for extension in app_schema.EXTENSIONS:
        try:
            with conn.transaction():
                conn.execute(sql.SQL("CREATE EXTENSION IF NOT EXISTS {}").format(sql.Identifier(extension)))
        except psycopg.Error as exc:
            log.warning("extension %s not created (%s); the pipeline does not need it", extension,
                        exc.diag.message_primary)
    for name, labels in app_schema.ENUMS.items():
        exists = conn.execute(
            "SELECT 1 FROM pg_type t JOIN pg_namespace n ON n.oid = t.typnamespace WHERE n.nspname = %s AND t.typname = %s",
            (catalog.dest_name, name),
        ).fetchone()
        if not exists:
            conn.execute(
                sql.SQL("CREATE TYPE {}.{} AS ENUM ({})").format(
                    app, sql.Identifier(name), sql.SQL(", ").join(map(sql.Literal, labels))
                )
            )
    for name, body in app_schema.TABLES.items():
        conn.execute(sql.SQL("CREATE TABLE {} (" + body + ")").format(catalog.dest_table(name), app=app))
    for name, (table, definition) in app_schema.INDEXES.items():
        conn.execute(
            sql.SQL("CREATE INDEX {} ON {} " + definition).format(sql.Identifier(name), catalog.dest_table(table))
        )
    for statement in app_schema.TRIGGERS:
        conn.execute(sql.SQL(statement).format(app=app))
    log.info("%s had none of the application's tables: created them (%d tables)", catalog.dest_name,
             len(app_schema.TABLES))


#: `character varying(255)` → `character varying`, `numeric(15,2)[]` → `numeric[]`.
_TYPMOD = re.compile(r"\([^)]*\)")


def built_assets(conn: psycopg.Connection, catalog: Catalog) -> set[str]:
    """The assets whose build has committed in this database (the pipeline's watermarks)."""
    if conn.execute("SELECT to_regclass(%s) IS NULL", (f'"{catalog.sync_name}"."asset_watermarks"',)).fetchone()[0]:
        return set()
    return {name for (name,) in conn.execute(sql.SQL("SELECT asset FROM {}").format(catalog.watermarks))}


def check_table(conn: psycopg.Connection, catalog: Catalog, exp: Expected, built: set[str]) -> list[str]:
    where = f"{catalog.dest_name}.{exp.table}"
    rows = conn.execute(
        "SELECT a.attname, format_type(a.atttypid, a.atttypmod), a.attnotnull, a.atthasdef OR a.attidentity <> ''"
        " OR a.attgenerated <> '' FROM pg_attribute a WHERE a.attrelid = %s::regclass AND a.attnum > 0"
        " AND NOT a.attisdropped",
        (f'"{catalog.dest_name}"."{exp.table}"',),
    ).fetchall()
    found = {name: _TYPMOD.sub("", kind) for name, kind, _, _ in rows}
    problems = []
    for c in exp.columns:
        if c.name not in found:
            problems.append(f"{where}.{c.name}: column missing (expected {c.types[0]})")
        elif found[c.name] not in c.types:
            problems.append(f"{where}.{c.name}: expected {' or '.join(c.types)}, found {found[c.name]}")
    written = {c.name for c in exp.columns}
    for name, _, not_null, has_default in rows:
        if not_null and not has_default and name not in written:
            problems.append(
                f"{where}.{name}: NOT NULL without a default, and the pipeline does not write it (inserts would fail)"
            )
    # The keys a table is matched by must identify one row. Before its first build, the rows are
    # someone else's (an earlier importer's) and the whole table is checked here. After it, each
    # build checks the keys it writes (runtime/build.py): checking the whole table at every run
    # grew with it, 33 s for a million transcripts (no unique index on their key), twice a run.
    if exp.asset not in built:
        problems += shared_keys(conn, catalog, exp.table, [k for k in exp.unique if all(c in found for c in k)])
    return problems


def shared_keys(conn: psycopg.Connection, catalog: Catalog, table: str, keys: Iterable[tuple[str, ...]],
                among: Callable[[tuple[str, ...]], sql.Composable] | None = None) -> list[str]:
    """What is wrong for each of `keys` that rows of the app's `table` share: keys without a
    valid unique index are counted over the whole table, or only those `among(key)` selects."""
    problems = []
    for key in keys:
        if not unique_index(conn, catalog, table, key):
            problem = duplicate_keys(conn, catalog, table, key, among(key) if among else None)
            if problem:
                problems.append(problem)
    return problems


def unique_index(conn: psycopg.Connection, catalog: Catalog, table: str, key: tuple[str, ...]) -> bool:
    """Whether the app's `table` has a valid unique index on exactly `key` (no duplicates possible;
    a failed CREATE UNIQUE INDEX CONCURRENTLY leaves an invalid one over duplicates)."""
    return conn.execute(
        "SELECT EXISTS (SELECT 1 FROM pg_index i WHERE i.indrelid = %s::regclass AND i.indisunique AND i.indisvalid"
        " AND i.indpred IS NULL AND (SELECT array_agg(a.attname::text ORDER BY a.attname) FROM pg_attribute a"
        " WHERE a.attrelid = i.indrelid AND a.attnum = ANY(i.indkey)) = %s)",
        (f'"{catalog.dest_name}"."{table}"', sorted(key)),
    ).fetchone()[0]


def duplicate_keys(conn: psycopg.Connection, catalog: Catalog, table: str, key: tuple[str, ...],
                   among: sql.Composable | None = None) -> str | None:
    """What is wrong when rows of the app's `table` share `key`, or None: the whole table, or
    only keys `among` (a query of key tuples)."""
    dupes = conn.execute(duplicate_keys_query(catalog, table, key, among)).fetchall()
    if not dupes:
        return None
    examples = "; ".join("(" + ", ".join(map(str, d[:-1])) + f") × {d[-1]}" for d in dupes)
    return f"{catalog.dest_name}.{table}: ({', '.join(key)}) must identify one row, but rows share it, e.g. {examples}"


def duplicate_keys_query(catalog: Catalog, table: str, key: tuple[str, ...],
                         among: sql.Composable | None = None) -> sql.Composable:
    """Up to 3 keys rows share, with their count. Keys `among` are each counted through the key's
    index: as a join, the planner walked the whole index to merge 20k changed keys with a
    million rows (2.3 s against 0.15 s)."""
    cols = sql.SQL(", ").join(map(sql.Identifier, key))
    t = catalog.dest_table(table)
    if among is None:
        # NULL keys never match (as under a unique index): only set keys can be shared.
        query = sql.SQL("SELECT {cols}, count(*) FROM {t} WHERE {set} GROUP BY {cols} HAVING count(*) > 1"
                        " LIMIT 3").format(cols=cols, t=t, set=sql.SQL(" AND ").join(
                            sql.SQL("{} IS NOT NULL").format(sql.Identifier(c)) for c in key))
    else:
        match = sql.SQL(" AND ").join(sql.SQL("a.{c} = k.{c}").format(c=sql.Identifier(c)) for c in key)
        query = sql.SQL(
            "SELECT k.*, n.count FROM (SELECT DISTINCT * FROM ({among}) k) k"
            " CROSS JOIN LATERAL (SELECT count(*) FROM {t} a WHERE {match}) n WHERE n.count > 1 LIMIT 3"
        ).format(among=among, t=t, match=match)
    return query
