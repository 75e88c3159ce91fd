"""Acceptance: the pipeline fills the application's existing schema (design/APP_SCHEMA.md).

Every flow test runs twice (`app_db`): on a database where the app's migrations ran and an
earlier importer left rows with random uuids (`app_migrated`), and on an empty database the
pipeline builds itself (`empty`). What is expected is computed from BigQuery and the contract,
never from the pipeline's code: ids are forever, app-owned values and the app's own rows survive
every kind of run, a source delete is counted with what it cascades into, a mass delete waits
for `--allow-mass-delete`, and the app's read patterns return what the source holds.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import re
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit, urlunsplit

import psycopg
import pytest
from psycopg import sql

from runtime.local.seed import CASES, insert_rows, seed_workspace, soft_delete, update_rows
from tests.contract.app_ddl import APP_OWN_TABLES, CONTRACT_TABLES, create_app_own_tables, create_app_schema

ASSETS = ("users", "calls", "speakers", "transcripts", "opportunities", "emails", "call_opportunities")
#: When every Gong change of a test lands (`_fivetran_synced`), after the seeded rows.
LATER = dt.datetime(2026, 3, 1, 12, 0, 0, 654321, tzinfo=dt.UTC)
INTERNAL_DOMAIN = CASES.internal_domain  # INTERNAL_EMAIL_DOMAINS' default is the same domain
RENAMED = "Renamed in Gong"
MOVED_EMAIL = "rep.moved@prefect.io"
#: Calls Gong adds during the journey: one with a transcript, one where nobody talked.
NEW_CALL = "7300000000000900001"
SILENT_CALL = "7300000000000900002"
UNKNOWN_SPEAKER = "5600000000000999999"
#: Call fields the app reads from calls.metadata, besides `gong_url` (the call's `url`).
METADATA_KEYS = ("workspace_id", "direction", "scope", "primary_user_id", "meeting_url")
#: Values only the app writes; the pipeline must leave them as they are.
APP_CALL_VALUES = {"coached": ("Prefect Cloud", 87), "doomed": ("Pro Plan", 42)}


# -- running the flow ---------------------------------------------------------------------------


def sync(*assets: str, **options):  # noqa: ANN201 - runtime.flow.RunReport
    """`tests.helpers.sync`, imported when first used: the DDL test runs even while the flow does not import."""
    from tests.helpers import sync as run_flow

    return run_flow(*assets, **options)


def outcome(report, asset: str):  # noqa: ANN001, ANN201 - RunReport -> AssetOutcome
    from tests.helpers import outcome as find

    return find(report, asset)


def assert_success(report) -> None:  # noqa: ANN001
    assert report.status == "success", [(o.asset, o.status, o.error) for o in report.outcomes]
    assert {o.asset for o in report.outcomes} == set(ASSETS)


def nonzero(counts: dict | None) -> dict:
    return {k: v for k, v in (counts or {}).items() if v}


def wait_for(condition, timeout_s: float = 10.0) -> bool:  # noqa: ANN001
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


# -- what BigQuery holds: the expectations --------------------------------------------------------


def bq(env, query: str) -> list[dict]:  # noqa: ANN001
    """Rows of a BigQuery query as dicts; `{g}` is the Gong dataset, `{sf}` the Salesforce one."""
    project = env.emulator.project
    text = query.replace("{g}", f"`{project}.{env.gong_dataset}`").replace("{sf}", f"`{project}.{env.salesforce_dataset}`")
    return [dict(r) for r in env.bq.query(text).result()]


def live(rows: list[dict]) -> list[dict]:
    return [r for r in rows if not r.get("_fivetran_deleted")]


def naive_utc(value: dt.datetime | None) -> dt.datetime | None:
    return value.astimezone(dt.UTC).replace(tzinfo=None) if value else None


def parse_sent_at(text: str | None) -> dt.datetime | None:
    try:
        return dt.datetime.fromisoformat(text)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None


def is_internal(email: str | None) -> bool:
    return bool(email) and "@" in email and email.rsplit("@", 1)[1].lower() == INTERNAL_DOMAIN


def full_name(user: dict) -> str:
    return " ".join(p for p in (user.get("first_name"), user.get("last_name")) if p)


def name_from_email(email: str | None) -> str | None:
    """`george.coyne@…` -> `George Coyne`."""
    if not email or "@" not in email:
        return None
    words = [w for w in re.split(r"[._-]+", email.split("@", 1)[0]) if w]
    return " ".join(w.capitalize() for w in words) or None


def expected_speaker(row: dict, user: dict | None, participant: dict | None) -> dict:
    """One speakers row as APP_SCHEMA.md derives it from call_speaker, users and call_participant."""
    user, participant = user or {}, participant or {}
    email = user.get("email_address") or participant.get("email_address")
    name = full_name(user) or participant.get("name") or name_from_email(email) or f"Speaker {row['id']}"
    return {"gong_id": row["id"], "call_id": row["call_id"], "name": name, "email": email,
            "company_side": is_internal(email), "talk_time": row["talk_time"] or 0.0}


@dataclass
class Source:
    """The source, reduced to what the app's tables must show."""

    calls: dict[str, dict]  # Gong call id -> its live row with the latest _fivetran_synced
    speakers: list[dict]  # expected speakers rows of live calls
    transcripts: dict[tuple[str, int], dict]  # (call id, index) -> text, start_ms, speaker, topic
    users: dict[str, dict]  # live Gong users by id
    opportunities: set[str]  # live, named opportunity ids
    links: set[tuple[str, str]]  # (call id, opportunity id), both live
    emails: dict[str, dict]  # loadable email id -> opportunity_id, sent_at
    #: Opportunities with an email whose sent_at is missing or unreadable (the specs disagree on those).
    unclear_opportunities: set[str] = field(default_factory=set)

    def speakers_of(self, call_id: str) -> list[dict]:
        return [s for s in self.speakers if s["call_id"] == call_id]

    def emails_of(self, opportunity: str) -> dict[str, dt.datetime]:
        return {i: e["sent_at"] for i, e in self.emails.items() if e["opportunity_id"] == opportunity}

    def reps(self) -> set[str]:
        return {s["email"] for s in self.speakers if s["company_side"]}


