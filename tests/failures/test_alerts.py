"""After the last retry an asset fails with its details logged, Slack and PagerDuty hear of it, and
its next success resolves the incident; a broken alert channel never hides the failure."""

from __future__ import annotations

import datetime as dt
import json
import logging
import threading
from urllib.parse import urlsplit

import pytest

from runtime.local.emulator import free_port
from runtime.local.seed import CASES, insert_rows, seed_workspace
from runtime.postgres import Endpoint
from runtime.flow import sync_flow
from tests.failures.harness import DuringStep, materialize, run_with_faults
from tests.helpers import app_holds_lock, outcome, sync
from tests.runtime.test_sync import actual_calls, expected_calls

LATER = dt.datetime(2026, 3, 1, 12, 0, 0, 654321, tzinfo=dt.UTC)
#: The database password in these tests; trust authentication accepts it, no text may show it.
PASSWORD = "Pg-Pa55word-Canary-5e1f"
NEW_CALL = "9000000000000000001"


@pytest.fixture
def seeded(env, caplog, monkeypatch):
    caplog.set_level(logging.INFO)
    parts = urlsplit(env.database_url)
    monkeypatch.setenv("DATABASE_URL", parts._replace(netloc=f"{parts.username}:{PASSWORD}@{parts.hostname}:{parts.port}").geturl())
    seed_workspace(env.bq, project=env.emulator.project, gong_dataset=env.gong_dataset, calls=40, tables=["gong.call"])
    return env


class BuildBlocker:
    """Holds the build's watermark table and cancels every statement that waits for it, the way a
    statement timeout would: each build attempt fails the same way until `stop()`."""

    def __init__(self, env) -> None:  # noqa: ANN001
        self.env = env
        self.cancelled = 0
        self._done = threading.Event()

    def start(self) -> None:
        self.conn = self.env.connect()
        self.conn.execute("BEGIN")
        self.conn.execute("LOCK TABLE gong_sync.asset_watermarks IN EXCLUSIVE MODE")
        self._thread = threading.Thread(target=self._cancel_waiters, daemon=True)
        self._thread.start()

    def _cancel_waiters(self) -> None:
        with self.env.connect() as watcher:
            while not self._done.wait(0.02):
                self.cancelled += watcher.execute(
                    "SELECT count(pg_cancel_backend(pid)) FROM pg_stat_activity WHERE %s = ANY(pg_blocking_pids(pid))",
                    (self.conn.info.backend_pid,),
                ).fetchone()[0]

    def stop(self) -> None:
        self._done.set()
        self._thread.join()
        self.conn.execute("ROLLBACK")
        self.conn.close()


