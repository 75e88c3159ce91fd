"""The operator's commands besides a run: version, status, dead letters, check, plan, list.

Each is a plain function that writes to a text stream and returns the exit code; none of them
runs an asset, takes the run lock or writes anything (their Postgres sessions are read-only).
Imports beyond the standard library happen inside the functions, so `--version` and `--list`
start at once.

Exit codes: 0 done (`--check`: every check passed); 2 a setting is wrong, a system cannot be
reached, or (`--check`) a check failed. Messages name the setting and the server, never a secret.
"""

from __future__ import annotations

import contextlib
import datetime as dt
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, TextIO

from assets.errors import ConfigError, SyncError

if TYPE_CHECKING:  # pragma: no cover
    import psycopg

    from assets.spec import AssetSpec
    from graph import AssetGraph
    from runtime.bigquery import BigQueryClients
    from runtime.settings import Settings

#: The distribution whose version `--version` prints.
DISTRIBUTION = "gong-sync"
#: Dead letters listed per asset; the count line gives the total.
DEAD_LETTERS_SHOWN = 50
#: Seconds one BigQuery metadata call of `--check` / `--plan` may take (a run allows BIGQUERY_TIMEOUT).
METADATA_TIMEOUT = 20.0

_BAD_URL = "DATABASE_URL: not a valid postgresql://USER:PASSWORD@HOST:PORT/DATABASE URL (the value is not shown)"


class CannotRead(ConfigError):
    """A command that only reads could not reach a system, or was refused a query: one line, exit 2
    (nothing is retried: the operator is there to fix the setting and ask again)."""


# -- small helpers ------------------------------------------------------------------------------


def settings() -> Settings:
    """The settings, as a run reads them (a bad value is a ConfigError naming the variable)."""
    from runtime.settings import load_settings

    return load_settings()


def _names(graph: AssetGraph, selection: Sequence[str] | None) -> list[str]:
    """The selected assets in run order (every asset when nothing is selected)."""
    from graph import Selection

    return list(Selection.parse(list(selection or ["*"])).resolve_ordered(graph))


