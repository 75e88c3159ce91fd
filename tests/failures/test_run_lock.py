"""One run at a time: a run that starts while another holds the lock does no work, says so and
exits 0, whether it comes from the CLI, a Prefect flow run or a dead-letter replay."""

from __future__ import annotations

import signal

from runtime.cli import main
from runtime.flow import sync_flow
from runtime.local.seed import seed_workspace
from runtime.postgres import Endpoint
from tests.failures.harness import assert_in_step, materialize, spawn, wait_until
from tests.runtime.test_sync import CORE, GONG_TABLES


#: What a run that does work changes: the app's sync_status rows and the run records.
STATUS = "SELECT entity_type, last_sync_status, updated_at FROM sync_status ORDER BY 1"
RUNS = "SELECT run_id, asset, status, finished_at FROM gong_sync.sync_runs ORDER BY 1, 2"


def test_a_second_run_while_one_is_in_progress_does_no_work_and_exits_0(env, storage_proxy, subprocess_env, tmp_path, capsys):
    seed_workspace(env.bq, project=env.emulator.project, gong_dataset=env.gong_dataset, calls=400, tables=GONG_TABLES)
    storage_proxy.stall(after_bytes=100_000)  # the first run holds the lock, its reads hung
    # One asset at a time: the stalled read holds the whole first run still, so any change to
    # sync_status below could only come from the runs that must not work.
    first = spawn("--asset", CORE, environ={**subprocess_env, "MAX_PARALLEL": "1"}, log_path=tmp_path / "first.log")
    try:
        wait_until(lambda: storage_proxy.stalled, 120, "the first run to be mid-read")
        status_before = env.rows(STATUS)
        runs_before = env.rows(RUNS)
        message = f"skipped: another run holds the lock on {Endpoint.parse(env.database_url)}"

        second = materialize("--asset", CORE, environ=subprocess_env)
        assert second.returncode == 0, second.stdout + second.stderr[-2000:]
        # The line saying how the run goes, then the skip: no summary, no work.
        assert second.stdout.strip().splitlines() == [
            f"materialize: running as a Prefect flow run on {subprocess_env['PREFECT_API_URL']}", message]

        state = sync_flow(assets=[CORE], return_state=True)
        assert state.is_completed()
        report = state.result()
        assert (report.status, report.skipped_reason, report.outcomes) == ("skipped", message, [])

        capsys.readouterr()
        assert main(["--replay-dead-letters", "--asset", "calls"]) == 0
        assert capsys.readouterr().out.strip() == message

        # None of them did any work.
        assert env.rows(STATUS) == status_before
        assert env.rows(RUNS) == runs_before
        assert first.poll() is None
    finally:
        storage_proxy.resume()
    try:
        assert first.wait(300) == 0, (tmp_path / "first.log").read_text()[-3000:]
    finally:
        if first.poll() is None:
            first.send_signal(signal.SIGKILL)
    assert_in_step(env)
