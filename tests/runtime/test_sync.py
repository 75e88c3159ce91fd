"""The heart of the pipeline, on real parts: full load, incremental runs, deletes, selections."""

from __future__ import annotations

import datetime as dt
import json

import pytest

from runtime.local.seed import CASES, insert_rows, seed_workspace, soft_delete, update_rows
from tests.helpers import outcome, sync

LATER = dt.datetime(2026, 3, 1, 12, 0, 0, 654321, tzinfo=dt.UTC)
GONG_TABLES = ["gong.users", "gong.call", "gong.transcript", "gong.call_speaker"]
#: The core assets, whose source tables GONG_TABLES seeds.
CORE = "users,calls,transcripts,speakers"


@pytest.fixture
def seeded(env):
    seed_workspace(env.bq, project=env.emulator.project, gong_dataset=env.gong_dataset, calls=40, tables=GONG_TABLES)
    return env


def source(env, query: str) -> set[tuple]:
    """Rows of a BigQuery query as a set of tuples; `{g}` is the Gong dataset."""
    rows = env.bq.query(query.format(g=f"`{env.emulator.project}.{env.gong_dataset}`")).result()
    return {tuple(r.values()) for r in rows}


def dest(env, query: str) -> set[tuple]:
    return set(env.rows(query))


def live_calls(env) -> set[tuple]:
    return source(env, "SELECT id, workspace_id, title, duration, started, _fivetran_synced FROM {g}.call "
                       "WHERE NOT coalesce(_fivetran_deleted, false)")


def expected_speakers(env) -> set[tuple]:
    """speakers computed independently, in BigQuery, from the two source tables."""
    return source(env, """
        SELECT s.id, s.call_id, s.user_id, u.email_address,
               NULLIF(CONCAT(COALESCE(u.first_name, ''), ' ', COALESCE(u.last_name, '')), ' '),
               u.title, LOWER(SPLIT(u.email_address, '@')[SAFE_OFFSET(1)]) = 'prefect.io'
        FROM {g}.call_speaker s
        LEFT JOIN (SELECT * FROM {g}.users WHERE NOT coalesce(_fivetran_deleted, false)) u ON u.id = s.user_id
        WHERE NOT coalesce(s._fivetran_deleted, false)""")


def actual_speakers(env) -> set[tuple]:
    return dest(env, "SELECT id, call_id, user_id, email, name, title, company_side FROM speakers")


def assert_in_step(env) -> None:
    assert dest(env, "SELECT id, workspace_id, title, duration, started, _fivetran_synced FROM calls") == live_calls(env)
    assert dest(env, "SELECT id, email_address, first_name, last_name, active FROM users") == source(
        env, "SELECT id, email_address, first_name, last_name, active FROM {g}.users WHERE NOT coalesce(_fivetran_deleted, false)"
    )
    src_transcripts = {
        (c, i, w, json.dumps(json.loads(s), sort_keys=True))
        for c, i, w, s in source(env, "SELECT call_id, `index`, workspace_id, TO_JSON_STRING(sentence) FROM {g}.transcript "
                                      "WHERE NOT coalesce(_fivetran_deleted, false)")
    }
    dst_transcripts = {
        (c, i, w, json.dumps(s, sort_keys=True))
        for c, i, w, s in env.rows('SELECT call_id, "index", workspace_id, sentence FROM transcripts')
    }
    assert dst_transcripts == src_transcripts
    assert actual_speakers(env) == expected_speakers(env)


def test_first_run_loads_every_live_row_of_every_asset(seeded, capfd):
    report = sync(CORE)
    assert report.status == "success", [o.error for o in report.outcomes]
    assert {o.asset for o in report.outcomes} == {"users", "calls", "transcripts", "speakers"}
    assert_in_step(seeded)
    # Composite keys: the same call id lives in both workspaces, as two rows.
    assert len(seeded.rows("SELECT 1 FROM calls WHERE id = %s", (CASES.shared_call_id,))) == 2
    # Soft-deleted source rows never reach the destination.
    assert seeded.rows("SELECT 1 FROM calls WHERE id = %s AND workspace_id = %s", CASES.deleted_call) == []
    # A speaker whose user is unknown is kept, with no user fields.
    assert seeded.rows("SELECT email, company_side FROM speakers WHERE user_id = %s",
                       (CASES.orphan_speaker_user_id,)) == [(None, None)]
    # Microseconds survive end to end.
    assert {r[0].microsecond for r in seeded.rows("SELECT _fivetran_synced FROM calls")} - {0}
    # dlt's per-batch note that it kept our column hints stays out of the operator's log.
    assert "column hints were different" not in capfd.readouterr().err


