"""vmmrun: run a vmmpy guest, as bhyve runs one.

    vmmrun [-c NCPUS] [-m MEMSIZE] [-S] [-s SLOT,EMULATION[,CONF]]... [-l com1,stdio|FILE]
           [--guest NAME|FILE] [--guest-arg KEY=VALUE]... [--tsc host|instructions] [--idle sleep|skip]
           [--vendor intel|amd] [-r FILE [--key-file FILE] | -R HOST:PORT [--key-file FILE]
           [--tls-cert FILE --tls-key FILE --tls-ca FILE] [--insecure] [--io-timeout S]] VMNAME

Exit status follows bhyve(8): 0 reset, 1 powered off, 2 halted, 3 triple fault, 4 error.
SIGINT and SIGTERM power the guest off; with -R, before the guest runs, they end the wait or the
transfer at once (exit 4, "stopped by SIGTERM ...").
"""

from __future__ import annotations

from . import tool_environment
from .launch import interrupts_end_quietly, interrupts_raise_again

tool_environment()  # before anything loads numpy
# Run as a module (python -m): Ctrl-C while the imports below load ends it without a traceback.
_quiet_while_loading = __name__ == "__main__" and interrupts_end_quietly()

import argparse
import importlib
import logging
import os
import signal
import sys
import threading
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

from ..devices.registry import PCI_EMULATIONS
from ..migration import MigrationError, MigrationParams, parse_address
from ..migration.net import format_address, is_loopback_address, is_unix
from ..runtime.commands import MachineCommands, build_machine, restore_machine
from ..runtime.config import (
    ACCELS,
    DIRTY_TRACKING,
    IDLE_MODES,
    MEMORY_BACKINGS,
    TSC_MODES,
    VENDORS,
    ConfigError,
    VmConfig,
    parse_guest_arg,
    parse_lpc,
    parse_memsize,
    parse_slot,
)
from ..runtime.control import valid_vm_name
from ..runtime.process import EXIT_ERROR, EXIT_NAMES, Machine
from ..snapshot import CheckpointError
from ..snapshot.checkpoint import RECORD_SECONDS, RESTORE_MODES, RESTORE_PREFETCH, describe_lazy_restore
from ..snapshot.files import RESTORE_PAGE_CACHE
from ..state import SectionError
from ..units import format_memsize
from ..vmm.ioctl import SuspendHow
from . import live_update, vmmrun_config
from .about import VersionAction
from .keyfile import read_key
from .progressbar import ProgressBar

if TYPE_CHECKING:
    # Imported where they are used (docs/performance.md, session 24): a restore waits for neither
    # the migration engines nor the guest programs' assembler. A boot loads the assembler in
    # machine_for; -R the engines before it listens; a running guest the source's on the
    # load-meanwhile thread.
    from ..migration.tls import TlsConfig

