"""Schema evolution on real syncs: the raw tables (schema gong_raw) follow BigQuery's schema without
losing data; the application's tables (schema public) never change shape. A new source column
reaches the app through `calls.metadata`, and a source type the app's column cannot hold is
recorded once as `app_type_mismatch`, warned about on every run, and converted by its rule."""

from __future__ import annotations

import datetime as dt
import decimal

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
    env.app_shape = app_shape(env)
    assert env.app_shape
    return env


def app_shape(env) -> list[tuple]:
    """Every column of every table in the app's schema (public), with its type, nullability and
    default, and every index there: what the app's migrations own."""
    columns = env.rows(
        "SELECT table_name, column_name, data_type, udt_name, character_maximum_length, numeric_precision,"
        " numeric_scale, is_nullable, column_default FROM information_schema.columns WHERE table_schema = 'public'"
        " ORDER BY table_name, ordinal_position")
    indexes = env.rows("SELECT tablename, indexname, indexdef FROM pg_indexes WHERE schemaname = 'public'"
                       " ORDER BY tablename, indexname")
    return [*columns, *indexes]


def assert_app_shape_unchanged(env) -> None:
    assert app_shape(env) == env.app_shape


def app_call(env, ws: int = 0) -> tuple:
    """(duration_seconds, metadata) of the shared call's app row; its workspace must be `ws`."""
    rows = env.rows("SELECT duration_seconds, metadata FROM calls WHERE gong_call_id = %s", (CASES.shared_call_id,))
    assert len(rows) == 1
    assert rows[0][1]["workspace_id"] == CASES.workspace_ids[ws]
    return rows[0]


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
    return env.rows("SELECT column_name, change, old_type, new_type, action FROM gong_sync.schema_changes ORDER BY id")


def key(ws: int = 0) -> dict:
    return {"id": CASES.shared_call_id, "workspace_id": CASES.workspace_ids[ws]}


def test_an_added_column_lands_in_the_raw_table_and_in_the_app_rows_metadata(seeded):
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
    assert changes(seeded) == [("sentiment", "added", "", "FLOAT64", "added")]
    # The app's tables keep their shape: the new field reaches the app row through metadata.
    assert_app_shape_unchanged(seeded)
    _, metadata = app_call(seeded)
    assert metadata["sentiment"] == 0.75
    assert metadata["gong_url"]  # next to the fields it had
    # Rows with no value for it carry no key for it (history is NULL).
    assert seeded.rows("SELECT count(*) FROM calls WHERE metadata ? 'sentiment'") == [(1,)]


def test_a_widened_type_is_migrated_in_place_before_loading(seeded):
    before = seeded.rows("SELECT count(*) FROM gong_raw.gong__call")[0][0]
    reshape(seeded, "call", call_schema(seeded, duration="NUMERIC"), "* REPLACE (CAST(duration AS NUMERIC) AS duration)")
    update_rows(seeded.bq, seeded.gong("call"), key(), {"duration": decimal.Decimal("12.5")}, LATER)

    assert outcome(sync("calls"), "calls").status == "success"
    assert raw_type(seeded, "duration") == "numeric"
    assert seeded.rows("SELECT count(*) FROM gong_raw.gong__call")[0][0] == before
    assert seeded.rows("SELECT duration FROM gong_raw.gong__call WHERE id = %s AND workspace_id = %s",
                       tuple(key().values())) == [(decimal.Decimal("12.500000000"),)]
    assert changes(seeded) == [("duration", "type_changed", "bigint", "numeric", "altered"),
                               ("duration", "app_type_mismatch", "bigint", "numeric", "converted")]
    # The app's tables keep their shape (duration_seconds stays an integer).
    assert_app_shape_unchanged(seeded)
    assert app_call(seeded)[0] == 13


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
    assert_app_shape_unchanged(seeded)
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
    assert_app_shape_unchanged(seeded)
    assert app_call(seeded)[1]["is_private__v_date"] == "2026-05-05"


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
    assert_app_shape_unchanged(seeded)
    assert "brief" not in app_call(seeded)[1]
    sync("calls")
    assert len(changes(seeded)) == 1
    assert_app_shape_unchanged(seeded)


#: duration (seconds, now fractional) -> duration_seconds: rounded half away from zero (2.5 -> 3 and
#: -2.5 -> -3, where rounding half to even would give 2 and -2); NULL beyond an integer.
DURATIONS = [
    ("2.5", 3),
    ("4.5", 5),
    ("12.49", 12),
    ("-2.5", -3),
    ("3000000000.5", None),
]


