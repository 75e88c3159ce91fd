"""The heart of the pipeline, on real parts: the app's tables filled in full, then kept in step
incrementally, in place, with ids that never change; selections and failures."""

from __future__ import annotations

import datetime as dt
import json
import re
from decimal import ROUND_HALF_UP, Decimal

import pytest

from runtime.local.seed import CASES, insert_rows, seed_workspace, soft_delete, update_rows
from tests.helpers import outcome, sync

LATER = dt.datetime(2026, 3, 1, 12, 0, 0, 654321, tzinfo=dt.UTC)
GONG_TABLES = ["gong.users", "gong.call", "gong.transcript", "gong.call_speaker", "gong.call_participant"]
#: The core assets, whose source tables GONG_TABLES seeds.
CORE = "users,calls,transcripts,speakers"


@pytest.fixture
def seeded(env):
    seed_workspace(env.bq, project=env.emulator.project, gong_dataset=env.gong_dataset, calls=40, tables=GONG_TABLES)
    return env


def source(env, table: str) -> list[dict]:
    """Every row of a Gong source table, as BigQuery holds it."""
    return [dict(r) for r in env.bq.query(f"SELECT * FROM `{env.gong(table)}`").result()]


def live(rows: list[dict]) -> list[dict]:
    return [r for r in rows if not r.get("_fivetran_deleted")]


def winning_calls(env) -> dict[str, dict]:
    """Gong id → the live call row the app keeps: the latest by _fivetran_synced per id."""
    best: dict[str, dict] = {}
    for r in sorted(live(source(env, "call")), key=lambda r: (-r["_fivetran_synced"].timestamp(), r["workspace_id"])):
        best.setdefault(r["id"], r)
    return best


def expected_calls(env) -> set[tuple]:
    return {
        (gid, r["title"], r["scheduled"].replace(tzinfo=None) if r["scheduled"] else None, r["duration"], r["purpose"],
         r["url"])
        for gid, r in winning_calls(env).items()
    }


def actual_calls(env) -> set[tuple]:
    return set(env.rows("SELECT gong_call_id, title, scheduled_at, duration_seconds, call_type, metadata ->> 'gong_url'"
                        " FROM calls"))


def name_from_email(email: str | None) -> str | None:
    if not email or email.find("@") < 1:
        return None
    return re.sub(r"[._+-]+", " ", email.split("@")[0]).strip().title() or None


def half_up(value: float | None) -> int | None:
    """Rounded half away from zero, as the pipeline rounds (Python's round() goes to even)."""
    if value is None:
        return None
    return int(Decimal(repr(value)).quantize(Decimal(1), rounding=ROUND_HALF_UP))


def expected_speakers(env) -> set[tuple]:
    """(gong call id, name, email, company side, talk seconds), derived in Python from the sources."""
    users = {u["id"]: u for u in live(source(env, "users"))}
    participants = {}
    for p in sorted(live(source(env, "call_participant")), key=lambda p: p["id"]):
        participants.setdefault((p["call_id"], p["speaker_id"]), p)
    calls = winning_calls(env)
    out = set()
    for s in live(source(env, "call_speaker")):
        if s["call_id"] not in calls:
            continue
        u, p = users.get(s["user_id"], {}), participants.get((s["call_id"], s["id"]), {})
        email = u.get("email_address") or p.get("email_address") or None
        full = " ".join(x for x in (u.get("first_name"), u.get("last_name")) if x)
        name = full or p.get("name") or name_from_email(email) or f"Speaker {s['id']}"
        side = bool(email) and email.split("@")[-1].lower() == CASES.internal_domain
        out.add((s["call_id"], name, email, side, half_up(s["talk_time"])))
    return out


def actual_speakers(env) -> set[tuple]:
    return set(env.rows("SELECT c.gong_call_id, s.name, s.email, s.company_side, s.talk_time_seconds"
                        " FROM speakers s JOIN calls c ON c.id = s.call_id"))


def expected_transcripts(env) -> set[tuple]:
    calls = winning_calls(env)
    out = set()
    for t in live(source(env, "transcript")):
        if t["call_id"] in calls and calls[t["call_id"]]["workspace_id"] == t["workspace_id"]:
            sentences = json.loads(t["sentence"]) if isinstance(t["sentence"], str) else t["sentence"]
            out.add((t["call_id"], t["index"], " ".join(s["text"] for s in sentences), sentences[0]["start"]))
    return out


def actual_transcripts(env) -> set[tuple]:
    return set(env.rows("SELECT c.gong_call_id, t.sequence_number, t.text, t.start_time_ms"
                        " FROM transcripts t JOIN calls c ON c.id = t.call_id"))


def assert_in_step(env) -> None:
    assert actual_calls(env) == expected_calls(env)
    assert actual_speakers(env) == expected_speakers(env)
    assert actual_transcripts(env) == expected_transcripts(env)


