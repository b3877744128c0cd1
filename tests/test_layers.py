"""The imports follow the design's layers: each layer imports only the layers below it, peers on
one line never import each other, snapshot/ and migration/ see a guest only through the
guest-handle protocol (state/), and guest/ is imported by cli/ and the library's face alone (never
by the layers it runs on).

Every module under python/vmmpy is parsed with ``ast`` (no module is imported, so an import
inside a function or under ``TYPE_CHECKING`` counts like any other), each import is resolved to
the module it names, and one that reaches a layer the table does not allow fails, naming the
file, the line and the import.
"""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

import vmmpy

PACKAGE = Path(vmmpy.__file__).resolve().parent

# The design's layers, top down (DESIGN.md, "Layers, top down"):
#   cli -> runtime -> {snapshot, migration} -> state -> devices -> vmm -> memory
# with guest/ beside the stack. Each layer may import the layers named here and itself, nothing else.
ALLOWED: dict[str, frozenset[str]] = {
    "cli": frozenset({"runtime", "snapshot", "migration", "state", "devices", "vmm", "memory", "guest"}),
    # the process: builds the VM and hands it to snapshot/ and migration/ through the guest handle;
    # the guest program is put in by a loader its caller (vmmrun, the library's Vm) passes
    "runtime": frozenset({"snapshot", "migration", "state", "devices", "vmm", "memory"}),
    # peers; both see a guest only through state/'s guest-handle protocol, never devices or the kernel
    "snapshot": frozenset({"state", "memory"}),
    "migration": frozenset({"state", "memory"}),
    "state": frozenset({"devices", "vmm", "memory"}),
    "devices": frozenset({"vmm", "memory"}),
    "vmm": frozenset({"memory"}),
    "memory": frozenset(),
    # what ``import vmmpy`` offers: the package's __init__ and the library's entry (vm.py, vmmpy.Vm),
    # which builds guests from the shipped programs as vmmrun does
    "face": frozenset({"runtime", "snapshot", "migration", "state", "devices", "memory", "guest"}),
    # beside the stack: programs for the platform the VM builds (its constants), never the layers above it
    "guest": frozenset({"devices", "vmm", "memory"}),
}
#: Below everything and importable from anywhere: the Rust core and pure helpers.
FOUNDATION = frozenset({"_core", "units", "boundedjson", "errors", "progress", "_lazy", "__version__"})
#: Top-level modules that belong to a layer of another name: the package's own face
#: (``vmmpy/__init__.py``) exports the size helpers and the errors, and on first use GuestMemory
#: and the library's ``Vm`` (vm.py); importing ``vmmpy`` itself loads neither numpy nor the core.
ALIASES = {"__init__": "face", "vm": "face"}


def layer_of(parts: tuple[str, ...]) -> str:
    """The layer of module ``vmmpy.<parts>`` (``()`` is the package itself)."""
    if not parts:
        return "face"  # ``from vmmpy import X`` reaches the package's face
    first = parts[0].removesuffix(".py")
    return ALIASES.get(first, first)


def _is_submodule(package: tuple[str, ...], name: str) -> bool:
    where = PACKAGE.joinpath(*package, name)
    return (name == "_core" and not package) or where.is_dir() or where.with_suffix(".py").is_file()


