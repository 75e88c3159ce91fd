"""Hooks the runtime calls around a run, each asset and each step; observers plug in here.

A hook that fails is logged and ignored: watching a run must never break it.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Sequence

from observability.events import AssetOutcome, RunInfo

log = logging.getLogger("gong_sync.hooks")


class Hook:
    """Base observer: every method is a no-op; override the ones you need."""

    def run_started(self, run: RunInfo) -> None: ...

    def run_finished(self, run: RunInfo, outcomes: Sequence[AssetOutcome], error: BaseException | None) -> None: ...

    def asset_started(self, run: RunInfo, asset: str) -> None: ...

    def asset_finished(self, run: RunInfo, outcome: AssetOutcome, error: BaseException | None) -> None: ...

    def notice(self, run: RunInfo, topic: str, text: str) -> None:
        """Something an operator must hear of though nothing failed (a row with a cursor in the
        future; runs skipped for hours on a held lock). `topic` keys repeats of the same notice."""

    @contextlib.contextmanager
    def step(self, run: RunInfo, asset: str, name: str, **attributes: object) -> Iterator[None]:
        yield


class HookSet(Hook):
    """Several hooks called in order, each shielded from the others' failures."""

    def __init__(self, hooks: Sequence[Hook] = ()) -> None:
        self.hooks = list(hooks)

    def _each(self, method: str, *args: object) -> None:
        for hook in self.hooks:
            try:
                getattr(hook, method)(*args)
            except Exception:  # noqa: BLE001 - an observer must not break the run
                log.exception("hook %s.%s failed", type(hook).__name__, method)

    def run_started(self, run: RunInfo) -> None:
        self._each("run_started", run)

    def run_finished(self, run: RunInfo, outcomes: Sequence[AssetOutcome], error: BaseException | None) -> None:
        self._each("run_finished", run, outcomes, error)

    def asset_started(self, run: RunInfo, asset: str) -> None:
        self._each("asset_started", run, asset)

    def asset_finished(self, run: RunInfo, outcome: AssetOutcome, error: BaseException | None) -> None:
        self._each("asset_finished", run, outcome, error)

    def notice(self, run: RunInfo, topic: str, text: str) -> None:
        self._each("notice", run, topic, text)

    @contextlib.contextmanager
    def step(self, run: RunInfo, asset: str, name: str, **attributes: object) -> Iterator[None]:
        with contextlib.ExitStack() as stack:
            for hook in self.hooks:
                try:
                    stack.enter_context(hook.step(run, asset, name, **attributes))
                except Exception:  # noqa: BLE001
                    log.exception("hook %s.step failed", type(hook).__name__)
            yield
