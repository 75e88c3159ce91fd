"""`emails`: one app row per Gong email, with its sender, sorted recipients and opportunity.

The three source tables are not in every account's Gong ERD, so their names are settings. The
opportunity link is the app's opportunity row (its uuid) while that opportunity lives.
"""

from pydantic import BaseModel, Field

from assets.opportunities import OPPORTUNITY
from assets.spec import (
    JSONB, TEXT, TEXT_ARRAY, TIMESTAMPTZ, UUID, AssetSpec, Build, Check, SourceTable, col, warning_check,
)


class EmailRow(BaseModel):
    """An email row that can be loaded: it has an id and a `sent_at` value."""

    id: str = Field(min_length=1, description="gong_email_id")
    sent_at: str = Field(min_length=1)


class AddressRow(BaseModel):
    """A sender or recipient row: it names its email and an address (kept raw, even if malformed)."""

    email_id: str = Field(min_length=1)
    email_address: str = Field(min_length=1)


EMAIL = SourceTable(
    dataset="gong", table="email", primary_key=("id",), table_setting="email_table", row_model=EmailRow,
    needs=("sent_at",),
)
SENDER = SourceTable(
    dataset="gong", table="email_sender", primary_key=("email_id", "email_address"),
    table_setting="email_sender_table", row_model=AddressRow,
)
RECIPIENT = SourceTable(
    dataset="gong", table="email_recipient", primary_key=("email_id", "email_address"),
    table_setting="email_recipient_table", row_model=AddressRow,
)

#: An address we would accept for sending mail: something@domain.tld, no spaces.
_VALID = r"'^[^@\s]+@[^@\s]+\.[^@\s]+$'"

# Optional columns (subject, body, headers, opportunity_id) are read through the row's JSON.
ROWS = """
    SELECT coalesce(a.id, {fn_uuid}('emails', e.id)) AS id,
           e.id AS gong_email_id,
           o.id AS opportunity_id,
           e.j ->> 'subject' AS subject,
           snd.address AS sender_email,
           coalesce(rcp.addresses, ARRAY[]::varchar[]) AS recipients,
           {fn_try_timestamptz}(e.sent_at) AS sent_at,
           left(e.j ->> 'body', 500) AS body_snippet,
           jsonb_strip_nulls(jsonb_build_object(
               'body', e.j ->> 'body',
               'headers', {fn_try_jsonb}(e.j ->> 'headers'),
               'warnings', nullif(to_jsonb(array_remove(ARRAY[
                   CASE WHEN snd.address IS NULL THEN 'no sender' END,
                   CASE WHEN snd.address !~ """ + _VALID + """ THEN 'malformed sender address: ' || snd.address END,
                   CASE WHEN {fn_try_timestamptz}(e.sent_at) IS NULL THEN 'sent_at cannot be parsed: ' || e.sent_at END
               ] || coalesce(rcp.malformed, ARRAY[]::text[]), NULL)), '[]'::jsonb)
           )) AS metadata
    FROM (SELECT e.id, e.sent_at, to_jsonb(e) AS j FROM {email} e WHERE NOT coalesce(e._fivetran_deleted, false)) e
    LEFT JOIN {app_emails} a ON a.gong_email_id = e.id
    LEFT JOIN {app_opportunities} o ON o.gong_opportunity_id = e.j ->> 'opportunity_id'
    LEFT JOIN LATERAL (
        SELECT min(s.email_address) AS address FROM {email_sender} s
        WHERE s.email_id = e.id AND NOT coalesce(s._fivetran_deleted, false)
    ) snd ON true
    LEFT JOIN LATERAL (
        SELECT array_agg(r.email_address ORDER BY r.email_address)::varchar[] AS addresses,
               array_agg('malformed recipient address: ' || r.email_address ORDER BY r.email_address)
                   FILTER (WHERE r.email_address !~ """ + _VALID + """) AS malformed
        FROM {email_recipient} r WHERE r.email_id = e.id AND NOT coalesce(r._fivetran_deleted, false)
    ) rcp ON true
"""

BUILD = Build(
    inputs=(EMAIL, SENDER, RECIPIENT, OPPORTUNITY),
    rows=ROWS,
    # An email changes when its own row, a sender or recipient row, or its opportunity lands.
    changed="""
        SELECT e.id AS gong_email_id FROM {email_new} e
        UNION SELECT s.email_id FROM {email_sender_new} s
        UNION SELECT r.email_id FROM {email_recipient_new} r
        UNION SELECT e.id FROM {email} e JOIN {opportunity_new} o ON o.id = to_jsonb(e) ->> 'opportunity_id'
    """,
    gone="SELECT a.id FROM {app_emails} a JOIN {gone} g ON g.gong_email_id = a.gong_email_id",
    checks=(
        Check(level="warning", message="email has no sender; sender_email is NULL",
              sql="SELECT gong_email_id, NULL FROM {rows} WHERE sender_email IS NULL"),
        Check(level="error", message="sent_at cannot be parsed; stored as NULL",
              sql="SELECT b.gong_email_id, e.sent_at FROM {rows} b JOIN {email} e ON e.id = b.gong_email_id "
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
    table="emails",
    columns=(
        col("gong_email_id", TEXT),
        col("opportunity_id", UUID),
        col("subject", TEXT),
        col("sender_email", TEXT),
        col("recipients", TEXT_ARRAY),
        col("sent_at", TIMESTAMPTZ),
        col("body_snippet", TEXT),
        col("metadata", JSONB),
    ),
    source_key="gong_email_id",
    natural_key="gong_email_id",
    build=BUILD,
)
