"""Medians, ratios and targets from the samples, and the table the README shows."""

from __future__ import annotations

import statistics

from bench.run import median

#: The targets (#16), each as (what, comparison, bound). The plain baseline is reported beside
#: them, with no target: it lands raw replicas only, none of the app's tables, trigger or indexes.
TARGETS = {
    "full_vs_copy": (">=", 0.5),
    "incremental_vs_full": ("<=", 0.10),
    # As an operator runs it: one process, no Prefect API configured (in-process).
    "no_change_wall_s": ("<", 3.0),
    "peak_rss_mb": ("<", 600.0),
}
#: Peak memory may grow at most this much when the rows grow fivefold.
MEMORY_GROWTH_BOUND = 1.2


def _met(value: float, comparison: str, bound: float) -> bool:
    return {">=": value >= bound, "<=": value <= bound, "<": value < bound}[comparison]


def summarize(size: dict) -> dict:
    """The medians of one size's samples, its rows/s, the ratios and whether each target is met."""
    samples, rows = size["samples"], size["rows"]
    # The limit: the sync's own app rows by binary COPY into the app's schema (its trigger and
    # indexes included). Samples from before it was measured fall back to the source-row COPY.
    source_copy_s = median(samples, "copy_s")
    copy_s = median(samples, "copy_app_s") if all("copy_app_s" in s for s in samples) else source_copy_s
    source_s = median(samples, "source_s")
    # Samples from before dlt alone was measured have none.
    dlt_s = median(samples, "dlt_alone_s") if all("dlt_alone_s" in s for s in samples) else None
    # Extrapolated: the baseline moves a subset of the rows (REST paging is slow).
    baseline_rate = statistics.median(
        s["baseline"]["rows"] / (s["baseline"]["query_s"] + s["baseline"]["load_s"]) for s in samples
    )
    full_s = median(samples, "full", "wall_s")
    full_run_s = median(samples, "full", "run_s")
    incremental_s = median(samples, "incremental", "wall_s")
    incremental_run_s = median(samples, "incremental", "run_s")
    no_change_s = median(samples, "no_change", "wall_s")
    in_process = [s["no_change_no_api"]["wall_s"] for s in samples if "no_change_no_api" in s]
    peak = max(max(s[k]["peak_rss_mb"] for k in ("full", "incremental", "no_change")) for s in samples)
    full_rate = rows / full_s
    values = {
        "full_vs_copy": copy_s / full_s,
        "full_vs_baseline": full_rate / baseline_rate,
        "incremental_vs_full": incremental_s / full_s,
        "no_change_wall_s": statistics.median(in_process) if in_process else no_change_s,
        "peak_rss_mb": peak,
    }
    summary = {
        "rows": rows,
        "rows_per_s": {
            "copy_limit": rows / copy_s,
            "source_copy": rows / source_copy_s,
            "source_read": rows / source_s,
            **({"dlt_alone": rows / dlt_s} if dlt_s else {}),
            "baseline": baseline_rate,
            "sync_full": full_rate,
            "sync_full_in_process": rows / full_run_s,
        },
        "seconds": {
            "copy_limit": copy_s,
            "source_copy": source_copy_s,
            "source_read": source_s,
            **({"dlt_alone": dlt_s} if dlt_s else {}),
            "baseline_subset": median(samples, "baseline", "query_s") + median(samples, "baseline", "load_s"),
            "sync_full": full_s,
            "sync_full_in_process": full_run_s,
            "sync_incremental": incremental_s,
            "sync_incremental_in_process": incremental_run_s,
            "sync_no_change": no_change_s,
            "sync_no_change_in_process": median(samples, "no_change", "run_s"),
            "sync_imports": median(samples, "no_change", "import_s"),
        },
        "baseline_rows": samples[0]["baseline"]["rows"],
        "changed_rows": median(samples, "changed_rows"),
        "incremental_rows_loaded": median(samples, "incremental", "rows_loaded"),
        # Rows of the application's tables: after the full sync, and written by the other runs.
        "app_rows": samples[0]["app_rows"],
        "app_rows_written": {k: median(samples, k, "rows_written") for k in ("full", "incremental", "no_change")},
        "peak_rss_mb": {k: max(s[k]["peak_rss_mb"] for s in samples) for k in ("full", "incremental", "no_change")},
        "ratios": {
            "full_vs_copy": values["full_vs_copy"],
            "full_vs_source_copy": source_copy_s / full_s,
            "full_vs_baseline": values["full_vs_baseline"],
            "incremental_vs_full": values["incremental_vs_full"],
            "incremental_vs_full_in_process": incremental_run_s / full_run_s,
        },
        "targets": {
            name: {"value": values[name], "target": f"{cmp} {bound:g}", "met": _met(values[name], cmp, bound)}
            for name, (cmp, bound) in TARGETS.items()
        },
    }
    no_api = [s["no_change_no_api"]["wall_s"] for s in samples if "no_change_no_api" in s]
    if no_api:
        summary["seconds"]["sync_no_change_no_api"] = no_api[0]
    bare = [s["no_change_no_window"] for s in samples if "no_change_no_window" in s]
    if bare:
        summary["seconds"]["sync_no_change_no_window"] = bare[0]["wall_s"]
        summary["seconds"]["sync_no_change_no_window_run"] = bare[0]["run_s"]
        summary["seconds"]["sync_no_change_no_api_run"] = samples[0]["no_change_no_api"]["run_s"]
    return summary