def read_source(env) -> Source:  # noqa: ANN001
    users = {u["id"]: u for u in live(bq(env, "SELECT * FROM {g}.users"))}
    calls: dict[str, dict] = {}
    for c in sorted(live(bq(env, "SELECT id, workspace_id, title, scheduled, started, duration, purpose, url, "
                                 "direction, scope, primary_user_id, meeting_url, _fivetran_synced, _fivetran_deleted "
                                 "FROM {g}.call")), key=lambda c: c["_fivetran_synced"]):
        calls[c["id"]] = c  # one call id in two workspaces: the latest copy wins
    participants = {(p["call_id"], p["speaker_id"]): p
                    for p in live(bq(env, "SELECT call_id, speaker_id, email_address, name, _fivetran_deleted "
                                          "FROM {g}.call_participant"))}
    speakers = [expected_speaker(s, users.get(s["user_id"]), participants.get((s["call_id"], s["id"])))
                for s in live(bq(env, "SELECT * FROM {g}.call_speaker")) if s["call_id"] in calls]
    transcripts = {}
    for t in live(bq(env, "SELECT call_id, `index` AS idx, workspace_id, speaker_id, topic, "
                          "TO_JSON_STRING(sentence) AS sentence, _fivetran_deleted FROM {g}.transcript")):
        call = calls.get(t["call_id"])
        if call and call["workspace_id"] == t["workspace_id"]:
            sentences = json.loads(t["sentence"])
            transcripts[(t["call_id"], t["idx"])] = {
                "text": " ".join(s["text"] for s in sentences), "start_ms": sentences[0]["start"],
                "speaker": t["speaker_id"], "topic": t["topic"],
            }
    opportunities = {o["id"] for o in live(bq(env, "SELECT id, name, is_deleted, _fivetran_deleted FROM {sf}.opportunity"))
                     if not o["is_deleted"] and o["name"] is not None}
    links = {(link["call_id"], link["object_id"])
             for link in live(bq(env, "SELECT call_id, object_id, object_type, _fivetran_deleted "
                                      "FROM {g}.call_context_integration"))
             if link["object_type"] == "Opportunity" and link["call_id"] in calls and link["object_id"] in opportunities}
    emails, unclear = {}, set()
    for e in live(bq(env, "SELECT id, opportunity_id, sent_at, _fivetran_deleted FROM {g}.email")):
        sent_at = parse_sent_at(e["sent_at"])
        if e["id"] is None:
            continue
        if sent_at is None:
            unclear.add(e["opportunity_id"])
            continue
        linked = e["opportunity_id"] if e["opportunity_id"] in opportunities else None
        emails[e["id"]] = {"opportunity_id": linked, "sent_at": sent_at}
    return Source(calls, speakers, transcripts, users, opportunities, links, emails, unclear)


@dataclass(frozen=True)
class Picks:
    """The rows the journey is about, chosen from the synthetic workspace."""

    coached: str  # a call the app coaches; Gong renames it
    doomed: str  # a call the app coaches; Gong deletes it
    rep_user: str  # Gong user id of the coached call's primary rep; Gong changes the email
    opportunity: str  # an opportunity of the coached call with calls and emails


def choose(src: Source) -> Picks:
    special = {CASES.shared_call_id, CASES.deleted_call[0], CASES.call_with_two_opportunities,
               CASES.orphan_speaker_call_id, CASES.call_with_deleted_link}

    def plain(call_id: str) -> bool:
        """Distinct emails, names and rounded talk times; both sides; a transcript."""
        speakers = src.speakers_of(call_id)
        distinct = all(len({s[k] for s in speakers}) == len(speakers) for k in ("email", "name"))
        times = {round(s["talk_time"]) for s in speakers}
        return (call_id not in special and len(speakers) >= 3 and distinct and len(times) == len(speakers)
                and {s["company_side"] for s in speakers} == {True, False}
                and any(k[0] == call_id for k in src.transcripts))

    candidates = sorted(c for c in src.calls if plain(c))
    for coached in candidates:
        rep_user = src.calls[coached]["primary_user_id"]
        rep = src.users.get(rep_user)
        if not rep or not is_internal(rep["email_address"]):
            continue
        opportunities = sorted(o for c, o in src.links if c == coached
                               and src.emails_of(o) and o not in src.unclear_opportunities)
        for opportunity in opportunities:
            doomed = [c for c in candidates if c != coached and (c, opportunity) not in src.links
                      and rep["email_address"] not in {s["email"] for s in src.speakers_of(c)}]
            if doomed:
                return Picks(coached, doomed[0], rep_user, opportunity)
    raise AssertionError("the synthetic workspace has no call fit for the journey")


# -- the app's side: rows it imported, work it did ----------------------------------------------


def one(conn: psycopg.Connection, query: str, params: object = None):  # noqa: ANN201
    row = conn.execute(query, params).fetchone()
    assert row is not None, query
    return row[0]


@dataclass
class AppWork:
    """What the app holds on pipeline rows: the ids it points at, and the rows it wrote."""

    calls: dict[str, uuid.UUID]  # "coached"/"doomed" -> calls.id
    rep: uuid.UUID  # speakers.id of the coached call's rep (the coaching session's rep_id)
    doomed_rep: uuid.UUID
    manager: uuid.UUID  # users.id of the rep's account
    history: list[tuple]  # speaker_role_history rows the app's own writes caused
    coaching: dict[str, uuid.UUID] = field(default_factory=dict)
    analysis: dict[str, uuid.UUID] = field(default_factory=dict)


@dataclass
class Imported:
    """Natural key -> the random uuid an earlier importer gave the row."""

    calls: dict[str, uuid.UUID]
    speakers: list[tuple[uuid.UUID, dict]]  # (uuid, the expected speaker it stands for)
    transcripts: dict[tuple[str, int], uuid.UUID]
    users: dict[str, uuid.UUID]
    opportunities: dict[str, uuid.UUID]
    emails: dict[str, uuid.UUID]


def add_coaching(conn: psycopg.Connection, work: AppWork, picks: Picks) -> None:
    for key, rep in (("coached", work.rep), ("doomed", work.doomed_rep)):
        call = work.calls[key]
        work.coaching[key] = one(conn, "INSERT INTO coaching_sessions (call_id, rep_id, notes) VALUES (%s, %s, %s) "
                                       "RETURNING id", (call, rep, f"Coaching notes on {getattr(picks, key)}"))
        work.analysis[key] = one(conn, "INSERT INTO analysis_runs (call_id, model, result) "
                                       "VALUES (%s, 'scorer-v2', '{\"score\": 3}') RETURNING id", (call,))


def earlier_importer(env, src: Source, picks: Picks) -> tuple[AppWork, Imported]:  # noqa: ANN001
    """Rows an earlier importer wrote into the app's tables, random uuids and app values included,
    and the coaching work the app did on them; before the pipeline's first run."""
    rep = src.users[picks.rep_user]
    by_name = next(s for s in src.speakers_of(picks.coached) if not s["company_side"])  # imported without email
    with env.connect() as conn, conn.transaction():
        manager = one(conn, "INSERT INTO users (id, email, name, role) VALUES (gen_random_uuid(), %s, %s, 'manager') "
                            "RETURNING id", (rep["email_address"], full_name(rep)))
        calls, speakers, history = {}, [], []
        for key in ("coached", "doomed"):
            g = getattr(picks, key)
            calls[key] = one(conn, "INSERT INTO calls (gong_call_id, title, product, overall_score) "
                                   "VALUES (%s, 'imported earlier', %s, %s) RETURNING id", (g, *APP_CALL_VALUES[key]))
            for s in src.speakers_of(g):
                role = "ae" if s["company_side"] else None
                manager_id = manager if key == "coached" and s["email"] == rep["email_address"] else None
                sid = one(conn, "INSERT INTO speakers (id, call_id, name, email, company_side, role, manager_id) "
                                "VALUES (gen_random_uuid(), %s, %s, %s, %s, %s, %s) RETURNING id",
                          (calls[key], s["name"], None if s is by_name else s["email"], s["company_side"], role, manager_id))
                speakers.append((sid, s))
                if role:
                    history.append((sid, None, role))
        transcripts = {
            k: one(conn, "INSERT INTO transcripts (id, call_id, sequence_number, text, sentiment) "
                         "VALUES (gen_random_uuid(), %s, %s, 'imported earlier', 'positive') RETURNING id",
                   (calls["coached"], k[1]))
            for k in sorted(k for k in src.transcripts if k[0] == picks.coached)
        }
        opportunity = one(conn, "INSERT INTO opportunities (id, gong_opportunity_id, name) "
                                "VALUES (gen_random_uuid(), %s, 'imported earlier') RETURNING id", (picks.opportunity,))
        email_id = min(src.emails_of(picks.opportunity))
        email = one(conn, "INSERT INTO emails (id, gong_email_id, opportunity_id, subject) "
                          "VALUES (gen_random_uuid(), %s, %s, 'imported earlier') RETURNING id", (email_id, opportunity))
        conn.execute("INSERT INTO call_opportunities (call_id, opportunity_id) VALUES (%s, %s)",
                     (calls["coached"], opportunity))
        rep_speaker = next(sid for sid, s in speakers if s["call_id"] == picks.coached and s["email"] == rep["email_address"])
        doomed_rep = next(sid for sid, s in speakers if s["call_id"] == picks.doomed and s["company_side"])
        work = AppWork(calls=calls, rep=rep_speaker, doomed_rep=doomed_rep, manager=manager, history=history)
        add_coaching(conn, work, picks)
    imported = Imported(
        calls={picks.coached: calls["coached"], picks.doomed: calls["doomed"]}, speakers=speakers,
        transcripts=transcripts, users={rep["email_address"]: manager},
        opportunities={picks.opportunity: opportunity}, emails={email_id: email},
    )
    return work, imported


