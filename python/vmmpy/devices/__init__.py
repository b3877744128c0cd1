"""Userspace device models (bhyve's usr.sbin/bhyve device emulations) and their backends.

Every device implements :class:`~vmmpy.devices.base.Device`: emulate port or MMIO accesses,
pause (quiesce), resume, and save/restore a versioned state section.
"""
