"""A TCP proxy on loopback in front of the local AWS endpoint (moto server) that plays an AWS
outage. Clients set AWS_ENDPOINT_URL to `proxy.endpoint_url`; bytes pass through unchanged.

While down, new connections fail (mode "refuse": the listener is closed, so connect() gets
ECONNREFUSED; mode "reset": connections are accepted and reset at once) and every open
connection, a pending SQS long-poll included, is cut. moto behind it keeps running with its
state, so what a client wrote before the outage is there after it.

    proxy = OutageProxy(aws.endpoint_url).start()
    proxy.outage(5)          # down now, up again in 5 s (returns at once; wait=True blocks)
    proxy.down(); proxy.up()
    proxy.outage_seconds     # total time down so far

    python -m devstack.outage_proxy --target http://127.0.0.1:4566 [--port 4567]
    (prints its URL; SIGUSR1 = down, SIGUSR2 = up, SIGTERM = stop)
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import select
import signal
import socket
import struct
import threading
import time
from dataclasses import dataclass, field
from typing import Literal
from urllib.parse import urlsplit

log = logging.getLogger(__name__)

BUFFER_BYTES = 64 * 1024
ACCEPT_POLL_S = 0.05  # how soon the accept loop notices stop(); connections are not delayed


@dataclass(eq=False)  # kept in a set by identity
class _Connection:
    client: socket.socket
    upstream: socket.socket | None = None
    open_pumps: int = 2
    lock: threading.Lock = field(default_factory=threading.Lock)


def _parse_target(target: str | tuple[str, int]) -> tuple[str, int]:
    if isinstance(target, tuple):
        return target
    parts = urlsplit(target if "://" in target else f"tcp://{target}")
    if not parts.hostname or not parts.port:
        raise ValueError(f"target needs a host and a port: {target!r}")
    return parts.hostname, parts.port


def _reset(sock: socket.socket) -> None:
    """Close so the peer sees a reset (RST), not an orderly end of stream."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    with contextlib.suppress(OSError):
        sock.close()


