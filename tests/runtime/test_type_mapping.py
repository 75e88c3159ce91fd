"""Every BigQuery type Fivetran lands reaches the raw table value for value (runtime/schema.py).

BIGNUMERIC is left out: the emulator answers 500 to a table with a BIGNUMERIC column, so only
the mapping (numeric(76,38)) is written down for it, not proven here. GEOGRAPHY likewise: the
emulator's Storage API sends WKB where BigQuery sends WKT.
"""

from __future__ import annotations

import datetime as dt
import decimal
import json

import psycopg
from google.cloud import bigquery

from assets import ALL_ASSETS
from assets.spec import SourceTable
from runtime import bigquery as bq
from runtime.load import land
from runtime.postgres import Catalog
from runtime.schema import plan_source
from runtime.settings import load_settings

FIELDS = [
    bigquery.SchemaField("id", "STRING"),
    bigquery.SchemaField("i", "INT64"),
    bigquery.SchemaField("f", "FLOAT64"),
    bigquery.SchemaField("n", "NUMERIC"),
    bigquery.SchemaField("b", "BOOL"),
    bigquery.SchemaField("ts", "TIMESTAMP"),
    bigquery.SchemaField("d", "DATE"),
    bigquery.SchemaField("dtm", "DATETIME"),
    bigquery.SchemaField("tm", "TIME"),
    bigquery.SchemaField("j", "JSON"),
    bigquery.SchemaField("by", "BYTES"),
    bigquery.SchemaField("arr", "INT64", mode="REPEATED"),
    bigquery.SchemaField("st", "RECORD", fields=[bigquery.SchemaField("x", "INT64"), bigquery.SchemaField("z", "STRING")]),
    bigquery.SchemaField("_fivetran_synced", "TIMESTAMP"),
    bigquery.SchemaField("_fivetran_deleted", "BOOL"),
]

ROW = """SELECT 'r1', 9007199254740993, 1.25, NUMERIC '12345678901234567890.123456789',
  TRUE, TIMESTAMP '2026-01-01 10:00:00.123456+00',
  DATE '2026-01-02', DATETIME '2026-01-02 03:04:05.654321', TIME '03:04:05.000007', JSON '{"a": [1, 2], "b": "ü"}',
  FROM_BASE64('AP8='), [1, 2, 3], STRUCT(4 AS x, 'y' AS z), TIMESTAMP '2026-01-01 10:00:00.123456+00', FALSE"""

EXPECTED = {
    "id": "r1",
    "i": 9007199254740993,
    "f": 1.25,
    "n": decimal.Decimal("12345678901234567890.123456789"),
    "b": True,
    "ts": dt.datetime(2026, 1, 1, 10, 0, 0, 123456, tzinfo=dt.UTC),
    "d": dt.date(2026, 1, 2),
    "dtm": dt.datetime(2026, 1, 2, 3, 4, 5, 654321),
    "tm": dt.time(3, 4, 5, 7),
    "by": b"\x00\xff",
}


def test_every_type_round_trips_into_the_raw_table(env):
    ref = env.gong("all_types")
    env.bq.create_dataset(f"{env.emulator.project}.{env.gong_dataset}", exists_ok=True)
    env.bq.create_table(bigquery.Table(ref, schema=FIELDS))
    env.bq.query(f"INSERT INTO `{ref}` {ROW}").result()

    settings = load_settings()
    catalog = Catalog(settings)
    source = SourceTable(dataset="gong", table="all_types", primary_key=("id",))
    spec = ALL_ASSETS[0].model_copy(update={"name": "all_types", "sources": (source,)})
    clients = bq.connect(settings)
    with psycopg.connect(env.database_url, autocommit=True) as conn:
        conn.execute("CREATE SCHEMA gong_raw")
        landed = land(spec, settings, clients, env.database_url,
                      evolve=lambda s, fields: plan_source(conn, catalog, spec.name, s.raw_table, fields))
        assert landed.rows_loaded == {"gong__all_types": 1}
        cur = conn.execute("SELECT * FROM gong_raw.gong__all_types")
        row = dict(zip([c.name for c in cur.description], cur.fetchone()))
        types = dict(conn.execute(
            "SELECT column_name, format_type(atttypid, atttypmod) FROM information_schema.columns c"
            " JOIN pg_attribute a ON a.attrelid = 'gong_raw.gong__all_types'::regclass AND a.attname = c.column_name"
            " WHERE table_schema = 'gong_raw' AND table_name = 'gong__all_types'").fetchall())
    clients.close()
    for name, value in EXPECTED.items():
        assert row[name] == value, (name, row[name], types[name])
    assert json.loads(row["j"]) == {"a": [1, 2], "b": "ü"}
    assert json.loads(row["arr"]) == [1, 2, 3]
    assert json.loads(row["st"]) == {"x": 4, "z": "y"}
    assert types["n"] == "numeric(38,9)"
    assert types["ts"] == "timestamp(6) with time zone"
    assert types["by"] == "bytea" and types["dtm"] == "timestamp(6) without time zone"