def imported_modules(relpath: str, tree: ast.AST) -> list[tuple[ast.stmt, tuple[str, ...]]]:
    """Every (import statement, module inside vmmpy it names) in the module at ``relpath``
    (relative to the package, e.g. ``snapshot/checkpoint.py``); imports of other packages are left out."""
    package = Path(relpath).parts[:-1]  # what ``from .`` means, in a package's __init__.py too
    found: list[tuple[ast.stmt, tuple[str, ...]]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                names = tuple(alias.name.split("."))
                if names[0] == "vmmpy":
                    found.append((node, names[1:]))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                if node.level - 1 > len(package):
                    raise AssertionError(f"python/vmmpy/{relpath} line {node.lineno}: relative import leaves the package")
                base = package[: len(package) - (node.level - 1)]
            elif node.module and node.module.split(".")[0] == "vmmpy":
                base = ()
            else:
                continue
            module = tuple(node.module.split(".")) if node.module else ()
            if not node.level:
                module = module[1:]
            target = base + module
            # ``from .. import _core`` names a module; ``from .. import __version__`` a name in one (the
            # package's own dunders, its version, are plain constants: the foundation's).
            named = {target + (alias.name,) if _is_submodule(target, alias.name) else
                     ("__version__",) if target == () and alias.name == "__version__" else target for alias in node.names}
            found.extend((node, module) for module in sorted(named))
    return found


def import_violations(relpath: str, source: str) -> list[str]:
    """What is wrong with the imports of the module at ``relpath`` (relative to the package),
    each naming the file, the line and the import."""
    tree = ast.parse(source, filename=relpath)
    mine = layer_of(Path(relpath).parts)
    if mine not in ALLOWED and mine not in FOUNDATION:
        return [f"python/vmmpy/{relpath}: layer '{mine}' is not in the layer table (tests/test_layers.py): place it"]
    allowed = ALLOWED.get(mine, frozenset())
    problems = []
    for node, target in imported_modules(relpath, tree):
        theirs = layer_of(target)
        if theirs == mine or theirs in FOUNDATION or theirs in allowed:
            continue
        may = ", ".join(sorted(allowed)) or "nothing above the foundation"
        problems.append(f"python/vmmpy/{relpath} line {node.lineno}: `{ast.unparse(node)}`: {mine} imports {theirs} "
                        f"(vmmpy.{'.'.join(target)}); {mine} may import only {may} (and {', '.join(sorted(FOUNDATION))})")
    return problems


def package_modules() -> list[str]:
    return sorted(str(path.relative_to(PACKAGE)) for path in PACKAGE.rglob("*.py"))


def test_every_module_imports_only_the_layers_below_it():
    modules = package_modules()
    assert len(modules) > 50, f"found only {len(modules)} modules under {PACKAGE}"
    problems = [p for relpath in modules for p in import_violations(relpath, (PACKAGE / relpath).read_text())]
    assert not problems, "imports against the layers (DESIGN.md):\n" + "\n".join(problems)


def test_every_layer_of_the_table_exists():
    layers = {layer_of(Path(relpath).parts) for relpath in package_modules()}
    assert set(ALLOWED) <= layers | {"memory"}, f"the table names layers the package lacks: {sorted(set(ALLOWED) - layers)}"


# The check itself: each case is a module as it would be written, and what must be reported.
@pytest.mark.parametrize("relpath, source, reported", [
    # snapshot/checkpoint.py before issue 14 built machines itself
    ("snapshot/checkpoint.py", "from ..runtime.process import Machine\n",
     "python/vmmpy/snapshot/checkpoint.py line 1: `from ..runtime.process import Machine`: snapshot imports runtime"),
    ("snapshot/checkpoint.py", "import time\n\nfrom ..devices.uart import CaptureConsole\n",
     "python/vmmpy/snapshot/checkpoint.py line 3: `from ..devices.uart import CaptureConsole`: snapshot imports devices"),
    # peers on one line
    ("migration/source.py", "from ..snapshot import files\n", "`from ..snapshot import files`: migration imports snapshot"),
    ("snapshot/files.py", "import vmmpy.migration.protocol as P\n", "`import vmmpy.migration.protocol as P`: snapshot imports migration"),
    # a type-only import counts: state/ once named runtime's Machine under TYPE_CHECKING
    ("state/kernel.py", "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from ..runtime.process import Machine\n",
     "python/vmmpy/state/kernel.py line 3: `from ..runtime.process import Machine`: state imports runtime"),
    # imports inside functions, absolute spellings, ``from .. import module``
    ("vmm/vm.py", "def f():\n    from vmmpy.devices import pci\n", "line 2: `from vmmpy.devices import pci`: vmm imports devices"),
    ("runtime/process.py", "from .. import cli\n", "`from .. import cli`: runtime imports cli"),
    ("devices/uart.py", "from ..guest.programs import PROGRAMS\n", "devices imports guest"),
    ("guest/runner.py", "from ..runtime.config import VmConfig\n", "guest imports runtime"),
    # guest programs are put in by the caller's loader: the runtime never imports them
    ("runtime/commands.py", "from ..guest.programs import load_into\n", "runtime imports guest"),
    # the package's face (``vmmpy.Vm``) is above everything but cli's peers
    ("vmm/vm.py", "def f():\n    from .. import Vm\n", "`from .. import Vm`: vmm imports face"),
    ("memory.py", "from .vmm import ioctl\n", "`from .vmm import ioctl`: memory imports vmm"),
    ("migration/__init__.py", "from ..runtime import guest_handle\n", "migration imports runtime (vmmpy.runtime.guest_handle)"),
    ("newlayer/thing.py", "import os\n", "layer 'newlayer' is not in the layer table"),
])
def test_an_import_against_the_layers_is_reported_with_its_file_and_line(relpath, source, reported):
    problems = import_violations(relpath, source)
    assert len(problems) == 1 and reported in problems[0], problems


@pytest.mark.parametrize("relpath, source", [
    ("cli/vmmrun.py", "from ..guest.programs import PROGRAMS\nfrom ..runtime.commands import MachineCommands\n"),
    ("runtime/commands.py", "from ..snapshot.checkpoint import checkpoint_guest\nfrom ..migration import Destination\n"),
    ("migration/destination.py", "from . import protocol as P\nfrom ..state.handle import GuestHandle\nfrom ..memory import PageBatchError\n"),
    ("snapshot/files.py", "from .. import _core\nfrom ..memory import GuestMemory\n\ndef f():\n    from .. import __version__\n"),
    ("state/kernel.py", "from ..vmm.vlapic import VlapicState\nfrom .section import Section\n"),
    ("guest/programs/rndtest.py", "from ...devices.virtio_rnd import SeededStream\nfrom ...units import parse_size\nfrom ..asm import Program\n"),
    ("__init__.py", "from .memory import GuestMemory\nfrom .units import parse_size\n"),
    ("vmm/vm.py", "import os\nimport numpy\nfrom .. import _core\n"),
])
def test_imports_the_layers_allow_pass(relpath, source):
    assert import_violations(relpath, source) == []


@pytest.mark.parametrize("package", ["vmmpy", "vmmpy.migration"])
def test_every_name_a_package_offers_resolves_once_and_is_in_its_all(package):
    """A package's lazy names (``_LAZY``) are imported only on first use, so a misspelt one would
    fail only then: each is in ``__all__``, every name of ``__all__`` resolves, and dir() names
    each once."""
    module = importlib.import_module(package)
    assert set(module._LAZY) <= set(module.__all__)
    for name in module.__all__:
        assert getattr(module, name) is not None, name
    names = dir(module)
    assert len(names) == len(set(names)) and set(module.__all__) <= set(names)
