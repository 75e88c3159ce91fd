"""A loopback TCP proxy in front of one server, for injecting real network faults into real runs.

Clients connect to the proxy's port instead of the server's. The test then cuts every open
connection (the peer sees a reset), refuses new ones (nothing listens on the port), stalls the
bytes flowing back after a given count, or answers the next HTTP requests itself with an error
status, as an overloaded front end would.
"""

from __future__ import annotations

import json
import select
import socket
import struct
import threading
import time

from runtime.local.emulator import free_port

_CHUNK = 65536
_POLL_S = 0.05


def _reset(sock: socket.socket) -> None:
    """Close with RST instead of FIN: the peer sees `connection reset by peer`."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass
    try:
        sock.close()
    except OSError:
        pass


class _Link:
    """One client connection and its upstream connection."""

    def __init__(self, client: socket.socket, upstream: socket.socket) -> None:
        self.client = client
        self.upstream = upstream
        #: The upstream socket's local port: the server sees this connection coming from it.
        self.upstream_port = upstream.getsockname()[1]
        self.closed = threading.Event()

    def close(self, reset: bool = False) -> None:
        self.closed.set()
        for sock in (self.client, self.upstream):
            if reset:
                _reset(sock)
            else:
                try:
                    sock.close()
                except OSError:
                    pass


class TcpProxy:
    """Forwards 127.0.0.1:port to target; a context manager. Every fault is off until asked for."""

    host = "127.0.0.1"

    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self.port = free_port(self.host)
        self._listener: socket.socket | None = None
        self._links: set[_Link] = set()
        self._lock = threading.Lock()
        self._stopped = threading.Event()
        self._flowing = threading.Event()
        self._flowing.set()
        #: Stall (or cut) once this many more server-to-client bytes have passed (None: never).
        self._stall_after: int | None = None
        self._cut_instead = False
        #: Status lines to answer the next HTTP requests with, one each.
        self._http_errors: list[str] = []
        self.connections = 0
        self.cuts = 0
        self.http_errors_sent = 0
        self.bytes_down = 0

    # -- lifecycle -------------------------------------------------------------------------

    def start(self) -> TcpProxy:
        self._listen()
        return self

    def stop(self) -> None:
        self._stopped.set()
        self._flowing.set()
        self._close_listener()
        self.cut(reset=False)

    def __enter__(self) -> TcpProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    # -- faults ----------------------------------------------------------------------------

    def cut(self, reset: bool = True, sparing: frozenset[int] = frozenset()) -> int:
        """Reset every open connection but those whose upstream socket has a local port in `sparing`
        (the server sees them as `client_port`); new ones are still accepted. Returns how many were cut."""
        with self._lock:
            links = {link for link in self._links if link.upstream_port not in sparing}
            self._links -= links
            self.cuts += 1 if reset else 0
        for link in links:
            link.close(reset=reset)
        return len(links)

    def refuse(self) -> None:
        """Stop listening: a new connection is refused; open ones stay."""
        self._close_listener()

    def accept(self) -> None:
        """Listen again on the same port after `refuse`."""
        if self._listener is None:
            self._listen()

    def stall(self, after_bytes: int = 0) -> None:
        """Hold every server-to-client byte once `after_bytes` more have passed (a hung server)."""
        with self._lock:
            self._stall_after, self._cut_instead = after_bytes, False
        if after_bytes == 0:
            self._flowing.clear()

    def cut_after(self, after_bytes: int) -> None:
        """Reset every connection once `after_bytes` more server-to-client bytes have passed (mid-stream)."""
        with self._lock:
            self._stall_after, self._cut_instead = after_bytes, True

    def resume(self) -> None:
        with self._lock:
            self._stall_after = None
        self._flowing.set()

    @property
    def stalled(self) -> bool:
        return not self._flowing.is_set()

    def http_errors(self, *statuses: str) -> None:
        """Answer the next HTTP requests, one per status line (`503 Service Unavailable`), with a
        Google-style JSON error, as an overloaded front end would."""
        with self._lock:
            self._http_errors = list(statuses)

    def wait_for(self, predicate, timeout: float = 60.0) -> bool:  # noqa: ANN001
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate(self):
                return True
            time.sleep(0.01)
        return False

    # -- internals -------------------------------------------------------------------------

    def _listen(self) -> None:
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((self.host, self.port))
        listener.listen(64)
        self._listener = listener
        threading.Thread(target=self._accept_loop, args=(listener,), daemon=True, name=f"proxy-{self.port}").start()

    def _close_listener(self) -> None:
        listener, self._listener = self._listener, None
        if listener is not None:
            try:
                listener.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            listener.close()

    def _accept_loop(self, listener: socket.socket) -> None:
        while not self._stopped.is_set():
            try:
                client, _ = listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.target, timeout=10)
                upstream.settimeout(None)
            except OSError:
                _reset(client)
                continue
            for sock in (client, upstream):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            link = _Link(client, upstream)
            with self._lock:
                self._links.add(link)
                self.connections += 1
            threading.Thread(target=self._pump, args=(link, client, upstream, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(link, upstream, client, False), daemon=True).start()

    def _answer_http_error(self, link: _Link, data: bytes) -> bool:
        """When an HTTP error is due and `data` starts a request, answer it and close the link."""
        with self._lock:
            due = bool(self._http_errors) and data.split(b" ", 1)[0] in (b"GET", b"POST", b"PUT", b"PATCH", b"DELETE")
            if due:
                status = self._http_errors.pop(0)
                self.http_errors_sent += 1
        if not due:
            return False
        code = int(status.split()[0])
        body = json.dumps({"error": {"code": code, "message": f"{status} (injected by the test proxy)"}}).encode()
        head = (
            f"HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n"
            "Connection: close\r\n\r\n"
        ).encode()
        try:
            link.client.sendall(head + body)
        except OSError:
            pass
        with self._lock:
            self._links.discard(link)
        link.close()
        return True

    def _pump(self, link: _Link, src: socket.socket, dst: socket.socket, upward: bool) -> None:
        try:
            while not link.closed.is_set():
                # Wait in short slices, never in a blocking recv: a socket closed under a blocked
                # recv is not really closed (no reset reaches the peer) until the recv returns.
                if not select.select([src], [], [], _POLL_S)[0]:
                    continue
                data = src.recv(_CHUNK)
                if not data:
                    break
                if upward:
                    if self._answer_http_error(link, data):
                        return
                    dst.sendall(data)
                    continue
                # Server to client: pass what the stall budget allows, then hold the rest.
                head, tail, cut = self._split_at_stall(data)
                if head:
                    dst.sendall(head)
                    self.bytes_down += len(head)
                if cut:
                    self.cut()
                    return
                if tail:
                    if not self._wait_flowing():
                        return
                    dst.sendall(tail)
                    self.bytes_down += len(tail)
        except OSError:
            pass
        finally:
            if not link.closed.is_set():
                with self._lock:
                    self._links.discard(link)
                link.close()

    def _split_at_stall(self, data: bytes) -> tuple[bytes, bytes, bool]:
        """(bytes to pass now, bytes to hold until resumed, whether to cut every connection now)."""
        with self._lock:
            if not self._flowing.is_set():
                return b"", data, False
            budget = self._stall_after
            if budget is None or len(data) < budget:
                if budget is not None:
                    self._stall_after = budget - len(data)
                return data, b"", False
            self._stall_after = None
            if self._cut_instead:
                return data[:budget], b"", True
            self._flowing.clear()
            return data[:budget], data[budget:], False

    def _wait_flowing(self) -> bool:
        while not self._flowing.is_set():
            if self._stopped.is_set():
                return False
            self._flowing.wait(0.05)
        return not self._stopped.is_set()
