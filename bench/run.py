"""One benchmark size: seed, then repeat the measurements and keep every sample."""

from __future__ import annotations

import gc
import logging
import shutil
import statistics
from dataclasses import asdict
from pathlib import Path

from bench.measures import SyncRun, copy_limit, destination_copy_limit, dlt_alone, plain_baseline, project_sync, read_tables, source_read
from bench.world import World

log = logging.getLogger("bench")

#: What the project's runs select: every asset.
SELECTION = "*"


def _sync_summary(run: SyncRun) -> dict[str, object]:
    summary = asdict(run)
    summary["outcomes"] = [
        {k: o[k] for k in ("asset", "rows_read", "rows_loaded", "rows_written", "rows_deleted", "duration_s")}
        for o in run.outcomes
    ]
    return summary


def repetition(world: World, number: int, baseline_fraction: float, work: Path, no_api: bool) -> dict[str, object]:
    """One sample of every measurement; the emulator starts afresh before each large read."""
    sample: dict[str, object] = {}
    world.restart_emulator()
    tables = read_tables(world)
    world.restart_emulator()
    with world.database("copy") as url:
        sample["copy_s"] = copy_limit(url, tables)
    log.info("  raw COPY %.2f s", sample["copy_s"])
    with world.database("dlt_alone") as url:
        sample["dlt_alone_s"] = dlt_alone(url, tables, work / f"dlt-alone-{number}")
    log.info("  dlt alone (Arrow, Parquet, ADBC COPY into plain tables) %.2f s", sample["dlt_alone_s"])
    shutil.rmtree(work / f"dlt-alone-{number}", ignore_errors=True)
    del tables
    gc.collect()

    world.restart_emulator()
    sample["source_s"], sample["source_rows"] = source_read(world)
    log.info("  Storage read %.2f s", sample["source_s"])

    world.restart_emulator()
    with world.database("baseline") as url:
        baseline = plain_baseline(world, url, work / f"baseline-{number}", baseline_fraction)
    sample["baseline"] = asdict(baseline)
    log.info("  baseline %d rows in %.2f s (query %.2f s, dlt %.2f s)", baseline.rows, baseline.seconds,
             baseline.query_s, baseline.load_s)

    world.restart_emulator()
    runs = work / f"sync-{number}"
    with world.database("sync") as url:
        # The emulator's ports change when it restarts: the environment is built for each run.
        full = project_sync(world.sync_env(url, runs / "pipelines"), SELECTION, runs, "full")
        log.info("  full sync %.2f s (in-process run %.2f s), peak %.0f MB", full.wall_s, full.run_s, full.peak_rss_mb)
        # What reached the application's tables (a sync that wrote nothing there measures nothing).
        sample["app_rows"] = world.app_rows(url)
        log.info("  app tables: %s", ", ".join(f"{t} {n}" for t, n in sample["app_rows"].items()))
        sample["copy_app_s"] = destination_copy_limit(world, url)
        log.info("  the same app rows by binary COPY into the app's schema %.2f s", sample["copy_app_s"])
        sample["changed_rows"] = world.change_one_percent(number + 1)
        world.restart_emulator()
        incremental = project_sync(world.sync_env(url, runs / "pipelines"), SELECTION, runs, "incremental")
        log.info("  incremental (%d rows changed, %d app rows written) %.2f s", sample["changed_rows"],
                 incremental.rows_written, incremental.wall_s)
        no_change = project_sync(world.sync_env(url, runs / "pipelines"), SELECTION, runs, "no_change")
        log.info("  no change %.2f s", no_change.wall_s)
        sample.update(full=_sync_summary(full), incremental=_sync_summary(incremental), no_change=_sync_summary(no_change))
        if no_api:
            # The same no-change run as an operator runs it: no Prefect API configured, in-process.
            lone = project_sync(world.sync_env(url, runs / "pipelines", own_prefect=False), SELECTION, runs, "no_change_no_api")
            log.info("  no change, in-process %.2f s", lone.wall_s)
            sample["no_change_no_api"] = _sync_summary(lone)
            # What the look-back window below the checkpoint costs: the same run without it. The
            # first run after switching it off reads the rows at the checkpoint again (dlt kept no
            # boundary hashes while the window was on): the second one is measured.
            env = {**world.sync_env(url, runs / "pipelines", own_prefect=False), "LATE_ROW_WINDOW": "0"}
            project_sync(env, SELECTION, runs, "no_change_no_window_first")
            bare = project_sync(env, SELECTION, runs, "no_change_no_window")
            log.info("  no change, in-process, LATE_ROW_WINDOW=0 %.2f s", bare.wall_s)
            sample["no_change_no_window"] = _sync_summary(bare)
    shutil.rmtree(runs / "pipelines", ignore_errors=True)
    return sample


def median(samples: list[dict], *path: str) -> float:
    values = []
    for sample in samples:
        value = sample
        for key in path:
            value = value[key]
        values.append(float(value))
    return statistics.median(values)


def run_size(world: World, rows: int, repeat: int, baseline_rows: int, work: Path,
             monologue_bytes: tuple[int, int] | None = None) -> dict[str, object]:
    """Seed about `rows` transcript rows and measure `repeat` times; medians plus every sample."""
    counts = world.seed(rows, monologue_bytes)
    total = sum(counts.values())
    log.info("seeded %d rows (%s)", total, ", ".join(f"{t} {n}" for t, n in counts.items()))
    fraction = min(1.0, baseline_rows / total)
    samples = []
    for number in range(repeat):
        log.info("repetition %d of %d", number + 1, repeat)
        samples.append(repetition(world, number, fraction, work, no_api=number == 0))
    return {"rows_requested": rows, "rows": total, "tables": counts, "samples": samples}
