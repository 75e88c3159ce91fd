"""The `emails` asset on real parts: Gong email, sender and recipient tables in the emulator,
compared row for row with what lands in the application's `emails` table (specs/email-sync.md,
APP_SCHEMA.md).

The app keys an email by a uuid `id`; `gong_email_id` is the Gong id, and `opportunity_id` is the
uuid of the app's opportunity row, compared with BigQuery through `opportunities.gong_opportunity_id`."""

from __future__ import annotations

import datetime as dt
import json
import logging
from collections import defaultdict

import pytest

from runtime.local.seed import CASES, insert_rows, seed_workspace, soft_delete, update_rows
from tests.helpers import outcome, sync

LATER = dt.datetime(2026, 3, 1, 12, 0, 0, 654321, tzinfo=dt.UTC)
SNIPPET_CHARS = 500


@pytest.fixture
def seeded(env):
    seed_workspace(env.bq, project=env.emulator.project, gong_dataset=env.gong_dataset,
                   salesforce_dataset=env.salesforce_dataset, calls=40)
    return env


# -- what BigQuery holds ------------------------------------------------------------------------


def bq(env, query: str) -> list[dict]:
    """Rows of a BigQuery query as dicts; `{g}` is the Gong dataset, `{sf}` the Salesforce one."""
    rows = env.bq.query(query.format(g=f"`{env.emulator.project}.{env.gong_dataset}`",
                                     sf=f"`{env.emulator.project}.{env.salesforce_dataset}`")).result()
    return [dict(r) for r in rows]


def parse_sent_at(text: str | None) -> dt.datetime | None:
    try:
        return dt.datetime.fromisoformat(text)
    except (TypeError, ValueError):
        return None


def loaded_opportunity_ids(env) -> set[str]:
    """Salesforce opportunities that have an app row: live, with an id and a name."""
    return {o["id"] for o in bq(env, "SELECT id, name, is_deleted, _fivetran_deleted FROM {sf}.opportunity")
            if o["id"] is not None and o["name"] is not None
            and not o["is_deleted"] and not o["_fivetran_deleted"]}


def expected_emails(env) -> dict[str, dict]:
    """The destination rows the spec asks for, computed in Python from the three source tables.

    `opportunity` is the Gong/Salesforce id of the linked opportunity (the app stores its uuid).
    """
    emails = bq(env, "SELECT id, subject, sent_at, body, TO_JSON_STRING(headers) AS headers, opportunity_id, "
                     "_fivetran_deleted FROM {g}.email")
    senders = {r["email_id"]: r["email_address"]
               for r in bq(env, "SELECT * FROM {g}.email_sender") if not r["_fivetran_deleted"]}
    recipients: dict[str, list[str]] = defaultdict(list)
    for r in bq(env, "SELECT * FROM {g}.email_recipient"):
        if not r["_fivetran_deleted"]:
            recipients[r["email_id"]].append(r["email_address"])
    # The link is the app row of a live opportunity; one that is deleted, unknown or never loaded
    # (no name: dead-lettered) has no app row, and the link is NULL.
    live_opportunities = loaded_opportunity_ids(env)
    expected = {}
    for e in emails:
        if e["_fivetran_deleted"] or e["id"] is None or e["sent_at"] is None:
            continue
        expected[e["id"]] = {
            "subject": e["subject"],
            "sender_email": senders.get(e["id"]),
            "recipients": sorted(recipients[e["id"]]),
            "sent_at": parse_sent_at(e["sent_at"]),
            "body_snippet": e["body"][:SNIPPET_CHARS] if e["body"] is not None else None,
            "opportunity": e["opportunity_id"] if e["opportunity_id"] in live_opportunities else None,
            "body": e["body"],
            "headers": json.loads(e["headers"]) if e["headers"] else None,
        }
    return expected


def email_synced_max(env) -> dt.datetime:
    return bq(env, "SELECT max(_fivetran_synced) AS m FROM {g}.email")[0]["m"]


# -- what Postgres holds ------------------------------------------------------------------------

COLUMNS = ("subject", "sender_email", "recipients", "sent_at", "body_snippet", "opportunity")


