"""`calls`: Gong calls, a replica of `gongio_ft.call` keyed on Fivetran's `(id, workspace_id)`."""

from assets.spec import AssetSpec, Index, SourceTable, columns, replica_build

SOURCE = SourceTable(dataset="gong", table="call", primary_key=("id", "workspace_id"))

COLUMNS = columns(
    id="text",
    workspace_id="text",
    primary_user_id="text",
    title="text",
    scheduled="timestamptz",
    started="timestamptz",
    duration="bigint",
    direction="text",
    scope="text",
    purpose="text",
    media="text",
    url="text",
    meeting_url="text",
    is_private="boolean",
    custom_data="jsonb",
    systems="jsonb",
    call_outcome_id="text",
    call_outcome_name="text",
    call_outcome_category="text",
    brief="text",
    _fivetran_synced="timestamptz",
)

ASSET = AssetSpec(
    name="calls",
    description="Gong calls, one row per call and workspace.",
    tags={"gong"},
    sources=(SOURCE,),
    primary_key=("id", "workspace_id"),
    columns=COLUMNS,
    build=replica_build(SOURCE, COLUMNS, casts={"custom_data": "jsonb", "systems": "jsonb"}),
    indexes=(Index(name="idx_calls_started", definition="(started DESC)"),),
)
