"""The Postgres side the project itself talks to: connection checks, the pool, DDL, bookkeeping."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from dataclasses import dataclass
from urllib.parse import unquote, urlsplit

import psycopg
from psycopg import sql
from psycopg_pool import ConnectionPool

from assets.errors import CredentialError, TransientError
from assets.spec import AssetSpec, Column, SourceTable
from runtime.settings import Settings

log = logging.getLogger("gong_sync.postgres")


@dataclass(frozen=True)
class Endpoint:
    """Where a Postgres URL points, without its password: safe to print."""

    user: str
    host: str
    port: int
    database: str

    @classmethod
    def parse(cls, url: str) -> "Endpoint":
        parts = urlsplit(url)
        return cls(
            user=unquote(parts.username or "postgres"),
            host=parts.hostname or "localhost",
            port=parts.port or 5432,
            database=unquote(parts.path.lstrip("/")) or unquote(parts.username or "postgres"),
        )

    def __str__(self) -> str:
        return f"{self.host}:{self.port}/{self.database}"


def explain_connect_error(exc: psycopg.OperationalError, endpoint: Endpoint) -> Exception:
    """Turn a libpq connection failure into one sentence naming what is wrong (never the password)."""
    text = str(exc)
    where = f"{endpoint.host}:{endpoint.port}"
    if "password authentication failed" in text or "no password supplied" in text:
        return CredentialError(f"DATABASE_URL: password rejected for user {endpoint.user} at {where}")
    if "does not exist" in text and "database" in text:
        return CredentialError(f"DATABASE_URL: database {endpoint.database} does not exist at {where}")
    if "does not exist" in text and "role" in text:
        return CredentialError(f"DATABASE_URL: user {endpoint.user} does not exist at {where}")
    if "permission denied" in text or "not permitted" in text:
        return CredentialError(f"DATABASE_URL: user {endpoint.user} may not connect to {endpoint.database} at {where}")
    if "Connection refused" in text or "could not connect" in text or "timeout" in text.lower():
        return TransientError(f"DATABASE_URL: nothing accepts connections at {where} (is Postgres running?)")
    return TransientError(f"DATABASE_URL: cannot connect to {where}: {type(exc).__name__}")


def check_connection(url: str) -> Endpoint:
    """Connect once; raise a CredentialError or TransientError that names the problem."""
    endpoint = Endpoint.parse(url)
    try:
        with psycopg.connect(url, connect_timeout=10) as conn:
            conn.execute("SELECT 1")
    except psycopg.OperationalError as exc:
        raise explain_connect_error(exc, endpoint) from None
    return endpoint


def open_pool(url: str, settings: Settings) -> ConnectionPool:
    """One pool per run, shared by every asset for bookkeeping and derived builds."""
    pool = ConnectionPool(url, min_size=1, max_size=settings.max_parallel + 2, open=False, kwargs={"autocommit": True})
    pool.open(wait=True, timeout=30)
    return pool


class Catalog:
    """Names of the project's schemas and bookkeeping tables, quoted once."""

    def __init__(self, settings: Settings) -> None:
        self.raw = sql.Identifier(settings.raw_schema)
        self.dest = sql.Identifier(settings.destination_schema)
        self.raw_name = settings.raw_schema
        self.dest_name = settings.destination_schema

    def raw_table(self, name: str) -> sql.Composed:
        return sql.SQL("{}.{}").format(self.raw, sql.Identifier(name))

    def dest_table(self, name: str) -> sql.Composed:
        return sql.SQL("{}.{}").format(self.dest, sql.Identifier(name))

    @property
    def watermarks(self) -> sql.Composed:
        return self.raw_table("_asset_watermarks")

    @property
    def sync_status(self) -> sql.Composed:
        return self.dest_table("sync_status")

    @property
    def dead_letters(self) -> sql.Composed:
        return self.dest_table("dead_letters")

    @property
    def schema_changes(self) -> sql.Composed:
        return self.dest_table("schema_changes")


#: Lenient casts the build SQL uses: NULL instead of an error for a value that does not parse.
#: Text must match a strict pattern first: Postgres itself would accept 'yesterday' or 'NaN',
#: which are not dates or amounts anyone wants in the application.
#: function name → (result type, pattern the text must match, or None to try any text)
_TRY_CASTS: dict[str, tuple[str, str | None]] = {
    "gs_try_timestamptz": (
        "timestamptz",
        r"^\s*\d{4}-\d{2}-\d{2}([ T]\d{2}:\d{2}(:\d{2}(\.\d{1,6})?)?)?\s*(Z|UTC|[+-]\d{2}(:?\d{2})?)?\s*$",
    ),
    "gs_try_date": ("date", r"^\s*\d{4}-\d{2}-\d{2}\s*$"),
    "gs_try_numeric": ("numeric", r"^\s*[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?\s*$"),
    "gs_try_jsonb": ("jsonb", None),
}
_TRY_CAST = (
    "CREATE OR REPLACE FUNCTION {schema}.{name}(value text) RETURNS {type} LANGUAGE plpgsql STABLE AS $$"
    " BEGIN IF {pattern} IS NOT NULL AND value !~ {pattern} THEN RETURN NULL; END IF; RETURN value::{type};"
    " EXCEPTION WHEN others THEN RETURN NULL; END $$"
)


