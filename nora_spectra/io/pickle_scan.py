"""Find the globals a torch pickle refers to, by reading its opcodes: nothing is unpickled or run.

A state dict saved by ``torch.save`` (zip format: ``<name>/data.pkl``; legacy: a few pickles in a row)
refers only to a handful of globals: ``collections.OrderedDict``, ``torch._utils._rebuild_tensor_v2``
and storage classes such as ``torch.BFloat16Storage``. A pickle that names anything else
(``posix.system``, ``builtins.eval``, ...) would run code when unpickled. Spotting that here lets us
refuse such a file at once, with a message naming the global, without importing torch (about a
second). This is a fast path, not the security boundary: what passes is still loaded only with
``torch.load(weights_only=True)``, so a pickle that hides its globals from this scan is refused there.
"""

from __future__ import annotations

import io
import os
import pickletools
import re
import zipfile

__all__ = ["ALLOWED_GLOBALS", "forbidden_globals", "pickle_globals", "pickle_strings"]

#: (module, name) pairs a tensor state dict may use; torch storage classes are matched by pattern.
ALLOWED_GLOBALS = frozenset(
    {
        ("collections", "OrderedDict"),
        ("torch._utils", "_rebuild_tensor_v2"),
        ("torch._utils", "_rebuild_parameter"),
        ("torch", "Size"),
    }
)
_STORAGE = re.compile(r"[A-Za-z0-9]*Storage")
_STRING_OPS = frozenset({"SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE", "SHORT_BINSTRING", "BINSTRING"})
_LEGACY_PICKLES = 4  # magic number, protocol version, system info, the object (then raw storage bytes)


def _allowed(module: str, name: str) -> bool:
    return (module, name) in ALLOWED_GLOBALS or (module == "torch" and _STORAGE.fullmatch(name) is not None)


def _globals_of(stream: io.BufferedIOBase) -> list[tuple[str, str]]:
    """Globals named by one pickle read from ``stream`` (``STACK_GLOBAL`` only when its operands are literal)."""
    found: list[tuple[str, str]] = []
    strings: list[str] = []
    for opcode, arg, _ in pickletools.genops(stream):
        if opcode.name == "GLOBAL":
            module, _, name = str(arg).partition(" ")
            found.append((module, name))
        elif opcode.name == "STACK_GLOBAL" and len(strings) >= 2:
            found.append((strings[-2], strings[-1]))
        if opcode.name in _STRING_OPS:
            strings.append(str(arg))
        elif opcode.name not in ("MEMOIZE", "BINPUT", "LONG_BINPUT", "PUT"):
            strings.clear()  # operands of STACK_GLOBAL must be the two pushes right before it
    return found


def pickle_globals(path: str | os.PathLike[str]) -> list[tuple[str, str]]:
    """The ``(module, name)`` globals the torch checkpoint at ``path`` refers to, as far as readable.

    Returns:
        The globals found; an unreadable or truncated pickle yields those found before the damage
        (the caller's ``torch.load`` reports the damage itself).
    """
    found: list[tuple[str, str]] = []
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as archive:
                for member in archive.namelist():
                    if member.endswith(".pkl"):
                        found += _globals_of(io.BytesIO(archive.read(member)))
            return found
        with open(path, "rb") as handle:
            for _ in range(_LEGACY_PICKLES):
                found += _globals_of(handle)
    except Exception:  # noqa: BLE001 - a damaged file: report what was read; torch.load says the rest
        pass
    return found


def pickle_strings(path: str | os.PathLike[str], limit: int = 100_000) -> list[str]:
    """The string constants of the torch checkpoint's pickle (a state dict's keys among them), read from its
    opcodes without unpickling anything or touching the tensor data; at most ``limit`` of them.

    Returns:
        The strings found (``[]`` for a file that is not a readable pickle).
    """
    found: list[str] = []

    def scan(stream: io.BufferedIOBase) -> None:
        if len(found) >= limit:
            return
        for opcode, arg, _ in pickletools.genops(stream):
            if opcode.name in _STRING_OPS:
                found.append(str(arg))
                if len(found) >= limit:
                    return

    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as archive:
                for member in archive.namelist():
                    if member.endswith("data.pkl"):
                        scan(io.BytesIO(archive.read(member)))
            return found
        with open(path, "rb") as handle:
            for _ in range(_LEGACY_PICKLES):
                scan(handle)
    except Exception:  # noqa: BLE001 - a damaged or foreign file: what was read is all there is
        pass
    return found


def forbidden_globals(path: str | os.PathLike[str]) -> list[str]:
    """``module.name`` of every global in the pickle at ``path`` that a tensor state dict never uses."""
    return sorted({f"{m}.{n}" for m, n in pickle_globals(path) if not _allowed(m, n)})
