"""Changes to emulator tables the way Fivetran makes them: new rows, updates, soft deletes.

Every change also sets `_fivetran_synced`, as a Fivetran sync does, so incremental readers see it.
Values travel as BigQuery query parameters (bqemulator 1.4 supports named scalar and array
parameters, including TIMESTAMP with microseconds, DATE and NULL). Identifiers cannot be
parameters: they come from our own constants and arguments and are checked against strict
patterns before they reach SQL.
"""

from __future__ import annotations

import datetime as dt
import io
import json
import re
from collections.abc import Mapping, Sequence
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from google.cloud import bigquery

from runtime.local.source_schema import arrow_schema

SYNCED = "_fivetran_synced"
DELETED = "_fivetran_deleted"

_PROJECT = re.compile(r"^[A-Za-z][A-Za-z0-9-]{0,62}$")
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,1023}$")
#: Key groups per UPDATE statement, so a long key list does not become one huge statement.
_KEYS_PER_STATEMENT = 200

TableRef = str | bigquery.TableReference | bigquery.Table
Key = Mapping[str, Any]


def check_name(name: str, what: str = "identifier") -> str:
    """`name` if it is a plain BigQuery identifier (letters, digits, underscore), else ValueError."""
    if not isinstance(name, str) or not _NAME.match(name):
        raise ValueError(f"not a plain {what}: {name!r}")
    return name


def resolve_table(client: bigquery.Client, table_ref: TableRef) -> tuple[str, str, str]:
    """(project, dataset, table) of a `[project.]dataset.table` string or a table reference."""
    if isinstance(table_ref, bigquery.Table):
        table_ref = table_ref.reference
    if isinstance(table_ref, bigquery.TableReference):
        parts = [table_ref.project, table_ref.dataset_id, table_ref.table_id]
    else:
        parts = str(table_ref).split(".")
        if len(parts) == 2:
            parts = [client.project, *parts]
        if len(parts) != 3:
            raise ValueError(f"expected [project.]dataset.table, got {table_ref!r}")
    project, dataset, table = parts
    if not _PROJECT.match(project):
        raise ValueError(f"not a plain project id: {project!r}")
    return project, check_name(dataset, "dataset name"), check_name(table, "table name")


def table_id(client: bigquery.Client, table_ref: TableRef) -> str:
    """`project.dataset.table`, checked."""
    return ".".join(resolve_table(client, table_ref))


def _quoted(client: bigquery.Client, table_ref: TableRef) -> str:
    return f"`{table_id(client, table_ref)}`"


def load_arrow(client: bigquery.Client, table_ref: TableRef, rows: pa.Table) -> int:
    """Append an Arrow table to an existing table through a Parquet load job; return rows loaded."""
    if rows.num_rows == 0:
        return 0
    buffer = io.BytesIO()
    pq.write_table(rows, buffer)
    buffer.seek(0)
    config = bigquery.LoadJobConfig(
        source_format=bigquery.SourceFormat.PARQUET,
        write_disposition=bigquery.WriteDisposition.WRITE_APPEND,
    )
    client.load_table_from_file(buffer, table_id(client, table_ref), job_config=config).result()
    return rows.num_rows


def _cell(kind: str, value: Any) -> Any:
    """A Python value as the Parquet/parameter side expects it: JSON columns take JSON text."""
    if kind == "JSON" and value is not None and not isinstance(value, str):
        return json.dumps(value)
    return value


def insert_rows(
    client: bigquery.Client,
    table_ref: TableRef,
    rows: Sequence[Mapping[str, Any]],
    *,
    synced_at: dt.datetime | None = None,
) -> int:
    """Append rows (dicts by column name) with a Parquet load; return how many.

    Missing columns are NULL, except the system columns: `_fivetran_synced` gets `synced_at`
    (default: now, UTC) and `_fivetran_deleted` false, as Fivetran writes them.
    """
    if not rows:
        return 0
    fields = client.get_table(table_id(client, table_ref)).schema
    kinds = {f.name: f.field_type for f in fields}
    unknown = sorted({name for row in rows for name in row} - kinds.keys())
    if unknown:
        raise ValueError(f"unknown columns for {table_id(client, table_ref)}: {unknown}")
    stamp = synced_at or dt.datetime.now(dt.UTC)
    defaults = {SYNCED: stamp, DELETED: False}
    records = [
        {name: _cell(kind, row[name]) if name in row else defaults.get(name) for name, kind in kinds.items()}
        for row in rows
    ]
    return load_arrow(client, table_ref, pa.Table.from_pylist(records, schema=arrow_schema(fields)))


def update_rows(
    client: bigquery.Client,
    table_ref: TableRef,
    keys: Key | Sequence[Key],
    values: Mapping[str, Any],
    synced_at: dt.datetime,
) -> int:
    """Set `values` and `_fivetran_synced = synced_at` on the rows matching any of `keys`.

    A key is a dict of column -> value (a full primary key, or any columns); a None value matches
    NULL. Returns the number of rows changed.
    """
    key_list = [keys] if isinstance(keys, Mapping) else list(keys)
    if not key_list:
        return 0
    fields = client.get_table(table_id(client, table_ref)).schema
    kinds = {f.name: f.field_type for f in fields}
    assignments = {**values, SYNCED: synced_at}
    for name in [*assignments, *(c for key in key_list for c in key)]:
        check_name(name, "column name")
        if name not in kinds:
            raise ValueError(f"{table_id(client, table_ref)} has no column {name!r}")
    if any(not key for key in key_list):
        raise ValueError("an empty key would match every row")

    changed = 0
    for start in range(0, len(key_list), _KEYS_PER_STATEMENT):
        params: list[bigquery.ScalarQueryParameter] = []

        def param(column: str, value: Any) -> str:
            """SQL for one value: a named parameter, typed from the column."""
            name = f"p{len(params)}"
            kind = kinds[column]
            if kind == "JSON":
                # JSON travels as text and is parsed in SQL: the unambiguous form.
                params.append(bigquery.ScalarQueryParameter(name, "STRING", _cell(kind, value)))
                return f"PARSE_JSON(@{name})"
            params.append(bigquery.ScalarQueryParameter(name, kind, value))
            return f"@{name}"

        sets = ", ".join(
            f"`{column}` = " + ("NULL" if value is None else param(column, value))
            for column, value in assignments.items()
        )
        groups = [
            "("
            + " AND ".join(
                f"`{column}` IS NULL" if value is None else f"`{column}` = {param(column, value)}"
                for column, value in key.items()
            )
            + ")"
            for key in key_list[start : start + _KEYS_PER_STATEMENT]
        ]
        sql = f"UPDATE {_quoted(client, table_ref)} SET {sets} WHERE {' OR '.join(groups)}"
        job = client.query(sql, job_config=bigquery.QueryJobConfig(query_parameters=params))
        job.result()
        changed += job.num_dml_affected_rows or 0
    return changed


def soft_delete(
    client: bigquery.Client, table_ref: TableRef, keys: Key | Sequence[Key], synced_at: dt.datetime
) -> int:
    """Flag rows `_fivetran_deleted = true` with a new `_fivetran_synced`, as Fivetran does."""
    return update_rows(client, table_ref, keys, {DELETED: True}, synced_at)
