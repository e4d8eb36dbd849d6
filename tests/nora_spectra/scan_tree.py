"""A generated tree of adapters for the scan tests: several formats, ranks, shapes and dtypes, and broken ones.

:func:`build_tree` writes the tree and returns what a scan must find: path -> :class:`Expected`
(status and a fragment of the error message). Formats on main today: PEFT and NoRA directories (named
adapters in sub-directories too) and bare ``.safetensors`` files; the broken inputs: a truncated file,
a garbage header, an invalid ``adapter_config.json``, factors of mismatched rank, a file that cannot be
read, a symbolic link loop, a dangling link; and what must not be found: a link back to an ancestor
directory, a full-model safetensors file without adapter keys, a README.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import numpy as np

from tests.nora_spectra.io_builders import lora_tensors, peft_dir, write_numpy, write_raw

__all__ = ["Expected", "build_tree", "unreadable_by_permissions"]


@dataclasses.dataclass(frozen=True)
class Expected:
    """What the scan must say about one path: ``status`` and, for errors, a fragment of the message."""

    status: str
    error: str | None = None


def unreadable_by_permissions(path: Path) -> bool:
    """True when ``chmod 000`` really stops this process from reading ``path`` (not as root)."""
    return not os.access(path, os.R_OK)


def _shapes(rng: np.random.Generator, n_layers: int, r: int, types: tuple[str, ...]) -> dict[str, tuple[int, int, int]]:
    shapes = {}
    for layer in range(n_layers):
        for t in types:
            d_in = int(rng.integers(r, 3 * r + 16))
            d_out = int(rng.integers(r, 3 * r + 16))
            shapes[f"model.layers.{layer}.self_attn.{t}"] = (d_out, d_in, r)
    return shapes


def build_tree(root: Path, *, seed: int = 0) -> dict[str, Expected]:
    """Write the adapters under ``root``; return absolute path -> :class:`Expected`."""
    rng = np.random.default_rng(seed)
    expected: dict[str, Expected] = {}
    bases = ("meta-llama/Llama-3.2-1B", "Qwen/Qwen2.5-0.5B", "gpt2")

    # PEFT LoRA directories: ranks 2..16, mixed dtypes, base models, rsLoRA, a rank pattern
    for i in range(14):
        r = int(rng.choice([2, 4, 8, 16]))
        dtype = np.float16 if i % 3 == 0 else np.float32
        shapes = _shapes(rng, int(rng.integers(1, 4)), r, ("q_proj", "v_proj") if i % 2 else ("q_proj", "k_proj", "o_proj"))
        path = root / "peft" / f"run{i:02d}"
        peft_dir(path, lora_tensors(shapes, dtype=dtype, seed=seed + i), r=r, lora_alpha=2 * r,
                 use_rslora=bool(i % 4 == 1), base_model_name_or_path=bases[i % 3])
        expected[str(path)] = Expected("ok")
    # NoRA directories
    for i in range(6):
        r = int(rng.choice([4, 8]))
        path = root / "nora" / f"nora{i}"
        peft_dir(path, lora_tensors(_shapes(rng, 2, r, ("q_proj", "v_proj")), seed=100 + i), peft_type="NORA",
                 r=r, lora_alpha=r, base_model_name_or_path=bases[i % 2])
        expected[str(path)] = Expected("ok")
    # bare safetensors files (no config: scale 1)
    for i in range(6):
        r = int(rng.choice([2, 4, 8]))
        path = root / "bare" / f"adapter{i}.safetensors"
        path.parent.mkdir(parents=True, exist_ok=True)
        write_numpy(path, lora_tensors(_shapes(rng, 1, r, ("q_proj",)), seed=200 + i))
        expected[str(path)] = Expected("ok")
    # named adapters: a default one with a named one beside it, and named ones without a default
    multi = root / "multi"
    peft_dir(multi / "with_default", lora_tensors(_shapes(rng, 1, 4, ("q_proj",)), seed=300), r=4, lora_alpha=8)
    peft_dir(multi / "with_default" / "extra", lora_tensors(_shapes(rng, 1, 2, ("q_proj",)), seed=301), r=2, lora_alpha=2)
    peft_dir(multi / "no_default" / "a", lora_tensors(_shapes(rng, 1, 4, ("v_proj",)), seed=302), r=4, lora_alpha=4)
    peft_dir(multi / "no_default" / "b", lora_tensors(_shapes(rng, 1, 8, ("v_proj",)), seed=303), r=8, lora_alpha=8)
    for name in ("with_default", "with_default/extra", "no_default/a", "no_default/b"):
        expected[str(multi / name)] = Expected("ok")
    # NaN factors: analysed (status ok), the layer is non_finite and the warning is data
    nan_tensors = lora_tensors(_shapes(rng, 2, 4, ("q_proj",)), seed=400)
    first = sorted(k for k in nan_tensors if k.endswith("lora_B.weight"))[0]
    nan_tensors[first][0, 0] = np.nan
    peft_dir(root / "odd" / "nan_factors", nan_tensors, r=4, lora_alpha=8)
    expected[str(root / "odd" / "nan_factors")] = Expected("ok")

    # broken inputs
    broken = root / "broken"
    broken.mkdir(parents=True)
    good = lora_tensors(_shapes(rng, 1, 4, ("q_proj",)), prefix="")
    blob = (broken / "tmp.safetensors")
    write_numpy(blob, good)
    data = blob.read_bytes()
    blob.unlink()
    (broken / "truncated.safetensors").write_bytes(data[: len(data) // 2])
    expected[str(broken / "truncated.safetensors")] = Expected("error", "truncated")
    write_raw(broken / "garbage.safetensors", b"{not json at all", b"\0" * 16)
    expected[str(broken / "garbage.safetensors")] = Expected("error", "not valid JSON")
    bad_config = broken / "bad_config"
    peft_dir(bad_config, lora_tensors(_shapes(rng, 1, 4, ("q_proj",)), seed=500), r=4, lora_alpha=8)
    (bad_config / "adapter_config.json").write_text("{ this is not json")
    expected[str(bad_config)] = Expected("error", "adapter_config.json")
    mismatched = lora_tensors(_shapes(rng, 1, 4, ("q_proj",)), seed=501)
    key = sorted(k for k in mismatched if k.endswith("lora_B.weight"))[0]
    mismatched[key] = np.ones((mismatched[key].shape[0], 3), np.float32)
    peft_dir(broken / "mismatched", mismatched, r=4, lora_alpha=8)
    expected[str(broken / "mismatched")] = Expected("error", "rank")
    # unreadable: chmod 000 (as root, reading is not blocked: then it is an ordinary adapter) ...
    locked = broken / "locked.safetensors"
    write_numpy(locked, lora_tensors(_shapes(rng, 1, 4, ("q_proj",)), prefix="", seed=502))
    os.chmod(locked, 0)
    expected[str(locked)] = Expected("error", "Permission denied") if unreadable_by_permissions(locked) else Expected("ok")
    # ... and a file no one can read, whatever the privileges (a read of /proc/self/mem at 0 fails: EIO)
    if os.path.exists("/proc/self/mem"):
        os.symlink("/proc/self/mem", broken / "eio.safetensors")
        expected[str(broken / "eio.safetensors")] = Expected("error", "cannot read file")
    # links: a loop, a dangling link, a link back to an ancestor (walked once: nothing found twice)
    os.symlink("loop.safetensors", broken / "loop.safetensors")
    expected[str(broken / "loop.safetensors")] = Expected("error", "symbolic link loop")
    os.symlink("missing.safetensors", broken / "dangling.safetensors")
    expected[str(broken / "dangling.safetensors")] = Expected("error", "dangling symbolic link")
    os.symlink("../..", root / "peft" / "run00" / "up")

    # not adapters: a README and a full model's weights
    (root / "README.md").write_text("adapters of the nightly runs\n")
    write_numpy(root / "model.safetensors", {"model.embed_tokens.weight": np.ones((8, 4), np.float32)})
    return expected
