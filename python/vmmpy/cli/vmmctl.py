"""vmmctl: control a running vmmpy guest, as bhyvectl controls bhyve.

Every action talks to the guest's ``vmmrun`` process through its control socket (see
:mod:`vmmpy.runtime.control`). Options accept bhyvectl's spellings, ``--vm=NAME`` and ``--vm NAME``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from ..runtime.control import ControlClient, ControlError, list_vms, run_dir

EPILOG = """\
examples:
  vmmctl --list                          list the guests running on this host
  vmmctl --vm=vm0 --get-stats            exit counts, instructions, interrupts per vCPU
  vmmctl --vm=vm0 --get-all              every register of every vCPU
  vmmctl --vm=vm0 --pause                stop all vCPUs (the guest keeps its state)
  vmmctl --vm=vm0 --resume               let them run again
  vmmctl --vm=vm0 --destroy              power the guest off and end its vmmrun

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
    except ControlError as err:
        print(f"vmmctl: {err.strerror or err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
