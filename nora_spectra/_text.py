"""Small wording helpers shared by messages and reports (counts, name lists, the package version)."""

from __future__ import annotations

import re
from typing import Sequence

__all__ = ["name_list", "one_line", "package_version", "plural"]

_BREAKS = re.compile("[\x00-\x1f\x7f\x85\u2028\u2029]")


def one_line(text: str) -> str:
    """``text`` with control characters and line breaks escaped (``\\n``, ``\\x00``, ``\\u2028``), so a
    message that quotes a hostile name (a tensor key holding a newline) stays one line on stderr."""
    return _BREAKS.sub(lambda m: m.group().encode("unicode_escape").decode("ascii"), text)


def plural(n: int, word: str) -> str:
    """``"1 layer"``, ``"3 layers"``."""
    return f"{n} {word}{'' if n == 1 else 's'}"


def name_list(names: Sequence[str], limit: int = 3, sep: str = ", ") -> str:
    """The first ``limit`` names, then how many more: ``"a, b, c, ... (+4 more)"`` (``sep`` between items)."""
    shown = sep.join(names[:limit])
    return shown + (f"{sep}... (+{len(names) - limit} more)" if len(names) > limit else "")


def package_version() -> str:
    """The nora-spectra version (``nora_spectra/_version.py``, which ``pyproject.toml`` reads too).

    A constant rather than ``importlib.metadata.version``: that import and lookup cost about 20 ms of
    every ``spectra`` command's start-up, and a source tree without installed metadata knows it too.
    """
    from nora_spectra._version import __version__

    return __version__
