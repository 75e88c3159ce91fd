"""The Postgres side the project itself talks to: connection checks, the pool, DDL, bookkeeping."""

from __future__ import annotations

import contextlib
import json
import logging
import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import psycopg
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict
from psycopg_pool import ConnectionPool

from assets.errors import CredentialError, TransientError
from assets.spec import AssetSpec, SourceTable
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
        """By libpq's own parser (a `#` or `?` in a password means what libpq says it means);
        the URL was checked by `Settings.postgres_url`."""
        params = conninfo_to_dict(url)
        user = params.get("user") or "postgres"
        port = str(params.get("port") or "5432")
        return cls(
            user=user,
            host=str(params.get("host") or "localhost"),
            port=int(port) if port.isdigit() else 5432,
            database=params.get("dbname") or user,
        )

    def __str__(self) -> str:
        return f"{self.host}:{self.port}/{self.database}"


def explain_connect_error(exc: psycopg.OperationalError, endpoint: Endpoint) -> Exception:
    """Turn a libpq connection failure into one sentence naming what is wrong (never the password)."""
    text = str(exc)
    where = f"{endpoint.host}:{endpoint.port}"
    if isinstance(exc, (psycopg.errors.LockNotAvailable, psycopg.errors.QueryCanceled)):
        # Connected, then a statement gave up waiting: not an unreachable server.
        return TransientError(f"a statement at {where} gave up: {exc.diag.message_primary} (LOCK_TIMEOUT, STATEMENT_TIMEOUT)")
    if "password authentication failed" in text or "no password supplied" in text:
        return CredentialError(f"DATABASE_URL: password rejected for user {endpoint.user} at {where}")
    if "does not exist" in text and "database" in text:
        return CredentialError(f"DATABASE_URL: database {endpoint.database} does not exist at {where}")
    if "does not exist" in text and "role" in text:
        return CredentialError(f"DATABASE_URL: user {endpoint.user} does not exist at {where}")
    if "permission denied" in text or "not permitted" in text:
        return CredentialError(f"DATABASE_URL: user {endpoint.user} may not connect to {endpoint.database} at {where}")
    if "could not translate host name" in text or "Name or service not known" in text:
        return CredentialError(f"DATABASE_URL: unknown host {endpoint.host} (no such name)")
    if "Connection refused" in text or "could not connect" in text or "timeout" in text.lower():
        return TransientError(f"DATABASE_URL: nothing accepts connections at {where} (is Postgres running?)")
    return TransientError(f"DATABASE_URL: cannot connect to {where}: {type(exc).__name__}")


def connect_kwargs(settings: Settings | None = None) -> dict[str, object]:
    """What every connection the pipeline opens itself carries: TCP keepalives (a dead peer is
    noticed in about a minute, not hours) and, with settings, statement and lock timeouts."""
    kwargs: dict[str, object] = {"connect_timeout": 10, "keepalives": 1, "keepalives_idle": 30,
                                 "keepalives_interval": 10, "keepalives_count": 3}
    if settings is not None:
        kwargs["options"] = (f"-c statement_timeout={int(settings.statement_timeout * 1000)}"
                             f" -c lock_timeout={int(settings.lock_timeout * 1000)}")
    return kwargs


def connect(settings: Settings) -> psycopg.Connection:
    """An autocommit connection of the pipeline's own (keepalives, timeouts); a failure to connect
    becomes the error that names what is wrong, never the password."""
    url = settings.postgres_url()
    try:
        return psycopg.connect(url, autocommit=True, **connect_kwargs(settings))
    except psycopg.OperationalError as exc:
        raise explain_connect_error(exc, Endpoint.parse(url)) from None


@contextlib.contextmanager
def connected(settings: Settings) -> Iterator[psycopg.Connection]:
    """`connect`, closed after the block; a connection lost inside the block is explained too."""
    url = settings.postgres_url()
    try:
        with connect(settings) as conn:
            yield conn
    except psycopg.OperationalError as exc:
        raise explain_connect_error(exc, Endpoint.parse(url)) from None


