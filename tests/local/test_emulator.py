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
