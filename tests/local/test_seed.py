"""The synthetic workspace in a real emulator: shapes, keys, awkward cases and Fivetran-like changes."""

from __future__ import annotations

import datetime as dt

import pyarrow as pa
import pytest
from google.cloud import bigquery

from runtime.local.seed import (
    CASES,
    PRIMARY_KEYS,
    SOURCE_SCHEMAS,
    insert_rows,
    seed_workspace,
    select_tables,
    soft_delete,
    update_rows,
)
from runtime.local.synthetic import Plan, table_chunks

CALLS = 40
STAGES = {"Prospecting", "Qualification", "Needs Analysis", "Proposal", "Negotiation", "Closed Won", "Closed Lost"}
LATER = dt.datetime(2026, 3, 1, 12, 0, 0, 654321, tzinfo=dt.UTC)


@pytest.fixture(scope="module")
def seeded(emu, bq) -> dict[str, int]:
    return seed_workspace(bq, project=emu.project, calls=CALLS)


def rows(bq: bigquery.Client, sql: str, **params: object) -> list[dict]:
    """Query rows as dicts; `params` become query parameters (datetimes TIMESTAMP, else STRING)."""
    config = bigquery.QueryJobConfig(
        query_parameters=[
            bigquery.ScalarQueryParameter(k, "TIMESTAMP" if isinstance(v, dt.datetime) else "STRING", v)
            for k, v in params.items()
        ]
    )
    return [dict(r) for r in bq.query(sql, job_config=config).result()]


def one(bq: bigquery.Client, sql: str, **params: object) -> object:
    (row,) = rows(bq, sql, **params)
    (value,) = row.values()
    return value


G, SF = "gongio_ft", "salesforce"


# -- shape ---------------------------------------------------------------------------------


def test_row_counts_match_the_report(bq, seeded) -> None:
    assert set(seeded) == {f"{d}.{t}" for d, t in SOURCE_SCHEMAS}
    for label, count in seeded.items():
        connector, table = label.split(".")
        dataset = G if connector == "gong" else SF
        assert one(bq, f"SELECT count(*) FROM `{dataset}.{table}`") == count, label
        assert count > 0
    assert seeded["gong.call"] == CALLS + 1  # the shared call id appears in both workspaces


def test_tables_have_the_declared_schema_and_system_columns(emu, bq, seeded) -> None:
    for (connector, table), fields in SOURCE_SCHEMAS.items():
        dataset = G if connector == "gong" else SF
        got = [(f.name, f.field_type) for f in bq.get_table(f"{emu.project}.{dataset}.{table}").schema]
        assert got == [(f.name, f.field_type) for f in fields]
        assert got[-2:] == [("_fivetran_synced", "TIMESTAMP"), ("_fivetran_deleted", "BOOL")]
        assert set(PRIMARY_KEYS[(connector, table)]) <= {name for name, _ in got}


def test_primary_keys_are_unique(bq, seeded) -> None:
    for (connector, table), key in PRIMARY_KEYS.items():
        dataset = G if connector == "gong" else SF
        columns = ", ".join(f"`{c}`" for c in key)
        dupes = rows(bq, f"SELECT {columns}, count(*) AS n FROM `{dataset}.{table}` GROUP BY {columns} HAVING n > 1")
        assert dupes == [], (table, dupes)


def test_composite_keys_share_a_call_id_across_workspaces(bq, seeded) -> None:
    spaces = rows(bq, f"SELECT workspace_id FROM `{G}.call` WHERE id = @id ORDER BY 1", id=CASES.shared_call_id)
    assert [r["workspace_id"] for r in spaces] == sorted(CASES.workspace_ids)
    per_space = rows(
        bq,
        f"SELECT workspace_id, count(*) AS n FROM `{G}.transcript` WHERE call_id = @id GROUP BY 1",
        id=CASES.shared_call_id,
    )
    assert len(per_space) == 2  # the same (call_id, index) in two workspaces


def test_timestamps_keep_microseconds_end_to_end(emu, bq, seeded) -> None:
    expected = pa.concat_tables(table_chunks(("gong", "call"), Plan(CALLS, 0))).select(
        ["id", "workspace_id", "started", "_fivetran_synced"]
    )
    want = {(r["id"], r["workspace_id"], r["started"], r["_fivetran_synced"]) for r in expected.to_pylist()}
    got = {
        (r["id"], r["workspace_id"], r["started"], r["_fivetran_synced"])
        for r in rows(bq, f"SELECT id, workspace_id, started, _fivetran_synced FROM `{G}.call`")
    }
    assert got == want
    assert any(stamp.microsecond % 1000 for *_, stamp in got)  # sub-millisecond parts really exist