def app_moves_in(app_db, src: Source, picks: Picks) -> AppWork:  # noqa: ANN001
    """On a schema the pipeline built: the app adds its own tables, sets its values, coaches."""
    app_db.install_app_tables()
    rep = src.users[picks.rep_user]
    with app_db.env.connect() as conn, conn.transaction():
        calls = {key: one(conn, "UPDATE calls SET product = %s, overall_score = %s WHERE gong_call_id = %s RETURNING id",
                          (*APP_CALL_VALUES[key], getattr(picks, key)))
                 for key in ("coached", "doomed")}
        manager = one(conn, "INSERT INTO users (id, email, name, role) VALUES (gen_random_uuid(), %s, %s, 'manager') "
                            "ON CONFLICT (email) DO UPDATE SET role = 'manager' RETURNING id",
                      (rep["email_address"], full_name(rep)))
        history = [(sid, None, "ae") for (sid,) in conn.execute(
            "UPDATE speakers SET role = 'ae' WHERE call_id = ANY(%s) AND company_side RETURNING id", (list(calls.values()),))]
        rep_speaker = one(conn, "UPDATE speakers SET manager_id = %s WHERE call_id = %s AND email = %s RETURNING id",
                          (manager, calls["coached"], rep["email_address"]))
        doomed_rep = one(conn, "SELECT id FROM speakers WHERE call_id = %s AND company_side ORDER BY email LIMIT 1",
                         (calls["doomed"],))
        conn.execute("UPDATE transcripts SET sentiment = 'positive' WHERE call_id = %s", (calls["coached"],))
        work = AppWork(calls=calls, rep=rep_speaker, doomed_rep=doomed_rep, manager=manager, history=history)
        add_coaching(conn, work, picks)
    return work


def app_changes_role(env, work: AppWork) -> None:  # noqa: ANN001
    env.rows("UPDATE speakers SET role = 'se' WHERE id = %s RETURNING id", (work.rep,))
    work.history.append((work.rep, "ae", "se"))


# -- Gong's side: changes a later Fivetran sync brings ------------------------------------------


def gong_deletes_calls(env, call_ids: list[str]) -> None:  # noqa: ANN001
    """A call deleted in Gong: Fivetran flags the call and every row that hangs off it."""
    soft_delete(env.bq, env.gong("call"), [{"id": c} for c in call_ids], LATER)
    for table in ("call_speaker", "call_participant", "transcript", "call_context_integration"):
        soft_delete(env.bq, env.gong(table), [{"call_id": c} for c in call_ids], LATER)


def gong_adds_calls(env, rep: dict) -> None:  # noqa: ANN001
    """A call with a transcript (one monologue by an unknown speaker), and a call where nobody
    talked, whose speakers have no user (one not even a participant's name)."""
    ws = CASES.workspace_ids[0]
    day = LATER - dt.timedelta(days=1)

    def call(call_id: str, title: str, purpose: str | None, duration: int) -> dict:
        return {"id": call_id, "workspace_id": ws, "primary_user_id": rep["id"], "title": title, "scheduled": day,
                "started": day + dt.timedelta(minutes=2), "duration": duration, "direction": "Conference",
                "scope": "External", "purpose": purpose, "url": f"https://app.gong.io/call?id={call_id}",
                "meeting_url": "https://zoom.us/j/5550001234"}

    insert_rows(env.bq, env.gong("call"), [call(NEW_CALL, "Hooli <> Prefect | Discovery", "Discovery", 1800),
                                           call(SILENT_CALL, "Hooli <> Prefect | Check-in", None, 600)], synced_at=LATER)
    insert_rows(env.bq, env.gong("call_speaker"), [
        {"id": "5600000000000900001", "call_id": NEW_CALL, "user_id": rep["id"], "talk_time": 1000.4},
        {"id": "5600000000000900002", "call_id": NEW_CALL, "user_id": None, "talk_time": 599.6},
        {"id": "5600000000000900003", "call_id": SILENT_CALL, "user_id": None, "talk_time": 0.0},
        {"id": "5600000000000900004", "call_id": SILENT_CALL, "user_id": None, "talk_time": 0.0},
    ], synced_at=LATER)
    insert_rows(env.bq, env.gong("call_participant"), [
        {"id": "5800000000000900001", "call_id": NEW_CALL, "speaker_id": "5600000000000900001", "user_id": rep["id"],
         "email_address": MOVED_EMAIL, "name": full_name(rep), "affiliation": "Internal"},
        {"id": "5800000000000900002", "call_id": NEW_CALL, "speaker_id": "5600000000000900002",
         "email_address": "kim.lee@hooli.com", "name": "Kim Lee", "affiliation": "External"},
        {"id": "5800000000000900004", "call_id": SILENT_CALL, "speaker_id": "5600000000000900004",
         "email_address": "george.coyne@hooli.com", "name": None, "affiliation": "External"},
    ], synced_at=LATER)
    insert_rows(env.bq, env.gong("transcript"), [
        {"call_id": NEW_CALL, "index": 0, "workspace_id": ws, "speaker_id": "5600000000000900001", "topic": "Pricing",
         "sentence": [{"start": 1200, "end": 4000, "text": "Let me walk you through pricing."},
                      {"start": 4100, "end": 6000, "text": "It scales with your runs."}]},
        {"call_id": NEW_CALL, "index": 1, "workspace_id": ws, "speaker_id": UNKNOWN_SPEAKER, "topic": None,
         "sentence": [{"start": 7000, "end": 9000, "text": "Who said that?"}]},
    ], synced_at=LATER)


def gong_changes(env, src: Source, picks: Picks) -> None:  # noqa: ANN001
    update_rows(env.bq, env.gong("call"), {"id": picks.coached}, {"title": RENAMED}, LATER)
    update_rows(env.bq, env.gong("users"), {"id": picks.rep_user}, {"email_address": MOVED_EMAIL}, LATER)
    gong_adds_calls(env, src.users[picks.rep_user])
    gong_deletes_calls(env, [picks.doomed])


