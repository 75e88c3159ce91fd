"""Structured log lines: one per asset start and end, with rows, duration and checkpoints."""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence

from observability.events import AssetOutcome, RunInfo
from observability.hooks import Hook


def run_logger() -> logging.Logger | logging.LoggerAdapter:
    """Prefect's run logger inside a flow or task (so lines reach the UI), standard logging outside."""
    try:
        from prefect.exceptions import MissingContextError
        from prefect.logging import get_run_logger

        try:
            return get_run_logger()
        except MissingContextError:
            pass
    except ImportError:  # pragma: no cover - prefect is a dependency
        pass
    return logging.getLogger("gong_sync")


class LoggingHook(Hook):
    """Writes the run's progress as `key=value` lines, or JSON objects with `json_lines`."""

    def __init__(self, json_lines: bool = False) -> None:
        self.json_lines = json_lines

    def _emit(self, level: int, event: str, **fields: object) -> None:
        if self.json_lines:
            message = json.dumps({"event": event, **fields}, default=str, sort_keys=True)
        else:
            message = event + " " + " ".join(f"{k}={v}" for k, v in fields.items())
        run_logger().log(level, message)

    def run_started(self, run: RunInfo) -> None:
        self._emit(logging.INFO, "run.start", run_id=run.run_id, selection=run.selection, assets=",".join(run.assets))

    def asset_started(self, run: RunInfo, asset: str) -> None:
        self._emit(logging.INFO, "asset.start", run_id=run.run_id, asset=asset)

    def asset_finished(self, run: RunInfo, outcome: AssetOutcome, error: BaseException | None) -> None:
        level = logging.INFO if outcome.status == "success" else logging.ERROR
        self._emit(
            level,
            "asset.end",
            run_id=run.run_id,
            asset=outcome.asset,
            status=outcome.status,
            rows_read=outcome.rows_read,
            rows_loaded=outcome.rows_loaded,
            rows_written=outcome.rows_written,
            rows_deleted=outcome.rows_deleted,
            duration_s=round(outcome.duration_s, 3),
            checkpoint_before=json.dumps(outcome.checkpoint_before, sort_keys=True),
            checkpoint_after=json.dumps(outcome.checkpoint_after, sort_keys=True),
            **({"step": outcome.step, "error": outcome.error} if outcome.error else {}),
        )

    def run_finished(self, run: RunInfo, outcomes: Sequence[AssetOutcome], error: BaseException | None) -> None:
        failed = [o.asset for o in outcomes if o.status == "failed"]
        skipped = [o.asset for o in outcomes if o.status == "skipped"]
        self._emit(
            logging.ERROR if failed or error else logging.INFO,
            "run.end",
            run_id=run.run_id,
            status="failed" if failed or error else "success",
            failed=",".join(failed) or "-",
            skipped=",".join(skipped) or "-",
        )
