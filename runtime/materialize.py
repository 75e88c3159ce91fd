"""One asset's materialization: land its sources, secure the raw tables, build the destination."""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from psycopg import sql
from psycopg_pool import ConnectionPool

from assets.errors import Cancelled, PermanentError, SyncError, UpstreamFailed
from assets.spec import AssetSpec, SourceTable
from graph import AssetGraph
from observability.events import AssetOutcome, RunInfo
from observability.hooks import Hook
from runtime.bigquery import BigQueryClients
from runtime.build import BuildResult, build_asset
from runtime.deletes import DeleteGuard
from runtime.reconcile import reconcile_source
from runtime.load import LandResult, Progress, land
from runtime.retry import with_retries
from runtime.schema import (
    Change, SourcePlan, app_misfits, create_empty_raw, ensure_columns, missing_columns, plan_source,
    record_changes,
)
from runtime.postgres import (
    Catalog,
    add_load_order,
    create_stand_in,
    table_exists,
    record_dead_letters,
    record_sync_status,
    secure_raw_table,
)
from runtime.session import LockHolder
from runtime.settings import Settings


log = logging.getLogger("gong_sync.materialize")

#: Seconds between looks at the operator's cancel while an asset waits for its upstream.
_WAIT_TICK_S = 0.2


class Finishes:
    """How each asset of a run ended, for the assets that wait on it.

    An asset lands its own source tables while its upstream still runs (landing reads nothing of
    theirs) and waits here only before its build, which joins their tables: on a full sync the
    transcripts' read overlaps the calls' and speakers' builds instead of following them.
    """

    def __init__(self) -> None:
        self._ended: dict[str, str] = {}
        self._changed = threading.Condition()

    def record(self, asset: str, status: str) -> None:
        with self._changed:
            self._ended.setdefault(asset, status)
            self._changed.notify_all()

    def wait(self, assets: list[str], cancel: threading.Event) -> list[str]:
        """Block until every one of `assets` ended (or the run is cancelled); those that did not succeed."""
        with self._changed:
            while not cancel.is_set() and any(a not in self._ended for a in assets):
                self._changed.wait(_WAIT_TICK_S)
            return [a for a in assets if self._ended.get(a, "success") != "success"]


@dataclass
class RunContext:
    """Everything one run shares across its assets: settings, clients, the pool, the hooks."""

    settings: Settings
    url: str
    clients: BigQueryClients
    pool: ConnectionPool
    catalog: Catalog
    hooks: Hook
    run: RunInfo
    graph: AssetGraph
    full_refresh: frozenset[str] = frozenset()
    guard: DeleteGuard = DeleteGuard()
    #: Also reconcile keys: raw rows whose key the source no longer has are marked deleted.
    reconcile: bool = False
    #: Raises RunLockLost when the run's lock is gone; called before each land and each build.
    verify_lock: Callable[[], None] = lambda: None
    #: The session holding the run lock: how an asset run in another process checks it.
    lock: LockHolder | None = None
    #: Set when the operator stops the run: assets stop at their next safe point.
    cancel: threading.Event = field(default_factory=threading.Event)
    progress: Progress | None = None
    outcomes: dict[str, AssetOutcome] = field(default_factory=dict)
    finishes: Finishes = field(default_factory=Finishes)