# -- what Postgres holds --------------------------------------------------------------------------


@dataclass
class Snapshot:
    """Ids by natural key, app-owned values by id, and the app's own rows."""

    ids: dict[str, dict]
    owned: dict[str, dict]
    coaching: set[tuple]
    analysis: set[tuple]
    processed_at: dict[uuid.UUID, dt.datetime]


def snapshot(env) -> Snapshot:  # noqa: ANN001
    speakers: dict[str, set] = defaultdict(set)
    for g, sid in env.rows("SELECT c.gong_call_id, s.id FROM speakers s JOIN calls c ON c.id = s.call_id"):
        speakers[g].add(sid)
    ids = {
        "calls": dict(env.rows("SELECT gong_call_id, id FROM calls")),
        "speakers": dict(speakers),
        "transcripts": {(g, n): i for g, n, i in env.rows(
            "SELECT c.gong_call_id, t.sequence_number, t.id FROM transcripts t JOIN calls c ON c.id = t.call_id")},
        "users": dict(env.rows("SELECT email, id FROM users")),
        "opportunities": dict(env.rows("SELECT gong_opportunity_id, id FROM opportunities")),
        "emails": dict(env.rows("SELECT gong_email_id, id FROM emails")),
        "call_opportunities": {(g, o): (ci, oi) for g, o, ci, oi in env.rows(
            "SELECT c.gong_call_id, o.gong_opportunity_id, co.call_id, co.opportunity_id FROM call_opportunities co "
            "JOIN calls c ON c.id = co.call_id JOIN opportunities o ON o.id = co.opportunity_id")},
    }
    owned = {
        "calls": {r[0]: r[1:] for r in env.rows("SELECT id, product, overall_score, created_at FROM calls")},
        "speakers": {r[0]: r[1:] for r in env.rows("SELECT id, role, manager_id FROM speakers")},
        "transcripts": dict(env.rows("SELECT id, sentiment FROM transcripts")),
        "users": {r[0]: r[1:] for r in env.rows("SELECT id, role, created_at FROM users")},
    }
    return Snapshot(
        ids=ids, owned=owned,
        coaching=set(env.rows("SELECT id, call_id, rep_id, notes FROM coaching_sessions")),
        analysis=set(env.rows("SELECT id, call_id FROM analysis_runs")),
        processed_at=dict(env.rows("SELECT id, processed_at FROM calls")),
    )


def _call_of(kind: str, key: object) -> object:
    return key if kind in ("calls", "speakers") else key[0] if kind in ("transcripts", "call_opportunities") else None


def assert_kept(before: Snapshot, after: Snapshot, gone: set[str] = frozenset()) -> None:
    """Every row of `before` whose call Gong did not delete has the same id, and the app's values."""
    changed = [(kind, key, value, after.ids[kind].get(key))
               for kind, keys in before.ids.items() for key, value in keys.items()
               if _call_of(kind, key) not in gone and after.ids[kind].get(key) != value]
    assert not changed, f"ids changed (kind, key, before, after): {changed[:10]}"
    rewritten = [(table, i, v, after.owned[table][i]) for table, values in before.owned.items()
                 for i, v in values.items() if i in after.owned[table] and after.owned[table][i] != v]
    assert not rewritten, f"app-owned values changed (table, id, before, after): {rewritten[:10]}"
    gone_ids = {before.ids["calls"][g] for g in gone}
    assert after.coaching == {c for c in before.coaching if c[1] not in gone_ids}
    assert after.analysis == {a for a in before.analysis if a[1] not in gone_ids}
    moved = {i: (p, after.processed_at[i]) for i, p in before.processed_at.items()
             if i in after.processed_at and after.processed_at[i] != p}
    assert not moved, f"processed_at is set when the pipeline first writes a call, then kept: {moved}"


def assert_adopted(env, imported: Imported) -> None:  # noqa: ANN001
    """The earlier importer's rows kept their uuids: matched by natural key, never re-created."""
    now = snapshot(env).ids
    assert {g: now["calls"].get(g) for g in imported.calls} == imported.calls
    assert {k: now["transcripts"].get(k) for k in imported.transcripts} == imported.transcripts
    assert {e: now["users"].get(e) for e in imported.users} == imported.users
    assert {o: now["opportunities"].get(o) for o in imported.opportunities} == imported.opportunities
    assert {e: now["emails"].get(e) for e in imported.emails} == imported.emails
    for sid, s in imported.speakers:  # matched by (call, email), the one without email by (call, name)
        assert env.rows("SELECT c.gong_call_id, s.name, s.email FROM speakers s JOIN calls c ON c.id = s.call_id "
                        "WHERE s.id = %s", (sid,)) == [(s["call_id"], s["name"], s["email"])], s


def assert_calls_match(env, src: Source) -> None:  # noqa: ANN001
    rows = {r[0]: r[1:] for r in env.rows(
        "SELECT gong_call_id, title, scheduled_at, duration_seconds, call_type, date, processed_at, metadata, "
        "prefect_reps FROM calls")}
    assert set(rows) == set(src.calls)
    problems = []
    for g, c in src.calls.items():
        title, scheduled_at, duration, call_type, date, processed_at, metadata, reps = rows[g]
        scheduled = naive_utc(c["scheduled"])
        if (title, scheduled_at, duration, call_type) != (c["title"], scheduled, c["duration"], c["purpose"]):
            problems.append((g, "fields", (title, scheduled_at, duration, call_type)))
        if date != (scheduled.date() if scheduled else None) or processed_at is None:
            problems.append((g, "date/processed_at", date, processed_at))
        expected_meta = {"gong_url": c["url"], **{k: c[k] for k in METADATA_KEYS}}
        if {k: (metadata or {}).get(k) for k in expected_meta} != expected_meta:
            problems.append((g, "metadata", metadata))
        if reps != sorted({s["name"] for s in src.speakers_of(g) if s["company_side"]}):
            problems.append((g, "prefect_reps", reps))
    assert not problems, problems[:10]


def assert_speakers_match(env, src: Source) -> None:  # noqa: ANN001
    rows = env.rows("SELECT c.gong_call_id, s.name, s.email, s.company_side, s.talk_time_seconds, "
                    "s.talk_time_percentage FROM speakers s JOIN calls c ON c.id = s.call_id")
    assert env.rows("SELECT count(*) FROM speakers WHERE name IS NULL") == [(0,)]
    assert Counter(r[:4] for r in rows) == Counter((s["call_id"], s["name"], s["email"], s["company_side"])
                                                   for s in src.speakers)
    expected_times, actual_times = defaultdict(list), defaultdict(list)
    for s in src.speakers:
        expected_times[(s["call_id"], s["name"], s["email"])].append(s["talk_time"])
    for g, name, email, _, seconds, _ in rows:
        actual_times[(g, name, email)].append(seconds)
    off = [(k, actual_times[k], v) for k, v in expected_times.items()
           if any(a is None or abs(a - e) > 0.5 for a, e in zip(sorted(actual_times[k], key=lambda x: x or 0), sorted(v)))]
    assert not off, f"talk_time_seconds is talk_time rounded: {off[:5]}"
    shares: dict[str, list] = defaultdict(list)
    for g, *_, share in rows:
        shares[g].append(share)
    for g in src.calls:
        total = sum(s["talk_time"] for s in src.speakers_of(g))
        if not shares[g]:
            continue
        if total > 0:
            assert None not in shares[g] and abs(float(sum(shares[g])) - 100) <= 0.05, (g, shares[g])
        else:
            assert shares[g] == [None] * len(shares[g]), (g, shares[g])


