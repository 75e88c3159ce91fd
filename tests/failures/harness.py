"""Running the real flow with a fault injected at a chosen step, and `materialize` as a process."""

from __future__ import annotations

import contextlib
import subprocess
import sys
import time
from collections.abc import Callable, Iterator

from prefect import flow
from prefect.runtime import flow_run
from prefect.task_runners import ThreadPoolTaskRunner

from observability.events import RunInfo
from observability.hooks import Hook, HookSet
from runtime.artifacts import RunArtifacts
from runtime.flow import (
    TASK_RUNNER_THREADS, PrefectExecutor, RunFailed, RunReport, _run_link, default_hooks, execute,
)
from tests.helpers import report_of
from tests.runtime import test_sync

#: Hooks the next `run_with_faults` adds to the run's own (flow parameters must be plain values).
_FAULTS: list[Hook] = []


class AtStep(Hook):
    """Calls `action` when `asset` enters `step`, the first `times` times (the fault's trigger)."""

    def __init__(self, asset: str, step: str, action: Callable[[], object], times: int = 1) -> None:
        self.asset, self.step_name, self.action, self.times = asset, step, action, times

    @contextlib.contextmanager
    def step(self, run: RunInfo, asset: str, name: str, **attributes: object) -> Iterator[None]:
        if (asset, name) == (self.asset, self.step_name) and self.times > 0:
            self.times -= 1
            self.action()
        yield


class DuringStep(Hook):
    """Holds a fault open for as long as `asset` is inside `step`: `start()` on entry, `stop()` on exit."""

    def __init__(self, asset: str, step: str, start: Callable[[], object], stop: Callable[[], object]) -> None:
        self.asset, self.step_name, self.start, self.stop = asset, step, start, stop

    @contextlib.contextmanager
    def step(self, run: RunInfo, asset: str, name: str, **attributes: object) -> Iterator[None]:
        if (asset, name) != (self.asset, self.step_name):
            yield
            return
        self.start()
        try:
            yield
        finally:
            self.stop()


@flow(name="gong-sync-under-faults", task_runner=ThreadPoolTaskRunner(max_workers=TASK_RUNNER_THREADS))
def _faulty_flow(assets: list[str]) -> RunReport:
    # As `runtime.flow.sync_flow` runs it: assets as task runs, alerts linking to this flow run.
    report = execute(
        assets, hooks=HookSet([default_hooks(run_link=_run_link), *_FAULTS]), executor=PrefectExecutor(),
        flow_run_id=flow_run.id, run_hooks=lambda graph: [RunArtifacts(graph)],
    )
    if report.failed:
        raise RunFailed(report)
    return report


def run_with_faults(*assets: str, faults: list[Hook]) -> RunReport:
    """The real run (the same `execute` as the deployment's flow) with fault hooks added."""
    _FAULTS[:] = faults
    try:
        return report_of(_faulty_flow(assets=list(assets) or ["*"], return_state=True))
    finally:
        _FAULTS.clear()


def materialize(*args: str, environ: dict[str, str], timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """`materialize ARGS` in a process of its own; returns its exit code and output."""
    return subprocess.run(
        [sys.executable, "-m", "runtime.cli", *args], env=environ, capture_output=True, text=True,
        timeout=timeout, stdin=subprocess.DEVNULL,
    )


def spawn(*args: str, environ: dict[str, str], log_path) -> subprocess.Popen:  # noqa: ANN001 - Path
    """`materialize ARGS` started in the background, its output going to `log_path`."""
    return subprocess.Popen(
        [sys.executable, "-m", "runtime.cli", *args], env=environ, stdin=subprocess.DEVNULL,
        stdout=open(log_path, "w"), stderr=subprocess.STDOUT,  # noqa: SIM115 - closed with the process
    )


def wait_until(predicate: Callable[[], object], timeout: float = 120, what: str = "condition") -> object:
    """Poll until `predicate()` is truthy; fail the test naming `what` if it never is."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


def assert_in_step(env) -> None:  # noqa: ANN001 - tests.conftest.Env
    """The app's tables hold what BigQuery holds (`tests.runtime.test_sync.assert_in_step`)."""
    test_sync.assert_in_step(env)
