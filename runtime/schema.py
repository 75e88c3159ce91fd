"""Schema evolution of the raw tables: BigQuery types, their Postgres homes, and what to do on change.

The one mapping from BigQuery types to Postgres types lives here (`TYPES`). Before each read the
source's current BigQuery schema is compared with the raw table in Postgres:
- a new column is typed from its BigQuery type and added by dlt (history stays NULL);
- a type change Postgres can hold every value of (INT64 → NUMERIC or FLOAT64, DATE → TIMESTAMP,
  any → STRING, NUMERIC → BIGNUMERIC) is applied in place with ALTER COLUMN … USING, in one
  transaction, to the raw table and dlt's staging copy, before loading;
- any other change alters nothing: values are cast back to the old type when that loses nothing
  (STRING → INT64 keeps text, TIMESTAMP → DATE keeps timestamps), else they land in a new
  `<column>__v_<kind>` column; either way a warning names table, column and both types;
- a removed column stays, with its values; new rows have NULL there.
Every change seen or made is recorded once in `schema_changes`.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import psycopg
import pyarrow as pa
from dlt.common.normalizers.naming.snake_case import NamingConvention as SnakeCase
from google.cloud.bigquery import SchemaField
from psycopg import sql

from assets.spec import Fit, SourceTable
from runtime.postgres import LOAD_ORDER, Catalog, has_primary_key

log = logging.getLogger("gong_sync.schema")


@dataclass(frozen=True)
class PgType:
    """Where a BigQuery type lands: the Postgres type, dlt's column hint, and the Arrow type."""

    kind: str
    ddl: str
    hint: dict
    arrow: pa.DataType | None


_TS_HINT = {"data_type": "timestamp", "precision": 6, "timezone": True}

#: BigQuery type → Postgres type of the raw tables. JSON keeps its exact text in the raw table, and
#: ARRAY and STRUCT land as JSON text too (the binary COPY path cannot carry nested Arrow types);
#: destination tables cast them to jsonb. GEOGRAPHY lands as the bytes the Storage API sends.
TYPES: dict[str, PgType] = {
    "STRING": PgType("text", "varchar", {"data_type": "text"}, pa.string()),
    "JSON": PgType("text", "varchar", {"data_type": "text"}, pa.string()),
    "INT64": PgType("bigint", "bigint", {"data_type": "bigint"}, pa.int64()),
    "FLOAT64": PgType("double", "double precision", {"data_type": "double"}, pa.float64()),
    "NUMERIC": PgType("numeric", "numeric(38,9)", {"data_type": "decimal", "precision": 38, "scale": 9},
                      pa.decimal128(38, 9)),
    "BIGNUMERIC": PgType("bignumeric", "numeric(76,38)", {"data_type": "decimal", "precision": 76, "scale": 38},
                         pa.decimal256(76, 38)),
    "BOOL": PgType("boolean", "boolean", {"data_type": "bool"}, pa.bool_()),
    "TIMESTAMP": PgType("timestamptz", "timestamp with time zone", _TS_HINT, pa.timestamp("us", tz="UTC")),
    "DATE": PgType("date", "date", {"data_type": "date"}, pa.date32()),
    "DATETIME": PgType("timestamp", "timestamp without time zone",
                       {"data_type": "timestamp", "precision": 6, "timezone": False}, pa.timestamp("us")),
    "TIME": PgType("time", "time without time zone", {"data_type": "time", "precision": 6}, pa.time64("us")),
    "BYTES": PgType("bytea", "bytea", {"data_type": "binary"}, pa.binary()),
    "GEOGRAPHY": PgType("geography", "bytea", {"data_type": "binary"}, None),
    "ARRAY": PgType("text", "varchar", {"data_type": "text"}, pa.string()),
    "STRUCT": PgType("text", "varchar", {"data_type": "text"}, pa.string()),
}
_ALIASES = {"INTEGER": "INT64", "FLOAT": "FLOAT64", "BOOLEAN": "BOOL", "RECORD": "STRUCT", "BIGDECIMAL": "BIGNUMERIC",
            "DECIMAL": "NUMERIC"}

