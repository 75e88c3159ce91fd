"""`opportunities`: Salesforce opportunities with their account's name and owner's email.

Read from the Salesforce connector's dataset; a project without one falls back to the Gong
connector's `opportunity` table, and the account and owner then stay unknown (NULL, warned).
"""

from pydantic import BaseModel, Field

from assets.spec import AssetSpec, Build, Check, Column, Index, SourceTable, columns, live, since, warning_check


class OpportunityRow(BaseModel):
    """An opportunity that can be loaded: it has an id and a name."""

    id: str = Field(min_length=1, description="gong_opportunity_id")
    name: str = Field(min_length=1)


_SF_DELETED = ("_fivetran_deleted", "is_deleted")

# The cursor is `_fivetran_synced`, not `last_modified_date`: Fivetran bumps it for every row it
# writes, so it moves with every modification too, and a soft delete (`_fivetran_deleted`) moves
# only it — on `last_modified_date` a deleted opportunity would never be read again.
OPPORTUNITY = SourceTable(
    dataset="salesforce", table="opportunity", primary_key=("id",),
    deleted_flags=_SF_DELETED, fallback_dataset="gong", row_model=OpportunityRow,
)
ACCOUNT = SourceTable(
    dataset="salesforce", table="account", primary_key=("id",), deleted_flags=_SF_DELETED,
    stand_in=columns(id="text", name="text", is_deleted="boolean", _fivetran_deleted="boolean"),
)
OWNER = SourceTable(
    dataset="salesforce", table="user", primary_key=("id",), deleted_flags=_SF_DELETED,
    stand_in=columns(id="text", email="text", is_deleted="boolean", _fivetran_deleted="boolean"),
)

COLUMNS = (
    *columns(
        gong_opportunity_id="text",
        name="text",
        stage="text",
        close_date="date",
        amount="numeric",
        account_name="text",
        owner_email="text",
        health_score="numeric",
        metadata="jsonb",
    ),
    Column(name="updated_at", pg_type="timestamptz NOT NULL DEFAULT now()", touched=True),
)

_O, _A, _U = (f"{{raw}}.{t.raw_table}" for t in (OPPORTUNITY, ACCOUNT, OWNER))
#: Raw rows as JSON, so optional source columns (health score) read as NULL when absent.
_ROW = "to_jsonb(o)"

BUILD = Build(
    inputs=(OPPORTUNITY.raw_table, ACCOUNT.raw_table, OWNER.raw_table),
    rows=f"""
        SELECT o.id AS gong_opportunity_id,
               o.name,
               o.stage_name AS stage,
               {{raw}}.gs_try_date({_ROW} ->> 'close_date') AS close_date,
               {{raw}}.gs_try_numeric({_ROW} ->> 'amount') AS amount,
               a.name AS account_name,
               u.email AS owner_email,
               CASE WHEN {{raw}}.gs_try_numeric({_ROW} ->> 'health_score') BETWEEN 0 AND 100
                    THEN {{raw}}.gs_try_numeric({_ROW} ->> 'health_score') END AS health_score,
               jsonb_strip_nulls(jsonb_build_object(
                   'account', to_jsonb(a) - '_dlt_load_id',
                   'warnings', nullif(to_jsonb(array_remove(ARRAY[
                       CASE WHEN a.id IS NULL THEN 'account not found: ' || o.account_id END,
                       CASE WHEN u.id IS NULL THEN 'owner not found: ' || o.owner_id END,
                       CASE WHEN {_ROW} ->> 'amount' IS NOT NULL AND {{raw}}.gs_try_numeric({_ROW} ->> 'amount') IS NULL
                            THEN 'amount is not a valid decimal: ' || ({_ROW} ->> 'amount') END,
                       CASE WHEN {_ROW} ->> 'close_date' IS NOT NULL AND {{raw}}.gs_try_date({_ROW} ->> 'close_date') IS NULL
                            THEN 'close_date cannot be parsed: ' || ({_ROW} ->> 'close_date') END
                   ], NULL)), '[]'::jsonb)
               )) AS metadata
        FROM {_O} o
        LEFT JOIN {_A} a ON a.id = o.account_id AND {live('a', ACCOUNT)}
        LEFT JOIN {_U} u ON u.id = o.owner_id AND {live('u', OWNER)}
        WHERE {live('o', OPPORTUNITY)}
    """,
    # An account rename or an owner's new email reaches every opportunity that points at them.
    changed_keys=f"""
        SELECT o.id FROM {_O} o WHERE {since(OPPORTUNITY, 'o')}
        UNION SELECT o.id FROM {_O} o JOIN {_A} a ON a.id = o.account_id WHERE {since(ACCOUNT, 'a')}
        UNION SELECT o.id FROM {_O} o JOIN {_U} u ON u.id = o.owner_id WHERE {since(OWNER, 'u')}
    """,
    checks=(
        Check(level="warning", message="account not found; account_name is NULL",
              sql="SELECT gong_opportunity_id, NULL FROM _build_rows WHERE account_name IS NULL"),
        Check(level="warning", message="owner not found; owner_email is NULL",
              sql="SELECT gong_opportunity_id, NULL FROM _build_rows WHERE owner_email IS NULL"),
        warning_check("amount is not a valid decimal; stored as NULL", "gong_opportunity_id", "amount"),
        warning_check("close_date cannot be parsed; stored as NULL", "gong_opportunity_id", "close_date"),
    ),
)

ASSET = AssetSpec(
    name="opportunities",
    description="Salesforce opportunities with stage, amount, close date, account name and owner email.",
    tags={"salesforce"},
    sources=(OPPORTUNITY, ACCOUNT, OWNER),
    primary_key=("gong_opportunity_id",),
    columns=COLUMNS,
    build=BUILD,
    indexes=(
        Index(name="idx_opportunities_owner", definition="(owner_email, updated_at DESC)"),
        Index(name="idx_opportunities_stage", definition="(stage, close_date)"),
        Index(name="idx_opportunities_health", definition="(health_score) WHERE health_score IS NOT NULL"),
    ),
)
