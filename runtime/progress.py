"""Live progress on a terminal: each running asset and the rows it has read so far, rewritten in place."""

from __future__ import annotations

import logging
import shutil
import sys
import threading
import time
from collections.abc import Sequence

from observability.events import AssetOutcome, RunInfo
from observability.hooks import Hook

#: Seconds between redraws while rows stream in.
REDRAW_EVERY = 0.2


class TerminalProgress(Hook):
    """One status line on stderr, refreshed at most every 0.2 s; made only when stderr is a terminal."""

    def __init__(self, stream=None) -> None:  # noqa: ANN001 - any text stream
        self.stream = stream or sys.stderr
        self.total = 0
        self.done = 0
        self.running: list[str] = []
        self.rows: dict[str, int] = {}  # raw table -> rows read so far
        self._lock = threading.RLock()
        self._last = 0.0
        self._shown = False
        self._handlers: list[logging.Handler] = []

    def _log_handlers(self) -> list[logging.Handler]:
        # dlt logs through its own handler (it reuses the first one its logger has): give it one
        # now, so that its lines clear the progress line too.
        dlt_logger = logging.getLogger("dlt")
        if not dlt_logger.handlers:
            dlt_logger.addHandler(logging.StreamHandler(self.stream))
        return [*logging.getLogger().handlers, *dlt_logger.handlers]

    def run_started(self, run: RunInfo) -> None:
        self.total = len(run.assets)
        self._handlers = self._log_handlers()
        for handler in self._handlers:
            handler.emit = self._around(handler.emit)  # type: ignore[method-assign]

    def _around(self, emit):  # noqa: ANN001, ANN202 - a handler's bound emit
        """A log line takes the progress line's place, and the progress line comes back under it."""

        def emit_clear_of_progress(record: logging.LogRecord) -> None:
            with self._lock:
                shown = self._shown
                self.clear()
                emit(record)
                if shown:
                    self._draw()

        return emit_clear_of_progress

    def asset_started(self, run: RunInfo, asset: str) -> None:
        with self._lock:
            self.running.append(asset)
            self._draw()

    def update(self, table: str, rows: int) -> None:
        with self._lock:
            self.rows[table] = rows
            if not self._shown or time.monotonic() - self._last >= REDRAW_EVERY:
                self._draw()

    def asset_finished(self, run: RunInfo, outcome: AssetOutcome, error: BaseException | None) -> None:
        with self._lock:
            self.done += 1
            if outcome.asset in self.running:
                self.running.remove(outcome.asset)
            for table in outcome.checkpoint_before.keys() | outcome.checkpoint_after.keys():
                self.rows.pop(table, None)
            self._draw()

    def run_finished(self, run: RunInfo, outcomes: Sequence[AssetOutcome], error: BaseException | None) -> None:
        for handler in self._handlers:
            handler.__dict__.pop("emit", None)  # back to the class's own emit
        self.clear()

    def clear(self) -> None:
        with self._lock:
            if self._shown:
                self.stream.write("\r\033[K")
                self.stream.flush()
                self._shown = False

    def _draw(self) -> None:
        reading = ", ".join(f"{t} {n:,} rows" for t, n in sorted(self.rows.items()))
        line = f"{self.done}/{self.total} assets done | running: {', '.join(self.running) or '-'}"
        if reading:
            line += f" | read so far: {reading}"
        width = shutil.get_terminal_size((120, 24)).columns - 1
        self.stream.write("\r\033[K" + line[:width])
        self.stream.flush()
        self._shown = True
        self._last = time.monotonic()