def check_connection(url: str) -> Endpoint:
    """Connect once; raise a CredentialError or TransientError that names the problem."""
    endpoint = Endpoint.parse(url)
    try:
        with psycopg.connect(url, **connect_kwargs()) as conn:
            conn.execute("SELECT 1")
    except psycopg.OperationalError as exc:
        raise explain_connect_error(exc, endpoint) from None
    return endpoint


def open_pool(url: str, settings: Settings) -> ConnectionPool:
    """One pool per run, shared by every asset for bookkeeping and derived builds."""
    pool = ConnectionPool(url, min_size=1, max_size=settings.max_parallel + 2, open=False,
                          kwargs={"autocommit": True, **connect_kwargs(settings)})
    pool.open(wait=True, timeout=30)
    return pool


class Catalog:
    """Names of the project's schemas and tables, quoted once.

    `dest` is the application's schema (the contract tables), `raw` the Gong-shaped replicas,
    `sync` the pipeline's own bookkeeping: nothing of the pipeline's lives in the app's schema
    but the contract tables.
    """

    def __init__(self, settings: Settings) -> None:
        self.raw = sql.Identifier(settings.raw_schema)
        self.dest = sql.Identifier(settings.destination_schema)
        self.sync = sql.Identifier(settings.sync_schema)
        self.raw_name = settings.raw_schema
        self.dest_name = settings.destination_schema
        self.sync_name = settings.sync_schema

    def raw_table(self, name: str) -> sql.Composed:
        return sql.SQL("{}.{}").format(self.raw, sql.Identifier(name))

    def dest_table(self, name: str) -> sql.Composed:
        return sql.SQL("{}.{}").format(self.dest, sql.Identifier(name))

    def sync_table(self, name: str) -> sql.Composed:
        return sql.SQL("{}.{}").format(self.sync, sql.Identifier(name))

    def function(self, name: str) -> sql.Composed:
        """One of the pipeline's SQL functions (`assets.spec.FUNCTIONS`)."""
        return sql.SQL("{}.{}").format(self.sync, sql.Identifier(f"gs_{name}"))

    def id_map(self, asset: str) -> sql.Composed:
        return self.sync_table(f"{asset}_ids")

    @property
    def load_order_name(self) -> str:
        """The sequence numbering raw rows, as text for nextval() (quoted, so any schema name works)."""
        return f'"{self.sync_name}"."load_order"'

    @property
    def watermarks(self) -> sql.Composed:
        return self.sync_table("asset_watermarks")

    @property
    def sync_status(self) -> sql.Composed:
        """The app's own table: one row per asset."""
        return self.dest_table("sync_status")

    @property
    def dead_letters(self) -> sql.Composed:
        return self.sync_table("dead_letters")

    @property
    def schema_changes(self) -> sql.Composed:
        return self.sync_table("schema_changes")


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
}
#: Casts a pattern alone makes safe: a plain SQL function, inlined by the planner on every
#: version. The exponent is bounded so that no matching text overflows numeric.
_PATTERN_CASTS: dict[str, tuple[str, str]] = {
    "gs_try_numeric": ("numeric", r"^\s*[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d{1,4})?\s*$"),
}
#: JSON text jsonb can hold: valid JSON (`IS JSON`, Postgres 16 and later) without the escape of
#: NUL, which jsonb refuses. Before 16, an exception block decides.
_TRY_JSONB_16 = (
    "CREATE OR REPLACE FUNCTION {schema}.gs_try_jsonb(value text) RETURNS jsonb LANGUAGE sql IMMUTABLE AS $$"
    " SELECT CASE WHEN value IS JSON AND strpos(value, '\\u0000') = 0 THEN value::jsonb END $$"
)
_TRY_JSONB = (
    "CREATE OR REPLACE FUNCTION {schema}.gs_try_jsonb(value text) RETURNS jsonb LANGUAGE plpgsql IMMUTABLE AS $$"
    " BEGIN RETURN value::jsonb; EXCEPTION WHEN others THEN RETURN NULL; END $$"
)
_PATTERN_CAST = (
    "CREATE OR REPLACE FUNCTION {schema}.{name}(value text) RETURNS {type} LANGUAGE sql IMMUTABLE AS $$"
    " SELECT CASE WHEN value ~ {pattern} THEN value::{type} END $$"
)
# Postgres 16 and later tell whether a text parses without raising (`pg_input_is_valid`): a plain
# SQL function, which the planner inlines. Before 16 an exception block does it, at the price of
# a subtransaction per call.
_TRY_CAST_16 = (
    "CREATE OR REPLACE FUNCTION {schema}.{name}(value text) RETURNS {type} LANGUAGE sql STABLE AS $$"
    " SELECT CASE WHEN value IS NULL OR NOT coalesce(value ~ {pattern}, true) THEN NULL"
    " WHEN NOT pg_input_is_valid(value, {type_name}) THEN NULL ELSE value::{type} END $$"
)
_TRY_CAST = (
    "CREATE OR REPLACE FUNCTION {schema}.{name}(value text) RETURNS {type} LANGUAGE plpgsql STABLE AS $$"
    " BEGIN IF {pattern} IS NOT NULL AND value !~ {pattern} THEN RETURN NULL; END IF; RETURN value::{type};"
    " EXCEPTION WHEN others THEN RETURN NULL; END $$"
)
#: The other functions build SQL calls (`{fn_uuid}`, …): plain SQL, inlined by the planner.
_FUNCTIONS = (
    # A uuid derived from the natural key: a rebuild gives the same id.
    "CREATE OR REPLACE FUNCTION {schema}.gs_uuid(namespace text, key text) RETURNS uuid LANGUAGE sql IMMUTABLE"
    " AS $$ SELECT md5(namespace || ':' || key)::uuid $$",
    # george.coyne@example.com -> George Coyne; NULL unless there is a local part.
    "CREATE OR REPLACE FUNCTION {schema}.gs_name_from_email(email text) RETURNS text LANGUAGE sql IMMUTABLE"
    " AS $$ SELECT CASE WHEN position('@' in email) > 1 THEN nullif(initcap(btrim(regexp_replace("
    " split_part(email, '@', 1), '[._+-]+', ' ', 'g'))), '') END $$",
    # Whole numbers that fit an integer column; others are NULL.
    "CREATE OR REPLACE FUNCTION {schema}.gs_try_integer(value text) RETURNS integer LANGUAGE sql STABLE"
    " AS $$ SELECT CASE WHEN abs({schema}.gs_try_numeric(value)) < 2147483647.5"
    " THEN round({schema}.gs_try_numeric(value))::integer END $$",
)


