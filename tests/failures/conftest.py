"""Faults for real runs: loopback proxies in front of Postgres and the emulator, a receiver for
alerts, and a flow that takes extra hooks (the moment a fault is injected is a hook's step)."""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

import pytest

from tests.failures.tcp_proxy import TcpProxy

#: Alert settings a test run must never inherit: they would send real alerts.
_ALERT_VARS = ("SLACK_WEBHOOK_URL", "PAGERDUTY_ROUTING_KEY", "PAGERDUTY_EVENTS_URL")


@pytest.fixture(autouse=True)
def _no_real_alerts(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in _ALERT_VARS:
        monkeypatch.delenv(name, raising=False)


def _repoint(url: str, port: int) -> str:
    parts = urlsplit(url)
    netloc = parts.netloc.rsplit(":", 1)[0] + f":{port}"
    return parts._replace(netloc=netloc).geturl()


@pytest.fixture
def pg_proxy(env, monkeypatch: pytest.MonkeyPatch) -> Iterator[TcpProxy]:
    """Every pipeline connection to Postgres goes through a proxy (DATABASE_URL points at it)."""
    url = os.environ["DATABASE_URL"]  # the test's, or one another fixture has changed
    parts = urlsplit(url)
    with TcpProxy(parts.hostname, parts.port) as proxy:
        monkeypatch.setenv("DATABASE_URL", _repoint(url, proxy.port))
        yield proxy


@pytest.fixture
def storage_proxy(env, monkeypatch: pytest.MonkeyPatch) -> Iterator[TcpProxy]:
    """BigQuery Storage reads (gRPC) go through a proxy."""
    host, port = env.emulator.grpc_target.rsplit(":", 1)
    with TcpProxy(host, int(port)) as proxy:
        monkeypatch.setenv("BIGQUERY_STORAGE_EMULATOR_HOST", proxy.address)
        yield proxy


@pytest.fixture
def rest_proxy(env, monkeypatch: pytest.MonkeyPatch) -> Iterator[TcpProxy]:
    """BigQuery REST calls (metadata) go through a proxy that can answer with HTTP errors."""
    parts = urlsplit(env.emulator.rest_url)
    with TcpProxy(parts.hostname, parts.port) as proxy:
        monkeypatch.setenv("BIGQUERY_EMULATOR_HOST", f"http://{proxy.address}")
        yield proxy


class AlertSink:
    """A loopback HTTP server standing in for Slack's webhook and PagerDuty's Events API."""

    #: What a Slack webhook URL looks like; its last part is a secret token.
    slack_path = "/services/T0000/B0000/Sl4ckT0kenCanary"
    pagerduty_path = "/v2/enqueue"
    routing_key = "R0utingKeyCanary0123456789abcdef"

    def __init__(self) -> None:
        self.received: list[tuple[str, dict]] = []
        self.status: dict[str, int] = {}
        self._lock = threading.Lock()
        sink = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                with sink._lock:
                    sink.received.append((self.path, json.loads(body or b"{}")))
                status = sink.status.get(self.path, 202 if self.path == sink.pagerduty_path else 200)
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.end_headers()
                self.wfile.write(b'{"status": "success"}' if status < 300 else b'{"status": "error"}')

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @property
    def slack_url(self) -> str:
        return f"http://127.0.0.1:{self.port}{self.slack_path}"

    @property
    def events_url(self) -> str:
        return f"http://127.0.0.1:{self.port}{self.pagerduty_path}"

    def slack(self) -> list[dict]:
        with self._lock:
            return [body for path, body in self.received if path == self.slack_path]

    def pagerduty(self) -> list[dict]:
        with self._lock:
            return [body for path, body in self.received if path == self.pagerduty_path]

    def clear(self) -> None:
        with self._lock:
            self.received.clear()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def alert_sink(monkeypatch: pytest.MonkeyPatch) -> Iterator[AlertSink]:
    """Slack and PagerDuty configured, both pointing at a loopback receiver."""
    sink = AlertSink()
    monkeypatch.setenv("SLACK_WEBHOOK_URL", sink.slack_url)
    monkeypatch.setenv("PAGERDUTY_ROUTING_KEY", sink.routing_key)
    monkeypatch.setenv("PAGERDUTY_EVENTS_URL", sink.events_url)
    monkeypatch.setenv("ALERT_TIMEOUT", "5")
    yield sink
    sink.close()


@pytest.fixture
def subprocess_env(env) -> dict[str, str]:
    """The environment a `materialize` subprocess gets: the test's settings on the session's Prefect server."""
    from prefect.settings import PREFECT_API_URL

    environ = dict(os.environ)
    environ["PREFECT_API_URL"] = PREFECT_API_URL.value() or ""
    return environ
