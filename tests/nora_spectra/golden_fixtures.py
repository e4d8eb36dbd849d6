"""Deterministic checkpoints (numpy only) whose ``spectra analyze --format json`` output is pinned.

The golden files in ``tests/nora_spectra/golden/`` were written by this module, before the pipeline
redesign (issue 10), with ``python -m tests.nora_spectra.golden_fixtures --write``. ``test_golden.py``
rebuilds the checkpoints and checks that the JSON is unchanged: byte for byte once every number is
masked, and every number equal to the pinned one up to last-digit float noise (1e-12 relative, or
1e-12 of the layer's largest singular value for singular values).

Every case is built with numpy only (no torch), so the test also runs in a torch-free install.
"""

from __future__ import annotations

import argparse
import json
import math
import struct
from pathlib import Path
from typing import Any, Callable

import numpy as np

__all__ = ["CASES", "GOLDEN_DIR", "build", "analyze_json", "llama_like"]

GOLDEN_DIR = Path(__file__).parent / "golden"
PREFIX = "base_model.model."

#: safetensors dtype tag of each numpy dtype we write (bf16 is written from float32 bits).
_TAGS = {np.dtype(np.float16): "F16", np.dtype(np.float32): "F32", np.dtype(np.float64): "F64"}


def _bf16_bits(values: np.ndarray) -> np.ndarray:
    """Round float32 values to bfloat16 (nearest, ties to even) and return the raw uint16 bits."""
    bits = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32).astype(np.uint64)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    return rounded.astype(np.uint16)


def write_safetensors(path: Path, tensors: dict[str, tuple[str, np.ndarray]], metadata: dict[str, str] | None = None) -> Path:
    """Write ``name -> (tag, array)`` as a safetensors file (``BF16`` arrays are float32 values to round)."""
    header: dict[str, Any] = {}
    blobs = []
    offset = 0
    for name, (tag, array) in tensors.items():
        if tag == "BF16":
            data = _bf16_bits(array).tobytes()
        else:
            data = np.ascontiguousarray(array).astype({"F16": "<f2", "F32": "<f4", "F64": "<f8"}[tag]).tobytes()
        header[name] = {"dtype": tag, "shape": list(array.shape), "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    if metadata is not None:
        header["__metadata__"] = metadata
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(struct.pack("<Q", len(text)) + text + b"".join(blobs))
    return path


def _config(directory: Path, **fields: Any) -> None:
    config = {"peft_type": "LORA", "r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"]}
    config.update(fields)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "adapter_config.json").write_text(json.dumps(config))


def _pair(rng: np.random.Generator, d_out: int, d_in: int, r: int, decay: float = 0.3) -> tuple[np.ndarray, np.ndarray]:
    a = rng.standard_normal((r, d_in)) / math.sqrt(d_in)
    b = rng.standard_normal((d_out, r)) * np.exp(-decay * np.arange(r))
    return a, b


