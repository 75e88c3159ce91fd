"""Replay dead letters: re-validate stored rows, land the ones that now pass, rebuild the asset.

A row goes to `dead_letters` when it fails its source's row model. Once the model is relaxed, or an
operator has corrected the stored row, `materialize --replay-dead-letters --asset X` re-validates
every dead letter of X against the current model. Rows that pass are merged into the raw table on
their primary key through the asset's own dlt pipeline (its checkpoints untouched), the asset is
rebuilt incrementally, and those rows leave `dead_letters`. A row whose key has since landed in a
version at least as new (by the source's cursor) is superseded: it is removed without landing, so
a replay never puts an old version over a newer one. Rows that still fail stay, with their errors
brought up to date. Downstream assets pick the rows up on their next run, like any new raw row.
"""

from __future__ import annotations

import datetime as dt
import decimal
import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field

import dlt
import psycopg
import pyarrow as pa
from dlt.common.libs.pyarrow import columns_to_arrow
from psycopg import sql
from pydantic import ValidationError

from assets.errors import PermanentError
from assets.spec import AssetSpec, SourceTable
from graph import AssetGraph
from runtime.build import build_asset
from runtime.load import fresh_pipeline
from runtime.deletes import DeleteGuard
from runtime.postgres import Catalog, secure_raw_table
from runtime.retry import with_retries
from runtime.session import Session
from runtime.settings import Settings

log = logging.getLogger("gong_sync.dead_letters")


@dataclass
class ReplayResult:
    """What replaying one asset's dead letters did."""

    asset: str
    replayed: int = 0
    superseded: int = 0
    #: (primary key or row key, errors) of rows that still fail the model.
    still_failing: list[tuple[str, list]] = field(default_factory=list)
    rows_written: int = 0

    def summary(self) -> str:
        text = (
            f"{self.asset}: {self.replayed} replayed, {self.superseded} superseded by newer rows, "
            f"{len(self.still_failing)} still failing; {self.rows_written} destination row(s) written"
        )
        for key, errors in self.still_failing:
            problems = ", ".join(f"{e.get('field')}: {e.get('error')}" for e in errors)
            text += f"\n  still failing: {key} ({problems})"
        return text


@dataclass
class _Letter:
    id: int
    key: str
    row: dict


def replay_dead_letters(graph: AssetGraph, names: list[str], settings: Settings, session: Session) -> list[ReplayResult]:
    """Replay the dead letters of each named asset, in graph order, inside one session (run lock held)."""
    return [_replay_asset(graph.spec(name), settings, session) for name in names]


def _replay_asset(spec: AssetSpec, settings: Settings, session: Session) -> ReplayResult:
    result = ReplayResult(asset=spec.name)
    catalog = session.catalog
    passing: dict[SourceTable, list[_Letter]] = {}
    done: list[int] = []
    for source in spec.sources:
        if source.row_model is None:
            continue
        letters = with_retries(settings, f"{spec.name}: read dead letters", lambda s=source: _letters(session, spec, s))
        ok: list[_Letter] = []
        for letter in letters:
            errors = _errors(source, letter.row)
            if errors:
                result.still_failing.append((letter.key, errors))
                with_retries(settings, f"{spec.name}: update dead letters", lambda i=letter.id, e=errors: _set_errors(session, i, e))
            else:
                ok.append(letter)
        stale = with_retries(settings, f"{spec.name}: compare with raw", lambda s=source, o=ok: _superseded(session, s, o))
        result.superseded += len(stale)
        done += list(stale)
        passing[source] = [letter for letter in ok if letter.id not in stale]
    to_land = {source: letters for source, letters in passing.items() if letters}
    if to_land:
        with_retries(settings, f"{spec.name}: replay land", lambda: _land(spec, settings, session, to_land))
        built = with_retries(settings, f"{spec.name}: replay build", lambda: _build(spec, settings, session, catalog))
        result.rows_written = built.upserted
        result.replayed = sum(len(v) for v in to_land.values())
        done += [letter.id for letters in to_land.values() for letter in letters]
    if done:
        with_retries(settings, f"{spec.name}: remove dead letters", lambda: _remove(session, done))
    # The caller prints the summary (the CLI to stdout); logging it too showed every line twice.
    log.debug("%s", result.summary())
    return result


def _errors(source: SourceTable, row: dict) -> list[dict]:
    """The current model's errors for a stored row, in the shape dead letters keep them."""
    try:
        source.row_model.model_validate(row)  # type: ignore[union-attr]
    except ValidationError as exc:
        return [
            {"field": ".".join(map(str, e["loc"])), "error": "missing" if e.get("input") is None else e["msg"]}
            for e in exc.errors()
        ]
    return []


def _letters(session: Session, spec: AssetSpec, source: SourceTable) -> list[_Letter]:
    with session.pool.connection() as conn:
        rows = conn.execute(
            sql.SQL(
                "SELECT id, coalesce(primary_key::text, row_key), row FROM {} WHERE asset = %s AND source_table = %s ORDER BY id"
            ).format(session.catalog.dead_letters),
            (spec.name, source.table),
        ).fetchall()
    return [_Letter(id=r[0], key=r[1], row=r[2]) for r in rows]


