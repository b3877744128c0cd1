"""A Unix-socket relay for local migrations that passes the memory descriptors on (SCM_RIGHTS)
and can stop the session at a message boundary to kill -9 one side there.

The source connects to ``proxy_path``; the relay connects to ``target`` (the destination's
``-R unix:PATH``) and forwards both directions unit by unit: a frame (24-byte header, payload
length at offset 12), or, after LOCAL_MEMORY, the one byte that carries the descriptors, which is
forwarded with them. With ``kill=(direction, message, proc)`` the relay holds the first unit of
type ``message`` going ``direction`` ("s2d" or "d2s"), kills ``proc`` with SIGKILL, waits for it
to die, then drops that unit and closes both ends: the survivor sees the dead peer's end of
stream at exactly that point (``fired`` says it was reached). The relay takes one connection:
once it has it, its listener is closed, so a later connect to ``proxy_path`` is refused as one to
a dead destination's socket is (a listener left open would queue it unanswered: a source telling
the dead destination "abort" would wait out its whole resolve time)."""

from __future__ import annotations

import os
import signal
import socket
import struct
import threading

from vmmpy.migration import protocol as P


class UnixKillProxy:
    def __init__(self, proxy_path, target, kill=None) -> None:
        self.target = str(target)
        self.kill = kill
        self.fired = threading.Event()
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(str(proxy_path))
        self.listener.listen(1)
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        self.listener.settimeout(60)
        try:
            src, _ = self.listener.accept()
        except OSError:
            return
        finally:
            self.listener.close()
        dst = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        dst.connect(self.target)
        done = threading.Event()
        for direction, a, b in (("s2d", src, dst), ("d2s", dst, src)):
            threading.Thread(target=self._pump, args=(direction, a, b, (src, dst), done), daemon=True).start()

    def _pump(self, direction, a, b, both, done) -> None:
        buf, fds, after_local = b"", [], False
        try:
            while not done.is_set():
                data, new_fds, _flags, _ = socket.recv_fds(a, 1 << 20, 4)
                fds += new_fds
                if not data:
                    break
                buf += data
                while True:
                    if after_local:
                        if not buf:
                            break
                        socket.send_fds(b, [buf[:1]], fds)
                        for fd in fds:
                            os.close(fd)
                        buf, fds, after_local = buf[1:], [], False
                        continue
                    if len(buf) < P.HEADER_SIZE:
                        break
                    (length,) = struct.unpack_from("<I", buf, 12)
                    (kind,) = struct.unpack_from("<H", buf, 6)
                    if len(buf) < P.HEADER_SIZE + length:
                        break
                    if self.kill is not None and self.kill[0] == direction and self.kill[1] == P.MessageType(kind):
                        proc = self.kill[2]
                        proc.send_signal(signal.SIGKILL)
                        proc.wait(timeout=30)
                        self.fired.set()
                        done.set()
                        return
                    b.sendall(buf[: P.HEADER_SIZE + length])
                    after_local = P.MessageType(kind) is P.MessageType.LOCAL_MEMORY
                    buf = buf[P.HEADER_SIZE + length:]
        except OSError:
            pass
        finally:
            done.set()
            for s in both:
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self) -> None:
        self.listener.close()