def materialize_asset(spec: AssetSpec, ctx: RunContext) -> AssetOutcome:
    """Run one asset end to end; failures come back in the outcome (and are re-raised by callers)."""
    outcome = AssetOutcome(asset=spec.name)
    started = time.perf_counter()
    ctx.hooks.asset_started(ctx.run, spec.name)
    error: SyncError | None = None
    try:
        outcome.step = "land"
        _safe_point(ctx)
        with ctx.hooks.step(ctx.run, spec.name, "land", tables=[s.raw_table for s in spec.sources]):
            landed = with_retries(ctx.settings, f"{spec.name}: land", lambda: land(
                spec, ctx.settings, ctx.clients, ctx.url,
                full_refresh=spec.name in ctx.full_refresh, progress=ctx.progress, cancel=ctx.cancel,
                reject=lambda source, rows: _dead_letters(ctx, spec, source, rows),
                evolve=lambda source, fields: _evolve(ctx, spec, source, fields, outcome),
            ))
        for table, n in landed.rows_future.items():
            ctx.hooks.notice(ctx.run, f"future-cursor:{spec.name}",
                             f"{spec.name}: {n} row(s) of {table} carry a cursor later than now plus"
                             " FUTURE_CURSOR_TOLERANCE; they are in dead_letters and the checkpoint stays")
        for table, n in landed.rows_late.items():
            if n:  # worth knowing: they would have been lost without the window
                log.info("%s: %d late row(s) of %s found below the checkpoint (LATE_ROW_WINDOW) and landed",
                         spec.name, n, table)
        outcome.rows_read = sum(landed.rows_read.values())
        outcome.rows_dead_lettered = sum(landed.rows_rejected.values())
        outcome.rows_loaded = sum(landed.rows_loaded.values())
        outcome.bytes_read = landed.bytes_read
        outcome.checkpoint_before = landed.checkpoint_before
        outcome.checkpoint_after = landed.checkpoint_after
        if ctx.reconcile:
            outcome.step = "reconcile"
            with ctx.hooks.step(ctx.run, spec.name, "reconcile"):
                outcome.rows_reconciled = with_retries(ctx.settings, f"{spec.name}: reconcile",
                                                       lambda: _reconcile(ctx, spec, landed))
        upstream = ctx.graph.upstream(spec.name)
        if upstream:
            outcome.step = "wait_upstream"
            with ctx.hooks.step(ctx.run, spec.name, "wait_upstream", assets=upstream):
                blocked = ctx.finishes.wait(upstream, ctx.cancel)
            if blocked and not ctx.cancel.is_set():
                raise UpstreamFailed(f"upstream failed: {', '.join(blocked)}; its own rows were landed and are "
                                     "built by the next run")
        outcome.step = "build"
        _safe_point(ctx)
        with ctx.hooks.step(ctx.run, spec.name, "build"):
            built = with_retries(ctx.settings, f"{spec.name}: build", lambda: _build(ctx, spec, landed))
        outcome.rows_written = built.upserted
        outcome.rows_deleted = built.deleted
        outcome.cascade = built.cascade
        outcome.rows_dead_lettered += built.rejected
        outcome.status = "success"
        outcome.step = None
    except SyncError as exc:
        error = exc
        outcome.status = ("cancelled" if isinstance(exc, Cancelled) else "skipped" if isinstance(exc, UpstreamFailed)
                          else "failed")
        outcome.error = str(exc)
        outcome.error_type = type(exc).__name__
    outcome.duration_s = time.perf_counter() - started
    ctx.outcomes[spec.name] = outcome
    ctx.finishes.record(spec.name, outcome.status)  # what waits on it may build now (or skip)
    if outcome.status in ("failed", "cancelled"):
        _log_failure(ctx, outcome)
    if outcome.status != "skipped":  # a skipped asset built nothing: its sync_status stays as it was
        _record_status(ctx, outcome)
    ctx.hooks.asset_finished(ctx.run, outcome, error)
    if error is not None:
        raise error
    return outcome


def _safe_point(ctx: RunContext) -> None:
    """Between steps: stop if the operator cancelled the run or its lock is gone."""
    if ctx.cancel.is_set():
        raise Cancelled("cancelled by the operator; checkpoints and tables as the last finished step left them")
    ctx.verify_lock()


def _evolve(ctx: RunContext, spec: AssetSpec, source: SourceTable, fields: list, outcome: AssetOutcome) -> SourcePlan:
    """Follow the source's schema: migrate widened columns, plan the rest, record every change."""
    with ctx.hooks.step(ctx.run, spec.name, "schema", table=source.raw_table), ctx.pool.connection() as conn:
        required, optional = missing_columns(source, fields)
        if required:
            raise PermanentError(
                f"{spec.name}: source table {source.table} lacks column(s) {', '.join(required)}, which "
                f"{spec.name} cannot do without"
            )
        plan = plan_source(conn, ctx.catalog, spec.name, source.raw_table, fields)
        # Optional columns the raw table was given (as NULL) are not "removed" source columns.
        plan.changes = [c for c in plan.changes if not (c.change == "removed" and c.column in optional)]
        if optional:
            # Said on every run while it lasts; recorded once.
            log.warning("%s: source table %s lacks optional column(s) %s: they read as NULL", spec.name,
                        source.table, ", ".join(optional))
            plan.changes += [Change(c, "missing", None, None, "reads_as_null") for c in optional]
        misfits = app_misfits(source, fields)
        for change, fit in misfits:
            # Said on every run while it lasts: the app's column cannot follow the source's type.
            log.warning("%s: %s.%s is now %s, which the app's column does not hold; %s", spec.name,
                        source.table, fit.column, change.new_type, fit.rule)
        outcome.schema_changes += record_changes(conn, ctx.catalog, spec.name, source.raw_table, plan.changes)
        outcome.schema_changes += record_changes(conn, ctx.catalog, spec.name, source.raw_table,
                                                 [c for c, _ in misfits], warn=log.debug)
    return plan