def _table(out: TextIO, header: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        out.write("  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip() + "\n")


def _when(value: dt.datetime | None) -> str:
    if value is None:
        return "-"
    if value.tzinfo is not None:
        value = value.astimezone(dt.timezone.utc)
    return value.isoformat(timespec="seconds")


def _checkpoint(value: dt.datetime | None) -> str:
    """`last_sync_timestamp`: the epoch stands for "no checkpoint yet" (the column is NOT NULL)."""
    if value is None or value.year <= 1970:
        return "-"
    return _when(value)


@contextlib.contextmanager
def _postgres(settings: Settings) -> Iterator[psycopg.Connection]:
    """A read-only session on the app's database; any failure to connect is one line, exit 2."""
    import psycopg

    from runtime.postgres import Endpoint, check_connection, connect_kwargs, explain_connect_error

    url = settings.postgres_url()
    try:
        endpoint = Endpoint.parse(url)
    except ValueError:  # a port that is not a number, …: the message would quote the URL
        raise CannotRead(_BAD_URL) from None
    try:
        check_connection(url)
        kwargs = connect_kwargs(settings)
        kwargs["options"] = f"{kwargs.get('options', '')} -c default_transaction_read_only=on".strip()
        conn = psycopg.connect(url, autocommit=True, **kwargs)
    except SyncError as exc:  # check_connection's CredentialError or TransientError
        raise CannotRead(str(exc)) from None
    except psycopg.OperationalError as exc:
        raise CannotRead(str(explain_connect_error(exc, endpoint))) from None
    except (psycopg.Error, ValueError):  # libpq could not parse the URL; its message may quote it
        raise CannotRead(_BAD_URL) from None
    with conn:
        try:
            yield conn
        except psycopg.Error as exc:  # a query refused (a privilege, …): what Postgres said, one line
            raise CannotRead(f"Postgres refused a query: {exc.diag.message_primary or type(exc).__name__}") from None


def _exists(conn: psycopg.Connection, schema: str, table: str) -> bool:
    return conn.execute("SELECT to_regclass(%s) IS NOT NULL", (f'"{schema}"."{table}"',)).fetchone()[0]


def _bigquery(settings: Settings) -> BigQueryClients:
    """Both BigQuery clients, with a short deadline for metadata calls; errors name the setting."""
    import dataclasses

    from runtime import bigquery

    clients = bigquery.connect(settings)
    return dataclasses.replace(clients, timeout=min(clients.timeout, METADATA_TIMEOUT))


def _lock_holder(conn: psycopg.Connection) -> str | None:
    """Who holds the run lock in this database (without trying to take it), or None."""
    from runtime.session import RUN_LOCK_KEY

    row = conn.execute(
        "SELECT l.pid, a.application_name, a.backend_start FROM pg_locks l"
        " LEFT JOIN pg_stat_activity a ON a.pid = l.pid"
        " WHERE l.locktype = 'advisory' AND l.granted"
        " AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())"
        " AND ((l.classid::bigint << 32) | l.objid::bigint) = %s LIMIT 1",
        (RUN_LOCK_KEY,),
    ).fetchone()
    if row is None:
        return None
    pid, app, since = row
    return f"backend pid {pid}" + (f" ({app})" if app else "") + (f" since {_when(since)}" if since else "")


def _sync_status(conn: psycopg.Connection, schema: str) -> dict[str, tuple]:
    """The app's sync_status rows by asset (empty before the first run made the table)."""
    from psycopg import sql

    if not _exists(conn, schema, "sync_status"):
        return {}
    rows = conn.execute(sql.SQL(
        "SELECT entity_type, last_sync_status, last_sync_timestamp, items_synced, errors_count, updated_at,"
        " error_details FROM {}.sync_status"
    ).format(sql.Identifier(schema))).fetchall()
    return {r[0]: r[1:] for r in rows}


# -- --version ----------------------------------------------------------------------------------


def version(out: TextIO) -> int:
    """`materialize <version>` of the installed distribution."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as dist_version

    try:
        number = dist_version(DISTRIBUTION)
    except PackageNotFoundError:
        number = "(not installed: run pip install -e . in the project)"
    out.write(f"materialize {number}\n")
    return 0


# -- --list -------------------------------------------------------------------------------------


def list_graph(graph: AssetGraph, out: TextIO) -> int:
    """The graph: each asset's level and upstream, then each tag with its assets (`-a tag:NAME`)."""
    rows = graph.describe()
    width = max(len(r.name) for r in rows)
    out.write(f"{'asset':<{width}}  level  upstream\n")
    for row in rows:
        out.write(f"{row.name:<{width}}  {row.level:>5}  {', '.join(row.upstream) or '-'}\n")
    tags: dict[str, list[str]] = {}
    for name in graph.names:
        for tag in graph.spec(name).tags:
            tags.setdefault(tag, []).append(name)
    if tags:
        out.write("tags (select with -a tag:NAME):\n")
        tag_width = max(map(len, tags))
        for tag in sorted(tags):
            out.write(f"  {tag:<{tag_width}}  {', '.join(sorted(tags[tag]))}\n")
    untagged = [n for n in graph.names if not graph.spec(n).tags]
    if untagged:
        out.write(f"  (no tag)  {', '.join(sorted(untagged))}\n")
    return 0


# -- --schema-changes ---------------------------------------------------------------------------


def schema_changes(settings: Settings, out: TextIO) -> int:
    """Every schema change the pipeline saw or made, oldest first."""
    from psycopg import sql

    with _postgres(settings) as conn:
        rows = []
        if _exists(conn, settings.sync_schema, "schema_changes"):
            rows = conn.execute(sql.SQL(
                "SELECT at, asset, table_name, column_name, change, old_type, new_type, action FROM {}.schema_changes"
                " ORDER BY id"
            ).format(sql.Identifier(settings.sync_schema))).fetchall()
    if not rows:
        out.write("no schema changes recorded\n")
        return 0
    _table(out, ("at", "asset", "table", "column", "change", "old", "new", "action"),
           [(_when(r[0]), *(str(v or "-") for v in r[1:])) for r in rows])
    return 0


# -- --status -----------------------------------------------------------------------------------


def status(settings: Settings, graph: AssetGraph, out: TextIO, selection: Sequence[str] | None = None) -> int:
    """Each asset's last sync as the app's sync_status holds it, and its dead letters."""
    from psycopg import sql

    names = _names(graph, selection)
    with _postgres(settings) as conn:
        synced = _sync_status(conn, settings.destination_schema)
        letters: dict[str, int] = {}
        if _exists(conn, settings.sync_schema, "dead_letters"):
            letters = dict(conn.execute(sql.SQL("SELECT asset, count(*) FROM {}.dead_letters GROUP BY asset").format(
                sql.Identifier(settings.sync_schema))).fetchall())
        holder = _lock_holder(conn)
    rows, errors = [], []
    for name in names:
        if name not in synced:
            rows.append((name, "never", "-", "-", "-", str(letters.get(name, 0)), "-"))
            continue
        state, checkpoint, items, n_errors, updated, details = synced[name]
        rows.append((name, state or "-", _checkpoint(checkpoint), str(items), str(n_errors),
                     str(letters.get(name, 0)), _when(updated)))
        if state == "failed" and isinstance(details, dict) and details.get("error"):
            errors.append(f"{name}: {details['error']}")
    _table(out, ("asset", "status", "checkpoint", "rows", "errors", "dead letters", "updated"), rows)
    for line in errors:
        out.write(line + "\n")
    out.write(f"a run is in progress ({holder})\n" if holder else "no run in progress\n")
    return 0


# -- --dead-letters -----------------------------------------------------------------------------


def _key(primary_key: object, row_key: str) -> str:
    if isinstance(primary_key, dict) and primary_key:
        return ", ".join(f"{k}={v}" for k, v in primary_key.items())
    return f"(no key) {row_key[:12]}"


def _first_error(errors: object) -> str:
    if not isinstance(errors, list) or not errors:
        return "-"
    first = errors[0]
    if isinstance(first, dict):
        text = ": ".join(str(first[k]) for k in ("field", "error") if first.get(k)) or str(first)
    else:
        text = str(first)
    text = " ".join(text.split())
    if len(text) > 80:
        text = text[:77] + "..."
    return text + (f" (+{len(errors) - 1} more)" if len(errors) > 1 else "")


def dead_letters(settings: Settings, graph: AssetGraph, out: TextIO, selection: Sequence[str] | None = None) -> int:
    """The rows waiting in dead letters, per asset: source table, key, first error, when."""
    from psycopg import sql

    names = _names(graph, selection) if selection else None
    with _postgres(settings) as conn:
        found: list[tuple] = []
        counts: dict[str, int] = {}
        if _exists(conn, settings.sync_schema, "dead_letters"):
            table = sql.SQL("{}.dead_letters").format(sql.Identifier(settings.sync_schema))
            where = sql.SQL("WHERE asset = ANY(%s)" if names is not None else "")
            params = (names,) if names is not None else ()
            counts = dict(conn.execute(sql.SQL("SELECT asset, count(*) FROM {} {} GROUP BY asset").format(
                table, where), params).fetchall())
            found = conn.execute(sql.SQL(
                "SELECT asset, source_table, primary_key, row_key, errors, created_at FROM"
                " (SELECT *, row_number() OVER (PARTITION BY asset ORDER BY id) AS n FROM {} {}) d"
                " WHERE n <= %s ORDER BY asset, id"
            ).format(table, where), (*params, DEAD_LETTERS_SHOWN)).fetchall()
    if not counts:
        out.write("nothing in dead letters" + (f" for {', '.join(names)}" if names else "") + "\n")
        return 0
    # Graph order, then assets the graph no longer has.
    order = [n for n in graph.names if n in counts] + sorted(a for a in counts if a not in graph)
    for asset in order:
        rows = [(r[0], r[1], _key(r[2], r[3]), _first_error(r[4]), _when(r[5])) for r in found if r[0] == asset]
        _table(out, ("asset", "source table", "key", "first error", "when"), rows)
        more = counts[asset] - len(rows)
        shown = f" ({len(rows)} shown; the rest: SELECT * FROM {settings.sync_schema}.dead_letters" \
                f" WHERE asset = '{asset}')" if more else ""
        out.write(f"{asset}: {counts[asset]} dead letter(s){shown}\n")
        if asset != order[-1]:
            out.write("\n")
    return 0


# -- --check ------------------------------------------------------------------------------------


class _Report:
    """One line per check, printed as it is made: ok or FAILED, what was checked, what to fix."""

    def __init__(self, out: TextIO) -> None:
        self.out = out
        self.total = 0
        self.failed = 0

    def line(self, ok: bool, what: str, detail: str) -> bool:
        self.total += 1
        self.failed += not ok
        self.out.write(f"{'ok' if ok else 'FAILED':<6}  {what}: {detail}\n")
        self.out.flush()
        return ok


def check(graph: AssetGraph, out: TextIO, selection: Sequence[str] | None = None) -> int:
    """Connections, the run lock, privileges, the app's tables and the selection's source tables.

    Reads only: nothing is created, no lock is taken, no asset runs. Exit 0 when every check
    passed, 2 otherwise.
    """
    from runtime.settings import load_settings

    report = _Report(out)
    names = _names(graph, selection)
    specs = [graph.spec(n) for n in names]
    try:
        config = load_settings()
    except ConfigError as exc:
        report.line(False, "settings", str(exc))
        return _verdict(report)
    report.line(True, "settings", f"read; selection {', '.join(names)}")
    try:
        with _postgres(config) as conn:
            _check_postgres(conn, config, specs, report)
    except ConfigError as exc:  # DATABASE_URL missing or malformed, the server unreachable, a query refused
        report.line(False, "postgres", str(exc))
    _check_bigquery(config, specs, report)
    return _verdict(report)


def _verdict(report: _Report) -> int:
    if report.failed:
        report.out.write(f"{report.failed} of {report.total} checks failed; nothing was run\n")
        return 2
    report.out.write(f"all {report.total} checks passed; nothing was run\n")
    return 0


def _check_postgres(conn: psycopg.Connection, config: Settings, specs: list[AssetSpec], report: _Report) -> None:
    from runtime.postgres import Endpoint

    database, user, server = conn.execute(
        "SELECT current_database(), current_user, current_setting('server_version')").fetchone()
    endpoint = Endpoint.parse(config.postgres_url())
    report.line(True, "postgres", f"connected to {endpoint.host}:{endpoint.port}/{database} as {user} (server {server})")
    holder = _lock_holder(conn)
    report.line(True, "run lock", f"held by another run: {holder}; a run started now would be skipped" if holder
                else "free: a run started now would take it")
    _check_privileges(conn, config, specs, user, database, report)
    _check_contract(conn, config, specs, report)


def _has(conn: psycopg.Connection, query: str, *params: object) -> bool:
    return bool(conn.execute(query, params).fetchone()[0])


def _check_privileges(conn: psycopg.Connection, config: Settings, specs: list[AssetSpec], user: str, database: str,
                      report: _Report) -> None:
    """What README "Postgres privileges" lists, asked of the catalog (`has_*_privilege`)."""
    from runtime.contract import existing_tables

    create_db = _has(conn, "SELECT has_database_privilege(current_database(), 'CREATE')")
    for schema in (config.raw_schema, f"{config.raw_schema}_staging", config.sync_schema):
        row = conn.execute("SELECT has_schema_privilege(oid, 'USAGE'), has_schema_privilege(oid, 'CREATE')"
                           " FROM pg_namespace WHERE nspname = %s", (schema,)).fetchone()
        if row is not None:
            lacking = [p for p, has in zip(("USAGE", "CREATE"), row) if not has]
            report.line(not lacking, f"schema {schema}",
                        "exists; USAGE and CREATE" if not lacking else
                        f"{user} lacks {' and '.join(lacking)}: GRANT {', '.join(lacking)} ON SCHEMA {schema} TO {user}"
                        " (or make it the schema's owner)")
        else:
            report.line(create_db, f"schema {schema}",
                        f"not there yet; {user} may CREATE in database {database}, so the first run creates it"
                        if create_db else
                        f"not there and {user} may not create schemas in {database}: GRANT CREATE ON DATABASE"
                        f" {database} TO {user}, or CREATE SCHEMA {schema} AUTHORIZATION {user}")
    app = config.destination_schema
    schema_row = conn.execute("SELECT has_schema_privilege(oid, 'USAGE'), has_schema_privilege(oid, 'CREATE')"
                              " FROM pg_namespace WHERE nspname = %s", (app,)).fetchone()
    present = existing_tables(conn, app)
    if not present:
        # An empty database: the first run creates the whole contract in the app's schema.
        if schema_row is None:
            ok, how = create_db, f"CREATE on database {database}"
        else:
            ok, how = bool(schema_row[0] and schema_row[1]), f"USAGE and CREATE on schema {app}"
        report.line(ok, f"schema {app}",
                    f"none of the app's tables yet; the first run creates them ({user} has {how})" if ok else
                    f"none of the app's tables yet, and creating them needs {how}: GRANT it to {user},"
                    " or run the application's migrations first")
        return
    report.line(bool(schema_row[0]), f"schema {app}",
                "USAGE" if schema_row[0] else f"{user} lacks USAGE: GRANT USAGE ON SCHEMA {app} TO {user}")
    needs: dict[str, list[str]] = {}
    for spec in specs:
        needs[spec.table] = ["SELECT", "INSERT", "UPDATE", *(["DELETE"] if spec.deletes else [])]
    needs["sync_status"] = ["SELECT", "INSERT", "UPDATE"]
    missing = []
    for table, privileges in needs.items():
        if table not in present:
            continue  # the contract check names it
        lacking = [p for p in privileges if not _has(conn, "SELECT has_table_privilege(%s::regclass, %s)",
                                                     f'"{app}"."{table}"', p)]
        if lacking:
            missing.append((table, lacking))
            report.line(False, f"table {app}.{table}",
                        f"{user} lacks {', '.join(lacking)}: GRANT {', '.join(lacking)} ON {app}.{table} TO {user}")
    if not missing:
        report.line(True, f"tables of {app}", "SELECT, INSERT, UPDATE and DELETE (users: no DELETE) on "
                    + ", ".join(t for t in needs if t in present))
    # Counting what a delete takes with it reads every table that references the rows, following
    # cascades down (runtime/deletes.py).
    deleting = [f'"{app}"."{s.table}"' for s in specs if s.deletes and s.table in present]
    unreadable = [r[0] for r in conn.execute(
        "WITH RECURSIVE refs (oid, cascades) AS ("
        " SELECT c.conrelid, c.confdeltype = 'c' FROM pg_constraint c"
        "  WHERE c.contype = 'f' AND c.confrelid = ANY(%s::regclass[])"
        " UNION SELECT c.conrelid, c.confdeltype = 'c' FROM pg_constraint c JOIN refs r ON c.confrelid = r.oid"
        "  WHERE c.contype = 'f' AND r.cascades)"
        " SELECT DISTINCT oid::regclass::text FROM refs WHERE NOT has_table_privilege(oid, 'SELECT') ORDER BY 1",
        (deleting,),
    ).fetchall()] if deleting else []
    report.line(not unreadable, "tables referencing the app rows",
                "SELECT on each (to count what a delete takes with it)" if not unreadable else
                f"{user} cannot read {', '.join(unreadable)}, needed to count what a delete takes with it:"
                f" GRANT SELECT ON {', '.join(unreadable)} TO {user}")
    try:
        conn.execute("SELECT (SELECT count(*) FROM pg_catalog.pg_constraint) + (SELECT count(*) FROM"
                     " pg_catalog.pg_index) + (SELECT 1 FROM pg_catalog.pg_attribute LIMIT 1)")
        report.line(True, "catalog", "pg_constraint, pg_index and pg_attribute readable")
    except Exception as exc:  # noqa: BLE001 - a revoked catalog is rare; say what Postgres said
        report.line(False, "catalog", f"cannot read the catalog: {getattr(getattr(exc, 'diag', None), 'message_primary', None) or type(exc).__name__}")


def _check_contract(conn: psycopg.Connection, config: Settings, specs: list[AssetSpec], report: _Report) -> None:
    """The contract check of a run (runtime/contract.py), without its create path: read only."""
    import psycopg

    from runtime.contract import built_assets, check_table, existing_tables, expectations
    from runtime.postgres import Catalog

    catalog = Catalog(config)
    present = existing_tables(conn, catalog.dest_name)
    if not present:
        report.line(True, "app tables", f"none in schema {catalog.dest_name}: the first run creates the whole contract")
        return
    problems: list[str] = []
    expected = expectations(specs)
    try:
        with conn.transaction():
            built = built_assets(conn, catalog)
    except psycopg.errors.InsufficientPrivilege as exc:
        # A run reads and writes these; the check goes on, counting keys as a first run does.
        report.line(False, "pipeline tables", f"{catalog.sync_name}.asset_watermarks: {exc.diag.message_primary}")
        built = set()
    for exp in expected:
        if exp.table not in present:
            problems.append(f"{catalog.dest_name}.{exp.table}: table missing (the application's migrations create it)")
            continue
        try:
            problems += check_table(conn, catalog, exp, built)
        except psycopg.Error as exc:
            problems.append(f"{catalog.dest_name}.{exp.table}: cannot check ({exc.diag.message_primary or type(exc).__name__})")
    if not problems:
        report.line(True, "app tables", f"{len(expected)} table(s) in {catalog.dest_name} fit what the selection writes")
        return
    for problem in problems:
        report.line(False, "app tables", problem)


def _check_bigquery(config: Settings, specs: list[AssetSpec], report: _Report) -> None:

    from runtime import bigquery
    from runtime.sources import inspect_sources

    try:
        clients = _bigquery(config)
    except SyncError as exc:
        report.line(False, "bigquery", str(exc))
        return
    try:
        try:
            bigquery.check_dataset(clients, config.gong_dataset, "GONG_DATASET")
        except SyncError as exc:
            report.line(False, "bigquery", str(exc))
            return
        where = f"emulator at {config.bigquery_emulator_host}" if config.uses_emulator else "BigQuery"
        report.line(True, "bigquery", f"connected to {where}, project {clients.project}; dataset {config.gong_dataset} found")
        for source in inspect_sources(config, clients, specs):
            report.line(source.ok, f"source {source.label} ({source.spec.name})",
                        source.detail + (f", {source.hint}" if source.hint else ""))
    finally:
        clients.close()


# -- --plan -------------------------------------------------------------------------------------


def plan(settings: Settings, graph: AssetGraph, out: TextIO, selection: Sequence[str] | None = None,
         full_refresh: bool = False) -> int:
    """What a run of this selection would do, level by level: each asset's source tables, the
    checkpoint each would be read from, and the source's row count from BigQuery's metadata."""
    from google.api_core import exceptions as gexc

    from runtime.sources import resolve

    names = _names(graph, selection)
    sub = graph.subgraph(names)
    with _postgres(settings) as conn:
        synced = _sync_status(conn, settings.destination_schema)
        holder = _lock_holder(conn)
    try:
        clients = _bigquery(settings)
    except SyncError as exc:
        raise CannotRead(str(exc)) from None
    rows: list[tuple[str, ...]] = []
    notes: list[str] = []
    sources = 0
    try:
        datasets: dict[str, bool] = {}
        for level, group in enumerate(sub.levels()):
            for name in group:
                spec = sub.spec(name)
                details = synced.get(name, (None,) * 6)[5]
                checkpoints = details.get("checkpoints") if isinstance(details, dict) else None
                for i, source in enumerate(spec.sources):
                    sources += 1
                    try:
                        place = resolve(source, settings, clients, datasets)
                    except Exception as exc:  # noqa: BLE001
                        raise CannotRead(f"BigQuery did not answer ({type(exc).__name__})") from None
                    if full_refresh:
                        since = "from the start (--full-refresh)"
                    elif checkpoints and checkpoints.get(source.raw_table):
                        since = str(checkpoints[source.raw_table])
                    else:
                        since = "from the start (never synced)"
                    count = "-"
                    if place.stand_in:
                        count = "0 (stand-in)"
                    else:
                        ref = f"{clients.project}.{place.dataset}.{place.table}"
                        try:
                            table = clients.rest.get_table(ref, retry=clients.retry, timeout=clients.timeout)
                            count = "?" if table.num_rows is None else str(table.num_rows)
                        except gexc.NotFound:
                            count = "missing"
                            notes.append(f"{name}: source table {ref} does not exist: `materialize` would stop"
                                         " before any work (exit 2); a scheduled run fails this asset")
                        except Exception as exc:  # noqa: BLE001
                            raise CannotRead(f"BigQuery did not answer for {ref} ({type(exc).__name__})") from None
                    if place.note:
                        notes.append(f"{name}: {source.table}: {place.note}")
                    rows.append((str(level) if i == 0 else "", name if i == 0 else "",
                                 f"{place.dataset}.{place.table}", since, count))
    finally:
        clients.close()
    levels = len(sub.levels())
    out.write(f"plan: {len(names)} asset(s) in {levels} level(s), {sources} source table(s); nothing was run\n")
    out.write(f"the assets of one level run together, at most {settings.max_parallel} at a time (MAX_PARALLEL);"
              " an asset whose upstream fails is skipped\n")
    _table(out, ("level", "asset", "source table", "reads from (checkpoint)", "source rows"), rows)
    if settings.late_row_window > 0 and not full_refresh:
        out.write(f"each read past a checkpoint starts LATE_ROW_WINDOW ({settings.late_row_window:g} s) below it;"
                  " rows already landed are dropped\n")
    for note in notes:
        out.write(note + "\n")
    out.write(f"the run lock is held ({holder}): a run started now would be skipped\n" if holder else
              "the run lock is free\n")
    return 0


#: `materialize --help`'s closing text: selections, examples and exit codes.
HELP_EPILOG = """\
selections: NAME, +NAME (with upstream), NAME+ (with downstream), tag:TAG, *; a comma or a
repeated --asset joins them.

examples:
  materialize                                   sync every asset
  materialize -a +speakers                      speakers and everything upstream (users, calls)
  materialize --full-refresh -a calls           re-read calls from scratch, reconcile in place
  materialize --plan -a calls+                  what would run, in what order, from which checkpoints
  materialize --check                           connections, run lock, privileges, tables; runs nothing
  materialize --status                          each asset's last sync, rows, errors, dead letters
  materialize --dead-letters -a emails          the rows waiting in dead letters
  materialize --replay-dead-letters -a emails   land the dead letters that now pass
  materialize --list                            the graph: levels, upstream, tags
  materialize --demo                            the whole job on local parts, nothing configured
  materialize --demo --clean                    remove everything the demo made

exit codes:
  0    done: every selected asset succeeded, the run was skipped (another run holds the
       lock), or a command that runs nothing finished (--check: every check passed)
  1    an asset failed, or Postgres or BigQuery did not answer after retries; the summary
       lists every asset (downstream ones are skipped)
  2    bad input before any work: an unknown asset, a missing or rejected credential, a
       malformed setting, a source table the selection needs that is not there; a command
       that runs nothing could not reach a system; --check: a check failed
  130  stopped by Ctrl-C or SIGTERM at a safe point; the summary lists what was cancelled
"""
