"""Landing: one dlt pipeline per asset reads its source tables and merges them into the raw schema."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import shutil
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import dlt
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import ValidationError
from dlt.common.destination.exceptions import SchemaUpdateError
from dlt.common.exceptions import TransientException as DltTransientException
from dlt.common.pipeline import ExtractInfo
from dlt.destinations.impl.postgres.configuration import PostgresCredentials
from dlt.pipeline.exceptions import PipelineStepFailed

from assets.errors import Cancelled, PermanentError, SourceTableMissing, SyncError, TransientError
from assets.spec import AssetSpec, SourceTable
from runtime import dlt_setup  # noqa: F401 - configures dlt for this process before any pipeline
from runtime import process_memory  # noqa: F401 - malloc arenas, before any asset's thread
from runtime.bigquery import BigQueryClients, TableReader
from runtime.late_rows import LateRowWindow, open_window
from runtime.postgres import Endpoint
from runtime.retry import transient_cause
from runtime.schema import SourcePlan
from runtime.settings import Settings
from runtime.sources import resolve

#: Called with (raw table, rows read so far) while a table is being read.
Progress = Callable[[str, int], None]
#: Called with (source, its BigQuery columns) before reading; returns how to land them.
Evolve = Callable[[SourceTable, list], "SourcePlan"]
#: Called with (source, rejected rows) for rows that fail the source's row model; each rejected
#: row is (row key, primary key or None, the row, the validation errors). Returns how many were
#: new dead letters (a row read again at the checkpoint's boundary is already there).
Rejects = Callable[[SourceTable, list[tuple[str, dict | None, dict, list]]], int]

log = logging.getLogger("gong_sync.load")


def validate(table: pa.Table, source: SourceTable, batch_size: int) -> tuple[pa.Table, list]:
    """Split a batch into rows the source's model accepts and rejected rows with their errors.

    Validation runs BATCH_SIZE rows at a time so a large Arrow batch never becomes one big list
    of dicts; sources without a model pass through untouched, at no cost.
    """
    model = source.row_model
    if model is None:
        return table, []
    keep: list[int] = []
    rejects: list[tuple[str, dict | None, dict, list]] = []
    for offset in range(0, table.num_rows, batch_size):
        for i, row in enumerate(table.slice(offset, batch_size).to_pylist()):
            try:
                model.model_validate(row)
            except ValidationError as exc:
                pk = {k: row.get(k) for k in source.primary_key}
                whole = all(v not in (None, "") for v in pk.values())
                key_text = json.dumps(pk if whole else row, sort_keys=True, default=str)
                errors = [
                    {"field": ".".join(map(str, e["loc"])), "error": "missing" if e.get("input") is None else e["msg"]}
                    for e in exc.errors()
                ]
                rejects.append((hashlib.sha256(key_text.encode()).hexdigest(), pk if whole else None, row, errors))
            else:
                keep.append(offset + i)
    # Typed indices: an empty list would infer Arrow's null type, which `take` has no kernel for.
    return (table if not rejects else table.take(pa.array(keep, pa.int64()))), rejects


#: Postgres text cannot hold U+0000; such values land without it (see `scrub_nul`).
NUL = "\x00"


#: The JSON escape of NUL: valid JSON, which Postgres's jsonb still refuses.
JSON_NUL = "\\u0000"


def scrub_nul(table: pa.Table, source: SourceTable, json_text: set[str] = frozenset()) -> tuple[pa.Table, list]:
    """Remove NUL characters from text values, the one thing a valid source string can hold that
    Postgres text cannot (and, in JSON text, its escape `\\u0000`, which jsonb refuses). The row
    lands without them; a dead letter keeps the original (escaped) with the reason, so nothing is
    changed silently. Costs one vectorized scan per text column."""
    columns = dict(zip(table.column_names, table.columns))
    hit = None
    for name, column in columns.items():
        if not (pa.types.is_string(column.type) or pa.types.is_large_string(column.type)):
            continue
        for needle in (NUL, JSON_NUL) if name in json_text else (NUL,):
            found = pc.fill_null(pc.match_substring(columns[name], needle), False)
            if pc.any(found).as_py():
                hit = found if hit is None else pc.or_(hit, found)
                columns[name] = pc.replace_substring(columns[name], needle, "")
    if hit is None:
        return table, []
    repaired = []
    for row in table.filter(hit).to_pylist():
        fields = sorted(k for k, v in row.items() if isinstance(v, str) and (NUL in v or (k in json_text and JSON_NUL in v)))
        pk = {k: row.get(k) for k in source.primary_key}
        key = json.dumps({"repaired": pk}, sort_keys=True, default=str)
        repaired.append((hashlib.sha256(key.encode()).hexdigest(), pk, row,
                         [{"field": f, "error": "NUL character removed; the row landed without it"} for f in fields]))
    return pa.Table.from_arrays(list(columns.values()), names=list(columns)), repaired


@dataclass
class LandResult:
    """What landing an asset's sources did: rows read and loaded per raw table, checkpoints."""

    rows_read: dict[str, int] = field(default_factory=dict)
    rows_rejected: dict[str, int] = field(default_factory=dict)
    #: Rows held back because their cursor was in the future (also in rows_rejected).
    rows_future: dict[str, int] = field(default_factory=dict)
    #: Rows found below the checkpoint by the look-back window, not landed before (LATE_ROW_WINDOW).
    rows_late: dict[str, int] = field(default_factory=dict)
    stand_ins: list[SourceTable] = field(default_factory=list)
    #: The reader of each source table read (raw table → reader), for reconciliation.
    readers: dict[str, TableReader] = field(default_factory=dict)
    rows_loaded: dict[str, int] = field(default_factory=dict)
    bytes_read: int = 0
    checkpoint_before: dict[str, str | None] = field(default_factory=dict)
    checkpoint_after: dict[str, str | None] = field(default_factory=dict)


