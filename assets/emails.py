"""`emails`: one row per Gong email, with its sender and sorted recipients (email-sync spec).

The three source tables are not in every account's Gong ERD, so their names are settings.
"""

from pydantic import BaseModel, Field

from assets.opportunities import OPPORTUNITY
from assets.spec import AssetSpec, Build, Check, Index, SourceTable, columns, live, since, warning_check


class EmailRow(BaseModel):
    """An email row that can be loaded: it has an id and a `sent_at` value."""

    id: str = Field(min_length=1, description="gong_email_id")
    sent_at: str = Field(min_length=1)


class AddressRow(BaseModel):
    """A sender or recipient row: it names its email and an address (kept raw, even if malformed)."""

    email_id: str = Field(min_length=1)
    email_address: str = Field(min_length=1)


EMAIL = SourceTable(dataset="gong", table="email", primary_key=("id",), table_setting="email_table", row_model=EmailRow)
SENDER = SourceTable(
    dataset="gong", table="email_sender", primary_key=("email_id", "email_address"),
    table_setting="email_sender_table", row_model=AddressRow,
)
RECIPIENT = SourceTable(
    dataset="gong", table="email_recipient", primary_key=("email_id", "email_address"),
    table_setting="email_recipient_table", row_model=AddressRow,
)

COLUMNS = columns(
    gong_email_id="text",
    subject="text",
    sender_email="text",
    recipients="text[] NOT NULL DEFAULT '{}'",
    sent_at="timestamptz",
    body_snippet="text",
    metadata="jsonb",
    opportunity_id="text",
)

_E, _S, _R, _O = (f"{{raw}}.{t.raw_table}" for t in (EMAIL, SENDER, RECIPIENT, OPPORTUNITY))
#: An address we would accept for sending mail: something@domain.tld, no spaces.
_VALID_ADDRESS = r"'^[^@\s]+@[^@\s]+\.[^@\s]+$'"

BUILD = Build(
    inputs=(EMAIL.raw_table, SENDER.raw_table, RECIPIENT.raw_table, OPPORTUNITY.raw_table),
    rows=f"""
        SELECT e.id AS gong_email_id,
               e.subject,
               snd.address AS sender_email,
               coalesce(rcp.addresses, '{{{{}}}}') AS recipients,
               {{raw}}.gs_try_timestamptz(e.sent_at) AS sent_at,
               left(e.body, 500) AS body_snippet,
               jsonb_strip_nulls(jsonb_build_object(
                   'body', e.body,
                   'headers', {{raw}}.gs_try_jsonb(e.headers),
                   'warnings', nullif(to_jsonb(array_remove(ARRAY[
                       CASE WHEN snd.address IS NULL THEN 'no sender' END,
                       CASE WHEN snd.address !~ {_VALID_ADDRESS} THEN 'malformed sender address: ' || snd.address END,
                       CASE WHEN {{raw}}.gs_try_timestamptz(e.sent_at) IS NULL
                            THEN 'sent_at cannot be parsed: ' || e.sent_at END
                   ] || coalesce(rcp.malformed, '{{{{}}}}'), NULL)), '[]'::jsonb)
               )) AS metadata,
               o.id AS opportunity_id
        FROM {_E} e
        LEFT JOIN LATERAL (
            SELECT min(s.email_address) AS address FROM {_S} s WHERE s.email_id = e.id AND {live('s', SENDER)}
        ) snd ON true
        LEFT JOIN LATERAL (
            SELECT array_agg(r.email_address ORDER BY r.email_address) AS addresses,
                   array_agg('malformed recipient address: ' || r.email_address ORDER BY r.email_address)
                       FILTER (WHERE r.email_address !~ {_VALID_ADDRESS}) AS malformed
            FROM {_R} r WHERE r.email_id = e.id AND {live('r', RECIPIENT)}
        ) rcp ON true
        LEFT JOIN {_O} o ON o.id = e.opportunity_id AND {live('o', OPPORTUNITY)}
        WHERE {live('e', EMAIL)}
    """,
    # An email changes when its own row, a sender or recipient row, or its opportunity lands.
    changed_keys=f"""
        SELECT e.id FROM {_E} e WHERE {since(EMAIL, 'e')}
        UNION SELECT s.email_id FROM {_S} s WHERE {since(SENDER, 's')}
        UNION SELECT r.email_id FROM {_R} r WHERE {since(RECIPIENT, 'r')}
        UNION SELECT e.id FROM {_E} e JOIN {_O} o ON o.id = e.opportunity_id WHERE {since(OPPORTUNITY, 'o')}
    """,
    checks=(
        Check(level="warning", message="email has no sender; sender_email is NULL",
              sql="SELECT gong_email_id, NULL FROM _build_rows WHERE sender_email IS NULL"),
        Check(level="error", message="sent_at cannot be parsed; stored as NULL",
              sql=f"SELECT b.gong_email_id, e.sent_at FROM _build_rows b JOIN {_E} e ON e.id = b.gong_email_id "
                  "WHERE b.sent_at IS NULL"),
        warning_check("malformed address kept as it came", "gong_email_id", "malformed"),
    ),
)

ASSET = AssetSpec(
    name="emails",
    description="Gong emails with sender, sorted recipients, a 500-character snippet and the linked opportunity.",
    deps=("opportunities",),
    tags={"gong"},
    sources=(EMAIL, SENDER, RECIPIENT),
    primary_key=("gong_email_id",),
    columns=COLUMNS,
    build=BUILD,
    indexes=(
        Index(name="idx_emails_opportunity", definition="(opportunity_id, sent_at DESC)"),
        Index(name="idx_emails_sent_at", definition="(sent_at DESC)"),
    ),
)
