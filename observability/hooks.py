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

    #: Its asset and step events must be seen where the asset runs (a span's children need the
    #: asset's own thread): when assets run in other processes, they get their own instance there.
    watches_in_the_asset = False

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

    def for_remote_assets(self) -> "HookSet":
        """The same hooks for a run whose assets run in other processes: those that watch in the
        asset hear only the run's events here (the asset's process has its own)."""
        return HookSet([
            h.for_remote_assets() if isinstance(h, HookSet) else RunEventsOnly(h) if h.watches_in_the_asset else h
            for h in self.hooks
        ])

    @contextlib.contextmanager
    def step(self, run: RunInfo, asset: str, name: str, **attributes: object) -> Iterator[None]:
        with contextlib.ExitStack() as stack:
            for hook in self.hooks:
                try:
                    stack.enter_context(hook.step(run, asset, name, **attributes))
                except Exception:  # noqa: BLE001
                    log.exception("hook %s.step failed", type(hook).__name__)
            yield


class RunEventsOnly(Hook):
    """A hook whose asset events happen in the asset's own process: here it hears the run's
    events, notices, and the end of assets that never started (skipped before they ran)."""

    def __init__(self, hook: Hook) -> None:
        self.hook = hook
        self._started: set[str] = set()

    def run_started(self, run: RunInfo) -> None:
        self.hook.run_started(run)

    def run_finished(self, run: RunInfo, outcomes: Sequence[AssetOutcome], error: BaseException | None) -> None:
        self.hook.run_finished(run, outcomes, error)

    def notice(self, run: RunInfo, topic: str, text: str) -> None:
        self.hook.notice(run, topic, text)

    def asset_started(self, run: RunInfo, asset: str) -> None:
        self._started.add(asset)

    def asset_finished(self, run: RunInfo, outcome: AssetOutcome, error: BaseException | None) -> None:
        if outcome.asset not in self._started:
            self.hook.asset_finished(run, outcome, error)
