"""Live progress on a terminal: each asset's rows read so far, rewritten in place."""

from __future__ import annotations

import sys
import threading
import time

from observability.events import AssetOutcome, RunInfo
from observability.hooks import Hook


class TerminalProgress(Hook):
    """One status line on stderr, refreshed at most every 0.2 s; silent when not a terminal."""

    def __init__(self, stream=None) -> None:  # noqa: ANN001 - any text stream
        self.stream = stream or sys.stderr
        self.rows: dict[str, int] = {}
        self.done: set[str] = set()
        self._lock = threading.Lock()
        self._last = 0.0

    def update(self, table: str, rows: int) -> None:
        with self._lock:
            self.rows[table] = rows
            now = time.monotonic()
            if now - self._last >= 0.2:
                self._last = now
                self._draw()

    def asset_finished(self, run: RunInfo, outcome: AssetOutcome, error: BaseException | None) -> None:
        with self._lock:
            self.done.add(outcome.asset)
            self._draw()

    def run_finished(self, run: RunInfo, outcomes, error) -> None:  # noqa: ANN001
        self.stream.write("\r\033[K")
        self.stream.flush()

    def _draw(self) -> None:
        reading = ", ".join(f"{t} {n:,} rows" for t, n in sorted(self.rows.items()))
        self.stream.write(f"\r\033[Kdone: {len(self.done)} | reading: {reading}"[:200])
        self.stream.flush()