def create_try_casts(conn: psycopg.Connection, catalog: Catalog) -> None:
    for name, (result, pattern) in _TRY_CASTS.items():
        conn.execute(
            sql.SQL(_TRY_CAST).format(
                schema=catalog.raw, name=sql.Identifier(name), type=sql.SQL(result), pattern=sql.Literal(pattern)
            )
        )


def prepare_schemas(conn: psycopg.Connection, catalog: Catalog, specs: Iterable[AssetSpec]) -> None:
    """Create schemas, bookkeeping tables and the selected destination tables, before any run.

    Done once, serially: parallel dlt pipelines creating the same schema race on CREATE SCHEMA.
    """
    with conn.transaction():
        for schema in (catalog.raw, catalog.dest):
            conn.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(schema))
        conn.execute(
            sql.SQL(
                "CREATE TABLE IF NOT EXISTS {} (asset text PRIMARY KEY, loaded_through jsonb NOT NULL,"
                " built_at timestamptz NOT NULL DEFAULT now())"
            ).format(catalog.watermarks)
        )
        conn.execute(
            sql.SQL(
                "CREATE TABLE IF NOT EXISTS {} (entity_type text PRIMARY KEY, last_checkpoint jsonb,"
                " items_synced bigint NOT NULL DEFAULT 0, error_count integer NOT NULL DEFAULT 0,"
                " status text NOT NULL CHECK (status IN ('success', 'failed')), message text,"
                " finished_at timestamptz NOT NULL DEFAULT now())"
            ).format(catalog.sync_status)
        )
        conn.execute(
            sql.SQL(
                "CREATE TABLE IF NOT EXISTS {} (id bigserial PRIMARY KEY, asset text NOT NULL,"
                " source_table text NOT NULL, row_key text NOT NULL, primary_key jsonb, row jsonb NOT NULL,"
                " errors jsonb NOT NULL, run_id text, created_at timestamptz NOT NULL DEFAULT now(),"
                " UNIQUE (asset, source_table, row_key))"
            ).format(catalog.dead_letters)
        )
        conn.execute(
            sql.SQL(
                "CREATE TABLE IF NOT EXISTS {} (id bigserial PRIMARY KEY, asset text NOT NULL, table_name text NOT NULL,"
                " column_name text NOT NULL, change text NOT NULL, old_type text NOT NULL, new_type text NOT NULL,"
                " action text NOT NULL, at timestamptz NOT NULL DEFAULT now(),"
                " UNIQUE (asset, table_name, column_name, change, old_type, new_type))"
            ).format(catalog.schema_changes)
        )
        # Another session may be replacing the functions at this moment; one at a time.
        conn.execute("SELECT pg_advisory_xact_lock(hashtext('gong_sync.try_casts'))")
        create_try_casts(conn, catalog)
        for spec in specs:
            create_destination_table(conn, catalog, spec)


def create_stand_in(conn: psycopg.Connection, catalog: Catalog, table: str, cols: Iterable[Column]) -> None:
    """An empty raw table for a source whose dataset this warehouse does not have."""
    defs = [sql.SQL("{} {}").format(sql.Identifier(c.name), sql.SQL(c.pg_type)) for c in cols]
    defs.append(sql.SQL("_dlt_load_id text NOT NULL"))
    conn.execute(sql.SQL("CREATE TABLE IF NOT EXISTS {} ({})").format(catalog.raw_table(table), sql.SQL(", ").join(defs)))


def record_dead_letters(
    conn: psycopg.Connection, catalog: Catalog, asset: str, source_table: str, run_id: str,
    rejects: Iterable[tuple[str, dict | None, dict, list]],
) -> None:
    """Store rejected rows once each (keyed by primary key, or the whole row when it has none)."""
    conn.cursor().executemany(
        sql.SQL(
            "INSERT INTO {} (asset, source_table, row_key, primary_key, row, errors, run_id)"
            " VALUES (%s, %s, %s, %s, %s, %s, %s) ON CONFLICT (asset, source_table, row_key)"
            " DO UPDATE SET row = EXCLUDED.row, errors = EXCLUDED.errors, run_id = EXCLUDED.run_id, created_at = now()"
        ).format(catalog.dead_letters),
        [
            (asset, source_table, key, json.dumps(pk, default=str) if pk else None,
             json.dumps(row, default=str), json.dumps(errors, default=str), run_id)
            for key, pk, row, errors in rejects
        ],
    )


