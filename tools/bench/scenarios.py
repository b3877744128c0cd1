"""The scenarios of issue 8. Each is a function taking the run's ``Context`` and returning rows;
what a scenario times is the work a user pays for (a migration request, a checkpoint request, a
restore call), never the setup around it (images, process start-up)."""

from __future__ import annotations

import os
import re
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from vmmpy import GuestMemory

from . import hostmem, limits
from . import qemu as qemu_labels
from .images import build_image, remove_image
from .procs import Vmmrun, migrate, wait_settled
from .stats import Figure, Row

MIB, GIB = 1 << 20, 1 << 30
PAGE = 4096


@dataclass
class Context:
    work: Path  # run directory for control sockets and logs
    shm: str  # tmpfs directory (images, tmpfs checkpoints)
    disk: str  # a directory on disk
    runs: int
    quick: bool
    deadline: float  # time.monotonic() after which scenarios are skipped
    busy: bool = False  # a CPU-bound neighbour runs for the whole run (--busy): QEMU targets at 0.9
    limits: dict[str, Figure] = field(default_factory=dict)
    results: dict[str, Row] = field(default_factory=dict)
    images: dict[str, str] = field(default_factory=dict)

    def image(self, key: str, **kwargs) -> str:
        """Build an image once per run (it is setup, not timed) and reuse it."""
        if key not in self.images:
            path = os.path.join(self.shm, f"bench-{os.getpid()}-{key}.ckp")
            build_image(path, **kwargs)
            self.images[key] = path
        return self.images[key]

    def drop_images(self) -> None:
        for path in self.images.values():
            remove_image(path)
        self.images.clear()

    def limit(self, name: str) -> Figure:
        if name not in self.limits:
            self.limits[name] = LIMITS[name](self)
        return self.limits[name]


LIMITS: dict[str, Callable[[Context], Figure]] = {
    "loopback TCP": lambda c: limits.loopback_ceiling(GIB, max(3, c.runs)),
    "memcpy": lambda c: limits.memcpy(GIB, max(3, c.runs)),
    "O_DIRECT write": lambda c: limits.odirect_write(c.disk, GIB, max(3, c.runs)),
    "loopback TCP x2": lambda c: limits.loopback_ceiling(GIB, max(3, c.runs), 2),
    "loopback TCP x4": lambda c: limits.loopback_ceiling(GIB, max(3, c.runs), 4),
    "loopback TCP from memory": lambda c: limits.loopback_from_memory(GIB, max(3, c.runs)),
}

CONSOLE_IDLE = {"ticks": "0", "every": "0"}  # sleeps in hlt forever, a timer tick every ms


def destination_populate(stats: dict) -> dict | None:
    """What the destination's populating while it waited did in one run (its record's
    ``populate``), so a report shows whether it ended before the migration began."""
    return (stats.get("destination") or {}).get("populate")


def settled(stats: list[dict]) -> Figure:
    """How long each run's source took to finish starting before it was timed
    (``procs.wait_settled``), so a report shows a source that never settled (at the limit)."""
    return Figure([st["source_settled_s"] for st in stats], "s")


def random_image(ctx: Context, gib: int, wired: bool = False) -> str:
    return ctx.image(f"random{gib}g{'-wired' if wired else ''}", memsize=gib * GIB, guest="console", guest_args=CONSOLE_IDLE,
                     random_bytes=gib * GIB, wired=wired)


def _warm(ctx: Context, name: str, image: str, memsize: str, runs: int, wired: bool = False,
          params: dict | None = None) -> tuple[list[float], list[dict]]:
    seconds, stats = [], []
    for _ in range(runs):
        s, st = migrate(ctx.work, name, source_args=["-r", image, "--pause-at=0"],
                        dest_args=["-m", memsize, *(["-S"] if wired else [])], live=False, params=params)
        seconds.append(s)
        stats.append(st)
    return seconds, stats


def from_memory(ctx: Context, row: Row, rate: Figure) -> None:
    """Beside a one-stream row's loopback ratio, its ratio to the loopback ceiling whose sender
    reads 1 GiB of memory once, as a migration's sender reads guest memory (the cached ceiling
    sends one MiB again and again): how close the row is to what moving memory costs here."""
    if limits.ceiling_binary() is None:
        return  # no native ceiling here: the row's loopback figure says so already
    mem = ctx.limit("loopback TCP from memory")
    row.extra["loopback_from_memory"] = mem.to_dict()
    row.notes.append(f"x loopback TCP with its sender reading 1 GiB of memory once ({mem.text()}): "
                     f"{rate.median / mem.median:.2f}")


