"""How this project sets up dlt for the process: imported by `runtime.load` before any pipeline.

dlt reads its settings from environment variables; the ones set here with `setdefault` are defaults
an operator can override with the same variable. `_dlt_load_id` is not optional: builds need it.
"""

from __future__ import annotations

import functools
import logging
import os

# Builds find the rows each load brought by `_dlt_load_id`; dlt leaves it off Arrow rows unless
# asked. Telemetry is off: the pipeline never talks to anything but BigQuery and Postgres.
os.environ["NORMALIZE__PARQUET_NORMALIZER__ADD_DLT_LOAD_ID"] = "true"
os.environ.setdefault("RUNTIME__DLTHUB_TELEMETRY", "false")
# Files of at most 100k rows, two load jobs at a time (for two cores); either can be overridden by
# its variable.
os.environ.setdefault("DATA_WRITER__FILE_MAX_ITEMS", "100000")
os.environ.setdefault("LOAD__WORKERS", "2")
# dlt writes its buffer as one Parquet row group once it holds 1,000 rows (default 5,000), so a
# group is 1,000 rows plus at most one read slice (2 MB). Each load job holds a row group and
# ADBC's COPY buffers for it, about five times its size: with 1-5 KB monologues a 5,000-row group
# made each of the two jobs hold 130 MB, 1,000 rows about half of that (bench/).
os.environ.setdefault("DATA_WRITER__BUFFER_MAX_ITEMS", "1000")


def _stream_load_files_into_copy() -> None:
    """dlt's ADBC loader hands `adbc_ingest` a generator of a load file's batches, and ADBC turns
    any generator into one Arrow table before its COPY: with 1-5 KB monologues a 100k-row file was
    300 MB in memory, twice over with two load workers (a 200k-transcript landing peaked at 1.9 GB).
    Given a RecordBatchReader, ADBC streams it batch by batch into the same one COPY. dlt's own
    switch (one COPY per row group) bounds memory too, but each COPY issues a BEGIN inside the
    open transaction: a server-log WARNING per row group."""
    import itertools
    import types

    import pyarrow as pa
    from adbc_driver_manager import dbapi

    ingest = dbapi.Cursor.adbc_ingest
    if getattr(ingest, "streams_generators", False):
        return

    def adbc_ingest(self, table_name, data, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        if isinstance(data, types.GeneratorType):
            first = next(data, None)
            data = [] if first is None else pa.RecordBatchReader.from_batches(first.schema, itertools.chain([first], data))
        return ingest(self, table_name, data, *args, **kwargs)

    adbc_ingest.streams_generators = True
    dbapi.Cursor.adbc_ingest = adbc_ingest


_stream_load_files_into_copy()


def _parse_json_paths_once() -> None:
    """dlt compiles the cursor's JSON path with a new jsonpath-ng parser at every use, and each
    parser regenerates its LR tables (~15 ms of CPU): 55 times in a run of every asset, 2 s of the
    no-change run's 4 s on two cores. Compiled paths are never mutated, so one per text serves all."""
    import dlt.common.jsonpath as jsonpath

    if not hasattr(jsonpath._parse, "cache_info"):
        jsonpath._parse = functools.lru_cache(maxsize=256)(jsonpath._parse)


_parse_json_paths_once()


def _parse_urls_without_sqlalchemy() -> None:
    """dlt parses and renders connection strings with SQLAlchemy's URL whenever SQLAlchemy is
    installed (Prefect brings it): 0.12 s of imports in every process, for two functions that
    dlt's own shim provides (it is what dlt uses where SQLAlchemy is absent). Set before dlt
    imports its compatibility module; a process that already has it keeps it."""
    import sys
    import types

    name = "dlt.common.libs.sql_alchemy_compat"
    if name in sys.modules:
        return
    from dlt.common.libs import sql_alchemy_shims

    compat = types.ModuleType(name)
    compat.URL, compat.make_url = sql_alchemy_shims.URL, sql_alchemy_shims.make_url
    sys.modules[name] = compat


_parse_urls_without_sqlalchemy()


class _KeptHintsFilter(logging.Filter):
    """Drop dlt's warning, once per Arrow batch, that our column hints differ from the batch's
    schema and were kept. They differ by design (a primary key is declared NOT NULL, the Storage
    API's Arrow says nullable) and keeping them is the point; a line per 65k rows drowned the log."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "dlt schema hints were kept" not in record.getMessage()


logging.getLogger("dlt").addFilter(_KeptHintsFilter())