def assert_transcripts_match(env, src: Source) -> None:  # noqa: ANN001
    """Every monologue (but the shared call's, whose two workspaces disagree), with its speaker."""
    assert env.rows("SELECT count(*) FROM transcripts WHERE full_text_search IS NULL") == [(0,)]
    speaker = {(s["call_id"], s["gong_id"]): (s["name"], s["email"]) for s in src.speakers}
    expected = {k: (t["text"], t["start_ms"], [t["topic"]] if t["topic"] else [], speaker.get((k[0], t["speaker"]), (None, None)))
                for k, t in src.transcripts.items() if k[0] != CASES.shared_call_id}
    actual = {(g, n): (text, start, topics, (name, email)) for g, n, text, start, topics, name, email in env.rows(
        "SELECT c.gong_call_id, t.sequence_number, t.text, t.start_time_ms, t.topics, s.name, s.email "
        "FROM transcripts t JOIN calls c ON c.id = t.call_id LEFT JOIN speakers s ON s.id = t.speaker_id "
        "WHERE c.gong_call_id <> %s", (CASES.shared_call_id,))}
    assert set(actual) == set(expected)
    wrong = [(k, actual[k], v) for k, v in expected.items() if actual[k] != v]
    assert not wrong, wrong[:5]
    # Full-text search finds exactly the monologues that say it.
    said = {k for k, v in actual.items() if "pricing" in v[0].lower()}
    found = {(g, n) for g, n in env.rows(
        "SELECT c.gong_call_id, t.sequence_number FROM transcripts t JOIN calls c ON c.id = t.call_id "
        "WHERE t.full_text_search @@ plainto_tsquery('english', 'pricing') AND c.gong_call_id <> %s",
        (CASES.shared_call_id,))}
    assert found == said and said


def assert_read_patterns(env, src: Source, picks: Picks) -> None:  # noqa: ANN001
    """The app's queries (APP_SCHEMA.md, "How the app reads them") against the source's truth."""
    assert_calls_match(env, src)
    assert_speakers_match(env, src)
    assert_transcripts_match(env, src)
    g = picks.coached
    # A call by Gong id: one row.
    assert env.rows("SELECT title FROM calls WHERE gong_call_id = %s", (g,)) == [(src.calls[g]["title"],)]
    # Its speakers by talk time, and its primary rep.
    by_talk = sorted(src.speakers_of(g), key=lambda s: -s["talk_time"])
    assert [n for (n,) in env.rows("SELECT s.name FROM speakers s JOIN calls c ON c.id = s.call_id "
                                   "WHERE c.gong_call_id = %s ORDER BY s.talk_time_seconds DESC", (g,))] == [
        s["name"] for s in by_talk]
    assert env.rows("SELECT s.email FROM speakers s JOIN calls c ON c.id = s.call_id WHERE c.gong_call_id = %s "
                    "AND s.company_side ORDER BY s.talk_time_seconds DESC LIMIT 1", (g,)) == [
        (next(s["email"] for s in by_talk if s["company_side"]),)]
    # Its full transcript.
    texts = [t["text"] for k, t in sorted(src.transcripts.items()) if k[0] == g]
    assert env.rows("SELECT string_agg(t.text, ' ' ORDER BY t.sequence_number) FROM transcripts t "
                    "JOIN calls c ON c.id = t.call_id WHERE c.gong_call_id = %s", (g,)) == [(" ".join(texts),)]
    # The reps, and a rep's calls by email.
    reps = {e for (e,) in env.rows("SELECT DISTINCT email FROM speakers WHERE company_side")}
    assert reps == src.reps() and all(e.endswith("@" + INTERNAL_DOMAIN) for e in reps)
    rep_email = src.users[picks.rep_user]["email_address"]
    assert {c for (c,) in env.rows("SELECT c.gong_call_id FROM speakers s JOIN calls c ON c.id = s.call_id "
                                   "WHERE s.email = %s", (rep_email,))} == {
        s["call_id"] for s in src.speakers if s["email"] == rep_email}
    # An opportunity's timeline: its calls through call_opportunities, its emails, by time.
    o = picks.opportunity
    calls = sorted((c for c, oo in src.links if oo == o), key=lambda c: (naive_utc(src.calls[c]["scheduled"]), c))
    assert [c for (c,) in env.rows(
        "SELECT c.gong_call_id FROM opportunities o JOIN call_opportunities co ON co.opportunity_id = o.id "
        "JOIN calls c ON c.id = co.call_id WHERE o.gong_opportunity_id = %s ORDER BY c.scheduled_at, c.gong_call_id",
        (o,))] == calls
    emails = sorted(src.emails_of(o).items(), key=lambda e: (e[1], e[0]))
    assert env.rows("SELECT e.gong_email_id, e.sent_at FROM opportunities o JOIN emails e ON e.opportunity_id = o.id "
                    "WHERE o.gong_opportunity_id = %s ORDER BY e.sent_at, e.gong_email_id", (o,)) == emails


def sync_status(env) -> dict[str, tuple]:  # noqa: ANN001
    return {r[0]: r[1:] for r in env.rows(
        "SELECT entity_type, last_sync_timestamp, last_sync_status, items_synced, errors_count, error_details "
        "FROM sync_status")}


def assert_sync_status(env, report) -> None:  # noqa: ANN001
    """One row per asset, in the app's shape, telling what the run's outcomes tell."""
    rows = sync_status(env)
    assert set(rows) == set(ASSETS)
    for o in report.outcomes:
        checkpoint, status, items, errors, details = rows[o.asset]
        assert checkpoint is not None, o.asset
        assert isinstance(items, int) and items >= 0 and isinstance(errors, int) and errors >= 0, (o.asset, items, errors)
        assert {"error", "checkpoints", "deleted", "cascade"} <= set(details), (o.asset, details)
        assert details["deleted"] == o.rows_deleted, (o.asset, details)
        assert nonzero(details["cascade"]) == nonzero(o.cascade), (o.asset, details)
        if o.status == "failed":
            assert status == "failed" and details["error"], (o.asset, status, details)
        elif errors == 0:
            assert (status, details["error"]) == ("success", None), (o.asset, status, details)
        else:
            assert status in ("success", "partial"), (o.asset, status)


# -- the schema's shape, read from the catalog ---------------------------------------------------


@dataclass
class Shape:
    tables: set[str]
    columns: dict[tuple[str, str], tuple]  # (table, column) -> (type, not null, default)
    primary_keys: set[tuple]
    unique_keys: set[tuple]
    foreign_keys: set[tuple]
    indexes: set[tuple]  # (table, method, key columns, partial)
    enums: dict[str, list[str]]


#: Columns APP_SCHEMA.md names without saying their type or nullability: the DDL had to pick.
OPEN_COLUMNS = {("users", "created_at"), ("users", "updated_at"), ("emails", "created_at"),
                ("call_opportunities", "created_at")}
