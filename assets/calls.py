"""`calls`: one app row per Gong call (`gongio_ft.call`), keyed by its Gong id.

Gong ids are global and the app keys calls by Gong id alone: should a call id be in two
workspaces, the row with the latest `_fivetran_synced` wins and the other goes to dead letters.
"""

from assets.spec import DATE, INTEGER, JSONB, TEXT, TIMESTAMP, AssetSpec, Build, Fit, SourceTable, col

CALL = SourceTable(
    dataset="gong", table="call", primary_key=("id", "workspace_id"),
    reads=(("title", "STRING"), ("scheduled", "TIMESTAMP"), ("duration", "INT64"), ("purpose", "STRING"),
           ("url", "STRING")),
    fits=(Fit(column="duration", kinds=("bigint",),
              rule="duration_seconds is the value rounded half away from zero to whole seconds (NULL when it is "
                   "not a number or does not fit an integer); the exact value is kept in metadata.duration"),),
)

#: Source fields that have a column of their own in the app row; every other field goes to
#: `metadata`, so a new Gong column reaches the app with no DDL.
OWN_COLUMNS = ("id", "title", "scheduled", "purpose", "url")


#: The raw calls of the changed Gong ids (every one on a full build), by the raw table's key.
_CHANGED_IDS = "(SELECT k.gong_call_id FROM {changed} k UNION ALL SELECT a.id FROM {call} a WHERE {full})"


def _winners(*, changed_only: bool) -> str:
    """The live winner per Gong id, with its whole raw row as JSON: optional columns (which vary
    by account and connector version) read as NULL when the table lacks them. `changed_only`: an
    incremental build picks the winners of the changed ids only (by the raw table's key)."""
    # Not `{full} OR c.id IN …`: an IN under an OR is checked row by row over the whole table;
    # alone it is a join, and the `WHERE false` branch of an incremental build is planned away.
    only = "AND c.id IN " + _CHANGED_IDS if changed_only else ""
    return f"""
    SELECT DISTINCT ON (c.id) c.*, to_jsonb(c) AS j
    FROM {{call}} c
    WHERE NOT coalesce(c._fivetran_deleted, false) {only}
    ORDER BY c.id, c._fivetran_synced DESC NULLS LAST, c.workspace_id
"""


_WINNERS = _winners(changed_only=True)

# The columns of `reads` exist in the raw table (as NULL when the source lacks them), so they are
# read by name; every other field comes from the row's JSON. `duration` is seconds; a source that
# sends fractions is rounded half away from zero (Postgres's round on numeric); whenever
# duration_seconds is not the exact value (a fraction, beyond an integer, not a number), the exact
# value stays in metadata.duration. The lateral's OFFSET 0 parses it once, not at each use of `d.n`.
ROWS = """
    SELECT coalesce(a.id, {fn_uuid}('calls', w.id)) AS id,
           w.id AS gong_call_id,
           w.title::varchar AS title,
           (w.scheduled::timestamptz AT TIME ZONE 'UTC') AS scheduled_at,
           CASE WHEN abs(d.n) < 2147483647.5 THEN round(d.n)::integer END AS duration_seconds,
           w.purpose::varchar AS call_type,
           now()::timestamp AS processed_at,
           jsonb_strip_nulls(w.j - ARRAY['id', 'title', 'scheduled', 'purpose', 'url', 'duration',
                                         '_fivetran_deleted', '_fivetran_synced', '_dlt_load_id', '_dlt_id',
                                         '_gs_seq']
               || jsonb_build_object('gong_url', w.url)
               || CASE WHEN w.duration IS NOT NULL AND (d.n IS NULL OR abs(d.n) >= 2147483647.5 OR d.n <> round(d.n))
                       THEN jsonb_build_object('duration', w.j -> 'duration') ELSE jsonb_build_object() END
           ) AS metadata,
           (w.scheduled::timestamptz AT TIME ZONE 'UTC')::date AS date
    FROM (""" + _WINNERS + """) w
    CROSS JOIN LATERAL (SELECT {fn_try_numeric}(w.duration::text) AS n OFFSET 0) d
    LEFT JOIN {app_calls} a ON a.gong_call_id = w.id
"""

BUILD = Build(
    inputs=(CALL,),
    rows=ROWS,
    changed="SELECT c.id AS gong_call_id FROM {call_new} c",
    gone="SELECT a.id FROM {app_calls} a JOIN {gone} g ON g.gong_call_id = a.gong_call_id",
    # The other workspace's copy of a call id that two workspaces hold. Which copy loses changes
    # only when a copy of that id lands: the changed ids' rows are all that is looked at.
    rejects="""
        SELECT c.id || ':' || c.workspace_id, jsonb_build_object('id', c.id, 'workspace_id', c.workspace_id),
               to_jsonb(c) - '_dlt_load_id' - '_dlt_id' - '_gs_seq',
               'call id ' || c.id || ' is also in workspace ' || w.workspace_id
                   || ', whose row is newer by _fivetran_synced; the app keys calls by Gong id alone'
        FROM {call} c JOIN (""" + _WINNERS + """) w ON w.id = c.id AND w.workspace_id <> c.workspace_id
        WHERE NOT coalesce(c._fivetran_deleted, false)
    """,
    reject_scope="SELECT c.id || ':' || c.workspace_id FROM {call} c WHERE c.id IN " + _CHANGED_IDS,
)

ASSET = AssetSpec(
    name="calls",
    description="Gong calls: title, schedule, duration, type, the Gong link and every other field in metadata.",
    tags={"gong"},
    sources=(CALL,),
    table="calls",
    columns=(
        col("gong_call_id", TEXT),
        col("title", TEXT),
        col("scheduled_at", TIMESTAMP),
        col("duration_seconds", INTEGER),
        col("call_type", TEXT),
        col("processed_at", TIMESTAMP, write="first"),
        col("metadata", JSONB),
        col("date", DATE),
    ),
    source_key="gong_call_id",
    natural_key="gong_call_id",
    build=BUILD,
)
