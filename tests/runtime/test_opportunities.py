"""The `opportunities` and `call_opportunities` assets on real parts: Salesforce opportunity,
account and user tables (or Gong's fallback copy) and Gong's call links in the emulator, compared
with what lands in the application's tables (specs/opportunity-sync.md, APP_SCHEMA.md).

The app keys an opportunity by a uuid `id` (`gong_opportunity_id` is the Salesforce id) and a link
by the uuids of its call and opportunity rows: links are compared with BigQuery through
`calls.gong_call_id` and `opportunities.gong_opportunity_id`."""

from __future__ import annotations

import datetime as dt
import json
import logging
import math
from collections import Counter
from decimal import ROUND_HALF_UP, Decimal

import pytest

from runtime.local.seed import CASES, insert_rows, seed_workspace, soft_delete, update_rows
from tests.helpers import outcome, sync

LATER = dt.datetime(2026, 3, 1, 12, 0, 0, 654321, tzinfo=dt.UTC)
GONG_ONLY = ["gong.users", "gong.call", "gong.transcript", "gong.call_speaker", "gong.call_participant",
             "gong.call_context_integration", "gong.email", "gong.email_sender", "gong.email_recipient",
             "gong.opportunity"]  # fmt: skip
COLUMNS = ("name", "stage", "close_date", "amount", "account_name", "owner_email", "health_score")
CENT = Decimal("0.01")
#: amount is numeric(15,2) in the app: at most 13 digits before the point.
AMOUNT_LIMIT = Decimal(10) ** 13


@pytest.fixture
def seeded(env):
    seed_workspace(env.bq, project=env.emulator.project, gong_dataset=env.gong_dataset,
                   salesforce_dataset=env.salesforce_dataset, calls=40)
    return env


# -- what BigQuery holds ------------------------------------------------------------------------


def table(env, dataset: str, name: str) -> str:
    """Full table id; `dataset` is "gong" or "salesforce"."""
    ds = env.gong_dataset if dataset == "gong" else env.salesforce_dataset
    return f"{env.emulator.project}.{ds}.{name}"


def bq_table(env, dataset: str, name: str) -> list[dict]:
    return [dict(r) for r in env.bq.query(f"SELECT * FROM `{table(env, dataset, name)}`").result()]


def live(row: dict) -> bool:
    return not row.get("_fivetran_deleted") and not row.get("is_deleted")


def decimal(value: float | None) -> Decimal | None:
    return None if value is None or math.isnan(value) else Decimal(repr(value))


def cents(value: Decimal | None) -> Decimal | None:
    """A value as a numeric(p,2) column holds it: rounded half away from zero to 2 places."""
    return None if value is None else value.quantize(CENT, rounding=ROUND_HALF_UP)


def expected_amount(value: float | None) -> Decimal | None:
    amount = decimal(value)
    return cents(amount) if amount is not None and abs(amount) < AMOUNT_LIMIT else None


def expected_health(value: float | None) -> Decimal | None:
    score = decimal(value)
    return cents(score) if score is not None and 0 <= score <= 100 else None


def source_opportunities(env, dataset: str = "salesforce") -> list[dict]:
    return bq_table(env, dataset, "opportunity")


def expected_opportunities(env, dataset: str = "salesforce") -> dict[str, dict]:
    """Live, named opportunities joined with their account and owner, as the spec asks."""
    accounts = users = {}
    if dataset == "salesforce":
        accounts = {a["id"]: a for a in bq_table(env, "salesforce", "account") if live(a)}
        users = {u["id"]: u["email"] for u in bq_table(env, "salesforce", "user") if live(u)}
    expected = {}
    for o in source_opportunities(env, dataset):
        if not live(o) or o["id"] is None or o["name"] is None:
            continue
        account = accounts.get(o["account_id"])
        expected[o["id"]] = {
            "name": o["name"],
            "stage": o["stage_name"],
            "close_date": o["close_date"],
            "amount": expected_amount(o["amount"]),
            "account_name": account["name"] if account else None,
            "owner_email": users.get(o["owner_id"]),
            "health_score": expected_health(o["health_score"]),
            "account": account,
        }
    return expected


