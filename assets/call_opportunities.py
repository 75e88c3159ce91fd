"""`call_opportunities`: which calls discussed which opportunity, from Gong's CRM context links.

A link stands while its link row, its call and its opportunity are all live; the app's rows
(uuids) of both ends make the key.
"""

from assets.calls import CALL
from assets.opportunities import OPPORTUNITY
from assets.spec import UUID, AssetSpec, Build, SourceTable, col

LINK = SourceTable(
    dataset="gong", table="call_context_integration", primary_key=("name", "object_id", "call_id"),
    slot="link", needs=("object_type",),
)

BUILD = Build(
    inputs=(LINK, CALL, OPPORTUNITY),
    rows="""
        SELECT DISTINCT c.id AS call_id, o.id AS opportunity_id,
               l.call_id AS gong_call_id, l.object_id AS gong_opportunity_id
        FROM {link} l
        JOIN {app_calls} c ON c.gong_call_id = l.call_id
        JOIN {app_opportunities} o ON o.gong_opportunity_id = l.object_id
        WHERE l.object_type = 'Opportunity' AND NOT coalesce(l._fivetran_deleted, false)
    """,
    changed="""
        SELECT l.call_id AS gong_call_id, l.object_id AS gong_opportunity_id FROM {link_new} l
        UNION SELECT l.call_id, l.object_id FROM {link} l JOIN {opportunity_new} o ON o.id = l.object_id
        UNION SELECT l.call_id, l.object_id FROM {link} l JOIN {call_new} c ON c.id = l.call_id
    """,
    gone="""
        SELECT c.id AS call_id, o.id AS opportunity_id FROM {gone} g
        JOIN {app_calls} c ON c.gong_call_id = g.gong_call_id
        JOIN {app_opportunities} o ON o.gong_opportunity_id = g.gong_opportunity_id
    """,
)

ASSET = AssetSpec(
    name="call_opportunities",
    description="Links between calls and the opportunities discussed on them; one row per link.",
    deps=("calls", "opportunities"),
    tags={"gong", "salesforce"},
    sources=(LINK,),
    table="call_opportunities",
    columns=(col("call_id", UUID), col("opportunity_id", UUID)),
    identity=("call_id", "opportunity_id"),
    source_key=("gong_call_id", "gong_opportunity_id"),
    natural_key=("call_id", "opportunity_id"),
    build=BUILD,
)
