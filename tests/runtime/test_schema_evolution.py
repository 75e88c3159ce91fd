"""Schema evolution on real syncs: the raw tables follow BigQuery's schema without losing data."""

from __future__ import annotations

import datetime as dt
import decimal

import pyarrow as pa
import pytest
from google.cloud import bigquery

from runtime.local.mutations import load_arrow
from runtime.local.seed import CASES, seed_workspace, update_rows
from runtime.local.source_schema import arrow_schema
from tests.helpers import outcome, sync

LATER = dt.datetime(2026, 4, 1, 8, 0, 0, 250001, tzinfo=dt.UTC)


@pytest.fixture
def seeded(env):
    seed_workspace(env.bq, project=env.emulator.project, gong_dataset=env.gong_dataset, calls=12, tables=["gong.call"])
    assert outcome(sync("calls"), "calls").status == "success"
    return env


def reshape(env, table: str, schema: list[bigquery.SchemaField], select: str) -> None:
    """Recreate a source table with a new schema and its rows re-read through `select`, as a
    Fivetran re-sync after an upstream type change would land it."""
    ref = env.gong(table)
    rows = env.bq.query(f"SELECT {select} FROM `{ref}`").to_arrow(create_bqstorage_client=False)
    env.bq.delete_table(ref)
    env.bq.create_table(bigquery.Table(ref, schema=schema))
    load_arrow(env.bq, ref, rows.cast(arrow_schema(schema)))


def call_schema(env, **changes: str | None) -> list[bigquery.SchemaField]:
    """The call table's schema with columns retyped (name="TYPE") or dropped (name=None)."""
    fields = []
    for f in env.bq.get_table(env.gong("call")).schema:
        if f.name in changes and changes[f.name] is None:
            continue
        fields.append(bigquery.SchemaField(f.name, changes.get(f.name) or f.field_type))
    return fields


def raw_type(env, column: str) -> str:
    return env.rows(
        "SELECT data_type FROM information_schema.columns WHERE table_schema = 'gong_raw' AND table_name = 'gong__call'"
        " AND column_name = %s", (column,))[0][0]


def changes(env) -> list[tuple]:
    return env.rows("SELECT column_name, change, old_type, new_type, action FROM schema_changes ORDER BY id")


def key(ws: int = 0) -> dict:
    return {"id": CASES.shared_call_id, "workspace_id": CASES.workspace_ids[ws]}


def test_an_added_column_lands_in_the_raw_table_and_not_in_the_derived_one(seeded):
    ref = seeded.gong("call")
    seeded.bq.query(f"ALTER TABLE `{ref}` ADD COLUMN sentiment FLOAT64").result()
    table = seeded.bq.get_table(ref)
    table.schema = [*table.schema, bigquery.SchemaField("sentiment", "FLOAT64")]
    seeded.bq.update_table(table, ["schema"])
    update_rows(seeded.bq, ref, key(), {"sentiment": 0.75}, LATER)

    report = sync("calls")
    assert outcome(report, "calls").status == "success"
    assert raw_type(seeded, "sentiment") == "double precision"
    values = dict(seeded.rows("SELECT workspace_id, sentiment FROM gong_raw.gong__call WHERE id = %s", (CASES.shared_call_id,)))
    assert values == {CASES.workspace_ids[0]: 0.75, CASES.workspace_ids[1]: None}
    assert "sentiment" not in {r[0] for r in seeded.rows(
        "SELECT column_name FROM information_schema.columns WHERE table_schema = 'public' AND table_name = 'calls'")}
    assert changes(seeded) == [("sentiment", "added", "", "FLOAT64", "added")]


def test_a_widened_type_is_migrated_in_place_before_loading(seeded):
    before = seeded.rows("SELECT count(*) FROM gong_raw.gong__call")[0][0]
    reshape(seeded, "call", call_schema(seeded, duration="NUMERIC"), "* REPLACE (CAST(duration AS NUMERIC) AS duration)")
    update_rows(seeded.bq, seeded.gong("call"), key(), {"duration": decimal.Decimal("12.5")}, LATER)

    assert outcome(sync("calls"), "calls").status == "success"
    assert raw_type(seeded, "duration") == "numeric"
    assert seeded.rows("SELECT count(*) FROM gong_raw.gong__call")[0][0] == before
    assert seeded.rows("SELECT duration FROM gong_raw.gong__call WHERE id = %s AND workspace_id = %s",
                       tuple(key().values())) == [(decimal.Decimal("12.500000000"),)]
    assert changes(seeded) == [("duration", "type_changed", "bigint", "numeric", "altered")]
    # The destination keeps its declared shape.
    assert seeded.rows("SELECT data_type FROM information_schema.columns WHERE table_name = 'calls' "
                       "AND table_schema = 'public' AND column_name = 'duration'") == [("bigint",)]