def pipeline_name(spec: AssetSpec) -> str:
    return f"gong_sync__{spec.name}"


def _destination(url: str, settings: Settings) -> str:
    """Which raw dataset a pipeline lands in (server, database, schema), without the password."""
    return f"{Endpoint.parse(url)}|{settings.raw_schema}"


def open_pipeline(spec: AssetSpec, settings: Settings, url: str) -> dlt.Pipeline:
    """The asset's dlt pipeline; its working folder is per destination so states never mix."""
    where = hashlib.sha256(_destination(url, settings).encode()).hexdigest()[:12]
    return dlt.pipeline(
        pipeline_name=pipeline_name(spec),
        pipelines_dir=str(settings.pipelines_dir / where),
        destination=dlt.destinations.postgres(credentials=_credentials(url)),
        dataset_name=settings.raw_schema,
    )


def _credentials(url: str) -> PostgresCredentials:
    """dlt's credentials for the URL. A URL without a password is valid for libpq (trust or peer
    authentication, ~/.pgpass, PGPASSWORD) but dlt insists on one: an empty one lets libpq decide."""
    credentials = PostgresCredentials()
    credentials.parse_native_representation(url)
    if credentials.password is None:
        credentials.password = ""
    return credentials


def fresh_pipeline(spec: AssetSpec, settings: Settings, url: str) -> dlt.Pipeline:
    """The asset's pipeline with nothing left over from an interrupted run.

    Postgres holds the truth: the raw rows, and dlt's state, which counts only once the load that
    carried it completed (dlt reads it joined with its finished loads). The working folder is a
    cache. A package a killed run left behind is never finished: it may be older than what
    another machine has loaded since, or cut short; it is discarded with the folder, and the
    asset reads again from the checkpoint Postgres holds. Rows the package had partly loaded come
    again and merge on their key (or, on a first load, are settled by `secure_raw_table`).
    """
    try:
        pipeline = open_pipeline(spec, settings, url)
        leftovers = len(pipeline.list_extracted_load_packages()) + len(pipeline.list_normalized_load_packages())
        if not leftovers:
            return pipeline
        reason = f"{leftovers} load package(s) left by an interrupted run"
        folder = pipeline.working_dir
    except Exception as exc:  # noqa: BLE001 - a folder a kill left half-written: any error means unreadable
        reason = f"its working folder is unreadable ({type(exc).__name__})"
        where = hashlib.sha256(_destination(url, settings).encode()).hexdigest()[:12]
        folder = str(settings.pipelines_dir / where / pipeline_name(spec))
    log.warning("%s: discarding %s; reading again from the checkpoint Postgres holds", spec.name, reason)
    shutil.rmtree(folder, ignore_errors=True)
    return open_pipeline(spec, settings, url)


