"""`users`: Gong's users land in the raw schema (speakers read them); the app's accounts gain one
for each active internal Gong user that has none.

The app owns its accounts: the pipeline adds an account (email, name; the role keeps the app's
default), keeps the name current on accounts it added, and never changes a role, another
account's name, or deletes an account. An account it added has the uuid derived from its email,
which is how it tells them apart without a column of its own.
"""

from assets.spec import TEXT, AssetSpec, Build, SourceTable, col

USERS = SourceTable(
    dataset="gong", table="users", primary_key=("id",), needs=("email_address",),
    reads=(("first_name", "STRING"), ("last_name", "STRING"), ("active", "BOOL"), ("title", "STRING")),
)

# Optional columns (`active`, names) are read through the row's JSON: absent means NULL.
_INTERNAL = """
    SELECT DISTINCT ON (lower(u.email_address)) u.email_address, lower(u.email_address) AS gong_email,
           coalesce(nullif(concat_ws(' ', to_jsonb(u) ->> 'first_name', to_jsonb(u) ->> 'last_name'), ''),
                    {fn_name_from_email}(u.email_address)) AS name
    FROM {users} u
    WHERE NOT coalesce(u._fivetran_deleted, false)
      AND coalesce((to_jsonb(u) ->> 'active')::boolean, true)
      AND lower(split_part(u.email_address, '@', 2)) = ANY({setting_internal_email_domains})
    ORDER BY lower(u.email_address), u._fivetran_synced DESC NULLS LAST, u.id
"""

BUILD = Build(
    inputs=(USERS,),
    rows="""
        SELECT coalesce(a.id, {fn_uuid}('users', g.gong_email)) AS id,
               coalesce(a.email, g.email_address) AS email,
               CASE WHEN a.id IS NULL OR a.id = {fn_uuid}('users', g.gong_email) THEN g.name ELSE a.name END AS name,
               g.gong_email
        FROM (""" + _INTERNAL + """) g
        LEFT JOIN LATERAL (
            SELECT a.id, a.email, a.name FROM {app_users} a WHERE lower(a.email) = g.gong_email
            ORDER BY a.email = g.email_address DESC, a.id LIMIT 1
        ) a ON true
    """,
    changed="SELECT lower(u.email_address) AS gong_email FROM {users_new} u WHERE u.email_address IS NOT NULL",
)

ASSET = AssetSpec(
    name="users",
    description="Gong users in the raw schema; an app account for each active internal Gong user.",
    tags={"gong"},
    sources=(USERS,),
    table="users",
    columns=(col("email", TEXT), col("name", TEXT)),
    source_key="gong_email",
    natural_key="email",
    build=BUILD,
    deletes=False,
)
