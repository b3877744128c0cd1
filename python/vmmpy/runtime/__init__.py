"""The bhyve process: VM construction from options, vCPU threads, exit handling, control socket.

``runtime`` sits above ``vmm`` (the kernel) and ``devices``: it builds a VM from a
:class:`~vmmpy.runtime.config.VmConfig`, runs one thread per vCPU that calls VM_RUN and hands
userspace exits to device models, and serves the control socket ``vmmctl`` talks to.
"""
