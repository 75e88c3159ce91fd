"""prefect.yaml deployed to a real local Prefect server and run by a real process worker.

The server (SQLite in a temporary folder, loopback, its own port) and the worker are subprocesses
started by `tests/deployment/local_prefect.py`; the worker's environment carries the test's
settings (DATABASE_URL, the emulator, the datasets) to each flow run, as in production.
"""

from __future__ import annotations

import datetime as dt
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any
from uuid import UUID

import psycopg
import pytest
from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
from prefect.client.schemas.objects import ConcurrencyLimitStrategy, FlowRun

from runtime.local.seed import CASES, seed_workspace, update_rows
from tests.deployment.local_prefect import LocalPrefect, Worker, local_prefect_server
from tests.helpers import sync

pytestmark = pytest.mark.slow

POOL = "gong-sync"
HOURLY = "gong-sync/gong-sync-hourly"
TARGETED = "gong-sync/gong-sync-targeted"
GONG_TABLES = ["gong.users", "gong.call", "gong.transcript", "gong.call_speaker"]
LATER = dt.datetime(2026, 3, 1, 12, 0, 0, 654321, tzinfo=dt.UTC)
RUN_TIMEOUT_S = 300.0


@dataclass
class Deployed:
    """The server and what `prefect deploy --all` created on it, read right after deploying."""

    server: LocalPrefect
    hourly: Any  # prefect.client.schemas.responses.DeploymentResponse
    targeted: Any
    scheduled: list[FlowRun]