@pytest.mark.parametrize("bq_type", ["FLOAT64", "NUMERIC"])
def test_a_duration_that_turns_fractional_is_rounded_for_the_app_and_kept_exact_in_metadata(seeded, bq_type, caplog):
    caplog.set_level("WARNING", logger="gong_sync")
    cast = decimal.Decimal if bq_type == "NUMERIC" else float
    reshape(seeded, "call", call_schema(seeded, duration=bq_type),
            f"* REPLACE (CAST(duration AS {bq_type}) AS duration)")
    calls = [tuple(r) for r in seeded.rows(
        "SELECT id, workspace_id FROM gong_raw.gong__call WHERE NOT coalesce(_fivetran_deleted, false) AND id <> %s"
        " ORDER BY id LIMIT %s", (CASES.shared_call_id, len(DURATIONS)))]
    assert len(calls) == len(DURATIONS)
    for (gong_id, ws), (value, _) in zip(calls, DURATIONS):
        update_rows(seeded.bq, seeded.gong("call"), {"id": gong_id, "workspace_id": ws}, {"duration": cast(value)},
                    LATER)
    untouched = dict(seeded.rows("SELECT gong_call_id, duration_seconds FROM calls WHERE NOT gong_call_id = ANY(%s)",
                                 ([c[0] for c in calls],)))
    kind = "double" if bq_type == "FLOAT64" else "numeric"
    warning = f"calls: call.duration is now {kind}, which the app's column does not hold"

    first = outcome(sync("calls"), "calls")
    assert first.status == "success"
    # The raw table follows BigQuery (widened in place); the app's table keeps its shape.
    assert raw_type(seeded, "duration") == ("double precision" if bq_type == "FLOAT64" else "numeric")
    assert_app_shape_unchanged(seeded)
    # Recorded once, as a type change of the raw table and a mismatch with the app's column.
    assert changes(seeded) == [("duration", "type_changed", "bigint", kind, "altered"),
                               ("duration", "app_type_mismatch", "bigint", kind, "converted")]
    assert first.schema_changes == 2
    assert caplog.text.count(warning) == 1
    assert "rounded half away from zero" in caplog.text
    # Rounded half away from zero into duration_seconds; the exact value in metadata.duration.
    app = {gid: (seconds, meta) for gid, seconds, meta in seeded.rows(
        "SELECT gong_call_id, duration_seconds, metadata FROM calls WHERE gong_call_id = ANY(%s)",
        ([c[0] for c in calls],))}
    exact = dict(seeded.rows("SELECT gong_call_id, (metadata ->> 'duration')::numeric FROM calls"
                             " WHERE gong_call_id = ANY(%s)", ([c[0] for c in calls],)))
    for (gong_id, _), (value, seconds) in zip(calls, DURATIONS):
        assert app[gong_id][0] == seconds, (value, app[gong_id])
        assert exact[gong_id] == decimal.Decimal(value), (value, app[gong_id][1])
    # Whole durations are unchanged and need no copy in metadata.
    assert dict(seeded.rows("SELECT gong_call_id, duration_seconds FROM calls WHERE NOT gong_call_id = ANY(%s)",
                            ([c[0] for c in calls],))) == untouched
    assert seeded.rows("SELECT count(*) FROM calls WHERE metadata ? 'duration'") == [(len(DURATIONS),)]

    # While it lasts, every run warns again, and records nothing new.
    caplog.clear()
    again = outcome(sync("calls"), "calls")
    assert again.status == "success"
    assert (again.rows_loaded, again.rows_written, again.schema_changes) == (0, 0, 0)
    assert caplog.text.count(warning) == 1
    assert [c for c in changes(seeded) if c[1] == "app_type_mismatch"] == [
        ("duration", "app_type_mismatch", "bigint", kind, "converted")]
    assert len(changes(seeded)) == 2
    assert_app_shape_unchanged(seeded)

    # Every row rebuilt under the new type: the same whole seconds, the same exact values.
    before = dict(seeded.rows("SELECT gong_call_id, (duration_seconds, metadata -> 'duration')::text FROM calls"))
    assert outcome(sync("calls", full_refresh=True), "calls").status == "success"
    assert dict(seeded.rows("SELECT gong_call_id, (duration_seconds, metadata -> 'duration')::text FROM calls")) == before
    assert_app_shape_unchanged(seeded)


def test_a_whole_duration_beyond_an_integer_is_kept_exact_in_metadata(seeded):
    # The rule: NULL in duration_seconds when the value does not fit an integer, and the exact
    # value in metadata.duration, whether or not it has a fraction: the app row loses nothing.
    reshape(seeded, "call", call_schema(seeded, duration="NUMERIC"),
            "* REPLACE (CAST(duration AS NUMERIC) AS duration)")
    update_rows(seeded.bq, seeded.gong("call"), key(), {"duration": decimal.Decimal("3000000000")}, LATER)

    assert outcome(sync("calls"), "calls").status == "success"
    seconds, _ = app_call(seeded)
    assert seconds is None
    assert seeded.rows("SELECT (metadata ->> 'duration')::numeric FROM calls WHERE gong_call_id = %s",
                       (CASES.shared_call_id,)) == [(decimal.Decimal("3000000000"),)]


def test_schema_changes_are_shown_by_the_cli(seeded):
    from tests.runtime.test_cli import materialize

    reshape(seeded, "call", call_schema(seeded, brief=None), "* EXCEPT (brief)")
    sync("calls")
    shown = materialize("--schema-changes", env_vars=seeded.vars())
    assert shown.returncode == 0, shown.stderr
    line = next(line for line in shown.stdout.splitlines() if "brief" in line)
    assert line.split()[1:] == ["calls", "gong__call", "brief", "removed", "text", "-", "kept_values"]
