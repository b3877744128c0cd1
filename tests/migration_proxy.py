"""A loopback TCP proxy that can cut or corrupt the source-to-destination stream at a byte offset."""

from __future__ import annotations

import socket
import threading


class Proxy:
    def __init__(self, target: tuple[str, int], *, cut_after: int | None = None, flip_at: int | None = None) -> None:
        self.target = target
        self.cut_after = cut_after
        self.flip_at = flip_at
        self.forwarded = 0
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        self.listener.settimeout(30)
        try:
            client, _ = self.listener.accept()
        except OSError:
            return
        upstream = socket.create_connection(self.target, timeout=30)
        back = threading.Thread(target=self._pump_back, args=(upstream, client), daemon=True)
        back.start()
        try:
            while True:
                data = bytearray(client.recv(65536))
                if not data:
                    break
                start = self.forwarded
                if self.flip_at is not None and start <= self.flip_at < start + len(data):
                    data[self.flip_at - start] ^= 0xFF
                if self.cut_after is not None and start + len(data) >= self.cut_after:
                    upstream.sendall(data[: self.cut_after - start])
                    self.forwarded = self.cut_after
                    break
                upstream.sendall(data)
                self.forwarded += len(data)
        except OSError:
            pass
        finally:
            for s in (client, upstream):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
            back.join(5)
            client.close()
            upstream.close()
            self.listener.close()

    @staticmethod
    def _pump_back(upstream: socket.socket, client: socket.socket) -> None:
        try:
            while True:
                data = upstream.recv(65536)
                if not data:
                    break
                client.sendall(data)
        except OSError:
            pass
