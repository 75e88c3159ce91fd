"""`materialize --replay-dead-letters`: rows that now pass land and leave the table; the rest stay;
a row the source has since replaced is dropped, never put back over the newer version. A row the
build leaves out on purpose (the other workspace's copy of a call id) is a dead letter while, and
only while, the app does not hold it."""

from __future__ import annotations

import datetime as dt

import pytest

from runtime.cli import main
from runtime.local.seed import CASES, seed_workspace, update_rows
from tests.failures.harness import materialize
from tests.helpers import outcome, sync

LATER = dt.datetime(2026, 3, 1, 12, 0, 0, 654321, tzinfo=dt.UTC)
FIXED_SENT_AT = "2025-07-01T10:00:00Z"


@pytest.fixture
def seeded(env):
    seed_workspace(env.bq, project=env.emulator.project, gong_dataset=env.gong_dataset,
                   salesforce_dataset=env.salesforce_dataset, calls=40)
    return env


def letters(env, asset: str) -> list[tuple]:
    return env.rows('SELECT row ->> %s, errors FROM gong_sync.dead_letters WHERE asset = %s ORDER BY id',
                    ("id" if asset == "emails" else "name", asset))


def test_replay_lands_the_rows_that_now_pass_and_keeps_the_rest(seeded, subprocess_env):
    first = sync("+emails")
    assert outcome(first, "emails").rows_dead_lettered == 2
    # The app's sync_status says the run was partial: two rows wait in dead letters.
    assert seeded.rows("SELECT last_sync_status, errors_count, (error_details ->> 'dead_letters')::int FROM sync_status"
                       " WHERE entity_type = 'emails'") == [("partial", 2, 2)]
    assert seeded.rows("SELECT 1 FROM emails WHERE gong_email_id = %s", (CASES.email_null_sent_at,)) == []
    # The operator corrects the stored row; the one without an id cannot be corrected.
    [(subject,)] = seeded.rows(
        "UPDATE gong_sync.dead_letters SET row = jsonb_set(row, '{sent_at}', to_jsonb(%s::text))"
        " WHERE asset = 'emails' AND row ->> 'id' = %s RETURNING row ->> 'subject'", (FIXED_SENT_AT, CASES.email_null_sent_at))

    result = materialize("--replay-dead-letters", "--asset", "emails", environ=subprocess_env)

    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
    assert "emails: 1 replayed, 0 superseded by newer rows, 1 still failing; 1 destination row(s) written" in result.stdout
    assert "still failing: " in result.stdout and "(id: missing)" in result.stdout
    assert seeded.rows("SELECT subject, sent_at FROM emails WHERE gong_email_id = %s", (CASES.email_null_sent_at,)) == [
        (subject, dt.datetime(2025, 7, 1, 10, 0, tzinfo=dt.UTC))
    ]
    assert [row[0] for row in letters(seeded, "emails")] == [None]  # only the row without an id is left
    assert letters(seeded, "emails")[0][1] == [{"field": "id", "error": "missing"}]

    # The checkpoint did not move: the next run starts where the last one ended, rewrites nothing
    # and keeps the replayed row.
    again = sync("+emails")
    emails = outcome(again, "emails")
    assert emails.checkpoint_before == outcome(first, "emails").checkpoint_after
    assert emails.rows_written == 0
    assert seeded.rows("SELECT sent_at FROM emails WHERE gong_email_id = %s", (CASES.email_null_sent_at,)) == [
        (dt.datetime(2025, 7, 1, 10, 0, tzinfo=dt.UTC),)
    ]


def test_a_dead_letter_the_source_has_since_replaced_is_dropped_not_replayed(seeded, capsys):
    assert outcome(sync("opportunities"), "opportunities").rows_dead_lettered == 1
    # Salesforce sends a corrected version; it lands normally.
    update_rows(seeded.bq, f"{seeded.emulator.project}.{seeded.salesforce_dataset}.opportunity",
                {"id": CASES.opportunity_null_name}, {"name": "Corrected at the source", "last_modified_date": LATER}, LATER)
    assert sync("opportunities").status == "success"
    # A stale copy, made to pass, must not overwrite it.
    seeded.rows("UPDATE gong_sync.dead_letters SET row = jsonb_set(row, '{name}', '\"Stale copy\"')"
                " WHERE asset = 'opportunities' RETURNING 1")

    assert main(["--replay-dead-letters", "--asset", "opportunities"]) == 0

    assert "opportunities: 0 replayed, 1 superseded by newer rows, 0 still failing" in capsys.readouterr().out
    assert seeded.rows("SELECT name FROM opportunities WHERE gong_opportunity_id = %s", (CASES.opportunity_null_name,)) == [
        ("Corrected at the source",)
    ]
    assert letters(seeded, "opportunities") == []
    assert seeded.rows("SELECT name FROM gong_raw.salesforce__opportunity WHERE id = %s", (CASES.opportunity_null_name,)) == [
        ("Corrected at the source",)
    ]


def test_of_a_call_id_two_workspaces_hold_only_the_copy_the_app_does_not_keep_is_a_dead_letter(env):
    seed_workspace(env.bq, project=env.emulator.project, gong_dataset=env.gong_dataset, calls=40, tables=["gong.call"])
    shared = CASES.shared_call_id

    def kept() -> str:
        [(workspace,)] = env.rows("SELECT metadata ->> 'workspace_id' FROM calls WHERE gong_call_id = %s", (shared,))
        return workspace

    def call_letters() -> list[tuple]:
        return env.rows("SELECT row_key, errors ->> 0 FROM gong_sync.dead_letters WHERE asset = 'calls' ORDER BY 1")

    assert outcome(sync("calls"), "calls").rows_dead_lettered == 1
    newer = kept()
    (older,) = set(CASES.workspace_ids) - {newer}
    letters_now = call_letters()
    assert [key for key, _ in letters_now] == [f"{shared}:{older}"], letters_now
    assert f"is also in workspace {newer}, whose row is newer" in letters_now[0][1]

    # The older copy changes at the source and becomes the newer one: the app takes it, and the
    # dead letter follows the copy the app no longer keeps; the one it keeps leaves.
    update_rows(env.bq, env.gong("call"), {"id": shared, "workspace_id": older}, {"title": "Renamed"}, LATER)
    assert outcome(sync("calls"), "calls").rows_dead_lettered == 1
    assert kept() == older
    assert env.rows("SELECT title FROM calls WHERE gong_call_id = %s", (shared,)) == [("Renamed",)]
    letters_now = call_letters()
    assert [key for key, _ in letters_now] == [f"{shared}:{newer}"], letters_now
    assert f"is also in workspace {older}, whose row is newer" in letters_now[0][1]
