"""`python -m bench`: measure the sync against the raw COPY limit and the plain baseline.

It starts its own BigQuery emulator, Prefect server and (unless DATABASE_URL names a server where
it may create databases) an embedded Postgres, seeds N transcript rows with their calls, speakers
and users, and prints and writes the medians of `--repeat` repetitions.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

# Offline, before anything imports Prefect or dlt.
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("RUNTIME__DLTHUB_TELEMETRY", "false")

from bench.machine import machine_facts  # noqa: E402
from bench.report import memory_growth, summarize, table  # noqa: E402
from bench.run import SELECTION, run_size  # noqa: E402
from bench.world import World  # noqa: E402
from runtime.local.synthetic import MONOLOGUE_BYTES_MIN_SPREAD  # noqa: E402


def _sizes(text: str) -> list[int]:
    try:
        sizes = [int(part.replace("_", "")) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError("--rows takes whole numbers, comma-separated (200000,1000000)") from None
    if not sizes or min(sizes) < 1000:
        raise argparse.ArgumentTypeError("--rows must be at least 1000")
    return sizes


def _monologue_bytes(text: str) -> tuple[int, int] | None:
    if text.strip().lower() == "short":
        return None
    low, sep, high = text.partition("-")
    try:
        bounds = (int(low), int(high)) if sep else None
    except ValueError:
        bounds = None
    if bounds is None or bounds[0] < 0 or bounds[1] - bounds[0] < MONOLOGUE_BYTES_MIN_SPREAD:
        raise argparse.ArgumentTypeError(
            f"--monologue-bytes takes LOW-HIGH with HIGH - LOW >= {MONOLOGUE_BYTES_MIN_SPREAD} (1000-5000), "
            "or 'short' for the demo's one-line monologues")
    return bounds


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=_sizes, default=[1_000_000], metavar="N[,N...]",
                   help="transcript rows to seed; several sizes (200000,1000000) also check memory growth "
                        "(default: %(default)s)")
    p.add_argument("--monologue-bytes", type=_monologue_bytes, default=(1000, 5000), metavar="LOW-HIGH",
                   help="each transcript monologue's text size in bytes, as real calls have them, or 'short' "
                        "(default: 1000-5000)")
    p.add_argument("--repeat", type=int, default=3, help="repetitions per size; medians are reported (default: 3)")
    p.add_argument("--baseline-rows", type=int, default=50_000,
                   help="rows the plain REST + dlt baseline moves; its rows/s is extrapolated (default: 50000)")
    p.add_argument("--json", type=Path, required=True, metavar="PATH", help="where to write the results")
    p.add_argument("--work-dir", type=Path, default=None,
                   help="where the emulator, Prefect and the runs keep their files (default: a temporary folder)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.repeat < 1:
        parser().error("--repeat must be at least 1")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s bench %(message)s", stream=sys.stderr)
    for noisy in ("httpx", "dlt", "google"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="gong-sync-bench-") as scratch:
        work = args.work_dir.resolve() if args.work_dir else Path(scratch)
        with World(work, database_url=os.environ.get("DATABASE_URL")) as world:
            sizes = []
            for rows in args.rows:
                size = run_size(world, rows, args.repeat, args.baseline_rows, work / f"rows-{rows}",
                                args.monologue_bytes)
                size["summary"] = summarize(size)
                sizes.append(size)
                print(table(size) + "\n", flush=True)
            postgres = world.server_version()
    growth = memory_growth(sizes)
    if growth:
        print(f"peak memory {growth['peak_rss_mb'][0]:.0f} MB -> {growth['peak_rss_mb'][1]:.0f} MB "
              f"({growth['peak_rss_growth']:.2f}x) for {growth['rows_growth']:.1f}x rows", flush=True)
    result = {
        "machine": machine_facts(postgres),
        "settings": {
            "repeat": args.repeat, "baseline_rows": args.baseline_rows, "selection": SELECTION,
            "monologue_bytes": list(args.monologue_bytes) if args.monologue_bytes else "short",
            "postgres": "DATABASE_URL" if os.environ.get("DATABASE_URL") else "embedded",
            "prefect": "a local Prefect server, as a deployment's worker has",
        },
        "sizes": sizes,
        "memory_growth": growth,
        "bench_wall_s": time.perf_counter() - started,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2, default=str) + "\n")
    print(f"results written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
