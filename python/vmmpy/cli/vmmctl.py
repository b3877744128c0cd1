"""vmmctl: control a running vmmpy guest, as bhyvectl controls bhyve.

Every action talks to the guest's ``vmmrun`` process through its control socket (see
:mod:`vmmpy.runtime.control`). Options accept bhyvectl's spellings, ``--vm=NAME`` and ``--vm NAME``.
"""

from __future__ import annotations

from . import tool_environment
from .launch import interrupts_end_quietly, interrupts_raise_again

tool_environment()  # before anything loads numpy
# Run as a module (python -m): Ctrl-C while the imports below load ends it without a traceback.
_quiet_while_loading = __name__ == "__main__" and interrupts_end_quietly()

import argparse
import errno
import json
import os
import select
import signal
import sys
import time
from pathlib import Path
from typing import Any

from ..migration import COMPRESS_MODES, POLICIES, VERIFY_MODES, MigrationParams
from ..migration.convergence import MAX_STREAMS
from ..migration.stats import populate_text, stopped_text
from ..runtime.control import ControlClient, ControlError, guest_stays_here, list_vms, run_dir
from ..units import format_size, parse_rate
from .about import VersionAction
from .keyfile import read_key
from .progressbar import ProgressBar, bar, eta_text
from .report import ReportError, write_report

EPILOG = """\
examples:
  vmmctl --list                          list the guests running on this host
  vmmctl --vm=vm0 --get-stats            exit counts, instructions, interrupts per vCPU
  vmmctl --vm=vm0 --get-all              every register of every vCPU
  vmmctl --vm=vm0 --pause                stop all vCPUs (the guest keeps its state)
  vmmctl --vm=vm0 --resume               let them run again
  vmmctl --vm=vm0 --destroy              power the guest off and end its vmmrun
  vmmctl --vm=vm0 --checkpoint=vm0.ckp   save vm0.ckp, .kern, .meta; the guest keeps running
  vmmctl --vm=vm0 --suspend=vm0.ckp      save, then end the guest (resume: vmmrun -r vm0.ckp ...)
  vmmctl --vm=vm0 --suspend=vm0.ckp --key-file ckp.key   keyed: vmmrun -r vm0.ckp --key-file ckp.key
  vmmctl --vm=vm0 --checkpoint=vm0.d1 --diff   only the pages written since vm0's last checkpoint (parent: that one)
  vmmctl --vm=vm0 --checkpoint=vm0.ckp --live   pause only to freeze state; memory is written while vm0 runs
  vmmctl --vm=vm0 --checkpoint-cancel    stop the live checkpoint being written (no file is left; vm0 runs on)
  vmmctl --check-checkpoint vm0.d1       verify every file of its chain (no VM needed)
  vmmctl --merge-checkpoint vm0.d1 --output vm0.full   flatten the chain into one full checkpoint
  vmmctl --vm=vm0 --migrate 10.0.0.2 24983        warm migration: stop, copy, commit
  vmmctl --vm=vm0 --migrate-live 10.0.0.2,24983 --key-file mig.key --downtime-ms 50
  vmmctl --vm=vm0 --migrate-live 10.0.0.2 24983 --bandwidth 100M --estimate   predict, do not migrate
  vmmctl --vm=vm0 --migrate 10.0.0.2 24983 --bandwidth 100M --compress lz4   compress every batch that shrinks
  vmmctl --vm=vm0 --migrate-live 10.0.0.2 24983 --key-file mig.key --report mig.html
  vmmctl --vm=vm0 --migrate-live 10.0.0.2 24983 --tls-cert src.crt --tls-key src.key --tls-ca ca.pem --key-file mig.key
  vmmctl --vm=vm0 --migrate 10.0.0.2 24983 --key-file mig.key --streams 4   pages over 4 connections at once
  vmmctl --vm=vm0 --migrate-local unix:/run/vm0.mig   hand the guest to `vmmrun -R unix:/run/vm0.mig ...` on
                                         this host: its memfd memory is passed, not copied
  vmmctl --vm=vm0 --migrate-status       statistics of the running (or last) migration
  vmmctl --vm=vm0 --migrate-cancel       cancel it; the guest stays here as it was (running, or paused),
                                         and vmmctl says which (exit 1 if it had already left)
  vmmctl --vm=vm0 --migrate-resolve      a migration in doubt (exit 3): ask the other side again and settle it
  vmmctl --vm=vm0 --migrate-resolve=run-here --force    the other side is gone: run the guest here (see docs)
  vmmctl --report mig.png --from-json stats.json    draw a report from saved `--json` output

checkpoints: with --key-file the metadata carries an HMAC-SHA256 under the key (and SHA-256 digests
  of the state and of every memory chunk), so a changed checkpoint is refused on restore, which
  needs the same key (vmmrun -r FILE --key-file FILE). With --diff, FILE holds only the pages
  the guest wrote since its previous checkpoint (taken by this vmmrun, or the one it was restored
  from) and names that one as its parent; with no previous checkpoint --diff is refused (write a
  full one first). vmmrun -r FILE follows the chain (lazily too). With --live the guest
  pauses only to freeze its state and write-protect its memory, then runs while memory is written;
  a page it writes first is copied out before, so FILE holds memory as at that pause (not with
  --suspend or --diff). See docs/checkpoint-format.md.

migration: see docs/migration.md for the parameters, the statistics and the policies.
  --key-file proves to the destination that this host holds the shared key (and the destination
  proves it back); --tls-cert/--tls-key/--tls-ca encrypt the stream with mutual TLS 1.3 and check
  the destination's certificate against the CA and HOST (or --tls-hostname). They compose; see
  docs/migration.md, "Setting up keys and certificates".

The control socket lives in the run directory ($VMMPY_RUN_DIR, else /run/vmmpy for root, else
$XDG_RUNTIME_DIR/vmmpy or /tmp/vmmpy-UID); --run-dir overrides it.
exit status: 0 on success, 1 when the request failed (the message says why), 2 on bad usage,
3 when a migration ended in doubt: the link failed after the commit was decided and the other
side did not confirm; the guest is held paused (never lost, never run twice) until
--migrate-resolve settles it; 130 when interrupted (Ctrl-C): a running --migrate/--migrate-live
is cancelled first and the guest stays here as it was (running, or paused). Output cut short by
its reader (`| head`) is not an error.
"""

