"""Builders of small adapter checkpoints for the io tests (PEFT layout, bare files, raw safetensors)."""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["raw_safetensors", "write_raw", "write_numpy", "write_config", "peft_dir", "lora_tensors"]

PREFIX = "base_model.model."


def raw_safetensors(header: Any, data: bytes = b"", header_len: int | None = None) -> bytes:
    """Bytes of a safetensors file with an arbitrary (possibly broken) header.

    Args:
        header: a JSON-able object, or raw bytes used verbatim as the header.
        data: the data region.
        header_len: the length written in the first 8 bytes (default: the true length).
    """
    blob = header if isinstance(header, bytes) else json.dumps(header).encode()
    length = len(blob) if header_len is None else header_len
    return struct.pack("<Q", length) + blob + data


def write_raw(path: Path, header: Any, data: bytes = b"", header_len: int | None = None) -> Path:
    """Write :func:`raw_safetensors` to ``path`` and return it."""
    path.write_bytes(raw_safetensors(header, data, header_len))
    return path


def write_numpy(path: Path, tensors: dict[str, np.ndarray]) -> Path:
    """Save numpy arrays with the official ``safetensors.numpy`` writer."""
    from safetensors.numpy import save_file

    save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(path))
    return path


def write_config(directory: Path, **fields: Any) -> Path:
    """Write ``adapter_config.json`` (peft_type LORA, r 8, lora_alpha 16 unless overridden)."""
    config = {"peft_type": "LORA", "r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"]}
    config.update(fields)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "adapter_config.json"
    path.write_text(json.dumps(config))
    return path


def lora_tensors(
    shapes: dict[str, tuple[int, int, int]], *, prefix: str = PREFIX, dtype: Any = np.float32, seed: int = 0
) -> dict[str, np.ndarray]:
    """Random factor pairs: module -> (d_out, d_in, r) gives ``lora_A.weight`` (r, d_in), ``lora_B.weight`` (d_out, r)."""
    rng = np.random.default_rng(seed)
    out = {}
    for module, (d_out, d_in, r) in shapes.items():
        out[f"{prefix}{module}.lora_A.weight"] = rng.standard_normal((r, d_in)).astype(dtype)
        out[f"{prefix}{module}.lora_B.weight"] = rng.standard_normal((d_out, r)).astype(dtype)
    return out


def peft_dir(directory: Path, tensors: dict[str, np.ndarray], **config: Any) -> Path:
    """A PEFT-layout directory: ``adapter_config.json`` + ``adapter_model.safetensors``."""
    write_config(directory, **config)
    write_numpy(directory / "adapter_model.safetensors", tensors)
    return directory