def wait_for(what: str, probe: Callable[[], Any], timeout: float = RUN_TIMEOUT_S,
             detail: Callable[[], str] = str) -> Any:
    """Poll until `probe()` returns something truthy; fail naming `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}\n{detail()}")
        time.sleep(0.5)


def wait_state(client, run_id: UUID, state: str, worker: Worker, timeout: float = RUN_TIMEOUT_S) -> FlowRun:
    """Poll a flow run until its state is `state`; fail at once when it ends in another state."""
    def probe() -> FlowRun | None:
        run = client.read_flow_run(run_id)
        if run.state.name == state:
            return run
        if run.state.is_final():
            raise AssertionError(f"flow run {run.name} ended {run.state.name}: {run.state.message}\n{worker.log_tail()}")
        return None

    return wait_for(f"flow run {run_id} to be {state}", probe, timeout, detail=worker.log_tail)


def run_logs(server: LocalPrefect, run_id: UUID) -> list[str]:
    with server.client() as client:
        logs = client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[run_id])))
    return [log.message for log in logs]


@pytest.fixture(scope="module")
def deployed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployed]:
    with local_prefect_server(tmp_path_factory.mktemp("prefect-home")) as server:
        server.cli("work-pool", "create", POOL, "--type", "process")
        server.cli("deploy", "--all")
        with server.client() as client:
            hourly = client.read_deployment_by_name(HOURLY)
            targeted = client.read_deployment_by_name(TARGETED)
            # The server's scheduler creates the next runs within seconds of the deploy.
            scheduled = wait_for("the scheduler to create the hourly runs", lambda: (
                runs if len(runs := client.get_scheduled_flow_runs_for_deployments([hourly.id])) >= 3 else None
            ), timeout=120)
            # Pause the schedule (which deletes its future runs) so that a real top-of-the-hour
            # run cannot join the runs the tests start and count.
            for schedule in hourly.schedules:
                client.update_deployment_schedule(hourly.id, schedule.id, active=False)
        yield Deployed(server=server, hourly=hourly, targeted=targeted, scheduled=scheduled)


def test_hourly_deployment_runs_every_asset_on_the_hour_in_utc(deployed):
    hourly = deployed.hourly
    assert hourly.entrypoint == "runtime/flow.py:sync_flow"
    assert hourly.work_pool_name == POOL
    assert hourly.parameters == {"assets": ["*"], "full_refresh": False}
    [schedule] = hourly.schedules
    assert (schedule.schedule.cron, schedule.schedule.timezone, schedule.active) == ("0 * * * *", "UTC", True)
    assert hourly.global_concurrency_limit.limit == 1
    assert hourly.concurrency_options.collision_strategy == ConcurrencyLimitStrategy.CANCEL_NEW

    now = dt.datetime.now(dt.UTC)
    # As plain datetimes: Prefect's own datetime type subtracts to an interval, not a timedelta.
    starts = sorted(dt.datetime.fromisoformat(run.expected_start_time.isoformat()) for run in deployed.scheduled)
    assert all(s.utcoffset() == dt.timedelta(0) and (s.minute, s.second, s.microsecond) == (0, 0, 0) for s in starts), starts
    assert now < starts[0] <= now + dt.timedelta(hours=1)
    assert {b - a for a, b in zip(starts, starts[1:])} == {dt.timedelta(hours=1)}
    assert all(run.parameters == hourly.parameters for run in deployed.scheduled)


def test_targeted_deployment_is_on_demand_only_with_the_same_limit(deployed):
    targeted = deployed.targeted
    assert targeted.entrypoint == "runtime/flow.py:sync_flow"
    assert targeted.schedules == []
    assert targeted.parameters == {"assets": ["speakers"], "full_refresh": False}
    assert targeted.global_concurrency_limit.limit == 1
    assert targeted.concurrency_options.collision_strategy == ConcurrencyLimitStrategy.CANCEL_NEW


def test_targeted_run_from_the_cli_refreshes_speakers_alone(deployed, env):
    seed_workspace(env.bq, project=env.emulator.project, gong_dataset=env.gong_dataset, calls=40, tables=GONG_TABLES)
    sync("users,calls,transcripts,speakers")
    update_rows(env.bq, env.gong("call"), {"id": CASES.shared_call_id}, {"title": "Not yet"}, LATER)
    # A Gong speaker (call_speaker's id and call_id) and the uuid of its app row.
    gong_speaker_id, gong_call_id, speaker = env.rows(
        "SELECT gong_speaker_id, gong_call_id, id FROM gong_sync.speakers_ids WHERE gong_call_id <> %s"
        " ORDER BY gong_call_id, gong_speaker_id LIMIT 1", (CASES.shared_call_id,))[0]
    update_rows(env.bq, env.gong("call_speaker"), {"id": gong_speaker_id, "call_id": gong_call_id},
                {"talk_time": 4242.5}, LATER)
    status_before = dict(env.rows("SELECT entity_type, updated_at FROM sync_status"))

    with deployed.server.worker(POOL):
        result = deployed.server.cli(
            "deployment", "run", TARGETED, "--param", 'assets=["speakers"]', "--watch", "--watch-timeout", "300",
            timeout=RUN_TIMEOUT_S + 60, check=False,
        )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Flow run finished successfully in 'Completed'" in result.stdout
    run_id = UUID(re.search(r"UUID: ([0-9a-f-]{36})", result.stdout).group(1))
    with deployed.server.client() as client:
        run = client.read_flow_run(run_id)
    assert run.state.is_completed()
    assert run.name == "materialize speakers"
    assert run.parameters["assets"] == ["speakers"]
    # Scheduled for the moment it was asked for, not for the next hour.
    assert run.expected_start_time.timestamp() - run.created.timestamp() < 5

    # The app's speakers row kept its uuid and took the new talk time (rounded to whole seconds).
    assert env.rows("SELECT talk_time_seconds FROM speakers WHERE id = %s", (speaker,)) == [(4243,)]
    assert ("Not yet",) not in env.rows("SELECT title FROM calls")
    status_after = dict(env.rows("SELECT entity_type, updated_at FROM sync_status"))
    assert {k for k in status_after if status_after[k] != status_before[k]} == {"speakers"}
    # The deployment's run went through sync_flow and its hooks: the logging hook's lines are
    # in the run's logs on the server.
    logs = run_logs(deployed.server, run_id)
    assert any(m.startswith("run.start") and "selection=speakers" in m for m in logs), logs
    assert any(m.startswith("asset.end") and "asset=speakers" in m and "status=success" in m for m in logs), logs


def test_a_run_that_collides_with_a_running_one_is_cancelled(deployed, env):
    seed_workspace(env.bq, project=env.emulator.project, gong_dataset=env.gong_dataset, calls=40, tables=GONG_TABLES)
    sync("users,calls,transcripts,speakers")
    update_rows(env.bq, env.gong("call"), {"id": CASES.shared_call_id}, {"title": "Landed later"}, LATER)
    server, hourly = deployed.server, deployed.hourly
    with server.worker(POOL) as worker, server.client() as client, psycopg.connect(env.database_url) as blocker:
        # Keep the first run busy for as long as the test needs: another session holds a lock on
        # sync_status, as a long report or a migration would, and the run waits for it mid-sync.
        blocker.execute("LOCK TABLE sync_status IN ACCESS EXCLUSIVE MODE")
        first = client.create_flow_run_from_deployment(hourly.id, parameters={"assets": ["calls"]})
        wait_state(client, first.id, "Running", worker)

        def first_run_waits_on_the_lock() -> bool:
            assert not client.read_flow_run(first.id).state.is_final(), worker.log_tail()
            return bool(env.rows("SELECT 1 FROM pg_stat_activity WHERE datname = current_database()"
                                 " AND wait_event_type = 'Lock'"))

        wait_for("the first run to wait on the lock", first_run_waits_on_the_lock, detail=worker.log_tail)

        colliding = [client.create_flow_run_from_deployment(hourly.id) for _ in range(2)]
        for run in colliding:
            cancelled = wait_state(client, run.id, "Cancelled", worker, timeout=90)
            assert cancelled.state.message == "Deployment concurrency limit reached."
            # Cancelled when the worker picked it up, before it started: no sync ran.
            assert "Running" not in [s.name for s in client.read_flow_run_states(run.id)]
        assert client.read_flow_run(first.id).state.is_running()

        blocker.commit()
        wait_state(client, first.id, "Completed", worker)
        assert ("Landed later",) in env.rows("SELECT title FROM calls WHERE gong_call_id = %s", (CASES.shared_call_id,))

        # Once the first run has ended the slot is free again: the next run starts and completes.
        after = client.create_flow_run_from_deployment(hourly.id, parameters={"assets": ["calls"]})
        wait_state(client, after.id, "Completed", worker)