def create_destination_table(conn: psycopg.Connection, catalog: Catalog, spec: AssetSpec) -> None:
    """The destination table with its real primary key (dlt would create none) and indexes."""
    cols = [sql.SQL("{} {}").format(sql.Identifier(c.name), sql.SQL(c.pg_type)) for c in spec.columns]
    cols.append(sql.SQL("PRIMARY KEY ({})").format(sql.SQL(", ").join(map(sql.Identifier, spec.primary_key))))
    table = catalog.dest_table(spec.table)
    conn.execute(sql.SQL("CREATE TABLE IF NOT EXISTS {} ({})").format(table, sql.SQL(", ").join(cols)))
    for index in spec.indexes:
        conn.execute(
            sql.SQL("CREATE INDEX IF NOT EXISTS {} ON {} " + index.definition).format(sql.Identifier(index.name), table)
        )


def secure_raw_table(conn: psycopg.Connection, catalog: Catalog, source: SourceTable) -> None:
    """Give a landed raw table its primary key and the load-id index the builds scan by.

    dlt declares primary-key columns NOT NULL but creates no constraint; without one its
    delete-insert merge scans the whole table. A first load appends without dlt's dedup pass, so
    a key can be there twice (a source table holding it twice, or a load job repeated after a
    crash): the latest version by the cursor stays, and the count is logged.
    """
    ref = catalog.raw_table(source.raw_table)
    key = sql.SQL(", ").join(map(sql.Identifier, source.primary_key))
    with conn.transaction():
        if not has_primary_key(conn, catalog.raw_name, source.raw_table):
            duplicates = conn.execute(
                sql.SQL(
                    "DELETE FROM {ref} WHERE ctid IN (SELECT ctid FROM (SELECT ctid, row_number() OVER"
                    " (PARTITION BY {key} ORDER BY {cursor} DESC NULLS LAST, _dlt_load_id DESC, ctid DESC) AS n"
                    " FROM {ref} WHERE ({key}) IN (SELECT {key} FROM {ref} GROUP BY {key} HAVING count(*) > 1)) AS d"
                    " WHERE n > 1)"
                ).format(ref=ref, key=key, cursor=sql.Identifier(source.cursor))
            ).rowcount
            if duplicates:
                log.warning(
                    "%s.%s: %d older copies of rows with the same primary key (%s) removed; the latest by %s stays",
                    catalog.raw_name, source.raw_table, duplicates, ", ".join(source.primary_key), source.cursor,
                )
            # The key is built once over the whole first load: a sort budget above the server's
            # default (64MB) took it from 1.4 s to 0.7-1.0 s at a million transcript rows. LOCAL:
            # it ends with this transaction.
            conn.execute("SET LOCAL maintenance_work_mem = '256MB'")
            conn.execute(sql.SQL("ALTER TABLE {} ADD PRIMARY KEY ({})").format(ref, key))
        conn.execute(
            sql.SQL("CREATE INDEX IF NOT EXISTS {} ON {} ((_dlt_load_id::numeric))").format(
                sql.Identifier(f"{source.raw_table}__load_id"[:63]), ref
            )
        )


def table_exists(conn: psycopg.Connection, schema: str, table: str) -> bool:
    return conn.execute("SELECT to_regclass(%s) IS NOT NULL", (f'"{schema}"."{table}"',)).fetchone()[0]


def has_primary_key(conn: psycopg.Connection, schema: str, table: str) -> bool:
    return conn.execute(
        "SELECT EXISTS (SELECT 1 FROM pg_constraint WHERE conrelid = to_regclass(%s) AND contype = 'p')",
        (f'"{schema}"."{table}"',),
    ).fetchone()[0]


def record_sync_status(
    conn: psycopg.Connection,
    catalog: Catalog,
    asset: str,
    *,
    checkpoint: dict[str, str | None] | None,
    items: int,
    errors: int,
    status: str,
    message: str | None = None,
) -> None:
    """One row per asset for people and dashboards: last checkpoint, rows, errors, status."""
    conn.execute(
        sql.SQL(
            "INSERT INTO {} AS s (entity_type, last_checkpoint, items_synced, error_count, status, message, finished_at)"
            " VALUES (%s, %s, %s, %s, %s, %s, now())"
            " ON CONFLICT (entity_type) DO UPDATE SET"
            " last_checkpoint = coalesce(EXCLUDED.last_checkpoint, s.last_checkpoint),"
            " items_synced = EXCLUDED.items_synced, error_count = EXCLUDED.error_count,"
            " status = EXCLUDED.status, message = EXCLUDED.message, finished_at = EXCLUDED.finished_at"
        ).format(catalog.sync_status),
        (asset, json.dumps(checkpoint) if checkpoint else None, items, errors, status, message),
    )
