"""The stubs shipped for ``vmmpy._core`` (``_core.pyi``) and the built module say the same thing:
every public name of the module, and of each of its classes, is declared in the stub, and every
name the stub declares exists. The package ships ``py.typed`` and the stub next to the module."""

import ast
import inspect
from pathlib import Path

import pytest

import vmmpy
from vmmpy import _core

PACKAGE = Path(vmmpy.__file__).parent
STUB = PACKAGE / "_core.pyi"
# Names the stub declares for its own use (type aliases), not part of the module.
STUB_ONLY = {"DirtyTracking", "Compress", "Endpoint"}


def _stub() -> tuple[set[str], dict[str, set[str]]]:
    """The stub's top-level names, and for each class the names declared in its body."""
    tree = ast.parse(STUB.read_text(), filename=str(STUB))
    names: set[str] = set()
    classes: dict[str, set[str]] = {}
    for node in tree.body:
        if isinstance(node, ast.ClassDef):
            names.add(node.name)
            classes[node.name] = {
                item.name for item in node.body if isinstance(item, ast.FunctionDef | ast.AsyncFunctionDef)
            } | {item.target.id for item in node.body if isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name)}
        elif isinstance(node, ast.FunctionDef):
            names.add(node.name)
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names.add(node.target.id)
        elif isinstance(node, ast.Assign):
            names.update(t.id for t in node.targets if isinstance(t, ast.Name))
    return names - STUB_ONLY, classes


def _public(names) -> set[str]:
    return {n for n in names if not n.startswith("_")}


def test_every_public_name_of_the_module_is_in_the_stub_and_back():
    declared, _ = _stub()
    built = _public(dir(_core))
    assert built - declared == set(), f"in vmmpy._core but not in {STUB.name}: add them to the stub"
    assert declared - built == set(), f"in {STUB.name} but not in vmmpy._core: remove them from the stub"


def test_every_public_member_of_each_class_is_in_the_stub_and_back():
    _, classes = _stub()
    for name, members in classes.items():
        cls = getattr(_core, name)
        assert inspect.isclass(cls), f"{STUB.name} declares {name} a class; vmmpy._core has {cls!r}"
        # Members the class defines itself (an exception's are inherited from OSError).
        built = _public(vars(cls))
        assert built - members == set(), f"{name}: members missing from {STUB.name}"
        assert _public(members) - built == set(), f"{name}: members {STUB.name} declares that vmmpy._core lacks"


def test_the_package_ships_the_stub_and_the_typed_marker():
    assert STUB.is_file(), f"{STUB} is missing"
    assert (PACKAGE / "py.typed").is_file(), "py.typed is missing: type checkers would ignore the package's annotations"


def test_results_are_typed_and_read_only():
    mem = _core.GuestMemory(1 << 20)
    mem.write(4096, b"x")
    (run,) = mem.get_and_clear_dirty_ranges()
    assert (type(run).__name__, run.gpa, run.length) == ("DirtyRange", 4096, 4096)
    assert repr(run) == "DirtyRange(gpa=4096, length=4096)"
    other = _core.GuestMemory(1 << 20)
    other.write(4096 + 17, b"y")
    assert other.get_and_clear_dirty_ranges() == [run], "results with equal fields are equal"
    assert run.as_dict() == {"gpa": 4096, "length": 4096}
    with pytest.raises(AttributeError):
        run.gpa = 0
