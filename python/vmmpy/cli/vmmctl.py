"""vmmctl: control a running vmmpy guest, as bhyvectl controls bhyve.

Every action talks to the guest's ``vmmrun`` process through its control socket (see
:mod:`vmmpy.runtime.control`). Options accept bhyvectl's spellings, ``--vm=NAME`` and ``--vm NAME``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from ..runtime.control import ControlClient, ControlError, list_vms, run_dir
from ..units import format_size, parse_size

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
  vmmctl --vm=vm0 --migrate 10.0.0.2 24983        warm migration: stop, copy, commit
  vmmctl --vm=vm0 --migrate-live 10.0.0.2,24983 --key-file mig.key --downtime-ms 50
  vmmctl --vm=vm0 --migrate-status       statistics of the running (or last) migration
  vmmctl --vm=vm0 --migrate-cancel       cancel it; the guest keeps running here

The control socket lives in the run directory ($VMMPY_RUN_DIR, else /run/vmmpy for root, else
$XDG_RUNTIME_DIR/vmmpy or /tmp/vmmpy-UID); --run-dir overrides it.
exit status: 0 on success, 1 when the request failed (the message says why), 2 on bad usage.
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vmmctl",
        description="Control a running vmmpy guest (like bhyvectl).",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--vm", metavar="NAME", help="the guest to act on (its vmmrun VMNAME)")
    parser.add_argument("--run-dir", metavar="DIR", type=Path, help="where control sockets live (default: %(default)s)", default=None)
    parser.add_argument("--json", action="store_true", help="print results as JSON, for programs")
    actions = parser.add_argument_group("actions (one per call)").add_mutually_exclusive_group(required=True)
    actions.add_argument("--list", action="store_true", help="list running guests")
    actions.add_argument("--get-stats", action="store_true", help="print the VM's statistics (VM_GET_STATS)")
    actions.add_argument("--get-all", action="store_true", help="print every register of every vCPU")
    actions.add_argument("--status", action="store_true", help="print the VM's state (running, paused...) and configuration")
    actions.add_argument("--pause", action="store_true", help="pause all vCPUs")
    actions.add_argument("--resume", action="store_true", help="resume paused vCPUs")
    actions.add_argument("--destroy", action="store_true", help="power off the guest and end its vmmrun process")
    actions.add_argument("--checkpoint", metavar="FILE", help="save the guest to FILE, FILE.kern and FILE.meta; it keeps running")
    actions.add_argument("--suspend", metavar="FILE", help="save the guest to FILE (as --checkpoint), then end it")
    actions.add_argument("--migrate", nargs="+", metavar="HOST [PORT]", help="warm-migrate to HOST PORT (or HOST:PORT, HOST,PORT)")
    actions.add_argument("--migrate-live", nargs="+", metavar="HOST [PORT]", help="live-migrate (pre-copy) to HOST PORT")
    actions.add_argument("--migrate-status", action="store_true", help="statistics of the running or last migration")
    actions.add_argument("--migrate-cancel", action="store_true", help="cancel the running migration; the guest stays here")
    mig = parser.add_argument_group("migration parameters")
    mig.add_argument("--key-file", type=Path, metavar="FILE", help="shared key the destination was started with")
    mig.add_argument("--downtime-ms", type=float, metavar="MS", help="live: the downtime target (default 300)")
    mig.add_argument("--bandwidth", metavar="RATE", help="cap the link use, bytes/s with an optional K/M/G suffix (default: none)")
    mig.add_argument("--max-rounds", type=int, metavar="N", help="live: rounds after the first before the policy acts (default 30)")
    mig.add_argument("--policy", choices=("auto-converge", "switch-over", "give-up"),
                     help="live: what to do when the guest dirties memory faster than it can be sent (default auto-converge)")
    return parser


def _print(result: Any, as_json: bool) -> None:
    if as_json:
        print(json.dumps(result, indent=2, sort_keys=True))
    elif isinstance(result, dict):
        for key, value in result.items():
            print(f"{key}: {value}")
    elif result is not None:
        print(result)


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
        params["bandwidth_cap"] = parse_size(args.bandwidth, what="--bandwidth")
    if args.max_rounds is not None:
        params["max_rounds"] = args.max_rounds
    if args.policy is not None:
        params["policy"] = args.policy
    return params


def _print_checkpoint(result: dict) -> None:
    verb = "suspended to" if result["suspended"] else "checkpointed to"
    rate = result["throughput_bytes_per_s"]
    print(f"{verb} {result['path']}: {format_size(result['memory_bytes'])} guest, "
          f"{format_size(result['bytes_written'])} written in {result['write_seconds']:.3f} s "
          f"({format_size(rate)}/s); guest paused {result['guest_paused_seconds'] * 1e3:.1f} ms")


def _print_migration(stats: dict) -> None:
    seconds = stats.get("total_time_ms", 0.0) / 1e3
    down = stats.get("downtime_ms")
    parts = [
        f"migration {stats.get('status')}" + (" (live)" if stats.get("live") else " (warm)"),
        f"total {seconds * 1e3:.0f} ms",
        f"downtime {down:.1f} ms" if down is not None else "downtime n/a",
        f"{stats.get('round_count', 0)} rounds",
        f"{format_size(stats.get('bytes_total', 0))} sent ({stats.get('pages_sent', 0)} data pages, {stats.get('zero_pages', 0)} zero)",
    ]
    if seconds > 0:
        parts.append(f"{format_size(stats.get('bytes_total', 0) / seconds)}/s")
    if stats.get("error"):
        parts.append(stats["error"])
    print(", ".join(parts))


class _ProgressPrinter:
    """One line per round on a log, a redrawn line on a terminal."""

    def __init__(self) -> None:
        self.tty = sys.stderr.isatty()

    def __call__(self, info: dict) -> None:
        stats = info.get("migration")
        if stats is None:
            return
        rounds = stats.get("rounds") or []
        last = rounds[-1] if rounds else {}
        line = (f"{stats.get('status')}: round {len(rounds)}, {format_size(stats.get('bytes_total', 0))} sent, "
                f"last round {last.get('pages_sent', 0)} pages, throttle {stats.get('throttle', 0):.0%}")
        if self.tty:
            print("\r" + line.ljust(100), end="", file=sys.stderr, flush=True)
        else:
            print(line, file=sys.stderr)

    def done(self) -> None:
        if self.tty:
            print(file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    directory = args.run_dir or run_dir()
    if args.list:
        vms = list_vms(directory)
        if args.json:
            print(json.dumps([{"name": n, "running": live} for n, live in vms]))
        elif not vms:
            print(f"no guests running (run directory {directory})")
        else:
            for name, live in vms:
                print(f"{name}\t{'running' if live else 'stale socket'}")
        return 0
    if not args.vm:
        parser.error("this action needs --vm=NAME")
    client = ControlClient(args.vm, directory)
    try:
        if args.get_stats:
            result = client.request("stats")
            _print(result, True) if args.json else _print_stats(result)
        elif args.get_all:
            result = client.request("registers")
            _print(result, True) if args.json else _print_registers(result)
        elif args.status:
            _print(client.request("status"), args.json)
        elif args.pause:
            _print(client.request("pause"), args.json)
        elif args.resume:
            _print(client.request("resume"), args.json)
        elif args.destroy:
            _print(client.request("destroy"), args.json)
        elif args.checkpoint or args.suspend:
            path = os.path.abspath(args.checkpoint or args.suspend)  # relative to vmmctl's directory
            result = client.request("checkpoint", path=path, suspend=bool(args.suspend))
            _print(result, True) if args.json else _print_checkpoint(result)
        elif args.migrate or args.migrate_live:
            host, port = _address(args.migrate or args.migrate_live)
            request = {"host": host, "port": port, "live": bool(args.migrate_live), "params": _migration_params(args)}
            if args.key_file:
                request["key"] = args.key_file.read_bytes().strip().hex()
            printer = _ProgressPrinter()
            client.timeout = None  # a migration takes as long as it takes; vmmrun bounds its own waits
            try:
                result = client.request("migrate", on_progress=None if args.json else printer, **request)
            finally:
                printer.done()
            _print(result, True) if args.json else _print_migration(result)
        elif args.migrate_status:
            result = client.request("migrate-status")
            _print(result, True) if args.json else _print_migration(result)
        elif args.migrate_cancel:
            _print(client.request("migrate-cancel"), args.json)
    except ValueError as err:
        print(f"vmmctl: {err}", file=sys.stderr)
        return 2
    except ControlError as err:
        print(f"vmmctl: {err.strerror or err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