EXIT_IN_DOUBT = 3


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vmmctl",
        description="Control a running vmmpy guest (like bhyvectl).",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--vm", metavar="NAME", help="the guest to act on (its vmmrun VMNAME)")
    parser.add_argument("--version", action=VersionAction)
    parser.add_argument("--run-dir", metavar="DIR", type=Path, default=None,
                        help=f"where control sockets live (default here: {run_dir()})")
    parser.add_argument("--json", action="store_true", help="print results as JSON, for programs")
    actions = parser.add_argument_group("actions (one per call)").add_mutually_exclusive_group(required=True)
    actions.add_argument("--list", action="store_true", help="list running guests")
    actions.add_argument("--get-stats", action="store_true", help="print the VM's statistics (VM_GET_STATS)")
    actions.add_argument("--get-all", action="store_true", help="print every register of every vCPU")
    actions.add_argument("--status", action="store_true", help="print the VM's state (running, paused...) and configuration")
    actions.add_argument("--pause", action="store_true", help="pause all vCPUs")
    actions.add_argument("--resume", action="store_true", help="resume paused vCPUs")
    actions.add_argument("--destroy", action="store_true", help="power off the guest and end its vmmrun process")
    actions.add_argument("--checkpoint", metavar="FILE",
                         help="save the guest to FILE, FILE.kern and FILE.meta; it keeps running (keyed with --key-file)")
    actions.add_argument("--suspend", metavar="FILE", help="save the guest to FILE (as --checkpoint), then end it")
    actions.add_argument("--checkpoint-cancel", action="store_true",
                         help="stop the live checkpoint being written: it leaves no file, the guest runs on")
    actions.add_argument("--check-checkpoint", metavar="FILE",
                         help="verify checkpoint FILE and, for a diff, every parent of its chain, without running it (no VM needed)")
    actions.add_argument("--merge-checkpoint", metavar="FILE",
                         help="flatten diff checkpoint FILE and its chain into one full checkpoint, --output OUT (no VM needed)")
    actions.add_argument("--migrate", nargs="+", metavar="HOST [PORT]", help="warm-migrate to HOST PORT (or HOST:PORT, HOST,PORT)")
    actions.add_argument("--migrate-live", nargs="+", metavar="HOST [PORT]", help="live-migrate (pre-copy) to HOST PORT")
    actions.add_argument("--migrate-local", metavar="unix:PATH",
                         help="hand the guest to a vmmrun on this host waiting with -R unix:PATH: the guest pauses, its "
                              "memory descriptors (it must run with --memory-backing memfd) and state are passed, and "
                              "it runs there once that vmmrun confirms; nothing of its memory is copied")
    actions.add_argument("--live-update", action="store_true",
                         help="replace this guest's vmmrun by a new one with the same options (--exec PATH: another "
                              "vmmrun build) that keeps the guest, its memory (memfd-backed), its name and its console")
    actions.add_argument("--migrate-status", action="store_true", help="statistics of the running or last migration")
    actions.add_argument("--migrate-cancel", action="store_true", help="cancel the running migration; the guest stays here, running or paused as it was, and "
                              "vmmctl says which (exit 1 if the migration had completed first)")
    actions.add_argument("--migrate-postcopy", action="store_true",
                         help="a live migration started with --postcopy manual: switch to post-copy after the round running now")
    actions.add_argument("--migrate-recover", nargs="+", metavar="HOST [PORT]",
                         help="a post-copy migration whose link failed (status postcopy-paused): reconnect to the destination "
                              "now, at HOST PORT (its address, or a new one)")
    actions.add_argument("--migrate-resolve", nargs="?", const="ask", choices=("ask", "run-here", "discard-here"),
                         metavar="ask|run-here|discard-here",
                         help="settle a migration in doubt. ask (default): the source delivers its decision to the "
                              "destination again (on the destination: says where things stand); run-here / discard-here: "
                              "the operator decides for this side, with --force when the other side cannot be asked")
    parser.add_argument("--exec", dest="exec_path", metavar="PATH",
                        help="with --live-update: the vmmrun to start (an executable taking vmmrun's options); default: "
                             "this installation's")
    actions.add_argument("--from-json", type=Path, metavar="STATS.json",
                         help="with --report: draw a report from statistics saved by `--json` (no VM needed)")
    d = MigrationParams()
    ckp = parser.add_argument_group("checkpoint options")
    ckp.add_argument("--diff", action="store_true",
                     help="with --checkpoint/--suspend: write only the pages written since this guest's previous checkpoint "
                          "(or its restore), naming that one as parent; refused when there is none")
    ckp.add_argument("--live", action="store_true",
                     help="with --checkpoint: pause the guest only to freeze its state, then write its memory (as it was "
                          "at that pause) while it runs")
    ckp.add_argument("--output", metavar="OUT", help="with --merge-checkpoint: the full checkpoint to write")
    mig = parser.add_argument_group("migration parameters (with --migrate / --migrate-live)")
    mig.add_argument("--key-file", type=Path, metavar="FILE",
                     help="shared key (at least 16 bytes): for a migration, the one the destination was started with; "
                          "with --checkpoint/--suspend, the key whose HMAC-SHA256 seals the checkpoint (default: none)")
    mig.add_argument("--tls-cert", type=Path, metavar="FILE",
                     help="this host's certificate (PEM): with --tls-key and --tls-ca the migration runs over mutual TLS 1.3 "
                          "(the destination must be started with its own --tls-cert/--tls-key/--tls-ca)")
    mig.add_argument("--tls-key", type=Path, metavar="FILE", help="the private key of --tls-cert (PEM, not encrypted; keep it mode 0600)")
    mig.add_argument("--tls-ca", type=Path, metavar="FILE",
                     help="the CA certificate(s) (PEM) that must have signed the destination's certificate")
    mig.add_argument("--tls-hostname", metavar="NAME",
                     help="the name the destination's certificate must carry (default: HOST as given, a name or an IP address)")
    mig.add_argument("--downtime-ms", type=float, metavar="MS",
                     help=f"live: the downtime target; switch over once the dirty memory left would go in this time (default {d.downtime_target_ms:g})")
    mig.add_argument("--bandwidth", metavar="RATE",
                     help="cap the link use: bytes/s (100M, 1.5G) or bits/s (100Mbit, 10Gbit/s) (default: uncapped); also the link speed --estimate assumes")
    mig.add_argument("--max-rounds", type=int, metavar="N",
                     help=f"live: rounds after the first before the policy must act (default {d.max_rounds})")
    mig.add_argument("--policy", choices=POLICIES,
                     help=f"live: what to do when the guest dirties memory faster than it can be sent (default {d.policy})")
    mig.add_argument("--verify", choices=VERIFY_MODES,
                     help="how the commit checks that the destination's memory is the source's: 'incremental' hashes what "
                          "changed (pages are hashed between rounds) and trusts the dirty tracking to report every write; "
                          "'full' rehashes all the source's memory after pausing, which also proves no write was missed, "
                          f"at about 50-70 ms per GiB of downtime (default {d.verify})")
    mig.add_argument("--compress", choices=COMPRESS_MODES,
                     help="page batch compression, used only if the destination agrees: off; lz4 = every batch that "
                          "shrinks to 3/4; auto = only while it saves more time on the link than it costs "
                          f"(default {d.compress})")
    mig.add_argument("--io-timeout", type=float, metavar="SECONDS",
                     help=f"give up when the peer takes or sends nothing for this long: every send and receive, the commit, "
                          f"and the handshake (at most {d.handshake_timeout:g} s) (default {d.io_timeout:g})")
    mig.add_argument("--streams", type=int, metavar="N",
                     help=f"send pages over N TCP connections at once, the main one included (1 to {MAX_STREAMS}; needs a destination "
                          f"speaking protocol 3); helps when one connection cannot fill the link, see docs/migration.md (default {d.streams})")
    mig.add_argument("--postcopy", metavar="auto|after=N|manual",
                     help="live: finish in post-copy: the guest runs on the destination at the switch and fetches the pages it "
                          "still lacks from the source. auto: where pre-copy does not converge (instead of throttling); after=N: "
                          "after N rounds (0: at once); manual: when `--migrate-postcopy` says. Until every page has arrived the "
                          "guest needs both hosts: if the source host dies then, the guest is lost (see docs/postcopy.md)")
    mig.add_argument("--recover-timeout", type=float, metavar="SECONDS",
                     help=f"post-copy: how long the source reconnects by itself after the page link fails, before it waits "
                          f"for --migrate-recover (default {d.recover_timeout:g})")
    mig.add_argument("--resolve-timeout", type=float, metavar="SECONDS",
                     help=f"how long the source keeps reconnecting to settle a commit the destination did not confirm, "
                          f"before it reports the migration in doubt (exit 3) (default {d.resolve_timeout:g})")
    mig.add_argument("--force", action="store_true",
                     help="with --migrate-resolve run-here/discard-here: act even though the other side cannot confirm "
                          "(only when you know what it does: its process is gone, or it runs the guest)")
    mig.add_argument("--estimate", action="store_true",
                     help="predict whether and when the migration would converge, without migrating")
    mig.add_argument("--estimate-window", type=float, default=1.0, metavar="SECONDS",
                     help="live --estimate: how long to watch the guest's dirty rate (default %(default)g)")
    mig.add_argument("--report", type=Path, metavar="FILE.png|FILE.html",
                     help="draw the per-round history (pages, throughput, downtime against the target) of this migration, "
                          "or with --migrate-status of the last one, or with --from-json of a saved one")
    return parser


