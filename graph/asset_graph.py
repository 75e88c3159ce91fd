"""The asset graph: built once from the declarations, checked at build time, then only read."""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Iterator
from typing import NamedTuple

import networkx as nx

from assets.errors import GraphError, SelectionError
from assets.spec import AssetSpec


def unknown_name(kind: str, name: str, known: Iterable[str]) -> str:
    """Message for a name that is not there: a close match if one exists, else every known name."""
    known = sorted(known)
    close = difflib.get_close_matches(name, known, n=1)
    hint = f"did you mean {close[0]!r}?" if close else f"known {kind}s: {', '.join(known) or '(none)'}"
    return f"unknown {kind} {name!r}; {hint}"


class AssetRow(NamedTuple):
    """One line of `materialize --list`."""

    name: str
    upstream: tuple[str, ...]
    level: int


class AssetGraph:
    """The assets and their dependencies, as a checked directed acyclic graph.

    Edges point from a dependency to the asset that needs it. Every method that takes an asset
    name raises `SelectionError` for a name the graph does not have.
    """

    def __init__(self, specs: Iterable[AssetSpec]) -> None:
        """Build the graph; raise `GraphError` for a duplicate name, an unknown dep or a cycle."""
        self._specs: dict[str, AssetSpec] = {}
        for spec in specs:
            if spec.name in self._specs:
                raise GraphError(f"asset {spec.name!r} is declared more than once")
            self._specs[spec.name] = spec

        self._graph = nx.DiGraph()
        self._graph.add_nodes_from(self._specs)
        for spec in self._specs.values():
            for dep in spec.deps:
                if dep not in self._specs:
                    hint = unknown_name("asset", dep, self._specs)
                    raise GraphError(f"asset {spec.name!r} depends on an {hint}")
                self._graph.add_edge(dep, spec.name)

        try:
            cycle = nx.find_cycle(self._graph)
        except nx.NetworkXNoCycle:
            pass
        else:
            raise GraphError(f"asset dependencies form a cycle (each depends on the next): {_cycle_path(cycle)}")

        self._level: dict[str, int] = {}
        for name in nx.topological_sort(self._graph):  # every dep's level is known before its asset's
            self._level[name] = 1 + max((self._level[d] for d in self._graph.predecessors(name)), default=-1)
        # Level by level, then by name: a topological order that comes out the same on every run.
        self._names = tuple(sorted(self._specs, key=lambda name: (self._level[name], name)))

    @classmethod
    def build(cls, specs: Iterable[AssetSpec]) -> AssetGraph:
        """Same as `AssetGraph(specs)`."""
        return cls(specs)

    def __repr__(self) -> str:
        return f"AssetGraph({', '.join(self._names)})"

    def __len__(self) -> int:
        return len(self._names)

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __contains__(self, name: object) -> bool:
        return name in self._specs

    @property
    def names(self) -> tuple[str, ...]:
        """Every asset name, dependencies first: level by level, by name within a level."""
        return self._names

    def spec(self, name: str) -> AssetSpec:
        """The declaration of one asset (in a subgraph, its deps hold only assets of the subgraph)."""
        return self._specs[self._known(name)]

    def upstream(self, name: str) -> tuple[str, ...]:
        """The assets this one depends on directly, in declaration order, each once."""
        return tuple(dict.fromkeys(self.spec(name).deps))

    def ancestors(self, name: str) -> frozenset[str]:
        """Every asset this one depends on, directly or not (itself excluded)."""
        return frozenset(nx.ancestors(self._graph, self._known(name)))

    def descendants(self, name: str) -> frozenset[str]:
        """Every asset that depends on this one, directly or not (itself excluded)."""
        return frozenset(nx.descendants(self._graph, self._known(name)))

    def level_of(self, name: str) -> int:
        """0 for an asset without deps, else one more than its highest dependency."""
        return self._level[self._known(name)]

    def levels(self) -> list[list[str]]:
        """Asset names grouped by level, each group sorted: the assets of a group can run together."""
        groups: list[list[str]] = [[] for _ in range(max(self._level.values(), default=-1) + 1)]
        for name in self._names:  # already sorted by name within a level
            groups[self._level[name]].append(name)
        return groups

    def subgraph(self, names: Iterable[str]) -> AssetGraph:
        """A graph of only these assets; deps on assets outside it are dropped, order among them kept."""
        keep = {self._known(name) for name in names}
        # Rebuilding through the constructor keeps one code path for the checks, and trimming the
        # deps keeps `spec(name).deps` consistent with the edges a runner of the subgraph will see.
        return AssetGraph(
            self._specs[name].model_copy(update={"deps": tuple(d for d in self._specs[name].deps if d in keep)})
            for name in self._names
            if name in keep
        )

    def describe(self) -> list[AssetRow]:
        """One row per asset, in run order: its name, its direct deps and its level."""
        return [AssetRow(name, self.upstream(name), self._level[name]) for name in self._names]

    def _known(self, name: str) -> str:
        if name not in self._specs:
            raise SelectionError(unknown_name("asset", name, self._specs))
        return name


def _cycle_path(edges: list[tuple[str, str]]) -> str:
    """`a -> b -> a`, read as "a depends on b", starting at the smallest name for a stable message."""
    # networkx gives the cycle along the edges (dependency -> dependent); reverse it to read as deps.
    nodes = [dependent for _, dependent in reversed(edges)]
    start = nodes.index(min(nodes))
    nodes = nodes[start:] + nodes[:start]
    return " -> ".join([*nodes, nodes[0]])
