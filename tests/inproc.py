"""Helpers for tests that run machines inside the test process."""

from __future__ import annotations

import socket
import threading
import time

from vmmpy.memory import PageBatchError
from vmmpy.runtime.config import VmConfig
from vmmpy.runtime.process import Machine
from vmmpy.state import decode_sections, encode_sections
from vmmpy.state.kernel import MachineSectionLoader, save_sections


def run_to_end(machine: Machine, timeout: float = 60) -> int:
    """Wait for the guest to stop (bounded) and close the machine; its bhyve exit status."""
    try:
        status = machine.wait(timeout)
        assert status is not None, "the guest did not stop in time"
        return status
    finally:
        machine.close()


def paused_or_ended(machine: Machine, timeout: float = 30) -> bool:
    """Wait until a guest started with ``pause_at`` has paused itself, then make every vCPU
    thread park (the rendezvous a checkpoint or migration does): True. False if the guest ended
    first."""
    deadline = time.monotonic() + timeout
    while not machine.paused:
        if machine.exit_status is not None:
            return False
        assert time.monotonic() < deadline, "the guest did not reach its pause point"
        time.sleep(0.001)
    machine.pause()
    return True


def wait_paused(machine: Machine, timeout: float = 30) -> None:
    """:func:`paused_or_ended`, where the guest ending first is a failure."""
    assert paused_or_ended(machine, timeout), f"the guest ended before its pause point: {machine.exit_reason}"


def move_to_fresh_machine(source: Machine, config: VmConfig, consoles: dict, compress: str = "off", parts: int = 0) -> Machine:
    """Move a paused machine into a new one built from ``config``, as a migration does: every
    state section (through the encoded container) and all memory (through a page batch stream,
    ``compress``ed as a migration source would); the source is destroyed and the target started.
    ``parts``: the state goes in containers of that many sections, each read into the target's
    ``MachineSectionLoader`` on its own, as protocol version 9's STATE_PARTs are; 0: one container."""
    saved = save_sections(source)
    size = parts or len(saved)
    containers = [decode_sections(encode_sections(saved[i:i + size])) for i in range(0, len(saved), size)]
    target = Machine(config, consoles=consoles)
    target.setup_memory()
    a, b = socket.socketpair()
    with a, b:
        sent = {}

        def send() -> None:
            try:
                sent.update(source.vm.memory.send_all_pages(a.fileno(), compress=compress))
            finally:
                a.shutdown(socket.SHUT_WR)

        sender = threading.Thread(target=send)
        sender.start()
        received = 0
        while sender.is_alive() or received < sent.get("batches", 0):
            try:
                target.vm.memory.recv_pages(b.fileno())
            except PageBatchError as err:
                if "got 0 of 40" in str(err):  # the stream ended between batches
                    break
                raise
            received += 1
        sender.join()
        assert received == sent["batches"], f"{received} of {sent['batches']} batches arrived"
    source.destroy()  # closes backends (disk images) before the target uses them, as a suspend does
    loader = MachineSectionLoader(target, what="test")
    for sections in containers:
        loader.add(sections)
    loader.restore()
    target.start(serve_control=False)
    return target