def loaded_opportunity_ids(env, dataset: str = "salesforce") -> set[str]:
    """Opportunities that have an app row: live, with an id and a name."""
    return {o["id"] for o in source_opportunities(env, dataset) if live(o) and o["id"] and o["name"] is not None}


def live_links(env) -> set[tuple[str, str]]:
    return {(r["call_id"], r["object_id"]) for r in bq_table(env, "gong", "call_context_integration")
            if r["object_type"] == "Opportunity" and live(r)}


def live_call_ids(env) -> set[str]:
    return {r["id"] for r in bq_table(env, "gong", "call") if live(r)}


# -- what Postgres holds ------------------------------------------------------------------------


def actual_opportunities(env) -> dict[str, dict]:
    """Salesforce id → the app row (with its uuid `id`)."""
    rows = env.rows("SELECT gong_opportunity_id, name, stage, close_date, amount, account_name, owner_email, "
                    "health_score, metadata, updated_at, id FROM opportunities")
    assert len(rows) == len({r[0] for r in rows}), "an opportunity appears twice"
    assert len(rows) == len({r[-1] for r in rows}), "two opportunities share a uuid"
    return {r[0]: dict(zip((*COLUMNS, "metadata", "updated_at", "id"), r[1:], strict=True)) for r in rows}


def columns_only(rows: dict[str, dict]) -> dict[str, dict]:
    return {k: {c: v[c] for c in COLUMNS} for k, v in rows.items()}


def assert_opportunities_in_step(env, dataset: str = "salesforce") -> dict[str, dict]:
    expected, actual = expected_opportunities(env, dataset), actual_opportunities(env)
    assert columns_only(actual) == columns_only(expected)
    for opportunity_id, want in expected.items():
        account = (actual[opportunity_id]["metadata"] or {}).get("account")
        if want["account"] is None:
            assert not account, opportunity_id
            continue
        for key in ("id", "name", "industry", "billing_country"):  # a NULL field may be left out
            assert account.get(key) == want["account"][key], (opportunity_id, key)
    return actual


def actual_links(env) -> set[tuple[str, str]]:
    """(Gong call id, Salesforce opportunity id) of every link, joined through the app rows' uuids."""
    rows = env.rows("SELECT c.gong_call_id, o.gong_opportunity_id FROM call_opportunities l "
                    "JOIN calls c ON c.id = l.call_id JOIN opportunities o ON o.id = l.opportunity_id")
    assert len(rows) == len(set(rows)), "a link appears twice"
    assert env.rows("SELECT count(*) FROM call_opportunities") == [(len(rows),)], "a link points at no app row"
    return set(rows)


def link_rows(env) -> dict[tuple[str, str], tuple]:
    """(Gong call id, Salesforce opportunity id) → (call uuid, opportunity uuid, created_at) of each link."""
    rows = env.rows("SELECT c.gong_call_id, o.gong_opportunity_id, l.call_id, l.opportunity_id, l.created_at "
                    "FROM call_opportunities l JOIN calls c ON c.id = l.call_id "
                    "JOIN opportunities o ON o.id = l.opportunity_id")
    return {(r[0], r[1]): r[2:] for r in rows}


def assert_links_in_step(env, dataset: str = "salesforce") -> set[tuple[str, str]]:
    """Every live link whose call and opportunity both have an app row, and nothing else.

    A link is two uuids of app rows: a link of a soft-deleted call, or to an opportunity that is
    deleted or was dead-lettered, has nothing to point at and is not there.
    """
    loaded = loaded_opportunity_ids(env, dataset)
    expected = {link for link in live_links(env) if link[0] in live_call_ids(env) and link[1] in loaded}
    actual = actual_links(env)
    assert actual - expected == set(), "links that should not be there"
    assert expected - actual == set(), "links that are missing"
    return actual


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
    found = set()
    for value in ((status["error_details"] or {}).get("checkpoints") or {}).values():
        try:
            found.add(dt.datetime.fromisoformat(value))
        except (TypeError, ValueError):
            pass
    assert found and status["last_sync_timestamp"] == min(found), status
    return found