#: Postgres column types (information_schema) → kind, to compare with what BigQuery now says.
_PG_KINDS = {
    "character varying": "text", "text": "text", "bigint": "bigint", "integer": "bigint",
    "double precision": "double", "boolean": "boolean", "timestamp with time zone": "timestamptz",
    "timestamp without time zone": "timestamp", "date": "date", "time without time zone": "time",
    "bytea": "bytea", "jsonb": "json", "json": "json",
}

#: old kind → new kinds Postgres can migrate to in place without losing a value.
WIDENINGS: dict[str, set[str]] = {
    "bigint": {"numeric", "bignumeric", "double"},
    "numeric": {"bignumeric"},
    "date": {"timestamptz", "timestamp"},
    "timestamp": {"timestamptz"},
}


def _type_name(f: SchemaField) -> str:
    return "ARRAY" if f.mode == "REPEATED" else _ALIASES.get(f.field_type, f.field_type)


def bq_type(f: SchemaField) -> PgType:
    return TYPES.get(_type_name(f), TYPES["STRING"])


def _as_json_text(column: pa.ChunkedArray) -> pa.Array:
    """Nested values (lists, structs) as JSON text: one Python value per row, only for such columns."""
    return pa.array([None if v is None else json.dumps(v, default=str) for v in column.to_pylist()], pa.string())


def pg_kind(data_type: str, precision: int | None, scale: int | None) -> str:
    if data_type == "numeric":
        return "numeric" if (precision, scale) == (38, 9) else "bignumeric"
    return _PG_KINDS.get(data_type, data_type)


def widens(old: str, new: str) -> bool:
    return new != old and (new == "text" or new in WIDENINGS.get(old, set()))


@dataclass
class Change:
    column: str
    change: str  # added | type_changed | removed
    old_type: str | None
    new_type: str | None
    action: str  # added | altered | kept_old_type | variant_column | kept_values


@dataclass
class SourcePlan:
    """What landing one source table must do this run: dlt hints and per-batch Arrow fixes."""

    hints: dict[str, dict] = field(default_factory=dict)
    casts: dict[str, pa.DataType] = field(default_factory=dict)
    renames: dict[str, str] = field(default_factory=dict)
    json_columns: set[str] = field(default_factory=set)
    #: Landing names of JSON columns (JSON text, ARRAY, STRUCT): `\u0000` in them is a NUL too.
    json_text: set[str] = field(default_factory=set)
    changes: list[Change] = field(default_factory=list)
    #: The raw table holds nothing yet (absent, or empty without its primary key): dlt appends
    #: straight into it instead of merging through a staging copy, which costs several times the
    #: COPY. `secure_raw_table` then gives it its key (and settles any duplicate a retry left).
    first_load: bool = False

    def adapt(self, table: pa.Table) -> pa.Table:
        """Cast columns to their landing type and move incompatible ones to a variant column."""
        if not self.renames and all(
            table.schema.field(n).type == t for n, t in self.casts.items() if n in table.column_names
        ):
            return table
        columns, names = [], []
        for name, column in zip(table.column_names, table.columns):
            if name in self.json_columns and column.type != pa.string():
                column = _as_json_text(column)
            elif name in self.casts and column.type != self.casts[name]:
                column = column.cast(self.casts[name])
            columns.append(column)
            names.append(self.renames.get(name, name))
        return pa.Table.from_arrays(columns, names=names)


def raw_columns(conn: psycopg.Connection, schema: str, table: str) -> dict[str, str]:
    rows = conn.execute(
        "SELECT column_name, data_type, numeric_precision, numeric_scale FROM information_schema.columns"
        " WHERE table_schema = %s AND table_name = %s",
        (schema, table),
    ).fetchall()
    return {name: pg_kind(dt, p, s) for name, dt, p, s in rows}


def _kind_type(kind: str) -> PgType:
    return next(t for t in TYPES.values() if t.kind == kind)


