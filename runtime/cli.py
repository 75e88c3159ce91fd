"""`materialize`: run the asset graph, or part of it, from a shell."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Sequence
from typing import NoReturn

from assets.errors import SelectionError, SyncError, TransientError
from graph import Selection, default_graph
from runtime import commands

_OFFLINE = {"DO_NOT_TRACK": "1", "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="materialize",
        description="Sync Gong and Salesforce data from BigQuery into Postgres, asset by asset.",
        epilog=commands.HELP_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
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
    p.add_argument("--version", action="store_true", help="print the version and exit")
    p.add_argument("--status", action="store_true",
                   help="print each asset's last sync (status, checkpoint, rows, errors, dead letters), and exit")
    p.add_argument("--dead-letters", action="store_true",
                   help="list the selected assets' dead letters (default: every asset's), and exit")
    p.add_argument("--check", action="store_true",
                   help="check connections, the run lock, privileges, the app's tables and the source tables; runs nothing")
    p.add_argument("--plan", action="store_true",
                   help="print what would run, in what order, from which checkpoints, with source row counts; runs nothing")
    p.add_argument("--clean", action="store_true",
                   help="with --demo: remove everything the demo made (its folder, its Postgres cluster), and exit")
    noise = p.add_mutually_exclusive_group()
    noise.add_argument("-q", "--quiet", action="store_true", help="print only the summary, warnings and errors")
    noise.add_argument("-v", "--verbose", action="store_true", help="print debug logs, and tracebacks of expected failures")
    p.add_argument("--results", metavar="PATH", help="write the run's outcome as JSON to PATH (like dbt's run_results.json)")
    return p


def print_summary(report, out=sys.stdout, elapsed: float | None = None) -> None:  # noqa: ANN001
    if report.skipped_reason:
        out.write(report.skipped_reason + "\n")
        return
    out.write(f"run {report.run_id}  selection {report.selection}  status {report.status}\n")
    if report.trace_id:
        out.write(f"trace id {report.trace_id}\n")
        if ui := os.environ.get("JAEGER_UI_URL"):
            out.write(f"trace {ui.rstrip('/')}/trace/{report.trace_id}\n")
    header = ("asset", "status", "read", "loaded", "written", "deleted", "dead", "seconds", "checkpoint")
    rows = [
        (o.asset, o.status, str(o.rows_read), str(o.rows_loaded), str(o.rows_written), str(o.rows_deleted),
         str(o.rows_dead_lettered), f"{o.duration_s:.2f}", o.checkpoint or "-")
        for o in report.outcomes
    ]
    total = ("total", report.status, *(str(sum(getattr(o, f) for o in report.outcomes)) for f in (
        "rows_read", "rows_loaded", "rows_written", "rows_deleted", "rows_dead_lettered")),
        f"{elapsed:.2f}" if elapsed is not None else "", "")
    widths = [max(len(r[i]) for r in [header, *rows, total]) for i in range(len(header))]
    for row in [header, *rows, total]:
        out.write("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() + "\n")
    for o in report.outcomes:
        if o.cascade:
            went = ", ".join(f"{table} {n}" for table, n in sorted(o.cascade.items()))
            out.write(f"{o.asset}: {o.rows_deleted} deleted; with them went: {went}\n")
        if o.error:
            out.write(f"{o.asset}: {o.error}\n")


def _stop_on_signals(stop: threading.Event) -> None:
    """Ctrl-C or SIGTERM (a scheduler stopping the run): stop at the next safe point, roll back
    what is open, print the summary, exit 130. A second one ends the process at once."""

    def handler(signum: int, frame: object) -> None:
        if stop.is_set():
            sys.stderr.write("materialize: stopped at once\n")
            os._exit(130)
        stop.set()
        sys.stderr.write("materialize: stopping at the next safe point (press Ctrl-C again to stop at once)\n")

    signal.signal(signal.SIGINT, handler)
    signal.signal(signal.SIGTERM, handler)


def _check_sources(settings, graph) -> None:  # noqa: ANN001 - Settings, AssetGraph (imported lazily)
    from runtime.session import preflight
    from runtime.sources import check_sources

    _, _, clients = preflight(settings)
    try:
        check_sources(settings, clients, [graph.spec(name) for name in graph.names])
    finally:
        clients.close()


def check_before_work(settings, graph) -> None:  # noqa: ANN001 - Settings, AssetGraph (imported lazily)
    """What a run from the command line checks before any work: both systems, the selection's
    source tables, the app's tables. A setting to fix raises (exit 2); a system that did not
    answer is a warning, since the run retries and alerts if it gives up."""
    from runtime.session import check_app_tables

    said: set[str] = set()
    for check in (lambda: _check_sources(settings, graph), lambda: check_app_tables(settings, graph)):
        try:
            check()
        except TransientError as exc:
            if str(exc) not in said:  # Postgres down fails both checks the same way
                said.add(str(exc))
                logging.getLogger("gong_sync").warning("%s; the run will retry", exc)


def run(args: argparse.Namespace) -> int:
    from runtime.prefect_api import prefect_api_url
    from runtime.settings import load_settings

    selection = Selection.parse(args.asset or ["*"])
    selection.resolve(default_graph())  # an unknown name fails here, before anything starts
    api = prefect_api_url()
    # The first line says how the run goes: a flow run in Prefect's UI, or in this process.
    print(f"materialize: running as a Prefect flow run on {api}" if api else
          "materialize: running in-process (no Prefect API configured; set PREFECT_API_URL for a flow run)",
          flush=True)
    # Fail on a bad credential, a source table the selection needs that is not there, or app
    # tables that do not fit, in a second, before any work. (A scheduled run fails only the
    # assets whose tables are missing, with an alert: nobody is at the terminal to fix it.)
    settings = load_settings()
    if settings.dask_scheduler_address and not api:
        # Only a flow run has a task runner to send assets to.
        logging.getLogger("gong_sync").warning(
            "DASK_SCHEDULER_ADDRESS is set but no Prefect API is configured: the assets run in this process")
    graph = default_graph().subgraph(selection.resolve_ordered(default_graph()))
    check_before_work(settings, graph)
    # Imported after the preflight: importing the runner installs tracing, and the preflight's
    # BigQuery calls would otherwise show up as a trace of their own.
    from observability.metrics import flush_metrics
    from observability.tracing import flush_tracing
    from runtime.run import STOP, RunFailed, RunReport, default_hooks, execute

    _stop_on_signals(STOP)
    started = time.monotonic()
    report: RunReport | None = None
    if api:
        from runtime.flow import sync_flow

        state = sync_flow(
            assets=[str(selection)], full_refresh=args.full_refresh, allow_mass_delete=args.allow_mass_delete,
            reconcile=args.reconcile, log_format=args.log_format, show_progress=sys.stderr.isatty(),
            return_state=True,
        )
        result = state.result(raise_on_failure=False)
        if isinstance(result, RunFailed):
            report = result.report
        elif isinstance(result, RunReport):
            report = result
        elif isinstance(result, SyncError):
            raise result
        else:
            sys.stderr.write(f"materialize: the run ended {state.type.value}: {state.message}\n")
            return 1
    else:
        from runtime.progress import TerminalProgress

        progress = TerminalProgress() if sys.stderr.isatty() else None
        report = execute(
            [str(selection)], full_refresh=args.full_refresh, allow_mass_delete=args.allow_mass_delete,
            reconcile=args.reconcile, settings=settings, progress=progress.update if progress else None,
            hooks=default_hooks(json_logs=args.log_format == "json", extra=[progress] if progress else []),
        )
    # The run's spans end with it: send them, and the metrics, now.
    flush_tracing()
    flush_metrics()
    elapsed = time.monotonic() - started
    print_summary(report, elapsed=elapsed)
    if getattr(args, "results", None):
        write_results(report, args.results, elapsed)
    return 130 if report.cancelled else 1 if report.failed else 0


def write_results(report, path: str, elapsed: float) -> None:  # noqa: ANN001 - RunReport
    """The run as JSON (like dbt's run_results.json): status, elapsed, each asset's outcome."""
    import dataclasses
    import json
    from pathlib import Path

    doc = {
        "run_id": report.run_id, "selection": report.selection, "status": report.status,
        "elapsed_s": round(elapsed, 3), "trace_id": report.trace_id, "skipped_reason": report.skipped_reason,
        "assets": [dataclasses.asdict(o) for o in report.outcomes],
    }
    Path(path).write_text(json.dumps(doc, indent=2, default=str) + "\n")


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
    level = logging.WARNING if args.quiet else logging.DEBUG if args.verbose else logging.INFO
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    if args.verbose:  # dlt and the clients are loud at DEBUG; the pipeline's own lines are the point
        for noisy in ("dlt", "urllib3", "google", "grpc", "httpcore", "asyncio"):
            logging.getLogger(noisy).setLevel(logging.INFO)
    if args.log_format == "json":
        from observability.logs import use_json_lines

        use_json_lines()
    # Prefect's API client logs every HTTP request at INFO: noise for an operator.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    try:
        if args.version:
            return commands.version(sys.stdout)
        if args.clean:
            from runtime.demo import clean_demo

            return clean_demo(args)
        if args.status:
            return commands.status(commands.settings(), default_graph(), sys.stdout, args.asset)
        if args.dead_letters:
            return commands.dead_letters(commands.settings(), default_graph(), sys.stdout, args.asset)
        if args.check:
            return commands.check(default_graph(), sys.stdout, args.asset)
        if args.plan:
            return commands.plan(commands.settings(), default_graph(), sys.stdout, args.asset, args.full_refresh)
        if args.list:
            return commands.list_graph(default_graph(), sys.stdout)
        if args.schema_changes:
            return commands.schema_changes(commands.settings(), sys.stdout)
        if args.replay_dead_letters:
            return replay(args)
        if args.demo:
            from runtime.demo import run_demo

            return run_demo(args, run)
        return run(args)
    except SyncError as exc:
        if args.verbose:
            import traceback

            traceback.print_exc()
        sys.stderr.write(f"materialize: {exc}\n")
        return exc.exit_code


def entry() -> None:
    """The `materialize` command: `main`, then an exit that skips the interpreter's teardown.

    Tearing down the ~2,000 modules a run imports (dlt, pyarrow, the Google clients) takes 0.4 s
    on two cores, a seventh of a no-change run. Everything that must outlive the run is flushed
    by then (the summary, logs, spans and metrics); only Prefect's exit handlers still have work
    (its last logs and events to the API), so a process that imported Prefect exits normally.
    """
    exit_process(main())


def exit_process(code: int) -> NoReturn:
    """Exit with `code`, skipping the interpreter's teardown unless Prefect was imported (see `entry`)."""
    if "prefect" in sys.modules:
        sys.exit(code)
    if "observability.tracing" in sys.modules:  # a run that ended early may hold unsent spans
        from observability.metrics import flush_metrics
        from observability.tracing import flush_tracing

        flush_tracing()
        flush_metrics()
    logging.shutdown()
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except BrokenPipeError:  # `materialize --list | head`: the reader has gone, nothing to tell it
        pass
    os._exit(code)


if __name__ == "__main__":
    entry()