def updated_at(env) -> dict[str, dt.datetime]:
    return dict(env.rows("SELECT gong_opportunity_id, updated_at FROM opportunities"))


def opportunity_ids(env) -> dict[str, str]:
    """Salesforce id → the app row's uuid."""
    return dict(env.rows("SELECT gong_opportunity_id, id FROM opportunities"))


def xmins(env) -> dict[str, str]:
    return dict(env.rows("SELECT gong_opportunity_id, xmin::text FROM opportunities"))


# -- tests --------------------------------------------------------------------------------------


def test_first_run_matches_salesforce_joined_with_account_and_owner(seeded):
    report = sync("+opportunities")
    assert report.status == "success", [o.error for o in report.outcomes]
    actual = assert_opportunities_in_step(seeded)
    assert len(actual) >= 10
    assert all(row["updated_at"] is not None for row in actual.values())
    status = sync_status(seeded, "opportunities")
    # The opportunity without a name went to dead letters instead of the app: the run is partial.
    assert (status["last_sync_status"], status["items_synced"], status["errors_count"]) == ("partial", len(actual), 1)
    assert status["error_details"]["dead_letters"] == 1 and status["error_details"]["error"] is None
    # The cursor is _fivetran_synced (it also moves on a soft delete): the newest landed one.
    newest = max(o["_fivetran_synced"] for o in source_opportunities(seeded) if o["id"] and o["name"])
    assert newest in checkpoint_times(seeded, "opportunities")


def test_awkward_opportunities_load_with_nulls_and_warnings(seeded):
    assert sync("+opportunities").status == "success"
    opportunities = actual_opportunities(seeded)

    nan = opportunities[CASES.opportunity_nan_amount]
    assert nan["amount"] is None
    assert any("amount" in w for w in nan["metadata"]["warnings"]), nan["metadata"]
    missing = opportunities[CASES.opportunity_missing_account]
    assert missing["account_name"] is None and missing["name"]
    assert opportunities[CASES.opportunity_unknown_owner]["owner_email"] is None
    for gone in (CASES.opportunity_is_deleted, CASES.opportunity_fivetran_deleted, CASES.opportunity_null_name):
        assert gone not in opportunities
    scores = [o["health_score"] for o in opportunities.values()]
    assert None in scores
    assert all(0 <= s <= 100 for s in scores if s is not None)
    amounts = [o["amount"] for o in opportunities.values() if o["amount"] is not None]
    assert {type(a) for a in amounts} == {Decimal}
    # numeric(15,2) and numeric(5,2): exact decimals with two places.
    assert {a.as_tuple().exponent for a in amounts} == {-2}
    assert {s.as_tuple().exponent for s in scores if s is not None} == {-2}


def test_an_opportunity_without_a_name_is_dead_lettered_once(seeded):
    report = sync("+opportunities")
    assert report.status == "success"
    assert outcome(report, "opportunities").rows_dead_lettered == 1
    status = sync_status(seeded, "opportunities")
    assert (status["last_sync_status"], status["errors_count"] >= 1) == ("partial", True)
    letters = seeded.rows('SELECT "row", errors, run_id FROM gong_sync.dead_letters WHERE asset = %s',
                          ("opportunities",))
    assert len(letters) == 1
    row, errors, run_id = letters[0]
    assert CASES.opportunity_null_name in json.dumps(row)
    assert "name" in json.dumps(errors)
    assert run_id == report.run_id

    ids, before = opportunity_ids(seeded), xmins(seeded)
    again = sync("+opportunities")
    assert again.status == "success"
    assert outcome(again, "opportunities").rows_written == 0
    assert seeded.rows("SELECT count(*) FROM gong_sync.dead_letters WHERE asset = 'opportunities'") == [(1,)]
    assert CASES.opportunity_null_name not in actual_opportunities(seeded)
    assert (opportunity_ids(seeded), xmins(seeded)) == (ids, before)  # nothing rewritten, every uuid kept


