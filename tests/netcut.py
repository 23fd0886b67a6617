"""A TCP proxy in front of PostgreSQL that a test can cut (issue 16: a worker cut from the database).

``cut()`` is a network partition neither end is told about: the client's connections stay open and
nothing more crosses them either way (its bytes are read and dropped, as a dead link loses them), and
new connections are accepted and never answered. ``server_sees_after`` seconds later the proxy closes
its side towards PostgreSQL, as the server's TCP keepalives would end a client that vanished
(statepg.KEEPALIVE_S), freeing that client's advisory locks.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time


class CuttableProxy:
    def __init__(self, host: str, port: int) -> None:
        # PostgreSQL's address: a socket directory (libpq's host=/dir) or a TCP host.
        self.target = (host, port)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = int(self.listener.getsockname()[1])
        self.cut_at: float | None = None
        self.server_sees_after = 0.0
        self._pairs: list[tuple[socket.socket, socket.socket]] = []
        self._lock = threading.Lock()
        self._closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _upstream(self) -> socket.socket:
        host, port = self.target
        if host.startswith("/"):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.connect(f"{host}/.s.PGSQL.{port}")
            return s
        return socket.create_connection((host, port))

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            if self.cut_at is not None:
                threading.Thread(target=self._swallow, args=(client,), daemon=True).start()
                continue
            up = self._upstream()
            with self._lock:
                self._pairs.append((client, up))
            threading.Thread(target=self._pump, args=(client, up, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(up, client, False), daemon=True).start()

    def _swallow(self, sock: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while sock.recv(65536):
                pass

    def _pump(self, src: socket.socket, dst: socket.socket, from_client: bool) -> None:
        with contextlib.suppress(OSError):
            while True:
                data = src.recv(65536)
                if not data:
                    break
                if self.cut_at is not None:
                    if from_client:
                        continue  # lost on the dead link
                    break  # the server's answers go nowhere either
                dst.sendall(data)
        if self.cut_at is None:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)
        elif from_client:
            self._swallow(src)

    def cut(self, server_sees_after: float = 1.0) -> None:
        self.cut_at = time.monotonic()

        def server_notices() -> None:
            time.sleep(server_sees_after)
            with self._lock:
                for _client, up in self._pairs:
                    with contextlib.suppress(OSError):
                        # shutdown, not just close: a pump thread blocked in recv() keeps the socket
                        # open past close(); shutdown ends the connection at once (the server sees EOF).
                        up.shutdown(socket.SHUT_RDWR)

        threading.Thread(target=server_notices, daemon=True).start()

    def close(self) -> None:
        self._closed = True
        with contextlib.suppress(OSError):
            self.listener.close()
        with self._lock:
            for client, up in self._pairs:
                for s in (client, up):
                    with contextlib.suppress(OSError):
                        s.close()