#: Columns it names without a type, holding text: varchar or text both honour it.
TEXT_COLUMNS = {("opportunities", "name"), ("opportunities", "account_name"), ("opportunities", "owner_email"),
                ("opportunities", "stage"), ("emails", "subject"), ("emails", "sender_email")}
#: The defaults it states.
STATED_DEFAULTS = {("calls", "id"), ("calls", "created_at"), ("calls", "prefect_reps"),
                   ("speakers", "company_side"), ("users", "role")}
#: Foreign keys whose ON DELETE it leaves open.
OPEN_DELETE_RULES = {("speakers", "manager_id")}


def _default(conn: psycopg.Connection, expr: str | None) -> str | None:
    """A default by what it gives: `'{}'::varchar[]` and `ARRAY[]::varchar[]` are the same default."""
    if expr is None:
        return None
    low = expr.lower()
    if "gen_random_uuid" in low or "uuid_generate" in low:
        return "<random uuid>"
    if "now()" in low or "current_timestamp" in low:
        return "<now>"
    return conn.execute(f"SELECT ({expr})::text").fetchone()[0]


def read_shape(conn: psycopg.Connection) -> Shape:
    tables = set(CONTRACT_TABLES)
    public = {t for (t,) in conn.execute("SELECT relname FROM pg_class WHERE relnamespace = 'public'::regnamespace "
                                         "AND relkind IN ('r', 'p')")}
    columns = {}
    for table, column, kind, not_null, default in conn.execute("""
            SELECT c.relname, a.attname, format_type(a.atttypid, a.atttypmod), a.attnotnull, pg_get_expr(d.adbin, d.adrelid)
            FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid
            LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
            WHERE c.relnamespace = 'public'::regnamespace AND c.relname = ANY(%s) AND a.attnum > 0 AND NOT a.attisdropped""",
            (list(tables),)).fetchall():
        kind = re.sub(r"character varying\(\d+\)", "character varying", kind)
        columns[(table, column)] = (kind, not_null, _default(conn, default) if (table, column) in STATED_DEFAULTS else None)
    primary, unique, indexes = set(), set(), set()
    for table, is_primary, is_unique, keys, definition, method in conn.execute("""
            SELECT c.relname, i.indisprimary, i.indisunique,
                   array(SELECT a.attname FROM unnest(i.indkey) WITH ORDINALITY k(n, o)
                         JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.n ORDER BY k.o),
                   pg_get_indexdef(i.indexrelid), am.amname
            FROM pg_index i JOIN pg_class c ON c.oid = i.indrelid JOIN pg_class ic ON ic.oid = i.indexrelid
            JOIN pg_am am ON am.oid = ic.relam
            WHERE c.relnamespace = 'public'::regnamespace AND c.relname = ANY(%s)""", (list(tables),)).fetchall():
        if is_primary:
            primary.add((table, tuple(keys)))
        if is_unique:
            unique.add((table, tuple(keys)))
        found = re.search(r"USING \w+ \((.*?)\)( WHERE .*)?$", definition)
        indexes.add((table, method, " ".join(found.group(1).split()), bool(found.group(2))))
    foreign = set()
    for table, column, definition in conn.execute("""
            SELECT c.relname, (SELECT attname FROM pg_attribute WHERE attrelid = k.conrelid AND attnum = k.conkey[1]),
                   pg_get_constraintdef(k.oid)
            FROM pg_constraint k JOIN pg_class c ON c.oid = k.conrelid
            WHERE k.contype = 'f' AND c.relnamespace = 'public'::regnamespace AND c.relname = ANY(%s)""",
            (list(tables),)).fetchall():
        if (table, column) in OPEN_DELETE_RULES:
            definition = re.sub(r" ON DELETE .*$", "", definition)
        foreign.add((table, definition))
    enums = {name: labels for name, labels in conn.execute("""
            SELECT t.typname, array_agg(e.enumlabel::text ORDER BY e.enumsortorder)
            FROM pg_type t JOIN pg_enum e ON e.enumtypid = t.oid
            WHERE t.typnamespace = 'public'::regnamespace GROUP BY t.typname""")}
    return Shape(public, columns, primary, unique, foreign, indexes, enums)


def shape_problems(actual: Shape, reference: Shape) -> list[str]:
    """How `actual` departs from the app's migrations, where APP_SCHEMA.md pins the shape down."""
    problems = []
    if set(actual.columns) != set(reference.columns):
        problems.append(f"columns missing {sorted(set(reference.columns) - set(actual.columns))}, "
                        f"extra {sorted(set(actual.columns) - set(reference.columns))}")
    for key, (kind, not_null, default) in reference.columns.items():
        if key not in actual.columns or key in OPEN_COLUMNS:
            continue
        a_kind, a_not_null, a_default = actual.columns[key]
        if key in TEXT_COLUMNS:
            if a_kind not in ("character varying", "text"):
                problems.append(f"{key}: type {a_kind}, expected text")
        elif a_kind != kind:
            problems.append(f"{key}: type {a_kind}, expected {kind}")
        if a_not_null != not_null:
            problems.append(f"{key}: not null {a_not_null}, expected {not_null}")
        if a_default != default:
            problems.append(f"{key}: default {a_default}, expected {default}")
    if actual.primary_keys != reference.primary_keys:
        problems.append(f"primary keys {sorted(actual.primary_keys)}, expected {sorted(reference.primary_keys)}")
    if not reference.unique_keys <= actual.unique_keys:
        problems.append(f"unique keys missing {sorted(reference.unique_keys - actual.unique_keys)}")
    if actual.foreign_keys != reference.foreign_keys:
        problems.append(f"foreign keys missing {sorted(reference.foreign_keys - actual.foreign_keys)}, "
                        f"extra {sorted(actual.foreign_keys - reference.foreign_keys)}")
    if not reference.indexes <= actual.indexes:
        problems.append(f"indexes missing {sorted(reference.indexes - actual.indexes)}")
    for name in ("speaker_role", "user_role"):
        if actual.enums.get(name) != reference.enums[name]:
            problems.append(f"enum {name}: {actual.enums.get(name)}, expected {reference.enums[name]}")
    return problems


def _database_url(server_url: str, name: str) -> str:
    parts = urlsplit(server_url)
    return urlunsplit(parts._replace(path=f"/{name}"))


# -- fixtures -------------------------------------------------------------------------------------


@dataclass
class AppDb:
    """A test's database: the app's migrations ran on it (`app_migrated`), or nothing did (`empty`)."""

    env: object  # tests.conftest.Env
    mode: str

    @property
    def migrated(self) -> bool:
        return self.mode == "app_migrated"

    def install_app_tables(self) -> None:
        """On a schema the pipeline built, the app's migrations add the app's own tables."""
        if not self.migrated:
            with self.env.connect() as conn:
                create_app_own_tables(conn)


@pytest.fixture(params=["app_migrated", "empty"])
def app_db(request: pytest.FixtureRequest, env, monkeypatch: pytest.MonkeyPatch) -> AppDb:  # noqa: ANN001
    for name in ("MASS_DELETE_MAX_SHARE", "MASS_DELETE_MIN_ROWS", "SYNC_SCHEMA"):
        monkeypatch.delenv(name, raising=False)
    seed_workspace(env.bq, project=env.emulator.project, gong_dataset=env.gong_dataset,
                   salesforce_dataset=env.salesforce_dataset, calls=40)
    if request.param == "app_migrated":
        with env.connect() as conn:
            create_app_schema(conn)
    return AppDb(env, request.param)


