"""Unusual source data never blocks a sync (issue 13): one bad value costs one row, an unusual but
valid shape costs nothing. On real parts: tables this module creates itself in the emulator (Parquet
load jobs), the real flow (`tests.helpers.sync`), the embedded Postgres.

- A generated hostile workspace (`hostile`, from a random seed it prints; `HOSTILE_SEED=<n>`
  replays one): NUL bytes in strings, `\\u0000` inside JSON text, 1 MB strings, empty strings,
  NaN, ±infinity and -0 in FLOAT64, -0 and the extremes of NUMERIC (which has no NaN), the
  extremes of INT64, years 1 and 9999, timestamps with and without microseconds, an all-NULL
  column of every type, mixed-case and reserved-word column names (`Order`, `CamelCase`,
  `select`, `_dlt_load_id`), and sources without their optional columns (`users` without names or
  `active`, `call_speaker` without `talk_time`, no `call_participant` at all). Every good row
  lands exactly, in the raw replica and in the app's tables; every row that held a NUL lands
  without it and is in dead letters with its reason and the original escaped; a second run is a
  no-op.
- Unusual shapes: a `call` table with only its key and Fivetran's columns; a source table without
  a column its asset cannot do without (fails that asset alone, naming both); a value the app's
  column cannot hold; a mixed-case column that changes type; an email that fails validation and
  holds NUL; JSON text holding `\\u0000`; a source table without rows; a batch where every row is
  rejected.
- The 30-email workspace of the issue.
- 100,000 monologues of 1–5 KB through the project's own emulator launcher (`slow`).
"""

from __future__ import annotations

import datetime as dt
import decimal
import hashlib
import io
import json
import logging
import math
import os
import random
import re
from collections.abc import Callable
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from google.cloud import bigquery

from runtime.local.emulator import BigQueryEmulator
from runtime.local.mutations import update_rows
from runtime.local.seed import seed_workspace
from runtime.local.source_schema import arrow_schema
from runtime.local.synthetic import Plan, table_chunks
from tests.helpers import outcome, sync

#: The core assets: their source tables are the ones the hostile workspace creates.
CORE = "users,calls,transcripts,speakers"
WORKSPACES = ("4962843701975625720", "1157384209382374611")
INTERNAL_DOMAIN = "prefect.io"  # INTERNAL_EMAIL_DOMAINS' default
NUL = "\x00"
MB = 1_000_000
BASE = dt.datetime(2026, 1, 5, 9, 0, 0, tzinfo=dt.UTC)
#: The issue's sentence: NUL removed, the row landed without it, the original in dead letters.
NUL_REASON = "NUL"

S, J, I, F, N, B, T, D = "STRING", "JSON", "INT64", "FLOAT64", "NUMERIC", "BOOL", "TIMESTAMP", "DATE"


def fields(*columns: tuple[str, str]) -> list[bigquery.SchemaField]:
    return [bigquery.SchemaField(name, kind) for name, kind in columns]


SYSTEM = (("_fivetran_synced", T), ("_fivetran_deleted", B))

# -- the hostile call table: every type the mapping supports, hostile names, all-NULL columns --------

#: Columns of the app's calls row of their own; every other non-system field goes to metadata.
CALL_OWN = ("id", "title", "scheduled", "purpose", "url", "duration")
#: One all-NULL column per type.
NOTHING = {f"nothing_{kind.lower()}": kind for kind in (S, J, I, F, N, B, T, D)}
CALL_FIELDS = fields(
    ("id", S), ("workspace_id", S), ("title", S), ("scheduled", T), ("started", T), ("duration", I),
    ("purpose", S), ("url", S), ("custom_data", J), ("Order", I), ("CamelCase", S), ("select", S),
    ("_dlt_load_id", S), ("score", F), ("amount", N), ("is_private", B), ("day", D),
    *NOTHING.items(), *SYSTEM,
)
#: Source column → raw column: dlt's snake_case; a name of dlt's own gets a `src` prefix
#: (runtime/schema.py `landing_names`), never overwriting dlt's column.
LANDING = {"Order": "order", "CamelCase": "camel_case", "_dlt_load_id": "src_dlt_load_id"}
#: Raw column types (format_type) by BigQuery type, as README's mapping table states them.
PG_TYPES = {S: "character varying", J: "character varying", I: "bigint", F: "double precision",
            N: "numeric(38,9)", B: "boolean", T: "timestamp(6) with time zone", D: "date"}

# The hostile values of each column, each given to one row (row i gets the i-th); other rows draw
# ordinary values from the seed. Row 0 holds the first of each list and sits in the newest
# Fivetran batch: the one a later run reads again (the cursor range is closed).
LAST_US = dt.datetime(9999, 12, 31, 23, 59, 59, 999999, tzinfo=dt.UTC)
YEAR_1 = dt.datetime(1, 1, 1, tzinfo=dt.UTC)
DEC_MAX = decimal.Decimal("99999999999999999999999999999.999999999")
DEC_MIN = decimal.Decimal("-99999999999999999999999999999.999999999")  # not -DEC_MAX: that rounds
CALL_SPECIALS: dict[str, list] = {
    "title": ["Acme\x00 <> Prefect | Demo", "", None, "\x00", 'emoji 😀, 中文, "quotes", \\ back\tslash\nnew line',
              "\x01\x1f control characters", "1MB"],
    "scheduled": [YEAR_1, LAST_US, BASE, BASE + dt.timedelta(microseconds=1), None,
                  dt.datetime(1969, 12, 31, 23, 59, 59, 999999, tzinfo=dt.UTC), dt.datetime(1970, 1, 1, tzinfo=dt.UTC)],
    "started": [LAST_US, YEAR_1, None, BASE + dt.timedelta(seconds=1)],
    "duration": [0, -1, 2_147_483_647, None, -2_147_483_647, 2_147_483_648],
    "purpose": ["", None, "Demo", "Pur\x00pose"],
    "url": [None, ""],
    "custom_data": ['{"a":"\\u0000"}', "{}", "[]", '"just a string"',
                    '{"nested": {"k": [1, 2.5, null, true]}, "uni": "é😀", "esc": "tab\\tquote\\""}',
                    "12345678901234567890", None],
    "Order": [2**63 - 1, -(2**63), 0, None, -1],
    "CamelCase": ["Ca\x00mel", "", None, "ünïcödé"],
    "select": ["\x00\x00", "DROP TABLE calls; --", "", "select"],
    "_dlt_load_id": ["1764660000.123456", "", None, "not a load id"],
    "score": [math.nan, -0.0, 0.0, math.inf, -math.inf, 5e-324, 1.7976931348623157e308, None],
    "amount": [decimal.Decimal("-0"), DEC_MAX, DEC_MIN, decimal.Decimal("0.000000001"), None],
    "is_private": [True, False, None],
    "day": [dt.date(1, 1, 1), dt.date(9999, 12, 31), None, dt.date(1970, 1, 1)],
    "_fivetran_deleted": [False, None, False, False, False, False, False, True],
}
USER_FIELDS = fields(("id", S), ("email_address", S), *SYSTEM)  # no names, no `active`, no `title`
SPEAKER_FIELDS = fields(("id", S), ("call_id", S), ("user_id", S), *SYSTEM)  # no `talk_time`
TRANSCRIPT_FIELDS = fields(("call_id", S), ("index", I), ("workspace_id", S), ("speaker_id", S), ("topic", S),
                           ("sentence", J), *SYSTEM)

