"""Writing resized checkpoints: the writer interface of a format, and a streaming safetensors writer.

A format that ``spectra resize`` can write gives its :class:`~nora_spectra.io.registry.Format` a
``resize`` :class:`ResizeWriter`: ``check(checkpoint)`` refuses, before any tensor is read, what this
format cannot resize (a NoRA adapter, DoRA layers); ``open(checkpoint, dtype)`` returns a
:class:`ResizeSink` that takes each module's :class:`ResizedModule` as soon as it is computed (the new
factors in the orientation of :mod:`nora_spectra.updates`: ``scale * B @ A`` with the scale the reader
gave) and stores it in the output's dtype at once, so the float64 factors never pile up; its
``write(target)`` then writes the new checkpoint into ``target`` (a temporary directory or an open file,
made atomic by :mod:`nora_spectra.outputs`). Formats without a writer are refused by ``spectra resize``
with a message naming those that have one.

:func:`encode` turns float64 factors into the bytes of a stored dtype (bfloat16 rounded to nearest,
ties to even, directly from float64: no double rounding through float32), and
:func:`write_safetensors` streams tensors into a file (header padded to 8 bytes, tensors ordered by
item size so that each one is aligned); a tensor copied from the input is read only when it is written.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING, Callable, Protocol, Sequence, Union

import numpy as np

from nora_spectra.io.safetensors_file import DTYPES

if TYPE_CHECKING:  # pragma: no cover
    from nora_spectra.io.checkpoint import Checkpoint

__all__ = [
    "ENCODABLE",
    "OutTensor",
    "ResizeSink",
    "ResizeWriter",
    "ResizedModule",
    "WriteResult",
    "encode",
    "raw_tensor",
    "write_safetensors",
]

#: safetensors dtype tags :func:`encode` writes, with their numpy storage types.
ENCODABLE: dict[str, str] = {"F64": "<f8", "F32": "<f4", "F16": "<f2", "BF16": "<u2"}

#: readable dtype name (``"bfloat16"``) -> safetensors tag (``"BF16"``), for ``--dtype``.
TAG_OF_NAME: dict[str, str] = {DTYPES[tag][1]: tag for tag in ENCODABLE}


@dataclass(frozen=True, eq=False)
class ResizedModule:
    """One module of a resized checkpoint.

    Attributes:
        module: the module name (``ModuleEntry.module``).
        rank: the new rank ``k``.
        A: ``(k, d_in)`` float64 new down factor, or None when the module is unchanged (its stored
            tensors are copied byte for byte).
        B: ``(d_out, k)`` float64 new up factor, or None when unchanged.

    ``scale * B @ A`` (the module's scale as the reader gave it) is the best rank-``k`` approximation.
    """

    module: str
    rank: int
    A: np.ndarray | None = None
    B: np.ndarray | None = None

    @property
    def unchanged(self) -> bool:
        """The module keeps its stored factors."""
        return self.A is None


@dataclass
class WriteResult:
    """What a writer wrote.

    Attributes:
        weights: the weights file's name inside a directory target; None when the target is the file.
        module_bytes: module -> ``(bytes of its stored factors before, after)``.
        notes: remarks for the report (e.g. how alpha was chosen).
    """

    weights: str | None
    module_bytes: dict[str, tuple[int, int]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


class ResizeSink(Protocol):
    """Where a format collects a resized checkpoint, module by module, before writing it."""

    def add(self, module: ResizedModule) -> None:
        """Take one module (its factors are stored in the output dtype now; the float64 ones can go)."""

    def write(self, target: "Path | IO[bytes]") -> WriteResult:
        """Write the checkpoint into ``target``: a directory (``output == "directory"``) or an open file."""


@dataclass(frozen=True)
class ResizeWriter:
    """How ``spectra resize`` writes one format.

    Attributes:
        output: ``"directory"`` (the target is a temporary directory renamed into place) or ``"file"``
            (the target is an open binary file).
        check: raises :class:`~nora_spectra.errors.CheckpointError` / ``UsageError`` when this checkpoint
            cannot be resized (before any tensor is read).
        open: ``open(checkpoint, dtype) -> ResizeSink``; ``dtype`` is a safetensors tag for every new
            factor, or None to keep each tensor's stored dtype.
        summary: one line for the docs (what is written and how the scale is kept).
    """

    output: str
    check: Callable[["Checkpoint"], None]
    open: Callable[["Checkpoint", "str | None"], ResizeSink]
    summary: str


@dataclass(frozen=True, eq=False)
class OutTensor:
    """One tensor to write: its key, safetensors dtype tag, shape and stored bytes (or how to read them).

    ``data`` is the bytes, or a callable returning them when the tensor is written (a tensor copied from
    the input is read only then).
    """

    name: str
    dtype: str
    shape: tuple[int, ...]
    data: Union[bytes, Callable[[], bytes]]

    @property
    def nbytes(self) -> int:
        """Stored size: ``prod(shape) * itemsize``."""
        return math.prod(self.shape) * DTYPES[self.dtype][0]

    def payload(self) -> bytes:
        """The stored bytes (checked against :attr:`nbytes`)."""
        data = self.data() if callable(self.data) else self.data
        if len(data) != self.nbytes:  # an internal invariant, not a user error
            raise AssertionError(f"{self.name}: {len(data)} bytes for shape {self.shape} x {self.dtype}")
        return data


def _bfloat16_bits_to_odd(x: np.ndarray) -> np.ndarray:
    """Round-to-nearest-even of float64 to bfloat16 (raw bits), exactly, through float32 rounded to odd.

    float64 to float32 toward zero, with the last bit set when that was inexact; with 16 spare bits
    between the two formats, round-to-odd then round-to-nearest-even equals one direct rounding (Boldo &
    Melquiond, "Emulation of FMA and correctly rounded sums: proved algorithms using rounding to odd", 2008).
    """
    with np.errstate(over="ignore"):
        single = x.astype(np.float32)  # nearest; fixed up to round-to-odd below
    back = single.astype(np.float64)
    bits = single.view(np.uint32)
    inexact = back != x
    bits -= (inexact & (np.abs(back) > np.abs(x))).astype(np.uint32)  # rounded away from zero: step back
    bits |= inexact.astype(np.uint32)  # the sticky bit
    bits += 0x7FFF + ((bits >> 16) & 1)  # nearest, ties to even, on the 16 bits dropped
    return (bits >> 16).astype("<u2")


def _bfloat16_bits(x: np.ndarray) -> np.ndarray:
    """IEEE round-to-nearest-even of float64 values to bfloat16, as raw ``uint16`` bits (flat, C order).

    Fast path: float64 to float32 (nearest), then float32 to bfloat16 (nearest, ties to even, on the 16
    bits dropped). Rounding twice can only go wrong when the first rounding lands exactly on a bfloat16
    midpoint: midpoints are float32 values and rounding is monotonic, so the float32 value cannot cross
    one. Those elements (low 16 bits ``0x8000``, about one in 65536) are redone exactly by
    :func:`_bfloat16_bits_to_odd`.
    """
    x = x.reshape(-1)
    with np.errstate(over="ignore"):
        single = x.astype(np.float32)
    bits = single.view(np.uint32)
    ties = np.flatnonzero((bits & 0xFFFF) == 0x8000)
    out = ((bits + (0x7FFF + ((bits >> 16) & 1))) >> 16).astype("<u2")
    if ties.size:
        out[ties] = _bfloat16_bits_to_odd(x[ties])
    return out


def encode(array: np.ndarray, dtype: str) -> bytes:
    """The stored bytes of ``array`` in safetensors dtype ``dtype`` (C order, little-endian).

    Args:
        array: finite float values (float64 is converted once, correctly rounded).
        dtype: a tag of :data:`ENCODABLE`.

    Raises:
        ValueError: ``dtype`` cannot be written.
    """
    if dtype not in ENCODABLE:
        raise ValueError(f"cannot write dtype {dtype}; writable: {', '.join(ENCODABLE)}")
    values = np.ascontiguousarray(array, dtype=np.float64)
    if dtype == "BF16":
        return _bfloat16_bits(values).tobytes()
    with np.errstate(over="ignore"):
        return values.astype(ENCODABLE[dtype]).tobytes()


def raw_tensor(source: object, name: str) -> OutTensor:
    """A tensor of ``source`` exactly as stored, read when it is written.

    A :class:`~nora_spectra.io.safetensors_file.SafetensorsFile` gives its bytes as they are (any
    dtype); another container (a torch pickle) is read as float64, which every float dtype upcasts to
    exactly, and encoded back to its own dtype, bit for bit.
    """
    from nora_spectra.io.safetensors_file import SafetensorsFile

    info = source.info(name)  # type: ignore[attr-defined]

    def read() -> bytes:
        if isinstance(source, SafetensorsFile):
            data = np.fromfile(source.path, dtype=np.uint8, count=info.nbytes, offset=info.start).tobytes()
            if len(data) != info.nbytes:
                from nora_spectra.errors import CheckpointError

                raise CheckpointError(source.path, f"truncated while reading tensor {name!r}")
            return data
        return encode(source.read(name), info.dtype)  # type: ignore[attr-defined]

    return OutTensor(name, info.dtype, tuple(info.shape), read)


def write_safetensors(handle: IO[bytes], tensors: Sequence[OutTensor], metadata: dict[str, str] | None = None) -> int:
    """Write a safetensors file to ``handle``: header, then every tensor's bytes.

    Tensors are laid out by decreasing item size (stable within a size), so with the header padded to a
    multiple of 8 bytes every tensor starts at a multiple of its item size, as the official writer does.

    Args:
        handle: a binary file open for writing.
        tensors: the tensors (names unique).
        metadata: the header's ``__metadata__`` string map, or None.

    Returns:
        The number of bytes written.
    """
    order = sorted(range(len(tensors)), key=lambda i: -DTYPES[tensors[i].dtype][0])
    header: dict[str, object] = {}
    if metadata:
        header["__metadata__"] = dict(metadata)
    offset = 0
    for i in order:
        tensor = tensors[i]
        if tensor.name in header:
            raise AssertionError(f"tensor {tensor.name!r} written twice")
        header[tensor.name] = {"dtype": tensor.dtype, "shape": list(tensor.shape),
                               "data_offsets": [offset, offset + tensor.nbytes]}
        offset += tensor.nbytes
    blob = json.dumps(header, separators=(",", ":")).encode("utf-8")
    blob += b" " * (-len(blob) % 8)
    handle.write(struct.pack("<Q", len(blob)))
    handle.write(blob)
    for i in order:
        handle.write(tensors[i].payload())
    return 8 + len(blob) + offset