def test_fivetran_batches_and_soft_deletes(bq, seeded) -> None:
    per_stamp = f"SELECT count(*) AS n FROM `{G}.transcript` GROUP BY _fivetran_synced"
    biggest_batch = one(bq, f"SELECT max(n) FROM ({per_stamp})")
    assert biggest_batch >= 10  # many rows share one _fivetran_synced
    for table in ("call", "transcript", "call_speaker", "users", "email", "call_context_integration"):
        assert one(bq, f"SELECT countif(_fivetran_deleted) FROM `{G}.{table}`") >= 1, table
    deleted = rows(bq, f"SELECT _fivetran_deleted AS d FROM `{G}.call` WHERE id = @id AND workspace_id = @ws",
                   id=CASES.deleted_call[0], ws=CASES.deleted_call[1])  # fmt: skip
    assert deleted == [{"d": True}]


def test_users_speakers_and_participants(bq, seeded) -> None:
    domains = {r["d"] for r in rows(bq, f"SELECT DISTINCT split(email_address, '@')[1] AS d FROM `{G}.users`")}
    assert CASES.internal_domain in domains and len(domains) > 1
    orphan = rows(bq, f"SELECT call_id FROM `{G}.call_speaker` WHERE user_id = @u", u=CASES.orphan_speaker_user_id)
    assert orphan == [{"call_id": CASES.orphan_speaker_call_id}]
    assert one(bq, f"SELECT count(*) FROM `{G}.users` WHERE id = @u", u=CASES.orphan_speaker_user_id) == 0
    # Every transcript speaker is a speaker of that call.
    strays = one(
        bq,
        f"SELECT count(*) FROM `{G}.transcript` t LEFT JOIN `{G}.call_speaker` s "
        "ON s.id = t.speaker_id AND s.call_id = t.call_id WHERE s.id IS NULL",
    )
    assert strays == 0
    methods = one(bq, f"SELECT methods FROM `{G}.call_participant` LIMIT 1")
    assert isinstance(methods, list)


def test_transcript_sentences_are_json_arrays(bq, seeded) -> None:
    for r in rows(bq, f"SELECT sentence FROM `{G}.transcript`"):
        sentences = r["sentence"]
        assert isinstance(sentences, list) and 1 <= len(sentences) <= 3
        assert all(set(s) == {"start", "end", "text"} and s["start"] < s["end"] for s in sentences)


def test_email_cases(bq, seeded) -> None:
    email = f"`{G}.email`"
    senders = f"SELECT count(*) FROM `{G}.email_sender` WHERE email_id = @e"
    recipients = f"SELECT count(*) FROM `{G}.email_recipient` WHERE email_id = @e"
    assert one(bq, senders, e=CASES.email_without_sender) == 0
    assert one(bq, recipients, e=CASES.email_three_recipients) == 3
    assert one(bq, recipients, e=CASES.email_no_recipients) == 0
    assert one(bq, f"SELECT length(body) FROM {email} WHERE id = @e", e=CASES.email_long_body) == 2000
    by_address = f"SELECT email_id FROM `{G}.email_recipient` WHERE email_address = @a"
    malformed = rows(bq, by_address, a=CASES.malformed_address)
    assert malformed == [{"email_id": CASES.email_malformed_address}]
    assert one(bq, f"SELECT sent_at FROM {email} WHERE id = @e", e=CASES.email_null_sent_at) is None
    assert one(bq, f"SELECT sent_at FROM {email} WHERE id = @e", e=CASES.email_unparseable_sent_at) == "yesterday"
    assert one(bq, f"SELECT subject FROM {email} WHERE id IS NULL") == CASES.null_id_email_subject
    assert one(bq, f"SELECT _fivetran_deleted FROM {email} WHERE id = @e", e=CASES.email_deleted) is True
    # Parseable sent_at values are ISO text with microseconds.
    sample = one(bq, f"SELECT sent_at FROM {email} WHERE id = @e", e=CASES.email_with_opportunity)
    assert dt.datetime.fromisoformat(sample).tzinfo is not None
    linked = one(
        bq,
        f"SELECT count(*) FROM {email} e JOIN `{SF}.opportunity` o ON o.id = e.opportunity_id",
    )
    assert linked >= 1
    headers = one(bq, f"SELECT headers FROM {email} WHERE id = @e", e=CASES.email_with_opportunity)
    assert "Message-ID" in headers