def landing_names(names: list[str]) -> dict[str, str]:
    """BigQuery column name → its raw column's name, through the one naming rule dlt lands with.

    Names are normalized as dlt does (`CamelCase` → `camel_case`, `Order` → `order`); a name that
    would clash with dlt's own columns (`_dlt_*`) gets a `src` prefix; names that collide once
    normalized (`Order` and `order`) are kept apart with a suffix (`order_2`), in schema order.
    """
    naming = SnakeCase()
    out: dict[str, str] = {}
    taken: set[str] = set()
    for name in names:
        base = naming.normalize_identifier(name)
        if base.startswith("_dlt"):
            base = f"src{base}"
        landing, n = base, 2
        while landing in taken:
            landing, n = f"{base}_{n}", n + 1
        taken.add(landing)
        out[name] = landing
    return out


def plan_source(
    conn: psycopg.Connection, catalog: Catalog, asset: str, raw_table: str, fields: list[SchemaField]
) -> SourcePlan:
    """Compare BigQuery's schema with the raw table, migrate what widens, and plan the rest.

    Columns are compared by their landing names (`landing_names`), as dlt writes them.
    """
    plan = SourcePlan()
    existing = raw_columns(conn, catalog.raw_name, raw_table)
    plan.first_load = not existing or unloaded(conn, catalog, raw_table)
    alters: list[tuple[str, PgType]] = []
    landing = landing_names([f.name for f in fields])
    for f in fields:
        name = landing[f.name]
        new = bq_type(f)
        old = existing.get(name)
        plan.hints[name] = dict(new.hint)
        if name != f.name:
            plan.renames[f.name] = name
            if name != f.name.lower():  # more than case: say so once
                plan.changes.append(Change(f.name, "renamed", None, None, f"landed as {name}"))
        if new.arrow is not None:
            # Storage reads can hand narrower Arrow types (int32 for INT64); land the mapped one.
            plan.casts[f.name] = new.arrow
        if _type_name(f) in ("ARRAY", "STRUCT"):
            plan.json_columns.add(f.name)
        if _type_name(f) in ("ARRAY", "STRUCT", "JSON"):
            plan.json_text.add(name)
        if not existing:
            continue
        if old is None:
            plan.changes.append(Change(name, "added", None, f.field_type, "added"))
        elif old == new.kind:
            pass
        elif widens(old, new.kind):
            alters.append((name, new))
            plan.changes.append(Change(name, "type_changed", old, new.kind, "altered"))
        else:
            kept = _kind_type(old)
            if kept.arrow is not None and widens(new.kind, old):
                plan.hints[name] = dict(kept.hint)
                plan.casts[f.name] = kept.arrow
                action = "kept_old_type"
            else:
                variant = f"{name}__v_{new.kind}"[:63]
                plan.renames[f.name] = variant
                plan.casts.pop(f.name, None)
                plan.hints[variant] = plan.hints.pop(name)
                action = "variant_column"
            plan.changes.append(Change(name, "type_changed", old, new.kind, action))
    source_names = set(landing.values())
    for name in existing:
        if name not in source_names and not name.startswith(("_dlt", LOAD_ORDER)) and "__v_" not in name:
            plan.changes.append(Change(name, "removed", existing[name], None, "kept_values"))
    if alters:
        _alter(conn, catalog, raw_table, alters)
    return plan


def missing_columns(source: SourceTable, fields: list[SchemaField]) -> tuple[list[str], list[str]]:
    """(required, optional) columns the source table lacks, by landing name.

    Required: the primary key, the cursor and what the asset's meaning depends on (`needs`).
    Optional: every other column a build reads (`reads`), and soft-delete flags: absent, they
    read as NULL (`ensure_columns`).
    """
    present = set(landing_names([f.name for f in fields]).values())
    required = [c for c in dict.fromkeys((*source.primary_key, source.cursor, *source.needs)) if c not in present]
    optional = [c for c in dict.fromkeys((*(r[0] for r in source.reads), *source.deleted_flags)) if c not in present]
    return required, optional


