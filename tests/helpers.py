"""Running the real flow from a test and reading what it reported."""

from __future__ import annotations

import contextlib

import psycopg
from psycopg import sql

from runtime.flow import RunFailed, RunReport, sync_flow


def sync(*assets: str, full_refresh: bool = False, allow_mass_delete: bool = False,
         reconcile: bool = False) -> RunReport:
    """Run the Prefect flow in-process on the session's test server; return its report."""
    return report_of(sync_flow(assets=list(assets) or ["*"], full_refresh=full_refresh,
                               allow_mass_delete=allow_mass_delete, reconcile=reconcile, return_state=True))


def report_of(state) -> RunReport:  # noqa: ANN001 - a Prefect State
    """The RunReport a finished flow run carries, whether it completed or failed."""
    result = state.result(raise_on_failure=False)
    if isinstance(result, RunFailed):
        return result.report
    if isinstance(result, RunReport):
        return result
    raise AssertionError(f"flow ended {state.type.value} without a report: {result!r}")


def outcome(report: RunReport, asset: str):  # noqa: ANN201 - AssetOutcome
    return next(o for o in report.outcomes if o.asset == asset)


@contextlib.contextmanager
def app_holds_lock(env, table: str):  # noqa: ANN001 - the env fixture
    """The application holds an exclusive lock on one of its tables (a migration, say) for the
    block. The app's tables are created first (the whole contract, as a first run would), so the
    run's preflight finds them; a run with LOCK_TIMEOUT=1 then fails that table's build."""
    from graph import default_graph
    from runtime.session import check_app_tables
    from runtime.settings import load_settings

    check_app_tables(load_settings(), default_graph())
    with psycopg.connect(env.database_url) as app:
        app.execute(sql.SQL("LOCK TABLE {} IN ACCESS EXCLUSIVE MODE").format(sql.Identifier("public", table)))
        yield
        app.rollback()