def test_a_failure_outlasting_the_retries_is_logged_alerted_and_resolved_by_the_next_success(seeded, alert_sink, caplog):
    assert sync("calls").status == "success"
    alert_sink.clear()
    insert_rows(seeded.bq, seeded.gong("call"), [{"id": NEW_CALL, "workspace_id": CASES.workspace_ids[0], "title": "New"}],
                synced_at=LATER)
    before = seeded.rows("SELECT id, gong_call_id, title, processed_at FROM calls ORDER BY id")
    blocker = BuildBlocker(seeded)

    report = run_with_faults("calls", faults=[DuringStep("calls", "build", blocker.start, blocker.stop)])

    calls = outcome(report, "calls")
    assert (calls.status, calls.step, calls.error_type) == ("failed", "build", "TransientError")
    assert "QueryCanceled: canceling statement due to user request" in calls.error
    assert blocker.cancelled == 4  # the first try and three retries
    messages = [r.getMessage() for r in caplog.records]
    for attempt in (1, 2, 3):
        assert any(m.startswith(f"calls: build: attempt {attempt} of 4 failed (TransientError: QueryCanceled")
                   and "; retrying in " in m for m in messages), attempt
    assert any(m.startswith("calls: build: giving up after 4 attempt(s)") for m in messages)
    checkpoint = json.dumps({"gong__call": LATER.isoformat(timespec="microseconds")})
    failure = [m for m in messages if m.startswith("calls failed at step build")]
    assert failure == [
        f"calls failed at step build: TransientError: {calls.error}; checkpoint stays at {checkpoint}"
    ]
    # Nothing half-built: the destination is as before, the new row waits in the raw table.
    assert seeded.rows("SELECT id, gong_call_id, title, processed_at FROM calls ORDER BY id") == before
    assert seeded.rows("SELECT title FROM gong_raw.gong__call WHERE id = %s", (NEW_CALL,)) == [("New",)]
    # The app's sync_status row says so, with the error.
    assert seeded.rows(
        "SELECT last_sync_status, error_details ->> 'error', errors_count FROM sync_status WHERE entity_type = 'calls'"
    ) == [("failed", calls.error, 1)]

    # Slack: one message naming the asset, the step, the error and the checkpoint, with the run's link.
    (slack,) = alert_sink.slack()
    flow_run_link = f"/runs/flow-run/{report.run_id}"
    assert "1 asset(s) failed: calls" in slack["text"]
    assert f"*calls* failed at `build`: TransientError: {calls.error}" in slack["text"]
    assert LATER.isoformat(timespec="microseconds") in slack["text"]
    assert flow_run_link in slack["text"]
    # PagerDuty: a trigger for this asset, keyed so that the next hours' failures join the incident.
    (trigger,) = alert_sink.pagerduty()
    dedup_key = f"gong-sync:{Endpoint.parse(seeded.database_url)}:calls"
    assert trigger["routing_key"] == alert_sink.routing_key
    assert (trigger["event_action"], trigger["dedup_key"]) == ("trigger", dedup_key)
    assert trigger["payload"]["severity"] == "error"
    assert trigger["payload"]["component"] == "calls"
    assert trigger["payload"]["summary"] == f"gong-sync: calls failed at build: TransientError: {calls.error}"
    assert trigger["payload"]["custom_details"]["checkpoint"] == {"gong__call": LATER.isoformat(timespec="microseconds")}
    assert flow_run_link in trigger["links"][0]["href"]

    # No secret anywhere: not the database password, not the webhook's token, not the routing key.
    sent = json.dumps(alert_sink.received)
    assert PASSWORD not in sent
    assert alert_sink.slack_path not in caplog.text and alert_sink.routing_key not in caplog.text
    assert PASSWORD not in caplog.text

    # The next run succeeds: the row lands in the destination and the incident is resolved.
    alert_sink.clear()
    again = sync("calls")
    assert again.status == "success"
    assert actual_calls(seeded) == expected_calls(seeded)
    assert seeded.rows("SELECT title FROM calls WHERE gong_call_id = %s", (NEW_CALL,)) == [("New",)]
    assert {row[:3] for row in before} <= set(seeded.rows("SELECT id, gong_call_id, title FROM calls"))  # ids kept
    assert seeded.rows("SELECT last_sync_status, error_details -> 'error' FROM sync_status WHERE entity_type = 'calls'") == [
        ("success", None)]
    assert alert_sink.pagerduty() == [
        {"routing_key": alert_sink.routing_key, "event_action": "resolve", "dedup_key": dedup_key}
    ]
    assert alert_sink.slack() == []


def test_postgres_down_at_the_start_is_retried_then_alerted(seeded, pg_proxy, alert_sink, caplog):
    pg_proxy.refuse()
    state = sync_flow(assets=["calls"], return_state=True)
    assert state.is_failed()
    assert "nothing accepts connections" in str(state.result(raise_on_failure=False))
    retries = [r.getMessage() for r in caplog.records if r.getMessage().startswith("connect: attempt")]
    assert [m.split(" failed")[0] for m in retries] == [f"connect: attempt {n} of 4" for n in (1, 2, 3)]
    (slack,) = alert_sink.slack()
    assert "TransientError: DATABASE_URL: nothing accepts connections at 127.0.0.1:" in slack["text"]
    (trigger,) = alert_sink.pagerduty()
    assert trigger["dedup_key"].endswith(":run") and trigger["event_action"] == "trigger"
    assert PASSWORD not in json.dumps(alert_sink.received)


def test_a_failing_alert_channel_is_logged_and_never_hides_the_failure(seeded, alert_sink, subprocess_env):
    alert_sink.status[alert_sink.pagerduty_path] = 500
    closed = f"http://127.0.0.1:{free_port()}{alert_sink.slack_path}"  # nothing listens there
    with app_holds_lock(seeded, "calls"):  # the calls build gives up after LOCK_TIMEOUT
        result = materialize("--asset", "calls", environ={**subprocess_env, "SLACK_WEBHOOK_URL": closed,
                                                           "LOCK_TIMEOUT": "1"})
    assert result.returncode == 1, result.stdout + result.stderr
    output = result.stdout + result.stderr
    assert "calls: waited LOCK_TIMEOUT (1 s) for a table lock and gave up" in result.stdout
    assert "Slack alert (message) not sent: ConnectError" in output
    assert "PagerDuty alert (trigger for calls) not sent: HTTP 500" in output
    assert [e["event_action"] for e in alert_sink.pagerduty()] == ["trigger"]
    for secret in (alert_sink.slack_path, alert_sink.routing_key, PASSWORD):
        assert secret not in output
