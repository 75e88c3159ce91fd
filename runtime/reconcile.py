"""Key reconciliation: rows the source no longer has, though nothing flagged them as deleted.

Fivetran keeps deleted rows and flags them (`_fivetran_deleted`), but a connector re-sync or a
manual clean-up can remove rows outright, and no cursor ever says so. Reconciliation reads only
the key columns of each source table (a Storage read), and marks raw rows whose key is gone as
deleted, with a new load-order number: the next build then removes their app rows through the
usual delete path (counted, reported, under the mass-delete guard).
"""

from __future__ import annotations

import logging

import psycopg
from psycopg import sql

from assets.spec import SourceTable
from runtime.bigquery import TableReader
from runtime.postgres import LOAD_ORDER, Catalog, table_exists

log = logging.getLogger("gong_sync.reconcile")


def reconcile_source(conn: psycopg.Connection, catalog: Catalog, source: SourceTable, reader: TableReader) -> int:
    """Mark the raw rows whose key the source table no longer holds; return how many."""
    if not table_exists(conn, catalog.raw_name, source.raw_table):
        return 0
    raw = catalog.raw_table(source.raw_table)
    keys = sql.SQL(", ").join(map(sql.Identifier, source.primary_key))
    with conn.transaction():
        conn.execute(sql.SQL("CREATE TEMP TABLE _gs_keys ON COMMIT DROP AS SELECT {} FROM {} LIMIT 0").format(keys, raw))
        with conn.cursor().copy(sql.SQL("COPY _gs_keys ({}) FROM STDIN").format(keys)) as copy:
            for batch in reader.read(source.primary_key, source.cursor, None):
                for row in zip(*(batch[k].to_pylist() for k in source.primary_key)):
                    copy.write_row(row)
        conn.execute("ANALYZE _gs_keys")
        flag = source.deleted_flags[0]
        marked = conn.execute(sql.SQL(
            "UPDATE {raw} r SET {flag} = true, {order} = nextval({seq}) WHERE NOT coalesce(r.{flag}, false)"
            " AND NOT EXISTS (SELECT 1 FROM _gs_keys k WHERE {match})"
        ).format(
            raw=raw, flag=sql.Identifier(flag), order=sql.Identifier(LOAD_ORDER), seq=sql.Literal(catalog.load_order_name),
            match=sql.SQL(" AND ").join(sql.SQL("k.{k} = r.{k}").format(k=sql.Identifier(k)) for k in source.primary_key),
        )).rowcount
    if marked:
        log.warning("%s.%s: %d row(s) no longer in the source are marked deleted; the build removes their app rows",
                    catalog.raw_name, source.raw_table, marked)
    return marked