def ids(env, table: str, key: str) -> dict:
    return dict(env.rows(f"SELECT {key}, id FROM {table}"))  # noqa: S608 - test-local constants


def test_first_run_fills_the_app_tables_from_every_live_row(seeded, capfd):
    report = sync(CORE)
    assert report.status == "success", [o.error for o in report.outcomes]
    assert {o.asset for o in report.outcomes} == {"users", "calls", "transcripts", "speakers"}
    assert_in_step(seeded)
    # One call id in two workspaces: the app keys calls by Gong id; the older copy is a dead letter.
    assert len(seeded.rows("SELECT 1 FROM calls WHERE gong_call_id = %s", (CASES.shared_call_id,))) == 1
    reason = seeded.rows("SELECT errors ->> 0 FROM gong_sync.dead_letters WHERE asset = 'calls'")
    assert len(reason) == 1 and "is also in workspace" in reason[0][0]
    assert outcome(report, "calls").rows_dead_lettered == 1
    # Soft-deleted source rows never reach the app.
    assert seeded.rows("SELECT 1 FROM calls WHERE gong_call_id = %s", (CASES.deleted_call[0],)) == []
    # Derived values: the date, the first write, the company-side names, the speaker's share.
    assert seeded.rows("SELECT count(*) FROM calls WHERE date IS DISTINCT FROM scheduled_at::date"
                       " OR processed_at IS NULL") == [(0,)]
    for call_id, reps in seeded.rows("SELECT id, prefect_reps FROM calls"):
        names = sorted({n for (n,) in seeded.rows(
            "SELECT name FROM speakers WHERE call_id = %s AND company_side", (call_id,))})
        assert reps == names
    shares = seeded.rows("SELECT sum(talk_time_percentage) FROM speakers GROUP BY call_id"
                         " HAVING sum(talk_time_seconds) > 0")
    assert shares and all(abs(float(s) - 100) < 0.1 for (s,) in shares)
    # Transcripts point at their speaker's row, and the app's full-text trigger ran.
    assert seeded.rows("SELECT count(*) FROM transcripts WHERE speaker_id IS NULL OR full_text_search IS NULL") == [(0,)]
    # Nothing of the pipeline's lives in the app's schema but the contract tables.
    public = {r[0] for r in seeded.rows("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")}
    assert public == {"calls", "speakers", "transcripts", "users", "opportunities", "emails", "call_opportunities",
                      "sync_status"}
    # Active internal Gong users got an app account each (role left to the app's default).
    internal = {u["email_address"] for u in live(source(seeded, "users"))
                if u["active"] and u["email_address"].endswith("@" + CASES.internal_domain)}
    assert {(e, r) for e, r in seeded.rows("SELECT email, role::text FROM users")} == {(e, "rep") for e in internal}
    # dlt's per-batch note that it kept our column hints stays out of the operator's log.
    assert "column hints were different" not in capfd.readouterr().err


def test_a_run_with_nothing_new_loads_nothing_and_rewrites_nothing(seeded):
    sync(CORE)
    before = {t: seeded.rows(f"SELECT xmin::text, id FROM {t} ORDER BY id") for t in ("calls", "speakers", "transcripts")}
    report = sync(CORE)
    assert report.status == "success"
    for o in report.outcomes:
        assert (o.rows_loaded, o.rows_written, o.rows_deleted) == (0, 0, 0), o
    for table, rows in before.items():
        assert seeded.rows(f"SELECT xmin::text, id FROM {table} ORDER BY id") == rows, table