def warm_random(gib: int, wired: bool = False):
    """Warm migration of ``gib`` GiB of random memory, one stream. Issue 16's targets, judged
    against QEMU in the same run: unwired (vmmrun -R's default), at least 1.2 x QEMU into a
    destination not preallocated and 1.0 x into a preallocated one; wired, 1.0 x preallocated.
    The unwired 1 GiB scenario also gives ``warm-1g-cpu``: CPU-seconds per GiB moved, source
    plus destination, from the same runs."""
    def scenario(ctx: Context) -> list[Row]:
        image = random_image(ctx, gib, wired)
        try:
            seconds, stats = _warm(ctx, f"warm{gib}", image, f"{gib}G", ctx.runs, wired)
        finally:
            if gib > 1:  # the big image is not reused: give its tmpfs memory back at once
                remove_image(ctx.images.pop(f"random{gib}g{'-wired' if wired else ''}"))
        tcp = ctx.limit("loopback TCP")
        rate = Figure([gib / s for s in seconds], "GiB/s")
        how = "both sides wired (-S: memory populated up front, as QEMU's prealloc=on)" if wired else "unwired destination"
        row = Row(f"warm-{gib}g{'-wired' if wired else ''}", f"warm migration, {gib} GiB random memory, paused guest, one stream, {how}", rate,
                  "loopback TCP", tcp, rate.median / tcp.median,
                  target=">= 0.85 x loopback TCP", met=rate.median >= 0.85 * tcp.median,
                  qemu_min=1.0 if wired else 1.2, qemu_also={} if wired else {qemu_labels.PREALLOCATED: 1.0})
        settle = settled(stats)
        row.extra = {"seconds": seconds, "downtime_ms": [st["downtime_ms"] for st in stats],
                     "bytes_total": stats[0]["bytes_total"], "downtime_breakdown": stats[-1]["downtime_breakdown"],
                     "cpu_seconds": [st["cpu_seconds"] for st in stats],
                     "destination_populate": [destination_populate(st) for st in stats],
                     "source_settled_s": settle.values}
        row.notes.append(f"wall {Figure(seconds, 's').text()}, downtime {Figure(row.extra['downtime_ms'], 'ms').text()}, "
                         f"the source timed once started ({settle.text()} after it answered)")
        from_memory(ctx, row, rate)
        rows = [row]
        if gib == 1 and not wired:
            cpu = Figure([st["cpu_seconds"] / gib for st in stats], "CPU-s/GiB")
            rows.append(Row("warm-1g-cpu", "CPU-seconds per GiB migrated (source plus destination, user and system, "
                            "with the destination's populating while it waited), the warm-1g runs", cpu, qemu_min=1.0))
        for r in rows:
            ctx.results[r.scenario] = r
        return rows
    return scenario


def _throwaway_pki(directory: Path) -> tuple[list[str], dict[str, str]]:
    """A CA and certificates for one run (trustme, from the test extra), as vmmrun's arguments
    and vmmctl's ``tls`` request field. Written under the run's work directory, removed with it."""
    import trustme

    directory.mkdir(parents=True, exist_ok=True)
    ca = trustme.CA()
    files = {"ca": directory / "ca.pem"}
    ca.cert_pem.write_to_path(str(files["ca"]))
    for name, identity in (("dst", "127.0.0.1"), ("src", "bench-source")):
        cert = ca.issue_cert(identity)
        files[f"{name}.crt"], files[f"{name}.key"] = directory / f"{name}.crt", directory / f"{name}.key"
        cert.cert_chain_pems[0].write_to_path(str(files[f"{name}.crt"]))
        cert.private_key_pem.write_to_path(str(files[f"{name}.key"]))
    dest_args = ["--tls-cert", str(files["dst.crt"]), "--tls-key", str(files["dst.key"]), "--tls-ca", str(files["ca"])]
    return dest_args, {"cert": str(files["src.crt"]), "key": str(files["src.key"]), "ca": str(files["ca"]), "hostname": None}