def memory_growth(sizes: list[dict]) -> dict | None:
    """Peak memory of the largest size over the smallest's, against the row growth between them."""
    if len(sizes) < 2:
        return None
    small, large = min(sizes, key=lambda s: s["rows"]), max(sizes, key=lambda s: s["rows"])
    grown = large["summary"]["peak_rss_mb"]["full"] / small["summary"]["peak_rss_mb"]["full"]
    return {
        "rows": [small["rows"], large["rows"]],
        "rows_growth": large["rows"] / small["rows"],
        "peak_rss_mb": [small["summary"]["peak_rss_mb"]["full"], large["summary"]["peak_rss_mb"]["full"]],
        "peak_rss_growth": grown,
        "target": f"<= {MEMORY_GROWTH_BOUND:g} at 5x rows",
        "met": grown <= MEMORY_GROWTH_BOUND,
    }


def table(size: dict) -> str:
    """A markdown table of one size: each measurement's time, rows/s and ratio to the COPY limit."""
    s = size["summary"]
    rate, sec, rows = s["rows_per_s"], s["seconds"], s["rows"]
    copy = rate["copy_limit"]
    lines = [
        f"{rows:,} rows ({', '.join(f'{t} {n:,}' for t, n in size['tables'].items() if n >= 1000)}, ...)",
        f"into the application's tables: {', '.join(f'{t} {n:,}' for t, n in s['app_rows'].items() if n)}",
        "",
        "| measurement | seconds | rows/s | × raw COPY |",
        "|---|---:|---:|---:|",
        f"| binary COPY of the sync's app rows into the app's schema (the limit) | {sec['copy_limit']:.1f} | {copy:,.0f} | 1.00 |",
        f"| binary COPY of the source rows from Arrow into plain tables (no keys, no triggers) | {sec['source_copy']:.1f} | {rate['source_copy']:,.0f} | {rate['source_copy'] / copy:.2f} |",
        f"| Storage Read API alone (the source) | {sec['source_read']:.1f} | {rate['source_read']:,.0f} | {rate['source_read'] / copy:.2f} |",
        *([f"| dlt alone, tuned: Arrow → Parquet → ADBC binary COPY into plain tables (no app schema) | {sec['dlt_alone']:.1f} | {rate['dlt_alone']:,.0f} | {rate['dlt_alone'] / copy:.2f} |"]
          if "dlt_alone" in sec else []),
        f"| REST query + dlt defaults (baseline, {s['baseline_rows']:,}-row subset) | {sec['baseline_subset']:.1f} | {rate['baseline']:,.0f} | {rate['baseline'] / copy:.3f} |",
        f"| this project, full sync (whole process) | {sec['sync_full']:.1f} | {rate['sync_full']:,.0f} | {rate['sync_full'] / copy:.2f} |",
        f"| this project, full sync (inside the process) | {sec['sync_full_in_process']:.1f} | {rate['sync_full_in_process']:,.0f} | {rate['sync_full_in_process'] / copy:.2f} |",
        f"| incremental, {s['changed_rows']:,.0f} rows changed, {s['app_rows_written']['incremental']:,.0f} app rows"
        f" written (whole process) | {sec['sync_incremental']:.1f} | | |",
        f"| no change (whole process) | {sec['sync_no_change']:.1f} | | |",
    ]
    if "sync_no_change_no_api" in sec:
        lines.append(f"| no change, in-process (no Prefect API configured) | {sec['sync_no_change_no_api']:.1f} | | |")
    if "sync_no_change_no_window" in sec:
        lines.append(f"| the same with `LATE_ROW_WINDOW=0` (what the look-back window costs: in-process"
                     f" {sec['sync_no_change_no_api_run']:.2f} s with it,"
                     f" {sec['sync_no_change_no_window_run']:.2f} s without) | {sec['sync_no_change_no_window']:.1f} | | |")
    lines += ["", "| target | value | met |", "|---|---:|---|"]
    for name, t in s["targets"].items():
        lines.append(f"| {name} {t['target']} | {t['value']:,.3g} | {'yes' if t['met'] else 'no'} |")
    return "\n".join(lines)
