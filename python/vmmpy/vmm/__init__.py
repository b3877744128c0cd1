"""The "kernel" of vmmpy (vmm.ko): the devices bhyve emulates inside the kernel.

This package owns the kernel-emulated devices -- vlapic (local APIC), vioapic (I/O APIC),
vatpic (8259 pair), vatpit (8254 timer), vhpet (HPET), vrtc (MC146818 RTC) and vpmtmr
(ACPI PM timer) -- the small protocols they talk through (``interfaces``) and the guest clock
they read (``clock``). Each device keeps a plain, versioned state dataclass beside it.

It does not own the vCPU, exit dispatch or the run loop (the integrator wires devices to
exits and to the vCPU), nor files, sockets or the framing of state sections (``state/``).
See docs/kernel-devices.md.
"""