def test_call_opportunities_hold_one_row_per_live_link(seeded):
    report = sync("+call_opportunities")
    assert report.status == "success", [o.error for o in report.outcomes]
    order = [o.asset for o in report.outcomes]
    assert {"calls", "opportunities"} <= set(order) and order[-1] == "call_opportunities"
    links = assert_links_in_step(seeded)
    per_call = Counter(call for call, _ in links)
    assert per_call[CASES.call_with_deleted_link] == 0
    deleted = {CASES.opportunity_is_deleted, CASES.opportunity_fivetran_deleted}
    assert not {opp for _, opp in links} & deleted
    assert max(Counter(opp for _, opp in links).values()) > 1  # many calls per opportunity
    # Its second opportunity is the one without a name: dead-lettered, never landed, so the link
    # to it is not kept (a link always points at a row of `opportunities`).
    assert per_call[CASES.call_with_two_opportunities] == 1, sorted(links)[:3]
    assert (CASES.call_with_two_opportunities, CASES.opportunity_null_name) not in links
    # The soft-deleted call has no app row, so nothing links to it.
    assert CASES.deleted_call[0] not in per_call


def test_account_rename_and_owner_email_change_reach_untouched_opportunities(seeded):
    sync("+opportunities")
    first, ids, rows = updated_at(seeded), opportunity_ids(seeded), xmins(seeded)
    again = sync("+opportunities")
    assert outcome(again, "opportunities").rows_written == 0
    assert updated_at(seeded) == first  # nothing changed, nothing rewritten
    assert xmins(seeded) == rows

    source = [o for o in source_opportunities(seeded) if o["id"] in first]
    account_id = Counter(o["account_id"] for o in source if o["account_id"] != CASES.missing_account_id).most_common(1)[0][0]
    owner_id = next(o["owner_id"] for o in source
                    if o["account_id"] != account_id and o["owner_id"] != CASES.unknown_owner_id)
    touched = {o["id"] for o in source if o["account_id"] == account_id or o["owner_id"] == owner_id}
    update_rows(seeded.bq, table(seeded, "salesforce", "account"), {"id": account_id},
                {"name": "Renamed Holdings"}, LATER)
    update_rows(seeded.bq, table(seeded, "salesforce", "user"), {"id": owner_id},
                {"email": "moved.owner@prefect.io"}, LATER)

    report = sync("+opportunities")
    assert report.status == "success", [o.error for o in report.outcomes]
    opportunities = assert_opportunities_in_step(seeded)
    renamed = {k for k, o in opportunities.items() if o["account_name"] == "Renamed Holdings"}
    assert renamed == {o["id"] for o in source if o["account_id"] == account_id} != set()
    assert all(opportunities[k]["metadata"]["account"]["name"] == "Renamed Holdings" for k in renamed)
    moved = {k for k, o in opportunities.items() if o["owner_email"] == "moved.owner@prefect.io"}
    assert moved == {o["id"] for o in source if o["owner_id"] == owner_id} != set()
    after = updated_at(seeded)
    assert {k for k in after if after[k] != first[k]} == touched
    assert all(after[k] > first[k] for k in touched)
    assert outcome(report, "opportunities").rows_written == len(touched)
    # Updated in place: every opportunity keeps its uuid, and the untouched ones were not rewritten.
    assert opportunity_ids(seeded) == ids
    now = xmins(seeded)
    assert {k: now[k] for k in now if k not in touched} == {k: rows[k] for k in rows if k not in touched}


