"""Soak: many live migrations of a busy guest back and forth, each one proved by the guest's memory.

Two run directories on this machine stand for two hosts, A and B. The ``abtest`` guest starts
on A, sweeping its pages as fast as it can (or at ``--rate``), and is migrated live A->B, then
B->A into a fresh empty ``vmmrun -R``, and so on, ``--runs`` times, over loopback TCP with a
shared key (and optionally mutual TLS), as a user would: vmmrun and vmmctl processes.

After each migration (every ``--check-every`` runs, and always after the last) the soak checks
that exactly one guest runs (the source's vmmrun exited 0, its control socket is gone, the
destination's guest is running) and that its memory is exact: it takes ``vmmctl --checkpoint``
of the running guest and checks, from the three files alone, abtest's counter contract
(:func:`check_checkpoint`): the memory file matches its chunk hashes; with n the sweeps done
(register r8 of the saved vCPU), the pages before the one being swept hold n+1 and the rest n;
every page outside the swept range that abtest never writes is zero; and between checks the
guest's sweeps and instructions only grow.

Every wait is bounded (``--timeout``). A failure prints what failed and where its logs are, and
keeps the soak directory (every vmmrun's output, vmmctl's output and the failing checkpoint);
without ``--keep-going`` the soak stops there, with it a guest that was lost or damaged is
replaced by a fresh one and the runs go on. ``--json FILE`` writes the machine-readable record
(rewritten after every run). Exit status 0 when every run passed, 1 otherwise, 2 on bad usage.

    .venv/bin/python -m tools.soak --runs 100 --mem 64M --json soak.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from tools.bench.procs import die_with_parent, free_port
from vmmpy.guest import platform as P
from vmmpy.guest.programs import abtest, memory_layout
from vmmpy.runtime.control import ControlClient, ControlError
from vmmpy.units import format_size, parse_size

NAME = "soak0"
HOSTS = ("A", "B")
LOOPBACK = "127.0.0.1"


class SoakError(Exception):
    """A step of a run that failed; the message says what and where its output is."""


# ---- the check: abtest's counters, from a checkpoint's three files ---------------------------
@dataclass
class Verdict:
    """What :func:`check_checkpoint` found: no problems means the memory is exact."""

    path: str
    problems: list[str] = field(default_factory=list)
    sweeps: int | None = None
    instructions: int | None = None

    @property
    def ok(self) -> bool:
        return not self.problems


def saved_register(vcpu_state: dict, name: str) -> int:
    """A register from a saved vCPU state, in either vendor's layout (docs/isa.md, "Saved state")."""
    for group in vcpu_state.values():
        if isinstance(group, dict):
            for key in (f"guest_{name}", f"sctx_{name}", name):
                if key in group:
                    return int(group[key])
    raise KeyError(f"register {name} is not in the saved vCPU state")


