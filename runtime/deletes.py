"""Deletes that protect the app's work: counted, reported, and stopped when unusually many.

A source delete removes the app row, and the database cascades it into the app's own tables
(coaching sessions, analyses, reviews). Before deleting, the rows that would go with it are
counted in every table that references it, found from the catalog, as deep as the cascade goes.
A build that would delete more than a set share of its table deletes nothing and fails.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import psycopg
from psycopg import sql

from assets.errors import BuildError, PermanentError
from assets.spec import AssetSpec
from runtime.postgres import Catalog

log = logging.getLogger("gong_sync.deletes")

#: How deep the count follows cascades (app tables pointing at app tables pointing at …).
MAX_DEPTH = 6
_TO_DELETE = sql.Identifier("_gs_delete")


class MassDeleteBlocked(PermanentError):
    """A build would delete an unusual share of an app table; nothing was deleted."""


@dataclass(frozen=True)
class DeleteGuard:
    """The mass-delete rule of one run (MASS_DELETE_MAX_SHARE, MASS_DELETE_MIN_ROWS, the flag)."""

    max_share: float = 0.05
    min_rows: int = 100
    allowed: bool = False

    @classmethod
    def of(cls, settings, allowed: bool = False) -> DeleteGuard:  # noqa: ANN001 - Settings
        return cls(max_share=settings.mass_delete_max_share, min_rows=settings.mass_delete_min_rows, allowed=allowed)

    def blocks(self, deleting: int, total: int) -> bool:
        return not self.allowed and total >= self.min_rows and deleting > self.max_share * total


@dataclass
class Deleted:
    rows: int = 0
    #: `schema.table` → rows deleted with them by a cascade; `schema.table.column set NULL` → rows.
    cascade: dict[str, int] = field(default_factory=dict)


def delete_rows(conn: psycopg.Connection, catalog: Catalog, spec: AssetSpec, gone: sql.Composable,
                build: Callable, guard: DeleteGuard) -> Deleted:
    """Delete the app rows `gone` selects (by identity), after counting and guarding."""
    keys = sql.SQL(", ").join(map(sql.Identifier, spec.identity))
    app = catalog.dest_table(spec.table)
    # Only rows still there: a cascade from another table may have taken some already.
    build.run(conn, sql.SQL(
        "CREATE TEMP TABLE {} ON COMMIT DROP AS SELECT DISTINCT {} FROM ({}) g ({}) JOIN {} USING ({})"
    ).format(_TO_DELETE, keys, gone, keys, app, keys))
    result = Deleted()
    deleting = conn.execute(sql.SQL("SELECT count(*) FROM {}").format(_TO_DELETE)).fetchone()[0]
    if not deleting:
        return result
    where = f"{catalog.dest_name}.{spec.table}"
    rows = sql.SQL("SELECT t.* FROM {} t JOIN {} d USING ({})").format(app, _TO_DELETE, keys)
    # A link the pipeline derives (an email's opportunity) is unlinked, not cascaded: the email's
    # own source row lives on, and so must its app row, with its uuid and whatever hangs off it.
    unlinked = _unlink(conn, catalog, spec.table, rows)
    result.cascade = {**unlinked, **count_cascade(conn, catalog.dest_name, spec.table, rows)}
    going = ", ".join(f"{table} {n}" for table, n in sorted(result.cascade.items())) or "nothing else"
    total = conn.execute(sql.SQL("SELECT count(*) FROM {}").format(app)).fetchone()[0]
    if guard.blocks(deleting, total):
        raise MassDeleteBlocked(
            f"{spec.name}: would delete {deleting} of {total} rows ({deleting / total:.1%}) of {where}, more than"
            f" MASS_DELETE_MAX_SHARE ({guard.max_share:.0%}); with them would go: {going}. Nothing was deleted."
            f" If the source really lost these rows, allow it for one run:"
            f" materialize --asset {spec.name} --allow-mass-delete"
        )
    result.rows = conn.execute(
        sql.SQL("DELETE FROM {} t USING {} d WHERE {}").format(
            app, _TO_DELETE,
            sql.SQL(" AND ").join(sql.SQL("t.{k} = d.{k}").format(k=sql.Identifier(k)) for k in spec.identity),
        )
    ).rowcount
    log.warning("%s: deleted %d row(s) of %s whose source rows are gone; with them went: %s",
                spec.name, result.rows, where, going)
    return result


def _unlink(conn: psycopg.Connection, catalog: Catalog, table: str, rows: sql.Composable) -> dict[str, int]:
    """Set NULL the nullable links other app tables hold to `rows`, where the pipeline writes the
    link itself (an asset's column): the referencing row is not gone from its source."""
    from assets import ALL_ASSETS

    written = {(s.table, c.name) for s in ALL_ASSETS for c in s.columns}
    unlinked = {}
    for child_schema, child, _, columns, referenced in _foreign_keys(conn, catalog.dest_name, table):
        if child_schema != catalog.dest_name or len(columns) != 1 or (child, columns[0]) not in written:
            continue
        nullable = not conn.execute(
            "SELECT attnotnull FROM pg_attribute WHERE attrelid = %s::regclass AND attname = %s",
            (f'"{child_schema}"."{child}"', columns[0]),
        ).fetchone()[0]
        if not nullable:
            continue
        n = conn.execute(sql.SQL("UPDATE {}.{} SET {c} = NULL WHERE {c} IN (SELECT p.{r} FROM ({}) p)").format(
            sql.Identifier(child_schema), sql.Identifier(child), rows,
            c=sql.Identifier(columns[0]), r=sql.Identifier(referenced[0]),
        )).rowcount
        if n:
            unlinked[f"{child_schema}.{child}.{columns[0]} set NULL"] = n
    return unlinked


def _foreign_keys(conn: psycopg.Connection, schema: str, table: str) -> list[tuple]:
    """(schema, table, on-delete action, referencing columns, referenced columns) of each FK to it."""
    return conn.execute(
        """SELECT n.nspname, r.relname, c.confdeltype,
                  array(SELECT a.attname::text FROM unnest(c.conkey) WITH ORDINALITY k (num, i)
                        JOIN pg_attribute a ON a.attrelid = c.conrelid AND a.attnum = k.num ORDER BY k.i),
                  array(SELECT a.attname::text FROM unnest(c.confkey) WITH ORDINALITY k (num, i)
                        JOIN pg_attribute a ON a.attrelid = c.confrelid AND a.attnum = k.num ORDER BY k.i)
           FROM pg_constraint c JOIN pg_class r ON r.oid = c.conrelid JOIN pg_namespace n ON n.oid = r.relnamespace
           WHERE c.contype = 'f' AND c.confrelid = %s::regclass
           ORDER BY n.nspname, r.relname, c.conname""",
        (f'"{schema}"."{table}"',),
    ).fetchall()


def count_cascade(conn: psycopg.Connection, schema: str, table: str, rows: sql.Composable) -> dict[str, int]:
    """Rows of every table that would go with `rows` of `schema.table`, following cascades down.

    A row reached along two paths (a coaching session of a call and of one of its speakers) is
    counted once. Rows whose reference would be set NULL are reported apart, unless a cascade
    takes them anyway. A reference that neither cascades nor sets NULL would make the delete
    fail: that is said before anything is deleted, naming the table.
    """
    going: dict[tuple[str, str], list[sql.Composable]] = {}
    nulled: dict[tuple[str, str, str], list[sql.Composable]] = {}
    _walk(conn, schema, table, rows, going, nulled, depth=0, path=(f"{schema}.{table}",))
    counts = {f"{s}.{t}": _distinct(conn, parts) for (s, t), parts in going.items()}
    for (s, t, columns), parts in nulled.items():
        kept = _distinct(conn, parts, minus=going.get((s, t), []))
        if kept:
            counts[f"{s}.{t}.{columns} set NULL"] = kept
    return {k: v for k, v in counts.items() if v}


def _distinct(conn: psycopg.Connection, parts: list[sql.Composable], minus: list[sql.Composable] = ()) -> int:
    """How many distinct rows (by ctid) the `SELECT ch.ctid …` queries `parts` find, less `minus`."""
    union = sql.SQL(" UNION ").join(parts)
    if minus:
        union = sql.SQL("({}) EXCEPT ({})").format(union, sql.SQL(" UNION ").join(minus))
    return conn.execute(sql.SQL("SELECT count(*) FROM ({}) x").format(union)).fetchone()[0]


def _walk(conn: psycopg.Connection, schema: str, table: str, rows: sql.Composable, going: dict, nulled: dict,
          *, depth: int, path: tuple[str, ...]) -> None:
    for child_schema, child, action, columns, referenced in _foreign_keys(conn, schema, table):
        where = sql.SQL("FROM {}.{} ch WHERE ({}) IN (SELECT {} FROM ({}) p)").format(
            sql.Identifier(child_schema), sql.Identifier(child),
            sql.SQL(", ").join(sql.SQL("ch.{}").format(sql.Identifier(c)) for c in columns),
            sql.SQL(", ").join(sql.SQL("p.{}").format(sql.Identifier(c)) for c in referenced), rows,
        )
        n = conn.execute(sql.SQL("SELECT count(*) {}").format(where)).fetchone()[0]
        if not n:
            continue
        name = f"{child_schema}.{child}"
        if action == "c":
            going.setdefault((child_schema, child), []).append(sql.SQL("SELECT ch.ctid {}").format(where))
            if depth < MAX_DEPTH and name not in path:
                _walk(conn, child_schema, child, sql.SQL("SELECT ch.* {}").format(where), going, nulled,
                      depth=depth + 1, path=(*path, name))
        elif action in ("n", "d"):
            nulled.setdefault((child_schema, child, ",".join(columns)), []).append(
                sql.SQL("SELECT ch.ctid {}").format(where)
            )
        else:
            raise BuildError(
                f"cannot delete from {path[0]}: {n} row(s) of {name} still reference the rows and its"
                f" foreign key ({', '.join(columns)}) does not cascade; nothing was deleted"
            )