def _print(result: Any, as_json: bool) -> None:
    if as_json:
        print(json.dumps(result, indent=2, sort_keys=True))
    elif isinstance(result, dict):
        for key, value in result.items():
            print(f"{key}: {value}")
    elif result is not None:
        print(result)


def _wiring_text(wiring: dict) -> str:
    """What wiring a guest's memory did (``vmmrun -S``; docs/memory.md), in words."""
    done, target = wiring.get("bytes") or 0, wiring["target_bytes"]
    if not done:
        return f"{format_size(target)} populated and locked by mlock alone, on small pages"
    huge = wiring.get("huge_bytes")
    text = f"{format_size(done)} populated in {wiring['seconds']:.2f} s, " + (f"{format_size(huge)} of it on huge pages" if huge else "on small pages")
    if done < target:  # a step was refused: mlock populated the rest
        text += f", {format_size(target - done)} more by mlock"
    return text + ", and locked"


def _print_registers(result: dict[str, dict[str, int]]) -> None:
    # bhyvectl prints one register per line, "name[vcpu]<TAB>value".
    for vcpu_id, regs in sorted(result.items(), key=lambda kv: int(kv[0])):
        for name, value in regs.items():
            print(f"{name}[{vcpu_id}]\t0x{value:016x}")


def _print_stats(result: dict[str, Any]) -> None:
    for vcpu_id, stats in sorted(result.get("vcpus", {}).items(), key=lambda kv: int(kv[0])):
        print(f"vcpu{vcpu_id}")
        for name, value in stats.items():
            print(f"  {name:<32} {value}")
    for name, value in result.get("vm", {}).items():
        print(f"{name:<34} {value}")


