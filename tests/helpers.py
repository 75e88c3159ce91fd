"""Running the real flow from a test and reading what it reported."""

from __future__ import annotations

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
