"""One sync in this process, as `materialize` runs it; writes its timings and peak memory as JSON.

Usage: `python -m bench.child OUT.json SELECTION`. The parent times the whole process; this
module adds what only the process itself knows: how long the imports took, how long the run
took, and its own peak resident memory. Without a Prefect API it runs in-process, as the CLI does.
"""

from __future__ import annotations

import time

STARTED = time.perf_counter()

import json  # noqa: E402
import logging  # noqa: E402
import resource  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402


def peak_rss_mb() -> float:
    """This program's own peak resident memory.

    Not `ru_maxrss`: Linux carries it across exec, so it would report the parent's peak (the
    benchmark holds every table in memory for the COPY limit). VmHWM starts afresh at exec.
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main(argv: list[str]) -> int:
    out, selection = Path(argv[0]), argv[1]
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    from graph import Selection, default_graph
    from runtime.cli import check_before_work
    from runtime.prefect_api import prefect_api_url
    from runtime.settings import load_settings

    # As `materialize` decides: a Prefect flow run when an API is configured, else in-process.
    api = prefect_api_url()
    if api:
        from runtime.flow import RunFailed, RunReport, sync_flow
    else:
        from runtime.run import RunFailed, RunReport, default_hooks, execute

    imported = time.perf_counter()
    # The CLI's checks before any work: both systems, the selection's source tables, the app's tables.
    settings = load_settings()
    graph = default_graph().subgraph(Selection.parse([selection]).resolve_ordered(default_graph()))
    check_before_work(settings, graph)
    if api:
        result = sync_flow(assets=[selection], return_state=True).result(raise_on_failure=False)
    else:
        result = execute([selection], settings=settings, hooks=default_hooks())
    finished = time.perf_counter()
    report = result.report if isinstance(result, RunFailed) else result
    outcomes = [
        {
            "asset": o.asset, "status": o.status, "rows_read": o.rows_read, "rows_loaded": o.rows_loaded,
            "rows_written": o.rows_written, "rows_deleted": o.rows_deleted,
            "duration_s": round(o.duration_s, 3), "error": o.error,
        }
        for o in (report.outcomes if isinstance(report, RunReport) else [])
    ]
    out.write_text(json.dumps({
        "status": report.status if isinstance(report, RunReport) else f"no report: {result!r}",
        "import_s": imported - STARTED,
        "run_s": finished - imported,
        "peak_rss_mb": peak_rss_mb(),
        "outcomes": outcomes,
    }))
    return 0 if isinstance(report, RunReport) and report.status == "success" else 1


if __name__ == "__main__":
    from runtime.cli import exit_process

    exit_process(main(sys.argv[1:]))  # as `materialize` exits: no teardown unless Prefect was imported