def forget_loaded_packages(pipeline: dlt.Pipeline) -> None:
    """Delete the files of completed loads: the rows are in Postgres, and a second copy of the
    data on disk grows without bound (and is personal data)."""
    storage = pipeline._get_load_storage()  # dlt has no public call for it
    for load_id in storage.list_loaded_packages():
        storage.delete_loaded_package(load_id)


def _checkpoint(pipeline: dlt.Pipeline, source: SourceTable) -> str | None:
    state = pipeline.state.get("sources", {}).get(pipeline.default_schema_name or pipeline.pipeline_name, {})
    value = state.get("resources", {}).get(source.raw_table, {}).get("incremental", {}).get(source.cursor, {}).get("last_value")
    if value is None:
        return None
    if isinstance(value, dt.datetime):
        return value.astimezone(dt.timezone.utc).isoformat(timespec="microseconds")
    return str(value)


def split_future(table: pa.Table, source: SourceTable, latest: dt.datetime) -> tuple[pa.Table, list]:
    """Rows whose cursor is later than `latest` (now plus FUTURE_CURSOR_TOLERANCE) as rejects: one
    such value would become the checkpoint and hide every row after it for good."""
    if source.cursor not in table.column_names or table.num_rows == 0:
        return table, []
    column = table[source.cursor]
    if not pa.types.is_timestamp(column.type):
        return table, []
    future = pc.fill_null(pc.greater(column, pa.scalar(latest, column.type)), False)
    if not pc.any(future).as_py():
        return table, []
    rejects = []
    for row in table.filter(future).to_pylist():
        pk = {k: row.get(k) for k in source.primary_key}
        key = json.dumps({"future": pk, "at": row.get(source.cursor)}, sort_keys=True, default=str)
        rejects.append((hashlib.sha256(key.encode()).hexdigest(), pk, row, [{
            "field": source.cursor,
            "error": f"in the future: {row.get(source.cursor)} is later than now plus FUTURE_CURSOR_TOLERANCE;"
                     " not landed, the checkpoint stays",
        }]))
    return table.filter(pc.invert(future)), rejects