def test_incremental_run_applies_inserts_updates_deletes_and_keeps_ids(seeded):
    first = sync(CORE)
    call_ids, speaker_ids = ids(seeded, "calls", "gong_call_id"), set(ids(seeded, "speakers", "id"))
    checkpoint = outcome(first, "calls").checkpoint_after["gong__call"]
    cp = dt.datetime.fromisoformat(checkpoint)
    bq = seeded.bq
    ws = CASES.workspace_ids[0]
    # A new call that lands later but carries the checkpoint's exact timestamp.
    insert_rows(bq, seeded.gong("call"), [{"id": "9000000000000000001", "workspace_id": ws, "title": "Late landing"}],
                synced_at=cp)
    insert_rows(bq, seeded.gong("call"), [{"id": "9000000000000000002", "workspace_id": ws, "title": "Brand new"}],
                synced_at=LATER)
    renamed = next(gid for gid in call_ids if gid != CASES.shared_call_id)
    update_rows(bq, seeded.gong("call"), {"id": renamed}, {"title": "Renamed"}, LATER)
    gone = next(s for s in live(source(seeded, "call_speaker")) if s["call_id"] == renamed)
    soft_delete(bq, seeded.gong("call_speaker"), {"id": gone["id"], "call_id": gone["call_id"]}, LATER)
    # A user's new email must reach every speaker row of that user, which keeps its uuid.
    counts: dict[str, int] = {}
    for s in live(source(seeded, "call_speaker")):
        counts[s["user_id"]] = counts.get(s["user_id"], 0) + 1
    user_id = next(u["id"] for u in live(source(seeded, "users")) if counts.get(u["id"], 0) > 1)
    update_rows(bq, seeded.gong("users"), {"id": user_id}, {"email_address": "moved@example.org"}, LATER)
    speakers_of_user = {r[0] for r in seeded.rows(
        "SELECT m.id FROM gong_sync.speakers_ids m JOIN gong_raw.gong__call_speaker s"
        " ON s.id = m.gong_speaker_id AND s.call_id = m.gong_call_id WHERE s.user_id = %s", (user_id,))}

    report = sync(CORE)
    assert report.status == "success", [o.error for o in report.outcomes]
    assert outcome(report, "calls").rows_loaded == 3
    assert outcome(report, "users").rows_loaded == 1
    assert_in_step(seeded)
    after = ids(seeded, "calls", "gong_call_id")
    assert {k: after[k] for k in call_ids} == call_ids  # every call kept its uuid
    assert seeded.rows("SELECT title FROM calls WHERE gong_call_id = '9000000000000000001'") == [("Late landing",)]
    assert seeded.rows("SELECT title FROM calls WHERE gong_call_id = %s", (renamed,)) == [("Renamed",)]
    assert outcome(report, "speakers").rows_deleted == 1
    assert {r[0] for r in seeded.rows("SELECT email FROM speakers WHERE id = ANY(%s)", (list(speakers_of_user),))} == {
        "moved@example.org"}
    assert speakers_of_user <= speaker_ids
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
    assert seeded.rows("SELECT title FROM calls WHERE gong_call_id = %s", (twice["id"],)) == [("Newer",)]
    assert "gong_raw.gong__call: 1 older copies of rows with the same primary key (id, workspace_id) removed" in caplog.text
    # The next run merges on that key: a change to the call replaces its one row.
    update_rows(seeded.bq, seeded.gong("call"), twice, {"title": "Renamed"}, LATER + dt.timedelta(days=1))
    assert sync("calls").status == "success"
    assert seeded.rows("SELECT title FROM calls WHERE gong_call_id = %s", (twice["id"],)) == [("Renamed",)]


def test_a_large_read_message_is_landed_in_slices_with_every_row_once(seeded, monkeypatch):
    # A server may send messages of hundreds of MB (the emulator: 50k monologues at once); each
    # is cut into slices of about READ_SLICE_BYTES before anything copies it. Made small here so
    # that this workspace's messages are cut too.
    import pyarrow as pa

    import runtime.bigquery as bq
    from runtime.settings import load_settings

    clients = bq.connect(load_settings())
    try:
        whole = pa.concat_tables(bq.TableReader(clients, seeded.gong_dataset, "transcript").read(None, "_fivetran_synced", None))
        monkeypatch.setattr(bq, "READ_SLICE_BYTES", 2048)
        reader = bq.TableReader(clients, seeded.gong_dataset, "transcript")
        parts = list(reader.read(None, "_fivetran_synced", None))
    finally:
        clients.close()
    assert len(parts) >= whole.nbytes // 2048 // 2, (len(parts), whole.nbytes)
    assert reader.stats.rows == whole.num_rows == sum(p.num_rows for p in parts)
    key = [("call_id", "ascending"), ("index", "ascending"), ("workspace_id", "ascending")]
    assert pa.concat_tables(parts).sort_by(key).equals(whole.sort_by(key))

    # And a sync that reads in slices lands every monologue once.
    assert sync("users,calls,speakers,transcripts").status == "success"
    live_rows = {(r["call_id"], r["index"], r["workspace_id"]) for r in live(source(seeded, "transcript"))}
    assert seeded.rows("SELECT count(*), count(DISTINCT (call_id, index, workspace_id)) FROM gong_raw.gong__transcript"
                       " WHERE NOT coalesce(_fivetran_deleted, false)") == [(len(live_rows), len(live_rows))]