def test_opportunity_cases(bq, seeded) -> None:
    opp = f"`{SF}.opportunity`"
    assert one(bq, f"SELECT count(*) FROM `{SF}.account` WHERE id = (SELECT account_id FROM {opp} WHERE id = @o)",
               o=CASES.opportunity_missing_account) == 0  # fmt: skip
    amount = one(bq, f"SELECT amount FROM {opp} WHERE id = @o", o=CASES.opportunity_nan_amount)
    assert amount != amount  # NaN
    assert one(bq, f"SELECT is_deleted FROM {opp} WHERE id = @o", o=CASES.opportunity_is_deleted) is True
    assert one(bq, f"SELECT _fivetran_deleted FROM {opp} WHERE id = @o", o=CASES.opportunity_fivetran_deleted) is True
    assert one(bq, f"SELECT name FROM {opp} WHERE id = @o", o=CASES.opportunity_null_name) is None
    assert one(bq, f"SELECT count(*) FROM `{SF}.user` WHERE id = (SELECT owner_id FROM {opp} WHERE id = @o)",
               o=CASES.opportunity_unknown_owner) == 0  # fmt: skip
    assert {r["s"] for r in rows(bq, f"SELECT DISTINCT stage_name AS s FROM {opp}")} <= STAGES
    # The Gong fallback table holds the same opportunities.
    assert one(bq, f"SELECT count(*) FROM `{G}.opportunity`") == one(bq, f"SELECT count(*) FROM {opp}")


def test_call_context_links(bq, seeded) -> None:
    cci = f"`{G}.call_context_integration`"
    types_ = {r["t"] for r in rows(bq, f"SELECT DISTINCT object_type AS t FROM {cci}")}
    assert types_ == {"Opportunity", "Account"}
    dangling = one(
        bq,
        f"SELECT count(*) FROM {cci} c LEFT JOIN `{SF}.opportunity` o ON o.id = c.object_id "
        "WHERE c.object_type = 'Opportunity' AND o.id IS NULL",
    )
    assert dangling == 0
    two = one(bq, f"SELECT count(*) FROM {cci} WHERE call_id = @c AND object_type = 'Opportunity'",
              c=CASES.call_with_two_opportunities)  # fmt: skip
    assert two == 2
    deleted = f"SELECT logical_or(_fivetran_deleted) FROM {cci} WHERE call_id = @c AND object_type = 'Opportunity'"
    gone = one(bq, deleted, c=CASES.call_with_deleted_link)
    assert gone is True


# -- determinism and subsets -------------------------------------------------------------------


def test_same_seed_same_rows_other_seed_other_rows() -> None:
    def data(seed: int, chunk: int) -> list[dict]:
        return pa.concat_tables(table_chunks(("gong", "call_speaker"), Plan(CALLS, seed), chunk)).to_pylist()

    assert data(0, 50_000) == data(0, 50_000)
    assert sorted(map(str, data(0, 7))) == sorted(map(str, data(0, 50_000)))  # chunk size does not matter
    assert data(0, 50_000) != data(1, 50_000)


def test_subset_without_salesforce_dataset(emu, bq) -> None:
    counts = seed_workspace(
        bq, project=emu.project, gong_dataset="subset_gong", salesforce_dataset="subset_sf", calls=12,
        tables=["gong.call", ("gong", "users"), "email"],
    )  # fmt: skip
    assert set(counts) == {"gong.call", "gong.users", "gong.email"}
    names = {t.table_id for t in bq.list_tables(f"{emu.project}.subset_gong")}
    assert names == {"call", "users", "email"}
    assert "subset_sf" not in {d.dataset_id for d in bq.list_datasets()}
    # Seeding again resets instead of appending.
    again = seed_workspace(bq, project=emu.project, gong_dataset="subset_gong", calls=12, tables=["gong.call"])
    assert one(bq, "SELECT count(*) FROM `subset_gong.call`") == again["gong.call"] == counts["gong.call"]


def test_table_selection_rejects_ambiguity() -> None:
    with pytest.raises(ValueError, match="ambiguous"):
        select_tables(["opportunity"])
    assert select_tables(["salesforce.opportunity"]) == [("salesforce", "opportunity")]
    with pytest.raises(ValueError):
        seed_workspace(None, project="p", calls=3)  # type: ignore[arg-type]


# -- mutations -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def mutable(emu, bq) -> str:
    """A separate copy of the workspace for the tests that change rows."""
    seed_workspace(bq, project=emu.project, gong_dataset="mut_gong", salesforce_dataset="mut_sf", calls=CALLS)
    return "mut_gong"


