"""The bhyve process: VM construction from options, vCPU threads, exit handling, control socket,
and the commands it serves.

``runtime`` sits above ``snapshot`` and ``migration`` and, below them, ``vmm`` (the kernel) and
``devices``: ``process`` builds a VM from a :class:`~vmmpy.runtime.config.VmConfig`, runs one
thread per vCPU that calls VM_RUN and hands userspace exits to device models, and serves the
control socket ``vmmctl`` talks to; ``commands`` (checkpoint, suspend, restore, migrate) hands the
machine to snapshot/ and migration/ through its guest handle (``guest_handle``).
"""
