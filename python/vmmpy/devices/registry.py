"""Every PCI emulation ``-s SLOT,EMULATION[,CONF]`` can place, by name, and the state sections a
set of slots produces. The single list the runtime (building machines) and the snapshot layer
(knowing sections before a machine exists) both read, so they cannot disagree.

Only complete devices are listed: each emulates its interface, pauses, saves and restores.
"""

from __future__ import annotations

from .ahci import AhciHd
from .nvme import Nvme
from .pci import HostBridge, LpcBridge, PciBus, PciFunction
from .pm import PowerManagement
from .uart import Uart
from .virtio_blk import VirtioBlock
from .virtio_console import VirtioConsole
from .virtio_net import VirtioNet
from .virtio_rnd import VirtioRandom
from .virtio_scsi import VirtioScsi

PCI_EMULATIONS: dict[str, type[PciFunction]] = {
    cls.EMULATION: cls
    for cls in (HostBridge, LpcBridge, VirtioBlock, VirtioRandom, VirtioConsole, VirtioNet, VirtioScsi, Nvme, AhciHd)
}

#: The machine's legacy devices (always present): section name -> class.
LEGACY_SECTIONS: dict[str, type] = {"lpc.com1": Uart, "lpc.com2": Uart, PowerManagement.SECTION: PowerManagement, PciBus.SECTION: PciBus}


def device_states(pci_names: list[str]) -> dict[str, type]:
    """Section name -> state declaration for a machine with these PCI functions (``EMU@pci.B.S.F``)."""
    states = {name: cls.STATE for name, cls in LEGACY_SECTIONS.items()}
    for name in pci_names:
        emulation = name.partition("@")[0]
        cls = PCI_EMULATIONS.get(emulation)
        if cls is None:
            raise ValueError(f"unknown PCI emulation '{emulation}' (this vmmpy has: {', '.join(PCI_EMULATIONS)})")
        states[name] = cls.STATE
    return states


def device_sections(pci_names: list[str]) -> dict[str, int]:
    """Section name -> the version this vmmpy writes, for a machine with these PCI functions."""
    return {name: state.VERSION for name, state in device_states(pci_names).items()}


def state_declarations() -> list[type]:
    """Every device state declaration this vmmpy has."""
    return list({cls.STATE: None for cls in (*LEGACY_SECTIONS.values(), *PCI_EMULATIONS.values())})
