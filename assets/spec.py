"""Asset declarations: what each destination table is, never how it is produced.

An asset fills one table of the application's schema (`assets/app_schema.py`). It lands its
source tables, Gong-shaped, in the raw schema, and derives the app's rows from them with SQL that
it owns. That SQL names what it reads and writes through slots, which the runtime fills with
quoted identifiers and parameter placeholders (`psycopg.sql`); nothing else is pasted in:

| slot | what the runtime puts there |
|---|---|
| `{call}` | the raw table of the input whose `slot` is `call` |
| `{call_new}` | a subquery of that raw table's rows landed since this asset's last build |
| `{app_calls}` | a table of the application's schema |
| `{ids_speakers}` | the id map of an asset that keeps one (`id_map=True`) |
| `{fn_uuid}`, `{fn_try_date}`, … | the pipeline's SQL functions (`FUNCTIONS`) |
| `{setting_internal_email_domains}` | a parameter holding that setting's value |
| `{rows}`, `{changed}`, `{gone}` | this build's rows, changed source keys, and source keys gone |
| `{full}` | a boolean literal: true when every row is being rebuilt (`{changed}` is then filled after the rows) |
"""

from __future__ import annotations

import string
from typing import Literal

from pydantic import BaseModel, ConfigDict, field_validator, model_validator

from assets.app_schema import TABLES

#: The Fivetran cursor column on every Gong table.
FIVETRAN_SYNCED = "_fivetran_synced"

DatasetKey = Literal["gong", "salesforce"]

#: The pipeline's SQL functions (in its bookkeeping schema), as `{fn_<name>}` slots.
FUNCTIONS = (
    "uuid", "try_timestamptz", "try_date", "try_numeric", "try_integer", "try_jsonb", "name_from_email",
)
#: Slots every build has.
BUILD_SLOTS = ("rows", "changed", "gone", "full")

#: Postgres type names (as `format_type` prints them) a written column may have.
TEXT = ("character varying", "text")
TEXT_ARRAY = ("character varying[]", "text[]")
INTEGER = ("integer", "bigint", "numeric")
TIMESTAMP = ("timestamp without time zone",)
TIMESTAMPTZ = ("timestamp with time zone",)
UUID = ("uuid",)
JSONB = ("jsonb",)
BOOLEAN = ("boolean",)
DATE = ("date",)


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class Column(_Frozen):
    """A column of the app table that the pipeline writes."""

    name: str
    #: Types the app's column may have (the first is the one APP_SCHEMA.md declares).
    types: tuple[str, ...]
    #: `always`: from the build, whenever the row changes. `first`: when the pipeline first
    #: writes the row (an adopted row gets it only while it is NULL). `touch`: now(), whenever
    #: another written column changes.
    write: Literal["always", "first", "touch"] = "always"


def col(name: str, types: tuple[str, ...], write: Literal["always", "first", "touch"] = "always") -> Column:
    return Column(name=name, types=types, write=write)


class Fit(_Frozen):
    """A source column that feeds an app column of a fixed type: the kinds of source type that
    fit it (`runtime/schema.py` kinds), and how a value of any other type is converted."""

    column: str
    kinds: tuple[str, ...]
    rule: str


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
    #: columns (name → Postgres type) stands in, so the build's joins find nothing.
    stand_in: tuple[tuple[str, str], ...] = ()
    #: A valid source row; rows that fail it go to the dead-letter table and are not landed.
    row_model: type[BaseModel] | None = None
    #: The name build SQL knows this table by (`{call}`, `{call_new}`); default: the table.
    slot: str = ""
    #: Column lists the builds look raw rows up by (each gets an index on the raw table).
    lookups: tuple[tuple[str, ...], ...] = ()
    #: Source columns whose app column has a fixed type (the app's schema never changes).
    fits: tuple[Fit, ...] = ()
    #: Columns besides the key and cursor the asset cannot do without: a source table that lacks
    #: one fails the asset, naming it.
    needs: tuple[str, ...] = ()
    #: Optional columns the builds read by name, with their BigQuery type: a source table that
    #: lacks one lands without it, and the raw table gets it as NULL (warned, recorded).
    reads: tuple[tuple[str, str], ...] = ()

    @property
    def raw_table(self) -> str:
        """Name of the landing table in the raw schema: dataset key and source table."""
        return f"{self.dataset}__{self.table}"

    @property
    def slot_name(self) -> str:
        return self.slot or self.table


class Check(_Frozen):
    """A data-quality rule logged after a build: `sql` selects `(key, detail)` of offending rows,
    reading `{rows}` (the rows this build wrote) and any other slot."""

    level: Literal["warning", "error"]
    message: str
    sql: str


def warning_check(message: str, key: str, prefix: str) -> Check:
    """A check logging the rows whose `metadata.warnings` hold a warning starting with `prefix`."""
    return Check(
        level="warning",
        message=message,
        sql=f"SELECT {key}, w FROM {{rows}}, jsonb_array_elements_text(metadata->'warnings') w "
            f"WHERE starts_with(w, '{prefix}')",
    )


