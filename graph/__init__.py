"""The asset graph and the selection grammar: pure, built once, knows nothing of Prefect."""

from __future__ import annotations

from functools import cache

from assets import ALL_ASSETS
from graph.asset_graph import AssetGraph, AssetRow
from graph.selection import Selection, SelectionItem


@cache
def default_graph() -> AssetGraph:
    """The graph of every declared asset (`assets.ALL_ASSETS`), built on first use."""
    return AssetGraph(ALL_ASSETS)


__all__ = ["AssetGraph", "AssetRow", "Selection", "SelectionItem", "default_graph"]
