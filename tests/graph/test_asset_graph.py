"""AssetGraph: build-time checks, order, levels, subgraphs, on fabricated specs and the real assets."""

from __future__ import annotations

import pytest

from assets import ALL_ASSETS
from assets.errors import ConfigError, GraphError, SelectionError
from assets.spec import AssetSpec
from graph import AssetGraph, default_graph


def spec(name: str, *deps: str, tags: tuple[str, ...] = ()) -> AssetSpec:
    """A fabricated node: a real declaration under another name, with other deps and tags."""
    return ALL_ASSETS[0].model_copy(update={"name": name, "deps": deps, "tags": frozenset(tags)})


# A diamond with a tail: a -> b, a -> c, (b, c) -> d, d -> e; plus a lone z.
DIAMOND = (spec("d", "b", "c"), spec("b", "a"), spec("e", "d"), spec("c", "a"), spec("a"), spec("z"))


@pytest.fixture
def diamond() -> AssetGraph:
    return AssetGraph(DIAMOND)


# --- the real graph ---------------------------------------------------------------------------


def test_real_graph_levels() -> None:
    graph = AssetGraph(ALL_ASSETS)
    # The graph follows the data: users -> speakers -> transcripts; calls -> speakers, transcripts.
    assert graph.levels() == [
        ["calls", "opportunities", "users"],
        ["call_opportunities", "emails", "speakers"],
        ["transcripts"],
    ]
    assert graph.level_of("users") == graph.level_of("calls") == graph.level_of("opportunities") == 0
    assert graph.level_of("speakers") == graph.level_of("emails") == graph.level_of("call_opportunities") == 1
    assert graph.level_of("transcripts") == 2


def test_real_graph_order_and_edges() -> None:
    graph = AssetGraph(ALL_ASSETS)
    assert graph.names == (
        "calls", "opportunities", "users", "call_opportunities", "emails", "speakers", "transcripts",
    )
    assert graph.upstream("speakers") == ("users", "calls")
    assert graph.upstream("transcripts") == ("calls", "speakers")
    assert graph.upstream("call_opportunities") == ("calls", "opportunities")
    assert graph.ancestors("speakers") == {"users", "calls"}
    assert graph.descendants("calls") == {"transcripts", "speakers", "call_opportunities"}
    assert graph.descendants("users") == {"speakers", "transcripts"}
    assert graph.descendants("opportunities") == {"emails", "call_opportunities"}


def test_real_graph_describe_rows() -> None:
    rows = AssetGraph(ALL_ASSETS).describe()
    assert [tuple(row) for row in rows] == [
        ("calls", (), 0),
        ("opportunities", (), 0),
        ("users", (), 0),
        ("call_opportunities", ("calls", "opportunities"), 1),
        ("emails", ("opportunities",), 1),
        ("speakers", ("users", "calls"), 1),
        ("transcripts", ("calls", "speakers"), 2),
    ]
    assert rows[5].name == "speakers" and rows[5].upstream == ("users", "calls") and rows[5].level == 1


def test_default_graph_is_built_once_from_all_assets() -> None:
    assert default_graph() is default_graph()
    assert set(default_graph().names) == {a.name for a in ALL_ASSETS}
    assert default_graph().spec("speakers") is next(a for a in ALL_ASSETS if a.name == "speakers")


# --- order, levels, lookups -------------------------------------------------------------------


def test_names_are_topological_and_deterministic(diamond: AssetGraph) -> None:
    assert diamond.names == ("a", "z", "b", "c", "d", "e")
    # Declaration order does not change the result.
    assert AssetGraph(reversed(DIAMOND)).names == diamond.names
    position = {name: i for i, name in enumerate(diamond.names)}
    for name in diamond.names:
        assert all(position[dep] < position[name] for dep in diamond.upstream(name))


def test_levels_use_the_longest_path(diamond: AssetGraph) -> None:
    assert diamond.levels() == [["a", "z"], ["b", "c"], ["d"], ["e"]]
    assert [diamond.level_of(n) for n in ("a", "b", "d", "e", "z")] == [0, 1, 2, 3, 0]


def test_level_is_one_more_than_the_highest_dep() -> None:
    # x depends on a level-0 and a level-2 asset: the higher one decides.
    graph = AssetGraph([spec("p"), spec("q", "p"), spec("r", "q"), spec("x", "p", "r")])
    assert graph.level_of("x") == 3