EPILOG = """\
guests:
  --guest takes the name of a shipped guest program (see docs/guests.md; `vmmrun --list-guests`)
  or the path of an assembly file for the simulated ISA (docs/isa.md). --guest-arg KEY=VALUE
  sets the program's arguments.

restore and migration:
  -r FILE resumes a guest saved by `vmmctl --checkpoint/--suspend FILE`: vCPUs, memory, vendor and
  TSC come from the checkpoint; -s/-l options must match the saved ones. With --restore-mode lazy
  the guest runs at once while a background thread loads its memory (verified): first the chunks
  it touched first last time (FILE.ws), then the rest (--restore-prefetch); vmmctl --status shows
  how long the guest waited on loads. A checkpoint saved with
  --key-file restores only with the same --key-file (its metadata carries an HMAC-SHA256); one
  saved without a key is refused with --key-file, since the key cannot authenticate it.
  -R HOST:PORT starts an empty guest that waits for one incoming migration (`vmmctl --migrate` on
  the source), then runs it. Give the same -m/-c/-s/-l options as the source.
  -R unix:PATH waits on a Unix socket (mode 0600) for a local migration (`vmmctl --migrate-local
  unix:PATH`): the source's memfd memory is mapped here, not copied. A path a live vmmrun listens
  on is refused; a stale socket left by a killed one is replaced.

securing a migration (docs/migration.md, "Setting up keys and certificates"):
  --key-file FILE   a shared secret: only a source holding it may send a guest, and this vmmrun
                    proves it holds it too. It does not hide the guest's memory on the wire.
  --tls-cert FILE --tls-key FILE --tls-ca FILE
                    mutual TLS 1.3: the stream is encrypted and integrity-protected, and the source
                    must present a certificate signed by the CA in --tls-ca (the source checks this
                    host's certificate the same way). Use a CA that signs only migration hosts.
  Both together: TLS protects the stream, the key limits who may migrate to those who hold it.
  Listening on a non-loopback address needs one of them, or --insecure.

examples:
  vmmrun --guest abtest --guest-arg sweeps=100 -m 256M -l com1,console.log vm0
  vmmrun -c 2 -m 1G -S -s 0,hostbridge -s 1,lpc -l com1,stdio --guest console vm1
  vmmrun -r /var/tmp/vm0.ckp -l com1,console.log vm0
  vmmrun -r /var/tmp/vm0.ckp --key-file ckp.key -l com1,console.log vm0
  vmmrun -m 256M -l com1,console.log -R 127.0.0.1:24983 --key-file mig.key vm0
  vmmrun -m 1G -R 10.0.0.2:24983 --tls-cert dst.crt --tls-key dst.key --tls-ca ca.pem --key-file mig.key vm0

while it runs, `vmmctl --vm=VMNAME ...` controls it through its control socket.
exit status: 0 reset, 1 powered off, 2 halted, 3 triple fault, 4 error, bad options included
(bhyve's convention).
SIGINT and SIGTERM power the guest off; with -R they end a wait for the source (or a transfer) at
once, and vmmrun exits 4 saying so.
"""