def _address(values: list[str]) -> tuple[str, int]:
    from ..migration.net import parse_address

    if len(values) == 2:
        return parse_address(f"[{values[0]}]:{values[1]}" if ":" in values[0] else f"{values[0]}:{values[1]}")
    if len(values) == 1:
        return parse_address(values[0])
    raise ValueError(f"expected HOST PORT or HOST:PORT, got {' '.join(values)}")


def _migration_params(args: argparse.Namespace) -> dict[str, object]:
    params: dict[str, object] = {}
    if args.downtime_ms is not None:
        params["downtime_target_ms"] = args.downtime_ms
    if args.bandwidth is not None:
        params["bandwidth_cap"] = parse_rate(args.bandwidth, what="--bandwidth")
    if args.max_rounds is not None:
        params["max_rounds"] = args.max_rounds
    if args.policy is not None:
        params["policy"] = args.policy
    if args.verify is not None:
        params["verify"] = args.verify
    if args.streams is not None:
        if not 1 <= args.streams <= MAX_STREAMS:
            raise ValueError(f"--streams must be 1 to {MAX_STREAMS} connections, got {args.streams}")
        params["streams"] = args.streams
    if args.compress is not None:
        params["compress"] = args.compress
    if args.resolve_timeout is not None:
        if args.resolve_timeout < 0:
            raise ValueError(f"--resolve-timeout must not be negative, got {args.resolve_timeout:g}")
        params["resolve_timeout"] = args.resolve_timeout
    if args.postcopy is not None:
        params["postcopy"] = args.postcopy
        MigrationParams(postcopy=args.postcopy)  # a bad mode is named here, before vmmrun is asked
    if args.recover_timeout is not None:
        if args.recover_timeout < 0:
            raise ValueError(f"--recover-timeout must not be negative, got {args.recover_timeout:g}")
        params["recover_timeout"] = args.recover_timeout
    if args.io_timeout is not None:
        params.update(MigrationParams.io_timeouts(args.io_timeout))
    return params


def _tls_request(args: argparse.Namespace) -> dict[str, str | None] | None:
    """The source's mutual TLS: absolute paths (vmmrun reads the files), checked here first so a
    wrong file is named before anything is asked of vmmrun."""
    from ..migration.tls import TlsConfig

    given = {"--tls-cert": args.tls_cert, "--tls-key": args.tls_key, "--tls-ca": args.tls_ca}
    if not any(given.values()):
        if args.tls_hostname:
            raise ValueError("--tls-hostname names the destination's certificate: it goes with --tls-cert, --tls-key and --tls-ca")
        return None
    missing = [name for name, value in given.items() if not value]
    if missing:
        raise ValueError(f"mutual TLS needs --tls-cert, --tls-key and --tls-ca together; missing {', '.join(missing)}")
    config = TlsConfig(os.path.abspath(args.tls_cert), os.path.abspath(args.tls_key), os.path.abspath(args.tls_ca),
                       args.tls_hostname)
    return config.to_dict()


def _print_checkpoint(result: dict) -> None:
    verb = "suspended to" if result["suspended"] else "checkpointed to"
    keyed = " (keyed: HMAC-SHA256)" if result.get("keyed") else ""
    keyed += f" (diff over {result['parent']})" if result.get("parent") else ""
    rate = result["throughput_bytes_per_s"]
    live = ""
    if result.get("live"):
        keyed += " (live)"
        live = f", {result['copied_before_write_pages']} pages copied before the guest wrote them"
    print(f"{verb} {result['path']}{keyed}: {format_size(result['memory_bytes'])} guest, "
          f"{format_size(result['bytes_written'])} written in {result['write_seconds']:.3f} s "
          f"({format_size(rate)}/s); guest paused {result['guest_paused_seconds'] * 1e3:.1f} ms{live}")


def _offline_checkpoint(args: argparse.Namespace) -> int:
    """--check-checkpoint / --merge-checkpoint: files only, in this process."""
    from ..runtime.commands import check_checkpoint, merge_checkpoint
    from ..snapshot import CheckpointError
    from ..state import SectionError

    try:
        key = read_key(args.key_file)
        if args.check_checkpoint:
            result = check_checkpoint(args.check_checkpoint, key=key)
            if args.json:
                _print(result, True)
            else:
                for node in result["chain"]:
                    what = f"diff, {node['pages']} pages" if node["diff"] else "full"
                    print(f"{node['path']}: ok ({what})")
                print(f"{result['path']}: chain of {len(result['chain'])} verified")
        else:
            result = merge_checkpoint(args.merge_checkpoint, os.path.abspath(args.output), key=key)
            if args.json:
                _print(result, True)
            else:
                print(f"merged {result['merged']} checkpoints into {result['path']}: {format_size(result['bytes_written'])} written")
    except (CheckpointError, SectionError, OSError, ValueError) as err:
        print(f"vmmctl: {err}", file=sys.stderr)
        return 1
    return 0


def _ms(value: float | None) -> str:
    return "n/a" if value is None else (f"{value:.1f} ms" if value < 100 else f"{value:.0f} ms")


