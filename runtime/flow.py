"""The Prefect flow: one run resolves a selection and materializes its assets in parallel.

The scheduled deployments run this flow; so does `materialize` when a Prefect API is configured.
Ordering is ours (`runtime/run.py`), not Prefect's `wait_for`: a task waiting on a failed upstream
would stay Pending forever, while we mark it skipped and let independent branches finish.
"""

from __future__ import annotations

from typing import Any

from prefect import flow, task
from prefect.cache_policies import NO_CACHE
from prefect.context import FlowRunContext
from prefect.futures import PrefectFuture, as_completed
from prefect.runtime import flow_run
from prefect.states import Failed, State
from prefect.task_runners import ThreadPoolTaskRunner
from prefect.utilities.urls import url_for

from assets.errors import ConfigError, SyncError, UpstreamFailed
from graph import Selection
from observability.events import AssetOutcome, RunInfo
from observability.logs import trace_url
from observability.metrics import setup_metrics
from observability.tracing import setup_tracing, trace_parent
from runtime.artifacts import RunArtifacts
from runtime.materialize import RunContext, materialize_asset
from runtime.remote import AssetJob, AssetResult, run_job
from runtime.run import RunFailed, RunReport, default_hooks, execute
from runtime.settings import task_runner_address

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


@task(name="materialize-asset", task_run_name="asset-{job.asset}", cache_policy=NO_CACHE)
def materialize_job_task(job: AssetJob) -> AssetResult | State:
    """One asset from plain values, in whatever process the task runner chose."""
    result = run_job(job)
    if result.outcome.status in ("failed", "cancelled"):
        # Failed in the UI, and the outcome still reaches the flow.
        return Failed(message=f"{result.outcome.error_type}: {result.outcome.error}", data=result)
    return result


class PrefectExecutor:
    """Assets as Prefect task runs of the flow run (they show in the UI), in this process."""

    overlaps = True

    def submit(self, name: str, ctx: RunContext) -> PrefectFuture:
        return materialize_task.submit(name, ctx)

    def settle(self, future: PrefectFuture, name: str, ctx: RunContext) -> None:
        pass

    def wait_any(self, futures: list[PrefectFuture]) -> PrefectFuture:
        done = next(iter(as_completed(futures)))
        done.wait()
        return done

    def failure(self, future: Any) -> str | None:
        state = future.state
        return None if state.is_completed() else state.message or f"task run ended {state.type.value} with no message"


class RemoteExecutor(PrefectExecutor):
    """Assets as Prefect task runs on a task runner whose workers are other processes (Dask):
    each gets an `AssetJob` of plain values and sends back its outcome, which the flow reports."""

    overlaps = False

    def submit(self, name: str, ctx: RunContext) -> PrefectFuture:
        job = AssetJob(
            asset=name, run=ctx.run, lock=ctx.lock, full_refresh=name in ctx.full_refresh,
            allow_mass_delete=ctx.guard.allowed, reconcile=ctx.reconcile, trace_parent=trace_parent(),
        )
        ctx.hooks.asset_started(ctx.run, name)
        return materialize_job_task.submit(job)

    def settle(self, future: PrefectFuture, name: str, ctx: RunContext) -> None:
        try:
            result = future.result(raise_on_failure=False)
        except Exception:  # noqa: BLE001 - the worker died: run_graph reports the task's failure
            return
        if isinstance(result, AssetResult):
            for topic, text in result.notices:
                ctx.hooks.notice(ctx.run, topic, text)
            ctx.outcomes[name] = result.outcome
            ctx.hooks.asset_finished(ctx.run, result.outcome, None)


def _task_runner() -> Any:
    """Threads in this process; a Dask cluster's workers when DASK_SCHEDULER_ADDRESS names one."""
    address = task_runner_address()
    if not address:
        return ThreadPoolTaskRunner(max_workers=TASK_RUNNER_THREADS)
    try:
        from prefect_dask import DaskTaskRunner
    except ImportError:
        raise ConfigError("DASK_SCHEDULER_ADDRESS is set but prefect-dask is not installed: "
                          "pip install 'gong-sync[dask]'") from None
    return DaskTaskRunner(address=address)


def _executor() -> PrefectExecutor:
    """In-process tasks share the run's clients; tasks on other processes get plain values."""
    context = FlowRunContext.get()
    runner = context.task_runner if context else None
    return PrefectExecutor() if runner is None or isinstance(runner, ThreadPoolTaskRunner) else RemoteExecutor()


def _run_link(run: RunInfo) -> str | None:
    """Where an operator opens the run: its Prefect flow run, else its Jaeger trace."""
    return (url_for("flow-run", obj_id=run.flow_run_id) if run.flow_run_id else None) or trace_url(run.trace_id)


def _flow_run_name() -> str:
    assets = flow_run.parameters.get("assets") or ["*"]
    return "materialize " + str(Selection.parse(assets))


@flow(
    name="gong-sync",
    flow_run_name=_flow_run_name,
    task_runner=_task_runner(),
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
            executor=_executor(),
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