def test_destination_tables_have_real_primary_keys(seeded):
    sync(CORE)
    keys = dict(seeded.rows("""
        SELECT c.conrelid::regclass::text, pg_get_constraintdef(c.oid) FROM pg_constraint c
        WHERE c.contype = 'p' AND c.connamespace = 'public'::regnamespace"""))
    assert keys["calls"] == "PRIMARY KEY (id, workspace_id)"
    assert keys["transcripts"] == 'PRIMARY KEY (call_id, index, workspace_id)'
    assert keys["speakers"] == "PRIMARY KEY (id, call_id)"
    assert keys["users"] == "PRIMARY KEY (id)"
    raw = dict(seeded.rows("""
        SELECT c.conrelid::regclass::text, pg_get_constraintdef(c.oid) FROM pg_constraint c
        WHERE c.contype = 'p' AND c.connamespace = 'gong_raw'::regnamespace"""))
    assert raw["gong_raw.gong__call"] == "PRIMARY KEY (id, workspace_id)"


def test_a_run_with_nothing_new_loads_nothing_and_rewrites_nothing(seeded):
    sync(CORE)
    before = seeded.rows("SELECT xmin::text, id FROM calls ORDER BY id, workspace_id")
    report = sync(CORE)
    assert report.status == "success"
    for o in report.outcomes:
        assert (o.rows_loaded, o.rows_written, o.rows_deleted) == (0, 0, 0), o
    assert seeded.rows("SELECT xmin::text, id FROM calls ORDER BY id, workspace_id") == before


def test_incremental_run_applies_inserts_updates_deletes_and_equal_timestamp_rows(seeded):
    first = sync(CORE)
    checkpoint = outcome(first, "calls").checkpoint_after["gong__call"]
    cp = dt.datetime.fromisoformat(checkpoint)
    bq = seeded.bq
    ws = CASES.workspace_ids[0]
    # A new call that lands later but carries the checkpoint's exact timestamp.
    insert_rows(bq, seeded.gong("call"), [{"id": "9000000000000000001", "workspace_id": ws, "title": "Late landing"}],
                synced_at=cp)
    insert_rows(bq, seeded.gong("call"), [{"id": "9000000000000000002", "workspace_id": ws, "title": "Brand new"}],
                synced_at=LATER)
    update_rows(bq, seeded.gong("call"), {"id": CASES.shared_call_id, "workspace_id": ws}, {"title": "Renamed"}, LATER)
    live_speaker = seeded.rows("SELECT id, call_id FROM speakers WHERE user_id IS NOT NULL ORDER BY id LIMIT 1")[0]
    soft_delete(bq, seeded.gong("call_speaker"), {"id": live_speaker[0], "call_id": live_speaker[1]}, LATER)
    # A user's new email must reach every speaker row of that user.
    user_id = seeded.rows("SELECT user_id FROM speakers GROUP BY user_id HAVING count(*) > 1 AND user_id IS NOT NULL LIMIT 1")[0][0]
    update_rows(bq, seeded.gong("users"), {"id": user_id}, {"email_address": "moved@example.org"}, LATER)

    report = sync(CORE)
    assert report.status == "success"
    assert outcome(report, "calls").rows_loaded == 3
    assert outcome(report, "users").rows_loaded == 1
    assert_in_step(seeded)
    assert seeded.rows("SELECT title FROM calls WHERE id = '9000000000000000001'") == [("Late landing",)]
    assert seeded.rows("SELECT title FROM calls WHERE id = %s AND workspace_id = %s", (CASES.shared_call_id, ws)) == [("Renamed",)]
    assert seeded.rows("SELECT 1 FROM speakers WHERE id = %s AND call_id = %s", live_speaker) == []
    assert {r[0] for r in seeded.rows("SELECT email FROM speakers WHERE user_id = %s", (user_id,))} == {"moved@example.org"}
    assert seeded.rows("SELECT bool_or(company_side) FROM speakers WHERE user_id = %s", (user_id,)) == [(False,)]
    assert outcome(report, "calls").checkpoint_after["gong__call"] == LATER.isoformat(timespec="microseconds")


