"""The look-back window below a checkpoint: read late rows again, land only the ones not landed.

Fivetran commits a sync's rows together, but stamps each with `_fivetran_synced` as it writes it,
so a row can become visible after a run whose checkpoint is already past its cursor. Each
incremental read therefore starts LATE_ROW_WINDOW seconds below the checkpoint. The rows of that
window that the raw table already holds (same key, same or a later cursor) are dropped before
they reach dlt: nothing is written twice, and the builds see no change where there was none.
"""

from __future__ import annotations

import datetime as dt
import logging
from dataclasses import dataclass

import psycopg
import pyarrow as pa
import pyarrow.compute as pc
from psycopg import sql

from assets.errors import TransientError
from assets.spec import SourceTable
from runtime.postgres import Catalog, connected, table_exists
from runtime.schema import landing_names
from runtime.settings import Settings

log = logging.getLogger("gong_sync.load")

_KNOWN_CURSOR = "__landed_cursor"
_ROW = "__row"


@dataclass(frozen=True)
class LateRowWindow:
    """The keys and cursors a raw table holds from the window's start on."""

    source: SourceTable
    checkpoint: dt.datetime
    start: dt.datetime
    landed: pa.Table  # the key columns (landing names) and _KNOWN_CURSOR

    def drop_landed(self, table: pa.Table) -> tuple[pa.Table, int]:
        """The batch without rows the raw table holds with the same or a later cursor; and how
        many of the rows kept are late (below the checkpoint)."""
        if table.num_rows == 0:
            return table, 0
        by_landing = {landing: name for name, landing in landing_names(table.column_names).items()}
        cursor = by_landing.get(self.source.cursor)
        keys = [by_landing.get(k) for k in self.source.primary_key]
        if cursor is None or None in keys or not pa.types.is_timestamp(table[cursor].type):
            return table, 0
        if self.landed.num_rows:
            try:
                landed = pa.table(
                    [self.landed[k].cast(table[name].type) for k, name in zip(self.source.primary_key, keys)]
                    + [self.landed[_KNOWN_CURSOR].cast(table[cursor].type)],
                    names=[*keys, _KNOWN_CURSOR],
                )
            except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError):
                # A key type the raw table stores differently: land the window as read; dlt's merge
                # keeps one row per key, so this costs a rewrite, never a duplicate. Nothing is
                # counted as late: it cannot be told.
                log.warning("%s: the look-back window's rows are merged again: key types differ from the raw"
                            " table's", self.source.raw_table)
                return table, 0
            probe = table.select([*keys, cursor]).append_column(_ROW, pa.array(range(table.num_rows), pa.int64()))
            matched = probe.join(landed, keys=keys, join_type="inner")
            seen = matched.filter(pc.greater_equal(matched[_KNOWN_CURSOR], matched[cursor]))[_ROW]
            if len(seen):
                rows = pa.array(range(table.num_rows), pa.int64())
                table = table.filter(pc.invert(pc.is_in(rows, value_set=seen.combine_chunks())))
        return table, _late(table, cursor, self.checkpoint)


def _late(table: pa.Table, cursor: str, checkpoint: dt.datetime) -> int:
    if table.num_rows == 0:
        return 0
    below = pc.less(table[cursor], pa.scalar(checkpoint, table[cursor].type))
    return int(pc.sum(pc.cast(pc.fill_null(below, False), pa.int64())).as_py() or 0)


#: Rows of the window fetched from Postgres at a time: only these are ever Python objects; the
#: window itself is held as Arrow (a million keys of a big initial sync: tens of MB).
FETCH_ROWS = 50_000


def open_window(settings: Settings, source: SourceTable, checkpoint: str | None) -> LateRowWindow | None:
    """The window of one source below its checkpoint, or None when there is none to read (first
    read, a full refresh, LATE_ROW_WINDOW=0, a cursor that is not a timestamp, keys Arrow cannot
    hold): without a window dlt reads from the checkpoint and de-duplicates its boundary itself."""
    if settings.late_row_window <= 0 or checkpoint is None or "T" not in checkpoint:
        return None  # a DATE cursor would be lagged by dlt in days, not seconds
    try:
        at = dt.datetime.fromisoformat(checkpoint)
    except ValueError:
        return None
    if at.tzinfo is None:
        at = at.replace(tzinfo=dt.UTC)
    start = at - dt.timedelta(seconds=settings.late_row_window)
    catalog = Catalog(settings)
    columns = [*source.primary_key, source.cursor]
    chunks: list[pa.Table] = []
    try:
        with connected(settings) as conn:  # its own: a named cursor needs a transaction of its own
            if table_exists(conn, catalog.raw_name, source.raw_table):
                try:
                    # An index on the cursor keeps this to the window's rows (runtime/postgres.py);
                    # a server-side cursor keeps a large window out of Python's memory.
                    with conn.transaction(), conn.cursor(name=f"late_{source.raw_table}"[:63]) as cur:
                        cur.execute(sql.SQL("SELECT {} FROM {} WHERE {} >= %s").format(
                            sql.SQL(", ").join(map(sql.Identifier, columns)), catalog.raw_table(source.raw_table),
                            sql.Identifier(source.cursor)), (start,))
                        while rows := cur.fetchmany(FETCH_ROWS):
                            chunks.append(pa.table([pa.array([r[i] for r in rows]) for i in range(len(columns))],
                                                   names=columns))
                except (psycopg.errors.LockNotAvailable, psycopg.errors.QueryCanceled):
                    raise TransientError(
                        f"{source.raw_table}: reading the look-back window gave up after LOCK_TIMEOUT"
                        f" ({settings.lock_timeout:g} s) or STATEMENT_TIMEOUT: another session locks the raw table"
                    ) from None
    except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError):
        log.warning("%s: keys Arrow cannot hold; reading from the checkpoint without a look-back window",
                    source.raw_table)
        return None
    try:
        landed = pa.concat_tables(chunks, promote_options="permissive") if chunks else None
    except (pa.ArrowInvalid, pa.ArrowTypeError):
        return None
    if landed is None:
        landed = pa.table({c: pa.array([], pa.null()) for c in columns})
    log.debug("%s: look-back window from %s: %d row(s) already landed", source.raw_table, start, landed.num_rows)
    landed = landed.rename_columns([*source.primary_key, _KNOWN_CURSOR])
    return LateRowWindow(source, at, start, landed)
