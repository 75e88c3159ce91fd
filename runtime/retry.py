"""Retries with exponential backoff and jitter, for errors that say a retry can help."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TypeVar

from tenacity import RetryCallState, Retrying, retry_if_exception, stop_after_attempt, wait_random_exponential

from assets.errors import SyncError
from runtime.settings import Settings

T = TypeVar("T")
log = logging.getLogger("gong_sync.retry")


def _is_transient(exc: BaseException) -> bool:
    return isinstance(exc, SyncError) and exc.transient


def retrying(settings: Settings, what: str) -> Retrying:
    """A tenacity policy: RETRIES more tries after the first, waits growing from the base to the cap."""

    def before_sleep(state: RetryCallState) -> None:
        exc = state.outcome.exception() if state.outcome else None
        wait = state.next_action.sleep if state.next_action else 0.0
        log.warning("%s: attempt %d failed (%s); retrying in %.2fs", what, state.attempt_number, exc, wait)

    return Retrying(
        retry=retry_if_exception(_is_transient),
        stop=stop_after_attempt(settings.retries + 1),
        wait=wait_random_exponential(multiplier=settings.retry_backoff_base, max=settings.retry_backoff_max),
        before_sleep=before_sleep,
        reraise=True,
    )


def with_retries(settings: Settings, what: str, fn: Callable[[], T]) -> T:
    return retrying(settings, what)(fn)
