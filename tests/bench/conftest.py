"""Fixtures for the benchmark's tests: nothing here runs a flow in this process."""

from __future__ import annotations

from collections.abc import Iterator

import pytest


@pytest.fixture(scope="session", autouse=True)
def prefect_server() -> Iterator[None]:
    """Overrides the suite's Prefect test server: the benchmark starts its own (saves ~9 s)."""
    yield
