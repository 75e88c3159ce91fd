"""Fixtures for the local stand-ins: one real BigQuery emulator per test module.

These tests check the stand-ins themselves, so each module gets its own emulator (not the
session one the pipeline tests share) and a clean slate.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from google.cloud import bigquery

from runtime.local.emulator import BigQueryEmulator


@pytest.fixture(scope="session", autouse=True)
def prefect_server() -> Iterator[None]:
    """Overrides the suite's Prefect test server: nothing here uses Prefect (saves ~9 s)."""
    yield


@pytest.fixture(scope="module")
def emu() -> Iterator[BigQueryEmulator]:
    """A running in-memory emulator for this module (start takes about a second)."""
    with BigQueryEmulator() as running:
        yield running


@pytest.fixture(scope="module")
def bq(emu: BigQueryEmulator) -> Iterator[bigquery.Client]:
    client = emu.client()
    yield client
    client.close()
