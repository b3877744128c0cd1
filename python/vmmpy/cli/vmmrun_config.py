"""vmmrun's configuration variables, as bhyve's ``-k FILE`` and ``-o KEY=VALUE`` (bhyve_config(5)).

A file holds one ``key=value`` per line; blank lines and lines starting with ``#`` are skipped,
and space around the key and the value is dropped. ``-k`` and ``-o`` apply in the order given
(a later value of a key replaces an earlier one); an option given on the command line wins over
both, so a file can hold a guest's usual setup and the command line change one thing.

Keys, with bhyve's names where bhyve has the variable:

=============================  ===========================================================
``name``                       the VM's name (VMNAME)
``cpus``                       ``-c``
``memory.size``                ``-m`` (``256M``, ``1G``; a bare number is MiB)
``memory.wired``               ``-S`` (``true`` or ``false``)
``lpc.com1.path``              ``-l com1,PATH`` (``stdio`` or a file); also ``com2``
``pci.B.S.F.device``           ``-s B:S:F,EMULATION``
``pci.B.S.F.path``             the emulation's image (the first CONF item)
``pci.B.S.F.KEY``              a further CONF item: ``KEY=VALUE``, or ``KEY`` alone for ``true``
``vmmpy.guest``                ``--guest``
``vmmpy.guest_arg.KEY``        ``--guest-arg KEY=VALUE``
``memory.backing``             ``--memory-backing`` (``anon`` or ``memfd``)
``vmmpy.tsc``, ``vmmpy.idle``, ``vmmpy.vendor``, ``vmmpy.dirty_tracking``, ``vmmpy.accel``   the options of those names
=============================  ===========================================================

An unknown key, a malformed line or a bad value is refused naming the file and line (or the
``-o``) and the key.
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Iterable
from pathlib import Path

from ..runtime.config import ACCELS, DIRTY_TRACKING, IDLE_MODES, MEMORY_BACKINGS, TSC_MODES, VENDORS, ConfigError, parse_slot
from ..units import MiB, parse_size

#: One source of a value: "FILE:LINE" or "-o".
Where = str

_PCI = re.compile(r"^pci\.(\d+)\.(\d+)\.(\d+)\.([a-z_][a-z0-9_]*)$")
_GUEST_ARG = re.compile(r"^vmmpy\.guest_arg\.([A-Za-z_][A-Za-z0-9_]*)$")
_LPC = re.compile(r"^lpc\.(com[12])\.path$")
_PLAIN = ("name", "cpus", "memory.size", "memory.wired", "memory.backing", "vmmpy.guest", "vmmpy.tsc", "vmmpy.idle", "vmmpy.vendor",
          "vmmpy.dirty_tracking", "vmmpy.accel")
KEYS_HELP = ("name, cpus, memory.size, memory.wired, memory.backing, lpc.com1.path, lpc.com2.path, pci.B.S.F.device, pci.B.S.F.path, "
             "pci.B.S.F.KEY, vmmpy.guest, vmmpy.guest_arg.KEY, vmmpy.tsc, vmmpy.idle, vmmpy.vendor, vmmpy.dirty_tracking, vmmpy.accel")


class ConfigSource(argparse.Action):
    """``-k FILE`` and ``-o KEY=VALUE`` append to one ordered list, so their order is kept."""

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        items = list(getattr(namespace, self.dest) or [])
        items.append((option_string, values))
        setattr(namespace, self.dest, items)


def read_sources(sources: Iterable[tuple[str, str]]) -> dict[str, tuple[str, Where]]:
    """The variables the ``-k``/``-o`` sources set, in order: key -> (value, where it came from)."""
    values: dict[str, tuple[str, Where]] = {}
    for option, text in sources:
        if option in ("-k", "--config"):
            try:
                lines = Path(text).read_text(encoding="utf-8").splitlines()
            except OSError as err:
                raise ConfigError(f"-k {text}: {err.strerror or err}") from None
            except UnicodeDecodeError:
                raise ConfigError(f"-k {text}: not a text file (UTF-8 key=value lines)") from None
            for number, line in enumerate(lines, 1):
                line = line.strip()
                if line and not line.startswith("#"):
                    _set(values, line, f"{text}:{number}")
        else:
            _set(values, text, f"-o {text}")
    return values


def _set(values: dict[str, tuple[str, Where]], line: str, where: Where) -> None:
    key, sep, value = line.partition("=")
    key, value = key.strip(), value.strip()
    if not sep or not key:
        raise ConfigError(f"{where}: expected key=value")
    if not (key in _PLAIN or _PCI.match(key) or _GUEST_ARG.match(key) or _LPC.match(key)):
        raise ConfigError(f"{where}: unknown key {key!r} (known: {KEYS_HELP})")
    values[key] = (value, where)


def _boolean(value: str, where: Where, key: str) -> bool:
    lowered = value.lower()
    if lowered in ("true", "yes", "on", "1"):
        return True
    if lowered in ("false", "no", "off", "0"):
        return False
    raise ConfigError(f"{where}: {key} must be true or false, got {value!r}")


def _choice(value: str, where: Where, key: str, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise ConfigError(f"{where}: {key} must be one of {', '.join(choices)}, got {value!r}")
    return value


def apply(args: argparse.Namespace, values: dict[str, tuple[str, Where]]) -> None:
    """Fill in ``args`` from the variables wherever the command line left an option unset."""
    slots: dict[tuple[int, int, int], dict[str, tuple[str, Where]]] = {}
    for key, (value, where) in values.items():
        if key == "name":
            args.vmname = args.vmname or value
        elif key == "cpus":
            if args.ncpus is None:
                try:
                    args.ncpus = int(value, 10)
                except ValueError:
                    raise ConfigError(f"{where}: cpus must be a whole number, got {value!r}") from None
        elif key == "memory.size":
            if args.memsize is None:
                try:
                    parse_size(value, default_unit=MiB, what="memory.size")
                except ValueError as err:
                    raise ConfigError(f"{where}: {err}") from None
                args.memsize = value
        elif key == "memory.wired":
            args.wired = args.wired or _boolean(value, where, key)
        elif key == "memory.backing":
            args.memory_backing = args.memory_backing or _choice(value, where, key, MEMORY_BACKINGS)
        elif key == "vmmpy.guest":
            args.guest = args.guest or value
        elif key == "vmmpy.tsc":
            args.tsc = args.tsc or _choice(value, where, key, TSC_MODES)
        elif key == "vmmpy.idle":
            args.idle = args.idle or _choice(value, where, key, IDLE_MODES)
        elif key == "vmmpy.vendor":
            args.vendor = args.vendor or _choice(value, where, key, VENDORS)
        elif key == "vmmpy.dirty_tracking":
            args.dirty_tracking = args.dirty_tracking or _choice(value, where, key, DIRTY_TRACKING)
        elif key == "vmmpy.accel":
            args.accel = args.accel or _choice(value, where, key, ACCELS)
        elif match := _LPC.match(key):
            device = match.group(1)
            if not any(spec.lower().partition(",")[0] == device for spec in args.lpc):
                args.lpc.append(f"{device},{value}")
        elif match := _GUEST_ARG.match(key):
            name = match.group(1)
            if not any(a.partition("=")[0] == name for a in args.guest_args):
                args.guest_args.append(f"{name}={value}")
        elif match := _PCI.match(key):
            bus, slot, func, field = match.groups()
            slots.setdefault((int(bus), int(slot), int(func)), {})[field] = (value, where)
    given = {_slot_of(spec) for spec in args.slots}
    for (bus, slot, func), fields in sorted(slots.items()):
        if (bus, slot, func) in given:
            continue  # the command line's -s for this function wins
        if "device" not in fields:
            where = next(iter(fields.values()))[1]
            raise ConfigError(f"{where}: pci.{bus}.{slot}.{func} has settings but no pci.{bus}.{slot}.{func}.device")
        conf = [fields["path"][0]] if "path" in fields else []
        for field, (value, _where) in fields.items():
            if field in ("device", "path"):
                continue
            conf.append(field if value.lower() == "true" else f"{field}={value}")
        args.slots.append(",".join([f"{bus}:{slot}:{func}", fields["device"][0], *conf]))


def _slot_of(spec: str) -> tuple[int, int, int] | None:
    """The (bus, slot, function) a ``-s`` names, or None when it does not parse (its own error
    comes later, from the command line's parser)."""
    try:
        slot = parse_slot(spec)
    except ConfigError:
        return None
    return slot.bus, slot.slot, slot.func