def peft_mixed(root: Path) -> Path:
    """A PEFT LoRA directory with most of what the reader knows: patterns, conv, embedding, DoRA, bias,
    modules_to_save, an all-zero layer, a NaN layer, natural sort, fp16/bf16/fp32 factors."""
    rng = np.random.default_rng(10)
    d = root / "peft_mixed"
    t: dict[str, tuple[str, np.ndarray]] = {}
    for layer in (0, 1, 2, 10):
        for name, (d_out, d_in) in {"self_attn.q_proj": (24, 16), "self_attn.v_proj": (12, 16), "mlp.down_proj": (16, 40)}.items():
            r = 4 if name == "self_attn.v_proj" else 8
            a, b = _pair(rng, d_out, d_in, r)
            tag = "BF16" if layer == 2 else ("F16" if name == "mlp.down_proj" else "F32")
            if layer == 1 and name == "self_attn.q_proj":
                b = np.zeros_like(b)
            if layer == 10 and name == "mlp.down_proj":
                a = a.copy()
                a[0, 0] = np.nan
            key = f"{PREFIX}model.layers.{layer}.{name}"
            t[f"{key}.lora_A.weight"] = (tag, a)
            t[f"{key}.lora_B.weight"] = (tag, b)
    # conv LoRA: A (r, c_in, 3, 3), B (c_out, r, 1, 1)
    t[f"{PREFIX}model.conv.lora_A.weight"] = ("F32", rng.standard_normal((8, 3, 3, 3)))
    t[f"{PREFIX}model.conv.lora_B.weight"] = ("F32", rng.standard_normal((5, 8, 1, 1)))
    # embedding LoRA: A (r, num_embeddings), B (dim, r)
    t[f"{PREFIX}model.embed_tokens.lora_embedding_A"] = ("F32", rng.standard_normal((8, 30)))
    t[f"{PREFIX}model.embed_tokens.lora_embedding_B"] = ("F32", rng.standard_normal((6, 8)))
    # DoRA magnitude and lora_B bias on one more module
    a, b = _pair(rng, 10, 16, 8)
    t[f"{PREFIX}model.extra.o_proj.lora_A.weight"] = ("F32", a)
    t[f"{PREFIX}model.extra.o_proj.lora_B.weight"] = ("F32", b)
    t[f"{PREFIX}model.extra.o_proj.lora_B.bias"] = ("F32", rng.standard_normal(10))
    t[f"{PREFIX}model.extra.o_proj.lora_magnitude_vector"] = ("F32", rng.standard_normal(10))
    # modules_to_save: dense copies, skipped
    t[f"{PREFIX}lm_head.modules_to_save.default.weight"] = ("F32", rng.standard_normal((7, 6)))
    t[f"{PREFIX}lm_head.modules_to_save.default.bias"] = ("F32", rng.standard_normal(7))
    write_safetensors(d / "adapter_model.safetensors", t, {"format": "pt"})
    _config(
        d,
        r=8,
        lora_alpha=16,
        rank_pattern={"v_proj": 4},
        alpha_pattern={"layers\\.0\\.self_attn\\.q_proj": 32},
        modules_to_save=["lm_head"],
        use_dora=True,
        future_field={"nested": [1, 2]},
    )
    return d


def peft_rslora_fan_in(root: Path) -> Path:
    """rsLoRA scale and GPT-2 style fan_in_fan_out."""
    rng = np.random.default_rng(11)
    d = root / "peft_rslora"
    t = {}
    for layer in range(3):
        a, b = _pair(rng, 36, 12, 4, decay=0.8)
        t[f"{PREFIX}transformer.h.{layer}.attn.c_attn.lora_A.weight"] = ("F32", a)
        t[f"{PREFIX}transformer.h.{layer}.attn.c_attn.lora_B.weight"] = ("F32", b)
    write_safetensors(d / "adapter_model.safetensors", t, {"format": "pt"})
    _config(d, r=4, lora_alpha=8, use_rslora=True, fan_in_fan_out=True, target_modules=["c_attn"])
    return d


def nora_dir(root: Path) -> Path:
    """A NoRA directory (peft_type NORA)."""
    rng = np.random.default_rng(12)
    d = root / "nora"
    t = {}
    for layer in range(2):
        for name in ("q_proj", "v_proj"):
            a, b = _pair(rng, 16, 16, 8, decay=0.1)
            t[f"{PREFIX}blocks.{layer}.attn.{name}.lora_A.weight"] = ("F32", a)
            t[f"{PREFIX}blocks.{layer}.attn.{name}.lora_B.weight"] = ("F32", b)
    write_safetensors(d / "adapter_model.safetensors", t, {"format": "pt"})
    _config(d, peft_type="NORA", r=8, lora_alpha=8, activation="silu", dropout=0.1)
    return d


def bare_file(root: Path) -> Path:
    """A bare .safetensors file (no config: scale 1, with a warning)."""
    rng = np.random.default_rng(13)
    t = {}
    for layer in range(2):
        a, b = _pair(rng, 20, 14, 6)
        t[f"model.layers.{layer}.self_attn.q_proj.lora_A.weight"] = ("F32", a)
        t[f"model.layers.{layer}.self_attn.q_proj.lora_B.weight"] = ("F32", b)
    return write_safetensors(root / "bare.safetensors", t)