def test_incremental_run_inserts_updates_and_deletes_opportunities_with_their_links(seeded):
    sync("+call_opportunities")
    ids, links_before = opportunity_ids(seeded), link_rows(seeded)
    bq, opportunity_table = seeded.bq, table(seeded, "salesforce", "opportunity")
    links = actual_links(seeded)
    linked = [opp for opp, _ in Counter(o for _, o in links).most_common() if opp in actual_opportunities(seeded)]
    flagged, vanished, restaged = linked[0], linked[1], linked[2]
    others = sorted(link for link in links if link[1] in linked[2:])
    kept_link, dropped_link = others[0], others[-1]
    new_id = "006000000000000900"

    update_rows(bq, opportunity_table, {"id": flagged}, {"is_deleted": True, "last_modified_date": LATER}, LATER)
    soft_delete(bq, opportunity_table, {"id": vanished}, LATER)  # Fivetran's flag: the source columns stay as they were
    update_rows(bq, opportunity_table, {"id": restaged}, {"stage_name": "Closed Won", "last_modified_date": LATER}, LATER)
    insert_rows(bq, opportunity_table, [{
        "id": new_id, "name": "Globex - Renewal", "stage_name": "Prospecting", "close_date": dt.date(2026, 9, 30),
        "amount": 4200.5, "account_id": "001000000000000001", "owner_id": "005000000000000000",
        "last_modified_date": LATER, "is_deleted": False, "health_score": 71.5,
    }], synced_at=LATER)
    context = seeded.gong("call_context_integration")
    link_row = {"object_type": "Opportunity", "systems": "Salesforce", "timing": "Now"}
    insert_rows(bq, context, [
        {**link_row, "name": "Salesforce", "call_id": CASES.call_with_deleted_link, "object_id": new_id,
         "value": {"Id": new_id}},
        # The same link again, through a second integration: still one row downstream.
        {**link_row, "name": "Salesforce Sandbox", "call_id": kept_link[0], "object_id": kept_link[1],
         "value": {"Id": kept_link[1]}},
    ], synced_at=LATER)
    soft_delete(bq, context, {"call_id": dropped_link[0], "object_id": dropped_link[1]}, LATER)

    report = sync("+call_opportunities")
    assert report.status == "success", [o.error for o in report.outcomes]
    opportunities = actual_opportunities(seeded)
    links = actual_links(seeded)
    still_there = {
        "is_deleted": (flagged in opportunities, any(o == flagged for _, o in links)),
        "_fivetran_deleted": (vanished in opportunities, any(o == vanished for _, o in links)),
    }
    assert still_there == {"is_deleted": (False, False), "_fivetran_deleted": (False, False)}
    # Deleted with their links: the links go by the app's ON DELETE CASCADE, counted and reported.
    went = sum(1 for _, o in links_before if o in (flagged, vanished))
    deleted = outcome(report, "opportunities")
    assert (deleted.rows_deleted, deleted.cascade) == (2, {"public.call_opportunities": went})
    details = sync_status(seeded, "opportunities")["error_details"]
    assert (details["deleted"], details["cascade"]) == (2, {"public.call_opportunities": went})
    assert outcome(report, "call_opportunities").rows_deleted == 1  # the soft-deleted link row
    assert_opportunities_in_step(seeded)
    assert opportunities[restaged]["stage"] == "Closed Won"
    assert opportunities[new_id]["amount"] == Decimal("4200.50")
    assert opportunities[new_id]["health_score"] == Decimal("71.50")
    assert opportunities[new_id]["account_name"] == "Globex"
    assert_links_in_step(seeded)
    assert (CASES.call_with_deleted_link, new_id) in links
    assert kept_link in links
    assert dropped_link not in links
    # Ids are forever: surviving opportunities keep their uuid, the new one has its own, and a link
    # that stays is the same row (same uuids, same created_at), never deleted and inserted again.
    after = opportunity_ids(seeded)
    assert {k: v for k, v in after.items() if k != new_id} == {
        k: v for k, v in ids.items() if k not in (flagged, vanished)}
    assert after[new_id] not in ids.values()
    links_after = link_rows(seeded)
    assert kept_link in links_after and links_after[kept_link] == links_before[kept_link]
    assert {k: links_after[k] for k in links_before.keys() & links_after.keys()} == {
        k: links_before[k] for k in links_before.keys() & links_after.keys()}


