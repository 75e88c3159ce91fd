"""`transcripts`: one app row per Gong monologue (`gongio_ft.transcript`), its sentences as text.

`text` is the sentences' text in order, joined by single spaces; `start_time_ms` the first
sentence's start; `chunk_metadata` its start, end, duration and topic. A row of the call's other
workspace (when two workspaces hold one call id) is left out with the call's loser.
"""

from assets.calls import CALL
from assets.speakers import SPEAKER
from assets.spec import INTEGER, JSONB, TEXT, TEXT_ARRAY, UUID, AssetSpec, Build, SourceTable, col

TRANSCRIPT = SourceTable(
    dataset="gong", table="transcript", primary_key=("call_id", "index", "workspace_id"),
    lookups=(("call_id", "speaker_id"),), needs=("sentence",),
    reads=(("speaker_id", "STRING"), ("topic", "STRING")),
)

# `sentence` is parsed once per row; a value that is not a JSON array reads as no sentences. The
# lateral's OFFSET 0 keeps it a subquery: flattened, each of the six uses of `js.s` below parsed
# the 1-5 KB JSON again (200k monologues: 35 s of rows, 11 s with it).
ROWS = """
    SELECT coalesce(a.id, {fn_uuid}('transcripts', t.call_id || ':' || t.index)) AS id,
           c.id AS call_id,
           sp.id AS speaker_id,
           t.index::integer AS sequence_number,
           {fn_try_integer}(js.s -> 0 ->> 'start') AS start_time_ms,
           coalesce((SELECT string_agg(e ->> 'text', ' ' ORDER BY n)
                     FROM jsonb_array_elements(js.s) WITH ORDINALITY x (e, n)
                     WHERE e ->> 'text' IS NOT NULL), '') AS text,
           CASE WHEN nullif(t.topic, '') IS NULL THEN ARRAY[]::varchar[] ELSE ARRAY[t.topic]::varchar[] END AS topics,
           jsonb_build_object(
               'start_ms', js.s -> 0 -> 'start',
               'end_ms', js.s -> -1 -> 'end',
               'duration_ms', {fn_try_numeric}(js.s -> -1 ->> 'end') - {fn_try_numeric}(js.s -> 0 ->> 'start'),
               'topic', t.topic
           ) AS chunk_metadata,
           t.call_id AS gong_call_id
    FROM {transcript} t
    JOIN {app_calls} c ON c.gong_call_id = t.call_id
                      AND coalesce(c.metadata ->> 'workspace_id', t.workspace_id) = t.workspace_id
    CROSS JOIN LATERAL (
        SELECT CASE WHEN jsonb_typeof(j) = 'array' THEN j ELSE '[]'::jsonb END AS s
        FROM (SELECT {fn_try_jsonb}(t.sentence::text) AS j) p
        OFFSET 0
    ) js
    LEFT JOIN {ids_speakers} m ON m.gong_call_id = t.call_id AND m.gong_speaker_id = t.speaker_id
    LEFT JOIN {app_speakers} sp ON sp.id = m.id
    LEFT JOIN {app_transcripts} a ON a.call_id = c.id AND a.sequence_number = t.index
    WHERE NOT coalesce(t._fivetran_deleted, false) AND t.index BETWEEN 0 AND 2147483647
"""

#: `sequence_number` is an integer in the app: a monologue index beyond it has no row there.
_SEQUENCE = "CASE WHEN t.index BETWEEN 0 AND 2147483647 THEN t.index::integer END"

BUILD = Build(
    inputs=(TRANSCRIPT, CALL, SPEAKER),
    rows=ROWS,
    # A monologue changes when it lands again, when its call does (a new call uuid, the
    # winning workspace), or when its speaker does (the speaker's uuid it points at).
    changed=f"""
        SELECT t.call_id AS gong_call_id, {_SEQUENCE} AS sequence_number FROM {{transcript_new}} t
        UNION SELECT t.call_id, {_SEQUENCE} FROM {{transcript}} t JOIN {{call_new}} c ON c.id = t.call_id
        UNION SELECT t.call_id, {_SEQUENCE} FROM {{transcript}} t
              JOIN {{call_speaker_new}} s ON s.call_id = t.call_id AND s.id = t.speaker_id
    """,
    rejects="""
        SELECT t.call_id || ':' || t.index || ':' || t.workspace_id,
               jsonb_build_object('call_id', t.call_id, 'index', t.index, 'workspace_id', t.workspace_id),
               to_jsonb(t) - '_dlt_load_id' - '_dlt_id' - '_gs_seq',
               'index ' || t.index || ' does not fit the app''s sequence_number (an integer from 0)'
        FROM {transcript_new} t
        WHERE NOT coalesce(t._fivetran_deleted, false) AND t.index NOT BETWEEN 0 AND 2147483647
    """,
    # A row's index is its own: only rows that landed since the last build (all on a full build)
    # can become or stop being a reject.
    reject_scope="SELECT t.call_id || ':' || t.index || ':' || t.workspace_id FROM {transcript_new} t",
    gone="""
        SELECT a.id FROM {gone} g
        JOIN {app_calls} c ON c.gong_call_id = g.gong_call_id
        JOIN {app_transcripts} a ON a.call_id = c.id AND a.sequence_number = g.sequence_number
    """,
)

ASSET = AssetSpec(
    name="transcripts",
    description="Call transcripts: one row per monologue with its text, speaker, start time and topic.",
    deps=("calls", "speakers"),
    tags={"gong"},
    sources=(TRANSCRIPT,),
    table="transcripts",
    columns=(
        col("call_id", UUID),
        col("speaker_id", UUID),
        col("sequence_number", INTEGER),
        col("start_time_ms", INTEGER),
        col("text", TEXT),
        col("topics", TEXT_ARRAY),
        col("chunk_metadata", JSONB),
    ),
    source_key=("gong_call_id", "sequence_number"),
    natural_key=("call_id", "sequence_number"),
    build=BUILD,
)
