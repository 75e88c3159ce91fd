"""The source tables as Fivetran lands them in BigQuery: columns, types and primary keys.

The synthetic warehouse is created from these, so the project's readers run the same queries
against the emulator as against the real warehouse (see the design's SOURCE_SCHEMA.md).
Keys are `(dataset_key, table)`: "gong" is the Gong connector's dataset, "salesforce" the
Salesforce connector's; their real names are configuration (`DEFAULT_DATASETS`).
"""

from __future__ import annotations

import pyarrow as pa
from google.cloud.bigquery import SchemaField

DEFAULT_DATASETS: dict[str, str] = {"gong": "gongio_ft", "salesforce": "salesforce"}

TableKey = tuple[str, str]

#: Fivetran's system columns, last on every table.
_SYSTEM = (("_fivetran_synced", "TIMESTAMP"), ("_fivetran_deleted", "BOOL"))


def _fields(*columns: tuple[str, str]) -> list[SchemaField]:
    return [SchemaField(name, kind) for name, kind in (*columns, *_SYSTEM)]


_S, _I, _F, _B, _T, _D, _J = "STRING", "INT64", "FLOAT64", "BOOL", "TIMESTAMP", "DATE", "JSON"

_OPPORTUNITY = (
    ("id", _S), ("name", _S), ("stage_name", _S), ("close_date", _D), ("amount", _F),
    ("account_id", _S), ("owner_id", _S), ("last_modified_date", _T), ("is_deleted", _B),
    ("health_score", _F),
)  # fmt: skip

SOURCE_SCHEMAS: dict[TableKey, list[SchemaField]] = {
    ("gong", "users"): _fields(
        ("id", _S), ("manager_id", _S), ("email_address", _S), ("first_name", _S), ("last_name", _S),
        ("title", _S), ("active", _B), ("created", _T),
    ),
    ("gong", "call"): _fields(
        ("id", _S), ("workspace_id", _S), ("primary_user_id", _S), ("title", _S), ("scheduled", _T),
        ("started", _T), ("duration", _I), ("direction", _S), ("scope", _S), ("purpose", _S),
        ("media", _S), ("url", _S), ("meeting_url", _S), ("is_private", _B), ("custom_data", _J),
        ("systems", _J), ("call_outcome_id", _S), ("call_outcome_name", _S),
        ("call_outcome_category", _S), ("brief", _S),
    ),
    # One row per monologue; `sentence` is a JSON array of {start, end, text}.
    ("gong", "transcript"): _fields(
        ("call_id", _S), ("index", _I), ("workspace_id", _S), ("speaker_id", _S), ("topic", _S),
        ("sentence", _J),
    ),
    ("gong", "call_speaker"): _fields(("id", _S), ("call_id", _S), ("user_id", _S), ("talk_time", _F)),
    ("gong", "call_participant"): _fields(
        ("id", _S), ("call_id", _S), ("speaker_id", _S), ("user_id", _S), ("email_address", _S),
        ("name", _S), ("title", _S), ("affiliation", _S), ("methods", _J),
    ),
    ("gong", "call_context_integration"): _fields(
        ("name", _S), ("object_id", _S), ("call_id", _S), ("object_type", _S), ("value", _J),
        ("systems", _S), ("timing", _S),
    ),
    # `sent_at` is text in the source: the email spec has values that cannot be parsed.
    ("gong", "email"): _fields(
        ("id", _S), ("subject", _S), ("sent_at", _S), ("body", _S), ("headers", _J), ("opportunity_id", _S),
    ),
    ("gong", "email_sender"): _fields(("email_id", _S), ("email_address", _S)),
    ("gong", "email_recipient"): _fields(("email_id", _S), ("email_address", _S)),
    # Fallback when the project has no Salesforce dataset: same columns as Salesforce's.
    ("gong", "opportunity"): _fields(*_OPPORTUNITY),
    ("salesforce", "opportunity"): _fields(*_OPPORTUNITY),
    ("salesforce", "account"): _fields(
        ("id", _S), ("name", _S), ("industry", _S), ("billing_country", _S), ("last_modified_date", _T),
        ("is_deleted", _B),
    ),
    ("salesforce", "user"): _fields(
        ("id", _S), ("email", _S), ("name", _S), ("last_modified_date", _T), ("is_deleted", _B),
    ),
}  # fmt: skip

def _declared_keys() -> dict[TableKey, tuple[str, ...]]:
    """Each source table's primary key, as the asset declarations state it (a fallback dataset
    holds the same table with the same key)."""
    from assets import ALL_ASSETS

    keys: dict[TableKey, tuple[str, ...]] = {}
    for spec in ALL_ASSETS:
        for source in spec.sources:
            for dataset in (source.dataset, source.fallback_dataset):
                if dataset:
                    keys[(dataset, source.table)] = source.primary_key
    return keys


PRIMARY_KEYS: dict[TableKey, tuple[str, ...]] = _declared_keys()

_ARROW_TYPES: dict[str, pa.DataType] = {
    "STRING": pa.string(),
    "INT64": pa.int64(),
    "INTEGER": pa.int64(),
    "FLOAT64": pa.float64(),
    "FLOAT": pa.float64(),
    "BOOL": pa.bool_(),
    "BOOLEAN": pa.bool_(),
    "TIMESTAMP": pa.timestamp("us", tz="UTC"),
    "DATE": pa.date32(),
    "DATETIME": pa.timestamp("us"),
    "TIME": pa.time64("us"),
    "NUMERIC": pa.decimal128(38, 9),
    "BIGNUMERIC": pa.decimal256(76, 38),
    "BYTES": pa.binary(),
    # JSON travels as text in Parquet; a load into a JSON column parses it.
    "JSON": pa.string(),
}


def arrow_schema(fields: list[SchemaField]) -> pa.Schema:
    """The Arrow schema whose Parquet file loads into a table with these BigQuery fields."""
    return pa.schema([pa.field(f.name, _ARROW_TYPES[f.field_type]) for f in fields])


def table_label(key: TableKey) -> str:
    """`gong.call`-style name of a table key, as `seed_workspace` reports row counts."""
    return f"{key[0]}.{key[1]}"