def actual_emails(env) -> dict[str, dict]:
    """Gong email id → the app row, its opportunity given by Gong id (joined through its uuid)."""
    rows = env.rows("SELECT e.gong_email_id, e.subject, e.sender_email, e.recipients, e.sent_at, e.body_snippet, "
                    "o.gong_opportunity_id, e.metadata, e.id, e.opportunity_id, e.created_at "
                    "FROM emails e LEFT JOIN opportunities o ON o.id = e.opportunity_id")
    assert len(rows) == len({r[0] for r in rows}), "an email appears twice"
    assert len(rows) == len({r[8] for r in rows}), "two emails share a uuid"
    out = {}
    for r in rows:
        assert r[9] is None or r[6] is not None, f"email {r[0]} points at no opportunity row"
        out[r[0]] = dict(zip((*COLUMNS, "metadata", "id", "opportunity_uuid", "created_at"), r[1:], strict=True))
    return out


def columns_only(rows: dict[str, dict]) -> dict[str, dict]:
    return {k: {c: v[c] for c in COLUMNS} for k, v in rows.items()}


def assert_in_step(env) -> dict[str, dict]:
    """Every live, valid source email is one destination row with the spec's values."""
    expected, actual = expected_emails(env), actual_emails(env)
    assert columns_only(actual) == columns_only(expected)
    for email_id, want in expected.items():
        metadata = actual[email_id]["metadata"]
        assert metadata["body"] == want["body"], email_id
        assert metadata["headers"] == want["headers"], email_id
    return actual


def email_ids(env) -> dict[str, str]:
    """Gong email id → the app row's uuid."""
    return dict(env.rows("SELECT gong_email_id, id FROM emails"))


def sync_status(env, asset: str) -> dict:
    """The asset's row of the app's `sync_status`."""
    rows = env.rows("SELECT last_sync_timestamp, last_sync_status, items_synced, errors_count, error_details "
                    "FROM sync_status WHERE entity_type = %s", (asset,))
    assert len(rows) == 1, rows
    return dict(zip(("last_sync_timestamp", "last_sync_status", "items_synced", "errors_count", "error_details"),
                    rows[0], strict=True))


def checkpoint_times(env, asset: str) -> set[dt.datetime]:
    """Every timestamp among the asset's checkpoints (`sync_status.error_details.checkpoints`);
    `last_sync_timestamp`, the asset's checkpoint, is the earliest of them."""
    status = sync_status(env, asset)
    checkpoints = (status["error_details"] or {}).get("checkpoints") or {}
    values = checkpoints.values() if isinstance(checkpoints, dict) else []
    found = {t for t in (parse_sent_at(v) if isinstance(v, str) else None for v in values) if t}
    assert found and status["last_sync_timestamp"] == min(found), status
    return found


def dead_letters(env, asset: str) -> list[dict]:
    rows = env.rows('SELECT source_table, primary_key, "row", errors, run_id FROM gong_sync.dead_letters '
                    "WHERE asset = %s", (asset,))
    return [dict(zip(("source_table", "primary_key", "row", "errors", "run_id"), r, strict=True)) for r in rows]


def xmins(env) -> dict[str, str]:
    return dict(env.rows("SELECT gong_email_id, xmin::text FROM emails"))


# -- tests --------------------------------------------------------------------------------------


def test_first_run_loads_one_row_per_live_email_as_bigquery_has_it(seeded):
    report = sync("+emails")
    assert report.status == "success", [o.error for o in report.outcomes]
    actual = assert_in_step(seeded)
    assert len(actual) == len(expected_emails(seeded)) > 10
    links = [e["opportunity"] for e in actual.values()]
    assert None in links and any(links)  # both kinds are there, so the join is really compared
    status = sync_status(seeded, "emails")
    # Two source rows went to dead letters instead of the app: the run is partial.
    assert (status["last_sync_status"], status["items_synced"], status["errors_count"]) == ("partial", len(actual), 2)
    assert status["error_details"]["dead_letters"] == 2 and status["error_details"]["error"] is None
    assert email_synced_max(seeded) in checkpoint_times(seeded, "emails")