def test_a_first_load_keeps_the_latest_of_a_key_the_source_holds_twice(seeded, caplog):
    # BigQuery enforces no keys. A first load appends without dlt's dedup pass; the raw table's
    # primary key must still end up holding each key once, the latest version by the cursor.
    ws = CASES.workspace_ids[0]
    twice = {"id": "9000000000000000003", "workspace_id": ws}
    insert_rows(seeded.bq, seeded.gong("call"), [{**twice, "title": "Newer"}], synced_at=LATER)
    insert_rows(seeded.bq, seeded.gong("call"), [{**twice, "title": "Older"}], synced_at=LATER - dt.timedelta(days=1))
    caplog.set_level("WARNING", logger="gong_sync")

    report = sync("calls")

    assert report.status == "success"
    assert seeded.rows("SELECT title FROM gong_raw.gong__call WHERE id = %s", (twice["id"],)) == [("Newer",)]
    assert seeded.rows("SELECT title FROM calls WHERE id = %s", (twice["id"],)) == [("Newer",)]
    assert seeded.rows(
        "SELECT count(*) FROM pg_constraint WHERE conrelid = 'gong_raw.gong__call'::regclass AND contype = 'p'"
    ) == [(1,)]
    assert "gong_raw.gong__call: 1 older copies of rows with the same primary key (id, workspace_id) removed" in caplog.text
    # The next run merges on that key: a change to the call replaces its one row.
    update_rows(seeded.bq, seeded.gong("call"), twice, {"title": "Renamed"}, LATER + dt.timedelta(days=1))
    assert sync("calls").status == "success"
    assert seeded.rows("SELECT title FROM calls WHERE id = %s", (twice["id"],)) == [("Renamed",)]


def test_selecting_speakers_touches_only_speakers(seeded):
    sync(CORE)
    update_rows(seeded.bq, seeded.gong("call"), {"id": CASES.shared_call_id}, {"title": "Not yet"}, LATER)
    speaker = seeded.rows("SELECT id, call_id FROM speakers ORDER BY id LIMIT 1")[0]
    update_rows(seeded.bq, seeded.gong("call_speaker"), {"id": speaker[0], "call_id": speaker[1]}, {"talk_time": 4242.5}, LATER)
    status_before = dict(seeded.rows("SELECT entity_type, finished_at FROM sync_status"))

    report = sync("speakers")
    assert [o.asset for o in report.outcomes] == ["speakers"]
    assert seeded.rows("SELECT talk_time FROM speakers WHERE id = %s AND call_id = %s", speaker) == [(4242.5,)]
    assert ("Not yet",) not in seeded.rows("SELECT title FROM calls")
    status_after = dict(seeded.rows("SELECT entity_type, finished_at FROM sync_status"))
    assert {k for k in status_after if status_after[k] != status_before[k]} == {"speakers"}


def test_upstream_selection_runs_dependencies_first(seeded):
    report = sync("+speakers")
    assert [o.asset for o in report.outcomes] == ["calls", "users", "speakers"]
    assert report.status == "success"
    assert actual_speakers(seeded) == expected_speakers(seeded)


def test_a_failed_asset_skips_its_downstream_but_not_its_siblings(seeded):
    seeded.bq.delete_table(seeded.gong("users"))
    report = sync(CORE)
    assert report.status == "failed"
    users = outcome(report, "users")
    assert users.status == "failed"
    assert f"{seeded.gong_dataset}.users does not exist" in users.error
    assert outcome(report, "speakers").status == "skipped"
    assert "users" in outcome(report, "speakers").error
    assert outcome(report, "calls").status == "success"
    assert outcome(report, "transcripts").status == "success"
    assert seeded.rows("SELECT count(*) FROM transcripts")[0][0] > 0
    assert seeded.rows("SELECT status FROM sync_status WHERE entity_type = 'users'") == [("failed",)]


def test_full_refresh_forgets_the_checkpoint_and_reloads(seeded):
    sync(CORE)
    total = seeded.rows("SELECT count(*) FROM gong_raw.gong__call")[0][0]
    # A row removed from the destination by hand comes back only with a full refresh.
    seeded.rows("DELETE FROM calls WHERE id = %s RETURNING 1", (CASES.shared_call_id,))
    assert outcome(sync("calls"), "calls").rows_loaded == 0
    report = sync("calls", full_refresh=True)
    calls = outcome(report, "calls")
    assert calls.rows_loaded == total
    assert len(seeded.rows("SELECT 1 FROM calls WHERE id = %s", (CASES.shared_call_id,))) == 2
    assert dest(seeded, "SELECT id, workspace_id, title, duration, started, _fivetran_synced FROM calls") == live_calls(seeded)


def test_a_new_machine_resumes_from_the_checkpoint_kept_in_postgres(seeded):
    import shutil

    sync(CORE)
    assert outcome(sync(CORE), "calls").rows_loaded == 0  # nothing new: nothing loaded
    insert_rows(seeded.bq, seeded.gong("call"), [{"id": "9000000000000000003", "workspace_id": CASES.workspace_ids[1],
                                                   "title": "After a quiet run"}], synced_at=LATER)
    assert outcome(sync(CORE), "calls").rows_loaded == 1
    # A new machine: dlt's working folders are gone; the checkpoint comes back from Postgres.
    shutil.rmtree(seeded.pipelines_dir)
    report = sync(CORE)
    calls = outcome(report, "calls")
    assert (calls.rows_loaded, calls.rows_written) == (0, 0)
    assert calls.checkpoint_before["gong__call"] == LATER.isoformat(timespec="microseconds")
    assert_in_step(seeded)
