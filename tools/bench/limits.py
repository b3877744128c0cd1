"""The machine's limits, measured in the same run as the scenarios and on the same data sizes:
loopback TCP (one stream, and several at once for the parallel-stream scenarios), memcpy,
O_DIRECT disk writes, and populating fresh memory.

The loopback figure is a ceiling: native code in two processes (``examples/tcp_ceiling.rs``,
built here with cargo), each run the best of the kernel's buffer autotuning, 1 MiB and 4 MiB
buffers, and a 1 MiB send buffer with the receive buffer autotuned (vmmpy's), each with reads
that return what has arrived and with reads the kernel wakes once a whole MiB is queued
(SO_RCVLOWAT, as vmmpy's receivers wait), a receive buffer that stays in cache and nothing else
to do. A migration does strictly more, so a ratio above 1 against it is a measuring
bug. Where cargo cannot build it, the Python measurement (one process, threads) stands in and its
``how`` says it is no ceiling.

The ceiling sends one cached MiB again and again; a migration's sender reads each byte of guest
memory from DRAM once. Beside the one-stream rows the bench also gives the same native ceiling
with its sender reading 1 GiB of memory once (:func:`loopback_from_memory`): what moving memory,
not bytes, costs here. The targets stay against the cached ceiling."""

from __future__ import annotations

import json
import mmap
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

from .stats import Figure

MIB, GIB = 1 << 20, 1 << 30
SOCKET_BUFFER = 4 * MIB


ROOT = Path(__file__).resolve().parents[2]
#: Socket buffers the native ceiling tries each run, the best counting: the kernel's autotuning
#: (0); 1 MiB and 4 MiB on both ends; a 1 MiB send buffer with the receive buffer autotuned, what
#: vmmpy's migration sockets ask for between two ends on one host since session 38.
CEILING_BUFFERS = ("0", str(MIB), str(SOCKET_BUFFER), f"{MIB}/auto")
#: How the ceiling's reader waits, tried each run with every buffer: ``any`` returns what has
#: arrived (woken for every segment while it keeps up); ``whole`` has the kernel wake it once a
#: whole MiB is queued (SO_RCVLOWAT), as vmmpy's receivers do. On a VM the second moved 1 GiB
#: over one stream up to three times faster (docs/performance.md, session 31): without it vmmpy
#: beat the "ceiling".
CEILING_WAKES = ("any", "whole")
_ceiling_binary: list[str | None] = []  # built once per process: [path] or [None] when it cannot be


def ceiling_binary() -> str | None:
    """The path of the built ``tcp_ceiling`` example, building it the first time (release, about
    a minute on a fresh checkout); None where cargo is missing or the build fails."""
    if not _ceiling_binary:
        path = None
        try:
            out = subprocess.run(["cargo", "build", "--release", "--example", "tcp_ceiling", "--message-format=json", "--quiet"],
                                 cwd=ROOT, capture_output=True, text=True, timeout=900)
            for line in out.stdout.splitlines():
                msg = json.loads(line) if line.startswith("{") else {}
                if msg.get("reason") == "compiler-artifact" and msg.get("target", {}).get("name") == "tcp_ceiling":
                    path = msg.get("executable")
            if out.returncode != 0:
                path = None
        except (OSError, subprocess.SubprocessError, ValueError):
            path = None
        _ceiling_binary.append(path)
    return _ceiling_binary[0]


def native_loopback(binary: str, size: int, streams: int, buffer: int | str, wake: str = "any", span: int = MIB) -> float:
    """GiB/s of one run of the native ceiling (``buffer``: one of ``CEILING_BUFFERS``, or bytes for
    both buffers; ``wake``: one of ``CEILING_WAKES``; ``span``: bytes of memory its senders read,
    1 MiB the cached ceiling)."""
    out = subprocess.run([binary, str(size), str(streams), str(buffer), wake, str(span)], capture_output=True, text=True, timeout=300)
    for line in out.stdout.splitlines():
        if line.startswith("gib_per_s="):
            return float(line.split("=", 1)[1])
    raise RuntimeError(f"tcp_ceiling failed (exit {out.returncode}): {out.stderr.strip()[-300:]}")