def tls_encrypt_one_core(size: int = 256 * MIB, chunk: int = MIB) -> float:
    """GiB/s one thread encrypts with the TLS 1.3 cipher negotiated between two of Python's ssl
    (OpenSSL) objects over memory BIOs (no sockets): what AES-GCM costs on this CPU, beside which
    the core's TLS (rustls) is judged."""
    import ssl
    import tempfile

    def context(cert: str, key: str, ca: str, server_side: bool) -> ssl.SSLContext:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if server_side else ssl.PROTOCOL_TLS_CLIENT)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_3
        ctx.load_cert_chain(cert, key)
        ctx.load_verify_locations(cafile=ca)
        return ctx

    with tempfile.TemporaryDirectory() as tmp:
        dest_args, src = _throwaway_pki(Path(tmp))
        server = context(dest_args[1], dest_args[3], dest_args[5], True)
        client = context(src["cert"], src["key"], src["ca"], False)
    ci, co, si, so = ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO()
    c = client.wrap_bio(ci, co, server_hostname="127.0.0.1")
    srv = server.wrap_bio(si, so, server_side=True)
    for _ in range(10):  # bounded: TLS 1.3 finishes in two round trips
        done = 0
        for obj, out, into in ((c, co, si), (srv, so, ci)):
            try:
                obj.do_handshake()
                done += 1
            except ssl.SSLWantReadError:
                pass
            into.write(out.read())
        if done == 2:
            break
    payload = os.urandom(chunk)
    started = time.perf_counter()
    for _ in range(size // chunk):
        c.write(payload)
        co.read()
    return size / (time.perf_counter() - started) / GIB


def records_cipher(notes: list[str]) -> str | None:
    """What a TLS migration's statistics say seals its records: "ring (5.87 GiB/s a core here,
    aws-lc-rs 3.86)" from the note "encrypted with ...; records by ...; the ...'s certificate:
    ...", or None where no note says."""
    for note in notes:
        if "; records by " in note:
            return note.split("; records by ", 1)[1].split("; ", 1)[0]
    return None


def sealing_rate(cipher: str | None) -> float | None:
    """GiB/s one core sealed with the library that seals the records, as the source timed it when
    it chose (``records_cipher``'s "ring (5.87 GiB/s a core here, aws-lc-rs 3.86)"), or None where
    the text gives no figure (a library the process did not choose by timing)."""
    found = re.match(r"\S+ \(([0-9.]+) GiB/s a core here", cipher or "")
    return float(found.group(1)) if found else None


def serial_sealing_share(plain: float, sealing: float) -> float:
    """About how many times plaintext a lone stream goes whose sending thread does what the
    plaintext one does and seals every byte too, where the plaintext one is bound by its sending
    thread (as a lone stream is on a quiet host here, docs/performance.md, session 41): a GiB
    takes about 1/plain + 1/sealing seconds there instead of 1/plain. An estimate, not a bound:
    over TLS the first read of guest memory moves from the socket's copy to the hash and the
    sealing, and ``sealing`` is timed on records in the cache."""
    return sealing / (sealing + plain)


def warm_tls(streams: int = 1):
    """Warm 1 GiB over mutual TLS beside the same migration in plaintext, runs interleaved so a
    shared machine's load falls on both alike; with ``streams`` > 1 both over that many
    connections (``--streams``), each its own TLS session."""
    many = f"-streams{streams}" if streams > 1 else ""
    params = {"streams": streams} if streams > 1 else None
    # Not "warm-1g-tls-streamsN": --only picks scenarios by prefix, and warm-1g-tls is one stream.
    name = f"warm-tls-1g{many}" if streams > 1 else "warm-1g-tls"

    def scenario(ctx: Context) -> list[Row]:
        image = random_image(ctx, 1)
        dest_args, tls = _throwaway_pki(ctx.work / "pki")
        plain, secure, stats, plain_cpu = [], [], [], []
        for _ in range(ctx.runs):
            s, st = migrate(ctx.work, "warmplain", source_args=["-r", image, "--pause-at=0"], dest_args=["-m", "1G"], live=False,
                            params=params)
            plain.append(s)
            plain_cpu.append(st["cpu_seconds"])
            s, st = migrate(ctx.work, "warmtls", source_args=["-r", image, "--pause-at=0"], dest_args=["-m", "1G", *dest_args],
                            live=False, request={"tls": tls}, params=params)
            secure.append(s)
            stats.append(st)
        rate, plain_rate = Figure([1 / s for s in secure], "GiB/s"), Figure([1 / s for s in plain], "GiB/s")
        tcp = ctx.limit("loopback TCP")
        crypto = tls_encrypt_one_core()
        how = f", {streams} parallel streams (--streams)" if streams > 1 else ""
        row = Row(name, f"warm migration, 1 GiB random memory, paused guest, mutual TLS 1.3 ended in the core{how}",
                  rate, f"plain warm-1g{many}, same run", plain_rate, rate.median / plain_rate.median)
        row.extra = {"seconds": secure, "plain_seconds": plain, "downtime_ms": [st["downtime_ms"] for st in stats],
                     "bytes_total": stats[0]["bytes_total"], "tls_encrypt_one_core_gib_s": crypto}
        row.notes.append(f"wall {Figure(secure, 's').text()} (plain {Figure(plain, 's').text()}); loopback TCP {tcp.text()}; "
                         f"OpenSSL's TLS 1.3 encryption alone on one core {crypto:.2f} GiB/s (each side en- or decrypts "
                         "every byte once, on the cores the guests share)")
        cipher = records_cipher(stats[-1].get("notes", []))
        if cipher:
            row.notes.append(f"the source's records by {cipher}")
            row.extra["records_cipher"] = cipher
        sealing = sealing_rate(cipher)
        # Quiet only: beside a busy neighbour both ends share about one CPU, and the sending thread
        # is no longer what bounds the plaintext row.
        if streams == 1 and sealing and not ctx.busy:
            share = serial_sealing_share(plain_rate.median, sealing)
            row.extra["serial_sealing_share"] = round(share, 3)
            row.notes.append(f"if the sending thread is the limit, as a lone plaintext stream's is on a quiet host, sealing every "
                             f"byte there too ({sealing:.2f} GiB/s a core) leaves about {share:.2f} x plaintext "
                             f"({plain_rate.median:.2f} GiB/s here)")
        # Both ends' CPU per GiB, each with what the destination spent populating while it waited:
        # what TLS costs beyond plaintext, where the two share the host's CPUs.
        tls_cpu, plain_fig = Figure([st["cpu_seconds"] for st in stats], "CPU-s/GiB"), Figure(plain_cpu, "CPU-s/GiB")
        row.extra |= {"cpu_s_per_gib": tls_cpu.values, "plain_cpu_s_per_gib": plain_fig.values}
        row.notes.append(f"both ends' CPU {tls_cpu.text()} (plain {plain_fig.text()}), the destination's populating included")
        ctx.results[row.scenario] = row
        return [row]
    return scenario


def warm_streams(streams: int, wired: bool = False):
    """Issue 16: with ``--streams N`` (pages over N connections at once), at least as fast as
    QEMU's multifd with N channels, measured in the same run: wired against a preallocated
    destination; unwired (vmmrun -R's default) against one not preallocated, the same kind of
    destination, and against a preallocated one too.
    Printed beside one loopback stream (what ``warm-1g`` is held to) with N loopback streams at
    once in the notes: on a machine with fewer cores than streams, N streams share the same
    CPUs, and that figure says how much parallel TCP itself gains here."""
    def scenario(ctx: Context) -> list[Row]:
        image = random_image(ctx, 1, wired)
        seconds, stats = _warm(ctx, f"warm1s{streams}", image, "1G", ctx.runs, wired, params={"streams": streams})
        tcp = ctx.limit("loopback TCP")
        tcp_n = ctx.limit(f"loopback TCP x{streams}")
        rate = Figure([1 / s for s in seconds], "GiB/s")
        how = "both sides wired (-S)" if wired else "unwired destination"
        name = f"warm-1g{'-wired' if wired else ''}-streams{streams}"
        row = Row(name, f"warm migration, 1 GiB random memory, paused guest, {streams} parallel streams (--streams), {how}", rate,
                  "loopback TCP", tcp, rate.median / tcp.median, qemu_min=1.0,
                  qemu_also={} if wired else {qemu_labels.preallocated(streams): 1.0})
        row.extra = {"seconds": seconds, "downtime_ms": [st["downtime_ms"] for st in stats], "bytes_total": stats[0]["bytes_total"],
                     "streams": stats[0].get("streams"), "stream_bytes": stats[-1]["rounds"][0].get("stream_bytes"),
                     "loopback_tcp_streams": tcp_n.to_dict(), "source_settled_s": settled(stats).values}
        single = f"warm-1g{'-wired' if wired else ''}"
        one = ctx.results.get(single)
        versus = f"; one stream ({single}) {one.figure.text()} in this run" if one is not None and one.figure else ""
        row.notes.append(f"wall {Figure(seconds, 's').text()}; {streams} loopback streams at once {tcp_n.text()}{versus}; "
                         f"{os.cpu_count()} CPUs here")
        ctx.results[row.scenario] = row
        return [row]
    return scenario


def zero_1g(ctx: Context) -> list[Row]:
    seconds = []
    for _ in range(ctx.runs):
        s, _ = migrate(ctx.work, "zero", source_args=["--guest", "console", *_args(CONSOLE_IDLE), "-m", "1G", "--pause-at=0"],
                       dest_args=["-m", "1G"], live=False)
        seconds.append(s)
    fig = Figure([s * 1000 for s in seconds], "ms")
    row = Row("zero-1g", "warm migration, 1 GiB guest never touched (only the 2 MiB image)", fig,
              target="<= 20 ms", met=fig.median <= 20)
    ctx.results[row.scenario] = row
    return [row]


def sparse_64g(ctx: Context) -> list[Row]:
    image = ctx.image("sparse64g", memsize=64 * GIB, guest="console", guest_args=CONSOLE_IDLE, random_bytes=GIB)
    seconds, stats = _warm(ctx, "sparse", image, "64G", ctx.runs)
    fig = Figure(seconds, "s")
    base = ctx.results.get("warm-1g")
    row = Row("sparse-64g", "warm migration, 64 GiB unwired guest with 1 GiB random touched", fig,
              target="<= 1.2 x warm-1g")
    if base is not None and base.extra.get("seconds"):
        one = Figure(base.extra["seconds"], "s")
        row.limit_name, row.limit = "warm-1g time", one
        row.ratio = fig.median / one.median
        row.met = row.ratio <= 1.2
    row.extra = {"bytes_total": stats[0]["bytes_total"]}
    ctx.results[row.scenario] = row
    return [row]


def warm_8g(ctx: Context) -> list[Row]:
    """Issue 16's scale target: warm migration of an 8 GiB guest with all 8 GiB random, unwired
    destination, at most 8.5 x warm-1g's time of the same run. The image is on disk (--disk):
    on tmpfs it would hold 8 GiB beside the source's and the destination's 8 GiB each, more than
    a 24 GiB machine has. The source's restore reads it from the disk and leaves none of it in
    the page cache (docs/checkpoint-format.md). Beside the row, what populating 1 and 8 GiB of
    fresh memory costs this machine right after the runs: the destination's share of the row."""
    path = os.path.join(ctx.disk, f"bench-{os.getpid()}-random8g.ckp")
    try:
        build_image(path, memsize=8 * GIB, guest="console", guest_args=CONSOLE_IDLE, random_bytes=8 * GIB - 4 * MIB)
        seconds, stats = _warm(ctx, "warm8", path, "8G", min(ctx.runs, 3))
    finally:
        remove_image(path)
    # What the destination's fresh memory costs on this machine now, right after the runs: a
    # note beside the row, since every byte lands in memory the destination never had.
    try:
        populate: dict[int, float] | None = {gib: limits.populate_fresh(gib * GIB) for gib in (1, 8)}
    except (subprocess.SubprocessError, OSError, ValueError) as err:  # a note only: the runs stand
        populate, why = None, str(err).splitlines()[0] if str(err) else type(err).__name__
    fig = Figure(seconds, "s")
    row = Row("warm-8g", "warm migration, 8 GiB random memory, paused guest, one stream, unwired destination", fig,
              target="<= 8.5 x warm-1g")
    base = ctx.results.get("warm-1g")
    if base is not None and base.extra.get("seconds"):
        one = Figure(base.extra["seconds"], "s")
        row.limit_name, row.limit = "warm-1g time", one
        row.ratio = fig.median / one.median
        row.met = row.ratio <= 8.5
        row.notes.append(f"{row.ratio:.2f} x warm-1g's median time ({one.text()}) in this run; "
                         f"{8 / fig.median:.2f} GiB/s")
    else:
        row.notes.append("warm-1g was not run: the ratio is not judged")
    if populate is not None:
        row.notes.append(f"populating fresh memory in a new process right after the runs: 1 GiB {populate[1]:.2f} s, "
                         f"8 GiB {populate[8]:.2f} s ({populate[8] / populate[1]:.1f} x)")
    else:
        row.notes.append(f"populating fresh memory could not be measured: {why}")
    row.extra = {"seconds": seconds, "bytes_total": stats[0]["bytes_total"], "cpu_seconds": [st["cpu_seconds"] for st in stats],
                 "destination_populate": [destination_populate(st) for st in stats],
                 "populate_fresh_s": {str(gib): s for gib, s in populate.items()} if populate else None}
    ctx.results[row.scenario] = row
    return [row]


def local_migration(gib: int):
    """Issue 19: the downtime of a local migration (``vmmctl --migrate-local``) of a ``gib`` GiB
    memfd-backed guest with 1 GiB of random memory touched, paused (console, idle). Printed beside
    what copying that touched GiB once would take here (memcpy): the floor of any migration that
    copies memory, which this one does not."""
    def scenario(ctx: Context) -> list[Row]:
        image = ctx.image(f"local{gib}g", memsize=gib * GIB, guest="console", guest_args=CONSOLE_IDLE, random_bytes=GIB)
        seconds, stats = [], []
        for _ in range(ctx.runs):
            s, st = migrate(ctx.work, f"local{gib}", source_args=["-r", image, "--pause-at=0", "--memory-backing", "memfd"],
                            dest_args=["-m", f"{gib}G"], live=False, local=True)
            seconds.append(s)
            stats.append(st)
        fig = Figure([st["downtime_ms"] for st in stats], "ms")
        copy = ctx.limit("memcpy")
        copy_ms = Figure([1000 / v for v in copy.values], "ms")
        target, met = "<= 5 ms", fig.median <= 5
        base = ctx.results.get("local-1g")
        if gib > 1 and base is not None and base.figure is not None:
            target += " and <= 1.2 x local-1g"
            met = met and fig.median <= 1.2 * base.figure.median
        row = Row(f"local-{gib}g", f"local migration (memfds over a Unix socket), {gib} GiB guest, 1 GiB random touched, "
                  "paused: downtime", fig, "memcpy of the 1 GiB touched", copy_ms, fig.median / copy_ms.median, target=target, met=met)
        row.extra = {"seconds": seconds, "bytes_total": [st["bytes_total"] for st in stats],
                     "downtime_breakdown": stats[-1]["downtime_breakdown"]}
        breakdown = ", ".join(f"{k} {v:.2f}" for k, v in sorted(stats[-1]["downtime_breakdown"].items()))
        row.notes.append(f"request {Figure(seconds, 's').text()}; {stats[-1]['bytes_total']} bytes on the socket; "
                         f"last run's downtime in ms: {breakdown}")
        if gib > 1 and base is not None and base.figure is not None:
            row.notes.append(f"ratio to local-1g: {fig.median / base.figure.median:.2f}")
        ctx.results[row.scenario] = row
        return [row]
    return scenario


def host_downtime_ms(stats: dict) -> float | None:
    """The source's pause to the guest running on the destination, on the host's clock (both
    vmmrun on this host): the span QEMU's STOP and RESUME events bound, with no estimate of the
    wire in it. None when the destination's record is missing."""
    dest = stats.get("destination") or {}
    if stats.get("paused_at") is None or dest.get("running_at") is None:
        return None
    return (dest["running_at"] - stats["paused_at"]) * 1000


def live_idle(ctx: Context) -> list[Row]:
    image = random_image(ctx, 1)
    downtimes, reported, totals = [], [], []
    for _ in range(ctx.runs):
        s, st = migrate(ctx.work, "idle", source_args=["-r", image], dest_args=["-m", "1G"], live=True,
                        params={"downtime_target_ms": 10.0})
        host = host_downtime_ms(st)
        if host is None:
            raise RuntimeError(f"live-idle: no destination record to time the downtime by ({st.get('destination')!r})")
        downtimes.append(host)
        reported.append(st["downtime_ms"])
        totals.append(s)
    fig = Figure(downtimes, "ms")
    row = Row("live-idle", "live migration, idle running guest (console, 1 GiB random): downtime, source paused to "
              "destination running on the host clock (as QEMU's STOP to RESUME)", fig,
              target="<= 10 ms", met=fig.median <= 10, qemu_min=1.0)
    row.notes.append(f"the source's own downtime_ms (RESUMED's arrival less its estimated time on the wire) {Figure(reported, 'ms').text()}")
    row.notes.append(f"total {Figure(totals, 's').text()}")
    ctx.results[row.scenario] = row
    return [row]


def live_memtouch(fraction: float, label: str, target_ms: float = 50.0, bound_downtime: bool = True):
    """Issue 8: at a quarter of the link the migration must converge within the downtime target
    + 20 %; at half it must converge (with auto-converge), whatever the downtime."""
    def scenario(ctx: Context) -> list[Row]:
        tcp = ctx.limit("loopback TCP")
        rate_bytes = tcp.median * GIB * fraction
        pages_per_ms = max(1, int(rate_bytes / PAGE / 1000))
        args = {"wss": "512M", "pattern": "sequential", "rate": str(pages_per_ms), "report": "0"}
        image = ctx.image(f"memtouch-{label}", memsize=GIB, guest="memtouch", guest_args=args, random_bytes=GIB, tsc="host")
        downtimes, outcomes = [], []
        for _ in range(ctx.runs):
            try:
                _, st = migrate(ctx.work, f"mt{label}", source_args=["-r", image], dest_args=["-m", "1G", "--tsc", "host"],
                                live=True, params={"downtime_target_ms": target_ms, "policy": "auto-converge"})
            except Exception as err:
                outcomes.append(f"failed: {err}")
                continue
            downtimes.append(st["downtime_ms"])
            outcomes.append(f"{st['round_count']} rounds, throttle {max((r['throttle'] for r in st['rounds']), default=0):.0%}")
        fig = Figure(downtimes, "ms") if downtimes else None
        converged = fig is not None and len(downtimes) == len(outcomes)
        ok = converged and (not bound_downtime or fig.median <= target_ms * 1.2)
        row = Row(f"live-memtouch-{label}", f"live migration, memtouch dirtying {fraction:g} x link ({pages_per_ms} pages/ms"
                  f" = {pages_per_ms * PAGE * 1000 / GIB:.2f} GiB/s), downtime vs {target_ms:g} ms target", fig,
                  "downtime target", Figure([target_ms], "ms"), fig.median / target_ms if fig else None,
                  target=f"converges, <= {target_ms * 1.2:g} ms" if bound_downtime else "converges", met=ok)
        row.notes.append("; ".join(outcomes))
        ctx.results[row.scenario] = row
        return [row]
    return scenario


def checkpoint(where: str):
    def scenario(ctx: Context) -> list[Row]:
        image = random_image(ctx, 1)
        directory = ctx.disk if where == "disk" else ctx.shm
        src = Vmmrun(ctx.work, f"ckp{where}{os.getpid()}", "-r", image, "--pause-at=0")
        rates = []
        try:
            src.wait_state()
            wait_settled(src.proc.pid)
            client = src.client(timeout=300)
            for i in range(ctx.runs):
                path = os.path.join(directory, f"bench-ckp-{os.getpid()}-{i}.ckp")
                try:
                    started = time.perf_counter()
                    result = client.request("checkpoint", path=path, suspend=False)
                    seconds = time.perf_counter() - started
                finally:
                    remove_image(path)
                rates.append(result["bytes_written"] / seconds / GIB)
        finally:
            src.stop()
        fig = Figure(rates, "GiB/s")
        if where == "disk":
            lim = ctx.limit("O_DIRECT write")
            shown = os.path.relpath(ctx.disk) if ctx.disk.startswith(os.getcwd()) else ctx.disk  # no machine paths in reports
            row = Row("checkpoint-disk", f"checkpoint 1 GiB random to disk ({shown}), incl. fsync", fig, "O_DIRECT write", lim,
                      fig.median / lim.median, target=">= 0.85 x O_DIRECT write", met=fig.median >= 0.85 * lim.median)
        else:
            lim = ctx.limit("memcpy")
            row = Row("checkpoint-tmpfs", f"checkpoint 1 GiB random to tmpfs ({ctx.shm})", fig, "memcpy", lim, fig.median / lim.median)
        ctx.results[row.scenario] = row
        return [row]
    return scenario


def restore(ctx: Context) -> list[Row]:
    from vmmpy.runtime.commands import static_registry
    from vmmpy.runtime.config import VmConfig
    from vmmpy.snapshot.files import read_checkpoint, restore_memory

    registry = static_registry(VmConfig(name="bench", lpc={"com1": os.devnull}))
    sizes = (1, 4) if ctx.quick else (1, 4, 16)
    rows = []
    memcpy = ctx.limit("memcpy")
    for gib in sizes:
        data = GIB if gib == 1 else 256 * MIB
        image = random_image(ctx, 1) if gib == 1 else ctx.image(f"sparse{gib}g", memsize=gib * GIB, guest="console",
                                                                guest_args=CONSOLE_IDLE, random_bytes=data)
        ckpt = read_checkpoint(image, registry)
        eager, memory_only, lazy = [], [], []
        for i in range(ctx.runs):
            eager.append(_command_to_ready(ctx, f"rst{gib}-{i}", image))
            started = time.perf_counter()
            mem = restore_memory(ckpt, "eager", dirty_tracking="soft")  # vmmrun's default
            memory_only.append(time.perf_counter() - started)
            mem.close()
        for _ in range(max(5, ctx.runs)):
            started = time.perf_counter()
            mem = restore_memory(ckpt, "lazy", dirty_tracking="soft")
            lazy.append((time.perf_counter() - started) * 1000)
            mem.close()
        data_bytes = os.stat(image).st_blocks * 512
        rate = Figure([data_bytes / s / GIB for s in eager], "GiB/s")
        memory_rate = Figure([data_bytes / s / GIB for s in memory_only], "GiB/s")
        row = Row(f"restore-eager-{gib}g", f"eager restore {gib} GiB guest ({data_bytes / GIB:.2f} GiB data) from tmpfs, verified: "
                  "vmmrun -r from the command to the guest ready to run", rate, "memcpy", memcpy, rate.median / memcpy.median,
                  target="memory alone >= 2 GiB/s", met=memory_rate.median >= 2, qemu_min=1.5 if gib == 1 else None)
        row.notes.append(f"wall {Figure(eager, 's').text()}; the memory alone (restore_memory() in this process) "
                         f"{Figure(memory_only, 's').text()}, {memory_rate.text()}")
        lz = Figure(lazy, "ms")
        rows += [row, Row(f"restore-lazy-{gib}g", f"lazy restore {gib} GiB guest (nothing read until used)", lz, target="<= 5 ms",
                          met=lz.median <= 5)]
    for r in rows:
        ctx.results[r.scenario] = r
    return rows


def _command_to_ready(ctx: Context, name: str, image: str) -> float:
    """Seconds from starting ``vmmrun -r IMAGE --pause-at=0`` to its control socket saying the
    guest is paused, ready to run: process start, imports, metadata, memory, devices. What QEMU's
    restore figure times too (``QemuBench.restore_once``)."""
    started = time.perf_counter()
    vm = Vmmrun(ctx.work, f"{name}-{os.getpid()}", "-r", image, "--pause-at=0")
    try:
        vm.wait_state(("paused",), poll=0.002)
        return time.perf_counter() - started
    finally:
        vm.stop()


def harvest(ctx: Context) -> list[Row]:
    clean = GuestMemory(64 * GIB, dirty_tracking="soft")
    times = []
    try:
        clean.get_and_clear_dirty()
        for _ in range(max(20, ctx.runs)):
            started = time.perf_counter()
            clean.get_and_clear_dirty()
            times.append((time.perf_counter() - started) * 1000)
    finally:
        clean.close()
    dirty = GuestMemory(GIB, dirty_tracking="soft")
    full = []
    try:
        ones = np.ones(64 * MIB, dtype=np.uint8)
        for _ in range(max(3, ctx.runs)):
            for gpa in range(0, GIB, len(ones)):
                dirty.write(gpa, ones)
            started = time.perf_counter()
            pfns = dirty.get_and_clear_dirty()
            full.append((time.perf_counter() - started) * 1000)
            assert len(pfns) == GIB // PAGE
    finally:
        dirty.close()
    rows = [
        Row("harvest-clean-64g", "dirty harvest (get_and_clear), clean 64 GiB map, software bitmap", Figure(times, "ms"),
            target="<= 1 ms", met=Figure(times, "ms").median <= 1),
        Row("harvest-dirty-1g", "dirty harvest, fully dirty 1 GiB map (262144 pfns returned), software bitmap", Figure(full, "ms")),
    ]
    for r in rows:
        ctx.results[r.scenario] = r
    return rows


def vcpu_ips(ctx: Context) -> list[Row]:
    from vmmpy import _core
    from vmmpy.guest import assemble
    from vmmpy.guest.runner import boot

    loops = 25_000_000 if ctx.quick else 100_000_000
    program = assemble(f"start:\n    mov rcx, {loops}\ntop:\n    dec rcx\n    jnz top\n    cli\n    hlt\n", origin=0x100000)
    values = []
    for _ in range(max(3, ctx.runs)):
        memory = _core.GuestMemory(4 * MIB)
        cpu = boot(program, memory)
        started = time.perf_counter()
        exit = cpu.run(10 * loops)
        seconds = time.perf_counter() - started
        if exit.kind != "hlt":
            raise RuntimeError(f"the tight loop ended with {exit.kind}")
        values.append(cpu.instructions_retired / seconds / 1e6)
    fig = Figure(values, "M instr/s")
    row = Row("vcpu-ips", "simulated vCPU, tight dec/jnz loop", fig, target=">= 250 M instr/s", met=fig.median >= 250)
    ctx.results[row.scenario] = row
    return [row]


def text_image(ctx: Context, gib: int) -> str:
    return ctx.image(f"text{gib}g", memsize=gib * GIB, guest="console", guest_args=CONSOLE_IDLE, random_bytes=gib * GIB, fill="text")


def compression(content: str, cap_mib: int | None = None, gib: int = 1, streams: int = 1):
    """Issue 8's compression rows: a warm migration of ``gib`` GiB of ``content`` (text-like or
    random pages) with compression off and auto (and lz4 forced, to show what trying every batch
    costs), optionally over a link capped at ``cap_mib`` MiB/s, optionally over ``streams``
    parallel streams (each compressing on its own). The figure is guest memory moved per second
    (it can beat the link when compression pays); the limit is loopback TCP, or the cap."""
    def scenario(ctx: Context) -> list[Row]:
        image = text_image(ctx, gib) if content == "text" else random_image(ctx, gib)
        cap = cap_mib * MIB if cap_mib else None
        limit_name, limit = ("link cap", Figure([cap / GIB], "GiB/s")) if cap else ("loopback TCP", ctx.limit("loopback TCP"))
        modes = ("off", "auto") if cap else ("off", "auto", "lz4")
        tag = f"compress-{content}-{gib}g" + (f"-cap{cap_mib}m" if cap_mib else "") + (f"-streams{streams}" if streams > 1 else "")
        rows = []
        for mode in modes:
            params: dict = {"compress": mode}
            if streams > 1:
                params["streams"] = streams
            if cap:
                params["bandwidth_cap"] = cap
            seconds, stats = [], []
            for _ in range(ctx.runs):
                s, st = migrate(ctx.work, f"cz{content[0]}{mode}", source_args=["-r", image, "--pause-at=0"], dest_args=["-m", f"{gib}G"],
                                live=False, params=params)
                seconds.append(s)
                stats.append(st)
            rate = Figure([gib / s for s in seconds], "GiB/s")
            what = (f"warm migration, {gib} GiB {'text-like' if content == 'text' else 'random'} memory, compress={mode}"
                    + (f", link capped at {cap_mib} MiB/s" if cap else "") + (f", {streams} streams" if streams > 1 else ""))
            row = Row(f"{tag}-{mode}", what, rate, limit_name, limit, rate.median / limit.median)
            last = stats[-1]
            row.extra = {"seconds": seconds, "bytes_total": [st["bytes_total"] for st in stats],
                         "compressed_batches": [st["compressed_batches"] for st in stats],
                         "compress_attempts": [st["compress_attempts"] for st in stats],
                         "saved_bytes": [st["compression_saved_bytes"] for st in stats]}
            row.notes.append(f"wall {Figure(seconds, 's').text()}; {last['bytes_total'] / GIB:.2f} GiB on the wire, "
                             f"{last['compressed_batches']} of {last['compress_attempts']} tried batches compressed, "
                             f"{last['compression_saved_bytes'] / GIB:.2f} GiB saved (last run)")
            ctx.results[row.scenario] = row
            rows.append(row)
        return rows
    return scenario


def _args(d: dict[str, str]) -> list[str]:
    return [a for k, v in d.items() for a in ("--guest-arg", f"{k}={v}")]


#: GiB a run that includes a scenario may touch at once, where that is more than the hold's
#: default: a 4 GiB row's source, destination and image on tmpfs (QEMU's alike), beside the
#: images the 1 GiB rows before it leave on tmpfs, with some to spare (backed with 14 GiB, the
#: first 4 GiB run still paid the hypervisor's faults: 7.3 s, 13 CPU-s); the 8 GiB row's two guests
#: and as much of its image on disk as the page cache keeps.
TOUCHES_GIB = {"warm-4g": 18, "warm-4g-wired": 18, "warm-8g": 22}


def touches(names: list[str]) -> int:
    """Bytes ``--hold-host-memory`` backs for the scenarios ``names``: the most any of them touches
    at once (``hostmem.back`` leaves the machine its spare)."""
    return max([hostmem.BACK_BYTES] + [TOUCHES_GIB[n] * GIB for n in names if n in TOUCHES_GIB])


# name -> (function, in --quick)
SCENARIOS: dict[str, tuple[Callable[[Context], list[Row]], bool]] = {
    "warm-1g": (warm_random(1), True),
    "warm-1g-wired": (warm_random(1, wired=True), True),
    "warm-1g-streams2": (warm_streams(2), True),
    "warm-1g-streams4": (warm_streams(4), True),
    "warm-1g-wired-streams2": (warm_streams(2, wired=True), True),
    "warm-1g-wired-streams4": (warm_streams(4, wired=True), True),
    "warm-4g": (warm_random(4), False),
    "warm-4g-wired": (warm_random(4, wired=True), False),
    "warm-8g": (warm_8g, False),
    "warm-1g-tls": (warm_tls(), True),
    "warm-tls-1g-streams2": (warm_tls(2), False),
    "zero-1g": (zero_1g, True),
    "sparse-64g": (sparse_64g, True),
    "local-1g": (local_migration(1), True),
    "local-64g": (local_migration(64), True),
    "live-idle": (live_idle, True),
    "live-memtouch-quarter": (live_memtouch(0.25, "quarter"), True),
    "live-memtouch-half": (live_memtouch(0.5, "half", bound_downtime=False), True),
    "checkpoint-disk": (checkpoint("disk"), True),
    "checkpoint-tmpfs": (checkpoint("tmpfs"), True),
    "restore": (restore, True),
    "harvest": (harvest, True),
    "vcpu-ips": (vcpu_ips, True),
    "compress-text-1g": (compression("text"), True),
    "compress-random-1g": (compression("random"), True),
    "compress-text-1g-cap": (compression("text", cap_mib=256), True),
    "compress-random-1g-cap": (compression("random", cap_mib=256), False),
    "compress-text-1g-streams2": (compression("text", streams=2), False),
}
