"""Structured log lines: one per asset start and end, with rows, duration and checkpoints.

Each line carries its fields twice: as `key=value` text in the message (what the Prefect UI and a
terminal show) and as a dict on the record, which `JsonLineFormatter` turns into one JSON object
per line for machines (`--log-format json`).
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import re
import sys
from collections.abc import Sequence

from observability.events import AssetOutcome, RunInfo
from observability.hooks import Hook

#: The record attribute that holds a line's structured fields.
FIELDS_ATTR = "gong_sync_fields"
#: `scheme://user:password@` in any text: the password goes, the rest stays readable.
_URL_PASSWORD = re.compile(r"(?P<head>\b[a-zA-Z][a-zA-Z0-9+.-]*://[^\s:/@]*:)[^\s@/]+@")
#: `password=...` in libpq keyword strings and query strings.
_KEYWORD_PASSWORD = re.compile(r"(?i)(?P<head>\bpassword\s*=\s*)(?:'[^']*'|[^\s&;]+)")


def redact(text: str) -> str:
    """Remove passwords from URLs and `password=` pairs, so that no secret reaches a log or span."""
    text = _URL_PASSWORD.sub(lambda m: m.group("head") + "***@", text)
    return _KEYWORD_PASSWORD.sub(lambda m: m.group("head") + "***", text)


def trace_url(trace_id: str | None) -> str | None:
    """The run's trace in the Jaeger UI, when JAEGER_UI_URL is set."""
    ui = os.environ.get("JAEGER_UI_URL", "").strip()
    return f"{ui.rstrip('/')}/trace/{trace_id}" if ui and trace_id else None


def run_logger() -> logging.Logger | logging.LoggerAdapter:
    """Prefect's run logger inside a flow or task (so lines reach the UI), standard logging outside."""
    if "prefect" in sys.modules:  # never import Prefect for an in-process run just to ask
        from prefect.exceptions import MissingContextError
        from prefect.logging import get_run_logger

        try:
            return get_run_logger()
        except MissingContextError:
            pass
    return logging.getLogger("gong_sync")


class JsonLineFormatter(logging.Formatter):
    """One JSON object per record: time, level, logger, Prefect run names, message and fields."""

    _PREFECT = ("flow_run_id", "flow_run_name", "task_run_id", "task_run_name")

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "ts": dt.datetime.fromtimestamp(record.created, dt.UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
        }
        for key in self._PREFECT:
            if getattr(record, key, None):
                entry[key] = str(getattr(record, key))
        entry.update(getattr(record, FIELDS_ATTR, None) or {})
        entry["message"] = redact(record.getMessage())
        if record.exc_info:
            entry["exception"] = redact(self.formatException(record.exc_info))
        return json.dumps(entry, default=str)


class JsonLinesHandler(logging.StreamHandler):
    """A JSON stream handler whose formatter stays: dlt re-formats the handlers of its logger.

    Its name must not start with an underscore: Prefect keeps a root handler it takes for the
    user's own, and replaces the others with its console handler.
    """

    def __init__(self, stream) -> None:  # noqa: ANN001 - a text stream
        super().__init__(stream)
        self.formatter = JsonLineFormatter()

    def setFormatter(self, fmt: logging.Formatter | None) -> None:  # noqa: N802 - logging's naming
        pass


def use_json_lines(stream=None) -> None:  # noqa: ANN001 - a text stream
    """Make every console line a JSON object: the root logger's and dlt's (which logs on its own)."""
    stream = stream or sys.stderr
    root = logging.getLogger()
    if any(isinstance(h, JsonLinesHandler) for h in root.handlers):
        return
    for handler in list(root.handlers):
        # Console handlers only (Prefect's or basicConfig's); API and file handlers keep theirs.
        if type(handler) is logging.StreamHandler or type(handler).__name__ == "PrefectConsoleHandler":
            root.removeHandler(handler)
    root.addHandler(JsonLinesHandler(stream))
    dlt_logger = logging.getLogger("dlt")
    for handler in list(dlt_logger.handlers):
        dlt_logger.removeHandler(handler)
    dlt_logger.addHandler(JsonLinesHandler(stream))


class LoggingHook(Hook):
    """Writes the run's progress as `key=value` lines whose records also carry the fields as a
    dict; the console shows them as JSON objects once `use_json_lines()` is on."""

    def _emit(self, level: int, event: str, **fields: object) -> None:
        fields = {k: redact(v) if isinstance(v, str) else v for k, v in fields.items()}
        message = event + " " + " ".join(
            f"{k}={json.dumps(v, sort_keys=True) if isinstance(v, dict) else v}" for k, v in fields.items()
        )
        run_logger().log(level, message, extra={FIELDS_ATTR: {"event": event, **fields}})

    def run_started(self, run: RunInfo) -> None:
        self._emit(
            logging.INFO, "run.start", run_id=run.run_id, selection=run.selection, assets=",".join(run.assets),
            **({"trace_id": run.trace_id} if run.trace_id else {}),
            **({"trace_url": url} if (url := trace_url(run.trace_id)) else {}),
        )

    def asset_started(self, run: RunInfo, asset: str) -> None:
        self._emit(logging.INFO, "asset.start", run_id=run.run_id, asset=asset)

    def notice(self, run: RunInfo, topic: str, text: str) -> None:
        self._emit(logging.WARNING, "run.notice", run_id=run.run_id, topic=topic, text=text)

    def asset_finished(self, run: RunInfo, outcome: AssetOutcome, error: BaseException | None) -> None:
        level = {"success": logging.INFO, "skipped": logging.WARNING, "cancelled": logging.WARNING}.get(
            outcome.status, logging.ERROR)
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
            rows_dead_lettered=outcome.rows_dead_lettered,
            **({"cascade": outcome.cascade} if outcome.cascade else {}),
            schema_changes=outcome.schema_changes,
            duration_s=round(outcome.duration_s, 3),
            checkpoint=outcome.checkpoint or "-",
            checkpoint_before=outcome.checkpoint_before,
            checkpoint_after=outcome.checkpoint_after,
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
            rows_synced=sum(o.rows_synced for o in outcomes),
            **({"trace_id": run.trace_id} if run.trace_id else {}),
            **({"trace_url": url} if (url := trace_url(run.trace_id)) else {}),
        )
