"""`python -m bench` runs end to end on a tiny workspace and writes every key the README reads."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_bench_runs_and_writes_its_results(tmp_path: Path) -> None:
    out = tmp_path / "result.json"
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "PREFECT_API_URL")}
    if os.environ.get("TEST_DATABASE_URL"):
        env["DATABASE_URL"] = os.environ["TEST_DATABASE_URL"]
    done = subprocess.run(
        [sys.executable, "-m", "bench", "--rows", "2000", "--repeat", "1", "--baseline-rows", "1000",
         "--json", str(out), "--work-dir", str(tmp_path / "work")],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600, check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "| binary COPY of the sync's app rows into the app's schema (the limit) |" in done.stdout
    assert "| binary COPY of the source rows from Arrow into plain tables (no keys, no triggers) |" in done.stdout
    assert "| dlt alone, tuned: Arrow → Parquet → ADBC binary COPY into plain tables (no app schema) |" in done.stdout

    text = out.read_text()
    result = json.loads(text)
    machine = result["machine"]
    assert machine["nproc"] >= 1 and machine["ram_gib"] > 0 and machine["cpu_model"]
    assert machine["python"] and machine["packages"]["dlt"] and machine["packages"]["prefect"]
    # The results are committed: no host name and no local path in them.
    assert socket.gethostname() not in text and str(tmp_path) not in text

    (size,) = result["sizes"]
    summary = size["summary"]
    assert summary["rows"] == sum(size["tables"].values()) and size["tables"]["gong.transcript"] > 1500
    assert set(summary["rows_per_s"]) >= {"copy_limit", "source_copy", "source_read", "dlt_alone", "baseline", "sync_full"}
    assert all(rate > 0 for rate in summary["rows_per_s"].values())
    assert set(summary["ratios"]) >= {"full_vs_copy", "full_vs_source_copy", "full_vs_baseline", "incremental_vs_full"}
    assert set(summary["targets"]) == {"full_vs_copy", "incremental_vs_full", "no_change_wall_s", "peak_rss_mb"}
    # The limit is the sync's own app rows into the app's schema: its full-text trigger and GIN
    # index make that slower than the source rows into plain tables.
    assert summary["seconds"]["copy_limit"] > summary["seconds"]["source_copy"] > 0
    assert result["settings"]["monologue_bytes"] == [1000, 5000]
    assert summary["seconds"]["sync_incremental"] > 0 and summary["seconds"]["sync_no_change"] > 0
    assert 0 < summary["peak_rss_mb"]["full"] < 4096
    # The baseline moved about the subset it was asked for; the incremental run loaded the changed
    # rows and no more than a small part of the workspace.
    assert 900 <= summary["baseline_rows"] <= 1100
    assert 0 < summary["changed_rows"] <= summary["incremental_rows_loaded"] < summary["rows"] / 5
    (sample,) = size["samples"]
    assert sample["no_change"]["rows_loaded"] == 0
    # The sync filled the application's tables (schema public), not only the raw replicas: the
    # monologues of live calls are transcripts rows, and every asset has its sync_status row.
    app = summary["app_rows"]
    assert set(app) == {"calls", "speakers", "transcripts", "users", "opportunities", "emails", "call_opportunities",
                        "sync_status"}
    assert app["transcripts"] > 0.9 * size["tables"]["gong.transcript"]
    assert app["calls"] > 0 and app["speakers"] > 0 and app["users"] > 0
    assert app["sync_status"] == 7
    assert summary["app_rows_written"]["full"] >= app["calls"] + app["speakers"] + app["transcripts"]
    # The changed rows reached the app; with nothing new, nothing is rewritten.
    assert 0 < summary["app_rows_written"]["incremental"] < summary["rows"] / 5
    assert summary["app_rows_written"]["no_change"] == 0
    assert "app rows written" in done.stdout and f"transcripts {app['transcripts']:,}" in done.stdout