def loopback_ceiling(size: int, runs: int, streams: int = 1) -> Figure:
    """GiB/s over ``streams`` loopback TCP connections at once, ``size`` bytes in all: the native
    ceiling, or the Python measurement where it cannot be built (``how`` says which)."""
    binary = ceiling_binary()
    if binary is None:
        fig = loopback_tcp(size, runs) if streams == 1 else loopback_tcp_streams(size, runs, streams)
        fig.how = "Python threads in one process (cargo could not build examples/tcp_ceiling.rs): NOT a ceiling"
        return fig
    values = [max(native_loopback(binary, size, streams, b, w) for b in CEILING_BUFFERS for w in CEILING_WAKES) for _ in range(runs)]
    return Figure(values, "GiB/s", how=f"native, two processes, {streams} stream(s); best of buffer autotuning, "
                                       "1 and 4 MiB buffers and a 1 MiB send buffer alone, reads woken per segment and per whole MiB "
                                       "(SO_RCVLOWAT), each run")


def loopback_from_memory(size: int, runs: int) -> Figure:
    """GiB/s of the native ceiling's one stream when its sender reads ``size`` bytes of memory once
    (on huge pages where the host offers them) instead of one cached MiB again and again: on a
    quiet host, the most a sender that does nothing but read memory and write it to loopback TCP
    moves here. A migration must read guest memory so; the cached ceiling does not. With a busy
    neighbour it is no ceiling (nor is the cached one): the neighbour takes half of whichever of
    its two threads' CPUs it shares. Each run the best of the same buffers and wake-ups as
    :func:`loopback_ceiling`; RuntimeError where the ceiling cannot be built (there is no Python
    stand-in for this one)."""
    binary = ceiling_binary()
    if binary is None:
        raise RuntimeError("cargo could not build examples/tcp_ceiling.rs")
    values = [max(native_loopback(binary, size, 1, b, w, span=size) for b in CEILING_BUFFERS for w in CEILING_WAKES)
              for _ in range(runs)]
    return Figure(values, "GiB/s", how=f"native, two processes, one stream, the sender reading {size // MIB} MiB of memory "
                                       "once; best of the loopback ceiling's buffers and wake-ups, each run")


def loopback_tcp(size: int, runs: int, chunk: int = 4 * MIB) -> Figure:
    """GiB/s of one TCP stream over 127.0.0.1: ``sendall`` of 4 MiB memoryviews of random bytes,
    a receiver thread with ``recv_into``, both sockets with 4 MiB kernel buffers. Timed from the
    first send until the receiver has every byte."""
    payload = memoryview(np.random.default_rng(7).integers(0, 256, 64 * MIB, dtype=np.uint8).tobytes())
    values = []
    for _ in range(runs):
        listener = socket.create_server(("127.0.0.1", 0))
        port = listener.getsockname()[1]
        received = [0]
        done = threading.Event()

        def receive() -> None:
            conn, _ = listener.accept()
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SOCKET_BUFFER)
            buf = memoryview(bytearray(chunk))
            with conn:
                while received[0] < size:
                    n = conn.recv_into(buf)
                    if n == 0:
                        break
                    received[0] += n
            done.set()

        thread = threading.Thread(target=receive, daemon=True)
        thread.start()
        with socket.create_connection(("127.0.0.1", port)) as sender:
            sender.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SOCKET_BUFFER)
            started = time.perf_counter()
            sent = 0
            while sent < size:
                offset = sent % len(payload)
                n = min(chunk, size - sent, len(payload) - offset)
                sender.sendall(payload[offset:offset + n])
                sent += n
            done.wait(120)
            elapsed = time.perf_counter() - started
        thread.join(5)
        listener.close()
        if received[0] != size:
            raise RuntimeError(f"loopback limit: the receiver got {received[0]} of {size} bytes")
        values.append(size / elapsed / GIB)
    return Figure(values, "GiB/s")