def test_a_narrowed_type_keeps_the_old_column_and_every_value(seeded):
    old_titles = dict(seeded.rows("SELECT id || '/' || workspace_id, title FROM gong_raw.gong__call"))
    reshape(seeded, "call", call_schema(seeded, started="DATE"), "* REPLACE (DATE(started) AS started)")
    update_rows(seeded.bq, seeded.gong("call"), key(), {"title": "After the change"}, LATER)

    report = sync("calls")
    calls = outcome(report, "calls")
    assert calls.status == "success"
    assert calls.schema_changes == 1
    assert raw_type(seeded, "started") == "timestamp with time zone"
    started = seeded.rows("SELECT started FROM gong_raw.gong__call WHERE id = %s AND workspace_id = %s",
                          tuple(key().values()))[0][0]
    assert (started.hour, started.minute, started.microsecond) == (0, 0, 0)  # a DATE, kept as a timestamp
    assert changes(seeded) == [("started", "type_changed", "timestamptz", "date", "kept_old_type")]
    titles = dict(seeded.rows("SELECT id || '/' || workspace_id, title FROM gong_raw.gong__call"))
    assert titles.pop(f"{CASES.shared_call_id}/{CASES.workspace_ids[0]}") == "After the change"
    assert all(old_titles[k] == v for k, v in titles.items())
    # Seen once, recorded once: the next run adds no row.
    sync("calls")
    assert len(changes(seeded)) == 1


def test_an_incompatible_type_lands_in_a_variant_column(seeded):
    reshape(seeded, "call", call_schema(seeded, is_private="DATE"),
            "* REPLACE (IF(is_private, DATE '2026-01-01', NULL) AS is_private)")
    update_rows(seeded.bq, seeded.gong("call"), key(), {"is_private": dt.date(2026, 5, 5)}, LATER)

    assert outcome(sync("calls"), "calls").status == "success"
    assert raw_type(seeded, "is_private") == "boolean"
    assert seeded.rows("SELECT is_private__v_date FROM gong_raw.gong__call WHERE id = %s AND workspace_id = %s",
                       tuple(key().values())) == [(dt.date(2026, 5, 5),)]
    assert changes(seeded) == [("is_private", "type_changed", "boolean", "date", "variant_column")]


def test_a_removed_column_keeps_its_values_and_new_rows_get_null(seeded):
    kept = dict(seeded.rows("SELECT id || '/' || workspace_id, brief FROM gong_raw.gong__call WHERE brief IS NOT NULL"))
    assert kept
    reshape(seeded, "call", call_schema(seeded, brief=None), "* EXCEPT (brief)")
    update_rows(seeded.bq, seeded.gong("call"), key(), {"title": "Touched"}, LATER)

    assert outcome(sync("calls"), "calls").status == "success"
    after = dict(seeded.rows("SELECT id || '/' || workspace_id, brief FROM gong_raw.gong__call"))
    touched = f"{CASES.shared_call_id}/{CASES.workspace_ids[0]}"
    assert after[touched] is None
    assert all(after[k] == v for k, v in kept.items() if k != touched)
    assert changes(seeded) == [("brief", "removed", "text", "", "kept_values")]
    sync("calls")
    assert len(changes(seeded)) == 1


def test_schema_changes_are_shown_by_the_cli(seeded):
    from tests.runtime.test_cli import materialize

    reshape(seeded, "call", call_schema(seeded, brief=None), "* EXCEPT (brief)")
    sync("calls")
    shown = materialize("--schema-changes", env_vars=seeded.vars())
    assert shown.returncode == 0, shown.stderr
    line = next(line for line in shown.stdout.splitlines() if "brief" in line)
    assert line.split()[1:] == ["calls", "gong__call", "brief", "removed", "text", "-", "kept_values"]
