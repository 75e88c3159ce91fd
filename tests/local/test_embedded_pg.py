"""The embedded PostgreSQL starts in seconds on loopback TCP, keeps a given folder, and stops."""

from __future__ import annotations

import socket
import time
from urllib.parse import urlparse

import psycopg
import pytest

from runtime.local.embedded_pg import EmbeddedPostgres


def _accepts(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def test_starts_fast_answers_over_tcp_and_stops() -> None:
    began = time.monotonic()
    server = EmbeddedPostgres().start()
    try:
        assert time.monotonic() - began < 10  # measured well under a second
        url = urlparse(server.url)
        assert (url.scheme, url.hostname, url.username, url.password, url.path) == (
            "postgresql", "127.0.0.1", "postgres", "postgres", "/postgres",
        )  # fmt: skip
        with psycopg.connect(server.url) as conn:
            assert conn.execute("SELECT 1").fetchone() == (1,)
            assert conn.execute("SHOW listen_addresses").fetchone() == ("127.0.0.1",)
            assert conn.execute("SHOW server_encoding").fetchone() == ("UTF8",)
        data_dir = server.data_dir
        assert data_dir.exists()
    finally:
        server.stop()
    assert not _accepts(url.port)
    assert not data_dir.exists()  # a temporary cluster is removed on stop
    server.stop()  # stopping twice is harmless


def test_create_database_is_idempotent() -> None:
    with EmbeddedPostgres() as server:
        url = server.create_database("app_test")
        assert server.create_database("app_test") == url
        assert urlparse(url).path == "/app_test"
        with psycopg.connect(url) as conn:
            assert conn.execute("SELECT current_database()").fetchone() == ("app_test",)
        with pytest.raises(ValueError):
            server.create_database('x"; DROP DATABASE postgres; --')


def test_a_kept_folder_keeps_its_data(tmp_path) -> None:
    folder = tmp_path / "pg"
    first = EmbeddedPostgres(folder)
    try:
        with first:
            with psycopg.connect(first.url, autocommit=True) as conn:
                conn.execute("CREATE TABLE kept (x int)")
                conn.execute("INSERT INTO kept VALUES (42)")
        with EmbeddedPostgres(folder) as second:
            with psycopg.connect(second.url) as conn:
                assert conn.execute("SELECT x FROM kept").fetchall() == [(42,)]
            assert second.data_dir == first.data_dir
    finally:
        first.destroy()
    assert not (first.data_dir / "PG_VERSION").exists()