_WORDS = ["deal", "pricing", "renewal", "security", "SSO", "Prefect", "flows", "naïve", "Größe", "東京", "😀",
          "O'Brien", "it's", "50%", "$$", "--", ";", "{x}", "[1]", "a\\b", '"q"', "tab\there", "ß", "Ω", "…"]
_NAMES = ["ada", "bruno", "chloe", "dmitri", "eve", "farah", "gus", "hana", "ivan", "jia", "kwame", "lena"]


def words(rng: random.Random, count: int) -> str:
    return " ".join(rng.choice(_WORDS) for _ in range(count))


def megabyte_text(rng: random.Random) -> str:
    """About 1 MB of text (UTF-8), from a small vocabulary so the app's full-text index stays small."""
    text = words(rng, MB // 5)
    return text.encode()[:MB].decode(errors="ignore")


def random_timestamp(rng: random.Random) -> dt.datetime:
    stamp = YEAR_1 + dt.timedelta(microseconds=rng.randrange(int((LAST_US - YEAR_1) / dt.timedelta(microseconds=1))))
    return stamp if rng.random() < 0.5 else stamp.replace(microsecond=0)


def random_decimal(rng: random.Random) -> decimal.Decimal:
    return decimal.Decimal(f"{rng.choice('-+')}{rng.randrange(10**rng.randint(1, 29))}.{rng.randrange(10**9):09d}")


def random_float(rng: random.Random) -> float:
    return rng.choice([rng.uniform(-1e6, 1e6), rng.random(), float(rng.randint(-10**9, 10**9)),
                       rng.uniform(-1e300, 1e300), rng.uniform(-1e-300, 1e-300)])


def random_value(rng: random.Random, name: str, kind: str) -> object:
    if kind == S:
        return words(rng, rng.randint(1, 8))
    if kind == J:
        return json.dumps({"crm_stage": rng.choice(["Demo", "Négociation"]), "priority": rng.randint(1, 3),
                           "tags": [words(rng, 1) for _ in range(rng.randint(0, 3))]}, ensure_ascii=False)
    if kind == I:
        return rng.randint(0, 7200) if name == "duration" else rng.randint(-(2**63), 2**63 - 1)
    if kind == F:
        return random_float(rng)
    if kind == N:
        return random_decimal(rng)
    if kind == B:
        return rng.random() < 0.5
    if kind == T:
        return random_timestamp(rng)
    if kind == D:
        return random_timestamp(rng).date()
    raise AssertionError(kind)


def synced(position_from_newest: int) -> dt.datetime:
    """Fivetran batches of 4 rows, a minute apart; the newest batch has no microseconds, the others do."""
    batch = position_from_newest // 4
    return BASE + dt.timedelta(hours=2) - dt.timedelta(minutes=batch, microseconds=batch * 7)


@dataclass
class Hostile:
    """The generated workspace: each table's schema and rows as they were loaded."""

    seed: int
    tables: dict[str, tuple[list[bigquery.SchemaField], list[dict]]] = field(default_factory=dict)

    def rows(self, table: str) -> list[dict]:
        return self.tables[table][1]

    def kinds(self, table: str) -> dict[str, str]:
        return {f.name: f.field_type for f in self.tables[table][0]}


def generate(seed: int, calls: int = 24) -> Hostile:
    rng = random.Random(seed)
    world = Hostile(seed)

    users = []
    for k in range(10):
        name = _NAMES[k % len(_NAMES)]
        domain = INTERNAL_DOMAIN if k % 3 else "acme-corp.com"
        users.append({"id": f"21000000000000000{k:02d}", "email_address": f"{name}.{_NAMES[(k * 7) % 12]}@{domain}"})
    users[1]["email_address"] = "ev\x00e.tanaka@" + INTERNAL_DOMAIN  # NUL: lands as eve.tanaka@…
    users[2]["email_address"] = ""
    users[3]["email_address"] = None
    for position, user in enumerate(users):
        user.update(_fivetran_synced=synced(position), _fivetran_deleted=position == 9)
    world.tables["users"] = (USER_FIELDS, users)

    call_rows = []
    kinds = {f.name: f.field_type for f in CALL_FIELDS}
    for i in range(calls):
        row: dict = {"id": str(7_300_000_000_000_000_000 + rng.randrange(10**15) * 1000 + i),
                     "workspace_id": WORKSPACES[i % 2]}
        for name, kind in kinds.items():
            if name in row or name.startswith("nothing_") or name == "_fivetran_synced":
                continue
            specials = CALL_SPECIALS.get(name, [])
            if i < len(specials):
                row[name] = specials[i]
            elif name == "_fivetran_deleted":
                row[name] = False
            elif name == "url":
                row[name] = f"https://app.gong.io/call?id={row['id']}"
            else:
                row[name] = random_value(rng, name, kind)
        if row["title"] == "1MB":
            row["title"] = megabyte_text(rng)
        row.update({name: None for name in NOTHING}, _fivetran_synced=synced(i))
        call_rows.append(row)
    world.tables["call"] = (CALL_FIELDS, call_rows)

    speakers, transcripts = [], []
    for c, call in enumerate(call_rows):
        ids = []
        for k in range(rng.randint(1, 3)):
            ids.append(f"56000000000000{c:03d}{k:02d}")
            user = rng.choice([*users, {"id": "2199999999999999999"}, {"id": None}])  # unknown, none
            speakers.append({"id": ids[-1], "call_id": call["id"], "user_id": user["id"]})
        for index in range(rng.randint(0, 3)):
            sentences = [{"start": index * 30_000 + 9_000 * n, "end": index * 30_000 + 9_000 * n + 8_000,
                          "text": words(rng, rng.randint(1, 12))} for n in range(rng.randint(1, 3))]
            transcripts.append({"call_id": call["id"], "index": index, "workspace_id": call["workspace_id"],
                                "speaker_id": rng.choice(ids), "topic": rng.choice(["Pricing", "Next Steps", None]),
                                "sentence": json.dumps(sentences, ensure_ascii=rng.random() < 0.5)})
    # Hostile monologues, on live calls (row 2 onwards), with indices no generated row uses.
    hosts = [c for c in call_rows if not c["_fivetran_deleted"] and c["_fivetran_deleted"] is not None][2:]
    odd = [
        {"sentence": '[{"start": 0, "end": 10, "text": "before\\u0000after"}]'},  # \u0000 in JSON text
        {"sentence": json.dumps([{"start": 0, "end": 1, "text": megabyte_text(rng)}])},  # 1 MB monologue
        {"sentence": "[]"},
        {"sentence": '"just a string"'},
        {"sentence": None},
        {"sentence": '[{"start": 5, "end": 9}, {"start": 10, "end": 12, "text": ""}]'},
        {"sentence": '[{"start": 99999999999, "end": 99999999999, "text": "\\ud83d\\ude00 escaped emoji"}]'},
        {"topic": "Pri\x00cing"},
        {"topic": ""},
        {"speaker_id": ""},
        {"speaker_id": None},
        {"speaker_id": "5699999999999999999"},
        {"workspace_id": "not-the-calls-workspace"},  # another workspace's copy: not this call's
    ]
    for n, change in enumerate(odd):
        call = hosts[n % len(hosts)]
        base = {"call_id": call["id"], "index": 100 + n, "workspace_id": call["workspace_id"],
                "speaker_id": None, "topic": "Pricing",
                "sentence": '[{"start": 1, "end": 2, "text": "plain"}]'}
        transcripts.append({**base, **change})
    for rows in (speakers, transcripts):
        # Newest first: the first hostile rows share the newest batch.
        count = len(rows)
        for position, row in enumerate(rows):
            row.update(_fivetran_synced=synced(count - 1 - position), _fivetran_deleted=False)
    # The NUL and \u0000 monologues go into the newest batch, too.
    for row in transcripts:
        if NUL in (row["topic"] or "") or "\\u0000" in (row["sentence"] or ""):
            row["_fivetran_synced"] = synced(0)
    world.tables["call_speaker"] = (SPEAKER_FIELDS, speakers)
    world.tables["transcript"] = (TRANSCRIPT_FIELDS, transcripts)
    return world


def create_table(env, table: str, schema: list[bigquery.SchemaField], rows: list[dict]) -> None:
    """Create a Gong table in the emulator and load its rows with a Parquet load job."""
    env.bq.create_dataset(f"{env.emulator.project}.{env.gong_dataset}", exists_ok=True)
    env.bq.delete_table(env.gong(table), not_found_ok=True)
    env.bq.create_table(bigquery.Table(env.gong(table), schema=schema))
    if not rows:
        return
    buffer = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows, schema=arrow_schema(schema)), buffer)
    buffer.seek(0)
    config = bigquery.LoadJobConfig(source_format=bigquery.SourceFormat.PARQUET,
                                    write_disposition=bigquery.WriteDisposition.WRITE_APPEND)
    env.bq.load_table_from_file(buffer, env.gong(table), job_config=config).result()


