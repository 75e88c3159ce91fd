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


def _copy_row_group_by_row_group() -> None:
    """dlt's ADBC loader hands `adbc_ingest` a generator, which turns a whole load file into one
    Arrow table before its COPY: with 3 KB monologues a file of 100k rows was 300 MB in memory,
    twice over with two load workers (a 200k-transcript landing peaked at 1.9 GB). dlt's own
    switch COPYs one parquet row group at a time, in the same transaction: 0.9 GB peak, same speed."""
    from dlt.destinations.impl.postgres.postgres import PostgresParquetCopyJob

    PostgresParquetCopyJob._ingest_per_rowgroup = True


_copy_row_group_by_row_group()


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
