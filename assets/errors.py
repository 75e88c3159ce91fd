"""The project's one exception tree: every error says whether a retry can help.

It lives in `assets/`, the bottom layer, so that `graph/` and `runtime/` can both raise from it
without importing upward.
"""

from __future__ import annotations


class SyncError(Exception):
    """Root of every error this project raises on purpose."""

    #: Process exit code when this error ends a CLI run.
    exit_code = 1
    #: True when trying the same operation again may succeed.
    transient = False


class ConfigError(SyncError):
    """A setting is missing or malformed; nothing was done."""

    exit_code = 2


class CredentialError(ConfigError):
    """A credential is missing, unreadable or rejected; names which one, never its value."""


class SelectionError(ConfigError):
    """An asset selection names something the graph does not have."""


class GraphError(SyncError):
    """The asset declarations do not form a valid graph (cycle, unknown dependency)."""


class TransientError(SyncError):
    """A network or server hiccup: the same call may succeed if tried again."""

    transient = True


class PermanentError(SyncError):
    """Trying again will not help: a missing table, a SQL error, a permission."""


class SourceTableMissing(PermanentError):
    """A source table that an asset reads does not exist in the warehouse."""


class BuildError(PermanentError):
    """The derived-table build in Postgres failed or cannot start."""


class Cancelled(SyncError):
    """The operator stopped the run (Ctrl-C, SIGTERM): work stopped at a safe point."""

    exit_code = 130


class UpstreamFailed(SyncError):
    """An asset was not run because an asset it depends on failed."""
