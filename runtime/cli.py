"""`materialize`: run the asset graph, or part of it, from a shell."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence

from assets.errors import SelectionError, SyncError, TransientError
from graph import Selection, default_graph

_OFFLINE = {"DO_NOT_TRACK": "1", "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="materialize",
        description="Sync Gong and Salesforce data from BigQuery into Postgres, asset by asset.",
        epilog="Selections: NAME, +NAME (with upstream), NAME+ (with downstream), tag:TAG, *; comma joins.",
    )
    p.add_argument("--asset", "-a", action="append", metavar="SELECTION",
                   help="what to materialize (repeatable; default: every asset)")
    p.add_argument("--list", action="store_true", help="print the asset graph and exit")
    p.add_argument("--schema-changes", action="store_true",
                   help="print every schema change the pipeline saw or made, and exit")
    p.add_argument("--full-refresh", action="store_true",
                   help="re-read the selected assets' sources from scratch and reconcile the app tables in place")
    p.add_argument("--allow-mass-delete", action="store_true",
                   help="let this run delete more than MASS_DELETE_MAX_SHARE of an app table (rows the source lost)")
    p.add_argument("--reconcile", action="store_true",
                   help="also read each source table's keys and remove app rows whose source rows are gone")
    p.add_argument("--replay-dead-letters", action="store_true",
                   help="re-validate the selected assets' dead letters, land the rows that now pass, and exit")
    p.add_argument("--demo", action="store_true",
                   help="run against a local BigQuery emulator with a synthetic workspace and a throwaway Postgres")
    p.add_argument("--demo-dir", default=".gong-sync-demo",
                   help="where --demo keeps its state between runs (default: %(default)s)")
    p.add_argument("--log-format", choices=("text", "json"), default="text")
    return p


def print_graph(out=sys.stdout) -> None:  # noqa: ANN001
    rows = default_graph().describe()
    width = max(len(r.name) for r in rows)
    out.write(f"{'asset':<{width}}  level  upstream\n")
    for row in rows:
        out.write(f"{row.name:<{width}}  {row.level:>5}  {', '.join(row.upstream) or '-'}\n")


def print_summary(report, out=sys.stdout) -> None:  # noqa: ANN001
    if report.skipped_reason:
        out.write(report.skipped_reason + "\n")
        return
    out.write(f"run {report.run_id}  selection {report.selection}  status {report.status}\n")
    if report.trace_id:
        out.write(f"trace id {report.trace_id}\n")
        if ui := os.environ.get("JAEGER_UI_URL"):
            out.write(f"trace {ui.rstrip('/')}/trace/{report.trace_id}\n")
    header = ("asset", "status", "read", "loaded", "written", "deleted", "seconds", "checkpoint")
    rows = [
        (o.asset, o.status, str(o.rows_read), str(o.rows_loaded), str(o.rows_written), str(o.rows_deleted),
         f"{o.duration_s:.2f}", o.checkpoint or "-")
        for o in report.outcomes
    ]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        out.write("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() + "\n")
    for o in report.outcomes:
        if o.cascade:
            went = ", ".join(f"{table} {n}" for table, n in sorted(o.cascade.items()))
            out.write(f"{o.asset}: {o.rows_deleted} deleted; with them went: {went}\n")
        if o.error:
            out.write(f"{o.asset}: {o.error}\n")


def print_schema_changes(out=sys.stdout) -> int:  # noqa: ANN001
    import psycopg
    from psycopg import sql

    from runtime.postgres import Catalog, check_connection
    from runtime.settings import load_settings

    settings = load_settings()
    url = settings.postgres_url()
    check_connection(url)
    with psycopg.connect(url) as conn:
        exists = conn.execute("SELECT to_regclass(%s) IS NOT NULL", (f'"{settings.sync_schema}".schema_changes',))
        if not exists.fetchone()[0]:
            out.write("no schema changes recorded yet\n")
            return 0
        rows = conn.execute(
            sql.SQL("SELECT at, asset, table_name, column_name, change, old_type, new_type, action FROM {} ORDER BY id")
            .format(Catalog(settings).schema_changes)
        ).fetchall()
    header = ("at", "asset", "table", "column", "change", "old", "new", "action")
    cells = [header, *[(r[0].isoformat(timespec="seconds"), *(str(v or "-") for v in r[1:])) for r in rows]]
    widths = [max(len(c[i]) for c in cells) for i in range(len(header))]
    for row in cells:
        out.write("  ".join(v.ljust(w) for v, w in zip(row, widths)).rstrip() + "\n")
    return 0


def run(args: argparse.Namespace) -> int:
    from runtime.session import check_app_tables, preflight
    from runtime.settings import load_settings

    selection = Selection.parse(args.asset or ["*"])
    selection.resolve(default_graph())  # an unknown name fails here, before anything starts
    # Fail on a bad credential, or app tables that do not fit, in a second, before the Prefect
    # engine starts.
    settings = load_settings()
    try:
        _, _, clients = preflight(settings)
        clients.close()
        check_app_tables(settings, default_graph().subgraph(selection.resolve_ordered(default_graph())))
    except TransientError as exc:  # not a credential: the flow retries connecting and alerts if it gives up
        logging.getLogger("gong_sync").warning("%s; the run will retry", exc)
    # Imported after the preflight: importing the flow installs tracing, and the preflight's
    # BigQuery calls would otherwise show up as a trace of their own.
    from observability.metrics import flush_metrics
    from observability.tracing import flush_tracing
    from runtime.flow import RunFailed, RunReport, sync_flow

    state = sync_flow(
        assets=[str(selection)], full_refresh=args.full_refresh, allow_mass_delete=args.allow_mass_delete,
        reconcile=args.reconcile, log_format=args.log_format,
        show_progress=sys.stderr.isatty(), return_state=True,
    )
    # Prefect's flow-run span ends after the flow returns: send it, and the metrics, now.
    flush_tracing()
    flush_metrics()
    result = state.result(raise_on_failure=False)
    if isinstance(result, RunFailed):
        print_summary(result.report)
        return 1
    if isinstance(result, RunReport):
        print_summary(result)
        return 0
    if isinstance(result, SyncError):
        raise result
    sys.stderr.write(f"materialize: the run ended {state.type.value}: {state.message}\n")
    return 1


def replay(args: argparse.Namespace) -> int:
    """`--replay-dead-letters`: one session (the run lock held), each selected asset in graph order."""
    from runtime.dead_letters import replay_dead_letters
    from runtime.retry import with_retries
    from runtime.session import RunLockHeld, open_session
    from runtime.settings import load_settings

    if not args.asset:
        raise SelectionError("--replay-dead-letters needs --asset: say whose dead letters to replay")
    graph = default_graph()
    names = Selection.parse(args.asset).resolve_ordered(graph)
    settings = load_settings()
    try:
        session = with_retries(settings, "connect", lambda: open_session(settings, graph.subgraph(names)))
    except RunLockHeld as held:
        print(held)
        return 0
    with session:
        for result in replay_dead_letters(graph, names, settings, session):
            print(result.summary())
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    for key, value in _OFFLINE.items():
        os.environ.setdefault(key, value)
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    if args.log_format == "json":
        from observability.logs import use_json_lines

        use_json_lines()
    # Prefect's API client logs every HTTP request at INFO: noise for an operator.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    try:
        if args.schema_changes:
            return print_schema_changes()
        if args.list:
            print_graph()
            return 0
        if args.replay_dead_letters:
            return replay(args)
        if args.demo:
            from runtime.demo import run_demo

            return run_demo(args, run)
        return run(args)
    except SyncError as exc:
        sys.stderr.write(f"materialize: {exc}\n")
        return exc.exit_code


if __name__ == "__main__":
    sys.exit(main())