@pytest.fixture(scope="module")
def reference_shape(pg_server_url: str) -> Shape:
    """The shape the app's migrations give a database (this module's DDL, in a database of its own)."""
    name = f"ref_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(pg_server_url, autocommit=True) as admin:
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    try:
        with psycopg.connect(_database_url(pg_server_url, name), autocommit=True) as conn:
            create_app_schema(conn)
            return read_shape(conn)
    finally:
        with psycopg.connect(pg_server_url, autocommit=True) as admin:
            admin.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


@pytest.fixture
def slack(monkeypatch: pytest.MonkeyPatch):  # noqa: ANN201
    """A loopback Slack webhook: SLACK_WEBHOOK_URL points at it; yields the bodies POSTed to it."""
    received: list[str] = []

    class Webhook(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 - http.server's name
            received.append(self.rfile.read(int(self.headers.get("Content-Length") or 0)).decode("utf-8", "replace"))
            self.send_response(200)
            self.end_headers()
            self.wfile.write(b"ok")

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Webhook)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    monkeypatch.setenv("SLACK_WEBHOOK_URL", f"http://127.0.0.1:{server.server_port}/services/T000/B000/contract")
    monkeypatch.delenv("PAGERDUTY_ROUTING_KEY", raising=False)
    try:
        yield received
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def materialize(env, *args: str) -> subprocess.CompletedProcess[str]:  # noqa: ANN001
    """The CLI in a subprocess, with the test's settings and the session's Prefect server."""
    from prefect.settings import PREFECT_API_URL

    environ = {**os.environ, **env.vars(), "PREFECT_API_URL": PREFECT_API_URL.value() or ""}
    return subprocess.run([sys.executable, "-m", "runtime.cli", *args], env=environ, capture_output=True,
                          text=True, timeout=300, stdin=subprocess.DEVNULL)


# -- tests ----------------------------------------------------------------------------------------


def test_app_ddl_creates(env):
    """The test's own DDL: the app's tables, enums, keys and triggers exist and behave."""
    with env.connect() as conn:
        create_app_schema(conn)
        shape = read_shape(conn)
    assert set(CONTRACT_TABLES) | set(APP_OWN_TABLES) <= shape.tables
    assert shape.enums == {"speaker_role": ["ae", "se", "csm", "support"], "user_role": ["admin", "manager", "rep"]}
    assert shape.columns[("calls", "scheduled_at")][0] == "timestamp without time zone"
    assert shape.columns[("speakers", "talk_time_percentage")][0] == "numeric(5,2)"
    assert shape.columns[("calls", "prefect_reps")] == ("character varying[]", False, "{}")
    assert ("transcripts", "FOREIGN KEY (speaker_id) REFERENCES speakers(id) ON DELETE SET NULL") in shape.foreign_keys
    assert ("calls", ("gong_call_id",)) in shape.unique_keys
    # The triggers: full text on insert, role history only for role changes, users.updated_at.
    call = env.rows("INSERT INTO calls (gong_call_id) VALUES ('1') RETURNING id")[0][0]
    speaker = env.rows("INSERT INTO speakers (id, call_id, name, role) VALUES (gen_random_uuid(), %s, 'Ada', 'ae') "
                       "RETURNING id", (call,))[0][0]
    env.rows("INSERT INTO speakers (id, call_id, name) VALUES (gen_random_uuid(), %s, 'Bo') RETURNING id", (call,))
    env.rows("UPDATE speakers SET name = name || '!' RETURNING id")
    env.rows("UPDATE speakers SET role = 'se' WHERE id = %s RETURNING id", (speaker,))
    assert env.rows("SELECT speaker_id, old_role::text, new_role::text FROM speaker_role_history ORDER BY changed_at") == [
        (speaker, None, "ae"), (speaker, "ae", "se")]
    env.rows("INSERT INTO transcripts (id, call_id, sequence_number, text) VALUES "
             "(gen_random_uuid(), %s, 0, 'Pricing tiers') RETURNING id", (call,))
    assert env.rows("SELECT full_text_search @@ plainto_tsquery('english', 'price') FROM transcripts") == [(True,)]
    env.rows("INSERT INTO users (id, email, name, updated_at) VALUES (gen_random_uuid(), 'a@x', 'A', '2000-01-01') "
             "RETURNING id")
    env.rows("UPDATE users SET name = 'B' RETURNING id")
    assert env.rows("SELECT role::text, updated_at > '2001-01-01' FROM users") == [("rep", True)]


def test_the_app_keeps_its_ids_and_its_work_through_first_incremental_and_full_refresh_runs(app_db):
    env = app_db.env
    src = read_source(env)
    picks = choose(src)

    # First run: an earlier importer's rows are adopted; on an empty database the app moves in after.
    if app_db.migrated:
        work, imported = earlier_importer(env, src, picks)
        first = sync("*")
        assert_success(first)
        assert_adopted(env, imported)
    else:
        first = sync("*")
        assert_success(first)
        work = app_moves_in(app_db, src, picks)
    assert_sync_status(env, first)
    assert_read_patterns(env, src, picks)
    app_changes_role(env, work)
    before = snapshot(env)
    assert {c[0] for c in before.coaching} == set(work.coaching.values())

    # Incremental: a rename, a rep's new email, two new calls, and a deleted call the app coached.
    old_rep_email = src.users[picks.rep_user]["email_address"]
    gong_changes(env, src, picks)
    src = read_source(env)
    second = sync("*")
    assert_success(second)
    after = snapshot(env)
    assert_kept(before, after, gone={picks.doomed})
    assert picks.doomed not in after.ids["calls"]
    assert env.rows("SELECT id, title FROM calls WHERE gong_call_id = %s", (picks.coached,)) == [
        (work.calls["coached"], RENAMED)]
    assert env.rows("SELECT email, role::text, manager_id FROM speakers WHERE id = %s", (work.rep,)) == [
        (MOVED_EMAIL, "se", work.manager)]
    # The rep's account keeps its id (and role) under the email it had: the pipeline never deletes one.
    assert after.ids["users"].get(old_rep_email) == work.manager
    calls = outcome(second, "calls")
    assert calls.rows_deleted == 1
    # One coaching row went with the call (through calls and through speakers): counted once.
    assert nonzero(calls.cascade).get("public.coaching_sessions") == 1, calls.cascade
    assert nonzero(calls.cascade).get("public.analysis_runs") == 1, calls.cascade
    assert sum(nonzero(o.cascade).get("public.coaching_sessions", 0) for o in second.outcomes) == 1
    details = sync_status(env)["calls"][4]
    assert (details["deleted"], details["cascade"]["public.coaching_sessions"]) == (1, 1)
    assert sync_status(env)["calls"][0] == LATER
    assert_sync_status(env, second)
    assert_read_patterns(env, src, picks)
    # The new calls: ids of their own, names by the fallbacks, no share of a silence.
    assert env.rows("SELECT s.name, s.email, s.talk_time_percentage FROM speakers s JOIN calls c ON c.id = s.call_id "
                    "WHERE c.gong_call_id = %s ORDER BY s.name", (SILENT_CALL,)) == [
        ("George Coyne", "george.coyne@hooli.com", None), ("Speaker 5600000000000900003", None, None)]
    assert env.rows("SELECT prefect_reps FROM calls WHERE gong_call_id = %s", (SILENT_CALL,)) == [([],)]
    assert env.rows("SELECT t.speaker_id FROM transcripts t JOIN calls c ON c.id = t.call_id "
                    "WHERE c.gong_call_id = %s AND t.sequence_number = 1", (NEW_CALL,)) == [(None,)]

    # Full refresh: everything reloaded, nothing deleted, nothing re-created.
    third = sync("*", full_refresh=True)
    assert_success(third)
    assert [(o.asset, o.rows_deleted, nonzero(o.cascade)) for o in third.outcomes] == [
        (o.asset, 0, {}) for o in third.outcomes]
    final = snapshot(env)
    assert final.ids == after.ids
    assert_kept(after, final)
    assert_sync_status(env, third)
    assert_read_patterns(env, src, picks)

    # The role history holds the app's own role writes, and nothing the pipeline did.
    live_speakers = {i for ids in final.ids["speakers"].values() for i in ids}
    assert Counter(env.rows("SELECT speaker_id, old_role::text, new_role::text FROM speaker_role_history")) == Counter(
        h for h in work.history if h[0] in live_speakers)