def _resource(
    source: SourceTable, reader: TableReader, plan: SourcePlan, batch_size: int, progress: Progress | None,
    reject: Rejects | None, counts: dict[str, int], latest: dt.datetime, future: dict[str, int],
    cancel: threading.Event, window: LateRowWindow | None, late: dict[str, int],
):
    @dlt.resource(
        name=source.raw_table,
        primary_key=source.primary_key,
        # The first load appends (no staging copy, no dedup pass); later ones merge on the key.
        write_disposition="append" if plan.first_load else {"disposition": "merge", "strategy": "delete-insert"},
        # Types come from BigQuery's schema (runtime/schema.py), not from whatever Arrow a batch has.
        columns=plan.hints,
    )
    def rows(
        # With a look-back window, dlt starts `lag` seconds below the checkpoint and keeps the
        # checkpoint moving forward only; the window's rows already landed are dropped below.
        cursor=dlt.sources.incremental(  # noqa: B008
            source.cursor, initial_value=None, range_start="closed",
            lag=(window.checkpoint - window.start).total_seconds() if window else None,
        ),
    ) -> Iterator[pa.Table]:
        # The last checkpoint (less the window); None on the first run, which reads all history.
        since = window.start if window else cursor.start_value
        for table in reader.read(source.columns, source.cursor, since):
            if cancel.is_set():  # a safe point: nothing of this extract is loaded, the checkpoint stays
                raise Cancelled("cancelled by the operator while reading; nothing of this read was loaded")
            if progress:
                progress(source.raw_table, reader.stats.rows)
            table, rejects = validate(plan.adapt(table), source, batch_size)
            table, repaired = scrub_nul(table, source, plan.json_text)
            table, ahead = split_future(table, source, latest)
            if window:
                table, found = window.drop_landed(table)
                late[source.raw_table] = late.get(source.raw_table, 0) + found
            if ahead:
                future[source.raw_table] = future.get(source.raw_table, 0) + len(ahead)
            rejects += repaired + ahead
            if rejects and reject:
                counts[source.raw_table] = counts.get(source.raw_table, 0) + reject(source, rejects)
            if table.num_rows:  # a batch whose every row was held back has nothing to load
                yield table

    return rows()


def land(
    spec: AssetSpec,
    settings: Settings,
    clients: BigQueryClients,
    url: str,
    *,
    full_refresh: bool = False,
    progress: Progress | None = None,
    reject: Rejects | None = None,
    evolve: Evolve | None = None,
    cancel: threading.Event | None = None,
) -> LandResult:
    """Read each source table past its checkpoint and merge it into the raw schema.

    The checkpoint (dlt state) is written to Postgres in the same load as the rows, so it is never
    ahead of the data. A load package left by a killed run is finished first: dlt would
    otherwise load only it and skip extraction.
    """
    pipeline = fresh_pipeline(spec, settings, url)
    result = LandResult()
    readers: dict[str, TableReader] = {}
    plans: dict[str, SourcePlan] = {}
    for source in spec.sources:
        where = resolve(source, settings, clients)
        if where.note:
            log.warning("%s: source table %s.%s: %s", spec.name, settings.dataset(source.dataset), where.table, where.note)
        if where.stand_in:
            result.stand_ins.append(source)
            continue
        reader = TableReader(clients, where.dataset, where.table)
        try:
            fields = reader.schema()  # fails naming the table when it does not exist
        except SourceTableMissing:
            if not source.stand_in:
                raise
            # An optional table (not in every account's ERD): the build finds nothing in it.
            log.warning("%s: source table %s does not exist: %s stays empty", spec.name, reader.ref, source.raw_table)
            result.stand_ins.append(source)
            continue
        readers[source.raw_table] = reader
        if source.columns is not None:
            fields = [f for f in fields if f.name in source.columns]
        plans[source.raw_table] = evolve(source, fields) if evolve else SourcePlan()
    read = [s for s in spec.sources if s.raw_table in readers]
    latest = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=settings.future_cursor_tolerance)
    try:
        # What run() would do, step by step: restore state from Postgres on a new machine (or
        # after discarding a killed run's leftovers), then extract, normalize and load.
        pipeline.sync_destination()
        for source in read:  # after the restore: a new machine reads the checkpoint Postgres holds
            result.checkpoint_before[source.raw_table] = _checkpoint(pipeline, source)
        if full_refresh:
            _forget_cursors(pipeline, read)
        windows = {} if full_refresh else {
            s.raw_table: open_window(settings, s, result.checkpoint_before[s.raw_table]) for s in read
        }
        resources = [
            _resource(s, readers[s.raw_table], plans[s.raw_table], settings.batch_size, progress, reject,
                      result.rows_rejected, latest, result.rows_future, cancel or threading.Event(),
                      windows.get(s.raw_table), result.rows_late)
            for s in read
        ]
        if resources:
            extracted = pipeline.extract(resources, loader_file_format="parquet")
            if not full_refresh and _data_rows(extracted) == 0:
                # Nothing past the checkpoint: the package holds only dlt's unchanged state. Deleting
                # it (and restoring the state it started from) spares a load round trip per asset.
                pipeline.abort_packages()
            else:
                normalized = pipeline.normalize()
                for table, count in normalized.row_counts.items():
                    if not table.startswith("_dlt"):
                        result.rows_loaded[table] = result.rows_loaded.get(table, 0) + count
                _load(pipeline, url, settings, merges=any(not plans[s.raw_table].first_load for s in read))
                forget_loaded_packages(pipeline)
    except PipelineStepFailed as exc:
        raise _classify(spec, exc) from exc
    result.readers = readers
    for source in read:
        result.rows_read[source.raw_table] = readers[source.raw_table].stats.rows
        result.bytes_read += readers[source.raw_table].stats.bytes
        result.checkpoint_after[source.raw_table] = _checkpoint(pipeline, source)
    return result


