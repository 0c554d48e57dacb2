"""A loopback TCP proxy that a test can cut: put it between a run and a server (moto's S3) to make the server
unreachable for a while without restarting it (moto keeps its data in memory).

``CuttableProxy(target_port)`` listens on its own 127.0.0.1 port and pipes every connection to the target.
``cut(seconds)`` drops every open connection and closes the listening socket, so new connections are refused,
for ``seconds``; then it listens again on the same port. ``cut_on(pattern, seconds, occurrence)`` cuts by itself
when a client sends a request line matching ``pattern`` whose first group is the ``occurrence``-th distinct value
seen (e.g. the first upload into the second checkpoint directory), dropping that request too.
"""
from __future__ import annotations

import re
import socket
import threading
import time


class CuttableProxy:
    def __init__(self, target_port: int, target_host: str = "127.0.0.1") -> None:
        self.target = (target_host, target_port)
        self._listener = self._listen(0)
        self.port = self._listener.getsockname()[1]
        self._lock = threading.Lock()
        self._open: set[socket.socket] = set()
        self._stopped = threading.Event()
        self._down_until = 0.0
        self._trigger: tuple[re.Pattern[bytes], float, int] | None = None
        self._seen: list[bytes] = []
        self.cuts: list[tuple[float, float]] = []  # (start, end) wall-clock times of every cut
        self.cut_request: bytes | None = None  # the request line that triggered ``cut_on``
        self._acceptor = threading.Thread(target=self._accept_loop, name="proxy-accept", daemon=True)
        self._acceptor.start()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _listen(self, port: int) -> socket.socket:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", port))
        sock.listen(64)
        sock.settimeout(0.2)
        return sock

    def cut_on(self, pattern: bytes, seconds: float, occurrence: int = 1) -> None:
        """Cut for ``seconds`` when the ``occurrence``-th distinct first group of ``pattern`` is sent by a client."""
        self._trigger = (re.compile(pattern), seconds, occurrence)

    def cut(self, seconds: float) -> None:
        """Drop every open connection and refuse new ones for ``seconds``."""
        with self._lock:
            if time.time() < self._down_until:
                return
            self._down_until = time.time() + seconds
            self.cuts.append((time.time(), self._down_until))
            listener, self._listener = self._listener, None
            conns, self._open = list(self._open), set()
        for sock in ([listener] if listener is not None else []) + conns:
            try:  # shutdown wakes a thread blocked in accept/recv on it (close alone would not, on Linux)
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            sock.close()

    def _accept_loop(self) -> None:
        while not self._stopped.is_set():
            with self._lock:
                listener = self._listener
                down = time.time() < self._down_until
            if listener is None:
                if down:
                    time.sleep(0.05)
                    continue
                try:
                    listener = self._listen(self.port)
                except OSError:  # the port is still in TIME_WAIT cleanup: try again shortly
                    time.sleep(0.05)
                    continue
                with self._lock:
                    self._listener = listener
            try:
                client, _ = listener.accept()
            except (socket.timeout, OSError):
                continue
            try:
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError:
                client.close()
                continue
            upstream.settimeout(None)
            client.settimeout(None)
            with self._lock:
                self._open.update((client, upstream))
            threading.Thread(target=self._pump, args=(client, upstream, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, False), daemon=True).start()

    def _check_trigger(self, data: bytes) -> bool:
        if self._trigger is None:
            return False
        pattern, seconds, occurrence = self._trigger
        for match in pattern.finditer(data):
            key = match.group(1)
            if key not in self._seen:
                self._seen.append(key)
            if len(self._seen) >= occurrence and key == self._seen[occurrence - 1]:
                self._trigger = None
                self.cut_request = data[match.start():data.find(b"\r\n", match.start())]
                self.cut(seconds)
                return True
        return False

    def _pump(self, src: socket.socket, dst: socket.socket, from_client: bool) -> None:
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                if from_client and self._check_trigger(data):
                    return  # this request is dropped with its connection
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
            with self._lock:
                self._open.discard(src)
                self._open.discard(dst)

    def close(self) -> None:
        """Stop listening and drop every open connection (not recorded as a cut)."""
        self._stopped.set()
        self._acceptor.join(timeout=5)
        with self._lock:
            listener, self._listener = self._listener, None
            conns, self._open = list(self._open), set()
        for sock in ([listener] if listener is not None else []) + conns:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            sock.close()
