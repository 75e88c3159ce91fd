"""The one parser of asset selections, shared by `materialize --asset` and the flow parameter.

Items are joined by commas, and a repeated `--asset` (a list of texts) joins them too; the
selection is the union of its items:

    speakers      that asset
    +speakers     it and everything it depends on, transitively
    speakers+     it and everything that depends on it, transitively
    +speakers+    both
    tag:gong      every asset with that tag (takes `+` on either side, like a name)
    *             every asset
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from pydantic import BaseModel, ConfigDict, Field

from assets.errors import SelectionError
from graph.asset_graph import AssetGraph, unknown_name

_ITEM = re.compile(r"(?P<up>\+?)(?P<base>\*|tag:[\w-]+|[\w-]+)(?P<down>\+?)")
_GRAMMAR = "expected NAME, +NAME, NAME+, +NAME+, tag:TAG or *"


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class SelectionItem(_Frozen):
    """One comma-separated item: a base (a name, `tag:TAG` or `*`) and which way to widen it."""

    base: str
    upstream: bool = False
    downstream: bool = False

    def __str__(self) -> str:
        return f"{'+' if self.upstream else ''}{self.base}{'+' if self.downstream else ''}"

    def resolve(self, graph: AssetGraph) -> frozenset[str]:
        """The asset names this item stands for; `SelectionError` for an unknown name or tag."""
        if self.base == "*":
            return frozenset(graph.names)
        if self.base.startswith("tag:"):
            tag = self.base.removeprefix("tag:")
            found = {name for name in graph.names if tag in graph.spec(name).tags}
            if not found:
                known = {t for name in graph.names for t in graph.spec(name).tags}
                raise SelectionError(unknown_name("tag", tag, known))
        else:
            found = {graph.spec(self.base).name}  # spec() raises the "did you mean" error
        for name in tuple(found):
            if self.upstream:
                found |= graph.ancestors(name)
            if self.downstream:
                found |= graph.descendants(name)
        return frozenset(found)


class Selection(_Frozen):
    """A parsed selection: an immutable value that resolves against an `AssetGraph` to names.

    Items are kept deduplicated and sorted, so equal selections compare and print equal.
    """

    items: tuple[SelectionItem, ...] = Field(min_length=1)

    @classmethod
    def parse(cls, value: str | Sequence[str] | Selection) -> Selection:
        """Read one text or a list of texts (their union); `SelectionError` if malformed or empty."""
        if isinstance(value, Selection):
            return value
        texts = [value] if isinstance(value, str) else value
        if not isinstance(texts, Sequence) or not all(isinstance(t, str) for t in texts):
            raise SelectionError(f"a selection is a text or a list of texts, not {value!r}")
        raw = [item.strip() for text in texts for item in text.split(",")]
        if not any(raw):
            raise SelectionError(f"the asset selection is empty; {_GRAMMAR}")
        given = ", ".join(map(repr, texts))
        return cls(items=tuple(sorted({_parse_item(item, given) for item in raw}, key=str)))

    def __str__(self) -> str:
        """Canonical text, which `parse` reads back to an equal selection."""
        return ",".join(map(str, self.items))

    def resolve(self, graph: AssetGraph) -> frozenset[str]:
        """The selected asset names; `SelectionError` names the first unknown asset or tag."""
        return frozenset().union(*(item.resolve(graph) for item in self.items))

    def resolve_ordered(self, graph: AssetGraph) -> tuple[str, ...]:
        """The selected asset names in the graph's run order (dependencies first)."""
        selected = self.resolve(graph)
        return tuple(name for name in graph.names if name in selected)


def _parse_item(item: str, given: str) -> SelectionItem:
    if not item:
        raise SelectionError(f"empty item in asset selection {given}; remove the extra comma")
    match = _ITEM.fullmatch(item)
    if match is None:
        raise SelectionError(f"cannot read {item!r} in asset selection {given}; {_GRAMMAR}")
    if match["base"] == "*" and (match["up"] or match["down"]):
        # `*` already holds every asset: a `+` on it is a typo we would rather point out.
        raise SelectionError(f"'+' does not apply to '*' in asset selection {given}")
    return SelectionItem(base=match["base"], upstream=bool(match["up"]), downstream=bool(match["down"]))