@pytest.fixture
def hostile(env):
    seed = int(os.environ.get("HOSTILE_SEED") or random.SystemRandom().randrange(2**32))
    print(f"hostile workspace: seed {seed} (HOSTILE_SEED={seed} replays it)")
    world = generate(seed)
    for table, (schema, rows) in world.tables.items():
        create_table(env, table, schema, rows)
    env.world = world
    return env


# -- comparing -------------------------------------------------------------------------------------


class Problems(list):
    """Every mismatch found, so one run reports them all."""

    def check(self, what: str, actual: object, expected: object, same: Callable[[object, object], bool] | None = None):
        if not (same or equal)(actual, expected):
            self.append(f"{what}: got {short(actual)}, expected {short(expected)}")

    def verdict(self, seed: int | None = None) -> None:
        head = f"seed {seed}: " if seed is not None else ""
        assert not self, head + f"{len(self)} mismatch(es):\n" + "\n".join(self[:60])


def short(value: object) -> str:
    text = repr(value)
    return text if len(text) < 300 else f"{text[:150]}…({len(text)} chars)…{text[-100:]}"


def equal(actual: object, expected: object) -> bool:
    """Exact equality that tells NaN and the sign of zero, and compares aware datetimes by instant."""
    if isinstance(expected, float) and isinstance(actual, float):
        if math.isnan(expected):
            return math.isnan(actual)
        return actual == expected and math.copysign(1, actual) == math.copysign(1, expected)
    if isinstance(expected, decimal.Decimal) and isinstance(actual, decimal.Decimal):
        return actual == expected
    return type(actual) is type(expected) and actual == expected or (actual is None and expected is None)


def same_json_text(actual: object, expected: object) -> bool:
    return isinstance(actual, str) and isinstance(expected, str) and json.loads(actual) == json.loads(expected)


def no_nul(value: object, kind: str = "") -> object:
    """A value as it lands: NUL removed, and in JSON text its escape `\\u0000` too (the rule)."""
    if not isinstance(value, str):
        return value
    value = value.replace(NUL, "")
    return value.replace("\\u0000", "") if kind == J else value


def dict_rows(env, query: str, params: object = None) -> list[dict]:
    with env.connect() as conn:
        cur = conn.execute(query, params)
        names = [c.name for c in cur.description]
        return [dict(zip(names, r, strict=True)) for r in cur.fetchall()]


def raw_types(env, table: str) -> dict[str, str]:
    return dict(env.rows(
        "SELECT a.attname, format_type(a.atttypid, a.atttypmod) FROM pg_attribute a"
        " WHERE a.attrelid = %s::regclass AND a.attnum > 0 AND NOT a.attisdropped", (f"gong_raw.{table}",)))


def landing(name: str) -> str:
    return LANDING.get(name, name)


def check_raw_replica(problems: Problems, env, world: Hostile, table: str, key: tuple[str, ...]) -> None:
    """Every source row is one raw row holding its values (NUL removed), under its landing name,
    in the column type the mapping gives it; dlt's own columns are dlt's."""
    kinds = world.kinds(table)
    types = raw_types(env, f"gong__{table}")
    for name, kind in kinds.items():
        problems.check(f"gong__{table}.{landing(name)} type", types.get(landing(name)), PG_TYPES[kind])
    raw = {tuple(r[k] for k in key): r for r in dict_rows(env, f"SELECT * FROM gong_raw.gong__{table}")}  # noqa: S608
    source = {tuple(no_nul(r[k]) for k in key): r for r in world.rows(table)}
    problems.check(f"gong__{table} keys", sorted(raw, key=repr), sorted(source, key=repr))
    for k, row in source.items():
        got = raw.get(k)
        if got is None:
            continue
        for name, kind in kinds.items():
            problems.check(f"gong__{table}{list(k)}.{landing(name)}", got.get(landing(name)), no_nul(row[name], kind),
                           same_json_text if kind == J and row[name] is not None else None)
        if not re.fullmatch(r"\d+\.\d+", str(got.get("_dlt_load_id"))):
            problems.append(f"gong__{table}{list(k)}._dlt_load_id is not dlt's load id: {short(got.get('_dlt_load_id'))}")


def metadata_value(kind: str, value: object) -> object:
    """A raw value as `to_jsonb` of the raw row holds it."""
    if kind == F:
        if math.isnan(value):
            return "NaN"
        if math.isinf(value):
            return "Infinity" if value > 0 else "-Infinity"
        return value
    if kind == T:
        return value  # compared as an instant (`same_metadata`)
    if kind == D:
        return value.isoformat()
    if kind == N:
        return float(value)
    return no_nul(value, kind)


def same_metadata(kind: str) -> Callable[[object, object], bool]:
    def same(actual: object, expected: object) -> bool:
        if kind == T:
            return isinstance(actual, str) and dt.datetime.fromisoformat(actual) == expected
        if kind == J:
            return same_json_text(actual, expected)
        if kind in (F, N) and isinstance(expected, float):
            return isinstance(actual, (int, float)) and math.isclose(actual, expected, rel_tol=1e-15, abs_tol=1e-300)
        return equal(actual, expected)

    return same


def fits_integer(value: int | None) -> int | None:
    return value if value is not None and -(2**31) <= value < 2**31 else None


def name_from_email(email: str | None) -> str | None:
    """`gs_name_from_email`, for the simple addresses this workspace has."""
    if not email or email.find("@") < 1:
        return None
    return re.sub(r"[._+-]+", " ", email.split("@")[0]).strip().title() or None


def live_calls(world: Hostile) -> dict[str, dict]:
    return {c["id"]: c for c in world.rows("call") if not c["_fivetran_deleted"]}