def _print_migration(stats: dict) -> None:
    seconds = stats.get("total_time_ms", 0.0) / 1e3
    target = stats.get("downtime_target_ms")
    local = str(stats.get("peer") or "").startswith("unix:")  # the memory was handed over, not sent
    parts = [
        f"migration {stats.get('status')}" + (" (local)" if local else " (live)" if stats.get("live") else " (warm)"),
        f"total {seconds * 1e3:.0f} ms",
        f"downtime {_ms(stats.get('downtime_ms'))}" + (f" (target {target:g} ms)" if target is not None else ""),
        f"{stats.get('round_count', 0)} rounds" + (f" over {stats['streams']} streams" if stats.get("streams", 1) > 1 else ""),
        f"{format_size(stats.get('bytes_total', 0))} sent ({stats.get('pages_sent', 0)} data pages, {stats.get('zero_pages', 0)} zero)",
    ]
    if seconds > 0 and not local:
        parts.append(f"{format_size(stats.get('bytes_total', 0) / seconds)}/s")
    if stats.get("compressed_batches"):
        parts.append(f"{stats['compressed_batches']} batches compressed ({stats.get('compression')}), "
                     f"{format_size(stats.get('compression_saved_bytes', 0))} saved")
    if stats.get("throttle"):
        parts.append(f"throttled to {1 - stats['throttle']:.0%} vCPU time")
    if stats.get("error"):
        parts.append(stats["error"])
    print(", ".join(parts))
    if stats.get("current_round"):
        print("\n".join(_current_round_lines(stats["current_round"], stats)))
    if stats.get("postcopy"):
        print(_postcopy_line(stats["postcopy"]))
    populated = populate_text(stats.get("populate"))
    if populated is not None:
        print(f"  {populated}")
    if stats.get("installed_pages") or stats.get("huge_pages"):
        print(f"  received into fresh memory: {stats.get('installed_pages', 0)} pages installed without zeroing, "
              f"{stats.get('huge_pages', 0)} onto huge pages")
    stopped = stopped_text(stats)
    if stopped is not None:
        print(f"  {stopped}")
    for note in stats.get("notes") or []:
        print(f"  note: {note}")


def _postcopy_line(pc: dict) -> str:
    """Post-copy's figures in one line: what moved on request and in the background, what the
    guest's faults cost (the destination measures those), the link's failures."""
    text = (f"  post-copy after {pc.get('after_rounds', 0)} rounds: {pc.get('pages_needed', 0)} pages lacking at the switch, "
            f"{pc.get('requested_pages', 0)} fetched on request, {pc.get('pushed_pages', 0)} in the background")
    if "fault_p50_us" in pc:
        text += (f"; remote faults {pc.get('remote_faults', 0)}: p50 {pc['fault_p50_us']} us, p99 {pc['fault_p99_us']} us, "
                 f"max {pc['fault_max_us']} us; vCPU blocked {pc.get('blocked_ms', 0.0):.1f} ms")
    if "running_after_ms" in pc:
        text += f"; running there {pc['running_after_ms']:.1f} ms after the pause"
    if pc.get("link_failures"):
        text += f"; link failed {pc['link_failures']}x, recovered {pc.get('recoveries', 0)}x"
    return text


def _print_estimate(est: dict) -> None:
    kind = "live" if est["live"] else "warm"
    print(f"{kind} migration to {est['host']}:{est['port']} (not started): {est['verdict']}")
    print(f"  bandwidth        {format_size(est['bandwidth'])}/s ({est['bandwidth_source']})")
    print(f"  resident memory  {format_size(est['resident_pages'] * 4096)} ({est['resident_pages']} pages)")
    if est["live"]:
        print(f"  dirty rate       {format_size(est['dirty_rate'] * 4096)}/s over a {est['window_s']:g} s window; "
              f"working set {format_size(est['working_set_pages'] * 4096)}{'' if est['saturated'] else ' (not saturated: assumed all resident)'}")
        print(f"  first round      {est['first_round_s'] * 1e3:.0f} ms; then {est['rounds']} live rounds "
              f"(policy {est['policy']} acts after {est['max_rounds']})")
    print(f"  downtime         {_ms(est['expected_downtime_ms'])} expected, target {est['downtime_target_ms']:g} ms"
          + ("" if est["live"] else " (the target applies to live migration)"))
    print(f"  total            {est['total_time_s']:.2f} s; converges: {'yes' if est['converges'] else 'no'}"
          + (f"; throttle needed about {est['throttle_needed']:.0%}" if est["throttle_needed"] else ""))
    for note in est["notes"]:
        print(f"  note: {note}")


def _round_line(stats: dict, rnd: dict) -> str:
    """One round, for a log: what went, how fast, what the guest dirtied meanwhile, the outlook."""
    what = f"round {rnd['round']}" + (" (final, guest paused)" if rnd.get("final") else "")
    line = (f"{what}: {rnd['pages_sent'] + rnd['zero_pages']} pages ({rnd['zero_pages']} zero), "
            f"{format_size(rnd['bytes'])} in {_ms(rnd['duration_ms'])} = {format_size(rnd['throughput'])}/s")
    if not rnd.get("final"):
        line += f"; dirtied {rnd.get('pages_dirtied_during', 0)} pages meanwhile ({format_size(rnd['dirty_rate'] * 4096)}/s)"
        if rnd.get("expected_downtime_ms") is not None:
            target = stats.get("downtime_target_ms")
            line += f"; expected downtime {_ms(rnd['expected_downtime_ms'])}" + (f" (target {target:g} ms)" if target else "")
    if rnd.get("compressed_batches"):
        line += f"; {rnd['compressed_batches']} batches compressed, {format_size(rnd.get('saved_bytes', 0))} saved"
    if rnd.get("throttle"):
        line += f"; throttle {rnd['throttle']:.0%}"
    return line


