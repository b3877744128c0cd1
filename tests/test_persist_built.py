"""The loaders and dumpers ``state/persist.py`` builds once per declared type decide exactly as its
generic reader and writer do: on every section a real machine writes, and on the same payloads
damaged at random (a value replaced, a field dropped or added), ``load`` returns an equal object or
raises the same error word for word with the built loader as with the generic reader alone, and
``dump`` writes the same payload."""

from __future__ import annotations

import contextlib
import copy
import dataclasses
from typing import Any, ClassVar
from unittest import mock

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vmmpy.devices.uart import CaptureConsole
from vmmpy.runtime.config import VmConfig, parse_slot
from vmmpy.runtime.process import Machine
from vmmpy.state import decode_sections, encode_sections, persist
from vmmpy.state.kernel import KERNEL_SECTIONS, save_sections


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """(declaration, section) for every section of a machine with one of each disk controller."""
    tmp = tmp_path_factory.mktemp("built")
    slots = []
    for slot, kind in ((3, "virtio-blk"), (4, "nvme"), (5, "ahci-hd")):
        img = tmp / f"{kind}.img"
        img.write_bytes(bytes(1 << 20))
        slots.append(parse_slot(f"{slot},{kind},{img}"))
    machine = Machine(VmConfig(name="persist-built", memsize=16 << 20, slots=slots), consoles={"com1": CaptureConsole()})
    machine.setup_memory()
    try:
        declarations = {k.name: k.state for k in KERNEL_SECTIONS} | {d.name: d.STATE for d in machine.devices}
        sections = decode_sections(encode_sections(save_sections(machine)))
    finally:
        machine.destroy()
    assert len(sections) >= 17, [s.name for s in sections]
    return [(declarations[s.name], s) for s in sections]


@contextlib.contextmanager
def generic_only():
    """``persist.load`` with every built loader refusing, so the generic reader decides alone."""
    with mock.patch.object(persist, "_struct_loader", lambda cls: persist._refuse):
        yield


def typed(value: Any) -> Any:
    """``value`` with the type of everything in it spelled out, so that True and 1, or 1.0 and 1,
    compare unequal."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return (type(value).__name__, {f.name: typed(getattr(value, f.name)) for f in dataclasses.fields(value)})
    if isinstance(value, dict):
        return (type(value).__name__, {k: typed(v) for k, v in value.items()})
    if isinstance(value, (list, tuple)):
        return (type(value).__name__, [typed(v) for v in value])
    return (type(value).__name__, value)


def outcome(cls: type, payload: Any, version: int) -> tuple[str, Any]:
    try:
        return "ok", typed(persist.load(cls, payload, version, where="section 's'"))
    except persist.PersistError as err:
        return "error", str(err)


def both(cls: type, payload: Any, version: int) -> tuple[tuple[str, Any], tuple[str, Any]]:
    built = outcome(cls, copy.deepcopy(payload), version)
    with generic_only():
        generic = outcome(cls, copy.deepcopy(payload), version)
    return built, generic


def test_every_real_section_loads_and_dumps_the_same_both_ways(saved):
    for cls, section in saved:
        built, generic = both(cls, section.payload, section.version)
        assert built == generic, section.name
        assert built[0] == "ok", (section.name, built)
        state = persist.load(cls, section.payload, section.version, where="section 's'")
        reference = {f.name: persist._dump_value(getattr(state, f.name)) for f in persist.fields_of(cls)}
        assert typed(persist.dump(state)) == typed(reference) == typed(section.payload), section.name


def test_a_value_not_of_its_declared_type_is_named_by_the_built_path_too(saved):
    cls, section = next((c, s) for c, s in saved if s.name == "vlapic")
    payload = copy.deepcopy(section.payload)
    payload["vcpus"][0]["tmr"][-1] = True  # a bool in a list declared as list[int]
    built, generic = both(cls, payload, section.version)
    assert built == generic and built[0] == "error"
    assert "vcpus[0].tmr[7]: expected an int, got True" in built[1], built


REPLACEMENTS = st.one_of(
    st.integers(min_value=-(1 << 70), max_value=1 << 70), st.booleans(), st.none(), st.text(max_size=4),
    st.binary(max_size=4), st.floats(allow_nan=False), st.lists(st.integers(0, 9), max_size=3),
    st.dictionaries(st.text(max_size=3), st.integers(0, 9), max_size=2),
)


def _paths(value: Any, prefix: tuple = ()) -> list[tuple]:
    """Every place in a payload a value can be replaced: dict keys and list indexes, nested."""
    out = []
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, item in items:
        out.append(prefix + (key,))
        out.extend(_paths(item, prefix + (key,)))
    return out


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_damaged_payloads_get_the_generic_readers_answer_word_for_word(saved, data):
    cls, section = data.draw(st.sampled_from(saved), label="section")
    payload = copy.deepcopy(section.payload)
    action = data.draw(st.sampled_from(["replace", "drop", "add", "version"]), label="action")
    paths = _paths(payload)
    if action == "version":
        version = data.draw(st.integers(0, persist.version_of(cls) + 1), label="version")
    else:
        version = section.version
        path = data.draw(st.sampled_from(paths), label="path")
        *parents, last = path
        holder = payload
        for key in parents:
            holder = holder[key]
        if action == "replace":
            holder[last] = data.draw(REPLACEMENTS, label="value")
        elif action == "drop" and isinstance(holder, dict):
            del holder[last]
        elif isinstance(holder, dict):
            holder[data.draw(st.text(min_size=1, max_size=6), label="key")] = 0
    try:
        built, generic = both(cls, payload, version)
    except persist.PersistError as err:  # a version refused before any reader runs
        assert action == "version", err
        return
    assert built == generic


@dataclasses.dataclass
class Node:
    """A declaration that nests itself."""

    VERSION: ClassVar[int] = 1
    value: int
    children: list[Node] = dataclasses.field(default_factory=list)


def test_a_declaration_that_nests_itself_loads_and_dumps_both_ways():
    assert persist.prepare(Node) == 1
    payload = {"value": 1, "children": [{"value": 2, "children": []}, {"value": 3, "children": [{"value": 4, "children": []}]}]}
    built, generic = both(Node, payload, 1)
    assert built == generic and built[0] == "ok"
    assert persist.dump(persist.load(Node, payload, 1, where="n")) == payload
    payload["children"][1]["children"][0]["value"] = "4"
    built, generic = both(Node, payload, 1)
    assert built == generic == ("error", "section 's': children[1].children[0].value: expected an int, got '4'")