def _forget_cursors(pipeline: dlt.Pipeline, sources: list[SourceTable]) -> None:
    """A full refresh reads every row again and merges it on its key: the raw tables are never
    emptied (dlt's own refresh truncates them first, in a transaction of its own, and a kill right
    after left them empty under a checkpoint that was not). Only the cursors are forgotten, in the
    local state; the state in Postgres moves with the load that completes."""
    with pipeline.managed_state() as state:
        resources = state.get("sources", {}).get(pipeline.default_schema_name or pipeline.pipeline_name, {})
        for source in sources:
            resources.get("resources", {}).get(source.raw_table, {}).pop("incremental", None)


def _data_rows(info: ExtractInfo) -> int:
    """Rows an extract wrote for the source tables (dlt's own state table not counted)."""
    return sum(
        metrics.items_count
        for load_id in info.loads_ids
        for step in info.metrics.get(load_id, [])
        for table, metrics in step["table_metrics"].items()
        if not table.startswith("_dlt")
    )


#: Datasets whose dlt tables this process has seen created. The first load into a new dataset
#: creates dlt's system tables, and the first merge creates the staging dataset beside it; two
#: pipelines doing either at once collide on CREATE (a duplicate pg_type), so those loads take
#: turns and later ones run in parallel. A first load appends: the staging dataset appears only
#: with the next run's merges, which is why it is tracked on its own.
_READY: set[str] = set()
_FIRST_LOAD = threading.Lock()


def _load(pipeline: dlt.Pipeline, url: str, settings: Settings, *, merges: bool) -> None:
    dataset = _destination(url, settings)
    needed = {dataset, f"{dataset}|staging"} if merges else {dataset}
    if not needed <= _READY:
        with _FIRST_LOAD:
            # Checked again under the lock: the loads that queued behind the first one (on a first
            # run, every root asset's) need not take turns once it has created the tables.
            if not needed <= _READY:
                pipeline.load()
                _READY.update(needed)
                return
    pipeline.load()


def _classify(spec: AssetSpec, exc: PipelineStepFailed) -> SyncError:
    """Unwrap dlt's step failure into our tree, keeping whether a retry can help."""
    cause: BaseException | None = exc.exception
    while cause is not None and not isinstance(cause, SyncError) and cause.__cause__ is not None:
        cause = cause.__cause__
    if isinstance(cause, SyncError):
        return cause
    text = f"{spec.name}: {exc.step} step failed: {type(exc.exception).__name__}: {exc.exception}"
    # dlt says a failed schema update is safe to retry (two pipelines creating dlt's own tables in
    # one dataset at once); its transient exceptions are network and server hiccups.
    transient = isinstance(exc.exception, (SchemaUpdateError, DltTransientException)) or transient_cause(exc.exception)
    return TransientError(text) if transient else PermanentError(text)


