"""One run of the asset graph: open the session, run each asset once its upstream succeeded, report.

The same graph runs two ways: as a Prefect flow (`runtime/flow.py`: scheduled deployments, and
`materialize` when a Prefect API is configured) and in-process on a thread pool (`materialize`
without one), with the same ordering, parallelism, hooks, spans, run records and summary. This
module imports nothing of Prefect, so an in-process run does not pay for it.
"""

from __future__ import annotations

import concurrent.futures
import datetime as dt
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol
from urllib.parse import quote, unquote, urlsplit

from assets.errors import SyncError, UpstreamFailed
from graph import AssetGraph, Selection, default_graph
from observability.alerts import AlertHook
from observability.events import AssetOutcome, RunInfo
from observability.hooks import Hook, HookSet
from observability.logs import LoggingHook, trace_url, use_json_lines
from observability.metrics import MetricsHook, setup_metrics
from observability.tracing import TracingHook, setup_tracing
from runtime.deletes import DeleteGuard
from runtime.load import Progress
from runtime.materialize import RunContext, materialize_asset
from runtime.postgres import Endpoint
from runtime.retry import with_retries
from runtime.run_records import SyncRunsRecorder
from runtime.session import RunLockHeld, last_success, open_session, verify_lock
from runtime.settings import Settings, load_settings


#: How an upstream asset may end that skips what depends on it.
_ENDED_BADLY = ("failed", "skipped", "cancelled")

#: Set by the CLI's Ctrl-C / SIGTERM handler: the run in this process stops at its next safe point.
STOP = threading.Event()


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
    def cancelled(self) -> bool:
        return any(o.status == "cancelled" for o in self.outcomes)

    @property
    def status(self) -> str:
        if self.skipped_reason:
            return "skipped"
        if self.cancelled:
            return "cancelled"
        return "failed" if self.failed else "success"


class RunFailed(SyncError):
    """At least one asset failed; carries the whole report."""

    def __init__(self, report: RunReport) -> None:
        names = ", ".join(f"{o.asset} ({o.error})" for o in report.failed)
        super().__init__(f"{len(report.failed)} asset(s) failed: {names}")
        self.report = report


class Executor(Protocol):
    """Runs one asset at a time on behalf of `run_graph`: Prefect tasks, or a thread pool."""

    #: An asset may start (and land) while its upstream runs, waiting on `ctx.finishes` before its
    #: build: only where the assets share this process.
    overlaps: bool

    def submit(self, name: str, ctx: RunContext) -> Any: ...

    def settle(self, future: Any, name: str, ctx: RunContext) -> None:
        """Once `future` is done: an asset run elsewhere reports its outcome here (in-process ones
        have reported already)."""

    def wait_any(self, futures: list[Any]) -> Any:
        """Block until one of `futures` is done; return it."""

    def failure(self, future: Any) -> str | None:
        """None when the asset's task ended normally, else why it did not."""


class LocalExecutor:
    """Assets on a thread pool in this process: no Prefect API, no server."""

    overlaps = True

    def __init__(self, threads: int) -> None:
        self.pool = concurrent.futures.ThreadPoolExecutor(max_workers=threads, thread_name_prefix="asset")

    def submit(self, name: str, ctx: RunContext) -> concurrent.futures.Future:
        return self.pool.submit(materialize_asset, ctx.graph.spec(name), ctx)

    def wait_any(self, futures: list[concurrent.futures.Future]) -> concurrent.futures.Future:
        done, _ = concurrent.futures.wait(futures, return_when=concurrent.futures.FIRST_COMPLETED)
        return next(f for f in futures if f in done)

    def settle(self, future: concurrent.futures.Future, name: str, ctx: RunContext) -> None:
        pass

    def failure(self, future: concurrent.futures.Future) -> str | None:
        exc = future.exception()
        return None if exc is None else str(exc)

    def close(self) -> None:
        self.pool.shutdown(wait=True)


