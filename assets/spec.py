"""Asset declarations: what each destination table is, never how it is produced."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, field_validator

#: The Fivetran cursor column on every Gong table.
FIVETRAN_SYNCED = "_fivetran_synced"

#: SQL predicate a build uses to pick the raw rows that arrived since its last build of one input.
#: `_dlt_load_id` is dlt's load id (a unix timestamp as text); compared as numeric because text
#: comparison depends on the database collation. Every raw table has an index on this expression.
LOADED_SINCE = "_dlt_load_id::numeric > %({table})s"

DatasetKey = Literal["gong", "salesforce"]


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class Column(_Frozen):
    name: str
    pg_type: str
    #: Set to now() when the row is inserted or changes; left out of the change comparison.
    touched: bool = False


class SourceTable(_Frozen):
    """One BigQuery table an asset reads, incrementally, into the raw schema."""

    dataset: DatasetKey
    table: str
    primary_key: tuple[str, ...]
    cursor: str = FIVETRAN_SYNCED
    #: Columns to read; None reads every column, so the raw table is a faithful replica.
    columns: tuple[str, ...] | None = None
    #: Soft-delete flag columns: a true value removes the row from derived tables.
    deleted_flags: tuple[str, ...] = ("_fivetran_deleted",)
    #: The setting that names this table in the warehouse, when accounts differ.
    table_setting: str | None = None
    #: When `dataset` does not exist, read the same table from this one instead (logged).
    fallback_dataset: DatasetKey | None = None
    #: When `dataset` does not exist and there is no fallback: an empty raw table with these
    #: columns stands in, so the build's joins find nothing instead of failing.
    stand_in: tuple[Column, ...] = ()
    #: A valid source row; rows that fail it go to the dead-letter table and are not landed.
    row_model: type[BaseModel] | None = None

    @property
    def raw_table(self) -> str:
        """Name of the landing table in the raw schema: dataset key and source table."""
        return f"{self.dataset}__{self.table}"


class Index(_Frozen):
    """A secondary index on the destination table; `definition` is what follows `ON table`."""

    name: str
    definition: str


class Check(_Frozen):
    """A data-quality rule logged after a build: `sql` selects `(key, detail)` of offending rows,
    reading `_build_rows` (the rows this build wrote) and, through `{raw}`, the raw tables."""

    level: Literal["warning", "error"]
    message: str
    sql: str


def warning_check(message: str, key: str, prefix: str) -> Check:
    """A check logging the rows whose `metadata.warnings` hold a warning starting with `prefix`."""
    return Check(
        level="warning",
        message=message,
        sql=f"SELECT {key}, w FROM _build_rows, jsonb_array_elements_text(metadata->'warnings') w "
            f"WHERE w LIKE '{prefix}%%'",
    )


class Build(_Frozen):
    """How the destination table is derived from raw tables, in SQL run inside Postgres.

    `rows` selects the destination columns, in declaration order, for every live row.
    `changed_keys` selects the destination primary keys whose inputs changed since the last
    build; it receives one parameter per input raw table, named after it, holding that table's
    last built load id (see LOADED_SINCE). `{raw}` and `{dest}` stand for the two schemas.
    """

    inputs: tuple[str, ...]
    rows: str
    changed_keys: str
    checks: tuple[Check, ...] = ()


class AssetSpec(_Frozen):
    """One node of the asset graph: a destination table, its sources and its upstream assets."""

    name: str
    description: str = ""
    deps: tuple[str, ...] = ()
    tags: frozenset[str] = frozenset()
    sources: tuple[SourceTable, ...] = ()
    primary_key: tuple[str, ...]
    columns: tuple[Column, ...]
    build: Build
    indexes: tuple[Index, ...] = ()
    #: Extra parameters the build SQL reads from settings, by setting name.
    build_settings: tuple[str, ...] = ()

    @field_validator("deps", "primary_key", mode="before")
    @classmethod
    def _tuple(cls, value: object) -> object:
        return (value,) if isinstance(value, str) else value

    @field_validator("tags", mode="before")
    @classmethod
    def _tags(cls, value: object) -> object:
        return frozenset([value]) if isinstance(value, str) else value

    @property
    def table(self) -> str:
        return self.name

    @property
    def column_names(self) -> tuple[str, ...]:
        return tuple(c.name for c in self.columns)

    @property
    def built_columns(self) -> tuple[str, ...]:
        """The columns the build SQL selects: all but those stamped by the runtime."""
        return tuple(c.name for c in self.columns if not c.touched)


def columns(**types: str) -> tuple[Column, ...]:
    """Columns in keyword order: `columns(id="text", title="text")`."""
    return tuple(Column(name=name, pg_type=pg_type) for name, pg_type in types.items())


def since(source: SourceTable, alias: str) -> str:
    """SQL: the raw row (as `alias`) arrived since this build's last look at its table."""
    return f"{alias}." + LOADED_SINCE.format(table=source.raw_table)


def live(alias: str, source: SourceTable) -> str:
    """SQL that is true for a raw row none of whose soft-delete flags is set."""
    return " AND ".join(f"NOT coalesce({alias}.{flag}, false)" for flag in source.deleted_flags) or "true"


def replica_build(source: SourceTable, cols: tuple[Column, ...], casts: dict[str, str] | None = None) -> Build:
    """The build of a table that mirrors one source table's live rows, column for column."""
    casts = casts or {}
    select = ", ".join(
        f's."{c.name}"::{casts[c.name]} AS "{c.name}"' if c.name in casts else f's."{c.name}"' for c in cols
    )
    pk = ", ".join(f'"{k}"' for k in source.primary_key)
    since = LOADED_SINCE.format(table=source.raw_table)
    return Build(
        inputs=(source.raw_table,),
        rows=f"SELECT {select} FROM {{raw}}.{source.raw_table} s WHERE {live('s', source)}",
        changed_keys=f"SELECT {pk} FROM {{raw}}.{source.raw_table} WHERE {since}",
    )

