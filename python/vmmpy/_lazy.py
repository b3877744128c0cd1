"""Names a package offers but imports only on first use (PEP 562), so that importing it stays
light: ``import vmmpy`` loads neither numpy nor the core, ``vmmpy.migration`` not its engines;
and modules imported on first use (:func:`lazy_module`): numpy takes 100 ms of a process that
restores a guest without ever needing it."""

from __future__ import annotations

from collections.abc import Callable
from importlib import import_module
from typing import Any


def lazy_names(package: str, table: dict[str, tuple[str, str]], namespace: dict[str, Any]) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """The module ``__getattr__`` and ``__dir__`` of ``package`` (its ``__name__``) for ``table``:
    name -> (module relative to the package, attribute). A name is imported on first use and then
    kept in ``namespace`` (the package's globals), so it is looked up once."""

    def __getattr__(name: str) -> Any:
        try:
            module, attr = table[name]
        except KeyError:
            raise AttributeError(f"module {package!r} has no attribute {name!r}") from None
        value = getattr(import_module(module, package), attr)
        namespace[name] = value
        return value

    def __dir__() -> list[str]:
        return sorted({*namespace, *table})

    return __getattr__, __dir__


class _LazyModule:
    """Stands for a module until an attribute is first asked of it; each attribute is then kept
    on the stand-in, so later lookups cost what a module's do."""

    def __init__(self, name: str) -> None:
        self._name = name

    def __getattr__(self, attr: str) -> Any:
        value = getattr(import_module(self._name), attr)
        setattr(self, attr, value)
        return value

    def __repr__(self) -> str:
        return f"<module {self._name!r}, imported on first use>"


def lazy_module(name: str) -> Any:
    """A stand-in for module ``name`` that imports it when one of its attributes is first used
    (``np = lazy_module("numpy")``; type checkers should see the real import)."""
    return _LazyModule(name)
