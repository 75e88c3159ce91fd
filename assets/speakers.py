"""`speakers`: who spoke on each call, `call_speaker` joined with the user behind the speaker.

The join reads the raw users table (not the `users` destination table) so that a build always
sees one consistent landing of both inputs; the `users` dependency makes sure that landing is
fresh when both run.
"""

from assets.spec import LOADED_SINCE, AssetSpec, Build, SourceTable, columns, live
from assets.users import SOURCE as USERS

SOURCE = SourceTable(dataset="gong", table="call_speaker", primary_key=("id", "call_id"))

COLUMNS = columns(
    id="text",
    call_id="text",
    user_id="text",
    talk_time="double precision",
    email="text",
    name="text",
    title="text",
    company_side="boolean",
    _fivetran_synced="timestamptz",
)

_SPEAKERS = f"{{raw}}.{SOURCE.raw_table}"
_USERS = f"{{raw}}.{USERS.raw_table}"

BUILD = Build(
    inputs=(SOURCE.raw_table, USERS.raw_table),
    rows=f"""
        SELECT s.id, s.call_id, s.user_id, s.talk_time,
               u.email_address AS email,
               nullif(concat_ws(' ', u.first_name, u.last_name), '') AS name,
               u.title,
               lower(split_part(u.email_address, '@', 2)) = ANY(%(internal_email_domains)s) AS company_side,
               s._fivetran_synced
        FROM {_SPEAKERS} s
        LEFT JOIN {_USERS} u ON u.id = s.user_id AND {live('u', USERS)}
        WHERE {live('s', SOURCE)}
    """,
    # A speaker row changes when its call_speaker row lands again or when its user does.
    changed_keys=f"""
        SELECT s.id, s.call_id FROM {_SPEAKERS} s
        WHERE s.{LOADED_SINCE.format(table=SOURCE.raw_table)}
        UNION
        SELECT s.id, s.call_id FROM {_SPEAKERS} s JOIN {_USERS} u ON u.id = s.user_id
        WHERE u.{LOADED_SINCE.format(table=USERS.raw_table)}
    """,
)

ASSET = AssetSpec(
    name="speakers",
    description="Call speakers with the user's email, name, title and which side of the call they were on.",
    deps=("users", "calls"),
    tags={"gong"},
    sources=(SOURCE,),
    primary_key=("id", "call_id"),
    columns=COLUMNS,
    build=BUILD,
    build_settings=("internal_email_domains",),
)