def create_functions(conn: psycopg.Connection, catalog: Catalog) -> None:
    modern = conn.info.server_version >= 160000
    for name, (result, pattern) in _PATTERN_CASTS.items():
        conn.execute(sql.SQL(_PATTERN_CAST).format(
            schema=catalog.sync, name=sql.Identifier(name), type=sql.SQL(result), pattern=sql.Literal(pattern)))
    conn.execute(sql.SQL(_TRY_JSONB_16 if modern else _TRY_JSONB).format(schema=catalog.sync))
    for name, (result, pattern) in _TRY_CASTS.items():
        conn.execute(
            sql.SQL(_TRY_CAST_16 if modern else _TRY_CAST).format(
                schema=catalog.sync, name=sql.Identifier(name), type=sql.SQL(result),
                pattern=sql.Literal(pattern), type_name=sql.Literal(result),
            )
        )
    for text in _FUNCTIONS:
        conn.execute(sql.SQL(text).format(schema=catalog.sync))


def prepare_schemas(conn: psycopg.Connection, catalog: Catalog, id_maps: Iterable[AssetSpec]) -> None:
    """Create the raw and bookkeeping schemas, their tables and functions, before any run.

    Done once, serially: parallel dlt pipelines creating the same schema race on CREATE SCHEMA.
    The application's tables are the contract's business (`runtime/contract.py`).
    """
    with conn.transaction():
        # Another session may be doing the same at this moment; one at a time.
        conn.execute("SELECT pg_advisory_xact_lock(hashtext('gong_sync.prepare'))")
        for schema in (catalog.raw, catalog.sync):
            conn.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(schema))
        conn.execute(sql.SQL("CREATE SEQUENCE IF NOT EXISTS {}").format(catalog.sync_table("load_order")))
        conn.execute(
            sql.SQL(
                "CREATE TABLE IF NOT EXISTS {} (asset text PRIMARY KEY, loaded_through jsonb NOT NULL,"
                " built_at timestamptz NOT NULL DEFAULT now())"
            ).format(catalog.watermarks)
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
        for spec in id_maps:
            keys = [sql.SQL("{} text NOT NULL").format(sql.Identifier(k)) for k in spec.source_key]
            conn.execute(
                sql.SQL("CREATE TABLE IF NOT EXISTS {} ({}, id uuid NOT NULL UNIQUE, PRIMARY KEY ({}))").format(
                    catalog.id_map(spec.name), sql.SQL(", ").join(keys),
                    sql.SQL(", ").join(map(sql.Identifier, spec.source_key)),
                )
            )
        create_functions(conn, catalog)


def create_stand_in(conn: psycopg.Connection, catalog: Catalog, table: str, cols: Iterable[tuple[str, str]]) -> None:
    """An empty raw table for a source whose dataset this warehouse does not have."""
    defs = [sql.SQL("{} {}").format(sql.Identifier(name), sql.SQL(pg_type)) for name, pg_type in cols]
    defs.append(sql.SQL("_dlt_load_id text NOT NULL"))
    defs.append(sql.SQL("_gs_seq bigint NOT NULL DEFAULT nextval({})").format(sql.Literal(catalog.load_order_name)))
    conn.execute(sql.SQL("CREATE TABLE IF NOT EXISTS {} ({})").format(catalog.raw_table(table), sql.SQL(", ").join(defs)))


def storable(value: object) -> object:
    """A value as jsonb can store it: NUL characters (which jsonb rejects) written as the text
    `\\u0000`, in keys and strings at any depth; anything else JSON cannot say, as text."""
    if isinstance(value, str):
        return value.replace("\x00", "\\u0000")
    if isinstance(value, dict):
        return {storable(str(k)): storable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [storable(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # NaN and infinities are not JSON
    if value is None or isinstance(value, (bool, int, float)):
        return value
    if isinstance(value, (bytes, bytearray, memoryview)):
        return "\\x" + bytes(value).hex()  # as Postgres writes bytea
    return storable(str(value))


def record_dead_letters(
    conn: psycopg.Connection, catalog: Catalog, asset: str, source_table: str, run_id: str,
    rejects: Iterable[tuple[str, dict | None, dict, list]],
) -> int:
    """Store rejected rows once each (keyed by primary key, or the whole row when it has none).

    Returns how many are new or changed: a row read again (the boundary of a closed-range read)
    and rejected again is already there, and is neither rewritten nor counted twice.
    """
    query = sql.SQL(
        "INSERT INTO {} AS d (asset, source_table, row_key, primary_key, row, errors, run_id)"
        " VALUES (%s, %s, %s, %s, %s, %s, %s) ON CONFLICT (asset, source_table, row_key)"
        " DO UPDATE SET row = EXCLUDED.row, errors = EXCLUDED.errors, run_id = EXCLUDED.run_id, created_at = now()"
        " WHERE (d.row, d.errors) IS DISTINCT FROM (EXCLUDED.row, EXCLUDED.errors)"
    ).format(catalog.dead_letters)
    written = 0
    for key, pk, row, errors in rejects:
        written += conn.execute(query, (asset, source_table, key, json.dumps(storable(pk)) if pk else None,
                                        json.dumps(storable(row)), json.dumps(storable(errors)), run_id)).rowcount
    return written


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
        add_load_order(conn, catalog, source.raw_table)
        # The look-back window below the checkpoint reads the raw rows from its start on
        # (runtime/late_rows.py); the builds look rows up by the lookups.
        for columns in ((source.cursor,), *source.lookups):
            conn.execute(
                sql.SQL("CREATE INDEX IF NOT EXISTS {} ON {} ({})").format(
                    sql.Identifier(f"{source.raw_table}__{'_'.join(columns)}"[:63]), ref,
                    sql.SQL(", ").join(map(sql.Identifier, columns)),
                )
            )


#: The column that says in which order Postgres took each raw row in (`add_load_order`).
LOAD_ORDER = "_gs_seq"


def add_load_order(conn: psycopg.Connection, catalog: Catalog, raw_table: str) -> None:
    """Number the raw table's rows in the order Postgres takes them in, from one sequence.

    Builds pick what changed by this number, never by a clock: dlt's load ids are the loading
    machine's wall-clock time, and a second machine with a skewed clock would hide its rows.
    The rows of a first load share one number, given without rewriting the table (a constant
    default); every row inserted later draws its own from the sequence.
    """
    ref = catalog.raw_table(raw_table)
    if LOAD_ORDER not in {r[0] for r in conn.execute(
        "SELECT attname FROM pg_attribute WHERE attrelid = %s::regclass AND attnum > 0 AND NOT attisdropped",
        (f'"{catalog.raw_name}"."{raw_table}"',),
    )}:
        first = conn.execute("SELECT nextval(%s)", (catalog.load_order_name,)).fetchone()[0]
        conn.execute(sql.SQL("ALTER TABLE {} ADD COLUMN {} bigint NOT NULL DEFAULT {}").format(
            ref, sql.Identifier(LOAD_ORDER), sql.Literal(first)))  # a number Postgres just gave, not input
        conn.execute(sql.SQL("ALTER TABLE {} ALTER COLUMN {} SET DEFAULT nextval({})").format(
            ref, sql.Identifier(LOAD_ORDER), sql.Literal(catalog.load_order_name)))
    conn.execute(sql.SQL("CREATE INDEX IF NOT EXISTS {} ON {} ({})").format(
        sql.Identifier(f"{raw_table}__load_order"[:63]), ref, sql.Identifier(LOAD_ORDER)))


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
    details: dict,
) -> None:
    """The asset's row of the app's `sync_status`: its checkpoint, rows, errors and status.

    `last_sync_timestamp` is the asset's checkpoint: the earliest of its source tables' cursors
    (every source row up to it has been synced). It is NOT NULL in the app: before any checkpoint
    exists it keeps the row's previous value, or the Unix epoch. Each table's own cursor is in
    `error_details.checkpoints`.
    """
    values = [v for v in (checkpoint or {}).values() if v]
    conn.execute(
        sql.SQL(
            "INSERT INTO {} AS s (entity_type, last_sync_timestamp, last_sync_status, items_synced, errors_count,"
            " error_details, updated_at) VALUES (%s, coalesce(%s::timestamptz, 'epoch'), %s, %s, %s, %s, now())"
            " ON CONFLICT (entity_type) DO UPDATE SET"
            " last_sync_timestamp = coalesce(%s::timestamptz, s.last_sync_timestamp),"
            " last_sync_status = EXCLUDED.last_sync_status, items_synced = EXCLUDED.items_synced,"
            " errors_count = EXCLUDED.errors_count, error_details = EXCLUDED.error_details,"
            " updated_at = EXCLUDED.updated_at"
        ).format(catalog.sync_status),
        (asset, min(values) if values else None, status, items, errors,
         json.dumps({**details, "checkpoints": checkpoint or {}}, default=str), min(values) if values else None),
    )