class _ProgressPrinter:
    """Live progress on ``stream`` (stderr): one line per round when it is a log or a pipe (the
    reports that come within a round add nothing there), one redrawn status line with the round's
    progress bar and a convergence gauge when it is a terminal."""

    BAR = 20

    def __init__(self, stream=None) -> None:
        self.bar = ProgressBar(stream)
        self.stream = self.bar.stream
        self.tty = self.bar.tty
        self.printed_rounds = 0

    def __call__(self, info: dict) -> None:
        stats = info.get("migration")
        if stats is None:
            return
        rounds = stats.get("rounds") or []
        if self.tty:
            self.bar.show(self.status_line(stats))
            return
        for rnd in rounds[self.printed_rounds:]:
            print(_round_line(stats, rnd), file=self.stream, flush=True)
        self.printed_rounds = len(rounds)

    def status_line(self, stats: dict) -> str:
        rounds = stats.get("rounds") or []
        current = stats.get("current_round")
        number = current["round"] if current else (rounds[-1]["round"] if rounds else 0)
        parts = [f"{'live' if stats.get('live') else 'warm'} {stats.get('status')}", f"round {number}"]
        if current:
            parts[-1] += " " + _current_round_text(current)
        # bytes_total counts finished rounds; the round under way adds what it has moved so far.
        parts.append(f"{format_size(stats.get('bytes_total', 0) + (current['bytes'] if current else 0))} in all")
        if stats.get("live") and rounds:
            parts.append(f"dirty {format_size(stats.get('dirty_rate_bytes', 0))}/s vs link {format_size(stats.get('throughput', 0))}/s")
            live_rounds = [r for r in rounds if r.get("expected_downtime_ms") is not None]
            expected = live_rounds[-1]["expected_downtime_ms"] if live_rounds else stats.get("expected_downtime_ms")
            target = stats.get("downtime_target_ms")
            if expected is not None and target:
                near = min(1.0, target / expected) if expected > 0 else 1.0
                filled = round(near * self.BAR)
                parts.append(f"downtime {_ms(expected)}/{target:g} ms [{'#' * filled}{'.' * (self.BAR - filled)}]")
        if stats.get("throttle"):
            parts.append(f"throttle {stats['throttle']:.0%}")
        return " | ".join(parts)

    def done(self) -> None:
        self.bar.close()


def _current_round_text(current: dict) -> str:
    """The running round: its bar (over the bytes, when what is left is known: zero pages cost
    next to nothing), what went and what is left, the rate, the ETA."""
    total, sent, left = current.get("pages_total"), current.get("bytes", 0), current.get("remaining_bytes")
    fraction = sent / (sent + left) if left is not None and sent + left > 0 else current["pages_done"] / total if total else None
    text = f"{bar(fraction)} {format_size(sent)}"
    if current.get("remaining_bytes") is not None:
        text += f" ({format_size(current['remaining_bytes'])} left)"
    text += f" at {format_size(current.get('rate', 0))}/s"
    if current.get("eta_s") is not None:
        text += f", {eta_text(current['eta_s'])}"
    return text


def _current_round_lines(current: dict, stats: dict) -> list[str]:
    """``--migrate-status`` of a running round, as query-migrate / domjobinfo show it."""
    total = current.get("pages_total")
    lines = [f"  round {current['round']}" + (" (final, guest paused)" if current.get("final") else "") +
             f" running {_ms(current.get('elapsed_ms'))}: {current['pages_done']}" + (f" of {total}" if total else "") + " pages",
             f"  sent {format_size(current.get('bytes', 0))} in this round" if stats.get("role") == "source"
             else f"  received {format_size(current.get('bytes', 0))} in this round"]
    if current.get("remaining_bytes") is not None:
        lines.append(f"  remaining {format_size(current['remaining_bytes'])}")
    lines.append(f"  rate {format_size(current.get('rate', 0))}/s")
    if current.get("dirty_rate") is not None:
        lines.append(f"  dirty rate {format_size(current['dirty_rate'] * 4096)}/s ({current['dirty_rate']:.0f} pages/s)")
    if current.get("expected_downtime_ms") is not None:
        lines.append(f"  expected downtime {_ms(current['expected_downtime_ms'])}")
    if current.get("eta_s") is not None:
        lines.append(f"  round {eta_text(current['eta_s'])}")
    return lines


def _with_bar(client: ControlClient, cmd: str, as_json: bool, **request: Any) -> Any:
    """``client.request(cmd)`` with its progress messages drawn as a bar on stderr, when that is a
    terminal (and the output is not --json)."""
    bar = ProgressBar()
    if as_json or not bar.tty:
        return client.request(cmd, **request)
    try:
        return client.request(cmd, on_progress=bar.phase, **request)
    finally:
        bar.close()


def _write_report(stats: dict, path: Path) -> None:
    write_report(stats, path)
    print(f"report written to {path}", file=sys.stderr)


def _migrate(client: ControlClient, args: argparse.Namespace) -> int:
    host, port = _address(args.migrate or args.migrate_live)
    request = {"host": host, "port": port, "live": bool(args.migrate_live), "params": _migration_params(args)}
    tls = _tls_request(args)
    if args.estimate:
        if args.report:
            raise ValueError("--estimate predicts without migrating: there is no round history for --report")
        client.timeout = args.estimate_window + 60
        result = _with_bar(client, "migrate-estimate", args.json, window=args.estimate_window, **request)
        if tls is not None and result.get("bandwidth_source", "").startswith("measured"):
            result["notes"].append("the probe measured plain TCP: over TLS the encryption carries less "
                                   "(tools/bench warm-1g-tls against warm-1g), so give --bandwidth for a TLS estimate")
        _print(result, True) if args.json else _print_estimate(result)
        return 0
    key = read_key(args.key_file)
    if key is not None:
        request["key"] = key.hex()
    if tls is not None:
        request["tls"] = tls
    if args.postcopy is not None:
        if not args.migrate_live:
            raise ValueError("--postcopy finishes a live migration: use it with --migrate-live")
        print(f"vmmctl: warning: post-copy ({args.postcopy}): from the switch until every page has reached the destination, "
              "the guest runs there with part of its memory only on this host; if this host dies then, the guest is lost "
              "(a failed link is recovered: --migrate-recover)", file=sys.stderr)
    printer = _ProgressPrinter()
    holder = client.name_holder()
    client.timeout = None  # a migration takes as long as it takes; vmmrun bounds its own waits
    try:
        result = client.request("migrate", on_progress=None if args.json else printer, **request)
    except KeyboardInterrupt:
        printer.done()
        return _cancel_on_interrupt(client)
    except ControlError:
        printer.done()
        if args.report:  # a failed migration's history says why it failed: draw it too
            try:
                client.timeout = 30
                _write_report(client.request("migrate-status"), args.report)
            except (ControlError, ReportError) as err:
                print(f"vmmctl: no report: {err}", file=sys.stderr)
        raise
    printer.done()
    _print(result, True) if args.json else _print_migration(result)
    if args.report:
        _write_report(result, args.report)
    if result.get("status") == "completed":  # the guest runs there: this vmmrun ends
        _wait_gone(client, holder)
    return 0