def check_calls(problems: Problems, env, world: Hostile) -> None:
    kinds = world.kinds("call")
    app = {r["gong_call_id"]: r for r in dict_rows(
        env, "SELECT gong_call_id, title, scheduled_at, duration_seconds, call_type, date, metadata FROM calls")}
    calls = live_calls(world)
    problems.check("calls ids", sorted(app), sorted(calls))
    for gid, c in calls.items():
        got = app.get(gid)
        if got is None:
            continue
        scheduled = c["scheduled"].astimezone(dt.UTC).replace(tzinfo=None) if c["scheduled"] else None
        problems.check(f"calls[{gid}].title", got["title"], no_nul(c["title"]))
        problems.check(f"calls[{gid}].scheduled_at", got["scheduled_at"], scheduled)
        problems.check(f"calls[{gid}].date", got["date"], scheduled.date() if scheduled else None)
        problems.check(f"calls[{gid}].duration_seconds", got["duration_seconds"], fits_integer(c["duration"]))
        problems.check(f"calls[{gid}].call_type", got["call_type"], no_nul(c["purpose"]))
        expected = {landing(n): metadata_value(kinds[n], v) for n, v in c.items()
                    if n not in CALL_OWN and not n.startswith("_fivetran") and v is not None}
        if c["url"] is not None:
            expected["gong_url"] = c["url"]
        if c["duration"] is not None and fits_integer(c["duration"]) is None:
            expected["duration"] = c["duration"]  # duration_seconds cannot hold it: the exact value
        metadata = got["metadata"] or {}
        problems.check(f"calls[{gid}].metadata keys", sorted(metadata), sorted(expected))
        reverse = {landing(n): n for n in kinds}
        for key, want in expected.items():
            kind = kinds.get(reverse.get(key, key), S)
            problems.check(f"calls[{gid}].metadata.{key}", metadata.get(key), want, same_metadata(kind))


def expected_speakers(world: Hostile) -> dict[tuple[str, str], tuple]:
    """(call, speaker) → (name, email, company side, talk seconds, share) for every built speaker."""
    users = {u["id"]: no_nul(u["email_address"]) for u in world.rows("users") if not u["_fivetran_deleted"]}
    calls = live_calls(world)
    out = {}
    for s in world.rows("call_speaker"):
        if s["_fivetran_deleted"] or s["call_id"] not in calls:
            continue
        email = users.get(s["user_id"])
        side = bool(email) and "@" in email and email.split("@")[1].lower() == INTERNAL_DOMAIN
        out[(s["call_id"], s["id"])] = (name_from_email(email) or f"Speaker {s['id']}", email, side, None, None)
    return out


def check_speakers(problems: Problems, env, world: Hostile) -> None:
    app = {(r[0], r[1]): tuple(r[2:]) for r in env.rows(
        "SELECT m.gong_call_id, m.gong_speaker_id, s.name, s.email, s.company_side, s.talk_time_seconds,"
        " s.talk_time_percentage FROM speakers s JOIN gong_sync.speakers_ids m ON m.id = s.id")}
    expected = expected_speakers(world)
    problems.check("speakers keys", sorted(app), sorted(expected))
    for key, want in expected.items():
        problems.check(f"speakers{list(key)}", app.get(key), want)


def check_users(problems: Problems, env, world: Hostile) -> None:
    want = {}
    for u in world.rows("users"):
        email = no_nul(u["email_address"])
        if u["_fivetran_deleted"] or not email or email.split("@")[-1].lower() != INTERNAL_DOMAIN:
            continue
        want.setdefault(email.lower(), (email, name_from_email(email)))
    problems.check("app users", sorted(env.rows("SELECT email, name FROM users")), sorted(want.values()))


def sentences_of(text: str | None) -> list:
    try:
        value = json.loads(text) if text is not None else None
    except ValueError:
        return []
    return value if isinstance(value, list) else []


def expected_transcript(t: dict) -> dict:
    sentences = sentences_of(t["sentence"])
    texts = [e["text"] for e in sentences if isinstance(e, dict) and isinstance(e.get("text"), str)]
    first = sentences[0] if sentences and isinstance(sentences[0], dict) else {}
    last = sentences[-1] if sentences and isinstance(sentences[-1], dict) else {}
    start, end = first.get("start"), last.get("end")
    topic = no_nul(t["topic"])
    return {
        "text": " ".join(texts),
        "start_time_ms": fits_integer(start),
        "topics": [topic] if topic else [],
        "chunk_metadata": {"start_ms": start, "end_ms": end,
                           "duration_ms": end - start if start is not None and end is not None else None,
                           "topic": topic},
    }


def has_escaped_nul(t: dict) -> bool:
    return "\\u0000" in (t["sentence"] or "")


def check_transcripts(problems: Problems, env, world: Hostile) -> None:
    calls = live_calls(world)
    built = expected_speakers(world)
    app = {(r["gong_call_id"], r["sequence_number"]): r for r in dict_rows(
        env, "SELECT c.gong_call_id, t.sequence_number, t.text, t.start_time_ms, t.topics, t.chunk_metadata,"
             " m.gong_speaker_id FROM transcripts t JOIN calls c ON c.id = t.call_id"
             " LEFT JOIN gong_sync.speakers_ids m ON m.id = t.speaker_id")}
    expected = {}
    for t in world.rows("transcript"):
        call = calls.get(t["call_id"])
        if t["_fivetran_deleted"] or call is None or call["workspace_id"] != t["workspace_id"]:
            continue
        expected[(t["call_id"], t["index"])] = t
    # A monologue whose JSON holds \u0000 (which Postgres's jsonb cannot hold) either lands with
    # the NUL removed or is left out; either way its dead letter says why (check_dead_letters).
    optional = {k for k, t in expected.items() if has_escaped_nul(t)}
    problems.check("transcripts keys", sorted(set(app) - optional), sorted(set(expected) - optional))
    for key, t in expected.items():
        got = app.get(key)
        if got is None:
            continue
        want = expected_transcript(t)
        if key in optional:
            want["text"] = want["text"].replace(NUL, "")
        for column, value in want.items():
            problems.check(f"transcripts{list(key)}.{column}", got[column], value)
        speaker = t["speaker_id"] if (t["call_id"], t["speaker_id"]) in built else None
        problems.check(f"transcripts{list(key)}.speaker", got["gong_speaker_id"], speaker)


def expected_dead_letters(world: Hostile) -> tuple[dict, set]:
    """(asset, source table, primary key) → (the fields that held NUL, the source row); and the keys
    of rows that may have a dead letter (\\u0000 in JSON text)."""
    tables = {"call": ("calls", ("id", "workspace_id")), "users": ("users", ("id",)),
              "call_speaker": ("speakers", ("id", "call_id")),
              "transcript": ("transcripts", ("call_id", "index", "workspace_id"))}
    must, may = {}, set()
    for table, (asset, key) in tables.items():
        for row in world.rows(table):
            pk = json.dumps({k: row[k] for k in key}, sort_keys=True)
            kinds = world.kinds(table)
            held = sorted(landing(n) for n, v in row.items() if isinstance(v, str) and (
                NUL in v or (kinds.get(n) == J and "\\u0000" in v)))
            if held:
                must[(asset, table, pk)] = (held, row)
            if any(isinstance(v, str) and "\\u0000" in v for v in row.values()):
                may.add((asset, table, pk))
    return must, may


