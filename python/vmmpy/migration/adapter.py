"""What the migration engine needs from a VM, and nothing more.

The engine never imports the VM object: it drives anything that has this shape. The real VM
(``vmm/`` + ``runtime/``) implements it; the tests drive a fake guest (``tests/migration_guest.py``)
with real guest memory and a writer thread.

Ownership rule the engine keeps: until the source sends COMMITTED the source owns the guest.
On the source ``pause`` may be followed by ``resume`` (the migration failed or was cancelled) or by
``stop_for_good`` (committed), never both. On the destination ``restore_sections`` may be followed
by ``start_running`` (committed) or ``discard`` (anything else); ``discard`` may also come with no
restore at all.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

from ..memory import GuestMemory
from ..state import Section


@runtime_checkable
class MigrationAdapter(Protocol):
    memory: GuestMemory

    def spec(self) -> dict[str, Any]:
        """The SPEC fields: ``page_size``, ``vendor``, ``vcpus``, ``tsc``, ``lowmem_size``,
        ``highmem_size``, ``wired`` and ``devices`` (section name -> section version)."""

    def check_spec(self, remote_spec: dict[str, Any]) -> None:
        """Destination: raise (any exception; its message is sent as the refusal reason) if this
        VM cannot take a guest described by ``remote_spec``. :func:`spec_mismatches` helps."""

    def pause(self) -> None:
        """Stop vCPUs and quiesce devices; when it returns nothing writes guest memory."""

    def resume(self) -> None:
        """Undo ``pause``: the source keeps the guest (migration failed or was cancelled)."""

    def save_sections(self) -> list[Section]:
        """All non-memory state, taken while paused."""

    def restore_sections(self, sections: list[Section]) -> None:
        """Destination: load the state; the guest must not run until ``start_running``."""

    def throttle(self, fraction: float) -> None:
        """Auto-converge: let the vCPUs run only ``1 - fraction`` of the time (0.0 = full speed)."""

    def stop_for_good(self) -> None:
        """Source, after COMMITTED: the guest now lives on the destination."""

    def start_running(self) -> None:
        """Destination, after COMMITTED: run the guest."""

    def discard(self) -> None:
        """Destination: the migration failed; throw the half-received guest away."""


def spec_mismatches(local: dict[str, Any], remote: dict[str, Any]) -> list[str]:
    """What stops a VM described by ``local`` from taking a guest described by ``remote``, each as
    a sentence naming both values. Wiring may differ: it changes how memory is held, not what the
    guest sees."""
    problems = []
    for key, what in (("page_size", "page size"), ("vendor", "vCPU vendor"), ("vcpus", "vCPU count"),
                      ("tsc", "TSC mode"), ("lowmem_size", "lowmem size"), ("highmem_size", "highmem size")):
        if local.get(key) != remote.get(key):
            problems.append(f"{what} differs: source {remote.get(key)!r}, destination {local.get(key)!r}")
    mine, theirs = dict(local.get("devices", {})), dict(remote.get("devices", {}))
    missing = sorted(set(theirs) - set(mine))
    extra = sorted(set(mine) - set(theirs))
    if missing:
        problems.append(f"devices missing on the destination: {', '.join(missing)}")
    if extra:
        problems.append(f"devices only on the destination: {', '.join(extra)}")
    for name in sorted(set(mine) & set(theirs)):
        if theirs[name] > mine[name]:
            problems.append(f"device '{name}' state version {theirs[name]} is newer than the destination reads ({mine[name]})")
    return problems
