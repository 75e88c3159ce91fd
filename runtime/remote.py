"""One asset run from plain values, in any process: what a distributed task runner ships to a worker.

An in-process run shares one `RunContext` across its assets (a connection pool, gRPC clients,
hooks with locks); none of it crosses a process boundary. A worker gets an `AssetJob` instead:
the asset's name, the run's ids and options, which server session holds the run lock, and where
the run's trace is. It reads its settings from its own environment, as the flow does (no secret
travels with the job), opens its own clients, runs the asset and returns an `AssetResult`; the
flow calls its hooks (logs, metrics, alerts, run records) from that.

Its upstream succeeded before it was submitted (no overlap across processes), so it does not wait.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import psycopg

from assets.errors import SyncError
from graph import default_graph
from observability.events import AssetOutcome, RunInfo
from observability.hooks import Hook, HookSet
from observability.tracing import TracingHook, flush_tracing, setup_tracing, under_trace_parent
from runtime import bigquery
from runtime.deletes import DeleteGuard
from runtime.materialize import RunContext, materialize_asset
from runtime.postgres import Catalog, open_pool
from runtime.session import LockHolder, verify_lock_held_by
from runtime.settings import load_settings


@dataclass(frozen=True)
class AssetJob:
    """Everything one asset run needs from its flow run, as plain values."""

    asset: str
    run: RunInfo
    lock: LockHolder
    full_refresh: bool = False
    allow_mass_delete: bool = False
    reconcile: bool = False
    #: W3C trace-context headers of the run's span: the asset's spans join the run's trace.
    trace_parent: dict[str, str] = field(default_factory=dict)


@dataclass
class AssetResult:
    """How the asset ended, and the notices (`topic`, `text`) the flow's hooks must hear."""

    outcome: AssetOutcome
    notices: list[tuple[str, str]] = field(default_factory=list)


class _Notices(Hook):
    def __init__(self) -> None:
        self.said: list[tuple[str, str]] = []

    def notice(self, run: RunInfo, topic: str, text: str) -> None:
        self.said.append((topic, text))


def run_job(job: AssetJob) -> AssetResult:
    """Materialize one asset with clients of this process; failures come back in the outcome."""
    notices = _Notices()
    tracer = setup_tracing()
    hooks = HookSet([*([TracingHook(tracer)] if tracer else []), notices])
    outcomes: dict[str, AssetOutcome] = {}
    try:
        with under_trace_parent(job.trace_parent):
            _materialize(job, hooks, outcomes)
    except (SyncError, psycopg.Error) as exc:
        # Before the asset started (settings, connections): it failed where it was sent.
        outcomes.setdefault(job.asset, AssetOutcome(asset=job.asset, status="failed", error=str(exc),
                                                    error_type=type(exc).__name__, step="start"))
    finally:
        flush_tracing()
    return AssetResult(outcomes[job.asset], notices.said)


def _materialize(job: AssetJob, hooks: Hook, outcomes: dict[str, AssetOutcome]) -> None:
    settings = load_settings()
    url = settings.postgres_url()
    clients = bigquery.connect(settings)
    try:
        pool = open_pool(url, settings)
        try:
            def verify_lock() -> None:
                with pool.connection() as conn:
                    verify_lock_held_by(conn, job.lock)

            graph = default_graph().subgraph([job.asset])
            ctx = RunContext(
                settings=settings, url=url, clients=clients, pool=pool, catalog=Catalog(settings), hooks=hooks,
                run=job.run, graph=graph, full_refresh=frozenset([job.asset]) if job.full_refresh else frozenset(),
                guard=DeleteGuard.of(settings, allowed=job.allow_mass_delete), reconcile=job.reconcile,
                verify_lock=verify_lock, outcomes=outcomes,
            )
            try:
                materialize_asset(graph.spec(job.asset), ctx)
            except SyncError:
                pass  # in the outcome
        finally:
            pool.close()
    finally:
        clients.close()
