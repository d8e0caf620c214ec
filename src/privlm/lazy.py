"""Package namespaces filled on first use: importing one light submodule of a package (a command's CLI module,
say) must not import its torch-heavy siblings through the package's ``__init__``.

``lazy_exports(__name__, {name: module}, submodules=(...))`` at the end of a package's ``__init__`` makes
``package.name`` (and ``from package import name``) import ``module`` and return its attribute ``name`` (for a
name in ``submodules``: the submodule ``package.name`` itself) at the first use, then keep it. A public name that is also a submodule's name (``pi.census``
the function, ``pi/census.py`` the module) stays the exported object even when the submodule is imported first.
See the data model's "Customizing module attribute access" (a module's ``__class__`` may be a subclass).
"""
from __future__ import annotations

import importlib
import sys
import types
from typing import Any


class _LazyPackage(types.ModuleType):
    __lazy_exports__: dict[str, str]

    def __getattr__(self, name: str) -> Any:  # only for names not yet in the namespace
        module = self.__dict__.get("__lazy_exports__", {}).get(name)
        if name in self.__dict__.get("__lazy_submodules__", ()):
            return importlib.import_module(f"{self.__name__}.{name}")  # the import binds it here
        if module is None:
            raise AttributeError(f"module {self.__name__!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(module), name)
        self.__dict__[name] = value
        return value

    def __setattr__(self, name: str, value: Any) -> None:
        # the import system binds a loaded submodule on its package: keep an exported name of the same spelling
        if (isinstance(value, types.ModuleType) and value.__name__ == f"{self.__name__}.{name}"
                and name in self.__dict__.get("__lazy_exports__", {})):
            value = getattr(value, name)
        super().__setattr__(name, value)

    def __dir__(self) -> list[str]:
        return sorted(set(self.__dict__) | set(self.__dict__.get("__lazy_exports__", {}))
                      | set(self.__dict__.get("__lazy_submodules__", ())))


def lazy_exports(package: str, exports: dict[str, str], submodules: tuple[str, ...] = ()) -> None:
    """Make ``package``'s names in ``exports`` (name → the module defining it) and its ``submodules`` import on
    first use."""
    module = sys.modules[package]
    module.__dict__["__lazy_exports__"] = dict(exports)
    module.__dict__["__lazy_submodules__"] = tuple(submodules)
    module.__class__ = _LazyPackage
