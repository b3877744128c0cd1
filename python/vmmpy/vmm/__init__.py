"""The "kernel" of vmmpy (vmm.ko): the devices bhyve emulates inside the kernel.

This package owns the ``Vm`` (``vm``: memory, vCPUs, VM_RUN and the ioctl surface of
``ioctl``) and the kernel-emulated devices VM_RUN handles itself -- vlapic (local APIC),
vioapic (I/O APIC), vatpic (8259 pair), vatpit (8254 timer), vhpet (HPET), vrtc (MC146818
RTC) and vpmtmr (ACPI PM timer) -- with the small protocols they talk through
(``interfaces``) and the guest clock they read (``clock``). Each device keeps a plain,
versioned state dataclass beside it.

It does not own userspace devices, threads or the control socket (``runtime/``), nor files,
sockets or the framing of state sections (``state/``). See docs/vmm.md and
docs/kernel-devices.md.
"""