def _wait_named(client: ControlClient, timeout: float = 30.0) -> bool:
    """After a live update: wait until the new vmmrun answers on the guest's name."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            client.timeout = 5
            client.request("status")
            return True
        except ControlError:
            time.sleep(0.02)
    return False


def _wait_gone(client: ControlClient, holder: tuple[int, int, int | None] | None) -> None:
    """Return once the vmmrun that held the guest's name has let it go, so the next command may
    start a guest of that name (a few ms after its answer; say so if it takes 30 s)."""
    if not client.wait_gone(holder, timeout=30.0):
        print(f"vmmctl: note: the vmmrun of '{client.vmname}' answered but still holds its name after 30 s",
              file=sys.stderr)


def _stays_here(client: ControlClient) -> str:
    """Where a migration that did not happen left the guest, as its vmmrun says now."""
    try:
        state = client.request("status").get("state")
    except ControlError:
        state = None
    return guest_stays_here(state)


def _cancel_on_interrupt(client: ControlClient) -> int:
    """Ctrl-C while a migration runs: ask vmmrun to cancel it (the guest stays on the source)
    and say how it ended. A second Ctrl-C is ignored meanwhile: it must not leave the cancel
    half asked. The migrate request may still be on its way to vmmrun, so a cancel that finds
    no migration yet is asked again, a few times."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    print("vmmctl: interrupted: cancelling the migration", file=sys.stderr)
    canceller = ControlClient(client.vmname, client.path.parent, timeout=90)
    answer = None
    for _ in range(10):
        try:
            answer = canceller.request("migrate-cancel")
            break
        except ControlError as err:
            if err.errno != errno.ENOENT:
                print(f"vmmctl: could not cancel the migration: {err.strerror or err}", file=sys.stderr)
                return 1
        time.sleep(0.2)
    if answer is None:
        try:
            status = canceller.request("migrate-status").get("status")
        except ControlError:
            status = None
        if status is None:
            print(f"vmmctl: no migration was started; {_stays_here(canceller)}", file=sys.stderr)
            return EXIT_INTERRUPTED
        answer = {"status": status}
    if answer["status"] == "completed":
        print("vmmctl: interrupted too late: the migration had completed; the guest runs on the destination", file=sys.stderr)
        return 0
    print(f"vmmctl: {_cancel_outcome(answer['status'], _stays_here(canceller))}", file=sys.stderr)
    return EXIT_INTERRUPTED if answer["status"] == "cancelled" else 1


def _cancel_outcome(status: str, stays: str) -> str:
    """How a cancel ended, from the migration's status after it and where the guest is."""
    if status == "cancelled":
        return f"migration cancelled; {stays}"
    if status == "completed":
        return "the migration had completed before the cancel: the guest runs on the destination"
    return f"migration {status} before the cancel; {stays} (--migrate-status says why)"


def _stdout_is_closed() -> bool:
    """The reader of stdout went away (``vmmctl ... | head -1``)."""
    poller = select.poll()
    try:
        poller.register(sys.stdout.fileno(), select.POLLOUT)
    except (OSError, ValueError):
        return False
    return any(revents & select.POLLERR for _, revents in poller.poll(0))


def _report_from_json(args: argparse.Namespace) -> int:
    if not args.report:
        raise ValueError("--from-json draws a report: give --report FILE.png or FILE.html")
    try:
        stats = json.loads(args.from_json.read_text())
    except OSError as err:
        raise ValueError(f"--from-json {args.from_json}: {err.strerror}") from None
    except json.JSONDecodeError as err:
        raise ValueError(f"--from-json {args.from_json}: not JSON ({err})") from None
    _write_report(stats, args.report)
    return 0


#: vmmctl's exit status after Ctrl-C (128 + SIGINT, as a shell reports it).
EXIT_INTERRUPTED = 128 + signal.SIGINT