def multi_adapter(root: Path) -> Path:
    """A directory with the default adapter at the top and adapter ``code`` in a sub-directory."""
    rng = np.random.default_rng(14)
    d = root / "multi"
    for sub, r in ((d, 4), (d / "code", 2)):
        t = {}
        a, b = _pair(rng, 10, 10, r)
        t[f"{PREFIX}model.q_proj.lora_A.weight"] = ("F32", a)
        t[f"{PREFIX}model.q_proj.lora_B.weight"] = ("F32", b)
        write_safetensors(sub / "adapter_model.safetensors", t, {"format": "pt"})
        _config(sub, r=r, lora_alpha=2 * r)
    return d


#: Llama-2-7B module shapes (d_out, d_in) inside one decoder layer.
LLAMA_SHAPES = {
    "self_attn.q_proj": (4096, 4096),
    "self_attn.k_proj": (4096, 4096),
    "self_attn.v_proj": (4096, 4096),
    "self_attn.o_proj": (4096, 4096),
    "mlp.gate_proj": (11008, 4096),
    "mlp.up_proj": (11008, 4096),
    "mlp.down_proj": (4096, 11008),
}


def llama_like(root: Path, r: int = 4, layers: int = 32) -> Path:
    """A 224-module PEFT LoRA with Llama-2-7B shapes in bf16 (about 20 MB at r = 4)."""
    rng = np.random.default_rng(15)
    d = root / "llama"
    t = {}
    for layer in range(layers):
        for name, (d_out, d_in) in LLAMA_SHAPES.items():
            a = (rng.random((r, d_in), dtype=np.float32) * 2 - 1) / np.float32(math.sqrt(d_in))
            b = rng.standard_normal((d_out, r), dtype=np.float32) * np.float32(1e-3)
            b *= np.exp(-np.arange(r, dtype=np.float32) / max(r / 4, 1.0))
            key = f"{PREFIX}model.layers.{layer}.{name}"
            t[f"{key}.lora_A.weight"] = ("BF16", a)
            t[f"{key}.lora_B.weight"] = ("BF16", b)
    write_safetensors(d / "adapter_model.safetensors", t, {"format": "pt"})
    _config(d, r=r, lora_alpha=2 * r, target_modules=sorted({n.rsplit(".", 1)[-1] for n in LLAMA_SHAPES}))
    return d


#: case name -> (builder, extra ``spectra analyze`` arguments)
CASES: dict[str, tuple[Callable[[Path], Path], list[str]]] = {
    "peft_mixed": (peft_mixed, []),
    "peft_rslora": (peft_rslora_fan_in, []),
    "nora": (nora_dir, []),
    "bare": (bare_file, []),
    "multi_code": (multi_adapter, ["--adapter", "code"]),
    "llama224": (llama_like, []),
    "nora_probe": (nora_dir, ["--space", "probe", "--probe-samples", "300", "--layers", "q_proj", "--seed", "3"]),
}


def build(root: Path, case: str) -> Path:
    """Build checkpoint ``case`` under ``root`` and return its path."""
    return CASES[case][0](root)


def analyze_json(root: Path, case: str) -> str:
    """The ``spectra analyze --format json`` text of ``case``, with the checkpoint path relative to ``root``.

    Runs the real CLI in-process from ``root`` so the ``checkpoint`` field is the relative name.
    """
    import contextlib
    import io
    import os

    from nora_spectra.cli.main import main

    path = build(root, case)
    argv = ["analyze", os.path.relpath(path, root), "--format", "json", "-q", *CASES[case][1]]
    out = io.StringIO()
    cwd = os.getcwd()
    os.chdir(root)
    try:
        with contextlib.redirect_stdout(out):
            try:
                main(argv)
            except SystemExit as exc:
                if exc.code not in (0, None):
                    raise AssertionError(f"spectra {' '.join(argv)} exited {exc.code}") from None
    finally:
        os.chdir(cwd)
    return out.getvalue()


def _main() -> None:  # pragma: no cover - regenerates the golden files
    import tempfile

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--write", action="store_true", help="write the golden files")
    args = parser.parse_args()
    GOLDEN_DIR.mkdir(exist_ok=True)
    for case in CASES:
        with tempfile.TemporaryDirectory() as tmp:
            text = analyze_json(Path(tmp), case)
        target = GOLDEN_DIR / f"{case}.json"
        if args.write:
            target.write_text(text)
        print(f"{case}: {len(text)} bytes" + (f" -> {target}" if args.write else ""))


if __name__ == "__main__":  # pragma: no cover
    _main()