class _Parser(argparse.ArgumentParser):
    """Bad options exit 4, as bhyve's do: vmmrun's status 2 means the guest halted."""

    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(EXIT_ERROR, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="vmmrun",
        description="Run a vmmpy guest (like bhyve).",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("-c", "--cpus", dest="ncpus", type=int, default=None, metavar="NCPUS", help="number of vCPUs (default 1)")
    p.add_argument("-m", "--memory", dest="memsize", default=None, metavar="MEMSIZE",
                   help="guest memory: a number of MiB, or with a K/M/G/T suffix (default 256M)")
    p.add_argument("-S", "--wire", dest="wired", action="store_true", help="wire guest memory: populate and mlock it up front, 2 MiB a step on huge or small pages, whichever it times cheaper here (vmmctl --status says which)")
    p.add_argument("-s", "--slot", dest="slots", action="append", default=[], metavar="SLOT,EMULATION[,CONF]",
                   help=f"place a PCI device: SLOT[:FUNC] or BUS:SLOT:FUNC, then the emulation ({', '.join(PCI_EMULATIONS)}; options in docs/devices.md)")
    p.add_argument("-l", "--lpc", dest="lpc", action="append", default=[], metavar="com1,stdio|FILE",
                   help="connect an LPC device: com1 or com2 to stdio or to a file")
    p.add_argument("--guest", metavar="NAME|FILE", help="the guest program to run (required)")
    p.add_argument("--guest-arg", dest="guest_args", action="append", default=[], metavar="KEY=VALUE",
                   help="an argument for the guest program (repeatable)")
    p.add_argument("--list-guests", action="store_true", help="list the shipped guest programs and their arguments, then exit")
    p.add_argument("--tsc", choices=TSC_MODES, default=None,
                   help="guest TSC source: retired instructions (deterministic, default) or the host clock")
    p.add_argument("--idle", choices=IDLE_MODES, default=None,
                   help="what a halted vCPU does on the instruction TSC while it waits for its next timer: sleep (default) "
                        "until the host's clock catches up, so an idle guest's time follows the host's and costs little CPU; "
                        "skip jumps to the timer at once, running an idle guest's ticks flat out (fast-forward). Without "
                        "outside input a one-vCPU guest ends the same either way")
    p.add_argument("--vendor", choices=VENDORS, default=None, help="vCPU state layout: intel (VMCS-like, default) or amd (VMCB-like)")
    p.add_argument("--dirty-tracking", choices=DIRTY_TRACKING, default=None,
                   help="dirty page tracking backend: soft (default; exact for every write the VM makes), kernel "
                        "(userfaultfd write-protect + PAGEMAP_SCAN, sees any write), auto (kernel where it works), kvm "
                        "(KVM's dirty bitmap: --accel kvm's default) or kvm-ring (KVM's per-vCPU dirty ring, "
                        "--accel kvm only; docs/kvm.md compares the two)")
    p.add_argument("--accel", choices=ACCELS, default=None,
                   help="vCPU backend: sim (the simulated vCPU, default) or kvm (real x86-64 guests under /dev/kvm, docs/kvm.md)")
    p.add_argument("--memory-backing", choices=MEMORY_BACKINGS, default=None,
                   help="what backs guest memory: anon (default; private anonymous memory) or memfd (a memfd per "
                        "segment, mapped shared: needed to hand the guest to another vmmrun on this host with "
                        "vmmctl --migrate-local or --live-update, which then copies nothing). memfd costs the same "
                        "to run (measured, docs/memory.md); its pages are shmem, so they count as Shmem, not "
                        "AnonPages, and go to swap only through shmem's own swapping")
    p.add_argument("-k", "--config", dest="config_sources", action=vmmrun_config.ConfigSource, metavar="FILE",
                   help="read configuration variables (key=value lines, as bhyve's -k) from FILE; repeatable")
    p.add_argument("-o", "--option", dest="config_sources", action=vmmrun_config.ConfigSource, metavar="KEY=VALUE",
                   help="set a configuration variable (as bhyve's -o), e.g. -o memory.size=1G; -k and -o apply in "
                        "order, and an option given on the command line wins over both")
    p.add_argument("--version", action=VersionAction)
    p.add_argument("--run-dir", type=Path, metavar="DIR", help="where the control socket goes (default: vmmctl's run directory)")
    p.add_argument("-r", "--restore", metavar="FILE", help="resume the guest saved in checkpoint FILE (and FILE.kern, FILE.meta)")
    p.add_argument("--restore-mode", choices=RESTORE_MODES, default="eager",
                   help="eager: read and verify all memory first (default); lazy: read nothing up front, each chunk is read "
                        "and verified the first time it is needed (a bad one stops the guest)")
    p.add_argument("--restore-prefetch", choices=RESTORE_PREFETCH, default="working-set",
                   help="with --restore-mode lazy, what a background thread loads (verified) once the guest starts: "
                        "working-set: the chunks recorded in FILE.ws first, then every other chunk (default); fill: every "
                        "chunk in order; none: each chunk only when first needed")
    p.add_argument("--restore-page-cache", choices=RESTORE_PAGE_CACHE, default="auto",
                   help="auto: a memory file read from the disk is dropped from the page cache as it is restored, so no "
                        "second copy of the guest stays cached; a file found cached stays cached (default); keep: leave "
                        "it cached, for an image restored again and again")
    p.add_argument("--record-working-set", type=float, default=RECORD_SECONDS, metavar="SECONDS",
                   help="with --restore-mode lazy, record the chunks the guest touches in its first SECONDS and write "
                        f"them to FILE.ws for the next lazy restore (default {RECORD_SECONDS:g}; 0: do not record)")
    p.add_argument("-R", "--receive", metavar="HOST:PORT",
                   help="wait for an incoming migration on HOST:PORT (also HOST,PORT or [IPV6]:PORT), or for a local one "
                        "on unix:PATH (a Unix socket, mode 0600), then run the guest")
    p.add_argument("--key-file", type=Path, metavar="FILE",
                   help="a shared key (at least 16 bytes). With -R: the source must prove it holds it. With -r: the "
                        "checkpoint's MAC must verify under it (the key it was saved with)")
    p.add_argument("--tls-cert", metavar="FILE",
                   help="with -R: this host's certificate (PEM); with --tls-key and --tls-ca the source must connect "
                        "over mutual TLS 1.3")
    p.add_argument("--tls-key", metavar="FILE", help="with -R: the private key of --tls-cert (PEM, not encrypted; keep it mode 0600)")
    p.add_argument("--tls-ca", metavar="FILE",
                   help="with -R: the CA certificate(s) (PEM) that must have signed the source's certificate")
    p.add_argument("--insecure", action="store_true",
                   help="with -R: allow listening on a non-loopback address with neither a key nor TLS")
    p.add_argument("--no-populate", action="store_true",
                   help="with -R HOST:PORT: leave guest memory untouched while waiting for the source. By default a "
                        "thread populates it then (as QEMU's prealloc=on), so the host's page faults are paid before "
                        "the source stops its guest, not during the migration; pages that arrive as zero are given back")
    p.add_argument("--accept-timeout", type=float, default=300.0, metavar="SECONDS",
                   help="with -R: how long to wait for the source to connect (default 300)")
    p.add_argument("--io-timeout", type=float, metavar="SECONDS",
                   help="with -R: how long a source may send or take nothing, as vmmctl --io-timeout is for the source. "
                        "Before the commit a silent source fails the migration here (its guest runs on at the source); in "
                        "the commit this vmmrun holds the guest in doubt instead; a connection silent through the handshake "
                        f"(at most {MigrationParams.handshake_timeout:g} s) is dropped while vmmrun waits on "
                        f"(default {MigrationParams.io_timeout:g})")
    p.add_argument("--take-name", action="store_true",
                   help="with -R unix:PATH: a live update's successor (vmmctl --live-update starts it): open the control "
                        "socket only once the guest has arrived and the old vmmrun of this VMNAME has let the name go")
    p.add_argument("--pause-at", type=int, metavar="N",
                   help="pause the guest once vCPU 0 has retired N instructions (0: start paused); vmmctl --resume goes on")
    p.add_argument("-v", "--verbose", action="store_true", help="log what the VM does")
    p.add_argument("vmname", nargs="?", metavar="VMNAME", help="the guest's name, used by vmmctl --vm")
    return p


def config_from_args(args: argparse.Namespace) -> VmConfig:
    if not args.vmname:
        raise ConfigError("no VMNAME given: name the guest as the last argument")
    if not valid_vm_name(args.vmname):
        raise ConfigError(f"VMNAME {args.vmname!r}: use letters, digits, '-', '_' and '.', at most 64")
    config = VmConfig(
        name=args.vmname,
        ncpus=args.ncpus if args.ncpus is not None else VmConfig.ncpus,
        memsize=parse_memsize(args.memsize) if args.memsize is not None else VmConfig.memsize,
        wired=args.wired,
        slots=[parse_slot(s) for s in args.slots],
        guest=args.guest,
        guest_args=dict(parse_guest_arg(a) for a in args.guest_args),
        tsc=args.tsc or VmConfig.tsc,
        idle=args.idle or VmConfig.idle,
        vendor=args.vendor or VmConfig.vendor,
        dirty_tracking=args.dirty_tracking or VmConfig.dirty_tracking,
        memory_backing=args.memory_backing or VmConfig.memory_backing,
        accel=args.accel or VmConfig.accel,
    )
    if config.accel == "kvm" and args.dirty_tracking is None:
        config.dirty_tracking = "kvm"  # KVM's dirty log: the one a KVM guest's memory has
    if config.accel == "kvm" and args.pause_at is not None:
        raise ConfigError("--pause-at counts retired instructions, which KVM does not count: leave it out with --accel kvm")
    for spec in args.lpc:
        device, backend = parse_lpc(spec)
        config.lpc[device] = backend
    config.validate()
    return config


log = logging.getLogger("vmmrun")


def list_guests() -> int:
    from ..guest.programs import PROGRAMS

    for _, program in sorted(PROGRAMS.items()):
        print(program.usage())
    return 0


def read_tls(args: argparse.Namespace) -> TlsConfig | None:
    """The destination's mutual TLS from --tls-cert/--tls-key/--tls-ca: all three or none."""
    given = {name: getattr(args, name.replace("-", "_")) for name in ("tls-cert", "tls-key", "tls-ca")}
    if not any(given.values()):
        return None
    if not args.receive:
        raise ConfigError("--tls-cert, --tls-key and --tls-ca secure an incoming migration: they go with -R HOST:PORT")
    missing = [f"--{name}" for name, value in given.items() if not value]
    if missing:
        raise ConfigError(f"mutual TLS needs --tls-cert, --tls-key and --tls-ca together; missing {', '.join(missing)}")
    from ..migration.tls import TlsConfig

    return TlsConfig(os.path.abspath(args.tls_cert), os.path.abspath(args.tls_key), os.path.abspath(args.tls_ca))


def listen_policy_error(host: str, *, key: bytes | None, tls: TlsConfig | None, insecure: bool) -> str | None:
    """Why listening on ``host`` is refused, or None. A non-loopback address needs the source to
    authenticate: by the shared key, or by a certificate under mutual TLS (either will do: with
    TLS the CA vouches for the source). ``--insecure`` accepts neither."""
    if key is not None or tls is not None or insecure or is_loopback_address(host) or is_unix(host):
        return None
    return ("listening on a non-loopback address without --key-file or TLS (--tls-cert, --tls-key, --tls-ca) lets "
            "anyone send a guest; give a key or certificates, or --insecure to accept that")


def saved_differs(args: argparse.Namespace, saved: VmConfig) -> str | None:
    """What an explicitly given -m/-c/--vendor/--tsc says that the restored guest does not, in
    the user's terms (``the saved guest has -m 256M, -m 128M was given``), or None."""
    given = []
    if args.memsize is not None and parse_memsize(args.memsize) != saved.memsize:
        given.append(("-m", format_memsize(saved.memsize), args.memsize))
    if args.ncpus is not None and args.ncpus != saved.ncpus:
        given.append(("-c", saved.ncpus, args.ncpus))
    for flag, mine, theirs in (("--vendor", args.vendor, saved.vendor), ("--tsc", args.tsc, saved.tsc)):
        if mine is not None and mine != theirs:
            given.append((flag, theirs, mine))
    if not given:
        return None
    return "; ".join(f"the saved guest has {flag} {has}, {flag} {was} was given" for flag, has, was in given)


def starting_what(args: argparse.Namespace) -> str:
    """What ``machine_for`` was doing, for a message about its being interrupted."""
    if args.restore:
        return f"restoring '{args.restore}'"
    if args.receive:
        return f"setting up its {'wired ' if args.wired else ''}memory to receive a migration"
    return f"setting up its {'wired ' if args.wired else ''}memory"


def machine_for(args: argparse.Namespace, config: VmConfig, key: bytes | None = None) -> Machine:
    """The machine for a fresh boot, a restore (-r) or an incoming migration (-R), built as the
    library's ``vmmpy.Vm`` builds one (``runtime.commands.build_machine``, with the guest
    program assembled by ``guest.programs.load_into``)."""
    if args.restore:
        if config.guest:
            raise ConfigError("-r restores a saved guest: do not also give --guest")
        bar = ProgressBar(sys.stderr)  # on a terminal only: how far an eager restore's read has got
        try:
            if args.record_working_set < 0:
                raise ConfigError(f"--record-working-set {args.record_working_set:g}: give 0 (do not record) or more seconds")
            machine = restore_machine(args.restore, config, mode=args.restore_mode, key=key, progress=bar.phase if bar.tty else None,
                                      prefetch=args.restore_prefetch, record_seconds=args.record_working_set,
                                      accel=args.accel, page_cache=args.restore_page_cache)
        finally:
            bar.close()
        conflict = saved_differs(args, machine.config)
        if conflict:
            machine.close()
            raise ConfigError(f"-r {args.restore}: {conflict}; leave it out with -r (memory, vCPUs, vendor and TSC "
                              "come from the checkpoint)")
        return machine
    if not args.receive and not config.guest:
        raise ConfigError("no guest program: give --guest NAME or --guest FILE (see --list-guests), -r FILE or -R HOST:PORT")
    if args.receive:
        return build_machine(config)  # empty memory: the migration fills it
    from ..guest.programs import load_into

    return build_machine(config, load=lambda machine: load_into(machine, config.guest, config.guest_args, memsize=config.memsize))


def stopped_while_receiving(name: str, listen_at: str, peer: str | None) -> str:
    if peer is None:
        return f"stopped by {name} while waiting on {listen_at} for a source to connect; no guest was received"
    return f"stopped by {name} during the incoming migration from {peer}; the half-received guest is discarded"


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="vmmrun: %(message)s")
    if args.list_guests:
        return list_guests()
    config: VmConfig | None = None
    receive_params: MigrationParams | None = None  # -R: the destination's waits (--io-timeout)
    doing = "reading its options"  # what a Ctrl-C before the guest exists interrupted
    try:
        vmmrun_config.apply(args, vmmrun_config.read_sources(args.config_sources or []))
        if args.restore and args.receive:
            raise ConfigError("-r and -R cannot be combined: restore from a file or receive a migration")
        config = config_from_args(args)
        key = read_key(args.key_file)
        if key is not None and not (args.restore or args.receive):
            raise ConfigError("--key-file goes with -r FILE (a keyed checkpoint) or -R HOST:PORT (a migration)")
        tls = read_tls(args)
        receive_at = parse_address(args.receive) if args.receive else None
        if receive_at and is_unix(receive_at[0]) and tls is not None:
            raise ConfigError(f"-R {args.receive}: a local migration goes over a Unix socket on this host (mode 0600): "
                              "TLS does not apply; leave out --tls-cert, --tls-key and --tls-ca")
        refusal = listen_policy_error(receive_at[0], key=key, tls=tls, insecure=args.insecure) if receive_at else None
        if refusal:
            raise ConfigError(f"-R {args.receive}: {refusal}")
        if args.io_timeout is not None and not receive_at:
            raise ConfigError("--io-timeout goes with -R HOST:PORT (the waits of a migration this vmmrun receives)")
        if receive_at:  # a bad --io-timeout is named here, before anything starts
            receive_params = MigrationParams(**(MigrationParams.io_timeouts(args.io_timeout) if args.io_timeout is not None else {}))
        if args.take_name and not (receive_at and is_unix(receive_at[0])):
            raise ConfigError("--take-name is for a live update's successor: it goes with -R unix:PATH")
        doing = starting_what(args)
        machine = machine_for(args, config, key)
    except (ConfigError, ValueError, CheckpointError, SectionError) as err:
        print(f"vmmrun: {err}", file=sys.stderr)
        return EXIT_ERROR
    except OSError as err:
        print(f"vmmrun: {err.strerror or err}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt as err:
        # Ctrl-C before the guest exists. Wiring and an eager restore's read of memory stop for
        # it within 64 MiB (the message says how far they got); other steps when they return.
        # Nothing was started, nothing is left.
        name = config.name if config else args.vmname
        detail = f" ({err})" if str(err) else ""
        print(f"vmmrun: {name + ': ' if name else ''}stopped by SIGINT while {doing}{detail}; no guest ran", file=sys.stderr)
        return EXIT_ERROR
    commands = MachineCommands(machine)
    cancel = threading.Event()
    try:
        commands.install()
        live_update.install(machine, commands, args)
        if args.pause_at is not None:
            machine.pause_at = args.pause_at
        if receive_at:
            # Before listening, not on a thread: the migration may begin at once, and its
            # downtime (a live update's whole handover) must not share the CPU with an import.
            importlib.import_module("numpy")
            # Listening before the control socket answers: a vmmctl that finds this VM (the
            # README's walk-through waits for --status) finds it ready for the source too.
            commands.listen_for_migration(*receive_at, key=key, tls=tls, cancel=cancel, populate=not args.no_populate,
                                          params=receive_params)
        if not args.take_name:
            machine.serve(args.run_dir)
    except (MigrationError, OSError, KeyboardInterrupt) as err:
        if isinstance(err, KeyboardInterrupt):
            print(f"vmmrun: {config.name}: stopped by SIGINT while starting; no guest ran", file=sys.stderr)
        else:
            print(f"vmmrun: {config.name}: {err}" if isinstance(err, MigrationError) else f"vmmrun: {err.strerror or err}",
                  file=sys.stderr)
        if commands.incoming is not None:
            commands.incoming.close()
        machine.close()
        return EXIT_ERROR

    # A signal powers the guest off. A destination still waiting for, or receiving, its guest
    # is cancelled instead (which wakes the accept or the transfer at once, and discards a
    # half-received guest); one holding the guest in doubt refuses: only the resolution may end it.
    stopped_by: list[int] = []

    def on_signal(signum, frame):
        if commands.in_doubt() is not None:
            print(f"vmmrun: {config.name}: not stopping: this guest's migration is in doubt; settle it with "
                  f"`vmmctl --vm={config.name} --migrate-resolve` (SIGKILL ends this process and its copy)",
                  file=sys.stderr, flush=True)
            return
        stopped_by.append(signum)
        incoming = commands.incoming
        if incoming is not None and incoming.state in ("waiting", "migrating"):
            cancel.set()
            return
        machine.suspend(SuspendHow.POWEROFF)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        if receive_at:
            host, port = receive_at
            log.info("%s: waiting for a migration on %s", config.name, format_address(host, port))
            stats = commands.receive_migration(args.accept_timeout)
            if stats.status != "completed":
                if stopped_by or commands.destroyed_while_receiving:
                    by = signal.Signals(stopped_by[0]).name if stopped_by else "vmmctl --destroy"
                    print(f"vmmrun: {config.name}: {stopped_while_receiving(by, format_address(host, port), stats.peer)}",
                          file=sys.stderr)
                else:
                    print(f"vmmrun: {config.name}: incoming migration {stats.status}: {stats.error}", file=sys.stderr)
                for note in stats.notes:
                    print(f"vmmrun: {config.name}:   note: {note}", file=sys.stderr)
                return EXIT_ERROR
            log.info("%s: migration received; running. %s", config.name, stats.summary())
            load_meanwhile()  # the guest may move on from here: the source's engine, before it is asked for
            if args.take_name:
                try:
                    live_update.serve_when_free(machine, args.run_dir)
                except OSError as err:
                    print(f"vmmrun: {config.name}: runs the guest but cannot take its name: {err.strerror or err}",
                          file=sys.stderr)
        else:
            machine.start_vcpus()
            load_meanwhile()
        while (status := machine.wait(0.5)) is None:
            pass
    except (MigrationError, OSError) as err:
        message = str(err)
        if receive_at and commands.destroyed_while_receiving:
            # The destroy tore the machine down under the receiver: say what ended it.
            record = commands.incoming.stats if commands.incoming is not None else None
            peer = record.peer if record is not None else None
            message = stopped_while_receiving("vmmctl --destroy", format_address(*receive_at), peer)
        print(f"vmmrun: {config.name}: {message}", file=sys.stderr)
        return EXIT_ERROR
    finally:
        machine.close()
    if args.verbose and machine.lazy_loading is not None:
        print(f"vmmrun: {config.name}: {describe_lazy_restore(machine.lazy_loading.status())}", file=sys.stderr)
    if args.verbose or status not in (0, 1, 2):
        print(f"vmmrun: {config.name}: {machine.exit_reason or EXIT_NAMES.get(status, status)}", file=sys.stderr)
    return status


#: What a running guest may need later and its start does not: the migration engine and its wire
#: protocol (a migration or an estimate away from here; 50 ms), then numpy (a diff checkpoint's
#: dirty pages; 0.1 s).
LOAD_MEANWHILE = ("vmmpy.migration.source", "numpy")


def load_meanwhile() -> None:
    """Import :data:`LOAD_MEANWHILE` on a thread of its own once the guest has started: the start
    (a restore's included) does not wait for them, and a migration or a pause that needs them
    later finds them loaded (or waits only for the rest of the import)."""

    def load() -> None:
        for name in LOAD_MEANWHILE:
            importlib.import_module(name)

    threading.Thread(target=load, name="load-meanwhile", daemon=True).start()


if __name__ == "__main__":
    interrupts_raise_again(_quiet_while_loading)
    raise SystemExit(main())
