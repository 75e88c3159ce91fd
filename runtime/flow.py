"""The Prefect flow: one run resolves a selection and materializes its assets in parallel.

The scheduled deployments run this flow; so does `materialize` when a Prefect API is configured.
Ordering is ours (`runtime/run.py`), not Prefect's `wait_for`: a task waiting on a failed upstream
would stay Pending forever, while we mark it skipped and let independent branches finish.
"""

from __future__ import annotations

from typing import Any

from prefect import flow, task
from prefect.cache_policies import NO_CACHE
from prefect.futures import PrefectFuture, as_completed
from prefect.runtime import flow_run
from prefect.states import Failed, State
from prefect.task_runners import ThreadPoolTaskRunner
from prefect.utilities.urls import url_for

from assets.errors import SyncError, UpstreamFailed
from graph import Selection
from observability.events import AssetOutcome, RunInfo
from observability.logs import trace_url
from observability.metrics import setup_metrics
from observability.tracing import setup_tracing
from runtime.artifacts import RunArtifacts
from runtime.materialize import RunContext, materialize_asset
from runtime.run import RunFailed, RunReport, default_hooks, execute

__all__ = ["RunFailed", "RunReport", "execute", "sync_flow"]

#: Threads available to the task runner; how many assets run at once is MAX_PARALLEL.
TASK_RUNNER_THREADS = 16

# Prefect opens its flow-run span before the flow body runs: the providers must exist by then.
# Nothing is installed unless the OTEL_* variables ask for an exporter.
setup_tracing()
setup_metrics()


@task(name="materialize-asset", task_run_name="asset-{name}", cache_policy=NO_CACHE)
def materialize_task(name: str, ctx: RunContext) -> AssetOutcome:
    try:
        return materialize_asset(ctx.graph.spec(name), ctx)
    except UpstreamFailed:
        # Landed, then skipped because an upstream failed: not this task's failure (no traceback
        # in the UI); its outcome says why, and the run reports it skipped.
        return ctx.outcomes[name]


class PrefectExecutor:
    """Assets as Prefect task runs of the flow run (they show in the UI)."""

    def submit(self, name: str, ctx: RunContext) -> PrefectFuture:
        return materialize_task.submit(name, ctx)

    def wait_any(self, futures: list[PrefectFuture]) -> PrefectFuture:
        done = next(iter(as_completed(futures)))
        done.wait()
        return done

    def failure(self, future: Any) -> str | None:
        return None if future.state.is_completed() else str(future.state.message)


def _run_link(run: RunInfo) -> str | None:
    """Where an operator opens the run: its Prefect flow run, else its Jaeger trace."""
    return (url_for("flow-run", obj_id=run.flow_run_id) if run.flow_run_id else None) or trace_url(run.trace_id)


def _flow_run_name() -> str:
    assets = flow_run.parameters.get("assets") or ["*"]
    return "materialize " + str(Selection.parse(assets))


@flow(
    name="gong-sync",
    flow_run_name=_flow_run_name,
    task_runner=ThreadPoolTaskRunner(max_workers=TASK_RUNNER_THREADS),
    validate_parameters=True,
)
def sync_flow(
    assets: list[str] | None = None,
    full_refresh: bool = False,
    allow_mass_delete: bool = False,
    reconcile: bool = False,
    log_format: str = "text",
    show_progress: bool = False,
) -> RunReport | State:
    """Materialize the selected assets (default: all). Fails when any asset failed."""
    from runtime.progress import TerminalProgress

    progress = TerminalProgress() if show_progress else None
    try:
        report = execute(
            assets or ["*"],
            full_refresh=full_refresh,
            allow_mass_delete=allow_mass_delete,
            reconcile=reconcile,
            hooks=default_hooks(json_logs=log_format == "json", extra=[progress] if progress else [], run_link=_run_link),
            progress=progress.update if progress else None,
            executor=PrefectExecutor(),
            flow_run_id=flow_run.id,
            run_hooks=lambda graph: [RunArtifacts(graph)],
        )
        if report.failed:
            raise RunFailed(report)
    except SyncError as exc:
        # An expected failure, already logged and alerted in one line: the flow run fails with
        # that line and carries the error, without Prefect printing a traceback of our own raise.
        # Anything else is a bug and keeps its traceback.
        return Failed(message=f"{type(exc).__name__}: {exc}", data=exc)
    return report
