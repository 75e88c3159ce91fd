"""`speakers`: who spoke on each call (`call_speaker`), named and placed on a side of the call.

A speaker's name is the Gong user's first and last name; else the call participant's
(`call_participant`); else one made from the email's local part; else `Speaker <id>`. Its uuid
stays with the Gong speaker for good (an id map), whatever happens to its email or name; a row an
earlier importer wrote is adopted by (call, email), else (call, name). After each build the
calls whose speakers changed get their `prefect_reps` (company-side names) brought up to date.
"""

from assets.calls import CALL
from assets.spec import BOOLEAN, INTEGER, TEXT, UUID, AssetSpec, Build, SourceTable, col
from assets.users import USERS

SPEAKER = SourceTable(
    dataset="gong", table="call_speaker", primary_key=("id", "call_id"), lookups=(("call_id",), ("user_id",)),
    reads=(("user_id", "STRING"), ("talk_time", "FLOAT64")),
)
# Not in every account's ERD: without it, names come from users and emails alone.
PARTICIPANT = SourceTable(
    dataset="gong", table="call_participant", primary_key=("id", "call_id"), lookups=(("call_id", "speaker_id"),),
    reads=(("speaker_id", "STRING"), ("name", "STRING"), ("email_address", "STRING")),
    stand_in=(("id", "text"), ("call_id", "text"), ("speaker_id", "text"), ("name", "text"),
              ("email_address", "text"), ("_fivetran_deleted", "boolean")),
)

_LIVE_S = "NOT coalesce(s._fivetran_deleted, false)"

ROWS = """
    SELECT coalesce(m.id, ad.id, {fn_uuid}('speakers', b.gong_call_id || ':' || b.gong_speaker_id)) AS id,
           b.*
    FROM (
        SELECT s.call_id AS gong_call_id, s.id AS gong_speaker_id, c.id AS call_id,
               coalesce(nullif(concat_ws(' ', u.first_name, u.last_name), ''), p.name,
                        {fn_name_from_email}(coalesce(u.email_address, p.email_address)),
                        'Speaker ' || s.id) AS name,
               coalesce(u.email_address, p.email_address) AS email,
               coalesce(lower(split_part(coalesce(u.email_address, p.email_address), '@', 2))
                        = ANY({setting_internal_email_domains}), false) AS company_side,
               round(s.talk_time::numeric)::integer AS talk_time_seconds,
               round(100 * s.talk_time::numeric / nullif(total.seconds, 0), 2) AS talk_time_percentage
        FROM {call_speaker} s
        JOIN {app_calls} c ON c.gong_call_id = s.call_id
        LEFT JOIN {users} u ON u.id = s.user_id AND NOT coalesce(u._fivetran_deleted, false)
        LEFT JOIN LATERAL (
            SELECT nullif(p.name, '') AS name, nullif(p.email_address, '') AS email_address
            FROM {call_participant} p
            WHERE p.call_id = s.call_id AND p.speaker_id = s.id AND NOT coalesce(p._fivetran_deleted, false)
            ORDER BY p.id LIMIT 1
        ) p ON true
        LEFT JOIN LATERAL (
            SELECT sum(x.talk_time)::numeric AS seconds FROM {call_speaker} x
            WHERE x.call_id = s.call_id AND NOT coalesce(x._fivetran_deleted, false)
        ) total ON true
        WHERE """ + _LIVE_S + """
    ) b
    LEFT JOIN {ids_speakers} m ON m.gong_call_id = b.gong_call_id AND m.gong_speaker_id = b.gong_speaker_id
    LEFT JOIN LATERAL (
        SELECT a.id FROM {app_speakers} a
        WHERE m.id IS NULL AND a.call_id = b.call_id
          AND (lower(a.email) = lower(b.email) OR (a.email IS NULL AND a.name = b.name))
          AND NOT EXISTS (SELECT 1 FROM {ids_speakers} x WHERE x.id = a.id)
        ORDER BY a.id LIMIT 1
    ) ad ON true
"""

# Every speaker of a call whose speakers changed (their shares of its talk time move together),
# of a call that landed again, of a user or participant that changed.
CHANGED = """
    SELECT s.call_id AS gong_call_id, s.id AS gong_speaker_id FROM {call_speaker} s
    WHERE s.call_id IN (SELECT n.call_id FROM {call_speaker_new} n UNION SELECT c.id FROM {call_new} c)
    UNION SELECT n.call_id, n.id FROM {call_speaker_new} n
    UNION SELECT s.call_id, s.id FROM {call_speaker} s JOIN {users_new} u ON u.id = s.user_id
    UNION SELECT p.call_id, p.speaker_id FROM {call_participant_new} p WHERE p.speaker_id IS NOT NULL
"""

BUILD = Build(
    inputs=(SPEAKER, PARTICIPANT, USERS, CALL),
    rows=ROWS,
    changed=CHANGED,
    gone="""
        SELECT m.id FROM {gone} g
        JOIN {ids_speakers} m ON m.gong_call_id = g.gong_call_id AND m.gong_speaker_id = g.gong_speaker_id
    """,
    after=(
        # prefect_reps: sorted distinct names of the call's company-side speakers; of every call
        # on a full build, else of the changed ones (fetched by key: the IN is a join).
        """
        UPDATE {app_calls} c SET prefect_reps = r.names
        FROM (
            SELECT c.id, coalesce(array_agg(DISTINCT s.name ORDER BY s.name) FILTER (WHERE s.company_side),
                                  ARRAY[]::varchar[]) AS names
            FROM {app_calls} c LEFT JOIN {app_speakers} s ON s.call_id = c.id
            WHERE c.gong_call_id IN (SELECT k.gong_call_id FROM {changed} k
                                     UNION ALL SELECT a.gong_call_id FROM {app_calls} a WHERE {full})
            GROUP BY c.id
        ) r
        WHERE r.id = c.id AND c.prefect_reps IS DISTINCT FROM r.names
        """,
    ),
)

ASSET = AssetSpec(
    name="speakers",
    description="Call speakers: name, email, side of the call, talk time and its share.",
    deps=("users", "calls"),
    tags={"gong"},
    sources=(SPEAKER, PARTICIPANT),
    table="speakers",
    columns=(
        col("call_id", UUID),
        col("name", TEXT),
        col("email", TEXT),
        col("company_side", BOOLEAN),
        col("talk_time_seconds", INTEGER),
        col("talk_time_percentage", ("numeric",)),
    ),
    source_key=("gong_call_id", "gong_speaker_id"),
    natural_key=(),
    build=BUILD,
    id_map=True,
)
