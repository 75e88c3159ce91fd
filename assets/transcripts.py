"""`transcripts`: one row per monologue of a call, from `gongio_ft.transcript`."""

from assets.spec import AssetSpec, SourceTable, columns, replica_build

SOURCE = SourceTable(dataset="gong", table="transcript", primary_key=("call_id", "index", "workspace_id"))

COLUMNS = columns(
    call_id="text",
    index="bigint",
    workspace_id="text",
    speaker_id="text",
    topic="text",
    sentence="jsonb",
    _fivetran_synced="timestamptz",
)

ASSET = AssetSpec(
    name="transcripts",
    description="Call transcripts: one row per monologue, its sentences as a JSON array.",
    deps=("calls",),
    tags={"gong"},
    sources=(SOURCE,),
    primary_key=("call_id", "index", "workspace_id"),
    columns=COLUMNS,
    build=replica_build(SOURCE, COLUMNS, casts={"sentence": "jsonb"}),
)