def test_awkward_emails_load_as_the_spec_says(seeded, caplog):
    caplog.set_level(logging.INFO)
    assert sync("+emails").status == "success"
    emails = actual_emails(seeded)

    assert emails[CASES.email_without_sender]["sender_email"] is None
    assert emails[CASES.email_no_recipients]["recipients"] == []
    three = emails[CASES.email_three_recipients]["recipients"]
    assert len(three) == 3 and three == sorted(three)

    long_body = emails[CASES.email_long_body]
    assert len(long_body["metadata"]["body"]) == 2000
    assert long_body["body_snippet"] == long_body["metadata"]["body"][:SNIPPET_CHARS]
    assert len(long_body["body_snippet"]) == SNIPPET_CHARS

    malformed = emails[CASES.email_malformed_address]
    assert CASES.malformed_address in malformed["recipients"]  # kept as it came
    assert any(CASES.malformed_address in w for w in malformed["metadata"]["warnings"]), malformed["metadata"]
    assert not emails[CASES.email_three_recipients]["metadata"].get("warnings")

    # "yesterday" cannot be parsed: the email is kept, its sent_at is NULL, and the log says so.
    assert emails[CASES.email_unparseable_sent_at]["sent_at"] is None
    assert any("sent_at" in r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING)

    assert CASES.email_deleted not in emails
    assert CASES.email_null_sent_at not in emails
    assert CASES.null_id_email_subject not in {e["subject"] for e in emails.values()}
    assert seeded.rows("SELECT count(*) FROM emails WHERE gong_email_id IS NULL OR id IS NULL") == [(0,)]


def test_rejected_emails_are_dead_lettered_once_and_counted_as_errors(seeded):
    report = sync("+emails")
    assert report.status == "success"
    assert outcome(report, "emails").rows_dead_lettered == 2
    status = sync_status(seeded, "emails")
    assert (status["last_sync_status"], status["errors_count"] >= 2) == ("partial", True)
    letters = dead_letters(seeded, "emails")
    assert len(letters) == 2
    assert {d["run_id"] for d in letters} == {report.run_id}
    no_id = [d for d in letters if CASES.null_id_email_subject in json.dumps(d["row"])]
    no_sent_at = [d for d in letters if CASES.email_null_sent_at in json.dumps(d["row"])]
    assert len(no_id) == 1 and len(no_sent_at) == 1, letters
    assert "sent_at" in json.dumps(no_sent_at[0]["errors"])
    assert "id" in json.dumps(no_id[0]["errors"])
    # The bookkeeping is the pipeline's own: nothing of it in the app's schema.
    assert seeded.rows("SELECT to_regclass('public.dead_letters') IS NULL") == [(True,)]

    # Runs that see the same rows again, even a full refresh, add no second copy, rewrite no row
    # and keep every uuid.
    before, ids = xmins(seeded), email_ids(seeded)
    again = sync("+emails")
    assert again.status == "success"
    assert outcome(again, "emails").rows_written == 0
    assert xmins(seeded) == before
    assert sync("emails", full_refresh=True).status == "success"
    assert len(dead_letters(seeded, "emails")) == 2
    assert_in_step(seeded)
    assert email_ids(seeded) == ids
    assert xmins(seeded) == before


def test_a_new_recipient_or_sender_row_alone_updates_its_email(seeded):
    sync("+emails")
    ids = email_ids(seeded)
    three = seeded.rows("SELECT recipients FROM emails WHERE gong_email_id = %s", (CASES.email_three_recipients,))[0][0]
    leaving_email, leaving = seeded.rows(
        "SELECT gong_email_id, recipients[1] FROM emails WHERE cardinality(recipients) = 2 "
        "AND gong_email_id NOT IN (%s, %s) ORDER BY gong_email_id LIMIT 1",
        (CASES.email_three_recipients, CASES.email_malformed_address))[0]
    bq = seeded.bq
    insert_rows(bq, seeded.gong("email_recipient"),
                [{"email_id": CASES.email_three_recipients, "email_address": "aaron.new@example.org"}], synced_at=LATER)
    insert_rows(bq, seeded.gong("email_sender"),
                [{"email_id": CASES.email_without_sender, "email_address": "late.sender@prefect.io"}], synced_at=LATER)
    soft_delete(bq, seeded.gong("email_recipient"), {"email_id": leaving_email, "email_address": leaving}, LATER)

    report = sync("+emails")
    assert report.status == "success"
    emails = assert_in_step(seeded)
    assert emails[CASES.email_three_recipients]["recipients"] == ["aaron.new@example.org", *three]
    assert emails[CASES.email_without_sender]["sender_email"] == "late.sender@prefect.io"
    assert leaving not in emails[leaving_email]["recipients"]
    assert len(emails[leaving_email]["recipients"]) == 1
    assert outcome(report, "emails").rows_written == 3
    assert email_ids(seeded) == ids  # updated in place: every email kept its uuid


