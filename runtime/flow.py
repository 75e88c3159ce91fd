"""The Prefect flow: one run resolves a selection and materializes its assets in parallel.

Ordering is ours, not Prefect's `wait_for`: a task waiting on a failed upstream would stay
Pending forever, while we mark it skipped and let independent branches finish.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from urllib.parse import unquote, urlsplit

from prefect import flow, task
from prefect.cache_policies import NO_CACHE
from prefect.futures import PrefectFuture, as_completed
from prefect.runtime import flow_run
from prefect.task_runners import ThreadPoolTaskRunner
from prefect.utilities.urls import url_for

from assets.errors import SyncError, UpstreamFailed
from graph import AssetGraph, Selection, default_graph
from observability.events import AssetOutcome, RunInfo
from observability.hooks import Hook, HookSet
from observability.alerts import AlertHook
from observability.logs import LoggingHook, trace_url, use_json_lines
from observability.metrics import MetricsHook, setup_metrics
from observability.tracing import TracingHook, setup_tracing
from runtime.artifacts import RunArtifacts
from runtime.deletes import DeleteGuard
from runtime.load import Progress
from runtime.materialize import RunContext, materialize_asset
from runtime.run_records import SyncRunsRecorder
from runtime.postgres import Endpoint
from runtime.retry import with_retries
from runtime.session import RunLockHeld, last_success, open_session, verify_lock
from runtime.settings import Settings, load_settings

#: Threads available to the task runner; how many assets run at once is MAX_PARALLEL.
TASK_RUNNER_THREADS = 16

# Prefect opens its flow-run span before the flow body runs: the providers must exist by then.
# Nothing is installed unless the OTEL_* variables ask for an exporter.
setup_tracing()
setup_metrics()


@dataclass
class RunReport:
    """Every selected asset's outcome, in graph order."""

    run_id: str
    selection: str
    outcomes: list[AssetOutcome] = field(default_factory=list)
    trace_id: str | None = None
    skipped_reason: str | None = None

    @property
    def failed(self) -> list[AssetOutcome]:
        return [o for o in self.outcomes if o.status == "failed"]

    @property
    def status(self) -> str:
        if self.skipped_reason:
            return "skipped"
        return "failed" if self.failed else "success"


class RunFailed(SyncError):
    """At least one asset failed; carries the whole report."""

    def __init__(self, report: RunReport) -> None:
        names = ", ".join(f"{o.asset} ({o.error})" for o in report.failed)
        super().__init__(f"{len(report.failed)} asset(s) failed: {names}")
        self.report = report


@task(name="materialize-asset", task_run_name="asset-{name}", cache_policy=NO_CACHE)
def materialize_task(name: str, ctx: RunContext) -> AssetOutcome:
    return materialize_asset(ctx.graph.spec(name), ctx)


def run_graph(graph: AssetGraph, ctx: RunContext, submit: Callable[[str], PrefectFuture]) -> list[AssetOutcome]:
    """Submit each asset once all its upstream succeeded, at most MAX_PARALLEL at a time."""
    waiting = list(graph.names)
    running: dict[PrefectFuture, str] = {}
    status: dict[str, str] = {}
    stopped: str | None = None  # the run lock was lost: nothing new starts
    while waiting or running:
        for name in list(waiting):
            upstream = graph.upstream(name)
            if stopped:
                waiting.remove(name)
                outcome = AssetOutcome(asset=name, status="skipped", error=stopped)
                ctx.outcomes[name] = outcome
                status[name] = "skipped"
                ctx.hooks.asset_finished(ctx.run, outcome, None)
            elif any(status.get(u) in ("failed", "skipped") for u in upstream):
                waiting.remove(name)
                blocked = [u for u in upstream if status.get(u) in ("failed", "skipped")]
                outcome = AssetOutcome(asset=name, status="skipped", error=f"upstream failed: {', '.join(blocked)}")
                ctx.outcomes[name] = outcome
                status[name] = "skipped"
                ctx.hooks.asset_finished(ctx.run, outcome, UpstreamFailed(outcome.error))
            elif all(status.get(u) == "success" for u in upstream) and len(running) < ctx.settings.max_parallel:
                waiting.remove(name)
                running[submit(name)] = name
        if not running:
            continue
        done = next(iter(as_completed(list(running))))
        name = running.pop(done)
        done.wait()
        status[name] = "success" if done.state.is_completed() else "failed"
        if ctx.outcomes.get(name) and ctx.outcomes[name].error_type == "RunLockLost":
            stopped = f"not started: {ctx.outcomes[name].error}"
        if name not in ctx.outcomes:  # the task died before it could report
            ctx.outcomes[name] = AssetOutcome(asset=name, status="failed", error=str(done.state.message))
            ctx.hooks.asset_finished(ctx.run, ctx.outcomes[name], None)
    return [ctx.outcomes[n] for n in graph.names]


