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


def device_sections(pci_names: list[str]) -> dict[str, int]:
    """Section name -> version for a machine with these PCI functions (``EMU@pci.B.S.F``)."""
    sections = {name: cls.VERSION for name, cls in LEGACY_SECTIONS.items()}
    for name in pci_names:
        emulation = name.partition("@")[0]
        cls = PCI_EMULATIONS.get(emulation)
        if cls is None:
            raise ValueError(f"unknown PCI emulation '{emulation}' (this vmmpy has: {', '.join(PCI_EMULATIONS)})")
        sections[name] = cls.VERSION
    return sections