def test_incremental_run_inserts_updates_and_deletes_emails(seeded):
    sync("+emails")
    ids = email_ids(seeded)
    bq = seeded.bq
    new_id = "8800000000000009999"
    new_opportunity = "006000000000000001"
    insert_rows(bq, seeded.gong("email"), [{
        "id": new_id, "subject": "Contract redlines", "sent_at": "2026-02-28T16:30:00.250001Z",
        "body": "Attached are the redlines.", "headers": {"Message-ID": "<new@mail.example.com>"},
        "opportunity_id": new_opportunity,
    }], synced_at=LATER)
    insert_rows(bq, seeded.gong("email_sender"), [{"email_id": new_id, "email_address": "ada.okafor0@prefect.io"}],
                synced_at=LATER)
    insert_rows(bq, seeded.gong("email_recipient"), [
        {"email_id": new_id, "email_address": "zoe.buyer@globex.com"},
        {"email_id": new_id, "email_address": "max.legal@globex.com"},
    ], synced_at=LATER)
    update_rows(bq, seeded.gong("email"), {"id": CASES.email_with_opportunity}, {"subject": "Re: Pricing proposal"}, LATER)
    gone = CASES.email_three_recipients
    soft_delete(bq, seeded.gong("email"), {"id": gone}, LATER)

    report = sync("+emails")
    assert report.status == "success", [o.error for o in report.outcomes]
    emails = assert_in_step(seeded)
    assert emails[new_id]["recipients"] == ["max.legal@globex.com", "zoe.buyer@globex.com"]
    assert emails[new_id]["sent_at"] == dt.datetime(2026, 2, 28, 16, 30, 0, 250001, tzinfo=dt.UTC)
    assert emails[new_id]["sender_email"] == "ada.okafor0@prefect.io"
    assert emails[new_id]["opportunity"] == new_opportunity
    assert seeded.rows("SELECT id FROM opportunities WHERE gong_opportunity_id = %s", (new_opportunity,)) == [
        (emails[new_id]["opportunity_uuid"],)]
    assert emails[CASES.email_with_opportunity]["subject"] == "Re: Pricing proposal"
    assert gone not in emails
    assert outcome(report, "emails").rows_deleted == 1
    assert sync_status(seeded, "emails")["error_details"]["deleted"] == 1
    assert LATER in checkpoint_times(seeded, "emails")
    # Ids are forever: the updated email and every untouched one keep their uuid; the new one has its own.
    after = email_ids(seeded)
    assert {k: v for k, v in after.items() if k != new_id} == {k: v for k, v in ids.items() if k != gone}
    assert after[new_id] not in ids.values()


def test_a_deleted_opportunity_unlinks_its_emails_which_keep_their_rows(seeded):
    """An opportunity deleted in Salesforce leaves its emails in place, linked to nothing: the
    emails still live in the source, so their rows (uuid, created_at) stay; only the link goes
    (APP_SCHEMA.md: ids are forever, never delete-and-reinsert)."""
    sync("+emails")
    before = actual_emails(seeded)
    counts: dict[str, int] = defaultdict(int)
    for e in before.values():
        if e["opportunity"]:
            counts[e["opportunity"]] += 1
    opportunity = max(sorted(counts), key=counts.get)
    its_emails = {k for k, e in before.items() if e["opportunity"] == opportunity}
    # One of them as an earlier importer left it, with a random uuid: adopted, it keeps that uuid.
    adopted = min(its_emails)
    seeded.rows("UPDATE emails SET id = gen_random_uuid() WHERE gong_email_id = %s RETURNING 1", (adopted,))
    before = actual_emails(seeded)
    soft_delete(seeded.bq, f"{seeded.emulator.project}.{seeded.salesforce_dataset}.opportunity", {"id": opportunity},
                LATER)

    report = sync("+emails")
    assert report.status == "success", [o.error for o in report.outcomes]
    assert outcome(report, "opportunities").rows_deleted == 1
    assert "public.emails" not in outcome(report, "opportunities").cascade
    assert outcome(report, "emails").rows_deleted == 0
    after = assert_in_step(seeded)
    assert after.keys() == before.keys()
    for key in its_emails:
        assert after[key]["opportunity"] is None and after[key]["opportunity_uuid"] is None, key
        assert (after[key]["id"], after[key]["created_at"]) == (before[key]["id"], before[key]["created_at"]), key
    assert {k: v["id"] for k, v in after.items()} == {k: v["id"] for k, v in before.items()}


