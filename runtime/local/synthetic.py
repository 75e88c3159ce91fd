"""Deterministic synthetic rows for every source table, generated column-wise in Arrow chunks.

Why column-wise and hash-based: the benchmarks seed millions of calls. Every value is a pure
function of (seed, a salt per column, the row's index) through a counter-based hash (splitmix64),
computed with numpy over a whole chunk at once. So a chunk needs no state from the chunks before
it, memory stays bounded by the chunk size, and the same seed gives the same rows whatever the
chunk size. No wall clock: every timestamp is an offset from `BASE_TIME`.

The awkward cases the design asks for sit at fixed small indices, so that they exist at every
size and tests can name them through `CASES`.
"""

from __future__ import annotations

import datetime as dt
import json
import unicodedata
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from runtime.local.source_schema import SOURCE_SCHEMAS, TableKey, arrow_schema

#: Fixed origin of every timestamp; microseconds on purpose (truncation bugs show up).
BASE_TIME = dt.datetime(2026, 1, 5, 9, 0, 0, 123456, tzinfo=dt.UTC)
_BASE_US = int(BASE_TIME.timestamp()) * 1_000_000 + BASE_TIME.microsecond
_DAY_US = 86_400 * 1_000_000
_EPOCH_DAY_OF_BASE = (BASE_TIME.date() - dt.date(1970, 1, 1)).days

#: Rows per Fivetran "batch": consecutive rows share one `_fivetran_synced` value.
SYNC_BATCH = 16
#: Drivers (calls, emails, ...) per generated chunk.
CHUNK = 50_000
#: Smallest `calls` that still holds every awkward case.
MIN_CALLS = 10

INTERNAL_DOMAIN = "prefect.io"
WORKSPACE_IDS = ("4962843701975625720", "1157384209382374611")

_CALL_ID_BASE = 7_300_000_000_000_000_000
_USER_ID_BASE = 2_100_000_000_000_000_000
_SPEAKER_ID_BASE = 5_600_000_000_000_000_000
_PARTICIPANT_ID_BASE = 5_800_000_000_000_000_000
_EMAIL_ID_BASE = 8_800_000_000_000_000_000
_MAX_SPEAKERS = 4

_FIRST = ["Ada", "Bruno", "Chloé", "Dmitri", "Eve", "Farah", "Gustavo", "Hana", "Ivan", "Jia", "Kwame", "Lena"]
_LAST = ["Okafor", "Müller", "Tanaka", "García", "Novak", "Singh", "O'Brien", "Kowalski", "Haddad", "Lindqvist"]
_TITLES = ["Account Executive", "Sales Engineer", "SDR", "Customer Success Manager", "VP Sales", None]
_COMPANIES = ["Acme Corp", "Globex", "Initech", "Umbrella Health", "Stark Logistics", "Wayne Fintech",
              "Hooli", "Vandelay Imports", "Soylent Foods", "Tyrell Systems", "Cyberdyne", "Wonka Retail"]  # fmt: skip
_INDUSTRIES = ["Technology", "Healthcare", "Financial Services", "Retail", "Logistics", None]
_COUNTRIES = ["United States", "Germany", "Japan", "Brazil", "France", "India", None]
_STAGES = ["Prospecting", "Qualification", "Needs Analysis", "Proposal", "Negotiation", "Closed Won", "Closed Lost"]
_PURPOSES = ["Discovery", "Demo", "Negotiation", "Check-in", "Onboarding", None]
_DIRECTIONS = ["Conference", "Conference", "Conference", "Outbound", "Inbound", "Unknown"]
_SCOPES = ["External", "External", "External", "Internal", "Unknown"]
_TOPICS = ["Introduction", "Pricing", "Next Steps", "Product Demo", "Security Review", None]
_OUTCOMES = [("1", "Next steps set", "Positive"), ("2", "No decision", "Neutral"), ("3", "Lost", "Negative")]
_PRODUCTS = ["Prefect Cloud", "Enterprise Plan", "Pro Plan", "Support Add-on"]
_PHRASES = [
    "Thanks everyone for joining today.",
    "Can you walk us through the pricing tiers?",
    "We run about two thousand flows a day.",
    "Security wants SSO and audit logs, naïvely speaking.",
    'Our team calls it the "orchestrator of record".',
    "Let's schedule a follow-up for next week.",
    "The renewal is due at the end of the quarter — tight timeline.",
    "Could you share the SOC 2 report?",
]


def _ascii(name: str) -> str:
    """Email local part for a name: accents dropped, lower case, letters only ("O'Brien" -> "obrien")."""
    return "".join(ch for ch in unicodedata.normalize("NFKD", name).lower() if ch.isascii() and ch.isalpha())


