"""The BigQuery emulator (`bqemulator`), started offline as a subprocess on loopback.

Why a subprocess and not bqemulator's in-process `EmulatorServer`: the emulator runs its own
asyncio loop, uvicorn and gRPC server, and keeps every query result in memory; a separate process
keeps all of that out of the caller's event loop and memory and can be killed cleanly.

Offline caveat: at start the emulator runs `INSTALL spatial` / `INSTALL avro` in DuckDB. When the
extensions are not yet in DuckDB's home, DuckDB tries to download them and the start hangs without
network. `install_duckdb_extensions()` installs them from the pip wheels first.
"""

from __future__ import annotations

import atexit
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import TracebackType

#: Project id the demo and the tests use unless told otherwise (the production project's name).
DEFAULT_PROJECT = "prefect-data-warehouse"

#: DuckDB extensions the emulator installs and loads at start.
_EXTENSIONS = ("spatial", "avro")

_START_TIMEOUT_S = 30.0
_STOP_TIMEOUT_S = 10.0
_LOG_TAIL_CHARS = 4000


class EmulatorStartError(RuntimeError):
    """The emulator did not answer on its ports in time, or exited during start."""


def install_duckdb_extensions() -> list[str]:
    """Install the emulator's DuckDB extensions from the pip wheels; return the ones installed now.

    Idempotent: an extension that DuckDB already lists as installed is left alone, so the call
    costs one in-memory DuckDB connection after the first time.
    """
    import duckdb
    import duckdb_extensions

    con = duckdb.connect()
    try:
        rows = con.execute(
            "SELECT extension_name FROM duckdb_extensions() WHERE installed AND extension_name IN (?, ?)",
            list(_EXTENSIONS),
        ).fetchall()
        present = {name for (name,) in rows}
        missing = [name for name in _EXTENSIONS if name not in present]
        for name in missing:
            # Installs the wheel's file into DuckDB's extension home (~/.duckdb by default), where
            # the emulator's own `INSTALL` then finds it instead of going to the network.
            duckdb_extensions.import_extension(name, con=con)
        return missing
    finally:
        con.close()


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago (the OS picks it; a small race is accepted)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


#: The module that runs bqemulator's command line with one of its limits lifted.
EMULATOR_MODULE = "runtime.local.emulator_process"

#: This checkout's root: the emulator's process imports EMULATOR_MODULE from it, whatever its
#: working folder and whichever checkout is installed.
_SOURCE_ROOT = Path(__file__).resolve().parents[2]


def _emulator_command() -> list[str]:
    return [sys.executable, "-m", EMULATOR_MODULE]


#: The emulator's gRPC message cap. Its default (11 MiB) is below one 65,536-row Arrow batch of a
#: wide table: it sends 65,536 rows whatever their size, and monologues of 1–5 KB make batches of
#: 65–330 MB. 1 GiB carries any realistic batch (gRPC's own ceiling is 2 GiB).
_MAX_MESSAGE_BYTES = 1024 * 1024 * 1024


