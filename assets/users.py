"""`users`: Gong users, a replica of `gongio_ft.users`."""

from assets.spec import AssetSpec, SourceTable, columns, replica_build

SOURCE = SourceTable(dataset="gong", table="users", primary_key=("id",))

COLUMNS = columns(
    id="text",
    manager_id="text",
    email_address="text",
    first_name="text",
    last_name="text",
    title="text",
    active="boolean",
    created="timestamptz",
    _fivetran_synced="timestamptz",
)

ASSET = AssetSpec(
    name="users",
    description="Gong users (people in the workspace), one row per user.",
    tags={"gong"},
    sources=(SOURCE,),
    primary_key=("id",),
    columns=COLUMNS,
    build=replica_build(SOURCE, COLUMNS),
)