def run_graph(graph: AssetGraph, ctx: RunContext, executor: Executor) -> list[AssetOutcome]:
    """Submit each asset once all its upstream succeeded or runs, at most MAX_PARALLEL at a time.

    An asset submitted while its upstream runs lands its own sources and waits for them before
    its build (`Finishes`); an upstream submitted first never waits on it, so nothing deadlocks.
    Assets run in other processes (`executor.overlaps` false) start once their upstream succeeded.

    Once the run is cancelled (Ctrl-C, SIGTERM) or its lock is lost, nothing new starts: what
    waits is `cancelled` or `skipped`, and the running assets stop at their next safe point.
    """
    waiting = list(graph.names)
    running: dict[Any, str] = {}
    status: dict[str, str] = {}
    stopped: str | None = None  # the run lock was lost: nothing new starts
    while waiting or running:
        for name in list(waiting):
            upstream = graph.upstream(name)
            if ctx.cancel.is_set():
                waiting.remove(name)
                outcome = AssetOutcome(asset=name, status="cancelled", error="cancelled before it started")
                ctx.outcomes[name] = outcome
                status[name] = "cancelled"
                ctx.hooks.asset_finished(ctx.run, outcome, None)
            elif stopped:
                waiting.remove(name)
                outcome = AssetOutcome(asset=name, status="skipped", error=stopped)
                ctx.outcomes[name] = outcome
                status[name] = "skipped"
                ctx.hooks.asset_finished(ctx.run, outcome, None)
            elif any(status.get(u) in _ENDED_BADLY for u in upstream):
                waiting.remove(name)
                blocked = [u for u in upstream if status.get(u) in _ENDED_BADLY]
                outcome = AssetOutcome(asset=name, status="skipped", error=f"upstream failed: {', '.join(blocked)}")
                ctx.outcomes[name] = outcome
                status[name] = "skipped"
                ctx.hooks.asset_finished(ctx.run, outcome, UpstreamFailed(outcome.error))
            elif (all(status.get(u) == "success" or (executor.overlaps and u in running.values()) for u in upstream)
                  and len(running) < ctx.settings.max_parallel):
                waiting.remove(name)
                running[executor.submit(name, ctx)] = name
        if not running:
            continue
        done = executor.wait_any(list(running))
        name = running.pop(done)
        executor.settle(done, name, ctx)
        failure = executor.failure(done)
        if name not in ctx.outcomes:  # the task died before it could report
            ctx.outcomes[name] = AssetOutcome(asset=name, status="failed", error=failure)
            ctx.hooks.asset_finished(ctx.run, ctx.outcomes[name], None)
        # The outcome says how it ended (a skipped asset raised too); a task that failed after
        # reporting success counts as failed.
        ended = ctx.outcomes[name].status
        status[name] = "failed" if failure is not None and ended == "success" else ended
        ctx.finishes.record(name, status[name])
        # Any asset that found the lock gone, collected or not yet: a downstream that waited on it
        # may end (skipped) and be collected first.
        lost = next((o for o in ctx.outcomes.values() if o.error_type == "RunLockLost"), None)
        if lost is not None and not stopped:
            stopped = f"not started: {lost.error}"
    return [ctx.outcomes[n] for n in graph.names]


def _alert_if_stale(settings: Settings, hooks: Hook, run: RunInfo) -> None:
    """Runs skipped on a held lock are fine for a while; a lock held for hours means the sync has
    stopped (a run stuck on a table lock, a forgotten session): say so once it is STALE_AFTER old."""
    try:
        last = last_success(settings)
    except SyncError:
        return
    if last is None or (dt.datetime.now(dt.UTC) - last).total_seconds() > settings.stale_after:
        hooks.notice(run, "stale", f"no successful sync since {last.isoformat(timespec='seconds') if last else 'ever'};"
                     " runs are being skipped because another run holds the lock")


def default_hooks(json_logs: bool = False, extra: list[Hook] | None = None,
                  run_link: Callable[[RunInfo], str | None] | None = None) -> HookSet:
    """Traces and metrics (when OTEL_* ask for them), logs, plus whatever the caller adds (the
    CLI's progress display). Tracing comes first: it sets the trace id the others report."""
    tracer, meter = setup_tracing(), setup_metrics()
    if json_logs:
        use_json_lines()
    watchers: list[Hook] = [*([TracingHook(tracer)] if tracer else []), *([MetricsHook(meter)] if meter else [])]
    return HookSet([*watchers, LoggingHook(), *alert_hooks(run_link=run_link), *(extra or [])])