def test_app_tables_keep_the_app_shape(app_db, reference_shape):
    """Empty database: the pipeline builds the app's shape. Migrated one: it changes nothing of it.
    Either way its bookkeeping stays out of `public`."""
    assert_success(sync("*"))
    with app_db.env.connect() as conn:
        actual = read_shape(conn)
    expected_tables = set(CONTRACT_TABLES) | (set(APP_OWN_TABLES) if app_db.migrated else set())
    assert actual.tables == expected_tables
    assert not shape_problems(actual, reference_shape), shape_problems(actual, reference_shape)
    # The full-text trigger exists: the pipeline never writes full_text_search, yet it is filled.
    assert app_db.env.rows("SELECT count(*) > 0, count(*) FILTER (WHERE full_text_search IS NULL) FROM transcripts") == [
        (True, 0)]
    assert {n for (n,) in app_db.env.rows("SELECT nspname FROM pg_namespace")} >= {"gong_sync", "gong_raw"}


def test_a_mass_delete_waits_for_allow_mass_delete_and_alerts(app_db, slack, monkeypatch):
    env = app_db.env
    monkeypatch.setenv("MASS_DELETE_MIN_ROWS", "5")
    src = read_source(env)
    assert_success(sync("*"))
    app_db.install_app_tables()
    ids = dict(env.rows("SELECT gong_call_id, id FROM calls"))

    # One call of ~40 is under the 5% share: deleted as usual.
    linked = {c for c, _ in src.links}
    unlinked = [c for c in sorted(src.calls) if c != CASES.shared_call_id and c not in linked]
    small = min(unlinked, key=lambda c: (len(src.speakers_of(c)) + sum(k[0] == c for k in src.transcripts), c))
    gong_deletes_calls(env, [small])
    report = sync("*")
    assert_success(report)
    assert outcome(report, "calls").rows_deleted == 1

    # Half the calls: held back, nothing deleted, the app's rows untouched, an alert.
    victims = sorted(set(src.calls) - {CASES.shared_call_id, small})[: len(src.calls) // 2]
    kept = sorted(set(src.calls) - set(victims) - {small, CASES.shared_call_id})[0]
    coached = [*victims[:3], kept]
    with env.connect() as conn:
        for g in coached:
            rep = one(conn, "SELECT id FROM speakers WHERE call_id = %s ORDER BY id LIMIT 1", (ids[g],))
            conn.execute("INSERT INTO coaching_sessions (call_id, rep_id, notes) VALUES (%s, %s, 'notes')", (ids[g], rep))
    calls_before = dict(env.rows("SELECT gong_call_id, id FROM calls"))
    slack.clear()
    gong_deletes_calls(env, victims)

    held = sync("*")
    calls = outcome(held, "calls")
    assert (held.status, calls.status, calls.rows_deleted) == ("failed", "failed", 0)
    assert "--allow-mass-delete" in calls.error
    for asset in ("users", "opportunities", "emails"):
        assert outcome(held, asset).status == "success", outcome(held, asset).error
    assert dict(env.rows("SELECT gong_call_id, id FROM calls")) == calls_before
    assert env.rows("SELECT count(*) FROM coaching_sessions") == [(len(coached),)]
    _, status, _, _, details = sync_status(env)["calls"]
    assert status == "failed" and "--allow-mass-delete" in details["error"]
    assert wait_for(lambda: any(re.search(r"\bcalls\b", body) for body in slack)), slack

    # Allowed: the deletes go through, and what they took with them is counted.
    allowed = sync("*", allow_mass_delete=True)
    assert_success(allowed)
    calls = outcome(allowed, "calls")
    assert calls.rows_deleted == len(victims)
    # Three coaching rows went (each reachable through calls and through speakers): counted once each.
    assert nonzero(calls.cascade).get("public.coaching_sessions") == 3, calls.cascade
    assert {g for (g,) in env.rows("SELECT gong_call_id FROM calls")} == set(src.calls) - set(victims) - {small}
    assert env.rows("SELECT c.gong_call_id FROM coaching_sessions s JOIN calls c ON c.id = s.call_id") == [(kept,)]
    details = sync_status(env)["calls"][4]
    assert (details["deleted"], details["cascade"]["public.coaching_sessions"]) == (len(victims), 3)


#: An earlier importer's duplicate: without the unique constraint, gong_call_id no longer names one call.
_DUPLICATE_CALL = ("INSERT INTO calls (gong_call_id, title) VALUES "
                   "('7300000000000000000', 'imported twice'), ('7300000000000000000', 'imported twice')")


@pytest.mark.parametrize(("changes", "named"), [
    (["ALTER TABLE calls DROP COLUMN scheduled_at"],
     [r"\bcalls\b", r"\bscheduled_at\b", r"timestamp without time zone"]),
    (["ALTER TABLE calls ALTER COLUMN duration_seconds TYPE text USING duration_seconds::text"],
     [r"\bcalls\b", r"\bduration_seconds\b", r"\bint(eger|4)?\b", r"\btext\b"]),
    (["ALTER TABLE calls DROP CONSTRAINT calls_gong_call_id_key", _DUPLICATE_CALL],
     [r"\bcalls\b", r"\bgong_call_id\b"]),
], ids=["missing-column", "incompatible-type", "key-not-unique"])
def test_an_app_table_that_breaks_the_contract_stops_the_run_before_any_work(env, changes, named):
    seed_workspace(env.bq, project=env.emulator.project, gong_dataset=env.gong_dataset, calls=40, tables=["gong.call"])
    with env.connect() as conn:
        create_app_schema(conn)
        for change in changes:
            conn.execute(change)
        before = read_shape(conn)
    rows_before = env.rows("SELECT * FROM calls ORDER BY id")

    result = materialize(env, "--asset", "calls")

    assert result.returncode == 2, (result.returncode, result.stderr[-3000:])
    missing = [p for p in named if not re.search(p, result.stderr)]
    assert not missing, (missing, result.stderr[-3000:])
    assert env.rows("SELECT * FROM calls ORDER BY id") == rows_before
    with env.connect() as conn:
        assert read_shape(conn) == before  # the app's schema is the app's: not "repaired"