def test_without_a_salesforce_dataset_opportunities_come_from_gong(env, caplog):
    seed_workspace(env.bq, project=env.emulator.project, gong_dataset=env.gong_dataset,
                   salesforce_dataset=env.salesforce_dataset, calls=40, tables=GONG_ONLY)
    caplog.set_level(logging.INFO)
    report = sync("+call_opportunities")
    assert report.status == "success", [o.error for o in report.outcomes]
    opportunities = assert_opportunities_in_step(env, dataset="gong")
    assert len(opportunities) >= 10
    assert_links_in_step(env, dataset="gong")
    # The fallback is said in the log, apart from the per-asset run lines.
    said = [m for m in (r.getMessage() for r in caplog.records) if not m.startswith(("asset.", "run.", "{"))]
    assert any(env.salesforce_dataset in m and f"{env.gong_dataset}.opportunity" in m for m in said), said


def test_indexes_and_keys_the_application_relies_on(seeded):
    assert sync("+call_opportunities").status == "success"
    indexes = dict(seeded.rows("SELECT indexname, indexdef FROM pg_indexes WHERE schemaname = 'public'"))
    assert "(owner_email, updated_at DESC)" in indexes["idx_opportunities_owner"]
    assert "(stage, close_date)" in indexes["idx_opportunities_stage"]
    assert "(health_score) WHERE (health_score IS NOT NULL)" in indexes["idx_opportunities_health"]
    assert "call_opportunities USING btree (call_id)" in indexes["idx_call_opportunities_call"]
    assert "call_opportunities USING btree (opportunity_id)" in indexes["idx_call_opportunities_opportunity"]
    constraints: dict[str, set[str]] = {}
    for name, definition in seeded.rows("""
            SELECT conrelid::regclass::text, pg_get_constraintdef(oid) FROM pg_constraint
            WHERE connamespace = 'public'::regnamespace AND contype IN ('p', 'u', 'f') AND conrelid::regclass::text IN
            ('opportunities', 'call_opportunities')"""):
        constraints.setdefault(name, set()).add(definition)
    assert constraints["opportunities"] == {"PRIMARY KEY (id)", "UNIQUE (gong_opportunity_id)"}
    assert constraints["call_opportunities"] == {
        "PRIMARY KEY (call_id, opportunity_id)",
        "FOREIGN KEY (call_id) REFERENCES calls(id) ON DELETE CASCADE",
        "FOREIGN KEY (opportunity_id) REFERENCES opportunities(id) ON DELETE CASCADE",
    }

    def types(relation: str) -> dict[str, str]:
        return dict(seeded.rows("SELECT attname, format_type(atttypid, atttypmod) FROM pg_attribute "
                                "WHERE attrelid = %s::regclass AND attnum > 0 AND NOT attisdropped", (relation,)))

    opportunity = types("public.opportunities")
    assert {c: opportunity[c] for c in ("id", "gong_opportunity_id", "close_date", "amount", "health_score",
                                        "metadata", "updated_at")} == {
        "id": "uuid", "gong_opportunity_id": "character varying", "close_date": "date", "amount": "numeric(15,2)",
        "health_score": "numeric(5,2)", "metadata": "jsonb", "updated_at": "timestamp with time zone",
    }
    link = types("public.call_opportunities")
    assert (link["call_id"], link["opportunity_id"]) == ("uuid", "uuid")
