"""Prefect artifacts for each run: a table of every asset's figures and the graph as it ran."""

from __future__ import annotations

import re
from collections.abc import Sequence

from graph import AssetGraph
from observability.events import AssetOutcome, RunInfo
from observability.hooks import Hook
from observability.logs import redact, trace_url

#: Artifact keys: Prefect keeps every run's version under one key, newest first.
TABLE_KEY = "gong-sync-assets"
GRAPH_KEY = "gong-sync-graph"
_STATUS_STYLE = {
    "success": "fill:#d8f3dc,stroke:#2d6a4f",
    "failed": "fill:#ffd6d6,stroke:#c1121f",
    "skipped": "fill:#eeeeee,stroke:#888888,stroke-dasharray:4",
}


def asset_rows(outcomes: Sequence[AssetOutcome]) -> list[dict[str, object]]:
    """One row per asset, in graph order: what the table artifact shows."""
    return [
        {
            "asset": o.asset,
            "status": o.status,
            "rows_read": o.rows_read,
            "rows_synced": o.rows_synced,
            "rows_dead_lettered": o.rows_dead_lettered,
            "errors": o.errors,
            "duration_s": round(o.duration_s, 2),
            "checkpoint": o.checkpoint or "",
            "error": redact(o.error) if o.error else "",
        }
        for o in outcomes
    ]


def _node_id(name: str) -> str:
    return re.sub(r"\W", "_", name)


def _node_text(o: AssetOutcome) -> str:
    if o.status == "success":
        return f"{o.rows_synced} rows · {o.duration_s:.1f} s"
    if o.status == "failed":
        return f"failed in {o.step or 'run'} · {o.duration_s:.1f} s"
    return "skipped"


def graph_markdown(run: RunInfo, graph: AssetGraph, outcomes: Sequence[AssetOutcome]) -> str:
    """The selected graph as a Mermaid flowchart coloured by outcome, then level by level as a table."""
    by_name = {o.asset: o for o in outcomes}
    lines = [f"### Run `{run.run_id}`: `{run.selection}`", ""]
    if url := trace_url(run.trace_id):
        lines += [f"Trace: [{run.trace_id}]({url})", ""]
    elif run.trace_id:
        lines += [f"Trace id: `{run.trace_id}`", ""]
    lines += ["```mermaid", "flowchart LR"]
    for name in graph.names:
        o = by_name.get(name) or AssetOutcome(asset=name, status="skipped")
        lines.append(f'    {_node_id(name)}["{name}<br/>{_node_text(o)}"]:::{o.status}')
    for name in graph.names:
        for upstream in graph.upstream(name):
            lines.append(f"    {_node_id(upstream)} --> {_node_id(name)}")
    lines += [f"    classDef {status} {style}" for status, style in _STATUS_STYLE.items()]
    lines += ["```", "", "| level | asset | after | status | rows synced | seconds | note |", "|---|---|---|---|---|---|---|"]
    levels = {row.name: row.level for row in graph.describe()}
    for name in sorted(graph.names, key=lambda n: (levels.get(n, 0), n)):
        o = by_name.get(name) or AssetOutcome(asset=name, status="skipped")
        note = redact(o.error or "").replace("|", "\\|").replace("\n", " ")
        lines.append(
            f"| {levels.get(name, 0)} | {name} | {', '.join(graph.upstream(name)) or '-'} | {o.status} "
            f"| {o.rows_synced} | {o.duration_s:.2f} | {note} |"
        )
    return "\n".join(lines) + "\n"


class RunArtifacts(Hook):
    """Creates both artifacts when a flow run ends; outside a flow run there is nothing to attach to."""

    def __init__(self, graph: AssetGraph) -> None:
        self.graph = graph

    def run_finished(self, run: RunInfo, outcomes: Sequence[AssetOutcome], error: BaseException | None) -> None:
        if not run.flow_run_id:
            return
        from prefect.artifacts import create_markdown_artifact, create_table_artifact

        failed = [o.asset for o in outcomes if o.status == "failed"]
        summary = f"{len(outcomes)} asset(s), {'failed: ' + ', '.join(failed) if failed else 'all succeeded'}"
        create_table_artifact(
            table=asset_rows(outcomes), key=TABLE_KEY,
            description=f"Run {run.run_id} ({run.selection}): {summary}" + (f"; trace {run.trace_id}" if run.trace_id else ""),
        )
        create_markdown_artifact(
            markdown=graph_markdown(run, self.graph, outcomes), key=GRAPH_KEY,
            description=f"The asset graph of run {run.run_id} as it ran",
        )
