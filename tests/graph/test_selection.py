"""Selection: the grammar, resolution against a graph, canonical text and error text."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from assets import ALL_ASSETS
from assets.errors import ConfigError, SelectionError
from assets.spec import AssetSpec
from graph import AssetGraph, Selection


def spec(name: str, *deps: str, tags: tuple[str, ...] = ()) -> AssetSpec:
    """A fabricated node: a real declaration under another name, with other deps and tags."""
    return ALL_ASSETS[0].model_copy(update={"name": name, "deps": deps, "tags": frozenset(tags)})


@pytest.fixture
def real() -> AssetGraph:
    return AssetGraph(ALL_ASSETS)


@pytest.fixture
def tagged() -> AssetGraph:
    # a -> b -> c, with d apart; tags: a and d are "sf", c is "report".
    return AssetGraph(
        [spec("a", tags=("sf",)), spec("b", "a"), spec("c", "b", tags=("report",)), spec("d", tags=("sf",))]
    )


def select(graph: AssetGraph, text: str | list[str]) -> frozenset[str]:
    return Selection.parse(text).resolve(graph)


# --- resolution on the real graph -------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("speakers", {"speakers"}),
        ("+speakers", {"speakers", "users", "calls"}),
        ("calls+", {"calls", "transcripts", "speakers", "call_opportunities"}),
        ("+emails", {"emails", "opportunities"}),
        ("users+", {"users", "speakers", "transcripts"}),
        ("+transcripts+", {"calls", "users", "speakers", "transcripts"}),
        ("+users+", {"users", "speakers", "transcripts"}),
        ("*", {"users", "calls", "transcripts", "speakers", "opportunities", "emails", "call_opportunities"}),
        ("users,calls", {"users", "calls"}),
        ("tag:gong", {"users", "calls", "transcripts", "speakers", "emails", "call_opportunities"}),
        ("tag:salesforce", {"opportunities", "call_opportunities"}),
        ("transcripts, +speakers", {"transcripts", "speakers", "users", "calls"}),
    ],
)
def test_resolve_on_the_real_graph(real: AssetGraph, text: str, expected: set[str]) -> None:
    assert select(real, text) == expected


def test_repeated_asset_options_are_a_union(real: AssetGraph) -> None:
    assert select(real, ["users", "transcripts,users", "users"]) == {"users", "transcripts"}
    assert Selection.parse(["users", "calls"]) == Selection.parse("users,calls")


def test_resolve_ordered_follows_the_graph(real: AssetGraph) -> None:
    assert Selection.parse("speakers,+transcripts").resolve_ordered(real) == (
        "calls", "users", "speakers", "transcripts",
    )
    assert Selection.parse("+speakers").resolve_ordered(real) == ("calls", "users", "speakers")


def test_resolve_returns_a_frozenset(real: AssetGraph) -> None:
    assert isinstance(Selection.parse("users").resolve(real), frozenset)


# --- transitivity and tags on a fabricated graph ---------------------------------------------


def test_plus_is_transitive(tagged: AssetGraph) -> None:
    assert select(tagged, "+c") == {"a", "b", "c"}
    assert select(tagged, "a+") == {"a", "b", "c"}
    assert select(tagged, "b") == {"b"}


def test_tag_selects_only_tagged_assets(tagged: AssetGraph) -> None:
    assert select(tagged, "tag:sf") == {"a", "d"}
    assert select(tagged, "tag:report") == {"c"}
    assert select(tagged, "tag:sf+") == {"a", "b", "c", "d"}
    assert select(tagged, "+tag:report") == {"a", "b", "c"}


# --- parsing and canonical text ---------------------------------------------------------------


def test_whitespace_around_items_is_ignored(real: AssetGraph) -> None:
    assert Selection.parse("  users ,\tcalls+ ") == Selection.parse("users,calls+")
    assert select(real, [" +speakers "]) == {"speakers", "users", "calls"}


def test_canonical_text_is_sorted_and_deduplicated() -> None:
    selection = Selection.parse(["users, +speakers", "calls+", "users", "tag:gong"])
    assert str(selection) == "+speakers,calls+,tag:gong,users"
    assert Selection.parse(str(selection)) == selection
    assert str(Selection.parse("*")) == "*"
    assert str(Selection.parse("+speakers+")) == "+speakers+"


def test_selection_is_immutable_and_hashable() -> None:
    selection = Selection.parse("users")
    with pytest.raises(ValidationError, match="frozen"):
        selection.items = ()  # type: ignore[misc]
    assert {selection, Selection.parse(" users ")} == {selection}


def test_parse_accepts_a_parsed_selection() -> None:
    selection = Selection.parse("users")
    assert Selection.parse(selection) is selection


# --- errors -----------------------------------------------------------------------------------


def test_unknown_name_suggests_the_closest(real: AssetGraph) -> None:
    with pytest.raises(SelectionError) as error:
        select(real, "users,speakrs")
    assert str(error.value) == "unknown asset 'speakrs'; did you mean 'speakers'?"


def test_unknown_name_with_plus_suggests_too(real: AssetGraph) -> None:
    with pytest.raises(SelectionError, match=r"unknown asset 'cals'; did you mean 'calls'\?"):
        select(real, "cals+")


def test_unknown_name_without_a_close_match_lists_the_assets(real: AssetGraph) -> None:
    with pytest.raises(SelectionError) as error:
        select(real, "zzz")
    assert str(error.value) == (
        "unknown asset 'zzz'; known assets: call_opportunities, calls, emails, opportunities, speakers, "
        "transcripts, users"
    )


def test_unknown_tag_lists_the_known_tags(tagged: AssetGraph) -> None:
    with pytest.raises(SelectionError) as error:
        select(tagged, "tag:nope")
    assert str(error.value) == "unknown tag 'nope'; known tags: report, sf"


def test_unknown_tag_on_the_real_graph(real: AssetGraph) -> None:
    with pytest.raises(SelectionError, match="unknown tag 'hubspot'; known tags: gong, salesforce"):
        select(real, "tag:hubspot")


@pytest.mark.parametrize("text", ["", ",", " , ", [], [""], ["", " "]])
def test_empty_selection_is_rejected(text: str | list[str]) -> None:
    with pytest.raises(SelectionError, match="selection is empty"):
        Selection.parse(text)


@pytest.mark.parametrize("text", ["users,,calls", "users,", ",users", ["users", ""]])
def test_empty_item_is_rejected(text: str | list[str]) -> None:
    with pytest.raises(SelectionError, match="empty item in asset selection"):
        Selection.parse(text)


@pytest.mark.parametrize("text", ["++users", "users++", "us ers", "tag:", "users;calls", "+", "tag:a b"])
def test_malformed_item_is_rejected(text: str) -> None:
    with pytest.raises(SelectionError, match=r"cannot read .* expected NAME, \+NAME"):
        Selection.parse(text)


@pytest.mark.parametrize("text", ["+*", "*+", "+*+"])
def test_plus_on_star_is_rejected(text: str) -> None:
    with pytest.raises(SelectionError, match=r"'\+' does not apply to '\*'"):
        Selection.parse(text)


def test_non_text_is_rejected() -> None:
    with pytest.raises(SelectionError, match="text or a list of texts"):
        Selection.parse(None)  # type: ignore[arg-type]
    with pytest.raises(SelectionError, match="text or a list of texts"):
        Selection.parse(["users", 3])  # type: ignore[list-item]


def test_selection_errors_are_config_errors() -> None:
    # The CLI maps ConfigError to exit code 2: a bad selection is the caller's mistake.
    with pytest.raises(ConfigError) as error:
        Selection.parse(",")
    assert error.value.exit_code == 2
