"""Versions that work: a device's declaration says what it writes, the oldest it still reads, and
a default for each field added since; the section's version reaches the reader.

The bump is made here by declaring the next version of the PM device's state (a field added in
version 2 with a default), as a developer would, and running both readers against both sections.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import pytest

from vmmpy.devices.pm import PmState, PowerManagement
from vmmpy.state import Section, SectionError, SectionRegistry, decode_sections, encode_sections, persist


@dataclasses.dataclass
class PmStateV2:
    """PmState's next version: ``wake_enable`` added in version 2; version 1 still read."""

    VERSION: ClassVar[int] = 2
    MIN_VERSION: ClassVar[int] = 1

    pm1_control: int
    reset_control: int
    wake_enable: bool = dataclasses.field(default=False, metadata={"since": 2})


def roundtrip(section: Section) -> Section:
    (back,) = decode_sections(encode_sections([section]))
    return back


def test_a_new_reader_reads_an_old_section_filling_the_default():
    pm = PowerManagement(lambda how: None)
    pm.io_write(0x404, 2, 0x1400)
    old = roundtrip(Section("pm", PmState.VERSION, persist.dump(pm.save())))
    state = persist.load(PmStateV2, old.payload, old.version, where="pm")
    assert state == PmStateV2(pm1_control=0x1400, reset_control=0, wake_enable=False)


def test_an_old_reader_refuses_a_newer_section_by_name_and_versions(monkeypatch):
    new = roundtrip(Section("pm", PmStateV2.VERSION, persist.dump(PmStateV2(0x1400, 0, True))))
    with pytest.raises(persist.PersistError, match=r"pm: section version 2 is newer than this vmmpy reads \(versions 1 to 1\)"):
        persist.load(PmState, new.payload, new.version, where="pm")
    registry = SectionRegistry()
    registry.register("pm", PmState.VERSION, persist.min_version_of(PmState))
    with pytest.raises(SectionError, match=r"vm0.ckp.kern: section 'pm' version 2 is newer than this vmmpy reads \(versions 1 to 1\)"):
        registry.check("pm", new.version, what="vm0.ckp.kern")


def test_a_field_of_a_later_version_is_refused_in_an_older_section():
    payload = {"pm1_control": 0, "reset_control": 0, "wake_enable": True}
    with pytest.raises(persist.PersistError, match=r"pm: field 'wake_enable' was added in version 2; a version 1 section cannot have it"):
        persist.load(PmStateV2, payload, 1, where="pm")
    with pytest.raises(persist.PersistError, match=r"pm: unknown field 'wake' \(not in version 2 of this section\)"):
        persist.load(PmStateV2, dict(payload, wake=1), 2, where="pm")
    with pytest.raises(persist.PersistError, match=r"pm: missing field 'wake_enable'"):
        persist.load(PmStateV2, {"pm1_control": 0, "reset_control": 0}, 2, where="pm")


def test_a_section_older_than_the_oldest_read_is_refused(monkeypatch):
    monkeypatch.setattr(PmStateV2, "MIN_VERSION", 2)
    with pytest.raises(persist.PersistError, match=r"pm: section version 1 is older than this vmmpy still reads \(versions 2 to 2\)"):
        persist.load(PmStateV2, {"pm1_control": 0, "reset_control": 0}, 1, where="pm")


def test_a_bumped_device_widens_its_machines_registry(monkeypatch):
    """A machine's registry (``state.kernel``) takes each device's range from its declaration: a
    bumped one reads versions 1 and 2 and refuses 3. (The whole restore path, sections into a
    running guest, is tests/test_compat_fixtures.py's.)"""
    from vmmpy.state.kernel import section_registry

    class Machine:
        devices = [PowerManagement(lambda how: None)]

    monkeypatch.setattr(PowerManagement, "STATE", PmStateV2)
    registry = section_registry(Machine)
    registry.check("pm", 1)
    registry.check("pm", 2)
    with pytest.raises(SectionError, match=r"section 'pm' version 3 is newer"):
        registry.check("pm", 3)


def test_a_declaration_adding_a_field_without_a_default_is_refused():
    @dataclasses.dataclass
    class Bad:
        VERSION: ClassVar[int] = 2
        added: int = dataclasses.field(metadata={"since": 2})

    with pytest.raises(TypeError, match=r"Bad.added: a field added in version 2 needs a default"):
        persist.fields_of(Bad)


def test_the_vcpu_section_is_declared_too_and_refuses_a_bad_register_by_path():
    from vmmpy import _core
    from vmmpy.memory import GuestMemory
    from vmmpy.vmm.vm import VcpusState, VcpuState

    memory = GuestMemory(1 << 20)
    saved = VcpusState([VcpuState.from_core(_core.Vcpu(memory.core, vendor=vendor).save_state()) for vendor in ("intel", "amd")])
    payload = persist.dump(saved)
    assert persist.load(VcpusState, payload, 1, where="vmcx") == saved
    group = next(iter(payload["vcpus"][0]["registers"]))
    register = next(iter(payload["vcpus"][0]["registers"][group]))
    payload["vcpus"][0]["registers"][group][register] = "0x10"
    with pytest.raises(persist.PersistError, match=rf"vmcx: vcpus\[0\]\.registers\.{group}\.{register}: expected an int, got '0x10'"):
        persist.load(VcpusState, payload, 1, where="vmcx")
    back = saved.vcpus[1].to_core()
    assert back == _core.Vcpu(memory.core, vendor="amd").save_state(), "the core's own layout comes back"


def test_a_default_made_by_a_factory_is_fresh_for_every_section_read():
    @dataclasses.dataclass
    class WithQueue:
        VERSION: ClassVar[int] = 2
        MIN_VERSION: ClassVar[int] = 1
        pending: list[int] = dataclasses.field(default_factory=list, metadata={"since": 2})

    first = persist.load(WithQueue, {}, 1, where="q")
    second = persist.load(WithQueue, {}, 1, where="q")
    first.pending.append(1)
    assert second.pending == [], "two restored objects never share a default"


def test_a_declaration_that_contradicts_itself_is_refused_when_first_used():
    @dataclasses.dataclass
    class FutureField:
        VERSION = 1
        MIN_VERSION = 1
        added: int = dataclasses.field(default=0, metadata={"since": 2})

    @dataclasses.dataclass
    class OldestAfterNewest:
        VERSION = 1
        MIN_VERSION = 2
        value: int = 0

    with pytest.raises(TypeError, match=r"FutureField\.added: added in version 2, after the declaration's VERSION 1"):
        persist.dump(FutureField())
    with pytest.raises(TypeError, match=r"OldestAfterNewest: MIN_VERSION 2 must be from 1 to VERSION 1"):
        persist.dump(OldestAfterNewest())


def test_a_save_that_is_not_of_its_declaration_is_refused_by_section_name():
    """The version a section is written with and the fields written come from one declaration."""
    from vmmpy.state.kernel import _section

    @dataclasses.dataclass
    class Other:
        VERSION = 9
        MIN_VERSION = 1

    with pytest.raises(TypeError, match=r"section 'pm': save produced Other, but the section is declared as"):
        _section("pm", PmState, Other())