def test_insert_fills_system_columns(emu, bq, mutable) -> None:
    table = f"{mutable}.email_recipient"
    before = one(bq, f"SELECT count(*) FROM `{table}`")
    added = insert_rows(bq, table, [{"email_id": CASES.email_no_recipients, "email_address": "new@example.org"}],
                        synced_at=LATER)  # fmt: skip
    assert added == 1
    assert one(bq, f"SELECT count(*) FROM `{table}`") == before + 1
    row = rows(bq, f"SELECT * FROM `{table}` WHERE email_id = @e", e=CASES.email_no_recipients)
    assert row == [{"email_id": CASES.email_no_recipients, "email_address": "new@example.org",
                    "_fivetran_synced": LATER, "_fivetran_deleted": False}]  # fmt: skip
    # JSON values may be given as Python objects; the default stamp is "now".
    new_call = {"id": "9000000000000000001", "workspace_id": CASES.workspace_ids[0], "custom_data": {"a": [1, 2]}}
    insert_rows(bq, f"{emu.project}.{mutable}.call", [new_call])
    new = rows(bq, f"SELECT custom_data, _fivetran_synced FROM `{mutable}.call` WHERE id = '9000000000000000001'")
    assert new[0]["custom_data"] == {"a": [1, 2]} and new[0]["_fivetran_synced"] > LATER.replace(year=2025)


def test_update_touches_only_the_keyed_rows(bq, mutable) -> None:
    table = f"{mutable}.call"
    ws_a, ws_b = CASES.workspace_ids
    changed = update_rows(bq, table, {"id": CASES.shared_call_id, "workspace_id": ws_b}, {"title": "Renamed"}, LATER)
    assert changed == 1
    got = rows(bq, f"SELECT workspace_id, title, _fivetran_synced FROM `{table}` WHERE id = @i ORDER BY workspace_id",
               i=CASES.shared_call_id)  # fmt: skip
    by_space = {r["workspace_id"]: r for r in got}
    assert by_space[ws_b]["title"] == "Renamed" and by_space[ws_b]["_fivetran_synced"] == LATER
    assert by_space[ws_a]["title"] != "Renamed" and by_space[ws_a]["_fivetran_synced"] != LATER
    # Several keys at once, JSON and NULL values, a key matching NULL.
    keys = [{"id": str(7_300_000_000_000_000_000 + n), "workspace_id": ws_a} for n in (10, 11, 12)]
    keys = [k for k in keys if one(bq, f"SELECT count(*) FROM `{table}` WHERE id = @i AND workspace_id = @w",
                                   i=k["id"], w=k["workspace_id"])]  # fmt: skip
    assert update_rows(bq, table, keys, {"custom_data": {"x": 1}, "brief": None}, LATER) == len(keys) > 0
    after = rows(bq, f"SELECT custom_data, brief FROM `{table}` WHERE _fivetran_synced = @t AND workspace_id = @w",
                 t=LATER, w=ws_a)  # fmt: skip
    assert len(after) == len(keys) and all(r["custom_data"] == {"x": 1} and r["brief"] is None for r in after)
    assert update_rows(bq, f"{mutable}.email", {"id": None}, {"subject": "still no id"}, LATER) == 1


def test_soft_delete_flags_and_restamps(bq, mutable) -> None:
    table = f"{mutable}.email"
    assert soft_delete(bq, table, [{"id": CASES.email_long_body}, {"id": CASES.email_three_recipients}], LATER) == 2
    got = rows(bq, f"SELECT id, _fivetran_deleted AS d, _fivetran_synced AS s FROM `{table}` WHERE id IN (@a, @b)",
               a=CASES.email_long_body, b=CASES.email_three_recipients)  # fmt: skip
    assert all(r["d"] is True and r["s"] == LATER for r in got) and len(got) == 2


def test_mutations_reject_unsafe_names(bq, mutable) -> None:
    with pytest.raises(ValueError):
        update_rows(bq, f"{mutable}.email", {"id": "x"}, {"subject`; DROP TABLE x; --": "y"}, LATER)
    with pytest.raises(ValueError):
        update_rows(bq, f"{mutable}.email", {"id": "x"}, {"no_such_column": "y"}, LATER)
    with pytest.raises(ValueError):
        soft_delete(bq, "bad name.email", {"id": "x"}, LATER)
    with pytest.raises(ValueError):
        update_rows(bq, f"{mutable}.email", [{}], {"subject": "all rows"}, LATER)
    with pytest.raises(ValueError):
        insert_rows(bq, f"{mutable}.email", [{"nope": 1}])
    assert update_rows(bq, f"{mutable}.email", [], {"subject": "z"}, LATER) == 0
