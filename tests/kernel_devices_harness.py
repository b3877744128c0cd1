"""Test helpers for the kernel-emulated devices: fake vCPU and IRQ lines, a run loop, and
the save -> JSON -> restore round trip every device's continuity test uses."""

from __future__ import annotations

from vmmpy.state import decode_payload, encode_payload, persist
from vmmpy.vmm.clock import ManualClock


class FakeVcpu:
    """Records (guest ns, vector) for every injected interrupt."""

    def __init__(self, clock: ManualClock) -> None:
        self.clock = clock
        self.injected: list[tuple[int, int]] = []

    def inject_interrupt(self, vector: int) -> None:
        self.injected.append((self.clock.now_ns(), vector))


class RecordingIrq:
    """An IrqSink that records (guest ns, action, irq) and tracks levels."""

    def __init__(self, clock: ManualClock) -> None:
        self.clock = clock
        self.events: list[tuple[int, str, int]] = []
        self.levels: dict[int, bool] = {}

    def assert_irq(self, irq: int) -> None:
        self.events.append((self.clock.now_ns(), "assert", irq))
        self.levels[irq] = True

    def deassert_irq(self, irq: int) -> None:
        self.events.append((self.clock.now_ns(), "deassert", irq))
        self.levels[irq] = False

    def pulse_irq(self, irq: int) -> None:
        self.events.append((self.clock.now_ns(), "pulse", irq))

    def times(self, action: str = "pulse", irq: int | None = None) -> list[int]:
        return [t for t, a, i in self.events if a == action and (irq is None or i == irq)]


class FakeLapic:
    """A LapicTarget recording (vector, level) messages."""

    def __init__(self, apic_id: int) -> None:
        self.apic_id = apic_id
        self.received: list[tuple[int, bool]] = []

    def set_intr(self, vector: int, level_triggered: bool) -> None:
        self.received.append((vector, level_triggered))


def run_until(clock: ManualClock, timers, end_ns: int, after_event=None) -> None:
    """The run loop's time part: jump to each earliest event, advance every device, let the
    guest react (``after_event``), repeat; finally move to ``end_ns`` and advance."""
    while True:
        due = [t for t in (d.next_event_ns() for d in timers) if t is not None and t <= end_ns]
        step = min(due) if due else end_ns
        clock.set_ns(max(step, clock.now_ns()))
        for device in timers:
            device.advance(clock.now_ns())
        if not due:
            return
        if after_event is not None:
            after_event()


def json_roundtrip(state):
    """save() -> section payload -> encoded bytes -> payload -> state, as a snapshot file or migration would."""
    data = encode_payload(persist.dump(state))
    return persist.load(type(state), decode_payload(state.SECTION, data), state.VERSION, where=state.SECTION)


def load_state(cls, payload, version=None):
    """A state declaration read from a payload, as restoring a section of ``version`` does."""
    return persist.load(cls, payload, cls.VERSION if version is None else version, where=cls.SECTION)