def ensure_columns(conn: psycopg.Connection, catalog: Catalog, source: SourceTable) -> list[str]:
    """Give a raw table the optional columns its builds read and the source lacks, as NULL."""
    existing = raw_columns(conn, catalog.raw_name, source.raw_table)
    if not existing:
        return []
    wanted = {**{flag: "BOOL" for flag in source.deleted_flags}, **dict(source.reads)}
    added = [c for c in wanted if c not in existing]
    for column in added:
        conn.execute(sql.SQL("ALTER TABLE {} ADD COLUMN IF NOT EXISTS {} {}").format(
            catalog.raw_table(source.raw_table), sql.Identifier(column), sql.SQL(TYPES[wanted[column]].ddl)
        ))
    return added


def unloaded(conn: psycopg.Connection, catalog: Catalog, raw_table: str) -> bool:
    """An existing raw table that no load has filled or secured yet."""
    if has_primary_key(conn, catalog.raw_name, raw_table):
        return False
    return not conn.execute(sql.SQL("SELECT EXISTS (SELECT 1 FROM {})").format(catalog.raw_table(raw_table))).fetchone()[0]


def _alter(conn: psycopg.Connection, catalog: Catalog, raw_table: str, alters: list[tuple[str, PgType]]) -> None:
    """Migrate columns in place, in the raw table and dlt's staging copy, in one transaction."""
    staging = f"{catalog.raw_name}_staging"
    with conn.transaction():
        for schema in (catalog.raw_name, staging):
            if not conn.execute("SELECT to_regclass(%s) IS NOT NULL", (f'"{schema}"."{raw_table}"',)).fetchone()[0]:
                continue
            for column, new in alters:
                conn.execute(
                    sql.SQL("ALTER TABLE {}.{} ALTER COLUMN {} TYPE {} USING {}::{}").format(
                        sql.Identifier(schema), sql.Identifier(raw_table), sql.Identifier(column),
                        sql.SQL(new.ddl), sql.Identifier(column), sql.SQL(new.ddl),
                    )
                )


def record_changes(
    conn: psycopg.Connection, catalog: Catalog, asset: str, raw_table: str, changes: list[Change],
    warn: Callable[[str], None] = log.warning,
) -> int:
    """Write each change once; log the first sighting. Returns how many were new."""
    new = 0
    for c in changes:
        row = conn.execute(
            sql.SQL(
                "INSERT INTO {} (asset, table_name, column_name, change, old_type, new_type, action)"
                " VALUES (%s, %s, %s, %s, %s, %s, %s) ON CONFLICT DO NOTHING RETURNING 1"
            ).format(catalog.schema_changes),
            (asset, raw_table, c.column, c.change, c.old_type or "", c.new_type or "", c.action),
        ).fetchone()
        if row:
            new += 1
            warn(
                f"{asset}: {catalog.raw_name}.{raw_table}.{c.column}: {c.change.replace('_', ' ')}"
                f"{f' from {c.old_type}' if c.old_type else ''}{f' to {c.new_type}' if c.new_type else ''}; "
                f"{c.action if ' ' in c.action else c.action.replace('_', ' ')}"
            )
    return new


def app_misfits(source: SourceTable, fields: list[SchemaField]) -> list[tuple[Change, Fit]]:
    """Source columns whose BigQuery type no longer fits the app column they feed (`Fit`)."""
    by_name = {f.name: f for f in fields}
    out = []
    for fit in source.fits:
        field = by_name.get(fit.column)
        if field is not None and bq_type(field).kind not in fit.kinds:
            out.append((Change(fit.column, "app_type_mismatch", "/".join(fit.kinds), bq_type(field).kind,
                               "converted"), fit))
    return out


def create_empty_raw(conn: psycopg.Connection, catalog: Catalog, raw_table: str, fields: list[SchemaField]) -> None:
    """The raw table of a source table that exists but had no rows yet (dlt creates none for an
    empty load), typed from BigQuery as a load would type it, so the builds find it empty."""
    landing = landing_names([f.name for f in fields])
    cols = [sql.SQL("{} {}").format(sql.Identifier(landing[f.name]), sql.SQL(bq_type(f).ddl)) for f in fields]
    cols.append(sql.SQL("_dlt_load_id varchar NOT NULL"))
    conn.execute(sql.SQL("CREATE TABLE IF NOT EXISTS {} ({})").format(catalog.raw_table(raw_table), sql.SQL(", ").join(cols)))