def _alert_if_stale(settings: Settings, hooks: Hook, run: RunInfo) -> None:
    """Runs skipped on a held lock are fine for a while; a lock held for hours means the sync has
    stopped (a run stuck on a table lock, a forgotten session): say so once it is STALE_AFTER old."""
    try:
        last = last_success(settings)
    except SyncError:
        return
    import datetime as dt

    if last is None or (dt.datetime.now(dt.UTC) - last).total_seconds() > settings.stale_after:
        hooks.notice(run, "stale", f"no successful sync since {last.isoformat(timespec='seconds') if last else 'ever'};"
                     " runs are being skipped because another run holds the lock")


def default_hooks(json_logs: bool = False, extra: list[Hook] | None = None) -> HookSet:
    """Traces and metrics (when OTEL_* ask for them), logs, plus whatever the caller adds (the
    CLI's progress display). Tracing comes first: it sets the trace id the others report."""
    tracer, meter = setup_tracing(), setup_metrics()
    if json_logs:
        use_json_lines()
    watchers: list[Hook] = [*([TracingHook(tracer)] if tracer else []), *([MetricsHook(meter)] if meter else [])]
    return HookSet([*watchers, LoggingHook(), *alert_hooks(), *(extra or [])])


def alert_hooks(settings: Settings | None = None) -> list[Hook]:
    """Slack and PagerDuty alerts, when either is configured; settings go in, the hook never reads them."""
    try:
        settings = settings or load_settings()
        url = settings.postgres_url()
    except SyncError:
        return []  # the run itself reports the bad setting
    if not (settings.slack_webhook_url or settings.pagerduty_routing_key):
        return []
    password = urlsplit(url).password
    return [AlertHook(
        slack_webhook_url=settings.slack_webhook_url.get_secret_value() if settings.slack_webhook_url else None,
        pagerduty_routing_key=settings.pagerduty_routing_key.get_secret_value() if settings.pagerduty_routing_key else None,
        pagerduty_events_url=settings.pagerduty_events_url, severity=settings.pagerduty_severity,
        source=str(Endpoint.parse(url)), run_link=_run_link, timeout_s=settings.alert_timeout,
        secrets=[url, *([password, unquote(password)] if password else [])],
    )]


def _run_link(run: RunInfo) -> str | None:
    """Where an operator opens the run: its Prefect flow run, else its Jaeger trace."""
    return (url_for("flow-run", obj_id=run.flow_run_id) if run.flow_run_id else None) or trace_url(run.trace_id)


def _flow_run_name() -> str:
    assets = flow_run.parameters.get("assets") or ["*"]
    return "materialize " + str(Selection.parse(assets))


def execute(
    assets: list[str] | str,
    *,
    full_refresh: bool = False,
    allow_mass_delete: bool = False,
    reconcile: bool = False,
    settings: Settings | None = None,
    hooks: Hook | None = None,
    progress: Progress | None = None,
) -> RunReport:
    """Resolve the selection, open the run's session (checks, lock, pool) and run the graph."""
    settings = settings or load_settings()
    graph = default_graph()
    selection = Selection.parse(assets)
    names = selection.resolve_ordered(graph)
    subgraph = graph.subgraph(names)
    hooks = hooks or default_hooks()
    run = RunInfo(
        run_id=str(flow_run.id or uuid.uuid4()),
        selection=str(selection),
        assets=tuple(names),
        flow_run_id=flow_run.id,
    )
    report = RunReport(run_id=run.run_id, selection=str(selection))
    try:
        session = with_retries(settings, "connect", lambda: open_session(settings, subgraph))
    except RunLockHeld as held:
        report.skipped_reason = str(held)
        _alert_if_stale(settings, hooks, run)
        return report
    except SyncError as exc:  # nothing answered after the retries: alert, then fail the run
        hooks.run_finished(run, [], exc)
        raise
    with session:
        # The run's own records: sync_runs rows in Postgres and, in a flow run, Prefect artifacts.
        hooks = HookSet([hooks, SyncRunsRecorder(session.pool, session.catalog), RunArtifacts(subgraph)])
        ctx = RunContext(
            settings=settings, url=session.url, clients=session.clients, pool=session.pool,
            catalog=session.catalog, hooks=hooks, run=run, graph=subgraph,
            full_refresh=frozenset(names) if full_refresh else frozenset(), progress=progress,
            guard=DeleteGuard.of(settings, allowed=allow_mass_delete),
            verify_lock=lambda: verify_lock(session.lock_conn), reconcile=reconcile,
        )
        hooks.run_started(run)
        report.trace_id = run.trace_id
        error: BaseException | None = None
        try:
            report.outcomes = run_graph(subgraph, ctx, lambda name: materialize_task.submit(name, ctx))
        except BaseException as exc:
            error = exc
            raise
        finally:
            hooks.run_finished(run, report.outcomes, error)
    return report


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
) -> RunReport:
    """Materialize the selected assets (default: all). Fails when any asset failed."""
    from runtime.progress import TerminalProgress

    progress = TerminalProgress() if show_progress else None
    report = execute(
        assets or ["*"],
        full_refresh=full_refresh,
        allow_mass_delete=allow_mass_delete,
        reconcile=reconcile,
        hooks=default_hooks(json_logs=log_format == "json", extra=[progress] if progress else []),
        progress=progress.update if progress else None,
    )
    if report.failed:
        raise RunFailed(report)
    return report
