"""`opportunities`: Salesforce opportunities with their account's name and owner's email.

Read from the Salesforce connector's dataset; a project without one falls back to the Gong
connector's `opportunity` table, and the account and owner then stay unknown (NULL, warned).
"""

from pydantic import BaseModel, Field

from assets.spec import (
    DATE, JSONB, TEXT, TIMESTAMPTZ, AssetSpec, Build, Check, SourceTable, col, warning_check,
)


class OpportunityRow(BaseModel):
    """An opportunity that can be loaded: it has an id and a name."""

    id: str = Field(min_length=1, description="gong_opportunity_id")
    name: str = Field(min_length=1)


_SF_DELETED = ("_fivetran_deleted", "is_deleted")
NUMERIC = ("numeric",)

# The cursor is `_fivetran_synced`, not `last_modified_date`: Fivetran bumps it for every row it
# writes, so it moves with every modification too, and a soft delete (`_fivetran_deleted`) moves
# only it — on `last_modified_date` a deleted opportunity would never be read again.
OPPORTUNITY = SourceTable(
    dataset="salesforce", table="opportunity", primary_key=("id",),
    deleted_flags=_SF_DELETED, fallback_dataset="gong", row_model=OpportunityRow,
    needs=("name",), reads=(("account_id", "STRING"), ("owner_id", "STRING")),
)
ACCOUNT = SourceTable(
    dataset="salesforce", table="account", primary_key=("id",), deleted_flags=_SF_DELETED, reads=(("name", "STRING"),),
    stand_in=(("id", "text"), ("name", "text"), ("is_deleted", "boolean"), ("_fivetran_deleted", "boolean")),
)
OWNER = SourceTable(
    dataset="salesforce", table="user", primary_key=("id",), deleted_flags=_SF_DELETED, slot="owner",
    reads=(("email", "STRING"),),
    stand_in=(("id", "text"), ("email", "text"), ("is_deleted", "boolean"), ("_fivetran_deleted", "boolean")),
)

# Raw rows as JSON (`j`), so optional source columns (health score, amount…) read as NULL when
# absent. amount is numeric(15,2) in the app: a value that does not fit is NULL, with a warning.
ROWS = """
    SELECT coalesce(x.id, {fn_uuid}('opportunities', o.id)) AS id,
           o.id AS gong_opportunity_id,
           o.name,
           o.j ->> 'stage_name' AS stage,
           {fn_try_date}(o.j ->> 'close_date') AS close_date,
           CASE WHEN abs(v.amount) < 1e13 THEN round(v.amount, 2) END AS amount,
           a.name AS account_name,
           u.email AS owner_email,
           CASE WHEN v.health BETWEEN 0 AND 100 THEN round(v.health, 2) END AS health_score,
           jsonb_strip_nulls(jsonb_build_object(
               'account', to_jsonb(a) - '_dlt_load_id' - '_dlt_id' - '_gs_seq',
               'warnings', nullif(to_jsonb(array_remove(ARRAY[
                   CASE WHEN a.id IS NULL THEN 'account not found: ' || (o.j ->> 'account_id') END,
                   CASE WHEN u.id IS NULL THEN 'owner not found: ' || (o.j ->> 'owner_id') END,
                   CASE WHEN o.j ->> 'amount' IS NOT NULL AND v.amount IS NULL
                        THEN 'amount is not a valid decimal: ' || (o.j ->> 'amount') END,
                   CASE WHEN abs(v.amount) >= 1e13 THEN 'amount does not fit numeric(15,2): ' || v.amount END,
                   CASE WHEN o.j ->> 'close_date' IS NOT NULL AND {fn_try_date}(o.j ->> 'close_date') IS NULL
                        THEN 'close_date cannot be parsed: ' || (o.j ->> 'close_date') END
               ], NULL)), '[]'::jsonb)
           )) AS metadata
    FROM (SELECT o.id, o.name, to_jsonb(o) AS j FROM {opportunity} o
          WHERE NOT coalesce(o._fivetran_deleted, false) AND NOT coalesce(o.is_deleted, false)) o
    CROSS JOIN LATERAL (SELECT {fn_try_numeric}(o.j ->> 'amount') AS amount,
                               {fn_try_numeric}(o.j ->> 'health_score') AS health) v
    LEFT JOIN {app_opportunities} x ON x.gong_opportunity_id = o.id
    LEFT JOIN {account} a ON a.id = o.j ->> 'account_id'
          AND NOT coalesce(a._fivetran_deleted, false) AND NOT coalesce(a.is_deleted, false)
    LEFT JOIN {owner} u ON u.id = o.j ->> 'owner_id'
          AND NOT coalesce(u._fivetran_deleted, false) AND NOT coalesce(u.is_deleted, false)
"""

BUILD = Build(
    inputs=(OPPORTUNITY, ACCOUNT, OWNER),
    rows=ROWS,
    # An account rename or an owner's new email reaches every opportunity that points at them.
    changed="""
        SELECT o.id AS gong_opportunity_id FROM {opportunity_new} o
        UNION SELECT o.id FROM {opportunity} o JOIN {account_new} a ON a.id = o.account_id
        UNION SELECT o.id FROM {opportunity} o JOIN {owner_new} u ON u.id = o.owner_id
    """,
    gone="SELECT x.id FROM {app_opportunities} x JOIN {gone} g ON g.gong_opportunity_id = x.gong_opportunity_id",
    checks=(
        Check(level="warning", message="account not found; account_name is NULL",
              sql="SELECT gong_opportunity_id, NULL FROM {rows} WHERE account_name IS NULL"),
        Check(level="warning", message="owner not found; owner_email is NULL",
              sql="SELECT gong_opportunity_id, NULL FROM {rows} WHERE owner_email IS NULL"),
        warning_check("amount is not a valid decimal; stored as NULL", "gong_opportunity_id", "amount is not"),
        warning_check("amount does not fit numeric(15,2); stored as NULL", "gong_opportunity_id", "amount does not"),
        warning_check("close_date cannot be parsed; stored as NULL", "gong_opportunity_id", "close_date"),
    ),
)

ASSET = AssetSpec(
    name="opportunities",
    description="Salesforce opportunities with stage, amount, close date, account name and owner email.",
    tags={"salesforce"},
    sources=(OPPORTUNITY, ACCOUNT, OWNER),
    table="opportunities",
    columns=(
        col("gong_opportunity_id", TEXT),
        col("name", TEXT),
        col("stage", TEXT),
        col("close_date", DATE),
        col("amount", NUMERIC),
        col("account_name", TEXT),
        col("owner_email", TEXT),
        col("health_score", NUMERIC),
        col("metadata", JSONB),
        col("updated_at", TIMESTAMPTZ, write="touch"),
    ),
    source_key="gong_opportunity_id",
    natural_key="gong_opportunity_id",
    build=BUILD,
)