def loopback_tcp_streams(size: int, runs: int, streams: int, chunk: int = 4 * MIB) -> Figure:
    """GiB/s of ``streams`` TCP connections over 127.0.0.1 at once, ``size`` bytes in all (an even
    share each), as ``loopback_tcp`` sends and receives them: one sender and one receiver thread
    per connection. Timed from the first send until every receiver has its share."""
    payload = memoryview(np.random.default_rng(7).integers(0, 256, 64 * MIB, dtype=np.uint8).tobytes())
    share = size // streams
    values = []
    for _ in range(runs):
        listener = socket.create_server(("127.0.0.1", 0), backlog=streams)
        port = listener.getsockname()[1]
        received = [0] * streams
        ready = threading.Barrier(streams + 1)
        failures: list[BaseException] = []

        def receive(index: int) -> None:
            try:
                conn, _ = listener.accept()
                conn.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SOCKET_BUFFER)
                buf = memoryview(bytearray(chunk))
                with conn:
                    while (n := conn.recv_into(buf)) > 0:
                        received[index] += n
            except OSError as err:
                failures.append(err)

        def send(sock: socket.socket) -> None:
            try:
                ready.wait(30)
                sent = 0
                while sent < share:
                    offset = sent % len(payload)
                    n = min(chunk, share - sent, len(payload) - offset)
                    sock.sendall(payload[offset:offset + n])
                    sent += n
                sock.shutdown(socket.SHUT_WR)
            except (OSError, threading.BrokenBarrierError) as err:
                failures.append(err)

        receivers = [threading.Thread(target=receive, args=(i,), daemon=True) for i in range(streams)]
        for t in receivers:
            t.start()
        senders = []
        socks = []
        for _ in range(streams):
            sock = socket.create_connection(("127.0.0.1", port))
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SOCKET_BUFFER)
            socks.append(sock)
            senders.append(threading.Thread(target=send, args=(sock,), daemon=True))
        for t in senders:
            t.start()
        ready.wait(30)
        started = time.perf_counter()
        for t in receivers:
            t.join(120)
        elapsed = time.perf_counter() - started
        for t in senders:
            t.join(5)
        for sock in socks:
            sock.close()
        listener.close()
        if failures or sum(received) != share * streams:
            raise RuntimeError(f"loopback limit over {streams} streams: received {sum(received)} of {share * streams} bytes"
                               + (f" ({failures[0]})" if failures else ""))
        values.append(share * streams / elapsed / GIB)
    return Figure(values, "GiB/s")


def memcpy(size: int, runs: int) -> Figure:
    """GiB/s of ``numpy.copyto`` between two pre-faulted buffers of ``size`` bytes."""
    src = np.empty(size, dtype=np.uint8)
    src.fill(3)
    dst = np.empty_like(src)
    dst.fill(1)
    values = []
    for _ in range(runs):
        started = time.perf_counter()
        np.copyto(dst, src)
        values.append(size / (time.perf_counter() - started) / GIB)
    del src, dst
    return Figure(values, "GiB/s")


def odirect_write(directory: str, size: int, runs: int, block: int = 8 * MIB) -> Figure:
    """GiB/s of writing ``size`` bytes with O_DIRECT (8 MiB writes from an aligned buffer) and
    fsync, to a new file in ``directory``."""
    buf = mmap.mmap(-1, block)
    buf.write(os.urandom(block))
    values = []
    for _ in range(runs):
        path = os.path.join(directory, f".bench-odirect-{os.getpid()}")
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_DIRECT, 0o600)
        try:
            started = time.perf_counter()
            for _ in range(size // block):
                os.write(fd, buf)
            os.fsync(fd)
            values.append(size / (time.perf_counter() - started) / GIB)
        finally:
            os.close(fd)
            os.unlink(path)
    buf.close()
    return Figure(values, "GiB/s")


_POPULATE = """
import mmap, sys, time
size = int(sys.argv[1])
m = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
started = time.perf_counter()
m.madvise(23)  # MADV_POPULATE_WRITE (Linux 5.14): fault every page in, writable
print(time.perf_counter() - started)
"""


def populate_fresh(size: int) -> float:
    """Seconds a new process takes to populate ``size`` bytes of fresh anonymous memory: what a
    destination's first touch of its whole memory costs on this machine, whatever moves the
    bytes. On a VM whose host takes freed memory back (free page reporting), memory freed a while
    ago costs several times memory used just before, so it is measured where it matters (after a
    scenario's runs), not once at the start."""
    out = subprocess.run([sys.executable, "-c", _POPULATE, str(size)], check=True, capture_output=True, text=True, timeout=600)
    return float(out.stdout)
