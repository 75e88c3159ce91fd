"""A real Prefect server, its CLI and a process worker, each a subprocess on loopback with its own home.

Every subprocess gets an environment built here from scratch for Prefect: the caller's `PREFECT_*`
variables are dropped (the suite's in-process test server must not leak in), and this server's
`PREFECT_API_URL` is set explicitly.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx

from runtime.local.emulator import free_port

REPO_ROOT = Path(__file__).resolve().parents[2]
PREFECT = [sys.executable, "-m", "prefect"]
#: Offline: no analytics, no telemetry, no dashboard assets.
OFFLINE = {"DO_NOT_TRACK": "1", "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_UI_ENABLED": "false"}
_START_TIMEOUT_S = 90.0
_LOG_TAIL_CHARS = 3000


def _tail(path: Path) -> str:
    return path.read_text(errors="replace")[-_LOG_TAIL_CHARS:] if path.exists() else ""


def _stop(proc: subprocess.Popen, timeout: float = 20.0) -> None:
    """Stop a process started in its own session, with everything it started (flow-run children)."""
    if proc.poll() is not None:
        return
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=timeout)
            return
        except subprocess.TimeoutExpired:
            continue


@dataclass
class LocalPrefect:
    """A running `prefect server start` on 127.0.0.1 with SQLite under `home`."""

    home: Path
    port: int

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/api"

    def env(self, **extra: str) -> dict[str, str]:
        """The current environment without any PREFECT_* setting, pointed at this server."""
        environ = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
        environ.update(OFFLINE)
        environ.update(PREFECT_HOME=str(self.home), PREFECT_API_URL=self.api_url)
        environ.update(extra)
        return environ

    def cli(self, *args: str, timeout: float = 180.0, check: bool = True) -> subprocess.CompletedProcess[str]:
        """Run `prefect ARGS` from the repo root, as an operator would, against this server."""
        result = subprocess.run(
            [*PREFECT, "--no-prompt", *args], cwd=REPO_ROOT, env=self.env(), capture_output=True,
            text=True, timeout=timeout, stdin=subprocess.DEVNULL,
        )
        if check and result.returncode != 0:
            raise AssertionError(f"prefect {' '.join(args)} exited {result.returncode}:\n{result.stdout}\n{result.stderr}")
        return result

    def client(self):  # noqa: ANN201 - prefect.client.orchestration.SyncPrefectClient
        """A synchronous API client for this server (not the suite's test server)."""
        from prefect.client.orchestration import SyncPrefectClient

        return SyncPrefectClient(api=self.api_url)

    @contextmanager
    def worker(self, pool: str) -> Iterator[Worker]:
        """`prefect worker start --pool POOL`, polling every second; its environment is the runs' environment."""
        log = self.home / f"worker-{time.monotonic_ns()}.log"
        with log.open("w") as out:
            proc = subprocess.Popen(
                [*PREFECT, "worker", "start", "--pool", pool],
                cwd=REPO_ROOT, env=self.env(PREFECT_WORKER_QUERY_SECONDS="1"),
                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
            )
        try:
            yield Worker(proc, log)
        finally:
            _stop(proc)


@dataclass
class Worker:
    """A running `prefect worker start`; its log (and its flow runs' output) is in `log`."""

    proc: subprocess.Popen
    log: Path

    def log_tail(self) -> str:
        return f"worker log:\n{_tail(self.log)}"


@contextmanager
def local_prefect_server(home: Path) -> Iterator[LocalPrefect]:
    """Start `prefect server start --host 127.0.0.1 --port P` and wait until its API answers."""
    home.mkdir(parents=True, exist_ok=True)
    server = LocalPrefect(home=home, port=free_port())
    env = server.env(PREFECT_API_DATABASE_CONNECTION_URL=f"sqlite+aiosqlite:///{home / 'prefect.db'}")
    log = home / "server.log"
    with log.open("w") as out:
        proc = subprocess.Popen(
            [*PREFECT, "server", "start", "--host", "127.0.0.1", "--port", str(server.port)],
            env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
        )
    try:
        deadline = time.monotonic() + _START_TIMEOUT_S
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"prefect server exited {proc.returncode} during start:\n{_tail(log)}")
            try:
                if httpx.get(f"{server.api_url}/health", timeout=2.0).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"prefect server did not answer in {_START_TIMEOUT_S:.0f} s:\n{_tail(log)}")
            time.sleep(0.3)
        yield server
    finally:
        _stop(proc)
