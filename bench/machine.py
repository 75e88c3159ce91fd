"""What the benchmark ran on: cores, memory, CPU model and the versions that matter (no host names)."""

from __future__ import annotations

import os
import platform
from importlib import metadata

#: Packages whose versions change the numbers.
_PACKAGES = ("dlt", "prefect", "pyarrow", "adbc-driver-postgresql", "psycopg", "bqemulator", "duckdb")


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as info:
            for line in info:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _ram_gib() -> float | None:
    try:
        return round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError, AttributeError):
        return None


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def machine_facts(postgres_version: str | None = None) -> dict[str, object]:
    """Cores, RAM, CPU model, OS, Python and package versions, and the Postgres server's version."""
    return {
        "nproc": os.cpu_count(),
        "ram_gib": _ram_gib(),
        "cpu_model": _cpu_model(),
        "os": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "postgres": postgres_version,
        "packages": {name: _version(name) for name in _PACKAGES},
    }
