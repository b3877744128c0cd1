"""QEMU doing the same work as vmmpy's scenarios, measured in the same run, where Debian's
qemu-system-x86 is installed (``apt-get install -y qemu-system-x86``). Each measurement starts
fresh QEMU processes with no guest OS, talks QMP to them (``qmp.py``), and returns a figure in
the unit of the vmmpy row it is compared with.

Common to every case: TCG, ``-machine q35``, ``-nodefaults -display none``, migration
``max-bandwidth`` lifted to 100 GB/s, the ``events`` capability on. The source's RAM is a
``memory-backend-file`` with ``share=off,prealloc=on`` over a file of random bytes on tmpfs (a
private mapping: the RAM starts as the file's contents and QEMU never writes the file;
``prealloc`` copies every page into the process before anything is timed, as vmmpy's source has
its memory restored into it before its migration starts), or plain ``memory-backend-ram`` for
the zero guest; the destination's RAM is ``memory-backend-ram``, with ``prealloc=on`` (populated
before anything is timed, like vmmpy's wired ``-S``) or without it (like vmmpy's default unwired
destination), as each row says. ``SOURCE_MEMORY``, ``destination_memory`` and ``_prepare`` are
these settings; tests/test_bench_fairness.py pins them.

Not here: vmmpy's processes, the table (``run.py``), any scenario without a QEMU equivalent."""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .procs import die_with_parent, free_port, process_cpu_seconds, wait_settled
from .qmp import MigrateInfo, Qmp, QmpError, QmpTimeout, event_time, migrate_info
from .stats import Figure

MIB, GIB = 1 << 20, 1 << 30
BINARY = "qemu-system-x86_64"
INSTALL = "apt-get install -y qemu-system-x86"
MAX_BANDWIDTH = 100_000_000_000  # bytes/s: QEMU 7.2's default cap is 128 MiB/s
IDLE_SETTLE_S = 3.0  # let SeaBIOS finish POST before a live migration (see docs/performance.md)


def find_binary() -> str | None:
    return shutil.which(BINARY)


def version(binary: str) -> str:
    try:
        out = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError) as err:
        return f"unknown ({err})"
    return out.splitlines()[0].strip() if out else "unknown"


@dataclass
class QemuFigure:
    """QEMU's figure for one vmmpy row: ``figure`` in the row's unit, how it was taken, and
    other QEMU figures of the same work (``others``: label -> Figure) for the notes and JSON."""

    figure: Figure
    how: str
    others: dict[str, Figure] = field(default_factory=dict)
    details: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"figure": self.figure.to_dict(), "how": self.how, "others": {k: v.to_dict() for k, v in self.others.items()},
                "details": self.details}


def speedup(ours: Figure, qemu: Figure) -> float | None:
    """How many times better vmmpy did than QEMU on the same work: for rates (units ending in
    /s) ours / QEMU's, for durations QEMU's / ours. Above 1, vmmpy was faster."""
    if ours.unit != qemu.unit or not ours.values or not qemu.values or not ours.median or not qemu.median:
        return None
    return ours.median / qemu.median if ours.unit.endswith("/s") else qemu.median / ours.median


