"""A run's session: check both systems, take the run lock, open the pool, prepare the schemas."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

import psycopg
from psycopg import sql
from psycopg_pool import ConnectionPool

from assets import ALL_ASSETS
from assets.errors import SyncError, TransientError
from graph import AssetGraph
from runtime import bigquery
from runtime.bigquery import BigQueryClients
from runtime.contract import ensure_contract
from runtime.postgres import (
    Catalog, Endpoint, check_connection, connect, connected, open_pool, prepare_schemas,
)
from runtime.settings import Settings

#: pg_try_advisory_lock key of the whole pipeline: one run at a time per database.
RUN_LOCK_KEY = 0x60_6E_5C  # "gong sync"


class RunLockHeld(SyncError):
    """Another run holds the lock; this one does no work and ends successfully."""

    exit_code = 0


class RunLockLost(SyncError):
    """The run's lock went away mid-run (its connection dropped): the run stops at a safe point,
    since another run may now hold it."""


@dataclass(frozen=True)
class LockHolder:
    """Which server session holds the run lock: a pid alone may be reused by a later session."""

    pid: int
    backend_start: dt.datetime


def lock_holder(conn: psycopg.Connection) -> LockHolder:
    """The session of `conn` (the one that took the run lock)."""
    pid, started = conn.execute(
        "SELECT pid, backend_start FROM pg_stat_activity WHERE pid = pg_backend_pid()"
    ).fetchone()
    return LockHolder(pid, started)


#: Whether a session (`{who}`, a condition on `a`, its pg_stat_activity row) holds the run lock in
#: this database: one advisory lock on a bigint key (objsubid 1).
_RUN_LOCK_HELD = (
    "SELECT EXISTS (SELECT 1 FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid"
    " WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 1"
    " AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())"
    " AND ((l.classid::bigint << 32) | l.objid::bigint) = %s AND {who})"
)


def verify_lock_held_by(conn: psycopg.Connection, holder: LockHolder) -> None:
    """From any connection (an asset run in another process): raise RunLockLost unless the
    holder's session is still alive and still holds the run lock."""
    # The holder's session is visible to sessions of the same role (pg_stat_activity): the
    # workers connect as the flow does.
    try:
        held = conn.execute(_RUN_LOCK_HELD.format(who="a.pid = %s AND a.backend_start = %s"),
                            (RUN_LOCK_KEY, holder.pid, holder.backend_start)).fetchone()[0]
    except psycopg.Error as exc:
        raise TransientError(f"could not check the run lock ({type(exc).__name__}); stopping at this safe point") from None
    if not held:
        raise RunLockLost("the run lock is no longer held by the run's session; stopping, since another run may "
                          "hold it now")


def verify_lock(conn: psycopg.Connection) -> None:
    """Raise RunLockLost unless the lock's connection is alive and still holds the run lock."""
    try:
        held = conn.execute(_RUN_LOCK_HELD.format(who="a.pid = pg_backend_pid()"), (RUN_LOCK_KEY,)).fetchone()[0]
    except psycopg.Error as exc:
        raise RunLockLost(f"the run lock's connection is gone ({type(exc).__name__}); stopping, since another "
                          "run may hold the lock now") from None
    if not held:
        raise RunLockLost("the run lock is no longer held; stopping, since another run may hold it now")


def preflight(settings: Settings) -> tuple[str, Endpoint, BigQueryClients]:
    """Connect to both systems before any work; raise errors that name the bad credential."""
    url = settings.postgres_url()
    endpoint = check_connection(url)
    clients = bigquery.connect(settings)
    try:
        bigquery.check_dataset(clients, settings.gong_dataset, "GONG_DATASET")
    except BaseException:
        clients.close()
        raise
    return url, endpoint, clients


def check_app_tables(settings: Settings, graph: AssetGraph) -> None:
    """The application's tables, checked (or created in an empty database) before a run starts."""
    with connected(settings) as conn:
        ensure_contract(conn, Catalog(settings), [graph.spec(n) for n in graph.names])


def last_success(settings: Settings):  # noqa: ANN201 - datetime | None
    """When an asset last synced successfully (the app's sync_status), or None."""
    catalog = Catalog(settings)
    with connected(settings) as conn:
        if conn.execute("SELECT to_regclass(%s) IS NULL", (f'"{catalog.dest_name}"."sync_status"',)).fetchone()[0]:
            return None
        return conn.execute(sql.SQL(
            "SELECT max(updated_at) FROM {} WHERE last_sync_status IN ('success', 'partial')"
        ).format(catalog.sync_status)).fetchone()[0]


@dataclass
class Session:
    url: str
    endpoint: Endpoint
    clients: BigQueryClients
    pool: ConnectionPool
    catalog: Catalog
    lock_conn: psycopg.Connection
    lock: LockHolder

    def __enter__(self) -> "Session":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        # Closing the lock's connection releases the advisory lock, on any exit path.
        self.lock_conn.close()
        self.pool.close()
        self.clients.close()


def open_session(settings: Settings, graph: AssetGraph) -> Session:
    url, endpoint, clients = preflight(settings)
    try:
        lock_conn = connect(settings)
    except SyncError:
        clients.close()
        raise
    locked = lock_conn.execute("SELECT pg_try_advisory_lock(%s)", (RUN_LOCK_KEY,)).fetchone()[0]
    if not locked:
        lock_conn.close()
        clients.close()
        raise RunLockHeld(f"skipped: another run holds the lock on {endpoint}")
    try:
        holder = lock_holder(lock_conn)
        pool = open_pool(url, settings)
        catalog = Catalog(settings)
        with pool.connection() as conn:
            # The app's tables first: a database whose tables do not fit stops here, untouched.
            ensure_contract(conn, catalog, [graph.spec(n) for n in graph.names])
            prepare_schemas(conn, catalog, [s for s in ALL_ASSETS if s.id_map])
    except BaseException:
        lock_conn.close()
        clients.close()
        raise
    return Session(url, endpoint, clients, pool, catalog, lock_conn, holder)
