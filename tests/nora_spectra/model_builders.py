"""Builders of small safetensors models (single file or sharded with an index) for the base-aware tests."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import numpy as np

from tests.nora_spectra.io_builders import write_numpy

__all__ = ["write_model", "write_sharded"]


def write_model(path: Path, tensors: dict[str, np.ndarray]) -> Path:
    """A single-file model at ``path`` (a ``.safetensors`` file, or ``path/model.safetensors`` for a directory)."""
    if path.suffix != ".safetensors":
        path.mkdir(parents=True, exist_ok=True)
        write_numpy(path / "model.safetensors", tensors)
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_numpy(path, tensors)


def write_sharded(directory: Path, tensors: dict[str, np.ndarray], shards: Sequence[Sequence[str]]) -> Path:
    """A sharded model: ``model-0000i-of-0000n.safetensors`` holding the names of ``shards[i]``, plus the index."""
    directory.mkdir(parents=True, exist_ok=True)
    weight_map = {}
    for i, names in enumerate(shards, start=1):
        file = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        write_numpy(directory / file, {name: tensors[name] for name in names})
        weight_map.update({name: file for name in names})
    index = {"metadata": {"total_size": 0}, "weight_map": weight_map}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index))
    return directory