def test_ancestors_and_descendants_are_transitive(diamond: AssetGraph) -> None:
    assert diamond.ancestors("e") == {"a", "b", "c", "d"}
    assert diamond.descendants("a") == {"b", "c", "d", "e"}
    assert diamond.ancestors("a") == frozenset()
    assert diamond.descendants("z") == frozenset()


def test_spec_returns_the_declaration(diamond: AssetGraph) -> None:
    assert diamond.spec("d") is DIAMOND[0]
    assert "d" in diamond and "nope" not in diamond
    assert len(diamond) == 6 and list(diamond) == list(diamond.names)


def test_build_is_the_constructor() -> None:
    assert AssetGraph.build(DIAMOND).names == AssetGraph(DIAMOND).names


def test_empty_graph() -> None:
    graph = AssetGraph([])
    assert graph.names == () and graph.levels() == [] and graph.describe() == []


@pytest.mark.parametrize("call", ["spec", "upstream", "ancestors", "descendants", "level_of"])
def test_lookup_of_an_unknown_name_is_a_selection_error(diamond: AssetGraph, call: str) -> None:
    with pytest.raises(SelectionError, match=r"unknown asset 'dd'; did you mean 'd'\?"):
        getattr(diamond, call)("dd")


# --- subgraphs --------------------------------------------------------------------------------


def test_subgraph_drops_outside_deps_and_keeps_order(diamond: AssetGraph) -> None:
    sub = diamond.subgraph(["e", "b", "d"])
    assert sub.names == ("b", "d", "e")
    assert sub.upstream("d") == ("b",)  # c is outside
    assert sub.spec("d").deps == ("b",)
    assert sub.upstream("b") == ()  # a is outside
    assert sub.levels() == [["b"], ["d"], ["e"]]
    assert sub.ancestors("e") == {"b", "d"}
    # The original graph is untouched.
    assert diamond.upstream("d") == ("b", "c") and len(diamond) == 6


def test_subgraph_of_the_real_graph() -> None:
    sub = AssetGraph(ALL_ASSETS).subgraph({"speakers", "users"})
    assert sub.names == ("users", "speakers")
    assert sub.upstream("speakers") == ("users",)
    assert sub.levels() == [["users"], ["speakers"]]


def test_subgraph_of_an_unknown_name_fails(diamond: AssetGraph) -> None:
    with pytest.raises(SelectionError, match="unknown asset 'q'"):
        diamond.subgraph(["a", "q"])


# --- build-time errors ------------------------------------------------------------------------


def test_duplicate_name_is_rejected() -> None:
    with pytest.raises(GraphError, match="asset 'a' is declared more than once"):
        AssetGraph([spec("a"), spec("b"), spec("a")])


def test_unknown_dep_names_asset_dep_and_suggestion() -> None:
    with pytest.raises(GraphError) as error:
        AssetGraph([spec("users"), spec("calls"), spec("speakers", "users", "cals")])
    assert str(error.value) == "asset 'speakers' depends on an unknown asset 'cals'; did you mean 'calls'?"
    assert not isinstance(error.value, ConfigError)  # a broken declaration, not a bad setting


def test_unknown_dep_without_a_close_match_lists_the_assets() -> None:
    with pytest.raises(GraphError) as error:
        AssetGraph([spec("users"), spec("calls"), spec("speakers", "zzz")])
    assert "did you mean" not in str(error.value)
    assert str(error.value).endswith("unknown asset 'zzz'; known assets: calls, speakers, users")


def test_cycle_message_shows_the_path() -> None:
    with pytest.raises(GraphError, match="cycle") as error:
        AssetGraph([spec("a", "b"), spec("b", "a")])
    assert str(error.value).endswith(": a -> b -> a")


def test_longer_cycle_reads_as_depends_on() -> None:
    # a needs c, c needs b, b needs a; the lone x and y are not part of it.
    with pytest.raises(GraphError) as error:
        AssetGraph([spec("x"), spec("b", "a"), spec("a", "c"), spec("c", "b"), spec("y", "x")])
    assert str(error.value).endswith(": a -> c -> b -> a")


def test_self_dependency_is_a_cycle() -> None:
    with pytest.raises(GraphError, match="a -> a"):
        AssetGraph([spec("a", "a")])
