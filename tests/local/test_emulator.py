"""The BigQuery emulator starts offline on loopback and serves REST and the Storage Read API."""

from __future__ import annotations

import datetime as dt
import socket
from urllib.parse import urlparse

import duckdb
import pyarrow as pa
import pytest
from google.cloud import bigquery
from google.cloud.bigquery_storage_v1 import types

from assets.errors import SourceTableMissing
from runtime.bigquery import MAX_READ_STREAMS, BigQueryClients, TableReader
from runtime.local.emulator import (
    DEFAULT_PROJECT,
    BigQueryEmulator,
    emulator_client,
    emulator_storage_client,
    install_duckdb_extensions,
)
from runtime.local.mutations import load_arrow

STAMP = dt.datetime(2026, 1, 5, 9, 0, 0, 123456, tzinfo=dt.UTC)


def _accepts(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def test_extensions_install_is_idempotent() -> None:
    install_duckdb_extensions()
    assert install_duckdb_extensions() == []  # second call: nothing left to install
    con = duckdb.connect()
    rows = con.execute(
        "SELECT extension_name FROM duckdb_extensions() WHERE installed AND extension_name IN ('spatial', 'avro')"
    ).fetchall()
    assert {name for (name,) in rows} == {"spatial", "avro"}


def test_addresses_are_loopback(emu: BigQueryEmulator) -> None:
    rest = urlparse(emu.rest_url)
    assert rest.scheme == "http" and rest.hostname == "127.0.0.1"
    host, port = emu.grpc_target.split(":")
    assert host == "127.0.0.1" and int(port) != rest.port
    assert emu.project == DEFAULT_PROJECT
    assert emu.env() == {
        "BIGQUERY_EMULATOR_HOST": emu.rest_url,
        "BIGQUERY_STORAGE_EMULATOR_HOST": emu.grpc_target,
    }
    assert emu.running


def _make_table(client: bigquery.Client, project: str, dataset: str) -> str:
    client.create_dataset(f"{project}.{dataset}", exists_ok=True)
    table = f"{project}.{dataset}.things"
    schema = [
        bigquery.SchemaField("id", "STRING"),
        bigquery.SchemaField("payload", "JSON"),
        bigquery.SchemaField("_fivetran_synced", "TIMESTAMP"),
    ]
    client.create_table(bigquery.Table(table, schema=schema), exists_ok=True)
    rows = pa.table(
        {
            "id": ["a", "b", "c"],
            "payload": ['{"n": 1}', '{"n": 2}', "[1, 2]"],
            "_fivetran_synced": pa.array(
                [STAMP, STAMP, STAMP + dt.timedelta(microseconds=1)], pa.timestamp("us", tz="UTC")
            ),
        }
    )
    load_arrow(client, table, rows)
    return table


def test_rest_query_round_trip(emu: BigQueryEmulator) -> None:
    client = emulator_client(emu.rest_url, emu.project)
    table = _make_table(client, emu.project, "rest_check")
    rows = list(client.query(f"SELECT id, payload, _fivetran_synced FROM `{table}` ORDER BY id").result())
    assert [r["id"] for r in rows] == ["a", "b", "c"]
    assert rows[0]["payload"] == {"n": 1}
    assert rows[2]["_fivetran_synced"] == STAMP + dt.timedelta(microseconds=1)  # microseconds kept


# The library's own notice about its Arrow helper; the reader under test is the emulator.
@pytest.mark.filterwarnings("ignore::PendingDeprecationWarning")
def test_storage_read_with_restriction_and_fields(emu: BigQueryEmulator, bq: bigquery.Client) -> None:
    table = _make_table(bq, emu.project, "storage_check")
    project, dataset, name = table.split(".")
    reader = emulator_storage_client(emu.grpc_target)
    session = reader.create_read_session(
        parent=f"projects/{project}",
        read_session=types.ReadSession(
            table=f"projects/{project}/datasets/{dataset}/tables/{name}",
            data_format=types.DataFormat.ARROW,
            read_options=types.ReadSession.TableReadOptions(
                selected_fields=["id", "_fivetran_synced"],
                row_restriction="_fivetran_synced >= TIMESTAMP '2026-01-05 09:00:00.123457+00'",
            ),
        ),
        max_stream_count=1,
    )
    try:
        arrow = reader.read_rows(session.streams[0].name).to_arrow(session)
    finally:
        reader.transport.close()
    assert arrow.column_names == ["id", "_fivetran_synced"]
    assert arrow.to_pylist() == [{"id": "c", "_fivetran_synced": STAMP + dt.timedelta(microseconds=1)}]


def test_persistent_data_dir_keeps_tables(tmp_path) -> None:
    with BigQueryEmulator(data_dir=tmp_path / "bq") as first:
        table = _make_table(first.client(), first.project, "kept")
    with BigQueryEmulator(data_dir=tmp_path / "bq") as second:
        rows = list(second.client().query(f"SELECT count(*) AS n FROM `{table}`").result())
        assert rows[0]["n"] == 3
        assert (tmp_path / "bq" / "emulator.log").exists()


def test_stop_closes_the_ports() -> None:
    emulator = BigQueryEmulator().start()
    rest_port = urlparse(emulator.rest_url).port
    grpc_port = int(emulator.grpc_target.rsplit(":", 1)[1])
    emulator.stop()
    assert not emulator.running
    assert not _accepts("127.0.0.1", rest_port)
    assert not _accepts("127.0.0.1", grpc_port)
    emulator.stop()  # stopping twice is harmless


def _monologue_table(client: bigquery.Client, project: str, rows: int) -> tuple[str, str]:
    """A table of `rows` monologues of 1 KB each, in order of `n`; (dataset, table)."""
    client.create_dataset(f"{project}.reads", exists_ok=True)
    ref = f"{project}.reads.monologues"
    client.delete_table(ref, not_found_ok=True)
    client.create_table(bigquery.Table(ref, schema=[
        bigquery.SchemaField("n", "INT64"),
        bigquery.SchemaField("text", "STRING"),
        bigquery.SchemaField("_fivetran_synced", "TIMESTAMP"),
    ]))
    load_arrow(client, ref, pa.table({
        "n": pa.array(range(rows), pa.int64()),
        "text": [f"{n:06d}" + "x" * 1018 for n in range(rows)],
        "_fivetran_synced": pa.array([STAMP + dt.timedelta(seconds=n) for n in range(rows)], pa.timestamp("us", tz="UTC")),
    }))
    return "reads", "monologues"


def test_a_split_read_returns_every_row_once_in_order(emu: BigQueryEmulator, bq: bigquery.Client) -> None:
    """Against the emulator a large session is read in small streams (its messages are as large as
    a stream): the parts together are the table, each row once, in the table's order."""
    dataset, table = _monologue_table(bq, emu.project, 3000)

    def read(stream_bytes: int | None) -> tuple[list[int], TableReader]:
        storage = emulator_storage_client(emu.grpc_target)
        clients = BigQueryClients(emu.project, bq, storage, stream_bytes=stream_bytes)
        reader = TableReader(clients, dataset, table)
        try:
            numbers = [n for part in reader.read(None, "_fivetran_synced", None) for n in part["n"].to_pylist()]
        finally:
            storage.transport.close()
        return numbers, reader

    whole, unsplit = read(None)
    parts, split = read(256 * 1024)  # 3 MB of text in parts of at most 256 KB
    assert sorted(whole) == list(range(3000))
    assert parts == whole
    assert unsplit.stats.streams <= MAX_READ_STREAMS
    assert split.stats.streams >= 3 * 1024 * 1024 // (256 * 1024)
    assert split.stats.rows == 3000 and split.stats.bytes == unsplit.stats.bytes


def test_a_refused_read_session_says_what_the_server_said(emu: BigQueryEmulator, bq: bigquery.Client) -> None:
    """The emulator answers NOT_FOUND for any failure of its read: the message keeps its reason."""
    dataset, table = _monologue_table(bq, emu.project, 10)
    storage = emulator_storage_client(emu.grpc_target)
    reader = TableReader(BigQueryClients(emu.project, bq, storage), dataset, table)
    try:
        with pytest.raises(SourceTableMissing) as failure:
            list(reader.read(None, "no_such_column", STAMP))
    finally:
        storage.transport.close()
    message = str(failure.value)
    assert message.startswith(f"BigQuery Storage read of {emu.project}.reads.monologues: not found: ")
    assert "no_such_column" in message and len(message) < 400


def _messages_per_stream(emu: BigQueryEmulator, dataset: str, table: str, streams: int) -> list[int]:
    storage = emulator_storage_client(emu.grpc_target)
    try:
        session = storage.create_read_session(
            parent=f"projects/{emu.project}",
            read_session=types.ReadSession(table=f"projects/{emu.project}/datasets/{dataset}/tables/{table}",
                                           data_format=types.DataFormat.ARROW),
            max_stream_count=streams,
        )
        return [sum(1 for _ in storage.read_rows(s.name)) for s in session.streams]
    finally:
        storage.transport.close()


def test_the_launcher_lifts_the_emulators_message_cap(emu: BigQueryEmulator, bq: bigquery.Client) -> None:
    """One unsplit stream of 12 MB of monologues is one message, above bqemulator's default cap
    of 11 MiB per gRPC message: it arrives."""
    dataset, table = _monologue_table(bq, emu.project, 12_000)
    assert _messages_per_stream(emu, dataset, table, 1) == [1]


def test_the_launcher_fetches_in_65536_row_batches(emu: BigQueryEmulator, bq: bigquery.Client) -> None:
    """bqemulator's own fetch makes one batch of up to a million rows, which cannot hold 2 GiB of
    text; the launcher's makes batches of 65,536. Seen from a client: 140,000 rows in 4 streams of
    35,000, and the second stream (rows 35,000-70,000) crosses a batch boundary: two messages."""
    bq.create_dataset(f"{emu.project}.batches", exists_ok=True)
    ref = f"{emu.project}.batches.numbers"
    bq.delete_table(ref, not_found_ok=True)
    bq.create_table(bigquery.Table(ref, schema=[bigquery.SchemaField("n", "INT64"), bigquery.SchemaField("m", "INT64")]))
    load_arrow(bq, ref, pa.table({"n": pa.array(range(140_000), pa.int64()), "m": pa.array(range(140_000), pa.int64())}))
    assert _messages_per_stream(emu, "batches", "numbers", 4) == [1, 2, 1, 2]
