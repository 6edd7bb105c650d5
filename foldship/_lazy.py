"""Packages whose public names are imported on first use (PEP 562), so that the ONNX timing side
(``foldship bench RUN_DIR``, ``foldship validate RUN_DIR --latency``) imports neither PyTorch nor
anything else the compression stack needs: an edge install may not have them at all.
"""
from __future__ import annotations

import importlib
import sys
import types


class LazyPackage(types.ModuleType):
    """A package module whose ``_lazy_exports`` ({public name: submodule}) load when first read."""

    _lazy_exports: dict[str, str]

    def __getattr__(self, name: str):
        exports = self.__dict__.get("_lazy_exports", {})
        if name not in exports:
            raise AttributeError(f"module {self.__name__!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(exports[name], self.__name__), name)
        self.__dict__[name] = value
        return value

    def __setattr__(self, name: str, value) -> None:
        # The import system binds every loaded submodule to its name on the package. Where a public
        # function has that name (foldship.compress, foldship.pipeline.build), the function keeps it,
        # as it did when the package imported its names eagerly.
        if isinstance(value, types.ModuleType) and name in self.__dict__.get("_lazy_exports", {}):
            return
        super().__setattr__(name, value)

    def __dir__(self) -> list[str]:
        return sorted(set(super().__dir__()) | set(self._lazy_exports))


def lazy_package(name: str, exports: dict[str, str]) -> None:
    """Make the package ``name`` (call it from its ``__init__``) load each of ``exports`` on first use."""
    module = sys.modules[name]
    module.__class__ = LazyPackage
    module._lazy_exports = exports
