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

from runtime.local.embedded_pg import EmbeddedPostgres
from runtime.local.emulator import BigQueryEmulator
from runtime.local.seed import CASES, DEFAULT_DATASETS, insert_rows, seed_workspace, soft_delete, update_rows

#: Calls in the demo workspace: big enough to look real, small enough to sync in seconds.
DEMO_CALLS = 200


def _changes(client, project: str, round_no: int) -> list[str]:  # noqa: ANN001 - bigquery.Client
    """A later Fivetran sync: two new calls, a user's new email, a soft-deleted call."""
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


def run_demo(args: argparse.Namespace, run: Callable[[argparse.Namespace], int]) -> int:
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
            out.write(f"demo: loading into a local Postgres at {server.host}:{server.port}/gong_demo\n")
        os.environ.update(emulator.env())
        os.environ.setdefault("PIPELINES_DIR", str(folder / "pipelines"))
        out.flush()
        code = run(args)
        _show_app_tables(os.environ["DATABASE_URL"], out)
        state["runs"] += 1
        state_file.write_text(json.dumps(state))
        return code