def check_dead_letters(problems: Problems, env, world: Hostile) -> None:
    letters = {(r["asset"], r["source_table"], json.dumps(r["primary_key"], sort_keys=True)): r for r in dict_rows(
        env, 'SELECT asset, source_table, primary_key, "row", errors FROM gong_sync.dead_letters')}
    must, may = expected_dead_letters(world)
    problems.check("dead letters of rows that held NUL", sorted(set(must) - set(letters)), [])
    problems.check("dead letters of rows that held none", sorted(set(letters) - set(must) - may), [])
    for key, (held, source) in must.items():
        letter = letters.get(key)
        if letter is None:
            continue
        reasons = {e.get("field"): e.get("error") or "" for e in letter["errors"]}
        problems.check(f"dead letter {key} fields", sorted(reasons), held)
        for name, reason in reasons.items():
            if NUL_REASON not in reason:
                problems.append(f"dead letter {key}: the reason for {name} does not say NUL: {reason!r}")
        for name in held:
            original = source[next(n for n in source if landing(n) == name)]
            problems.check(f"dead letter {key}.row.{name} (escaped)", letter["row"].get(name),
                           original.replace(NUL, "\\u0000"))
    # \u0000 inside JSON text: Postgres cannot parse it as jsonb. A monologue holding it must say
    # why its text is not what the JSON says: dead-lettered with the field and a reason.
    for t in world.rows("transcript"):
        if not has_escaped_nul(t):
            continue
        key = ("transcripts", "transcript",
               json.dumps({"call_id": t["call_id"], "index": t["index"], "workspace_id": t["workspace_id"]},
                          sort_keys=True))
        letter = letters.get(key)
        if letter is None or "sentence" not in json.dumps(letter["errors"]):
            problems.append(f"transcript {key[2]} holds \\u0000 in its sentence JSON: no dead letter names "
                            f"`sentence` (found {short(letter)})")


# -- the hostile workspace ---------------------------------------------------------------------------


def test_a_hostile_workspace_syncs_every_good_row_exactly(hostile, caplog):
    world: Hostile = hostile.world
    caplog.set_level(logging.WARNING, logger="gong_sync")
    report = sync(CORE)
    assert report.status == "success", [(o.asset, o.status, o.error) for o in report.outcomes]
    assert {o.asset: o.status for o in report.outcomes} == dict.fromkeys(CORE.split(","), "success")

    problems = Problems()
    check_raw_replica(problems, hostile, world, "call", ("id", "workspace_id"))
    check_raw_replica(problems, hostile, world, "users", ("id",))
    check_raw_replica(problems, hostile, world, "call_speaker", ("id", "call_id"))
    check_raw_replica(problems, hostile, world, "transcript", ("call_id", "index", "workspace_id"))
    check_calls(problems, hostile, world)
    check_users(problems, hostile, world)
    check_speakers(problems, hostile, world)
    check_transcripts(problems, hostile, world)
    check_dead_letters(problems, hostile, world)

    # Optional columns a source lacks read as NULL: warned and recorded once.
    changes = set(hostile.rows("SELECT asset, table_name, column_name, change FROM gong_sync.schema_changes"))
    for asset, table, column in [("users", "gong__users", "first_name"), ("users", "gong__users", "last_name"),
                                 ("users", "gong__users", "active"), ("speakers", "gong__call_speaker", "talk_time")]:
        if (asset, table, column, "missing") not in changes:
            problems.append(f"no schema_changes record of {table}.{column} missing: {sorted(changes)}")
    for table, column in [("users", "first_name"), ("call_speaker", "talk_time")]:
        if not any(f"source table {table} lacks optional column" in r.getMessage() and column in r.getMessage()
                   for r in caplog.records):
            problems.append(f"no warning that {table} lacks {column}")
    # A source column named like dlt's own is renamed with a warning naming the column it landed
    # in, never overwritten.
    if ("calls", "gong__call", "_dlt_load_id", "renamed") not in changes:
        problems.append(f"no schema_changes record of _dlt_load_id renamed: {sorted(changes)}")
    if not any("_dlt_load_id" in r.getMessage() and "src_dlt_load_id" in r.getMessage() for r in caplog.records):
        problems.append("no warning names the column _dlt_load_id landed in (src_dlt_load_id): "
                        f"{[r.getMessage() for r in caplog.records if '_dlt_load_id' in r.getMessage()]}")
    # Dead letters are counted where they are: the run's outcome and sync_status.
    must, _ = expected_dead_letters(world)
    for asset in ("calls", "users", "transcripts"):
        mine = sum(1 for (a, *_) in must if a == asset)
        if outcome(report, asset).rows_dead_lettered < mine:
            problems.append(f"{asset}: rows_dead_lettered {outcome(report, asset).rows_dead_lettered} < {mine}")
    problems.verdict(world.seed)


def test_a_second_run_over_a_hostile_workspace_is_a_no_op(hostile):
    first = sync(CORE)
    assert first.status == "success", [(o.asset, o.status, o.error) for o in first.outcomes]
    app_before = {t: hostile.rows(f"SELECT xmin::text, * FROM {t} ORDER BY 2")  # noqa: S608
                  for t in ("calls", "speakers", "transcripts", "users")}
    raw_before = {t: hostile.rows(f"SELECT xmin::text FROM gong_raw.gong__{t} ORDER BY 1")  # noqa: S608
                  for t in ("call", "users", "call_speaker", "transcript")}
    letters_before = hostile.rows("SELECT id, asset, row_key, run_id, created_at FROM gong_sync.dead_letters ORDER BY id")
    changes_before = hostile.rows("SELECT * FROM gong_sync.schema_changes ORDER BY id")

    again = sync(CORE)

    assert again.status == "success", [(o.asset, o.status, o.error) for o in again.outcomes]
    for o in again.outcomes:
        assert (o.asset, o.rows_loaded, o.rows_written, o.rows_deleted) == (o.asset, 0, 0, 0)
    for table, rows in app_before.items():
        assert hostile.rows(f"SELECT xmin::text, * FROM {table} ORDER BY 2") == rows, table  # noqa: S608
    for table, rows in raw_before.items():
        assert hostile.rows(f"SELECT xmin::text FROM gong_raw.gong__{table} ORDER BY 1") == rows, table  # noqa: S608
    problems = Problems()
    # Nothing new went to dead letters either: the rows the closed cursor range reads again (the
    # newest batch, where the NUL rows are) were dead-lettered by the first run and land nowhere now.
    problems.check("second run: rows_dead_lettered", {o.asset: o.rows_dead_lettered for o in again.outcomes},
                   dict.fromkeys(CORE.split(","), 0))
    problems.check("second run: dead letters rewritten",
                   hostile.rows("SELECT id, asset, row_key, run_id, created_at FROM gong_sync.dead_letters ORDER BY id"),
                   letters_before)
    problems.check("second run: sync_status", dict(hostile.rows("SELECT entity_type, last_sync_status FROM sync_status")),
                   dict.fromkeys(CORE.split(","), "success"))
    # Nor did the schema change: an optional column the first run added as NULL is not "removed".
    problems.check("second run: schema_changes recorded", {o.asset: o.schema_changes for o in again.outcomes},
                   dict.fromkeys(CORE.split(","), 0))
    problems.check("second run: new schema_changes rows",
                   hostile.rows("SELECT * FROM gong_sync.schema_changes ORDER BY id")[len(changes_before):], [])
    problems.verdict(hostile.world.seed)