def _child_env() -> dict[str, str]:
    """The caller's environment without `BQEMU_*` settings, so only our settings configure the emulator."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("BQEMU_")}
    env["BQEMU_WRITE_API_MAX_REQUEST_BYTES"] = str(_MAX_MESSAGE_BYTES)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(_SOURCE_ROOT), env.get("PYTHONPATH")]))
    return env


def _port_open(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def _http_ok(url: str) -> bool:
    try:
        # No proxy: a proxy from the environment must never see (or break) a loopback probe.
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        with opener.open(url, timeout=1.0) as response:
            return 200 <= response.status < 300
    except (urllib.error.URLError, OSError):
        return False


class BigQueryEmulator:
    """A running bqemulator on two free loopback ports; a context manager.

    `data_dir=None` runs it in memory (`--ephemeral`): every start is empty. With a `data_dir` it
    runs `--persistent`, so the demo keeps its seeded warehouse between runs. The log goes to
    `emulator.log` in the data dir (or in a temporary folder that `stop()` removes).
    """

    host = "127.0.0.1"

    def __init__(self, project: str = DEFAULT_PROJECT, data_dir: str | os.PathLike[str] | None = None) -> None:
        self.project = project
        self.data_dir = Path(data_dir).resolve() if data_dir is not None else None
        self.rest_port: int | None = None
        self.grpc_port: int | None = None
        self.log_path: Path | None = None
        self._tmpdir: tempfile.TemporaryDirectory[str] | None = None
        self._process: subprocess.Popen[bytes] | None = None
        self._log_file = None

    # -- addresses -------------------------------------------------------------------------

    @property
    def rest_url(self) -> str:
        """REST endpoint, e.g. `http://127.0.0.1:9050`: the client's `api_endpoint`."""
        self._require_started()
        return f"http://{self.host}:{self.rest_port}"

    @property
    def grpc_target(self) -> str:
        """`host:port` of the Storage Read/Write API, for `grpc.insecure_channel`."""
        self._require_started()
        return f"{self.host}:{self.grpc_port}"

    def env(self) -> dict[str, str]:
        """Environment variables that point the project's settings at this emulator."""
        return {"BIGQUERY_EMULATOR_HOST": self.rest_url, "BIGQUERY_STORAGE_EMULATOR_HOST": self.grpc_target}

    def client(self):  # noqa: ANN201 - google.cloud.bigquery.Client, imported lazily
        """A BigQuery REST client on this emulator."""
        return emulator_client(self.rest_url, self.project)

    # -- lifecycle -------------------------------------------------------------------------

    def start(self) -> BigQueryEmulator:
        """Start the process and wait until both ports answer; raise with the log tail if not."""
        if self._process is not None:
            return self
        install_duckdb_extensions()

        if self.data_dir is not None:
            self.data_dir.mkdir(parents=True, exist_ok=True)
            work_dir = self.data_dir
            mode = ["--persistent", "--data-dir", str(self.data_dir)]
        else:
            self._tmpdir = tempfile.TemporaryDirectory(prefix="bqemulator-")
            work_dir = Path(self._tmpdir.name)
            mode = ["--ephemeral"]

        self.rest_port = free_port(self.host)
        self.grpc_port = free_port(self.host)
        while self.grpc_port == self.rest_port:
            self.grpc_port = free_port(self.host)

        command = [
            *_emulator_command(),
            "start",
            "--rest-host", self.host, "--rest-port", str(self.rest_port),
            "--grpc-host", self.host, "--grpc-port", str(self.grpc_port),
            *mode,
            "--project", self.project,
            "--log-level", "warning",
        ]  # fmt: skip
        self.log_path = work_dir / "emulator.log"
        self._log_file = open(self.log_path, "ab")  # noqa: SIM115 - kept open for the process's life
        # cwd is our own folder: the emulator reads a `.bqemu.toml` from its working directory.
        self._process = subprocess.Popen(
            command,
            cwd=work_dir,
            env=_child_env(),
            stdin=subprocess.DEVNULL,
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
        )
        # A caller that exits without stop() must not leave the emulator running.
        atexit.register(self.stop)
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Terminate the process (kill it if it does not exit in time) and remove temporary files."""
        process, self._process = self._process, None
        atexit.unregister(self.stop)
        if process is not None and process.poll() is None:
            process.terminate()
            try:
                process.wait(_STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(_STOP_TIMEOUT_S)
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None
        if self._tmpdir is not None:
            self._tmpdir.cleanup()
            self._tmpdir = None

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def log_tail(self, chars: int = _LOG_TAIL_CHARS) -> str:
        """The end of the emulator's log, for error messages."""
        if self.log_path is None or not self.log_path.exists():
            return ""
        text = self.log_path.read_text(errors="replace")
        return text[-chars:]

    def __enter__(self) -> BigQueryEmulator:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    # -- internals -------------------------------------------------------------------------

    def _require_started(self) -> None:
        if self.rest_port is None or self.grpc_port is None:
            raise RuntimeError("the emulator is not started")

    def _wait_ready(self) -> None:
        """Poll `/healthz` on REST, then the gRPC port (the server binds REST first)."""
        assert self._process is not None and self.rest_port is not None and self.grpc_port is not None
        deadline = time.monotonic() + _START_TIMEOUT_S
        health = f"http://{self.host}:{self.rest_port}/healthz"
        while time.monotonic() < deadline:
            code = self._process.poll()
            if code is not None:
                raise EmulatorStartError(
                    f"bqemulator exited with code {code} during start; log tail:\n{self.log_tail()}"
                )
            if _http_ok(health) and _port_open(self.host, self.grpc_port):
                return
            time.sleep(0.1)
        raise EmulatorStartError(
            f"bqemulator did not answer on {self.host}:{self.rest_port} (REST) and :{self.grpc_port} (gRPC) "
            f"within {_START_TIMEOUT_S:.0f}s; log tail:\n{self.log_tail()}"
        )


def emulator_client(rest_url: str, project: str = DEFAULT_PROJECT):  # noqa: ANN201 - bigquery.Client
    """A `google.cloud.bigquery.Client` on the emulator, with anonymous credentials."""
    from google.api_core.client_options import ClientOptions
    from google.auth.credentials import AnonymousCredentials
    from google.cloud import bigquery

    return bigquery.Client(
        project=project,
        credentials=AnonymousCredentials(),
        client_options=ClientOptions(api_endpoint=rest_url),
    )


def emulator_storage_client(grpc_target: str):  # noqa: ANN201 - BigQueryReadClient
    """A Storage Read client on the emulator's gRPC port.

    Built on an insecure channel on purpose: a client the library builds itself aims at Google.
    """
    import grpc
    from google.cloud.bigquery_storage_v1 import BigQueryReadClient
    from google.cloud.bigquery_storage_v1.services.big_query_read.transports import BigQueryReadGrpcTransport

    channel = grpc.insecure_channel(grpc_target, options=[("grpc.max_receive_message_length", -1)])
    return BigQueryReadClient(transport=BigQueryReadGrpcTransport(channel=channel))