class QemuVm:
    """One qemu-system-x86_64 process with a QMP socket in ``work``; ``stop`` (also on any
    failure) kills it with SIGKILL if ``quit`` does not end it and removes its socket and log."""

    def __init__(self, binary: str, work: Path, name: str, *, memory: str, size: int, extra: list[str],
                 accel: str = "tcg", start_timeout: float = 120.0) -> None:
        self.name = name
        self.qmp_path = work / f"qemu-{name}-{os.getpid()}.qmp"
        self.log_path = work / f"qemu-{name}-{os.getpid()}.log"
        argv = [binary, "-name", name, "-accel", accel, "-machine", "q35,memory-backend=m0", "-m", f"{size // MIB}M",
                "-object", f"{memory},id=m0,size={size}", "-nodefaults", "-display", "none",
                "-qmp", f"unix:{self.qmp_path},server=on,wait=off", *extra]
        self.argv = argv
        self.log = open(self.log_path, "wb")
        self.spawned = time.time()  # the command, for rows timed from it (restore)
        self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=self.log, stderr=subprocess.STDOUT,
                                     preexec_fn=die_with_parent)
        self.qmp: Qmp | None = None
        try:
            # the greeting comes once the main loop runs, i.e. after prealloc=on has populated RAM
            self.qmp = Qmp(str(self.qmp_path), timeout=start_timeout, alive=self._alive)
        except BaseException:
            self.stop()
            raise

    def _alive(self) -> None:
        if self.proc.poll() is not None:
            raise QmpError(f"QEMU {self.name} exited {self.proc.returncode}: {self._log_tail()}")

    def _log_tail(self) -> str:
        try:
            return self.log_path.read_text(errors="replace").strip()[-500:]
        except OSError:
            return ""

    def execute(self, command: str, arguments: dict[str, Any] | None = None, timeout: float = 30.0) -> Any:
        assert self.qmp is not None
        try:
            return self.qmp.execute(command, arguments, timeout)
        except QmpError as err:
            if self.proc.poll() is not None:
                raise QmpError(f"{err}; QEMU {self.name} exited {self.proc.returncode}: {self._log_tail()}") from err
            raise

    def cpu_seconds(self) -> float:
        """User plus system CPU time of the QEMU process so far (all its threads)."""
        return process_cpu_seconds(self.proc.pid)

    def query_migrate(self, timeout: float = 30.0) -> MigrateInfo:
        return migrate_info(self.execute("query-migrate", timeout=timeout))

    def stop(self) -> None:
        if self.qmp is not None and self.proc.poll() is None:
            try:
                self.qmp.execute("quit", timeout=5)
            except (QmpError, OSError):
                pass
        if self.qmp is not None:
            self.qmp.close()
            self.qmp = None
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(30)
        self.log.close()
        for path in (self.qmp_path, self.log_path):
            try:
                path.unlink()
            except FileNotFoundError:
                pass


def _prepare(vm: QemuVm, multifd: int, downtime_ms: int | None = None) -> None:
    caps = [{"capability": "events", "state": True}] + ([{"capability": "multifd", "state": True}] if multifd else [])
    vm.execute("migrate-set-capabilities", {"capabilities": caps})
    params: dict[str, Any] = {"max-bandwidth": MAX_BANDWIDTH}
    if multifd:
        params["multifd-channels"] = multifd
    if downtime_ms is not None:
        params["downtime-limit"] = downtime_ms
    vm.execute("migrate-set-parameters", params)


def _migration_status(status: str) -> Callable[[dict[str, Any]], bool]:
    return lambda e: e.get("data", {}).get("status") in (status, "failed", "cancelled")


def _finished(vm: QemuVm, timeout: float) -> MigrateInfo:
    """The source's final ``query-migrate``, once its figures are filled in (bounded polling)."""
    deadline = time.monotonic() + timeout
    while True:
        info = vm.query_migrate(timeout)  # blocks while an exec: child finishes
        if info.status in ("failed", "cancelled"):
            raise QmpError(f"QEMU {vm.name}: migration {info.status}: {info.error or 'no reason given'}")
        if info.complete or time.monotonic() > deadline:
            if not info.complete:
                raise QmpError(f"QEMU {vm.name}: migration still {info.status} after {timeout:g} s")
            return info
        time.sleep(0.005)