def test_a_missing_source_table_fails_only_emails_and_names_the_table(seeded):
    seeded.bq.delete_table(seeded.gong("email_recipient"))
    report = sync()
    assert report.status == "failed"
    emails = outcome(report, "emails")
    assert emails.status == "failed"
    assert f"{seeded.gong_dataset}.email_recipient" in emails.error
    others = {o.asset: o.status for o in report.outcomes if o.asset != "emails"}
    assert {"calls", "opportunities", "call_opportunities"} <= others.keys()
    assert set(others.values()) == {"success"}, others
    assert seeded.rows("SELECT count(*) > 0 FROM opportunities") == [(True,)]
    status = sync_status(seeded, "emails")
    assert status["last_sync_status"] == "failed" and status["errors_count"] >= 1
    assert "email_recipient" in status["error_details"]["error"]


def test_timeline_indexes_serve_the_opportunity_timeline(seeded):
    assert sync("+emails").status == "success"
    indexes = dict(seeded.rows("SELECT indexname, indexdef FROM pg_indexes "
                               "WHERE schemaname = 'public' AND tablename = 'emails'"))
    assert "(opportunity_id, sent_at DESC)" in indexes["idx_emails_opportunity"]
    assert "(sent_at DESC)" in indexes["idx_emails_sent_at"]
    constraints = {r[0] for r in seeded.rows(
        "SELECT pg_get_constraintdef(oid) FROM pg_constraint "
        "WHERE conrelid = 'public.emails'::regclass AND contype IN ('p', 'u', 'f')")}
    assert constraints == {
        "PRIMARY KEY (id)",
        "UNIQUE (gong_email_id)",
        "FOREIGN KEY (opportunity_id) REFERENCES opportunities(id) ON DELETE CASCADE",
    }
    types = dict(seeded.rows("SELECT attname, format_type(atttypid, atttypmod) FROM pg_attribute "
                             "WHERE attrelid = 'public.emails'::regclass AND attnum > 0 AND NOT attisdropped"))
    assert (types["id"], types["opportunity_id"], types["recipients"], types["sent_at"], types["metadata"]) == (
        "uuid", "uuid", "character varying[]", "timestamp with time zone", "jsonb")

    opportunity = bq(seeded, "SELECT opportunity_id FROM {g}.email WHERE id = '%s'" % CASES.email_with_opportunity)
    opportunity_id = opportunity[0]["opportunity_id"]
    ((opportunity_uuid,),) = seeded.rows("SELECT id FROM opportunities WHERE gong_opportunity_id = %s",
                                         (opportunity_id,))
    timeline = "SELECT gong_email_id FROM emails WHERE opportunity_id = %s ORDER BY sent_at DESC LIMIT 20"
    with seeded.connect() as conn:
        conn.execute("SET enable_seqscan = off")
        plan = "\n".join(r[0] for r in conn.execute("EXPLAIN " + timeline, (opportunity_uuid,)).fetchall())
        shown = [r[0] for r in conn.execute(timeline, (opportunity_uuid,)).fetchall()]
    assert "idx_emails_opportunity" in plan, plan
    # Postgres puts NULL first in a DESC order.
    linked = {k: v["sent_at"] for k, v in expected_emails(seeded).items() if v["opportunity"] == opportunity_id}
    expected = sorted(linked, key=lambda k: (linked[k] is None, linked[k] or dt.datetime.min.replace(tzinfo=dt.UTC)),
                      reverse=True)
    assert CASES.email_with_opportunity in shown
    assert shown == expected[:20]