# -- unusual shapes ----------------------------------------------------------------------------------


def test_a_call_table_with_only_its_key_and_system_columns_syncs(env, caplog):
    caplog.set_level(logging.WARNING, logger="gong_sync")
    minimal = fields(("id", S), ("workspace_id", S), *SYSTEM)
    rows = [{"id": f"73000000000000000{i:02d}", "workspace_id": WORKSPACES[i % 2], "_fivetran_synced": synced(i),
             "_fivetran_deleted": i == 3} for i in range(6)]
    create_table(env, "call", minimal, rows)

    report = sync("calls")

    assert outcome(report, "calls").status == "success", outcome(report, "calls").error
    got = env.rows("SELECT gong_call_id, title, scheduled_at, duration_seconds, call_type, date, metadata FROM calls"
                   " ORDER BY 1")
    assert got == [(r["id"], None, None, None, None, None, {"workspace_id": r["workspace_id"]})
                   for r in rows if not r["_fivetran_deleted"]]
    # Every column the calls build reads by name that the source lacks reads as NULL, with one
    # warning for the table and one schema_changes record each.
    wanted = {"title", "scheduled", "duration", "purpose", "url"}
    recorded = {c for (c,) in env.rows("SELECT column_name FROM gong_sync.schema_changes"
                                       " WHERE table_name = 'gong__call' AND change = 'missing'")}
    assert wanted <= recorded, recorded
    warned = [r.getMessage() for r in caplog.records if "lacks optional column" in r.getMessage()]
    assert len(warned) == 1 and all(c in warned[0] for c in wanted), warned


def test_a_missing_required_column_fails_only_its_asset_naming_table_and_column(env):
    world = generate(0, calls=8)
    for table, (schema, rows) in world.tables.items():
        if table == "transcript":
            schema = [f for f in schema if f.name != "sentence"]
            rows = [{k: v for k, v in r.items() if k != "sentence"} for r in rows]
        create_table(env, table, schema, rows)

    report = sync(CORE)

    assert report.status == "failed"
    transcripts = outcome(report, "transcripts")
    assert transcripts.status == "failed"
    assert re.search(r"\btranscript\b", transcripts.error) and "sentence" in transcripts.error, transcripts.error
    others = {o.asset: o.status for o in report.outcomes if o.asset != "transcripts"}
    assert others == {"users": "success", "calls": "success", "speakers": "success"}, others
    assert env.rows("SELECT count(*) > 0 FROM calls") == [(True,)]
    assert env.rows("SELECT count(*) FROM transcripts") == [(0,)]


def test_a_value_the_app_column_cannot_hold_costs_only_its_row(env):
    """`index` is INT64 in the source and `sequence_number` an int in the app: a monologue whose
    index does not fit is left out with its reason; the others land and the asset succeeds."""
    world = generate(1, calls=6)
    transcripts = world.rows("transcript")
    bad = {**transcripts[0], "index": 2**31}
    transcripts.append(bad)
    for table, (schema, rows) in world.tables.items():
        create_table(env, table, schema, rows)

    report = sync(CORE)

    assert outcome(report, "transcripts").status == "success", outcome(report, "transcripts").error
    problems = Problems()
    world.tables["transcript"] = (TRANSCRIPT_FIELDS, transcripts[:-1])
    check_transcripts(problems, env, world)
    problems.verdict()
    the_letter = ("SELECT errors::text FROM gong_sync.dead_letters WHERE asset = 'transcripts'"
                  " AND primary_key ->> 'index' = %s", (str(2**31),))
    letters = env.rows(*the_letter)
    assert len(letters) == 1 and "index" in letters[0][0], letters

    # An incremental build looks only at rows that landed since the last one: the letter stays
    # while its row is unchanged, and leaves once the row is soft-deleted at the source.
    assert outcome(sync("transcripts"), "transcripts").status == "success"
    assert len(env.rows(*the_letter)) == 1
    key = {"call_id": bad["call_id"], "index": bad["index"], "workspace_id": bad["workspace_id"]}
    assert update_rows(env.bq, env.gong("transcript"), key, {"_fivetran_deleted": True}, dt.datetime.now(dt.UTC)) == 1
    assert outcome(sync("transcripts"), "transcripts").status == "success"
    assert env.rows(*the_letter) == []


def test_a_mixed_case_column_that_changes_type_lands_in_a_variant_column(env):
    schema = fields(("id", S), ("workspace_id", S), ("Order", I), ("CamelCase", S), *SYSTEM)
    rows = [{"id": f"73000000000000001{i:02d}", "workspace_id": WORKSPACES[0], "Order": i, "CamelCase": f"v{i}",
             "_fivetran_synced": synced(10 + i), "_fivetran_deleted": False} for i in range(3)]
    create_table(env, "call", schema, rows)
    assert outcome(sync("calls"), "calls").status == "success"

    retyped = fields(("id", S), ("workspace_id", S), ("Order", B), ("CamelCase", S), *SYSTEM)
    later = [{**r, "Order": True, "CamelCase": "w", "_fivetran_synced": synced(0)} for r in rows[:1]]
    create_table(env, "call", retyped, [{**r, "Order": None} for r in rows[1:]] + later)
    report = sync("calls")

    assert outcome(report, "calls").status == "success", outcome(report, "calls").error
    raw = dict_rows(env, "SELECT id, \"order\", order__v_boolean, camel_case FROM gong_raw.gong__call ORDER BY id")
    assert [(r["order"], r["order__v_boolean"], r["camel_case"]) for r in raw] == [
        (None, True, "w"), (1, None, "v1"), (2, None, "v2")]  # the new version of row 0 has no INT64 Order
    changes = env.rows("SELECT column_name, change, old_type, new_type, action FROM gong_sync.schema_changes"
                       " WHERE change NOT IN ('renamed', 'missing') ORDER BY id")
    assert changes == [("order", "type_changed", "bigint", "boolean", "variant_column")], changes
    metadata = dict(env.rows("SELECT gong_call_id, metadata FROM calls"))
    assert metadata[rows[0]["id"]]["order__v_boolean"] is True


# -- the 30-email workspace of the issue ------------------------------------------------------------

EMAIL_FIELDS = fields(("id", S), ("subject", S), ("sent_at", S), ("body", S), ("headers", J),
                      ("opportunity_id", S), *SYSTEM)
ADDRESS_FIELDS = fields(("email_id", S), ("email_address", S), *SYSTEM)
#: Seeded Salesforce opportunities (seed 0, 40 calls) that have an app row: live, named.
LIVE_OPPORTUNITIES = [f"006{o:015d}" for o in (0, 1, 2, 4, 5, 7, 9, 10, 11)]
MALFORMED = "not-an-email"