def _completed_at(dst: QemuVm, timeout: float, src: QemuVm | None = None) -> float:
    """Host time of the destination's MIGRATION ``completed`` event. Looks at the source every
    half second meanwhile, so a source that failed (the destination then just waits) ends the
    wait at once with the source's reason."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            wait = min(0.5, max(0.01, deadline - time.monotonic()))
            event = dst.qmp.wait_event("MIGRATION", _migration_status("completed"), wait)
            break
        except QmpTimeout:
            if time.monotonic() > deadline:
                raise
        dst._alive()
        if src is not None:
            info = src.query_migrate()
            if info.status in ("failed", "cancelled"):
                raise QmpError(f"QEMU {src.name}: migration {info.status}: {info.error or 'no reason given'}")
    if event["data"]["status"] != "completed":
        raise QmpError(f"QEMU {dst.name}: incoming migration {event['data']['status']}: {dst._log_tail()}")
    return event_time(event)


class QemuBench:
    """QEMU measurements for one bench run: owns the random RAM files it writes on tmpfs and
    removes them in ``close``; warm migration runs are cached so rows comparing with the same
    QEMU work (warm-1g and warm-1g-wired) share one measurement."""

    def __init__(self, binary: str, work: Path, shm: str, runs: int) -> None:
        self.binary, self.work, self.shm, self.runs = binary, work, shm, runs
        self.files: dict[int, str] = {}
        self.cache: dict[tuple[int, int, bool], list[dict[str, Any]]] = {}  # (GiB, channels, prealloc) -> warm migration runs

    def close(self) -> None:
        for gib in list(self.files):
            self._drop_random(gib)

    def _random_file(self, gib: int) -> str:
        if gib not in self.files:
            path = os.path.join(self.shm, f"bench-qemu-{os.getpid()}-random{gib}g.ram")
            self.files[gib] = path
            rng = np.random.default_rng(gib)
            with open(path, "wb") as f:
                for _ in range(gib * GIB // (64 * MIB)):
                    f.write(rng.integers(0, 1 << 64, 8 * MIB, dtype=np.uint64, endpoint=False).tobytes())
        return self.files[gib]

    def _drop_random(self, gib: int) -> None:
        path = self.files.pop(gib, None)
        if path:
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass

    def _vm(self, name: str, size: int, memory: str, extra: list[str]) -> QemuVm:
        # prealloc of N GiB takes about N s here (first touch); give it room
        return QemuVm(self.binary, self.work, name, memory=memory, size=size, extra=extra,
                      start_timeout=60 + 30 * size / GIB)

    def _source_memory(self, gib: int | None) -> str:
        if gib is None:
            return "memory-backend-ram"
        return f"{SOURCE_MEMORY},mem-path={self._random_file(gib)}"

    def migrate_once(self, size: int, source_gib: int | None, *, multifd: int = 0, live: bool = False,
                     downtime_ms: int | None = None, prealloc: bool = True) -> dict[str, Any]:
        """One migration over 127.0.0.1; wall seconds from ``migrate`` to the destination's
        MIGRATION ``completed`` event, plus the source's ``query-migrate`` figures. The
        destination's RAM is preallocated unless ``prealloc`` is false."""
        src = dst = None
        try:
            dst = self._vm("dst", size, destination_memory(prealloc), ([] if live else ["-S"]) + ["-incoming", "defer"])
            src = self._vm("src", size, self._source_memory(source_gib), [] if live else ["-S"])
            for vm in (src, dst):
                _prepare(vm, multifd, downtime_ms if vm is src else None)
            port = free_port()
            uri = f"tcp:127.0.0.1:{port}"
            dst.execute("migrate-incoming", {"uri": uri})
            if live:
                time.sleep(IDLE_SETTLE_S)
            wait_settled(src.proc.pid)  # as vmmpy's source is (procs.migrate)
            timeout = 120 + 60 * size / GIB
            cpu = src.cpu_seconds() + dst.cpu_seconds()
            started = time.time()
            src.execute("migrate", {"uri": uri})
            done = _completed_at(dst, timeout, src)
            info = _finished(src, 30)
            cpu = src.cpu_seconds() + dst.cpu_seconds() - cpu
            result = {"seconds": done - started, "cpu_seconds": cpu, "total_time_ms": info.total_time_ms, "downtime_ms": info.downtime_ms,
                      "setup_time_ms": info.setup_time_ms, "transferred": info.transferred,
                      "normal_pages": info.normal_pages, "duplicate_pages": info.duplicate_pages,
                      "dirty_sync_count": info.dirty_sync_count}
            if live:  # the source's STOP to the destination's RESUME, both on the host clock
                stop = src.qmp.wait_event("STOP", timeout=5)
                resume = dst.qmp.wait_event("RESUME", timeout=30)
                result["host_downtime_ms"] = (event_time(resume) - event_time(stop)) * 1000
            return result
        finally:
            for vm in (src, dst):
                if vm is not None:
                    vm.stop()

    def save_once(self, size: int, gib: int, path: str) -> dict[str, Any]:
        """Migrate a paused guest to ``exec:cat > path && sync path`` (QEMU 7.2 has no ``file:``
        URI). Wall seconds from ``migrate`` until the shell has written and fsynced the file (the
        ``date`` it writes last), plus the source's figures."""
        stamp = path + ".done"
        src = None
        try:
            src = self._vm("save", size, self._source_memory(gib), ["-S"])
            _prepare(src, 0)
            wait_settled(src.proc.pid)
            file, part, done = (shlex.quote(p) for p in (path, stamp + ".part", stamp))
            command = f"cat > {file} && sync {file} && date +%s.%N > {part} && mv {part} {done}"
            started = time.time()
            src.execute("migrate", {"uri": f"exec:{command}"})
            try:
                info = _finished(src, 120 + 60 * size / GIB)
            except QmpError as err:
                raise QmpError(f"{err} (saving to {path})") from err
            deadline = time.monotonic() + 120
            while not os.path.exists(stamp):
                if time.monotonic() > deadline:
                    raise QmpError(f"QEMU save: {path} not written within 120 s of completion")
                time.sleep(0.002)
            with open(stamp) as f:
                ended = float(f.read().strip())
            return {"seconds": ended - started, "bytes": os.stat(path).st_size, "total_time_ms": info.total_time_ms}
        finally:
            if src is not None:
                src.stop()
            for p in (stamp, stamp + ".part"):
                try:
                    os.unlink(p)
                except FileNotFoundError:
                    pass

    def restore_once(self, size: int, path: str, prealloc: bool = True) -> dict[str, Any]:
        """A fresh QEMU loading ``path`` with ``exec:cat``: wall seconds from the command (the
        process started) to its MIGRATION ``completed`` event, the guest ready to run, as vmmpy's
        restore row times ``vmmrun -r`` (``seconds``); and from ``migrate-incoming`` alone
        (``load_seconds``)."""
        dst = None
        try:
            dst = self._vm("restore", size, destination_memory(prealloc), ["-S", "-incoming", "defer"])
            _prepare(dst, 0)
            started = time.time()
            dst.execute("migrate-incoming", {"uri": f"exec:cat {shlex.quote(path)}"})
            done = _completed_at(dst, 120 + 60 * size / GIB)
            return {"seconds": done - dst.spawned, "load_seconds": done - started, "bytes": os.stat(path).st_size}
        finally:
            if dst is not None:
                dst.stop()

    # --- the measurements vmmpy's rows compare with -------------------------------------------

    def warm(self, gib: int, channels: int = 1, prealloc: bool = True, compare: int | None = None,
             also_preallocated: bool = False) -> QemuFigure:
        """Paused ``gib`` GiB random guest over one channel (``channels`` 1) or multifd with
        ``channels``, into a destination preallocated or not; the notes carry the same with
        ``compare`` channels and, with ``also_preallocated``, the same channels into a
        preallocated destination (label ``preallocated(channels)``, which rows judge against).
        Runs are kept per case, so rows sharing a case share one measurement."""
        try:
            mine = self._warm_runs(gib, channels, prealloc)
            theirs = self._warm_runs(gib, compare, prealloc) if compare and compare != channels else None
            filled = self._warm_runs(gib, channels, True) if also_preallocated else None
        finally:
            if gib > 1:
                self._drop_random(gib)

        def label(n: int) -> str:
            return "one channel" if n == 1 else f"multifd {n} channels"

        fig = Figure([gib / r["seconds"] for r in mine], "GiB/s")
        others = {f"{label(channels)} wall": Figure([r["seconds"] for r in mine], "s"),
                  f"{label(channels)} downtime": Figure([r["downtime_ms"] for r in mine], "ms"),
                  CPU_PER_GIB: Figure([r["cpu_seconds"] / gib for r in mine], "CPU-s/GiB")}
        if theirs:
            others[label(compare)] = Figure([gib / r["seconds"] for r in theirs], "GiB/s")
            others[f"{label(compare)} wall"] = Figure([r["seconds"] for r in theirs], "s")
        if filled:
            others[preallocated(channels)] = Figure([gib / r["seconds"] for r in filled], "GiB/s")
        where = "dst prealloc" if prealloc else "dst not preallocated"
        return QemuFigure(fig, f"paused {gib} GiB random guest, {label(channels)}, tcp 127.0.0.1, {where}; "
                               "migrate -> destination completed", others,
                          [{"channels": channels, "prealloc": prealloc, **r} for r in mine]
                          + [{"channels": compare, "prealloc": prealloc, **r} for r in theirs or []]
                          + [{"channels": channels, "prealloc": True, **r} for r in filled or []])

    def warm_cpu(self, gib: int) -> QemuFigure:
        """CPU-seconds (source plus destination) per GiB of the one-channel warm migration into
        a destination not preallocated: the runs ``warm(gib, prealloc=False)`` measured."""
        runs = self._warm_runs(gib, 1, False)
        return QemuFigure(Figure([r["cpu_seconds"] / gib for r in runs], "CPU-s/GiB"),
                          f"user+system CPU of both QEMU processes during the paused {gib} GiB warm migration "
                          "(one channel, dst not preallocated)", {}, runs)

    def _warm_runs(self, gib: int, channels: int, prealloc: bool = True) -> list[dict[str, Any]]:
        key = (gib, channels, prealloc)
        if key not in self.cache:
            multifd = channels if channels > 1 else 0
            self.cache[key] = [self.migrate_once(gib * GIB, gib, multifd=multifd, prealloc=prealloc) for _ in range(self.runs)]
        return self.cache[key]

    def zero(self) -> QemuFigure:
        runs = [self.migrate_once(GIB, None) for _ in range(self.runs)]
        return QemuFigure(Figure([r["seconds"] * 1000 for r in runs], "ms"),
                          "paused 1 GiB guest never touched (memory-backend-ram), one channel, dst prealloc",
                          {"downtime": Figure([r["downtime_ms"] for r in runs], "ms")}, runs)

    def live_idle(self, target_ms: int) -> QemuFigure:
        at_target = [self.migrate_once(GIB, 1, live=True, downtime_ms=target_ms) for _ in range(self.runs)]
        at_default = [self.migrate_once(GIB, 1, live=True) for _ in range(self.runs)]
        # the source's STOP to the destination's RESUME: microsecond timestamps (query-migrate's
        # downtime counts whole ms and ends on the source, before the destination has loaded the tail)
        fig = Figure([r["host_downtime_ms"] for r in at_target], "ms")
        return QemuFigure(fig, f"running 1 GiB random guest (SeaBIOS, no OS, TCG), downtime-limit {target_ms} ms; "
                               "source STOP to destination RESUME",
                          {f"query-migrate downtime at {target_ms} ms": Figure([r["downtime_ms"] for r in at_target], "ms"),
                           "STOP->RESUME at the default 300 ms limit": Figure([r["host_downtime_ms"] for r in at_default], "ms"),
                           "query-migrate downtime at 300 ms": Figure([r["downtime_ms"] for r in at_default], "ms"),
                           f"total at {target_ms} ms": Figure([r["seconds"] for r in at_target], "s")},
                          [{"downtime_limit_ms": target_ms, **r} for r in at_target] +
                          [{"downtime_limit_ms": 300, **r} for r in at_default])

    def checkpoint(self, directory: str) -> QemuFigure:
        runs = []
        for i in range(self.runs):
            path = os.path.join(directory, f"bench-qemu-save-{os.getpid()}-{i}.bin")
            try:
                runs.append(self.save_once(GIB, 1, path))
            finally:
                _unlink(path)
        return QemuFigure(Figure([r["bytes"] / r["seconds"] / GIB for r in runs], "GiB/s"),
                          "paused 1 GiB random guest migrated to exec:cat > FILE && sync FILE; stream bytes / wall",
                          {"wall": Figure([r["seconds"] for r in runs], "s")}, runs)

    def restore(self, directory: str) -> QemuFigure:
        path = os.path.join(directory, f"bench-qemu-restore-{os.getpid()}.bin")
        try:
            self.save_once(GIB, 1, path)  # setup, not timed
            runs = [self.restore_once(GIB, path) for _ in range(self.runs)]
            fresh = [self.restore_once(GIB, path, prealloc=False) for _ in range(self.runs)]
        finally:
            _unlink(path)
        return QemuFigure(Figure([r["bytes"] / r["seconds"] / GIB for r in fresh], "GiB/s"),
                          "a new QEMU (RAM not preallocated, as vmmrun -r's) loading a 1 GiB random stream from tmpfs "
                          "with exec:cat FILE, from the command to MIGRATION completed",
                          {"wall": Figure([r["seconds"] for r in fresh], "s"),
                           "migrate-incoming to completed": Figure([r["bytes"] / r["load_seconds"] / GIB for r in fresh], "GiB/s"),
                           "RAM preallocated, from the command": Figure([r["bytes"] / r["seconds"] / GIB for r in runs], "GiB/s")},
                          [{"prealloc": True, **r} for r in runs] + [{"prealloc": False, **r} for r in fresh])


