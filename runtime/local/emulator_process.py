"""The emulator's process: bqemulator's own command line, with one limit of the emulator lifted.

bqemulator answers a Storage read session by fetching the whole result from DuckDB as one Arrow
table in batches of a million rows. An Arrow string column holds at most 2 GiB per batch, so a
session over a million transcript monologues of 1-5 KB fails inside the emulator ("Arrow Appender:
the maximum total string size ... exceeds") and the emulator answers NOT_FOUND. BigQuery itself
has no such limit. Fetching in batches of 65,536 rows, the size the emulator sends them in anyway,
keeps each batch far below it. Every fetch of the emulator goes this way (read sessions, query
results, table listings): the same rows in more batches; nothing else about it changes.
"""

from __future__ import annotations

from typing import Any

#: Rows per Arrow batch fetched from DuckDB: the emulator's own ReadRows message size.
FETCH_BATCH_ROWS = 65_536


def _lift_arrow_batch_limit() -> None:
    import pyarrow as pa
    from bqemulator.storage import engine

    def fetch_arrow(self: engine.DuckDBEngine, sql: str, parameters: list[Any] | None = None) -> pa.Table:
        result = self.execute(sql, parameters)
        return engine._annotate_with_duckdb_types(result.to_arrow_table(FETCH_BATCH_ROWS), result.description)

    engine.DuckDBEngine.fetch_arrow = fetch_arrow


if __name__ == "__main__":
    from bqemulator.cli import main

    _lift_arrow_batch_limit()
    main()