def _build(ctx: RunContext, spec: AssetSpec, landed: LandResult) -> BuildResult:
    """Secure the landed raw tables and build the destination, on one pooled connection (one attempt)."""
    with ctx.pool.connection() as conn:
        with ctx.hooks.step(ctx.run, spec.name, "secure_raw", tables=[s.raw_table for s in spec.sources]):
            for source in spec.sources:
                if source in landed.stand_ins:
                    create_stand_in(conn, ctx.catalog, source.raw_table, source.stand_in)
                elif not table_exists(conn, ctx.catalog.raw_name, source.raw_table):
                    # The source table exists but has never had a row: an empty raw table.
                    create_empty_raw(conn, ctx.catalog, source.raw_table, landed.readers[source.raw_table].schema())
            # Optional columns a source lacks read as NULL: every input the build reads has them.
            for source in dict.fromkeys((*spec.sources, *spec.build.inputs)):
                if table_exists(conn, ctx.catalog.raw_name, source.raw_table):
                    ensure_columns(conn, ctx.catalog, source)
                    add_load_order(conn, ctx.catalog, source.raw_table)
            for source in spec.sources:
                if source not in landed.stand_ins:
                    secure_raw_table(conn, ctx.catalog, source)
        with ctx.hooks.step(ctx.run, spec.name, "build_table", table=spec.table):
            return build_asset(conn, ctx.catalog, spec, ctx.settings, full=spec.name in ctx.full_refresh,
                               guard=ctx.guard, run_id=ctx.run.run_id)


def _reconcile(ctx: RunContext, spec: AssetSpec, landed: LandResult) -> int:
    with ctx.pool.connection() as conn:
        return sum(
            reconcile_source(conn, ctx.catalog, source, landed.readers[source.raw_table])
            for source in spec.sources if source.raw_table in landed.readers
        )


def _dead_letters(ctx: RunContext, spec: AssetSpec, source: SourceTable, rows: list) -> int:
    def record() -> int:
        with ctx.pool.connection() as conn:
            return record_dead_letters(conn, ctx.catalog, spec.name, source.table, ctx.run.run_id, rows)

    with ctx.hooks.step(ctx.run, spec.name, "dead_letters", table=source.raw_table, rows=len(rows)):
        written = with_retries(ctx.settings, f"{spec.name}: dead letters", record)
    # Said once they are there, not before; rows already there from an earlier read are not news.
    if written:
        repaired = sum(1 for *_, errors in rows if all("landed without it" in e.get("error", "") for e in errors))
        if len(rows) > repaired:
            log.warning("%s: %d row(s) of %s failed validation and went to dead_letters", spec.name,
                        len(rows) - repaired, source.table)
        if repaired:
            log.warning("%s: %d row(s) of %s held NUL characters: landed without them, originals in dead_letters",
                        spec.name, repaired, source.table)
    return written


def _log_failure(ctx: RunContext, outcome: AssetOutcome) -> None:
    """One line an operator can act on: asset, step, error class and message, checkpoint kept."""
    if not outcome.checkpoint_after:  # landing did not finish: the last recorded checkpoint stands
        try:
            outcome.checkpoint_after = with_retries(
                ctx.settings, f"{outcome.asset}: read checkpoint", lambda: _recorded_checkpoint(ctx, outcome.asset)
            )
        except SyncError as exc:
            log.warning("%s: cannot read the recorded checkpoint: %s", outcome.asset, exc)
    log.error(
        "%s failed at step %s: %s: %s; checkpoint stays at %s", outcome.asset, outcome.step, outcome.error_type,
        outcome.error, json.dumps(outcome.checkpoint_after, sort_keys=True) if outcome.checkpoint_after else "none",
    )


def _recorded_checkpoint(ctx: RunContext, asset: str) -> dict[str, str | None]:
    with ctx.pool.connection() as conn:
        row = conn.execute(
            sql.SQL("SELECT error_details -> 'checkpoints' FROM {} WHERE entity_type = %s").format(ctx.catalog.sync_status),
            (asset,),
        ).fetchone()
    return row[0] if row and isinstance(row[0], dict) else {}


def _record_status(ctx: RunContext, outcome: AssetOutcome) -> None:
    """Write the asset's sync_status row; a failure here is logged, never hiding the asset's outcome."""

    def record() -> None:
        with ctx.pool.connection() as conn:
            record_sync_status(
                conn,
                ctx.catalog,
                outcome.asset,
                checkpoint=outcome.checkpoint_after or None,
                items=outcome.rows_synced,
                errors=outcome.errors,
                # partial: the asset ran, and some rows are in dead letters instead of the app.
                status="failed" if outcome.status != "success" else "partial" if outcome.errors else "success",
                details={"error": outcome.error, "dead_letters": outcome.rows_dead_lettered,
                         "deleted": outcome.rows_deleted, "cascade": outcome.cascade},
            )

    try:
        with_retries(ctx.settings, f"{outcome.asset}: sync_status", record)
    except SyncError as exc:
        log.error("%s: could not record sync_status: %s", outcome.asset, exc)