def _set_errors(session: Session, letter_id: int, errors: list[dict]) -> None:
    with session.pool.connection() as conn:
        conn.execute(
            sql.SQL("UPDATE {} SET errors = %s WHERE id = %s").format(session.catalog.dead_letters),
            (json.dumps(errors), letter_id),
        )


def _superseded(session: Session, source: SourceTable, letters: list[_Letter]) -> set[int]:
    """Dead letters whose key already landed with a cursor at least as new as theirs."""
    if not letters:
        return set()
    catalog = session.catalog
    with session.pool.connection() as conn:
        if not _raw_exists(conn, catalog, source.raw_table):
            return set()
        same_key = sql.SQL(" AND ").join(
            sql.SQL("r.{}::text = d.row ->> {}").format(sql.Identifier(k), sql.Literal(k)) for k in source.primary_key
        )
        rows = conn.execute(
            sql.SQL(
                "SELECT d.id FROM {dl} d JOIN {raw} r ON {same_key}"
                " WHERE d.id = ANY(%s) AND r.{cursor} >= (d.row ->> {cursor_name})::timestamptz"
            ).format(
                dl=catalog.dead_letters, raw=catalog.raw_table(source.raw_table), same_key=same_key,
                cursor=sql.Identifier(source.cursor), cursor_name=sql.Literal(source.cursor),
            ),
            ([letter.id for letter in letters],),
        ).fetchall()
    return {r[0] for r in rows}


def _raw_exists(conn: psycopg.Connection, catalog: Catalog, table: str) -> bool:
    return conn.execute("SELECT to_regclass(%s) IS NOT NULL", (f'"{catalog.raw_name}"."{table}"',)).fetchone()[0]


def _land(spec: AssetSpec, settings: Settings, session: Session, to_land: dict[SourceTable, list[_Letter]]) -> None:
    """Merge the rows into their raw tables through the asset's dlt pipeline, typed as dlt knows them."""
    pipeline = fresh_pipeline(spec, settings, session.url)
    pipeline.sync_destination()
    if pipeline.has_pending_data:  # a package an interrupted run left goes first, as in a run
        pipeline.normalize()
        pipeline.load()
    resources = []
    for source, letters in to_land.items():
        columns = pipeline.default_schema.tables.get(source.raw_table, {}).get("columns") if pipeline.default_schema_name else None
        if not columns:
            raise PermanentError(
                f"{spec.name}: raw table {source.raw_table} has not landed yet; run `materialize --asset {spec.name}` first"
            )
        resources.append(_resource(source, _arrow(columns, pipeline, [letter.row for letter in letters])))
    pipeline.extract(resources, loader_file_format="parquet")
    pipeline.normalize()
    pipeline.load()


def _resource(source: SourceTable, table: pa.Table):  # noqa: ANN202 - a dlt resource
    # The resource of a normal run, minus its incremental cursor: the checkpoint does not move.
    @dlt.resource(
        name=source.raw_table,
        primary_key=source.primary_key,
        write_disposition={"disposition": "merge", "strategy": "delete-insert"},
    )
    def rows() -> Iterator[pa.Table]:
        yield table

    return rows()


def _arrow(columns: dict, pipeline: dlt.Pipeline, rows: list[dict]) -> pa.Table:
    """The stored JSON rows as an Arrow table with the raw table's column types."""
    kept = {name: col for name, col in columns.items() if not name.startswith("_dlt_") and "data_type" in col}
    schema = columns_to_arrow(kept, pipeline.destination.capabilities(), "UTC")
    values = {name: [_value(col["data_type"], row.get(name)) for row in rows] for name, col in kept.items()}
    return pa.Table.from_pydict(values, schema=schema)


def _value(data_type: str, value: object) -> object:
    """A JSON value back in the Python type its column holds (dead letters keep rows as JSON text)."""
    if value is None:
        return None
    if data_type == "timestamp" and isinstance(value, str):
        return dt.datetime.fromisoformat(value)
    if data_type == "date" and isinstance(value, str):
        return dt.date.fromisoformat(value[:10])
    if data_type == "time" and isinstance(value, str):
        return dt.time.fromisoformat(value)
    if data_type == "decimal":
        return decimal.Decimal(str(value))
    if data_type == "json" and not isinstance(value, str):
        return json.dumps(value)
    return value


def _build(spec: AssetSpec, settings: Settings, session: Session, catalog: Catalog):  # noqa: ANN202 - BuildResult
    with session.pool.connection() as conn:
        for source in spec.sources:
            if _raw_exists(conn, catalog, source.raw_table):
                secure_raw_table(conn, catalog, source)
        return build_asset(conn, catalog, spec, settings, full=False, guard=DeleteGuard.of(settings))


def _remove(session: Session, ids: list[int]) -> None:
    with session.pool.connection() as conn:
        conn.execute(sql.SQL("DELETE FROM {} WHERE id = ANY(%s)").format(session.catalog.dead_letters), (ids,))
