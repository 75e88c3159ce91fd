"""One sync in this process, as `materialize` runs it; writes its timings and peak memory as JSON.

Usage: `python -m bench.child OUT.json SELECTION`. The parent times the whole process; this
module adds what only the process itself knows: how long the imports took, how long the run
took, and its own peak resident memory (children such as an ephemeral Prefect server excluded).
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
    from runtime.flow import RunFailed, RunReport, sync_flow
    from runtime.session import preflight
    from runtime.settings import load_settings

    imported = time.perf_counter()
    _, _, clients = preflight(load_settings())  # as the CLI does before the flow starts
    clients.close()
    state = sync_flow(assets=[selection], return_state=True)
    result = state.result(raise_on_failure=False)
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
    sys.exit(main(sys.argv[1:]))