def thirty_emails() -> tuple[list[dict], list[dict], list[dict]]:
    rng = random.Random(30)
    emails, senders, recipients = [], [], []
    for i in range(30):
        eid = str(8_800_000_000_000_001_000 + i)
        body = ("Long thread quoted below. " * 80)[:2000] if i in (3, 4, 5) else f"Hi,\n\n{words(rng, 20)}\n\nBest"
        emails.append({
            "id": eid, "subject": f"Re: {words(rng, 3)}",
            "sent_at": None if i == 0 else rng.choice([
                (BASE - dt.timedelta(days=i)).strftime("%Y-%m-%dT%H:%M:%SZ"),
                (BASE - dt.timedelta(days=i, microseconds=i)).isoformat()]),
            "body": body,
            "headers": json.dumps({"Message-ID": f"<{eid}@mail.example.com>", "X-Mailer": "Gmail"}),
            "opportunity_id": None if i % 3 == 0 else LIVE_OPPORTUNITIES[i % len(LIVE_OPPORTUNITIES)],
            "_fivetran_synced": synced(30 - i), "_fivetran_deleted": False,
        })
        if i != 1:
            sender = MALFORMED if i == 2 else f"{_NAMES[i % 12]}.rep@{INTERNAL_DOMAIN}"
            senders.append({"email_id": eid, "email_address": sender, "_fivetran_synced": synced(30 - i),
                            "_fivetran_deleted": False})
        addresses = [f"{n}.buyer{i}@acme-corp.com" for n in rng.sample(_NAMES, 0 if i == 7 else rng.randint(1, 4))]
        rng.shuffle(addresses)  # in no particular order in the source
        for n, address in enumerate(addresses):
            recipients.append({"email_id": eid, "email_address": address, "_fivetran_synced": synced(90 - 3 * i - n),
                               "_fivetran_deleted": False})
    return emails, senders, recipients


def test_the_thirty_email_workspace_lands_twenty_nine_emails(env, caplog):
    caplog.set_level(logging.WARNING, logger="gong_sync")
    seed_workspace(env.bq, project=env.emulator.project, gong_dataset=env.gong_dataset,
                   salesforce_dataset=env.salesforce_dataset, calls=40,
                   tables=["salesforce.opportunity", "salesforce.account", "salesforce.user"])
    emails, senders, recipients = thirty_emails()
    create_table(env, "email", EMAIL_FIELDS, emails)
    create_table(env, "email_sender", ADDRESS_FIELDS, senders)
    create_table(env, "email_recipient", ADDRESS_FIELDS, recipients)

    report = sync("+emails")

    assert report.status == "success", [(o.asset, o.status, o.error) for o in report.outcomes]
    app = {r["gong_email_id"]: r for r in dict_rows(
        env, "SELECT e.gong_email_id, e.subject, e.sender_email, e.recipients, e.sent_at, e.body_snippet, e.metadata,"
             " o.gong_opportunity_id FROM emails e LEFT JOIN opportunities o ON o.id = e.opportunity_id")}
    assert len(app) == 29
    assert emails[0]["id"] not in app
    senders_of = {s["email_id"]: s["email_address"] for s in senders}
    problems = Problems()
    for e in emails[1:]:
        got = app.get(e["id"])
        if got is None:
            problems.append(f"email {e['id']} did not land")
            continue
        want_recipients = sorted(r["email_address"] for r in recipients if r["email_id"] == e["id"])
        problems.check(f"{e['id']}.subject", got["subject"], e["subject"])
        problems.check(f"{e['id']}.sender_email", got["sender_email"], senders_of.get(e["id"]))
        problems.check(f"{e['id']}.recipients", got["recipients"], want_recipients)
        problems.check(f"{e['id']}.sent_at", got["sent_at"], dt.datetime.fromisoformat(e["sent_at"]))
        problems.check(f"{e['id']}.body_snippet", got["body_snippet"], e["body"][:500])
        problems.check(f"{e['id']}.metadata.body", got["metadata"].get("body"), e["body"])
        problems.check(f"{e['id']}.metadata.headers", got["metadata"].get("headers"), json.loads(e["headers"]))
        problems.check(f"{e['id']}.opportunity", got["gong_opportunity_id"], e["opportunity_id"])
    problems.verdict()
    assert app[emails[1]["id"]]["sender_email"] is None
    assert "no sender" in app[emails[1]["id"]]["metadata"]["warnings"]
    assert app[emails[2]["id"]]["sender_email"] == MALFORMED
    assert f"malformed sender address: {MALFORMED}" in app[emails[2]["id"]]["metadata"]["warnings"]
    assert app[emails[7]["id"]]["recipients"] == []
    assert {len(app[emails[i]["id"]]["metadata"]["body"]) for i in (3, 4, 5)} == {2000}
    assert sum(1 for r in app.values() if r["gong_opportunity_id"] is None) == 9
    letters = env.rows("SELECT source_table, primary_key, errors FROM gong_sync.dead_letters WHERE asset = 'emails'")
    assert letters == [("email", {"id": emails[0]["id"]}, [{"field": "sent_at", "error": "missing"}])], letters
    assert outcome(report, "emails").rows_dead_lettered == 1
    messages = [r.getMessage() for r in caplog.records]
    assert any("went to dead_letters" in m for m in messages), messages
    assert any("malformed" in m and emails[2]["id"] in m for m in messages), messages


def seed_opportunities(env) -> None:
    """The Salesforce tables the emails asset's upstream (opportunities) reads."""
    seed_workspace(env.bq, project=env.emulator.project, gong_dataset=env.gong_dataset,
                   salesforce_dataset=env.salesforce_dataset, calls=10,
                   tables=["salesforce.opportunity", "salesforce.account", "salesforce.user"])


STAMP = {"_fivetran_synced": BASE, "_fivetran_deleted": False}


def test_an_email_row_that_fails_validation_and_holds_nul_is_dead_lettered(env):
    """The dead-letter write cannot fail on what it stores."""
    seed_opportunities(env)
    create_table(env, "email", EMAIL_FIELDS, [
        {"id": "e-good", "subject": "Hello", "sent_at": "2026-01-05T09:00:00Z", "body": "fine", **STAMP},
        {"id": "e-rejected", "subject": "Sub\x00ject", "sent_at": None, "body": "b\x00ody", **STAMP},
        {"id": "e-repaired", "subject": "Hi", "sent_at": "2026-01-05T09:00:00Z", "body": "bo\x00dy", **STAMP},
    ])
    create_table(env, "email_sender", ADDRESS_FIELDS, [{"email_id": "e-good", "email_address": "a@prefect.io", **STAMP}])
    create_table(env, "email_recipient", ADDRESS_FIELDS, [
        {"email_id": "e-good", "email_address": "b@acme-corp.com", **STAMP},
        {"email_id": "e-good", "email_address": "a@acme-corp.com", **STAMP}])

    report = sync("+emails")

    assert outcome(report, "emails").status == "success", outcome(report, "emails").error
    got = env.rows("SELECT gong_email_id, subject, sender_email, recipients, metadata ->> 'body' FROM emails ORDER BY 1")
    assert got == [("e-good", "Hello", "a@prefect.io", ["a@acme-corp.com", "b@acme-corp.com"], "fine"),
                   ("e-repaired", "Hi", None, [], "body")]
    letters = {d["row"]["id"]: d for d in dict_rows(
        env, 'SELECT source_table, "row", errors FROM gong_sync.dead_letters WHERE asset = \'emails\'')}
    assert sorted(letters) == ["e-rejected", "e-repaired"], letters
    rejected, repaired = letters["e-rejected"], letters["e-repaired"]
    assert rejected["row"]["subject"] == "Sub\\u0000ject" and rejected["row"]["body"] == "b\\u0000ody"
    assert rejected["errors"] == [{"field": "sent_at", "error": "missing"}]
    assert repaired["row"]["body"] == "bo\\u0000dy" and NUL_REASON in json.dumps(repaired["errors"])
    assert outcome(report, "emails").rows_dead_lettered == 2