def _untouched_ranges(lowmem: int, highmem: int, ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """(first GPA, end GPA) of the memory abtest never writes: above its image and stack
    (WORKLOAD_BASE) outside its sweep ranges, in both segments."""
    out, segments = [], [(P.WORKLOAD_BASE, lowmem)] + ([(P.HIGHMEM_BASE, P.HIGHMEM_BASE + highmem)] if highmem else [])
    for seg_start, seg_end in segments:
        cursor = seg_start
        for base, pages in sorted(ranges):
            if seg_start <= base < seg_end:
                if base > cursor:
                    out.append((cursor, base))
                cursor = base + pages * P.PAGE_SIZE
        if cursor < seg_end:
            out.append((cursor, seg_end))
    return out


def _first_nonzero_page(memory, start: int, end: int) -> int | None:
    import numpy as np

    for seg in memory.core.segments:
        a, b = max(start, seg.gpa), min(end, seg.gpa + seg.size)
        if a < b:
            words = np.frombuffer(seg, dtype="<u8")[(a - seg.gpa) // 8 : (b - seg.gpa) // 8]
            pages = np.flatnonzero(words.reshape(-1, P.PAGE_SIZE // 8).any(axis=1))
            if pages.size:
                return a + int(pages[0]) * P.PAGE_SIZE
    return None


def _raw_memory(checkpoint):
    """The memory file's bytes as they are, damaged or not, in a guest memory of its layout: a
    restore (lazy or eager) refuses a damaged chunk, and the check still judges the counters in
    it. The file holds lowmem, then highmem (at 4 GiB); holes read as zeros."""
    from vmmpy.memory import GuestMemory

    memory = GuestMemory(checkpoint.lowmem + checkpoint.highmem)
    step = 4 << 20
    with open(checkpoint.path, "rb") as f:
        for base, size in ((0, checkpoint.lowmem), (P.HIGHMEM_BASE, checkpoint.highmem)):
            for offset in range(0, size, step):
                data = f.read(min(step, size - offset))
                if data.strip(b"\0"):
                    memory.write(base + offset, data)
    return memory


def check_checkpoint(path: str | os.PathLike, ranges: list[tuple[int, int]]) -> Verdict:
    """Check abtest's counter contract in the checkpoint ``path`` (+ .kern, .meta) of a guest
    running abtest over ``ranges`` (:func:`abtest.sweep_ranges`). Every check runs even when an
    earlier one fails, so a damaged file still has its counters judged."""
    from vmmpy.runtime.commands import static_registry
    from vmmpy.runtime.config import VmConfig
    from vmmpy.snapshot.files import CheckpointError, read_checkpoint, verify_memory

    verdict = Verdict(str(path))
    try:
        checkpoint = read_checkpoint(path, static_registry(VmConfig(NAME)))
    except CheckpointError as err:
        verdict.problems.append(str(err))
        return verdict
    vcpus = next((s.payload["vcpus"] for s in checkpoint.sections if s.name == "vmcx"), None)
    if not vcpus:
        verdict.problems.append(f"checkpoint '{checkpoint.kern_path}': no vCPU state (section 'vmcx')")
        return verdict
    verdict.sweeps = saved_register(vcpus[0], abtest.SWEEP_REGISTER)
    verdict.instructions = int(vcpus[0]["instructions_retired"])
    try:
        verify_memory(checkpoint)
    except CheckpointError as err:
        verdict.problems.append(str(err))
    memory = _raw_memory(checkpoint)
    try:
        bad = abtest.check_counters(memory, ranges, verdict.sweeps)
        if bad is not None:
            counter = int.from_bytes(memory.read(bad, 8), "little")
            verdict.problems.append(
                f"abtest counter of page {bad:#x} is {counter}: with {verdict.sweeps} sweeps done the pages before the one "
                f"being swept must hold {verdict.sweeps + 1} and the rest {verdict.sweeps} (a page lost, stale or sent twice)"
            )
        for start, end in _untouched_ranges(checkpoint.lowmem, checkpoint.highmem, ranges):
            page = _first_nonzero_page(memory, start, end)
            if page is not None:
                verdict.problems.append(f"page {page:#x} holds data, but abtest never writes there (outside {start:#x}..{end:#x}): a misplaced page")
                break
    finally:
        memory.close()
    return verdict


# ---- the two hosts -------------------------------------------------------------------------
def _tail(path: Path, lines: int = 5) -> str:
    try:
        text = path.read_text(errors="replace").strip().splitlines()
    except OSError:
        return ""
    return " | ".join(text[-lines:])


class Host:
    """One run directory standing for a host: the vmmrun serving the guest there, if any."""

    def __init__(self, name: str, directory: Path, timeout: float) -> None:
        self.name, self.dir, self.timeout = name, directory, timeout
        self.dir.mkdir(parents=True, exist_ok=True)
        self.proc: subprocess.Popen | None = None
        self.log: Path | None = None
        self.generation = 0

    def start(self, *args: str) -> None:
        """Start vmmrun here with ``args`` (its output to a numbered log in the run directory)."""
        self.generation += 1
        self.log = self.dir / f"vmmrun-{self.generation:04d}.log"
        with open(self.log, "w") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "vmmpy.cli.vmmrun", f"--run-dir={self.dir}", "-l", f"com1,{self.dir / 'console.log'}", *args, NAME],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, preexec_fn=die_with_parent,
            )

    def vmmctl(self, *args: str) -> subprocess.CompletedProcess:
        try:
            return subprocess.run([sys.executable, "-m", "vmmpy.cli.vmmctl", f"--run-dir={self.dir}", f"--vm={NAME}", *args],
                                  capture_output=True, text=True, timeout=self.timeout)
        except subprocess.TimeoutExpired:
            raise SoakError(f"host {self.name}: vmmctl {' '.join(args)} did not answer within {self.timeout:g} s") from None

    def exited(self) -> int | None:
        return None if self.proc is None else self.proc.poll()

    def state(self) -> str | None:
        """The guest's state from its control socket (asked from this process: a vmmctl start
        per poll would cost more than the question), or None when nothing answers."""
        try:
            return ControlClient(NAME, self.dir, timeout=min(self.timeout, 10)).request("status")["state"]
        except (ControlError, OSError):
            return None

    def _deadline_loop(self, what: str):
        deadline = time.monotonic() + self.timeout
        while time.monotonic() < deadline:
            if self.exited() is not None:
                raise SoakError(f"host {self.name}: vmmrun exited {self.proc.returncode} while {what}: {_tail(self.log)} (log {self.log})")
            yield
            time.sleep(0.05)
        raise SoakError(f"host {self.name}: timed out after {self.timeout:g} s {what} (log {self.log})")

    def wait_running(self) -> None:
        for _ in self._deadline_loop("waiting for the guest to run"):
            if (self.dir / f"{NAME}.ctl").exists() and self.state() == "running":
                return

    def wait_listening(self, port: int) -> None:
        for _ in self._deadline_loop(f"waiting for the destination to listen on port {port}"):
            if _listening(port):
                return

    def wait_exit(self) -> int:
        try:
            return self.proc.wait(self.timeout)
        except subprocess.TimeoutExpired:
            raise SoakError(f"host {self.name}: vmmrun did not exit within {self.timeout:g} s (log {self.log})") from None

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(30)
        self.proc = None


def _listening(port: int) -> bool:
    """Whether a TCP socket listens on ``port`` (from /proc, without connecting: a destination
    accepts exactly one connection)."""
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:
                return True
    return False


# ---- keys and certificates -----------------------------------------------------------------
def make_key(directory: Path) -> Path:
    path = directory / "mig.key"
    path.write_bytes(os.urandom(32).hex().encode() + b"\n")
    path.chmod(0o600)
    return path


def make_tls(directory: Path, timeout: float) -> dict[str, dict[str, str]]:
    """A throwaway CA and a certificate per host naming the loopback address (docs/migration.md,
    "Setting up keys and certificates"): {host: {cert, key, ca}}."""
    if shutil.which("openssl") is None:
        raise SoakError("--tls makes throwaway certificates with openssl, which is not installed")
    directory.mkdir(parents=True, exist_ok=True)

    def openssl(*args: str) -> None:
        result = subprocess.run(["openssl", *args], cwd=directory, capture_output=True, text=True, timeout=timeout)
        if result.returncode != 0:
            raise SoakError(f"openssl {args[0]} failed: {result.stderr.strip()}")

    ec = ["-noenc", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256"]
    openssl("req", "-x509", "-new", *ec, "-keyout", "ca.key", "-out", "ca.pem", "-days", "2", "-subj", "/CN=vmmpy soak CA",
            "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign")
    out = {}
    for host in HOSTS:
        (directory / f"{host}.ext").write_text(
            f"subjectAltName=IP:{LOOPBACK}\nbasicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature\n"
            "extendedKeyUsage=serverAuth,clientAuth\nsubjectKeyIdentifier=hash\nauthorityKeyIdentifier=keyid\n")
        openssl("req", "-new", *ec, "-keyout", f"{host}.key", "-out", f"{host}.csr", "-subj", f"/CN=soak-{host}")
        openssl("x509", "-req", "-in", f"{host}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial", "-days", "2",
                "-extfile", f"{host}.ext", "-out", f"{host}.crt")
        out[host] = {"cert": str(directory / f"{host}.crt"), "key": str(directory / f"{host}.key"), "ca": str(directory / "ca.pem")}
    return out


def tls_args(tls: dict[str, dict[str, str]] | None, host: str) -> list[str]:
    if tls is None:
        return []
    files = tls[host]
    return ["--tls-cert", files["cert"], "--tls-key", files["key"], "--tls-ca", files["ca"]]


# ---- one soak ------------------------------------------------------------------------------
@dataclass
class Run:
    """The record of one migration."""

    run: int
    direction: str
    ok: bool = False
    error: str | None = None
    dwell_s: float = 0.0
    total_ms: float | None = None
    downtime_ms: float | None = None
    rounds: int | None = None
    pages_sent: int | None = None
    zero_pages: int | None = None
    bytes_total: int | None = None
    throttle: float | None = None
    expected_downtime_ms: float | None = None
    downtime_breakdown: dict | None = None
    notes: list = field(default_factory=list)
    checked: dict | None = None
    logs: dict = field(default_factory=dict)


def percentile(values: list[float], q: float) -> float | None:
    """The nearest-rank percentile: the smallest value with at least q % of the values at or below it."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, -(-len(ordered) * q // 100))
    return ordered[int(rank) - 1]


class Soak:
    def __init__(self, args: argparse.Namespace, directory: Path) -> None:
        self.args, self.dir = args, directory
        self.hosts = {h: Host(h, directory / f"host{h}", args.timeout) for h in HOSTS}
        self.runs_dir = directory / "runs"
        self.runs_dir.mkdir(parents=True, exist_ok=True)
        self.random = random.Random(args.seed)
        self.key = Path(args.key_file) if args.key_file else make_key(directory)
        self.tls = make_tls(directory / "tls", args.timeout) if args.tls else None
        low, high = memory_layout(args.mem)
        start = P.WORKLOAD_BASE
        end = low if args.dirty_size is None else start + args.dirty_size
        self.guest_args = {"start": hex(start), "end": hex(end), "sweeps": "0", "report": "0", "rate": str(args.rate)}
        self.ranges = abtest.sweep_ranges(start, min(end, low), False, high)
        self.records: list[Run] = []
        self.last_check: Verdict | None = None
        self.restarts = 0
        self.started = time.time()
        self.machine = machine_summary()  # the load before the soak adds its own

    def relative(self, path: Path) -> str:
        return str(Path(path).relative_to(self.dir))

    # -- the guest's life ---------------------------------------------------------------------
    def machine_args(self) -> list[str]:
        """What source and destination must agree on."""
        return ["-m", f"{self.args.mem // 1024}K", "--tsc", self.args.tsc]

    def start_guest(self, host: str) -> None:
        guest = [a for k, v in self.guest_args.items() for a in ("--guest-arg", f"{k}={v}")]
        h = self.hosts[host]
        h.start(*self.machine_args(), "--guest", "abtest", *guest)
        h.wait_running()
        self.last_check = None

    def start_destination(self, host: str, port: int) -> None:
        h = self.hosts[host]
        h.start(*self.machine_args(), "-R", f"{LOOPBACK}:{port}", "--accept-timeout", f"{self.args.timeout:g}",
                "--key-file", str(self.key), *tls_args(self.tls, host))
        h.wait_listening(port)

    def migrate(self, record: Run, src: str, dst: str, port: int) -> dict:
        a = self.args
        cmd = ["--migrate-live", LOOPBACK, str(port), "--json", "--key-file", str(self.key), "--streams", str(a.streams),
               "--compress", a.compress, *tls_args(self.tls, src)]
        if a.downtime_ms is not None:
            cmd += ["--downtime-ms", f"{a.downtime_ms:g}"]
        cmd += a.migrate_opt
        result = self.hosts[src].vmmctl(*cmd)
        out, err = self.runs_dir / f"{record.run:04d}-migrate.json", self.runs_dir / f"{record.run:04d}-migrate.err"
        out.write_text(result.stdout)
        err.write_text(result.stderr)
        record.logs["migrate"] = self.relative(out)
        if result.returncode != 0:
            raise SoakError(f"vmmctl --migrate-live {src}->{dst} exited {result.returncode}: {result.stderr.strip()[-800:]}")
        return json.loads(result.stdout)

    def check_one_guest(self, src: str, dst: str) -> None:
        """Exactly one guest runs: the source's vmmrun exited 0 and answers no more; the
        destination's guest runs."""
        s, d = self.hosts[src], self.hosts[dst]
        status = s.wait_exit()
        if status != 0:
            raise SoakError(f"host {src}: the source vmmrun exited {status} after the migration, expected 0: {_tail(s.log)} (log {s.log})")
        if s.state() is not None:
            raise SoakError(f"host {src}: a guest still answers there after the migration: two guests run")
        s.proc = None
        state = d.state()
        if d.exited() is not None or state != "running":
            raise SoakError(f"host {dst}: the migrated guest is {state or 'not answering'} (vmmrun status {d.exited()}): {_tail(d.log)} (log {d.log})")

    def check_memory(self, record: Run, host: str) -> None:
        path = self.runs_dir / f"{record.run:04d}.ckp"
        result = self.hosts[host].vmmctl(f"--checkpoint={path}", "--json")
        if result.returncode != 0:
            raise SoakError(f"host {host}: vmmctl --checkpoint exited {result.returncode}: {result.stderr.strip()}")
        paused_ms = json.loads(result.stdout)["guest_paused_seconds"] * 1000
        verdict = check_checkpoint(path, self.ranges)
        previous = self.last_check
        if verdict.ok and previous is not None:
            if verdict.sweeps < previous.sweeps or verdict.instructions <= previous.instructions:
                verdict.problems.append(
                    f"the guest went backwards or stood still: {verdict.sweeps} sweeps and {verdict.instructions} instructions, "
                    f"after {previous.sweeps} and {previous.instructions} at the previous check")
        record.checked = {"sweeps": verdict.sweeps, "instructions": verdict.instructions, "ok": verdict.ok,
                          "problems": verdict.problems, "checkpoint_paused_ms": round(paused_ms, 3)}
        if not verdict.ok:
            record.logs["checkpoint"] = self.relative(path)
            raise SoakError(f"host {host}: the guest's memory is not exact (checkpoint {path} kept): " + "; ".join(verdict.problems))
        self.last_check = verdict
        if not self.args.keep:
            for suffix in ("", ".kern", ".meta"):
                Path(f"{path}{suffix}").unlink(missing_ok=True)

    # -- the runs -----------------------------------------------------------------------------
    def one_run(self, i: int, src: str) -> Run:
        dst = HOSTS[1 - HOSTS.index(src)]
        record = Run(run=i, direction=f"{src}->{dst}")
        try:
            port = free_port()
            self.start_destination(dst, port)
            record.logs = {"source": self.relative(self.hosts[src].log), "destination": self.relative(self.hosts[dst].log)}
            record.dwell_s = round(self.random.uniform(0, self.args.dwell), 3)
            time.sleep(record.dwell_s)
            stats = self.migrate(record, src, dst, port)
            record.total_ms, record.downtime_ms = stats.get("total_time_ms"), stats.get("downtime_ms")
            record.rounds, record.pages_sent, record.zero_pages = stats.get("round_count"), stats.get("pages_sent"), stats.get("zero_pages")
            record.bytes_total, record.throttle = stats.get("bytes_total"), stats.get("throttle")
            record.expected_downtime_ms, record.downtime_breakdown = stats.get("expected_downtime_ms"), stats.get("downtime_breakdown")
            record.notes = stats.get("notes") or []
            self.check_one_guest(src, dst)
            if i % self.args.check_every == 0 or i == self.args.runs:
                self.check_memory(record, dst)
            record.ok = True
        except SoakError as err:
            record.error = str(err)
        except (OSError, ValueError, KeyError) as err:  # an answer the soak did not expect: record it, keep the evidence
            record.error = f"unexpected {type(err).__name__}: {err}"
        return record

    def recover(self, record: Run, src: str, dst: str) -> str:
        """After a failed run: find the one guest, check its memory, and go on from there. A
        failed migration must leave the guest running on the source with nothing lost; a guest
        that is lost, doubled or damaged is replaced by a fresh one on host A."""
        s, d = self.hosts[src], self.hosts[dst]
        where = None
        if record.checked is None or record.checked["ok"]:
            on_src = s.state() if s.proc is not None and s.exited() is None else None
            on_dst = d.state() if d.proc is not None and d.exited() is None else None
            if on_src == "running" and on_dst == "running":
                record.error += f"; then: a guest runs on both {src} and {dst}"
            elif on_src == "running":
                d.kill()
                where = src
            elif on_dst == "running":
                s.proc = None
                where = dst
            else:
                record.error += f"; then: no guest runs on {src} ({on_src}) nor on {dst} ({on_dst})"
        if where is not None and record.checked is None:
            try:
                self.check_memory(record, where)
            except SoakError as err:
                record.error += f"; then: {err}"
                where = None
        if where is not None:
            print(f"         the guest runs on host {where}, its memory exact: going on from there", flush=True)
            return where
        s.kill()
        d.kill()
        self.restarts += 1
        print(f"         the guest was lost or damaged: starting a fresh one on host {HOSTS[0]}", flush=True)
        self.start_guest(HOSTS[0])
        return HOSTS[0]

    def run(self) -> int:
        a = self.args
        print(f"soak: {a.runs} live migration{'s' if a.runs != 1 else ''} of abtest ({format_size(a.mem)}, sweeping {format_size(self.ranges[0][1] * P.PAGE_SIZE)}"
              f"{f' at {a.rate} pages/ms' if a.rate else ' flat out'}) between hosts A and B in {self.dir}", flush=True)
        self.start_guest(HOSTS[0])
        where = HOSTS[0]
        for i in range(1, a.runs + 1):
            record = self.one_run(i, where)
            self.records.append(record)
            dst = HOSTS[1 - HOSTS.index(where)]
            print(self.progress_line(record), flush=True)
            if record.ok:
                where = dst
            else:
                print(f"         FAILED: {record.error}", flush=True)
                print(f"         logs in {self.dir}: {', '.join(f'{k} {v}' for k, v in record.logs.items())}", flush=True)
                if not a.keep_going:
                    break
                where = self.recover(record, where, dst)
                if "; then: " in record.error:
                    print(f"         {record.error[record.error.index('; then: ') + 2:]}", flush=True)
            self.write_json()
        self.finish()
        summary = self.summary()
        print(self.summary_text(summary), flush=True)
        self.write_json()
        return 0 if summary["failures"] == 0 and summary["runs"] == a.runs else 1

    def finish(self) -> None:
        """End the guest (it powers off: vmmrun exits 1) and every process the soak started."""
        for host in self.hosts.values():
            if host.exited() is None and host.proc is not None:
                try:
                    host.vmmctl("--destroy")
                    host.proc.wait(self.args.timeout)
                except (SoakError, subprocess.TimeoutExpired):
                    pass
            host.kill()

    # -- reporting ----------------------------------------------------------------------------
    def progress_line(self, r: Run) -> str:
        head = f"run {r.run}/{self.args.runs} {r.direction}"
        if r.total_ms is None:
            return f"{head}: FAILED"
        check = ""
        if r.checked is not None:
            check = f", checked: {r.checked['sweeps']} sweeps {'exact' if r.checked['ok'] else 'NOT EXACT'}"
        return (f"{head}: total {r.total_ms:.0f} ms, downtime {r.downtime_ms:.1f} ms, {r.rounds} rounds, "
                f"{r.pages_sent} pages (+{r.zero_pages} zero){check}{'' if r.ok else ': FAILED'}")

    def summary(self) -> dict:
        done = [r for r in self.records if r.downtime_ms is not None]
        downtimes = [r.downtime_ms for r in done]
        totals = [r.total_ms for r in done]
        return {
            "runs": len(self.records), "asked": self.args.runs, "passed": sum(r.ok for r in self.records),
            "failures": sum(not r.ok for r in self.records), "checked": sum(r.checked is not None for r in self.records),
            "restarts": self.restarts,
            "downtime_ms": {"p50": percentile(downtimes, 50), "p99": percentile(downtimes, 99), "max": max(downtimes, default=None)},
            "total_ms": {"p50": percentile(totals, 50), "p99": percentile(totals, 99), "max": max(totals, default=None)},
            "wall_seconds": round(time.time() - self.started, 1),
        }

    @staticmethod
    def summary_text(s: dict) -> str:
        def ms(figure: dict) -> str:
            return " ".join(f"{k} {v:.1f}" if v is not None else f"{k} -" for k, v in figure.items()) + " ms"

        return (f"soak: {s['runs']} runs, {s['failures']} failures, {s['checked']} memory checks, {s['restarts']} restarts; "
                f"downtime {ms(s['downtime_ms'])}; migration time {ms(s['total_ms'])}; {s['wall_seconds']:.0f} s in all")

    def write_json(self) -> None:
        if not self.args.json:
            return
        a = self.args
        record = {
            "command": " ".join([Path(sys.executable).name, "-m", "tools.soak", *sys.argv[1:]]),
            "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(self.started)),
            "machine": self.machine,
            "options": {"runs": a.runs, "mem": a.mem, "dirty_size": self.ranges[0][1] * P.PAGE_SIZE, "rate": a.rate, "tsc": a.tsc,
                        "streams": a.streams, "tls": a.tls, "compress": a.compress, "downtime_ms": a.downtime_ms, "migrate_opt": a.migrate_opt, "seed": a.seed,
                        "dwell": a.dwell, "check_every": a.check_every, "key_file": "given" if a.key_file else "generated"},
            # Logs are named relative to it; a soak that passed in a temporary directory removes it.
            "directory": str(self.dir) if self.args.dir or self.args.keep or self.summary()["failures"] else None,
            "guest_args": self.guest_args,
            "runs": [asdict(r) for r in self.records],
            "summary": self.summary(),
        }
        Path(a.json).write_text(json.dumps(record, indent=1) + "\n")


def machine_summary() -> dict:
    mem_kib = next((int(line.split()[1]) for line in Path("/proc/meminfo").read_text().splitlines() if line.startswith("MemTotal:")), 0)
    return {"nproc": os.cpu_count(), "memory": format_size(mem_kib * 1024), "kernel": platform.release(),
            "python": platform.python_version(), "load_1_5_15_min": [round(x, 2) for x in os.getloadavg()]}


def build_parser() -> argparse.ArgumentParser:
    def size(text: str) -> int:
        try:
            return parse_size(text, default_unit=1 << 20, what="size")
        except ValueError as err:
            raise argparse.ArgumentTypeError(str(err)) from None

    def positive(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if value < 1:
            raise argparse.ArgumentTypeError(f"{value} must be at least 1")
        return value

    def seconds(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
        if not 0 <= value < float("inf"):
            raise argparse.ArgumentTypeError(f"{value:g} must be 0 or more seconds")
        return value

    p = argparse.ArgumentParser(prog="python -m tools.soak", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=positive, default=10, help="live migrations to do, alternating A->B and B->A (default 10)")
    p.add_argument("--mem", type=size, default=64 << 20, help="guest memory, as vmmrun -m (default 64M)")
    p.add_argument("--dirty-size", type=size, help="bytes abtest sweeps, from 2M (default: all of lowmem above 2M)")
    p.add_argument("--rate", type=int, default=0, help="pages abtest increments per guest millisecond; 0 = as fast as it runs (default)")
    p.add_argument("--tsc", choices=("instructions", "host"), default="instructions",
                   help="the guest's TSC: instructions (vmmrun's default: a guest ms is a million instructions) or host (wall clock)")
    p.add_argument("--key-file", help="the shared migration key (default: a fresh random one in the soak directory)")
    p.add_argument("--streams", type=positive, default=1, help="vmmctl --streams N (default 1)")
    p.add_argument("--tls", action="store_true", help="mutual TLS too, with a throwaway CA and host certificates made by openssl")
    p.add_argument("--compress", choices=("off", "lz4", "auto"), default="off", help="vmmctl --compress (default off)")
    p.add_argument("--downtime-ms", type=float, help="vmmctl --downtime-ms (default: vmmctl's)")
    p.add_argument("--migrate-opt", action="append", default=[], metavar="OPTION",
                   help="another vmmctl --migrate-live option, as is (repeatable; write it --migrate-opt=--verify=full)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random dwell before each migration (default 0)")
    p.add_argument("--dwell", type=seconds, default=0.5, help="the guest runs a random 0..DWELL s on a host before it moves on (default 0.5)")
    p.add_argument("--check-every", type=positive, default=1, help="checkpoint and check memory after every Nth migration and the last (default 1)")
    p.add_argument("--timeout", type=seconds, default=120.0, help="bound of every wait, in seconds (default 120)")
    p.add_argument("--dir", help="the soak directory (default: a new one under the temp directory, removed if every run passes)")
    p.add_argument("--keep", action="store_true", help="keep the soak directory and every checkpoint even if every run passes")
    p.add_argument("--json", help="write the machine-readable record here")
    p.add_argument("--keep-going", action="store_true", help="after a failure go on (with a fresh guest if it was lost or damaged)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.key_file and not Path(args.key_file).is_file():
        print(f"soak: --key-file {args.key_file}: no such file", file=sys.stderr)
        return 2
    directory = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="vmmpy-soak-"))
    directory.mkdir(parents=True, exist_ok=True)
    soak = None
    status = 1
    try:
        soak = Soak(args, directory)
        status = soak.run()
    except SoakError as err:
        print(f"soak: {err}", file=sys.stderr)
    except KeyboardInterrupt:
        print("soak: interrupted", file=sys.stderr)
    finally:
        if soak is not None:
            for host in soak.hosts.values():
                host.kill()
    if status == 0 and not args.dir and not args.keep:
        shutil.rmtree(directory, ignore_errors=True)
    elif status != 0:
        print(f"soak: kept {directory} for inspection (vmmrun logs in hostA/ and hostB/, vmmctl output in runs/)", file=sys.stderr)
    return status


if __name__ == "__main__":
    sys.exit(main())