def test_selecting_speakers_touches_only_speakers(seeded):
    sync(CORE)
    update_rows(seeded.bq, seeded.gong("call"), {"id": CASES.shared_call_id}, {"title": "Not yet"}, LATER)
    speaker = next(s for s in live(source(seeded, "call_speaker")) if s["call_id"] != CASES.shared_call_id)
    update_rows(seeded.bq, seeded.gong("call_speaker"), {"id": speaker["id"], "call_id": speaker["call_id"]},
                {"talk_time": 4242.5}, LATER)
    status_before = dict(seeded.rows("SELECT entity_type, updated_at FROM sync_status"))

    report = sync("speakers")
    assert [o.asset for o in report.outcomes] == ["speakers"]
    assert seeded.rows(
        "SELECT s.talk_time_seconds FROM speakers s JOIN gong_sync.speakers_ids m ON m.id = s.id"
        " WHERE m.gong_speaker_id = %s AND m.gong_call_id = %s", (speaker["id"], speaker["call_id"])) == [(4243,)]
    assert ("Not yet",) not in seeded.rows("SELECT title FROM calls")
    status_after = dict(seeded.rows("SELECT entity_type, updated_at FROM sync_status"))
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
    assert outcome(report, "transcripts").status == "skipped"
    assert outcome(report, "calls").status == "success"
    assert seeded.rows("SELECT count(*) FROM calls")[0][0] > 0
    assert seeded.rows("SELECT last_sync_status, error_details ->> 'error' FROM sync_status"
                       " WHERE entity_type = 'users'")[0][0] == "failed"


def test_a_key_two_app_rows_share_fails_only_the_build_that_writes_it(seeded):
    """The app owns its tables and may write a second row under a key the pipeline matches by.
    Each build checks the keys it writes (not the whole table at every run): a run that does not
    touch the shared key goes on; one that does stops that asset's build, names the rows and
    writes nothing; once the app removes its duplicate the change lands."""
    assert sync(CORE).status == "success"
    monologues = sorted(live(source(seeded, "transcript")), key=lambda t: (t["call_id"], t["index"]))
    shared, other = monologues[0], next(t for t in monologues if t["call_id"] != monologues[0]["call_id"])
    [(app_call,)] = seeded.rows("SELECT id FROM calls WHERE gong_call_id = %s", (shared["call_id"],))
    with seeded.connect() as conn:
        conn.execute("CREATE TEMP TABLE twin AS SELECT * FROM transcripts WHERE call_id = %s AND sequence_number = %s",
                     (app_call, shared["index"]))
        conn.execute("UPDATE twin SET id = gen_random_uuid()")
        conn.execute("INSERT INTO transcripts SELECT * FROM twin")
    sentence = json.dumps([{"start": 1, "end": 2, "text": "Changed in Gong"}])

    update_rows(seeded.bq, seeded.gong("transcript"), {"call_id": other["call_id"], "index": other["index"]},
                {"sentence": sentence}, LATER)
    untouched = sync(CORE)
    assert untouched.status == "success", [o.error for o in untouched.outcomes]
    assert (other["call_id"], other["index"], "Changed in Gong", 1) in actual_transcripts(seeded)

    later = LATER + dt.timedelta(minutes=1)
    update_rows(seeded.bq, seeded.gong("transcript"), {"call_id": shared["call_id"], "index": shared["index"]},
                {"sentence": sentence}, later)
    before = seeded.rows("SELECT id, text FROM transcripts ORDER BY id")
    report = sync(CORE)
    transcripts = outcome(report, "transcripts")
    assert transcripts.status == "failed" and outcome(report, "calls").status == "success"
    assert (f"public.transcripts: (call_id, sequence_number) must identify one row, but rows share it,"
            f" e.g. ({app_call}, {shared['index']}) × 2; nothing of this build was written") in transcripts.error
    assert seeded.rows("SELECT id, text FROM transcripts ORDER BY id") == before

    seeded.rows("DELETE FROM transcripts WHERE id IN (SELECT id FROM transcripts WHERE call_id = %s"
                " AND sequence_number = %s ORDER BY id LIMIT 1) RETURNING id", (app_call, shared["index"]))
    mended = sync(CORE)
    assert mended.status == "success", [o.error for o in mended.outcomes]
    assert (shared["call_id"], shared["index"], "Changed in Gong", 1) in actual_transcripts(seeded)
    assert_in_step(seeded)


def test_full_refresh_reconciles_in_place_and_keeps_ids(seeded):
    sync(CORE)
    total = seeded.rows("SELECT count(*) FROM gong_raw.gong__call")[0][0]
    call_ids = ids(seeded, "calls", "gong_call_id")
    transcript_ids = ids(seeded, "transcripts", "id")
    # A row removed by hand comes back only with a full refresh, and with the same uuid.
    victim = next(iter(call_ids))
    seeded.rows("DELETE FROM calls WHERE gong_call_id = %s RETURNING 1", (victim,))
    assert outcome(sync("calls"), "calls").rows_loaded == 0
    report = sync(CORE, full_refresh=True)
    assert report.status == "success", [o.error for o in report.outcomes]
    assert outcome(report, "calls").rows_loaded == total
    assert ids(seeded, "calls", "gong_call_id") == call_ids
    assert ids(seeded, "transcripts", "id") == transcript_ids
    assert_in_step(seeded)


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
