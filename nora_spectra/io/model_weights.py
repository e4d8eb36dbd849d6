"""A safetensors model (a base model, or a fully fine-tuned one): one file or shards, one tensor at a time.

Accepted layouts (Hugging Face's ``save_pretrained`` writes both):

* a single ``.safetensors`` file;
* a sharded model: ``model.safetensors.index.json`` (``{"weight_map": {tensor: shard file}}``) beside
  its shards; the index file itself may be given;
* a directory holding either (``model.safetensors.index.json`` first, then ``model.safetensors``, then
  the only ``*.safetensors.index.json`` or the only ``*.safetensors`` file).

:func:`open_model_weights` validates everything from the index and the shard headers (every shard
named by the index exists, parses and holds the tensors the index places there) before any tensor is
read; :meth:`ModelWeights.read` then reads one tensor (float64, upcast chunk by chunk into the result),
so memory stays near one matrix, not the model. :meth:`ModelWeights.digest` is a content hash of one
tensor's stored bytes: the key of the on-disk cache of base-model SVDs (:mod:`nora_spectra.svd_cache`).
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterator

import numpy as np

from nora_core.parsing import ParseError, read_json
from nora_spectra.errors import CheckpointError
from nora_spectra.io.safetensors_file import (
    FLOAT_DTYPES,
    SafetensorsFile,
    TensorInfo,
    check_readable,
    raw_dtype,
    upcast,
)

if TYPE_CHECKING:  # pragma: no cover
    import hashlib

__all__ = [
    "INDEX_NAME",
    "SINGLE_NAME",
    "MAX_INDEX_BYTES",
    "ModelWeights",
    "is_float_matrix",
    "is_model_layout",
    "open_model_weights",
]

#: the index of a sharded model, as ``save_pretrained`` names it.
INDEX_NAME = "model.safetensors.index.json"
#: a single-file model, as ``save_pretrained`` names it.
SINGLE_NAME = "model.safetensors"
#: an index larger than this is refused (real ones are well under 1 MB; the header limit is 100 MB).
MAX_INDEX_BYTES = 100_000_000
#: elements read and upcast at a time (32 MiB of float64): bounds the memory a read needs beyond its result.
_CHUNK_ELEMENTS = 1 << 22
#: bumped whenever what a digest covers changes, so old cache entries are never mistaken for new ones.
_DIGEST_VERSION = b"nora-spectra tensor digest v1\0"


@dataclass(frozen=True)
class _Placement:
    """Where one tensor of the model lives."""

    file: SafetensorsFile
    info: TensorInfo


class ModelWeights:
    """A validated safetensors model: tensor names, shapes and dtypes, read lazily one tensor at a time.

    Attributes:
        path: the path the user gave (file, index or directory).
        index_path: the ``*.safetensors.index.json`` read, or None for a single file.
        files: the opened shard files, in index order (one for a single file).
        metadata: the first file's header ``__metadata__``.

    Use :func:`open_model_weights`; the constructor takes already-validated parts.
    """

    def __init__(self, path: str, index_path: str | None, placements: dict[str, _Placement]) -> None:
        self.path = path
        self.index_path = index_path
        self._placements = placements
        files: dict[str, SafetensorsFile] = {}
        for placement in placements.values():
            files.setdefault(placement.file.path, placement.file)
        self.files = list(files.values())
        self.metadata: dict[str, str] = dict(self.files[0].metadata) if self.files else {}
        self._weights_by_suffix: dict[str, list[str]] | None = None

    # ------------------------------------------------------------------ TensorSource

    def keys(self) -> list[str]:
        """Tensor names, in index (or header) order."""
        return list(self._placements)

    def __contains__(self, name: object) -> bool:
        return name in self._placements

    def __len__(self) -> int:
        return len(self._placements)

    def info(self, name: str) -> TensorInfo:
        """The :class:`TensorInfo` of tensor ``name`` (``KeyError`` if absent)."""
        return self._placements[name].info

    def file_of(self, name: str) -> str:
        """The path of the file holding tensor ``name``."""
        return self._placements[name].file.path

    def read(self, name: str) -> np.ndarray:
        """Read one tensor, upcast exactly to float64, in its stored shape (:meth:`SafetensorsFile.read`:
        block by block into the result, so reading costs the float64 tensor and one small block).

        Raises:
            CheckpointError: a non-float dtype, or the file cannot be read or changed since its header was
                validated.
        """
        return self._placements[name].file.read(name)

    def read_with_digest(self, name: str) -> tuple[np.ndarray, str]:
        """:meth:`read` and :meth:`digest` of one tensor in a single pass over its bytes."""
        hasher = self._hasher(name)
        out = np.empty(self.info(name).numel, dtype=np.float64)
        for start, chunk in self._chunks(name, hasher):
            out[start : start + chunk.size] = chunk
        return out.reshape(self.info(name).shape), hasher.hexdigest()

    def subtract_from(self, name: str, out: np.ndarray) -> np.ndarray:
        """``out -= tensor`` in place, chunk by chunk (``out`` float64, C-contiguous, as many elements)."""
        flat = out.reshape(-1)
        assert flat.size == self.info(name).numel and np.shares_memory(flat, out)
        for start, chunk in self._chunks(name):
            flat[start : start + chunk.size] -= chunk
        return out

    def digest(self, name: str) -> str:
        """A content hash of tensor ``name``: BLAKE2b-160 of its dtype, shape and stored bytes.

        Two tensors with the same digest hold the same values, whatever file or model they come from,
        so a result derived from one (its SVD) is valid for the other. The bytes are read in chunks:
        memory stays bounded whatever the tensor's size.

        Raises:
            CheckpointError: the file cannot be read or changed size since its header was validated.
        """
        hasher = self._hasher(name)
        for _ in self._chunks(name, hasher, upcast_chunks=False):
            pass
        return hasher.hexdigest()

    def _hasher(self, name: str) -> "hashlib._Hash":
        info = self.info(name)
        import hashlib  # only when a base's content key is computed

        hasher = hashlib.blake2b(digest_size=20)
        hasher.update(_DIGEST_VERSION)
        hasher.update(json.dumps([info.dtype, list(info.shape)]).encode())
        return hasher

    def _chunks(
        self, name: str, hasher: "hashlib._Hash | None" = None, *, upcast_chunks: bool = True
    ) -> Iterator[tuple[int, np.ndarray]]:
        """``(first element, float64 chunk)`` over tensor ``name``, read sequentially; feeds ``hasher``."""
        placement = self._placements[name]
        info, path = placement.info, placement.file.path
        check_readable(path, info)
        stored = raw_dtype(info.dtype)
        try:
            with open(path, "rb") as handle:
                handle.seek(info.start)
                done = 0
                while done < info.numel:
                    count = min(_CHUNK_ELEMENTS, info.numel - done)
                    raw = np.fromfile(handle, dtype=stored, count=count)
                    if raw.size != count:
                        raise CheckpointError(path, f"truncated while reading tensor {name!r}")
                    if hasher is not None:
                        hasher.update(raw)
                    yield done, (upcast(raw, info.dtype) if upcast_chunks else raw)
                    done += count
        except OSError as exc:
            raise CheckpointError(path, f"cannot read tensor {name!r}: {exc.strerror or exc}") from exc

    # ------------------------------------------------------------------ module names -> tensors

    def resolve(self, module: str) -> str | None:
        """The tensor holding module ``module``'s weight, or None when there is none (or it is ambiguous).

        Tried in order: ``<module>.weight``; ``<module>`` itself; the one tensor named
        ``<prefix>.<module>.weight`` (a base saved with an extra leading prefix, e.g. ``model.``); then the
        same with the module's leading name components dropped one at a time (an adapter naming modules
        with an extra prefix, e.g. diffusers' ``unet.``). Only components without digits are dropped and
        never the one before a layer index, so ``model.layers.1.q_proj`` can become ``layers.1.q_proj``
        but never ``1.q_proj`` or ``q_proj``. A suffix that two tensors share is not a match.
        """
        if f"{module}.weight" in self._placements:
            return f"{module}.weight"
        if module in self._placements:
            return module
        parts = module.split(".")
        for start in range(len(parts)):
            if start and (any(c.isdigit() for c in parts[start - 1]) or parts[start].isdigit()):
                return None
            found = self._by_suffix().get(".".join(parts[start:]), [])
            if len(found) == 1:
                return found[0]
            if len(found) > 1:
                return None
        return None

    def _by_suffix(self) -> dict[str, list[str]]:
        """``module suffix -> [tensor names]`` over every ``*.weight`` tensor (built once)."""
        if self._weights_by_suffix is None:
            index: dict[str, list[str]] = {}
            for name in self._placements:
                if not name.endswith(".weight"):
                    continue
                parts = name[: -len(".weight")].split(".")
                for start in range(len(parts)):
                    index.setdefault(".".join(parts[start:]), []).append(name)
            self._weights_by_suffix = index
        return self._weights_by_suffix


def is_model_layout(path: str) -> bool:
    """True when ``path`` is laid out as a safetensors model (a cheap test, no file is parsed).

    A ``.safetensors`` file, a ``*.safetensors.index.json`` file, or a directory holding
    ``model.safetensors.index.json`` or ``model.safetensors`` (and no ``adapter_config.json``).
    """
    if os.path.isfile(path):
        return path.endswith((".safetensors", ".safetensors.index.json"))
    if os.path.isdir(path):
        if os.path.isfile(os.path.join(path, "adapter_config.json")):
            return False
        return any(os.path.isfile(os.path.join(path, name)) for name in (INDEX_NAME, SINGLE_NAME))
    return False


def open_model_weights(path: "str | os.PathLike[str] | ModelWeights") -> ModelWeights:
    """Open and validate a safetensors model without reading any tensor.

    Args:
        path: a ``.safetensors`` file, a ``*.safetensors.index.json`` file, a model directory, or an
            already-opened :class:`ModelWeights` (returned as is).

    Returns:
        The :class:`ModelWeights`.

    Raises:
        CheckpointError: the path is missing, holds no safetensors model, or: an index that is not JSON,
            not an object or without a ``weight_map`` of tensor names to shard file names; a shard name
            that is a path; a shard that is missing or corrupt (the shard is named); a tensor the index
            places in a shard that does not hold it. The message starts with the file at fault.
    """
    if isinstance(path, ModelWeights):
        return path
    path = os.fspath(path)
    if not os.path.exists(path):
        raise CheckpointError(path, "no such file or directory")
    if os.path.isdir(path):
        target = _model_file_in(path)
    elif os.path.isfile(path):
        target = path
    else:
        raise CheckpointError(path, "not a regular file or directory")
    if target.endswith(".index.json"):
        return ModelWeights(path, target, _sharded(target))
    if target.endswith((".bin", ".pt", ".pth", ".ckpt")):
        raise CheckpointError(target, "a torch pickle is not supported as a model: save the model as safetensors")
    single = SafetensorsFile(target)
    placements = {name: _Placement(single, single.info(name)) for name in single.keys()}
    if not placements:
        raise CheckpointError(target, "the model file holds no tensors")
    return ModelWeights(path, None, placements)


def _model_file_in(directory: str) -> str:
    """The index or the single safetensors file of a model directory (see the module docstring)."""
    for name in (INDEX_NAME, SINGLE_NAME):
        if os.path.isfile(os.path.join(directory, name)):
            return os.path.join(directory, name)
    try:
        entries = sorted(os.listdir(directory))
    except OSError as exc:
        raise CheckpointError(directory, f"cannot list directory: {exc.strerror or exc}") from exc
    for suffix in (".safetensors.index.json", ".safetensors"):
        found = [e for e in entries if e.endswith(suffix) and os.path.isfile(os.path.join(directory, e))]
        if len(found) == 1:
            return os.path.join(directory, found[0])
        if found:
            raise CheckpointError(
                directory, f"several {suffix} files and no {INDEX_NAME} ({', '.join(found[:4])}): pass one file"
            )
    shown = ", ".join(entries[:5]) or "nothing"
    raise CheckpointError(directory, f"no safetensors model: expected {INDEX_NAME} or {SINGLE_NAME} (found {shown})")


#: a shard file name: no directory part, no parent reference.
_SHARD_NAME = re.compile(r"^[^/\\]+$")


def _sharded(index_path: str) -> dict[str, _Placement]:
    """Validate a sharded model's index and the headers of every shard it names."""
    try:
        size = os.path.getsize(index_path)
        if size > MAX_INDEX_BYTES:
            raise CheckpointError(index_path, f"index of {size} bytes exceeds the {MAX_INDEX_BYTES // 1_000_000} MB limit")
        index = read_json(index_path, max_bytes=MAX_INDEX_BYTES)
    except OSError as exc:
        raise CheckpointError(index_path, f"cannot read the index: {exc.strerror or exc}") from None
    except ParseError as exc:
        raise CheckpointError(index_path, f"invalid index: {exc.problem}") from None
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(index_path, "invalid index: expected an object with a non-empty 'weight_map'")
    directory = os.path.dirname(os.path.abspath(index_path))
    shards: dict[str, SafetensorsFile] = {}
    placements: dict[str, _Placement] = {}
    for tensor, shard in weight_map.items():
        if not isinstance(shard, str) or not _SHARD_NAME.match(shard) or shard in (".", ".."):
            raise CheckpointError(
                index_path, f"invalid index: tensor {tensor!r} maps to {shard!r}, not a file name in the model directory"
            )
        if shard not in shards:
            shard_path = os.path.join(directory, shard)
            if not os.path.isfile(shard_path):
                raise CheckpointError(shard_path, f"missing shard: the index {os.path.basename(index_path)} names it")
            shards[shard] = SafetensorsFile(shard_path)
        file = shards[shard]
        if tensor not in file:
            raise CheckpointError(file.path, f"inconsistent shard: the index places tensor {tensor!r} here but it is absent")
        placements[tensor] = _Placement(file, file.info(tensor))
    return placements


def is_float_matrix(info: TensorInfo) -> bool:
    """True for a floating-point tensor with at least two dimensions and no empty one."""
    return info.dtype in FLOAT_DTYPES and len(info.shape) >= 2 and math.prod(info.shape) > 0