# Names keep their accents (Unicode in text columns); email addresses stay ASCII.
_FIRST_ASCII = [_ascii(n) for n in _FIRST]
_LAST_ASCII = [_ascii(n) for n in _LAST]
_SUBJECTS = ["Following up on our call", "Pricing proposal", "Re: Security questionnaire", "Next steps", "Intro"]


# -- counter-based randomness ------------------------------------------------------------------


def _hash(seed: int, salt: int, index: np.ndarray) -> np.ndarray:
    """splitmix64 of (seed, salt, index): uniform uint64 per element, no sequential state."""
    with np.errstate(over="ignore"):
        z = index.astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15)
        z ^= np.uint64((seed * 0x632BE59BD9B4E019 + salt * 0x85EBCA77C2B2AE63) & 0xFFFFFFFFFFFFFFFF)
        z ^= z >> np.uint64(30)
        z *= np.uint64(0xBF58476D1CE4E5B9)
        z ^= z >> np.uint64(27)
        z *= np.uint64(0x94D049BB133111EB)
        z ^= z >> np.uint64(31)
    return z


def _int(seed: int, salt: int, index: np.ndarray, low: int, high: int) -> np.ndarray:
    """Integers in [low, high)."""
    return (_hash(seed, salt, index) % np.uint64(high - low)).astype(np.int64) + low


def _unit(seed: int, salt: int, index: np.ndarray) -> np.ndarray:
    """Floats in [0, 1)."""
    return (_hash(seed, salt, index) >> np.uint64(11)).astype(np.float64) / float(1 << 53)


def _pick(options: list, positions: np.ndarray) -> pa.Array:
    return pa.array(options, pa.string()).take(pa.array(positions % len(options)))


# -- Arrow helpers -----------------------------------------------------------------------------


def _join(*parts: object, skip_nulls: bool = False) -> pa.Array:
    """Element-wise string concatenation of arrays and plain strings."""
    return pc.binary_join_element_wise(*parts, "", null_handling="skip" if skip_nulls else "emit_null")


def _text(numbers: np.ndarray) -> pa.Array:
    return pc.cast(pa.array(numbers, pa.int64()), pa.string())


def _padded(prefix: str, numbers: np.ndarray, width: int) -> pa.Array:
    """Salesforce-style ids: a 3-character key prefix and a zero-padded number."""
    return _join(prefix, pc.utf8_lpad(_text(numbers), width=width, padding="0"))


def _timestamps(microseconds: np.ndarray) -> pa.Array:
    return pa.array(microseconds.astype(np.int64), pa.int64()).cast(pa.timestamp("us", tz="UTC"))


def _null_where(values: pa.Array, mask: np.ndarray) -> pa.Array:
    return pc.if_else(pa.array(mask), pa.nulls(len(values), values.type), values)


def _replace_at(values: pa.Array, index: np.ndarray, position: int, value: object) -> pa.Array:
    """`values` with the row whose driver index is `position` set to `value` (when in the chunk)."""
    hit = index == position
    if not hit.any():
        return values
    return pc.if_else(pa.array(hit), pa.scalar(value, values.type), values)


def _synced(index: np.ndarray, table_salt: int) -> pa.Array:
    """Fivetran batches: SYNC_BATCH consecutive rows share one timestamp; batches a minute apart
    (plus a microsecond each, so every batch differs below the millisecond)."""
    batch = index // SYNC_BATCH
    return _timestamps(_BASE_US + table_salt * 1_000_003 + batch * 60_000_001)