def main(argv: list[str] | None = None) -> int:
    try:
        return _main(argv)
    except KeyboardInterrupt:
        print("vmmctl: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError as err:
        if not _stdout_is_closed():
            print(f"vmmctl: {err.strerror or err}", file=sys.stderr)
            return 1
        # The reader has what it wanted: nothing more to print, and nothing left for the
        # interpreter's last flush to fail on.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


def _state_of(name: str, directory: Path) -> str:
    """What ``--status`` would say of a listed guest (running, paused, incoming, migrating,
    in-doubt...); a guest too busy to answer within 2 s is listed as such, not left out."""
    try:
        return str(ControlClient(name, directory, timeout=2.0).request("status").get("state", "running"))
    except ControlError as err:
        return "not answering" if err.errno == errno.ETIMEDOUT else f"not answering ({err.strerror or err})"


def _main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    directory = args.run_dir or run_dir()
    if args.list:
        vms = [(name, live, _state_of(name, directory) if live else "stale socket") for name, live in list_vms(directory)]
        if args.json:
            print(json.dumps([{"name": n, "running": live, "state": state} for n, live, state in vms]))
        elif not vms:
            print(f"no guests running (run directory {directory})")
        else:
            # Tab-separated, not a drawn table (tabulate, rich): two columns that `cut -f` and awk read.
            for name, _, state in vms:
                print(f"{name}\t{state}")
        return 0
    if args.from_json:
        try:
            return _report_from_json(args)
        except (ValueError, ReportError) as err:
            print(f"vmmctl: {err}", file=sys.stderr)
            return 1
    if args.diff and not (args.checkpoint or args.suspend):
        parser.error("--diff goes with --checkpoint/--suspend")
    if args.live and args.suspend:
        parser.error("--live goes with --checkpoint, not --suspend: a suspend ends the guest, so nothing runs while memory is written")
    if args.live and args.diff:
        parser.error("--live and --diff together are not supported: take a live full checkpoint, or a diff")
    if args.live and not args.checkpoint:
        parser.error("--live goes with --checkpoint")
    if args.check_checkpoint or args.merge_checkpoint:
        if bool(args.output) != bool(args.merge_checkpoint):
            parser.error("--merge-checkpoint needs --output OUT, and --output goes only with it")
        return _offline_checkpoint(args)
    if not args.vm:
        parser.error("this action needs --vm=NAME")
    if (args.estimate or args.report) and not (args.migrate or args.migrate_live or (args.report and args.migrate_status)):
        parser.error("--estimate goes with --migrate/--migrate-live; --report with those or --migrate-status")
    client = ControlClient(args.vm, directory)
    try:
        if args.get_stats:
            result = client.request("stats")
            _print(result, True) if args.json else _print_stats(result)
        elif args.get_all:
            result = client.request("registers")
            _print(result, True) if args.json else _print_registers(result)
        elif args.status:
            result = client.request("status")
            if not args.json and isinstance(result.get("restore"), dict):
                from ..snapshot.checkpoint import describe_lazy_restore  # loads numpy: only where needed

                result["restore"] = describe_lazy_restore(result["restore"])
            if not args.json and isinstance(result.get("wiring"), dict):
                result["wiring"] = _wiring_text(result["wiring"])
            _print(result, args.json)
        elif args.pause:
            _print(client.request("pause"), args.json)
        elif args.resume:
            _print(client.request("resume"), args.json)
        elif args.destroy:
            holder = client.name_holder()
            _print(client.request("destroy"), args.json)
            _wait_gone(client, holder)
        elif args.checkpoint or args.suspend:
            path = os.path.abspath(args.checkpoint or args.suspend)  # relative to vmmctl's directory
            if not os.path.isdir(os.path.dirname(path)):  # vmmrun runs on this host: the same filesystem
                flag = "--checkpoint" if args.checkpoint else "--suspend"
                raise ValueError(f"{flag} {path}: directory {os.path.dirname(path)} does not exist")
            request = {"path": path, "suspend": bool(args.suspend), "diff": args.diff, "live": args.live}
            key = read_key(args.key_file)
            if key is not None:  # as a migration's: hex in the request, over the owner-only socket
                request["key"] = key.hex()
            holder = client.name_holder()
            result = _with_bar(client, "checkpoint", args.json, **request)
            _print(result, True) if args.json else _print_checkpoint(result)
            if result.get("suspended"):
                _wait_gone(client, holder)
        elif args.checkpoint_cancel:
            result = client.request("checkpoint-cancel")
            _print(result, True) if args.json else print("live checkpoint cancelled: no file is left, the guest runs on")
        elif args.live_update:
            request = {"exec": os.path.abspath(args.exec_path)} if args.exec_path else {}
            holder = client.name_holder()
            client.timeout = None
            result = client.request("live-update", **request)
            _print(result, True) if args.json else _print_migration(result)
            if not client.wait_gone(holder) or not _wait_named(client):
                print(f"vmmctl: note: the new vmmrun of '{client.vmname}' did not answer on its name within 30 s", file=sys.stderr)
        elif args.migrate_local:
            if not args.migrate_local.startswith("unix:"):
                raise ValueError(f"--migrate-local {args.migrate_local}: expected unix:PATH (the socket of `vmmrun -R unix:PATH`)")
            args.migrate = [args.migrate_local]
            return _migrate(client, args)
        elif args.migrate or args.migrate_live:
            return _migrate(client, args)
        elif args.migrate_status:
            result = client.request("migrate-status")
            _print(result, True) if args.json else _print_migration(result)
            if args.report:
                _write_report(result, args.report)
        elif args.migrate_cancel:
            result = client.request("migrate-cancel")
            said = _cancel_outcome(result["status"], guest_stays_here(result.get("state")))
            if args.json:
                _print(result, True)
            elif result["status"] != "completed":
                print(said)
            if result["status"] == "completed":  # too late: the guest left
                if not args.json:
                    print(f"vmmctl: {said}", file=sys.stderr)
                return 1
        elif args.migrate_postcopy:
            result = client.request("migrate-postcopy")
            _print(result, True) if args.json else print("switching to post-copy after the round running now")
        elif args.migrate_recover:
            host, port = _address(args.migrate_recover)
            result = client.request("migrate-recover", host=host, port=port)
            _print(result, True) if args.json else print(f"reconnecting the post-copy page link to {host} {port}")
        elif args.migrate_resolve:
            client.timeout = None  # it reconnects for at most the migration's resolve_timeout
            result = client.request("migrate-resolve", action=args.migrate_resolve, force=args.force)
            if args.json:
                _print(result, True)
            elif "status" in result:
                _print_migration(result)
            else:
                _print(result, False)
            if result.get("status") == "in-doubt" or result.get("state") == "in-doubt":
                return EXIT_IN_DOUBT
    except ValueError as err:
        print(f"vmmctl: {err}", file=sys.stderr)
        return 2
    except ReportError as err:  # the migration is done; only its drawing failed
        print(f"vmmctl: {err}", file=sys.stderr)
        return 1
    except ControlError as err:
        print(f"vmmctl: {err.strerror or err}", file=sys.stderr)
        return EXIT_IN_DOUBT if err.errno == errno.EINPROGRESS else 1
    return 0


if __name__ == "__main__":
    interrupts_raise_again(_quiet_while_loading)
    raise SystemExit(main())
