"""PEP 562 lazy attribute loading shared by both packages' ``__init__`` modules.

Importing torch costs about a second and 220 MB, pandas and matplotlib more; a package
``__init__`` that imports nothing until an attribute is used keeps ``spectra --help`` and the
torch-free analysis path fast.
"""

from __future__ import annotations

import importlib
from typing import Any, Callable

__all__ = ["lazy_getattr"]


def lazy_getattr(package: str, exports: dict[str, str]) -> Callable[[str], Any]:
    """Build a module ``__getattr__`` that imports ``exports[name]`` (a submodule) on first use.

    Args:
        package: the package's ``__name__``.
        exports: public name -> submodule (relative to ``package``) that defines it.

    Returns:
        A function suitable as the package's module-level ``__getattr__``.
    """

    def __getattr__(name: str) -> Any:
        try:
            module_name = exports[name]
        except KeyError:
            raise AttributeError(f"module {package!r} has no attribute {name!r}") from None
        value = getattr(importlib.import_module(f"{package}.{module_name}"), name)
        # Cache it, so later lookups skip this function, and so that a submodule that happens to
        # share the name and was bound to the package by its import cannot shadow the export.
        setattr(importlib.import_module(package), name, value)
        return value

    return __getattr__