def _expand(counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For parents repeated `counts` times: each child's parent position and its rank within it."""
    parent = np.repeat(np.arange(len(counts)), counts)
    starts = np.cumsum(counts) - counts
    rank = np.arange(int(counts.sum())) - np.repeat(starts, counts)
    return parent, rank


def _json_literal(options: list[str]) -> list[str]:
    return [json.dumps(o, ensure_ascii=False) for o in options]


# -- sizes and named cases ---------------------------------------------------------------------


@dataclass(frozen=True)
class Plan:
    """Row-driver counts for one workspace, all derived from the number of calls."""

    calls: int
    seed: int
    #: `(low, high)`: each monologue's text (its sentences joined by single spaces, as the app's
    #: `transcripts.text` holds it) is between `low` and `high` UTF-8 bytes, drawn per monologue;
    #: real monologues are 1–5 KB. None keeps the short demo sentences.
    monologue_bytes: tuple[int, int] | None = None

    def __post_init__(self) -> None:
        if self.monologue_bytes is not None:
            low, high = self.monologue_bytes
            if low < 0 or high - low < MONOLOGUE_BYTES_MIN_SPREAD:
                raise ValueError(
                    f"monologue_bytes must be (low, high) with 0 <= low and high - low >= "
                    f"{MONOLOGUE_BYTES_MIN_SPREAD} (whole phrases make up the text), got {self.monologue_bytes!r}"
                )

    @property
    def call_rows(self) -> int:
        """Calls plus one: the shared call id appears again in the second workspace."""
        return self.calls + 1

    @property
    def users(self) -> int:
        # A multiple of 5: every fifth user (5k+4) is the external one.
        return 5 * max(4, -(-self.calls // 125))

    @property
    def sf_users(self) -> int:
        return max(8, self.users // 2)

    @property
    def opportunities(self) -> int:
        return max(16, self.calls // 4)

    @property
    def accounts(self) -> int:
        return max(8, self.opportunities // 3)

    @property
    def emails(self) -> int:
        return max(16, self.calls // 2)


@dataclass(frozen=True)
class Cases:
    """Ids of the awkward rows, fixed for every size and seed, for tests to look up."""

    workspace_ids: tuple[str, str] = WORKSPACE_IDS
    internal_domain: str = INTERNAL_DOMAIN
    #: A call id present in both workspaces (composite key `(id, workspace_id)`).
    shared_call_id: str = str(_CALL_ID_BASE + 1)
    #: `(id, workspace_id)` of a soft-deleted call.
    deleted_call: tuple[str, str] = (str(_CALL_ID_BASE + 4), WORKSPACE_IDS[0])
    #: A call linked to two opportunities.
    call_with_two_opportunities: str = str(_CALL_ID_BASE + 0)
    #: A call_speaker row whose user_id matches no user.
    orphan_speaker_user_id: str = "2199999999999999999"
    orphan_speaker_call_id: str = str(_CALL_ID_BASE + 2)
    #: A user with an email outside the company domain.
    external_user_id: str = str(_USER_ID_BASE + 4)
    deleted_user_id: str = str(_USER_ID_BASE + 9)
    email_without_sender: str = str(_EMAIL_ID_BASE + 1)
    email_three_recipients: str = str(_EMAIL_ID_BASE + 2)
    email_long_body: str = str(_EMAIL_ID_BASE + 3)
    email_malformed_address: str = str(_EMAIL_ID_BASE + 4)
    malformed_address: str = "not-an-email"
    email_null_sent_at: str = str(_EMAIL_ID_BASE + 5)
    email_unparseable_sent_at: str = str(_EMAIL_ID_BASE + 6)
    unparseable_sent_at: str = "yesterday"
    #: The email row whose id is NULL is recognised by this subject.
    null_id_email_subject: str = "Email without an id"
    email_deleted: str = str(_EMAIL_ID_BASE + 8)
    email_no_recipients: str = str(_EMAIL_ID_BASE + 9)
    #: An email linked to an opportunity (about 60% are).
    email_with_opportunity: str = str(_EMAIL_ID_BASE + 0)
    #: A call whose opportunity link (call_context_integration) is soft-deleted.
    call_with_deleted_link: str = str(_CALL_ID_BASE + 5)
    opportunity_missing_account: str = "006000000000000002"
    missing_account_id: str = "001999999999999999"
    opportunity_nan_amount: str = "006000000000000005"
    opportunity_is_deleted: str = "006000000000000006"
    opportunity_fivetran_deleted: str = "006000000000000008"
    opportunity_null_name: str = "006000000000000003"
    opportunity_unknown_owner: str = "006000000000000007"
    unknown_owner_id: str = "005999999999999999"


CASES = Cases()
_NULL_ID_EMAIL = 7  # driver index of the email whose id is NULL
_LONG_BODY_CHARS = 2000


# -- one generator per table -------------------------------------------------------------------
# Each takes the plan and an index array of its drivers (users, call rows, opportunities,
# emails...) and returns the table's columns for that chunk; child tables expand their parents.


def _user_ids(u: np.ndarray) -> pa.Array:
    return _text(_USER_ID_BASE + u)


def _user_emails(plan: Plan, u: np.ndarray) -> pa.Array:
    """Users 5k+4 are external (a customer's domain), the rest internal."""
    local = _join(_pick(_FIRST_ASCII, u), ".", _pick(_LAST_ASCII, u // len(_FIRST)), _text(u))
    domain = pc.if_else(pa.array(u % 5 == 4), pa.scalar("acme-corp.com"), pa.scalar(INTERNAL_DOMAIN))
    return _join(local, "@", domain)


def _internal_user(plan: Plan, salt: int, index: np.ndarray) -> np.ndarray:
    """An internal user index: never 5k+4 (so never the deleted user 9 either)."""
    groups = plan.users // 5
    return 5 * _int(plan.seed, salt, index, 0, groups) + _int(plan.seed, salt + 1, index, 0, 4)


def gen_users(plan: Plan, u: np.ndarray) -> dict[str, pa.Array]:
    s = plan.seed
    manager = np.where(u == 0, -1, (u - 1) // 5)
    return {
        "id": _user_ids(u),
        "manager_id": _null_where(_user_ids(np.maximum(manager, 0)), manager < 0),
        "email_address": _user_emails(plan, u),
        "first_name": _pick(_FIRST, u),
        "last_name": _pick(_LAST, u // len(_FIRST)),
        "title": _pick(_TITLES, _int(s, 11, u, 0, len(_TITLES))),
        "active": pa.array(_int(s, 12, u, 0, 10) > 0),
        "created": _timestamps(_BASE_US - _int(s, 13, u, 30 * _DAY_US, 900 * _DAY_US)),
        "_fivetran_synced": _synced(u, 1),
        "_fivetran_deleted": pa.array(u == 9),
    }


@dataclass(frozen=True)
class _CallRows:
    """Per call row, the values several tables share (ids, workspace, speakers...)."""

    r: np.ndarray
    number: np.ndarray  # call number behind the id (the shared copy repeats call 1)
    workspace: pa.Array
    ids: pa.Array
    primary_user: np.ndarray
    speakers: np.ndarray
    monologues: np.ndarray
    duration: np.ndarray


def _call_rows(plan: Plan, r: np.ndarray) -> _CallRows:
    s = plan.seed
    number = np.where(r == plan.calls, 1, r)
    second = (r == plan.calls) | (r % 7 == 3)
    return _CallRows(
        r=r,
        number=number,
        workspace=pc.if_else(pa.array(second), pa.scalar(WORKSPACE_IDS[1]), pa.scalar(WORKSPACE_IDS[0])),
        ids=_text(_CALL_ID_BASE + number),
        primary_user=_internal_user(plan, 20, number),
        speakers=np.where(r == 2, _MAX_SPEAKERS, _int(s, 21, r, 2, _MAX_SPEAKERS + 1)),
        monologues=_int(s, 22, r, 2, 6),
        duration=_int(s, 23, r, 300, 3600),
    )


def gen_call(plan: Plan, r: np.ndarray) -> dict[str, pa.Array]:
    s, c = plan.seed, _call_rows(plan, r)
    span = 365 * _DAY_US
    started = _BASE_US - span + r * (span // plan.call_rows) + _int(s, 30, r, 0, 3_600_000_000)
    scheduled = started // 1_800_000_000 * 1_800_000_000  # on the half hour before the start
    company = _pick(_COMPANIES, _int(s, 31, c.number, 0, len(_COMPANIES)))
    purpose = _pick(_PURPOSES, _int(s, 32, r, 0, len(_PURPOSES)))
    audio = _int(s, 33, r, 0, 5) == 0
    # Fivetran's 2025 columns: empty on calls before the connector started filling them.
    outcome = _int(s, 34, r, 0, len(_OUTCOMES))
    no_outcome = started < _BASE_US - 120 * _DAY_US
    stage = _pick(_json_literal(_STAGES), _int(s, 35, r, 0, len(_STAGES)))
    return {
        "id": c.ids,
        "workspace_id": c.workspace,
        "primary_user_id": _user_ids(c.primary_user),
        "title": _join(company, " <> Prefect | ", pc.coalesce(purpose, pa.scalar("Call"))),
        "scheduled": _timestamps(scheduled),
        "started": _timestamps(started),
        "duration": pa.array(c.duration),
        "direction": _pick(_DIRECTIONS, _int(s, 36, r, 0, len(_DIRECTIONS))),
        "scope": _pick(_SCOPES, _int(s, 37, r, 0, len(_SCOPES))),
        "purpose": purpose,
        "media": pc.if_else(pa.array(audio), pa.scalar("Audio"), pa.scalar("Video")),
        "url": _join("https://app.gong.io/call?id=", c.ids),
        "meeting_url": _null_where(_join("https://zoom.us/j/", _text(_int(s, 38, r, 10**9, 10**10))), audio),
        "is_private": pa.array(_int(s, 39, r, 0, 20) == 0),
        "custom_data": _null_where(
            _join('{"crm_stage": ', stage, ', "priority": ', _text(_int(s, 40, r, 1, 4)), "}"),
            _int(s, 41, r, 0, 4) == 0,
        ),
        "systems": pa.array(['[{"system": "Salesforce", "objects": ["Opportunity", "Account"]}]'] * len(r)),
        "call_outcome_id": _null_where(_pick([o[0] for o in _OUTCOMES], outcome), no_outcome),
        "call_outcome_name": _null_where(_pick([o[1] for o in _OUTCOMES], outcome), no_outcome),
        "call_outcome_category": _null_where(_pick([o[2] for o in _OUTCOMES], outcome), no_outcome),
        "brief": _null_where(
            _join("Discussed ", pc.utf8_lower(_pick(_TOPICS[:-1], outcome)), " with ", company, "."), no_outcome
        ),
        "_fivetran_synced": _synced(r, 2),
        # Call row 4, plus ~1.6% of the rest (never a named case, never the shared copy).
        "_fivetran_deleted": pa.array((r == 4) | ((_int(s, 42, r, 0, 61) == 0) & (r > 10) & (r < plan.calls))),
    }


def _speaker_rows(plan: Plan, r: np.ndarray) -> tuple[_CallRows, np.ndarray, np.ndarray, np.ndarray]:
    """Speakers of each call row: parent position, rank, and user index (-1 external, -2 orphan)."""
    c = _call_rows(plan, r)
    parent, rank = _expand(c.speakers)
    child = r[parent] * _MAX_SPEAKERS + rank
    colleague = _internal_user(plan, 50, child)
    internal = _int(plan.seed, 51, child, 0, 2) == 0
    user = np.where(rank == 0, c.primary_user[parent], np.where((rank >= 2) & internal, colleague, -1))
    orphan = (r[parent] == 2) & (rank == c.speakers[parent] - 1)
    return c, parent, rank, np.where(orphan, -2, user)


def _speaker_user_ids(user: np.ndarray) -> pa.Array:
    ids = _null_where(_user_ids(np.maximum(user, 0)), user == -1)
    return pc.if_else(pa.array(user == -2), pa.scalar(CASES.orphan_speaker_user_id), ids)


def gen_call_speaker(plan: Plan, r: np.ndarray) -> dict[str, pa.Array]:
    c, parent, rank, user = _speaker_rows(plan, r)
    child = r[parent] * _MAX_SPEAKERS + rank
    share = _unit(plan.seed, 52, child) / c.speakers[parent]
    return {
        "id": _text(_SPEAKER_ID_BASE + child),
        "call_id": c.ids.take(pa.array(parent)),
        "user_id": _speaker_user_ids(user),
        "talk_time": pa.array(np.round(c.duration[parent] * share, 3)),
        "_fivetran_synced": _synced(child, 3),
        "_fivetran_deleted": pa.array(r[parent] == 4),
    }


def gen_call_participant(plan: Plan, r: np.ndarray) -> dict[str, pa.Array]:
    s = plan.seed
    c, parent, rank, user = _speaker_rows(plan, r)
    child = r[parent] * _MAX_SPEAKERS + rank
    known = user >= 0
    company = _pick(_COMPANIES, _int(s, 31, c.number[parent], 0, len(_COMPANIES)))
    domain = pc.utf8_lower(pc.replace_substring(company, " ", "-"))
    contact_first = _pick(_FIRST, child + 3)
    contact_last = _pick(_LAST, child // 3)
    contact = _join(_pick(_FIRST_ASCII, child + 3), ".", _pick(_LAST_ASCII, child // 3), "@", domain, ".com")
    safe_user = np.maximum(user, 0)
    name = pc.if_else(
        pa.array(known),
        _join(_pick(_FIRST, safe_user), " ", _pick(_LAST, safe_user // len(_FIRST))),
        _join(contact_first, " ", contact_last),
    )
    affiliation = np.where(known, "Internal", np.where(user == -2, "Unknown", "External"))
    return {
        "id": _text(_PARTICIPANT_ID_BASE + child),
        "call_id": c.ids.take(pa.array(parent)),
        "speaker_id": _text(_SPEAKER_ID_BASE + child),
        "user_id": _speaker_user_ids(user),
        "email_address": pc.if_else(pa.array(known), _user_emails(plan, safe_user), contact),
        "name": name,
        "title": _pick(_TITLES, _int(s, 60, child, 0, len(_TITLES))),
        "affiliation": pa.array(affiliation, pa.string()),
        "methods": _pick(['["Invitee", "Attendee"]', '["Attendee"]', '["Invitee"]'], _int(s, 61, child, 0, 3)),
        "_fivetran_synced": _synced(child, 4),
        "_fivetran_deleted": pa.array(r[parent] == 4),
    }


#: UTF-8 bytes of the longest phrase plus its separating space: the unit sized texts grow by.
_PHRASE_UNIT_MAX = max(len(p.encode()) + 1 for p in _PHRASES)
#: Smallest `high - low` of `Plan.monologue_bytes`: up to three sentences each overshoot their
#: share of the drawn size by less than one phrase, and the draw leaves room for that.
MONOLOGUE_BYTES_MIN_SPREAD = 3 * _PHRASE_UNIT_MAX


def _sentence_texts(plan: Plan, row: np.ndarray) -> list[pa.Array]:
    """The JSON string literal of each of a monologue's three possible sentences' text.

    By default one phrase each. With `plan.monologue_bytes = (low, high)`, a size is drawn per
    monologue in [low + 1, high - 3 units + 1] and shared among its present sentences; each
    sentence repeats its phrase, space-separated, until it holds its share (ceil). The joined
    text is then at least the drawn size minus one byte and less than it plus three units: within
    [low, high].
    """
    s = plan.seed
    choices = [_int(s, 71 + k, row, 0, len(_PHRASES)) for k in range(3)]
    phrases = _json_literal(_PHRASES)
    if plan.monologue_bytes is None:
        return [_pick(phrases, choice) for choice in choices]
    low, high = plan.monologue_bytes
    target = _int(s, 79, row, low + 1, high - MONOLOGUE_BYTES_MIN_SPREAD + 2)
    present = [np.ones(len(row), dtype=bool)] + [_int(s, 75 + k, row, 0, 3) >= k for k in (1, 2)]
    count = np.sum(present, axis=0)
    units = np.array([len(p.encode()) + 1 for p in _PHRASES], dtype=np.int64)
    inner = [literal[1:-1] for literal in phrases]  # escaped text: repeating it repeats the text
    texts = []
    for choice in choices:
        unit = units[choice]
        repeats = -(-target // (count * unit))  # ceil: at least this sentence's share
        head = pc.binary_repeat(_pick([p + " " for p in inner], choice), pa.array(repeats - 1, pa.int64()))
        texts.append(_join('"', head, _pick(inner, choice), '"'))
    return texts


def gen_transcript(plan: Plan, r: np.ndarray) -> dict[str, pa.Array]:
    s = plan.seed
    c = _call_rows(plan, r)
    parent, rank = _expand(c.monologues)
    row = r[parent] * 8 + rank
    speaker = r[parent] * _MAX_SPEAKERS + rank % c.speakers[parent]
    texts = _sentence_texts(plan, row)
    start = rank * 30_000 + _int(s, 70, row, 0, 5_000)
    sentences = []
    for k in range(3):  # one to three sentences per monologue
        t0 = start + k * 9_000
        piece = _join(
            '{"start": ', _text(t0), ', "end": ', _text(t0 + 8_000), ', "text": ', texts[k], "}",
        )  # fmt: skip
        sentences.append(piece if k == 0 else _null_where(_join(", ", piece), _int(s, 75 + k, row, 0, 3) < k))
    return {
        "call_id": c.ids.take(pa.array(parent)),
        "index": pa.array(rank),
        "workspace_id": c.workspace.take(pa.array(parent)),
        "speaker_id": _text(_SPEAKER_ID_BASE + speaker),
        "topic": _pick(_TOPICS, _int(s, 78, row, 0, len(_TOPICS))),
        "sentence": _join("[", *sentences, "]", skip_nulls=True),
        "_fivetran_synced": _synced(row, 5),
        "_fivetran_deleted": pa.array(r[parent] == 4),
    }


def _opportunity_ids(o: np.ndarray) -> pa.Array:
    return _padded("006", o, 15)


def _opportunity_account(plan: Plan, o: np.ndarray) -> np.ndarray:
    return _int(plan.seed, 80, o, 0, plan.accounts)


def gen_call_context_integration(plan: Plan, i: np.ndarray) -> dict[str, pa.Array]:
    """Driver: call numbers. ~70% of calls link an opportunity, ~30% an account.

    Call 0 links two opportunities; call 5's opportunity link is soft-deleted.
    """
    s = plan.seed
    opp_calls = i[(_int(s, 81, i, 0, 10) < 7) | (i == 0) | (i == 5)]
    opp = _int(s, 82, opp_calls, 0, plan.opportunities)
    extra = opp_calls[opp_calls == 0]
    acct_calls = i[_int(s, 83, i, 0, 10) < 3]
    call = np.concatenate([opp_calls, extra, acct_calls])
    opp_all = np.concatenate([opp, (opp[opp_calls == 0] + 1) % plan.opportunities])
    accounts = _int(s, 84, acct_calls, 0, plan.accounts)
    n_opp = len(opp_all)
    stage = _pick(_json_literal(_STAGES), _int(s, 85, opp_all, 0, len(_STAGES)))
    object_id = pa.concat_arrays([_opportunity_ids(opp_all), _padded("001", accounts, 15)])
    value = pa.concat_arrays([
        _join('{"Id": "', _opportunity_ids(opp_all), '", "StageName": ', stage, "}"),
        _join('{"Id": "', _padded("001", accounts, 15), '"}'),
    ])  # fmt: skip
    position = np.arange(len(call))
    return {
        "name": pa.array(["Salesforce"] * len(call), pa.string()),
        "object_id": object_id,
        "call_id": _text(_CALL_ID_BASE + call),
        "object_type": pa.array(["Opportunity"] * n_opp + ["Account"] * len(acct_calls), pa.string()),
        "value": value,
        "systems": pa.array(["Salesforce"] * len(call), pa.string()),
        "timing": _pick(["TimeOfCall", "Now"], _int(s, 86, call, 0, 2)),
        "_fivetran_synced": _synced(call, 6),
        # One soft-deleted link; it is on call 5's opportunity row.
        "_fivetran_deleted": pa.array((call == 5) & (position < n_opp)),
    }


def gen_opportunity(plan: Plan, o: np.ndarray) -> dict[str, pa.Array]:
    s = plan.seed
    account = _opportunity_account(plan, o)
    company = _pick(_COMPANIES, account)
    name = _join(company, " - ", _pick(_PRODUCTS, _int(s, 90, o, 0, len(_PRODUCTS))))
    amount = _int(s, 91, o, 1_000_00, 250_000_00) / 100.0
    amount = np.where(o == 5, np.nan, amount)
    account_ids = _replace_at(_padded("001", account, 15), o, 2, CASES.missing_account_id)
    owner_ids = _replace_at(_padded("005", _int(s, 92, o, 0, plan.sf_users), 15), o, 7, CASES.unknown_owner_id)
    health = np.round(_unit(s, 93, o) * 100, 1)
    return {
        "id": _opportunity_ids(o),
        "name": _null_where(name, o == 3),
        "stage_name": _pick(_STAGES, _int(s, 94, o, 0, len(_STAGES))),
        "close_date": pa.array((_EPOCH_DAY_OF_BASE + _int(s, 95, o, -60, 240)).astype(np.int32)).cast(pa.date32()),
        "amount": _null_where(pa.array(amount), (_int(s, 96, o, 0, 17) == 0) & (o > 10)),
        "account_id": account_ids,
        "owner_id": owner_ids,
        "last_modified_date": _timestamps(_BASE_US - _int(s, 97, o, 0, 90 * _DAY_US)),
        "is_deleted": pa.array(o == 6),
        "health_score": _null_where(pa.array(health), _int(s, 98, o, 0, 4) == 0),
        "_fivetran_synced": _synced(o, 7),
        "_fivetran_deleted": pa.array(o == 8),
    }


def gen_account(plan: Plan, a: np.ndarray) -> dict[str, pa.Array]:
    s = plan.seed
    company = _pick(_COMPANIES, a)
    # Beyond the list of names, number them so names stay distinct.
    name = pc.if_else(pa.array(a < len(_COMPANIES)), company, _join(company, " ", _text(a // len(_COMPANIES))))
    return {
        "id": _padded("001", a, 15),
        "name": name,
        "industry": _pick(_INDUSTRIES, _int(s, 100, a, 0, len(_INDUSTRIES))),
        "billing_country": _pick(_COUNTRIES, _int(s, 101, a, 0, len(_COUNTRIES))),
        "last_modified_date": _timestamps(_BASE_US - _int(s, 102, a, 0, 180 * _DAY_US)),
        "is_deleted": pa.array(np.zeros(len(a), dtype=bool)),
        "_fivetran_synced": _synced(a, 8),
        "_fivetran_deleted": pa.array((a % 50 == 49)),
    }


def gen_sf_user(plan: Plan, k: np.ndarray) -> dict[str, pa.Array]:
    """Salesforce users are the Gong users' first half: same people, same emails."""
    return {
        "id": _padded("005", k, 15),
        "email": _user_emails(plan, k),
        "name": _join(_pick(_FIRST, k), " ", _pick(_LAST, k // len(_FIRST))),
        "last_modified_date": _timestamps(_BASE_US - _int(plan.seed, 110, k, 0, 365 * _DAY_US)),
        "is_deleted": pa.array(np.zeros(len(k), dtype=bool)),
        "_fivetran_synced": _synced(k, 9),
        "_fivetran_deleted": pa.array(np.zeros(len(k), dtype=bool)),
    }


def _email_ids(e: np.ndarray) -> pa.Array:
    return _null_where(_text(_EMAIL_ID_BASE + e), e == _NULL_ID_EMAIL)


def gen_email(plan: Plan, e: np.ndarray) -> dict[str, pa.Array]:
    s = plan.seed
    sent_us = _BASE_US - _int(s, 120, e, 0, 200 * _DAY_US)
    sent_at = pc.strftime(_timestamps(sent_us), format="%Y-%m-%dT%H:%M:%SZ")  # microseconds included
    sent_at = _replace_at(_null_where(sent_at, e == 5), e, 6, CASES.unparseable_sent_at)
    phrases = [_pick(_PHRASES, _int(s, 121 + k, e, 0, len(_PHRASES))) for k in range(3)]
    body = _join("Hi,\n\n", phrases[0], " ", phrases[1], " ", phrases[2], "\n\nBest regards")
    long_body = ("Long thread quoted below. " * 80)[:_LONG_BODY_CHARS]
    body = _replace_at(body, e, 3, long_body)
    subject = _pick(_SUBJECTS, _int(s, 125, e, 0, len(_SUBJECTS)))
    subject = _replace_at(subject, e, _NULL_ID_EMAIL, CASES.null_id_email_subject)
    opportunity = _opportunity_ids(_int(s, 126, e, 0, plan.opportunities))
    return {
        "id": _email_ids(e),
        "subject": subject,
        "sent_at": sent_at,
        "body": body,
        "headers": _join('{"Message-ID": "<', _text(_EMAIL_ID_BASE + e), '@mail.example.com>", "X-Mailer": "Gmail"}'),
        "opportunity_id": _null_where(opportunity, (_int(s, 127, e, 0, 10) >= 6) & (e != 0)),
        "_fivetran_synced": _synced(e, 10),
        "_fivetran_deleted": pa.array(e == 8),
    }


def gen_email_sender(plan: Plan, e: np.ndarray) -> dict[str, pa.Array]:
    e = e[(e != 1) & (e != _NULL_ID_EMAIL)]  # email 1 has no sender row; the id-less email neither
    return {
        "email_id": _text(_EMAIL_ID_BASE + e),
        "email_address": _user_emails(plan, _internal_user(plan, 130, e)),
        "_fivetran_synced": _synced(e, 11),
        "_fivetran_deleted": pa.array(np.zeros(len(e), dtype=bool)),
    }


def gen_email_recipient(plan: Plan, e: np.ndarray) -> dict[str, pa.Array]:
    e = e[e != _NULL_ID_EMAIL]
    count = np.where(e == 2, 3, np.where(e == 9, 0, _int(plan.seed, 140, e, 1, 3)))
    parent, rank = _expand(count)
    email = e[parent]
    company = _pick(_COMPANIES, _int(plan.seed, 141, email, 0, len(_COMPANIES)))
    domain = pc.utf8_lower(pc.replace_substring(company, " ", "-"))
    # Distinct first names per rank keep (email_id, email_address) unique.
    local = _join(_pick(_FIRST_ASCII, email + rank), ".", _pick(_LAST_ASCII, email * 3 + rank))
    address = _join(local, "@", domain, ".com")
    address = pc.if_else(pa.array((email == 4) & (rank == 0)), pa.scalar(CASES.malformed_address), address)
    return {
        "email_id": _text(_EMAIL_ID_BASE + email),
        "email_address": address,
        "_fivetran_synced": _synced(email * 3 + rank, 12),
        "_fivetran_deleted": pa.array(np.zeros(len(email), dtype=bool)),
    }


Generator = Callable[[Plan, np.ndarray], dict[str, pa.Array]]

#: Per table: its generator and the number of drivers it runs over.
GENERATORS: dict[TableKey, tuple[Generator, Callable[[Plan], int]]] = {
    ("gong", "users"): (gen_users, lambda p: p.users),
    ("gong", "call"): (gen_call, lambda p: p.call_rows),
    ("gong", "transcript"): (gen_transcript, lambda p: p.call_rows),
    ("gong", "call_speaker"): (gen_call_speaker, lambda p: p.call_rows),
    ("gong", "call_participant"): (gen_call_participant, lambda p: p.call_rows),
    ("gong", "call_context_integration"): (gen_call_context_integration, lambda p: p.calls),
    ("gong", "email"): (gen_email, lambda p: p.emails),
    ("gong", "email_sender"): (gen_email_sender, lambda p: p.emails),
    ("gong", "email_recipient"): (gen_email_recipient, lambda p: p.emails),
    ("gong", "opportunity"): (gen_opportunity, lambda p: p.opportunities),
    ("salesforce", "opportunity"): (gen_opportunity, lambda p: p.opportunities),
    ("salesforce", "account"): (gen_account, lambda p: p.accounts),
    ("salesforce", "user"): (gen_sf_user, lambda p: p.sf_users),
}


def table_chunks(key: TableKey, plan: Plan, chunk: int = CHUNK) -> Iterator[pa.Table]:
    """The rows of one source table, `chunk` drivers at a time, in the table's Arrow schema."""
    generate, drivers = GENERATORS[key]
    schema = arrow_schema(SOURCE_SCHEMAS[key])
    total = drivers(plan)
    for start in range(0, total, chunk):
        index = np.arange(start, min(start + chunk, total), dtype=np.int64)
        columns = generate(plan, index)
        yield pa.Table.from_arrays([columns[f.name].cast(f.type) for f in schema], schema=schema)
