"""Whether a Prefect API is configured, asked without importing Prefect (which costs a second).

`PREFECT_API_URL` in the environment, else the active profile of Prefect's profiles file
(`PREFECT_PROFILES_PATH`, default `~/.prefect/profiles.toml`), as Prefect itself resolves it.
"""

from __future__ import annotations

import os
import tomllib
from pathlib import Path


def prefect_api_url() -> str | None:
    if url := os.environ.get("PREFECT_API_URL", "").strip():
        return url
    home = Path(os.environ.get("PREFECT_HOME", Path.home() / ".prefect"))
    path = Path(os.environ.get("PREFECT_PROFILES_PATH", home / "profiles.toml"))
    try:
        data = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError):
        return None
    active = os.environ.get("PREFECT_PROFILE") or data.get("active") or "ephemeral"
    url = data.get("profiles", {}).get(active, {}).get("PREFECT_API_URL")
    return str(url).strip() or None if url else None