#: The source's RAM in every case with data: a private mapping of the random file, populated before
#: the migration is timed (``prealloc=on`` copies each page in), as vmmpy's source is.
SOURCE_MEMORY = "memory-backend-file,share=off,prealloc=on"
#: The label of a warm migration into a preallocated destination in ``QemuFigure.others``.
PREALLOCATED = "one channel, dst preallocated"


def preallocated(channels: int) -> str:
    """The label of a warm migration over ``channels`` into a preallocated destination."""
    return PREALLOCATED if channels == 1 else f"multifd {channels} channels, dst preallocated"
#: The label of the CPU cost in ``QemuFigure.others``.
CPU_PER_GIB = "CPU-s per GiB"


def destination_memory(prealloc: bool) -> str:
    return "memory-backend-ram" + (",prealloc=on" if prealloc else "")


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


# vmmpy row -> the QEMU work it is compared with (what is the same work is argued in
# docs/performance.md); rows not listed have no QEMU equivalent here. A vmmpy row with N
# streams compares with multifd over N channels (and one channel in its notes); unwired rows,
# as vmmrun -R's default, into a destination not preallocated, and into a preallocated one too.
WORK: dict[str, Callable[[QemuBench, Any], QemuFigure]] = {
    "warm-1g": lambda q, ctx: q.warm(1, prealloc=False, also_preallocated=True),
    "warm-1g-cpu": lambda q, ctx: q.warm_cpu(1),
    "warm-1g-wired": lambda q, ctx: q.warm(1),
    "warm-1g-streams2": lambda q, ctx: q.warm(1, channels=2, prealloc=False, compare=1, also_preallocated=True),
    "warm-1g-streams4": lambda q, ctx: q.warm(1, channels=4, prealloc=False, compare=1, also_preallocated=True),
    "warm-1g-wired-streams2": lambda q, ctx: q.warm(1, channels=2, compare=1),
    "warm-1g-wired-streams4": lambda q, ctx: q.warm(1, channels=4, compare=1),
    "warm-4g": lambda q, ctx: q.warm(4, prealloc=False, also_preallocated=True),
    "warm-4g-wired": lambda q, ctx: q.warm(4),
    "zero-1g": lambda q, ctx: q.zero(),
    "live-idle": lambda q, ctx: q.live_idle(10),
    "checkpoint-disk": lambda q, ctx: q.checkpoint(ctx.disk),
    "checkpoint-tmpfs": lambda q, ctx: q.checkpoint(ctx.shm),
    "restore-eager-1g": lambda q, ctx: q.restore(ctx.shm),
}