def slots_of(text: str) -> set[str]:
    """The slot names a piece of build SQL uses."""
    return {name for _, name, _, _ in string.Formatter().parse(text) if name}


class Build(_Frozen):
    """How the app's rows are derived from raw tables, in SQL run inside Postgres.

    - `rows` selects, for every live source row, the app row: its identity (`id`), every written
      column, and the source key columns.
    - `changed` selects the source keys whose inputs landed since the last build (`{x_new}`).
    - `gone` selects the identity of app rows whose source keys are in `{gone}` (changed, but no
      longer built): those rows are deleted, after the guard.
    - `rejects` (optional) selects `(row_key, primary_key jsonb, row jsonb, reason)` of source rows
      the build leaves out on purpose; they go to dead letters.
    - `reject_scope` (optional) selects the row keys whose reject status this build may change
      (those of the changed keys; every one on a full build): only their dead letters may leave,
      so that `rejects` itself need only look at them. Without it, every row is in scope.
    - `after` statements run last, in the same transaction (derived values of other tables).
    """

    inputs: tuple[SourceTable, ...]
    rows: str
    changed: str
    gone: str = ""
    rejects: str = ""
    reject_scope: str = ""
    checks: tuple[Check, ...] = ()
    after: tuple[str, ...] = ()

    @property
    def texts(self) -> tuple[str, ...]:
        return (self.rows, self.changed, self.gone, self.rejects, self.reject_scope, *(c.sql for c in self.checks),
                *self.after)

    @model_validator(mode="after")
    def _known_slots(self) -> Build:
        inputs = {s.slot_name for s in self.inputs}
        if len(inputs) != len(self.inputs):
            raise ValueError("two inputs of one build share a slot name")
        for text in self.texts:
            for slot in slots_of(text):
                if not _known_slot(slot, inputs):
                    raise ValueError(f"unknown slot {{{slot}}} in build SQL")
        return self


def _known_slot(slot: str, inputs: set[str]) -> bool:
    kind, _, rest = slot.partition("_")
    return (
        slot in BUILD_SLOTS
        or slot in inputs
        or (slot.endswith("_new") and slot[:-4] in inputs)
        or (kind == "app" and rest in TABLES)
        or (kind == "fn" and rest in FUNCTIONS)
        or (kind == "ids" and bool(rest))
        or (kind == "setting" and bool(rest))
    )


class AssetSpec(_Frozen):
    """One node of the asset graph: an app table, its sources and its upstream assets."""

    name: str
    description: str = ""
    deps: tuple[str, ...] = ()
    tags: frozenset[str] = frozenset()
    sources: tuple[SourceTable, ...] = ()
    #: The table of the application's schema this asset fills.
    table: str
    #: The columns it writes (besides the identity, which it writes once).
    columns: tuple[Column, ...]
    #: What identifies an app row: its uuid, or the primary key of a table without one.
    identity: tuple[str, ...] = ("id",)
    #: Columns of `rows` and `changed` that identify a source row (need not be app columns).
    source_key: tuple[str, ...]
    #: App columns that match an existing row to its source row; must be unique in the table.
    natural_key: tuple[str, ...]
    build: Build
    #: False for tables the pipeline never deletes from (the app's accounts).
    deletes: bool = True
    #: Keep a map from source key to uuid: for rows whose natural key can change (a speaker's
    #: email), so that a uuid, once given, stays with its source row.
    id_map: bool = False

    @field_validator("deps", "identity", "source_key", "natural_key", mode="before")
    @classmethod
    def _tuple(cls, value: object) -> object:
        return (value,) if isinstance(value, str) else value

    @field_validator("tags", mode="before")
    @classmethod
    def _tags(cls, value: object) -> object:
        return frozenset([value]) if isinstance(value, str) else value

    @model_validator(mode="after")
    def _consistent(self) -> AssetSpec:
        if self.table not in TABLES:
            raise ValueError(f"asset {self.name}: table {self.table!r} is not in the application's schema")
        names = {c.name for c in self.columns}
        missing = [k for k in self.natural_key if k not in names and k not in self.identity]
        if missing:
            raise ValueError(f"asset {self.name}: natural key column(s) {missing} are not written")
        return self

    @property
    def matched_keys(self) -> tuple[tuple[str, ...], ...]:
        """The column sets an app row is matched by (identity, natural key): each must be unique."""
        return tuple(dict.fromkeys(k for k in (self.identity, self.natural_key) if k))

    @property
    def column_names(self) -> tuple[str, ...]:
        return tuple(c.name for c in self.columns)

    @property
    def built_columns(self) -> tuple[str, ...]:
        """The written columns the build SQL selects: all but those stamped by the runtime."""
        return tuple(c.name for c in self.columns if c.write != "touch")

    @property
    def settings(self) -> set[str]:
        """Setting names the build SQL reads (`{setting_<name>}`)."""
        return {s.removeprefix("setting_") for t in self.build.texts for s in slots_of(t) if s.startswith("setting_")}