def test_json_text_holding_an_escaped_nul_is_not_dropped_silently(env):
    """`{"a":"\\u0000"}` is valid JSON that Postgres's jsonb cannot hold: the email still lands,
    and a dead letter says what happened to its headers (kept without the NUL, or left out)."""
    seed_opportunities(env)
    headers = '{"a": "x\\u0000y", "b": 1}'
    create_table(env, "email", EMAIL_FIELDS, [
        {"id": "e-1", "subject": "Hello", "sent_at": "2026-01-05T09:00:00Z", "body": "fine", "headers": headers,
         **STAMP}])
    create_table(env, "email_sender", ADDRESS_FIELDS, [{"email_id": "e-1", "email_address": "a@prefect.io", **STAMP}])
    create_table(env, "email_recipient", ADDRESS_FIELDS, [{"email_id": "e-1", "email_address": "b@acme-corp.com", **STAMP}])

    report = sync("+emails")

    assert outcome(report, "emails").status == "success", outcome(report, "emails").error
    # The rule: the escape of NUL is removed from JSON text, in the raw replica as in the app, and
    # the original row, exactly, is in dead letters with the reason.
    assert env.rows("SELECT raw.headers FROM gong_raw.gong__email raw")[0][0].replace(" ", "") == '{"a":"xy","b":1}'
    got = env.rows("SELECT gong_email_id, metadata -> 'headers' FROM emails")
    assert got == [("e-1", {"a": "xy", "b": 1})], got
    letters = env.rows("SELECT errors::text, row ->> 'headers' FROM gong_sync.dead_letters WHERE asset = 'emails'")
    assert len(letters) == 1 and "headers" in letters[0][0] and NUL_REASON in letters[0][0], letters
    assert letters[0][1] == headers


def test_a_source_table_without_rows_reads_as_an_empty_input(env):
    """A table that exists but holds no rows yet (no recipient rows in this account): no batch
    reaches the raw schema, and the build finds nothing in it."""
    seed_opportunities(env)
    create_table(env, "email", EMAIL_FIELDS, [
        {"id": "e-1", "subject": "Hello", "sent_at": "2026-01-05T09:00:00Z", "body": "fine", **STAMP}])
    create_table(env, "email_sender", ADDRESS_FIELDS, [{"email_id": "e-1", "email_address": "a@prefect.io", **STAMP}])
    create_table(env, "email_recipient", ADDRESS_FIELDS, [])

    report = sync("+emails")

    assert outcome(report, "emails").status == "success", outcome(report, "emails").error
    assert env.rows("SELECT gong_email_id, sender_email, recipients FROM emails") == [("e-1", "a@prefect.io", [])]
    again = sync("+emails")
    assert outcome(again, "emails").status == "success", outcome(again, "emails").error


def test_a_batch_where_every_row_is_rejected_costs_those_rows_only(env):
    seed_opportunities(env)
    create_table(env, "email", EMAIL_FIELDS, [
        {"id": "e-1", "subject": "Hello", "sent_at": "2026-01-05T09:00:00Z", "body": "fine", **STAMP},
        {"id": "e-2", "subject": "Hi", "sent_at": "2026-01-05T10:00:00Z", "body": "also fine", **STAMP}])
    create_table(env, "email_sender", ADDRESS_FIELDS, [  # every row fails the address model
        {"email_id": "e-1", "email_address": "", **STAMP}, {"email_id": "e-2", "email_address": "", **STAMP}])
    create_table(env, "email_recipient", ADDRESS_FIELDS, [{"email_id": "e-1", "email_address": "b@acme-corp.com", **STAMP}])

    report = sync("+emails")

    assert outcome(report, "emails").status == "success", outcome(report, "emails").error
    got = env.rows("SELECT gong_email_id, sender_email, recipients, metadata -> 'warnings' FROM emails ORDER BY 1")
    assert got == [("e-1", None, ["b@acme-corp.com"], ["no sender"]), ("e-2", None, [], ["no sender"])]
    letters = env.rows("SELECT source_table, \"row\" ->> 'email_id', errors -> 0 ->> 'field' FROM gong_sync.dead_letters"
                       " WHERE asset = 'emails' ORDER BY 2")
    assert letters == [("email_sender", "e-1", "email_address"), ("email_sender", "e-2", "email_address")]
    assert outcome(report, "emails").rows_dead_lettered == 2


# -- realistic transcript sizes on the project's own emulator ----------------------------------------

#: Calls whose seed-0 workspace holds exactly 100,000 monologues.
REALISTIC_CALLS = 28_631
MONOLOGUE_BYTES = (1_000, 5_000)
#: bqemulator's default cap on one gRPC message (11 MiB); one 65,536-row batch is far above it.
DEFAULT_CAP = 11 * 1024 * 1024


@pytest.mark.slow
def test_a_hundred_thousand_realistic_monologues_sync_through_the_projects_emulator(env):
    assert type(env.emulator) is BigQueryEmulator  # the project's launcher (tests/conftest.py)
    counts = seed_workspace(env.bq, project=env.emulator.project, gong_dataset=env.gong_dataset,
                            calls=REALISTIC_CALLS, chunk=4_000, monologue_bytes=MONOLOGUE_BYTES,
                            tables=["gong.users", "gong.call", "gong.call_speaker", "gong.transcript"])
    assert counts["gong.transcript"] == 100_000

    report = sync("+transcripts")

    assert report.status == "success", [(o.asset, o.status, o.error) for o in report.outcomes]
    transcripts = outcome(report, "transcripts")
    assert transcripts.rows_read == transcripts.rows_loaded == 100_000
    # 100 MB and more of text, read in split streams (tests/local/test_emulator.py checks the
    # launcher's lifted message cap and the splits themselves).
    assert transcripts.bytes_read > 10 * DEFAULT_CAP
    # Every monologue of a live call lands with its whole text, 1–5 KB each.
    calls = dict(env.rows("SELECT gong_call_id, metadata ->> 'workspace_id' FROM calls"))
    expected = {}
    plan = Plan(REALISTIC_CALLS, 0, monologue_bytes=MONOLOGUE_BYTES)
    for chunk in table_chunks(("gong", "transcript"), plan, 4_000):
        for t in chunk.select(["call_id", "index", "workspace_id", "sentence", "_fivetran_deleted"]).to_pylist():
            if t["_fivetran_deleted"] or calls.get(t["call_id"]) != t["workspace_id"]:
                continue
            text = " ".join(s["text"] for s in json.loads(t["sentence"]))
            expected[(t["call_id"], t["index"])] = (hashlib.md5(text.encode()).hexdigest(), len(text.encode()))  # noqa: S324
    actual = {(r[0], r[1]): (r[2], r[3]) for r in env.rows(
        "SELECT c.gong_call_id, t.sequence_number, md5(t.text), octet_length(t.text)"
        " FROM transcripts t JOIN calls c ON c.id = t.call_id")}
    assert len(expected) > 95_000
    assert actual == expected
    sizes = [size for _, size in actual.values()]
    assert MONOLOGUE_BYTES[0] <= min(sizes) and max(sizes) <= MONOLOGUE_BYTES[1]