class OutageProxy:
    """Forwards raw TCP from `host:port` to `target`; `down()`/`up()`/`outage(s)` cut it."""

    def __init__(
        self,
        target: str | tuple[str, int],
        host: str = "127.0.0.1",
        port: int = 0,
        mode: Literal["refuse", "reset"] = "refuse",
        max_connections: int = 256,
        connect_timeout_s: float = 5.0,
    ) -> None:
        if mode not in ("refuse", "reset"):
            raise ValueError("mode must be 'refuse' or 'reset'")
        self.target = _parse_target(target)
        self.host = host
        self.port = port
        self.mode = mode
        self.max_connections = max_connections
        self.connect_timeout_s = connect_timeout_s
        self._lock = threading.Lock()
        self._listener: socket.socket | None = None
        self._connections: set[_Connection] = set()
        self._stopped = threading.Event()
        self._thread: threading.Thread | None = None
        self._timer: threading.Timer | None = None
        self._down_since: float | None = None
        self._outage_total = 0.0
        self._up_event = threading.Event()
        self._up_event.set()
        self.stats = {"connections": 0, "refused": 0, "cut": 0, "outages": 0}

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> OutageProxy:
        with self._lock:
            self._listener = self._bind()
            self.port = self._listener.getsockname()[1]
        self._thread = threading.Thread(target=self._accept_loop, name="outage-proxy", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopped.set()
        with self._lock:
            if self._timer is not None:
                self._timer.cancel()
            if self._listener is not None:
                self._close_listener()
            self._cut_all()
        if self._thread is not None:
            self._thread.join(timeout=2)

    def __enter__(self) -> OutageProxy:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def endpoint_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    # -- outages -----------------------------------------------------------------------------

    @property
    def is_down(self) -> bool:
        with self._lock:
            return self._down_since is not None

    @property
    def outage_seconds(self) -> float:
        """Total time spent down, the current outage included."""
        with self._lock:
            total = self._outage_total
            if self._down_since is not None:
                total += time.monotonic() - self._down_since
            return total

    def down(self) -> None:
        """Refuse new connections and cut the open ones, until `up()`."""
        with self._lock:
            if self._down_since is not None:
                return
            self._down_since = time.monotonic()
            self._up_event.clear()
            self.stats["outages"] += 1
            if self.mode == "refuse" and self._listener is not None:
                self._close_listener()
            self._cut_all()
        log.info("outage proxy %s: down", self.endpoint_url)

    def up(self) -> None:
        with self._lock:
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            if self._down_since is None:
                return
            if self._listener is None and not self._stopped.is_set():
                self._listener = self._bind()
            self._outage_total += time.monotonic() - self._down_since
            self._down_since = None
            self._up_event.set()
        log.info("outage proxy %s: up", self.endpoint_url)

    def outage(self, seconds: float, wait: bool = False) -> None:
        """Down now, up after `seconds` (a timer); with `wait`, return once it is up again."""
        self.down()
        timer = threading.Timer(seconds, self.up)
        timer.daemon = True
        with self._lock:
            if self._timer is not None:
                self._timer.cancel()
            self._timer = timer
        timer.start()
        if wait:
            self._up_event.wait(seconds + 5)

    def report(self) -> dict:
        """Counts (connections forwarded, refused, cut; outages), open connections, and the
        total outage time in seconds."""
        with self._lock:
            stats, open_now = dict(self.stats), len(self._connections)
        return {
            **stats,
            "open": open_now,
            "outage_seconds": round(self.outage_seconds, 3),
            "down": self.is_down,
        }

    # -- plumbing ----------------------------------------------------------------------------

    def _bind(self) -> socket.socket:
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        # Rebinding the same port after an outage must not wait for TIME_WAIT.
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((self.host, self.port))
        listener.listen(128)
        return listener

    def _close_listener(self) -> None:
        # Caller holds self._lock. shutdown() stops listening at once; close() alone would
        # leave the socket listening while the accept loop's select() still holds it, and
        # connections queued meanwhile would be reset instead of refused.
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)
        self._listener.close()
        self._listener = None

    def _accept_loop(self) -> None:
        while not self._stopped.is_set():
            with self._lock:
                listener = self._listener
            if listener is None:
                self._stopped.wait(ACCEPT_POLL_S)
                continue
            try:
                ready, _, _ = select.select([listener], [], [], ACCEPT_POLL_S)
                if not ready:
                    continue
                client, _ = listener.accept()
            except (OSError, ValueError):
                continue  # down() or stop() closed the listener under us
            try:
                self._admit(client)
            except Exception:  # one bad connection must not stop the proxy
                log.exception("outage proxy: admitting a connection failed")
                _reset(client)

    def _admit(self, client: socket.socket) -> None:
        with self._lock:
            if self._down_since is not None or len(self._connections) >= self.max_connections:
                self.stats["refused"] += 1
                _reset(client)
                return
            conn = _Connection(client)
            self._connections.add(conn)
            self.stats["connections"] += 1
        threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: _Connection) -> None:
        try:
            upstream = socket.create_connection(self.target, timeout=self.connect_timeout_s)
            upstream.settimeout(None)
        except OSError:
            self._forget(conn)
            _reset(conn.client)
            return
        with self._lock:
            cut = conn not in self._connections  # cut while connecting
            if not cut:
                conn.upstream = upstream
        if cut:
            upstream.close()
            _reset(conn.client)
            return
        threading.Thread(target=self._pump, args=(upstream, conn.client, conn), daemon=True).start()
        self._pump(conn.client, upstream, conn)

    def _pump(self, src: socket.socket, dst: socket.socket, conn: _Connection) -> None:
        try:
            while True:
                data = src.recv(BUFFER_BYTES)
                if not data:
                    break
                dst.sendall(data)
        except OSError:
            pass
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)  # pass the end of stream on
        with conn.lock:
            conn.open_pumps -= 1
            last = conn.open_pumps == 0
        if last:
            self._forget(conn)
            for sock in (conn.client, conn.upstream):
                if sock is not None:
                    with contextlib.suppress(OSError):
                        sock.close()

    def _forget(self, conn: _Connection) -> None:
        with self._lock:
            self._connections.discard(conn)

    def _cut_all(self) -> None:
        # Caller holds self._lock. shutdown() wakes the pumps blocked in recv(); the linger
        # option turns the client's close into a reset.
        for conn in list(self._connections):
            self.stats["cut"] += 1
            with contextlib.suppress(OSError):
                conn.client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            for sock in (conn.client, conn.upstream):
                if sock is not None:
                    with contextlib.suppress(OSError):
                        sock.shutdown(socket.SHUT_RDWR)
        self._connections.clear()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--target", required=True, help="the AWS endpoint, e.g. http://127.0.0.1:4566"
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--mode", choices=("refuse", "reset"), default="refuse")
    args = parser.parse_args()
    proxy = OutageProxy(args.target, args.host, args.port, mode=args.mode).start()
    print(proxy.endpoint_url, flush=True)
    stopped = threading.Event()
    signal.signal(signal.SIGUSR1, lambda *_: proxy.down())
    signal.signal(signal.SIGUSR2, lambda *_: proxy.up())
    signal.signal(signal.SIGTERM, lambda *_: stopped.set())
    signal.signal(signal.SIGINT, lambda *_: stopped.set())
    stopped.wait()
    proxy.stop()


if __name__ == "__main__":
    main()
