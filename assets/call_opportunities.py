"""`call_opportunities`: which calls discussed which opportunity, from Gong's CRM context links."""

from assets.calls import SOURCE as CALL
from assets.opportunities import OPPORTUNITY
from assets.spec import AssetSpec, Build, SourceTable, columns, live, since

LINK = SourceTable(dataset="gong", table="call_context_integration", primary_key=("name", "object_id", "call_id"))

_L, _C, _O = (f"{{raw}}.{t.raw_table}" for t in (LINK, CALL, OPPORTUNITY))

BUILD = Build(
    inputs=(LINK.raw_table, CALL.raw_table, OPPORTUNITY.raw_table),
    # A link row stands only while its call and its opportunity are both live.
    rows=f"""
        SELECT DISTINCT l.call_id, l.object_id AS opportunity_id
        FROM {_L} l
        JOIN {_O} o ON o.id = l.object_id AND {live('o', OPPORTUNITY)}
        WHERE l.object_type = 'Opportunity' AND {live('l', LINK)}
          AND EXISTS (SELECT 1 FROM {_C} c WHERE c.id = l.call_id AND {live('c', CALL)})
    """,
    changed_keys=f"""
        SELECT l.call_id, l.object_id FROM {_L} l WHERE {since(LINK, 'l')}
        UNION SELECT l.call_id, l.object_id FROM {_L} l JOIN {_O} o ON o.id = l.object_id WHERE {since(OPPORTUNITY, 'o')}
        UNION SELECT l.call_id, l.object_id FROM {_L} l JOIN {_C} c ON c.id = l.call_id WHERE {since(CALL, 'c')}
    """,
)

ASSET = AssetSpec(
    name="call_opportunities",
    description="Links between calls and the opportunities discussed on them; one row per link.",
    deps=("calls", "opportunities"),
    tags={"gong", "salesforce"},
    sources=(LINK,),
    primary_key=("call_id", "opportunity_id"),
    columns=columns(call_id="text", opportunity_id="text"),
    build=BUILD,
    indexes=(),
)
