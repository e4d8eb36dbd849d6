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

__all__ = ["ALLOWED_GLOBALS", "MAX_PICKLE_STRING", "declared_storage_problem", "forbidden_globals", "pickle_globals",
           "pickle_problem", "pickle_strings"]

#: the largest data.pkl whose strings a sniffer reads (a state dict's pickle is kilobytes).
_MAX_SNIFFED_PICKLE = 64 * 2**20

#: the longest string a state-dict pickle may hold (tensor names, storage keys, dtypes are short).
MAX_PICKLE_STRING = 4096

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


def _globals_of(stream: io.BufferedIOBase, found: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """Append to ``found`` the globals named by one pickle read from ``stream`` (``STACK_GLOBAL`` only when
    its operands are literal); those met before a damaged opcode stay in ``found``."""
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
                        _globals_of(io.BytesIO(archive.read(member)), found)
            return found
        with open(path, "rb") as handle:
            for _ in range(_LEGACY_PICKLES):
                _globals_of(handle, found)
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
                for info in archive.infolist():
                    # torch stores members uncompressed; a compressed or huge one (a zip bomb) is not read
                    if info.filename.endswith("data.pkl") and info.compress_type == zipfile.ZIP_STORED \
                            and info.file_size <= _MAX_SNIFFED_PICKLE:
                        scan(io.BytesIO(archive.read(info)))
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


#: bytes per element of torch's storage classes (``torch.FloatStorage`` ...); unknown ones count 16.
_STORAGE_ITEMSIZE = {
    "BoolStorage": 1, "ByteStorage": 1, "CharStorage": 1, "UntypedStorage": 1,
    "ShortStorage": 2, "HalfStorage": 2, "BFloat16Storage": 2,
    "IntStorage": 4, "FloatStorage": 4,
    "LongStorage": 8, "DoubleStorage": 8, "ComplexFloatStorage": 8,
    "ComplexDoubleStorage": 16,
}
_LITERAL_OPS = _STRING_OPS | frozenset({"BININT", "BININT1", "BININT2", "INT", "LONG", "LONG1", "LONG4", "NONE"})


def _storages_of(stream: io.BufferedIOBase) -> dict[str, int]:
    """``key -> declared bytes`` of the storages one pickle refers to (its persistent ids).

    torch writes each storage as the persistent id ``("storage", torch.XStorage, key, location, numel, ...)``,
    built by ``MARK ... TUPLE`` then ``BINPERSID``. Only literal operands are followed (strings, ints,
    globals and the memo); anything else is an opaque value, so a pickle that hides its ids gains
    nothing: ``torch.load`` checks what it actually reads.
    """
    frames: list[list[object]] = [[]]
    memo: dict[object, object] = {}
    found: dict[str, int] = {}
    opaque = object()
    for opcode, arg, _ in pickletools.genops(stream):
        name = opcode.name
        if name == "MARK":
            frames.append([])
        elif name == "TUPLE" and len(frames) > 1:
            items = frames.pop()
            frames[-1].append(tuple(items))
        elif name in _LITERAL_OPS:
            frames[-1].append(arg)
        elif name == "GLOBAL":
            frames[-1].append(("global", str(arg)))
        elif name in ("BINPUT", "LONG_BINPUT", "PUT"):
            memo[arg] = frames[-1][-1] if frames[-1] else opaque
        elif name == "MEMOIZE":
            memo[len(memo)] = frames[-1][-1] if frames[-1] else opaque
        elif name in ("BINGET", "LONG_BINGET", "GET"):
            frames[-1].append(memo.get(arg, opaque))
        elif name == "BINPERSID" and frames[-1]:
            pid = frames[-1][-1]
            if isinstance(pid, tuple) and len(pid) >= 5 and pid[0] == "storage":
                kind = pid[1][1].rpartition(" ")[2] if isinstance(pid[1], tuple) else ""
                numel = pid[4]
                if isinstance(pid[2], str) and isinstance(numel, int):
                    found[pid[2]] = max(numel, 0) * _STORAGE_ITEMSIZE.get(kind, 16)
        else:
            frames[-1].append(opaque)
    return found


def declared_storage_problem(path: str | os.PathLike[str]) -> str | None:
    """Why the tensor storages a torch checkpoint declares cannot be real, or None.

    ``torch.load`` allocates each storage at the size its pickle declares before reading the bytes
    (the legacy format) and a zip member may be compressed, so a file of a few bytes could make it
    allocate terabytes. Checked without unpickling: in a zip checkpoint every member must be stored
    uncompressed (as ``torch.save`` writes them; no member larger than the file) and each storage's
    declared size must equal its ``data/<key>`` member's; in the legacy format the declared storages
    must fit in the file.

    Returns:
        A one-line problem, or None when the sizes are consistent (or the pickle is unreadable: the
        caller's ``torch.load`` reports that itself).
    """
    size = os.path.getsize(path)
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as archive:
                infos = archive.infolist()
                total = sum(info.file_size for info in infos)
                if total > size:
                    return f"its zip members unpack to {total} bytes, more than the file's {size}: not a torch checkpoint"
                members = {info.filename: info.file_size for info in infos}
                for member in members:
                    if not member.endswith("data.pkl"):
                        continue
                    prefix = member[: -len("data.pkl")]
                    for key, nbytes in _storages_of(io.BytesIO(archive.read(member))).items():
                        stored = members.get(f"{prefix}data/{key}")
                        if stored is not None and nbytes > stored:
                            return f"tensor storage {key!r} declares {nbytes} bytes but holds {stored}"
            return None
        with open(path, "rb") as handle:
            declared: dict[str, int] = {}
            for _ in range(_LEGACY_PICKLES):
                declared.update(_storages_of(handle))
        total = sum(declared.values())
        if total > size:
            return f"its tensor storages declare {total} bytes but the file holds only {size}"
    except Exception:  # noqa: BLE001 - a damaged file: torch.load reports it
        return None
    return None


def pickle_problem(path: str | os.PathLike[str]) -> str | None:
    """Why the pickle(s) of a torch checkpoint are not a readable state dict, from their opcodes, or None.

    Every opcode must parse (``pickletools.genops``: a truncated or damaged pickle is refused here, with
    our one-line reason) and no string operand may exceed :data:`MAX_PICKLE_STRING` characters. Both
    keep hostile bytes away from ``torch.load``, whose error path runs regular expressions such as
    ``(\\S+) must be (\\S+) to load`` over its message in quadratic time: a 100 KB run of ``[`` in a
    damaged file kept it busy for minutes.
    """

    def scan(stream: io.BufferedIOBase) -> str | None:
        for opcode, arg, _ in pickletools.genops(stream):
            if isinstance(arg, (str, bytes)) and len(arg) > MAX_PICKLE_STRING:
                return f"its pickle holds a {len(arg)}-character {opcode.name} operand: not a tensor state dict"
        return None

    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as archive:
                for member in archive.namelist():
                    if member.endswith(".pkl"):
                        problem = scan(io.BytesIO(archive.read(member)))
                        if problem:
                            return problem
            return None
        with open(path, "rb") as handle:
            for _ in range(_LEGACY_PICKLES):
                problem = scan(handle)
                if problem:
                    return problem
    except Exception as exc:  # noqa: BLE001 - pickletools raises ValueError and others on damage
        text = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        return f"damaged pickle ({text})"
    return None
