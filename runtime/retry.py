"""Retries with exponential backoff and jitter, for errors that say a retry can help."""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterator
from typing import TypeVar

import psycopg
import psycopg2
from dlt.common.exceptions import TransientException as DltTransientException
from google.api_core import exceptions as gexc
from tenacity import RetryCallState, Retrying, retry_if_exception, stop_after_attempt, wait_random_exponential

from assets.errors import PermanentError, SyncError, TransientError
from runtime.settings import Settings

T = TypeVar("T")
log = logging.getLogger("gong_sync.retry")

#: SQLSTATE classes after which the same statement may succeed: connection exception (08),
#: transaction rollback (40: serialization failure, deadlock), insufficient resources (53),
#: operator intervention (57: shutdown, statement timeout); and lock or object busy (55P03, 55006).
_PG_TRANSIENT_CLASSES = ("08", "40", "53", "57")
_PG_TRANSIENT_CODES = ("55P03", "55006")
#: BigQuery answers worth another try: 429, 500, 502, 503, 504 and abandoned client-side retries.
_GOOGLE_TRANSIENT = (
    gexc.TooManyRequests, gexc.InternalServerError, gexc.BadGateway, gexc.ServiceUnavailable,
    gexc.GatewayTimeout, gexc.DeadlineExceeded, gexc.Aborted, gexc.RetryError,
)


#: A connection the server refused on purpose: another try gets the same answer.
_PG_REJECTED = re.compile(r"authentication failed|no password supplied|does not exist|permission denied", re.I)


def _pg_transient(sqlstate: str | None, operational: bool, text: str) -> bool:
    if sqlstate is None:  # no answer from the server: the connection broke, or never opened
        return operational and not _PG_REJECTED.search(text)
    return sqlstate[:2] in _PG_TRANSIENT_CLASSES or sqlstate in _PG_TRANSIENT_CODES


def _transient_root(exc: BaseException) -> bool:
    """Whether one exception, not yet in our tree, is a network or server hiccup."""
    if isinstance(exc, psycopg.Error):
        return _pg_transient(exc.sqlstate, isinstance(exc, psycopg.OperationalError), str(exc))
    if isinstance(exc, psycopg2.Error):  # dlt's Postgres driver
        return _pg_transient(exc.pgcode, isinstance(exc, psycopg2.OperationalError), str(exc))
    return isinstance(exc, (*_GOOGLE_TRANSIENT, DltTransientException, ConnectionError, TimeoutError))


def _chain(exc: BaseException | None) -> Iterator[BaseException]:
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        # dlt keeps a failed step's exception in `.exception`; Python keeps causes in __cause__.
        inner = getattr(exc, "exception", None)
        exc = inner if isinstance(inner, BaseException) else (exc.__cause__ or exc.__context__)


def transient_cause(exc: BaseException) -> bool:
    """True when anything in the exception's chain says a retry can help."""
    return any(link.transient if isinstance(link, SyncError) else _transient_root(link) for link in _chain(exc))


def describe(exc: BaseException) -> str:
    """`Class: first line of the message`; a Postgres error gives the server's primary message."""
    text = getattr(getattr(exc, "diag", None), "message_primary", None)
    if not text:
        lines = str(exc).strip().splitlines()
        text = lines[0] if lines else ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def classify(exc: BaseException, what: str) -> SyncError:
    """Our tree's error for any exception: transient when its root cause is, permanent otherwise."""
    if isinstance(exc, SyncError):
        return exc
    error: SyncError = (TransientError if transient_cause(exc) else PermanentError)(f"{what}: {describe(exc)}")
    error.__cause__ = exc
    return error


def _reason(exc: BaseException | None, what: str) -> str:
    """`Class: message` without the `what` prefix the log line already starts with."""
    text = describe(exc) if exc else "?"
    head = f"{type(exc).__name__}: {what}: "
    return f"{type(exc).__name__}: {text[len(head):]}" if text.startswith(head) else text


def _is_transient(exc: BaseException) -> bool:
    return isinstance(exc, SyncError) and exc.transient


def retrying(settings: Settings, what: str) -> Retrying:
    """A tenacity policy: RETRIES more tries after the first, waits growing from the base to the cap."""

    def before_sleep(state: RetryCallState) -> None:
        exc = state.outcome.exception() if state.outcome else None
        wait = state.next_action.sleep if state.next_action else 0.0
        log.warning(
            "%s: attempt %d of %d failed (%s); retrying in %.2fs",
            what, state.attempt_number, settings.retries + 1, _reason(exc, what), wait,
        )

    return Retrying(
        retry=retry_if_exception(_is_transient),
        stop=stop_after_attempt(settings.retries + 1),
        wait=wait_random_exponential(multiplier=settings.retry_backoff_base, max=settings.retry_backoff_max),
        before_sleep=before_sleep,
        reraise=True,
    )


def with_retries(settings: Settings, what: str, fn: Callable[[], T]) -> T:
    """Call `fn`, classifying what it raises; retry transient failures; log when giving up."""

    def attempt() -> T:
        try:
            return fn()
        except SyncError:
            raise
        except Exception as exc:  # noqa: BLE001 - every failure leaves here as a SyncError
            raise classify(exc, what) from exc

    policy = retrying(settings, what)
    try:
        return policy(attempt)
    except SyncError as exc:
        if exc.transient:
            log.error("%s: giving up after %d attempt(s): %s", what, policy.statistics.get("attempt_number", 1), exc)
        raise
