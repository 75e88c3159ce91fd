"""Landing: one dlt pipeline per asset reads its source tables and merges them into the raw schema."""

from __future__ import annotations

import datetime as dt
import hashlib
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import dlt
import pyarrow as pa
from dlt.common.destination.exceptions import SchemaUpdateError
from dlt.common.exceptions import TransientException as DltTransientException
from dlt.common.pipeline import LoadInfo
from dlt.pipeline.exceptions import PipelineStepFailed

from assets.errors import PermanentError, SourceTableMissing, SyncError, TransientError
from assets.spec import AssetSpec, SourceTable
from runtime.bigquery import BigQueryClients, TableReader
from runtime.postgres import Endpoint
from runtime.settings import Settings

# Builds find the rows each load brought by `_dlt_load_id`; dlt leaves it off Arrow rows unless
# asked. Telemetry is off: the pipeline never talks to anything but BigQuery and Postgres.
os.environ["NORMALIZE__PARQUET_NORMALIZER__ADD_DLT_LOAD_ID"] = "true"
os.environ.setdefault("RUNTIME__DLTHUB_TELEMETRY", "false")

#: Called with (raw table, rows read so far) while a table is being read.
Progress = Callable[[str, int], None]


@dataclass
class LandResult:
    """What landing an asset's sources did: rows read and loaded per raw table, checkpoints."""

    rows_read: dict[str, int] = field(default_factory=dict)
    rows_loaded: dict[str, int] = field(default_factory=dict)
    bytes_read: int = 0
    checkpoint_before: dict[str, str | None] = field(default_factory=dict)
    checkpoint_after: dict[str, str | None] = field(default_factory=dict)
    load_ids: list[str] = field(default_factory=list)


def pipeline_name(spec: AssetSpec) -> str:
    return f"gong_sync__{spec.name}"


def open_pipeline(spec: AssetSpec, settings: Settings, url: str) -> dlt.Pipeline:
    """The asset's dlt pipeline; its working folder is per destination so states never mix."""
    endpoint = Endpoint.parse(url)
    where = hashlib.sha256(f"{endpoint}|{settings.raw_schema}".encode()).hexdigest()[:12]
    return dlt.pipeline(
        pipeline_name=pipeline_name(spec),
        pipelines_dir=str(settings.pipelines_dir / where),
        destination=dlt.destinations.postgres(credentials=url),
        dataset_name=settings.raw_schema,
    )


def _checkpoint(pipeline: dlt.Pipeline, source: SourceTable) -> str | None:
    state = pipeline.state.get("sources", {}).get(pipeline.default_schema_name or pipeline.pipeline_name, {})
    value = state.get("resources", {}).get(source.raw_table, {}).get("incremental", {}).get(source.cursor, {}).get("last_value")
    if value is None:
        return None
    if isinstance(value, dt.datetime):
        return value.astimezone(dt.timezone.utc).isoformat(timespec="microseconds")
    return str(value)


def _resource(source: SourceTable, reader: TableReader, progress: Progress | None):
    @dlt.resource(
        name=source.raw_table,
        primary_key=source.primary_key,
        write_disposition={"disposition": "merge", "strategy": "delete-insert"},
    )
    def rows(
        cursor=dlt.sources.incremental(source.cursor, initial_value=None, range_start="closed"),  # noqa: B008
    ) -> Iterator[pa.Table]:
        # start_value is the last checkpoint; None on the first run, which reads all history.
        for table in reader.read(source.columns, source.cursor, cursor.start_value):
            if progress:
                progress(source.raw_table, reader.stats.rows)
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
) -> LandResult:
    """Read each source table past its checkpoint and merge it into the raw schema.

    The checkpoint (dlt state) is written to Postgres in the same load as the rows, so it is never
    ahead of the data. A load package left by a killed run is finished first: dlt would
    otherwise load only it and skip extraction.
    """
    pipeline = open_pipeline(spec, settings, url)
    result = LandResult()
    readers = {s.raw_table: TableReader(clients, settings.dataset(s.dataset), s.table) for s in spec.sources}
    for source in spec.sources:
        readers[source.raw_table].schema()  # fail fast, naming the table, when it does not exist
        result.checkpoint_before[source.raw_table] = _checkpoint(pipeline, source)
    try:
        if pipeline.has_pending_data:
            _count(pipeline, pipeline.run(), result)
        resources = [_resource(s, readers[s.raw_table], progress) for s in spec.sources]
        info = pipeline.run(resources, loader_file_format="parquet", refresh="drop_data" if full_refresh else None)
        _count(pipeline, info, result)
    except PipelineStepFailed as exc:
        raise _classify(spec, exc) from exc
    for source in spec.sources:
        result.rows_read[source.raw_table] = readers[source.raw_table].stats.rows
        result.bytes_read += readers[source.raw_table].stats.bytes
        result.checkpoint_after[source.raw_table] = _checkpoint(pipeline, source)
    return result


def _count(pipeline: dlt.Pipeline, info: LoadInfo, result: LandResult) -> None:
    result.load_ids.extend(info.loads_ids)
    normalized = pipeline.last_trace.last_normalize_info if pipeline.last_trace else None
    if normalized is None:
        return
    for table, count in normalized.row_counts.items():
        if not table.startswith("_dlt"):
            result.rows_loaded[table] = result.rows_loaded.get(table, 0) + count


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
    transient = isinstance(exc.exception, (SchemaUpdateError, DltTransientException))
    return TransientError(text) if transient else PermanentError(text)


__all__ = ["LandResult", "land", "open_pipeline", "pipeline_name", "SourceTableMissing"]
