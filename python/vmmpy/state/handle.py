"""The guest handle: what checkpoints and migrations need from a guest, and nothing more.

``snapshot/`` and ``migration/`` never import the VM: they drive anything of this shape. The
runtime implements it for a real machine (``runtime.guest_handle.MachineHandle``); the tests
drive a fake guest with real guest memory and a writer thread (``tests/migration_guest.py``)
through both.

Ownership rule both keep: whoever holds the guest's state owns the guest until it is safely
elsewhere. ``pause`` may be followed by ``resume`` (the checkpoint or migration failed, was
cancelled, or the guest keeps running after a checkpoint) or by ``stop_for_good`` (suspended to
files, or the migration committed), never both. A guest being restored (from a checkpoint or a
migration stream) gets ``check_sections``/``restore_sections`` (and ``adopt_memory`` when its
memory was made elsewhere), then ``start_running`` once it may run (a migration's destination
calls ``prepare_to_run`` first, while the commit is decided), or ``discard`` when the
incoming migration failed; ``discard`` may also come with no restore at all.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from ..memory import GuestMemory
from ..units import format_memsize
from .section import Section, SectionError

if TYPE_CHECKING:
    from ..devices.base import Device
    from ..vmm.vm import Vm


class SectionLoader(Protocol):
    """State taken in parts (``GuestHandle.section_loader``). ``add`` raises, naming the section,
    for one the guest cannot take or that came before; ``restore`` checks the whole (nothing
    missing) and loads it. Nothing changes the guest before ``restore``."""

    def add(self, sections: Iterable[Section]) -> None: ...

    def restore(self) -> None: ...


class LoadAtEnd:
    """A :class:`SectionLoader` for a guest that checks its state only whole: ``add`` refuses
    a section name that came before and keeps the rest, ``restore`` hands them all to the
    guest's ``restore_sections``."""

    def __init__(self, guest: GuestHandle, *, what: str) -> None:
        self.guest = guest
        self.what = what
        self.sections: list[Section] = []
        self.names: set[str] = set()

    def add(self, sections: Iterable[Section]) -> None:
        for section in sections:
            if section.name in self.names:
                raise SectionError(f"{self.what}: section '{section.name}' came twice")
            self.names.add(section.name)
            self.sections.append(section)

    def restore(self) -> None:
        self.guest.restore_sections(self.sections, what=self.what)


@runtime_checkable
class GuestHandle(Protocol):
    @property
    def memory(self) -> GuestMemory:
        """The guest's memory (pages are read from and received into it)."""

    def spec(self) -> dict[str, Any]:
        """What the guest is: ``page_size``, ``vendor``, ``vcpus``, ``tsc``, ``lowmem_size``,
        ``highmem_size``, ``wired`` and ``devices`` (section name -> section version)."""

    def check_spec(self, remote_spec: dict[str, Any]) -> None:
        """Raise (any exception; its message says why) if this guest cannot take one described
        by ``remote_spec``. :func:`spec_mismatches` helps."""

    def pause(self) -> float:
        """Stop vCPUs and quiesce devices; when it returns nothing writes guest memory. Returns
        how long that took in seconds (0.0 when the guest was paused already)."""

    def resume(self) -> None:
        """Undo ``pause`` (a guest paused before ``pause`` stays paused)."""

    def save_sections(self) -> Iterable[Section]:
        """All non-memory state, taken while paused, in order. It may take each section as it
        is reached (a generator), so a migration sends the first while the rest are taken; the
        guest stays paused until it is exhausted."""

    def check_sections(self, sections: list[Section], *, what: str) -> None:
        """Refuse sections this guest cannot take, naming ``what`` they came from (a checkpoint
        file, the migration stream), before anything is restored."""

    def adopt_memory(self, memory: GuestMemory) -> None:
        """Take memory made elsewhere (restored from a checkpoint, or handed over by a local
        migration) as the guest's, in place of the empty memory it may have been built with."""

    def restore_sections(self, sections: list[Section], *, what: str) -> None:
        """Load the state (checked first; errors name ``what``); the guest does not run until
        ``start_running``."""

    def section_loader(self, *, what: str) -> SectionLoader:
        """A loader for state that comes in parts (a migration's STATE_PARTs): ``add`` checks
        what it can of each part as it comes, ``restore`` does what ``restore_sections`` does
        with all of them. :class:`LoadAtEnd` keeps every check for ``restore``."""

    def throttle(self, fraction: float) -> None:
        """Auto-converge: let the vCPUs run only ``1 - fraction`` of the time (0.0 = full speed)."""

    def stop_for_good(self, reason: str) -> None:
        """The guest now lives elsewhere (migrated away, suspended to files): end it here;
        ``reason`` says where it went."""

    def prepare_to_run(self) -> None:
        """A guest being received whose commit was acknowledged: get ready so that
        ``start_running`` is quick (the destination calls it while COMMITTED is on its way, which
        is downtime), without running anything. A guest that cannot get ready here gets ready in
        ``start_running``: this never raises."""

    def start_running(self) -> None:
        """A restored guest: run it."""

    def discard(self) -> None:
        """A guest being received: the migration failed; throw the half-received guest away."""


class SavableMachine(Protocol):
    """What ``state.kernel`` takes a machine's sections from and restores them into (a guest
    handle's implementation passes its machine): the kernel (``vm``), the userspace devices in
    save order, and a hook run once every device section is loaded."""

    vm: Vm
    devices: Sequence[Device]

    def devices_restored(self) -> None: ...


def spec_mismatches(local: dict[str, Any], remote: dict[str, Any]) -> list[str]:
    """What stops a guest described by ``local`` from taking one described by ``remote`` (the
    source), each as a sentence naming both values. Wiring may differ: it changes how memory is
    held, not what the guest sees."""
    problems = []
    if local.get("page_size") != remote.get("page_size"):
        problems.append(f"page size differs: source {remote.get('page_size')}, destination {local.get('page_size')}")
    # In the options' terms: start the destination with the source's -m, -c, --vendor, --tsc.
    for key, what, flag in (("vcpus", "vCPU count", "-c"), ("vendor", "vCPU vendor", "--vendor"), ("tsc", "TSC mode", "--tsc")):
        if local.get(key) != remote.get(key):
            problems.append(f"{what} differs: the source has {flag} {remote.get(key)}, this destination {flag} {local.get(key)}")
    mine_mem = (local.get("lowmem_size"), local.get("highmem_size"))
    theirs_mem = (remote.get("lowmem_size"), remote.get("highmem_size"))
    if mine_mem != theirs_mem:
        problems.append(f"memory differs: the source has -m {_memsize(theirs_mem)}, this destination -m {_memsize(mine_mem)}")
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


def _memsize(layout: tuple[Any, Any]) -> str:
    """lowmem + highmem as ``-m`` spells it, or the raw pair if malformed."""
    low, high = layout
    if not isinstance(low, int) or not isinstance(high, int):
        return f"? (lowmem {low!r}, highmem {high!r})"
    return format_memsize(low + high)


__all__ = ["GuestHandle", "SavableMachine", "spec_mismatches"]