def alert_hooks(settings: Settings | None = None, run_link: Callable[[RunInfo], str | None] | None = None) -> list[Hook]:
    """Slack and PagerDuty alerts, when either is configured; settings go in, the hook never reads them."""
    try:
        settings = settings or load_settings()
        url = settings.postgres_url()
    except SyncError:
        return []  # the run itself reports the bad setting
    if not (settings.slack_webhook_url or settings.pagerduty_routing_key):
        return []
    # The password as libpq reads it (a `#` or `?` in it confuses urlsplit), and as the URL writes it.
    from psycopg.conninfo import conninfo_to_dict

    written = urlsplit(url).password
    password = conninfo_to_dict(url).get("password")
    forms = (password, quote(password, safe="") if password else None, written, unquote(written) if written else None)
    hidden = {form for form in forms if form}
    return [AlertHook(
        slack_webhook_url=settings.slack_webhook_url.get_secret_value() if settings.slack_webhook_url else None,
        pagerduty_routing_key=settings.pagerduty_routing_key.get_secret_value() if settings.pagerduty_routing_key else None,
        pagerduty_events_url=settings.pagerduty_events_url, severity=settings.pagerduty_severity,
        source=str(Endpoint.parse(url)), run_link=run_link or (lambda run: trace_url(run.trace_id)), timeout_s=settings.alert_timeout,
        secrets=[url, *sorted(hidden, key=len, reverse=True)],
    )]


def execute(
    assets: list[str] | str,
    *,
    full_refresh: bool = False,
    allow_mass_delete: bool = False,
    reconcile: bool = False,
    settings: Settings | None = None,
    hooks: Hook | None = None,
    progress: Progress | None = None,
    executor: Executor | None = None,
    flow_run_id: str | None = None,
    run_hooks: Callable[[AssetGraph], list[Hook]] = lambda graph: [],
    cancel: threading.Event | None = None,
) -> RunReport:
    """Resolve the selection, open the run's session (checks, lock, pool) and run the graph.

    `executor` runs the assets (default: a thread pool in this process); `run_hooks` adds hooks
    that need the resolved graph (a flow run's Prefect artifacts); `cancel`, once set, stops it.
    """
    settings = settings or load_settings()
    graph = default_graph()
    selection = Selection.parse(assets)
    names = selection.resolve_ordered(graph)
    subgraph = graph.subgraph(names)
    hooks = hooks or default_hooks()
    run = RunInfo(
        run_id=str(flow_run_id or uuid.uuid4()),
        selection=str(selection),
        assets=tuple(names),
        flow_run_id=flow_run_id,
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
        hooks = HookSet([hooks, SyncRunsRecorder(session.pool, session.catalog), *run_hooks(subgraph)])
        if executor is not None and not executor.overlaps:  # assets run in other processes
            hooks = hooks.for_remote_assets()
        ctx = RunContext(
            settings=settings, url=session.url, clients=session.clients, pool=session.pool,
            catalog=session.catalog, hooks=hooks, run=run, graph=subgraph,
            full_refresh=frozenset(names) if full_refresh else frozenset(), progress=progress,
            guard=DeleteGuard.of(settings, allowed=allow_mass_delete),
            verify_lock=lambda: verify_lock(session.lock_conn), lock=session.lock, reconcile=reconcile,
            cancel=cancel or STOP,
        )
        local = executor is None
        executor = executor or LocalExecutor(settings.max_parallel)
        hooks.run_started(run)
        report.trace_id = run.trace_id
        error: BaseException | None = None
        try:
            report.outcomes = run_graph(subgraph, ctx, executor)
        except BaseException as exc:
            error = exc
            raise
        finally:
            if local:
                executor.close()
            hooks.run_finished(run, report.outcomes, error)
    return report
