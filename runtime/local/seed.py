"""Seed a BigQuery emulator with a deterministic synthetic Gong workspace and Salesforce tables.

`seed_workspace` creates the datasets and tables exactly as SOURCE_SCHEMA.md describes them and
loads them with Parquet load jobs (the emulator's fast path; it does not create tables on load, so
they are created first). The rows come from `runtime.local.synthetic`, the awkward cases are named
in `CASES`, and the mutation helpers (`insert_rows`, `update_rows`, `soft_delete`) change rows the
way a later Fivetran sync would.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterable
from pathlib import Path

import pyarrow.parquet as pq
from google.cloud import bigquery

from runtime.local.mutations import check_name, insert_rows, soft_delete, update_rows
from runtime.local.source_schema import (
    DEFAULT_DATASETS,
    PRIMARY_KEYS,
    SOURCE_SCHEMAS,
    TableKey,
    arrow_schema,
    table_label,
)
from runtime.local.synthetic import BASE_TIME, CASES, CHUNK, MIN_CALLS, Cases, Plan, table_chunks

__all__ = [
    "BASE_TIME",
    "CASES",
    "Cases",
    "DEFAULT_DATASETS",
    "PRIMARY_KEYS",
    "SOURCE_SCHEMAS",
    "insert_rows",
    "seed_workspace",
    "select_tables",
    "soft_delete",
    "update_rows",
]


def select_tables(tables: Iterable[str | TableKey] | None) -> list[TableKey]:
    """Table keys from `("gong", "call")`, `"gong.call"` or a plain name that is unambiguous."""
    if tables is None:
        return list(SOURCE_SCHEMAS)
    chosen: list[TableKey] = []
    for item in tables:
        if isinstance(item, tuple):
            key = item
        elif "." in item:
            key = tuple(item.split(".", 1))  # type: ignore[assignment]
        else:
            matches = [k for k in SOURCE_SCHEMAS if k[1] == item]
            if len(matches) != 1:
                options = [table_label(k) for k in matches] or sorted(table_label(k) for k in SOURCE_SCHEMAS)
                raise ValueError(f"table {item!r} is ambiguous or unknown; say one of {options}")
            key = matches[0]
        if key not in SOURCE_SCHEMAS:
            raise ValueError(f"unknown source table {key!r}")
        if key not in chosen:
            chosen.append(key)
    return chosen


def seed_workspace(
    client: bigquery.Client,
    *,
    project: str,
    gong_dataset: str = DEFAULT_DATASETS["gong"],
    salesforce_dataset: str = DEFAULT_DATASETS["salesforce"],
    calls: int = 40,
    seed: int = 0,
    tables: Iterable[str | TableKey] | None = None,
    chunk: int = CHUNK,
    monologue_bytes: tuple[int, int] | None = None,
) -> dict[str, int]:
    """(Re)create the source tables and load synthetic rows; return rows per table (`gong.call`: n).

    `monologue_bytes=(low, high)` gives each transcript monologue a text of `low` to `high` UTF-8
    bytes (real ones are 1–5 KB); by default monologues are one to three short sentences.

    Seeding resets: each selected table is dropped and created again. Datasets are created only
    for the connectors that have a selected table, so leaving out every Salesforce table leaves
    the project without a Salesforce dataset (the opportunity fallback case).
    """
    if calls < MIN_CALLS:
        raise ValueError(f"calls must be at least {MIN_CALLS} so that every awkward case exists")
    datasets = {
        "gong": check_name(gong_dataset, "dataset name"),
        "salesforce": check_name(salesforce_dataset, "dataset name"),
    }
    keys = select_tables(tables)
    plan = Plan(calls=calls, seed=seed, monologue_bytes=monologue_bytes)

    for connector in dict.fromkeys(key[0] for key in keys):
        client.create_dataset(f"{project}.{datasets[connector]}", exists_ok=True)

    counts: dict[str, int] = {}
    for key in keys:
        table = f"{project}.{datasets[key[0]]}.{key[1]}"
        client.delete_table(table, not_found_ok=True)
        client.create_table(bigquery.Table(table, schema=SOURCE_SCHEMAS[key]))
        counts[table_label(key)] = _load(client, table, key, plan, chunk)
    return counts


def _load(client: bigquery.Client, table: str, key: TableKey, plan: Plan, chunk: int) -> int:
    """Stream the table's chunks into one Parquet file on disk, then load it in one job.

    One file keeps it to one load job per table; writing chunk by chunk keeps memory bounded
    at benchmark sizes.
    """
    with tempfile.TemporaryDirectory(prefix="seed-") as folder:
        path = Path(folder) / f"{key[1]}.parquet"
        rows = 0
        with pq.ParquetWriter(path, arrow_schema(SOURCE_SCHEMAS[key])) as writer:
            for part in table_chunks(key, plan, chunk):
                writer.write_table(part)
                rows += part.num_rows
        if rows == 0:
            return 0
        config = bigquery.LoadJobConfig(
            source_format=bigquery.SourceFormat.PARQUET,
            write_disposition=bigquery.WriteDisposition.WRITE_APPEND,
        )
        with path.open("rb") as source:
            client.load_table_from_file(source, table, job_config=config).result()
        return rows
