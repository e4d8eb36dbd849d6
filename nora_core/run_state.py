"""The on-disk state of a run: checkpoint directories, weights, RNG state, atomic directory swaps.

Run directory layout (``TrainConfig.run_dir``)::

    train_config.json                  the TrainConfig
    metrics.jsonl                      METRICS_NAME: one JSON record per logged step
    checkpoints/step-000050/           adapter_config.json, adapter_model.safetensors (PEFT layout;
                                       MODEL_STATE_NAME when the model has no adapters), STATE_NAME
    best/                              the adapter with the lowest validation loss, plus best.json
    adapter/                           the final adapter

Every directory is written under a ``.tmp-*`` name and renamed into place (:func:`replace_dir`), so
a reader never sees one half-written; :func:`clean_partial` removes what a killed run left behind.
"""

from __future__ import annotations

import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from nora_core.atomic import atomic_write, replace_directory

__all__ = [
    "METRICS_NAME",
    "STATE_NAME",
    "MODEL_STATE_NAME",
    "STATE_VERSION",
    "latest_checkpoint",
    "list_checkpoints",
    "rng_state",
    "set_rng_state",
    "rng_state_to_cpu",
    "adapter_root",
    "save_weights",
    "load_weights",
    "replace_dir",
    "clean_partial",
]

METRICS_NAME = "metrics.jsonl"
STATE_NAME = "trainer_state.pt"
MODEL_STATE_NAME = "model_state.pt"
STATE_VERSION = 1
_CKPT_RE = re.compile(r"^step-(\d+)$")


def latest_checkpoint(run_dir: str | os.PathLike[str]) -> Path | None:
    """The complete checkpoint with the highest step in ``run_dir/checkpoints``, or None."""
    root = Path(run_dir) / "checkpoints"
    best: tuple[int, Path] | None = None
    if root.is_dir():
        for child in root.iterdir():
            match = _CKPT_RE.match(child.name)
            if match and (child / STATE_NAME).is_file() and (best is None or int(match.group(1)) > best[0]):
                best = (int(match.group(1)), child)
    return None if best is None else best[1]


def list_checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    """Every ``checkpoints/step-N`` directory of ``run_dir`` (complete or not), as ``(N, path)`` sorted by N."""
    root = run_dir / "checkpoints"
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), c) for c in root.iterdir() if (m := _CKPT_RE.match(c.name))]
    return sorted(found)


def rng_state() -> dict[str, Any]:
    """RNG states in a form ``torch.load(weights_only=True)`` accepts."""
    np_state = np.random.get_state()
    py_state = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        "numpy": {
            "key": np_state[0],
            "state": torch.from_numpy(np_state[1].astype(np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
        "python": [py_state[0], list(py_state[1]), py_state[2]],
    }


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore the RNG states saved by :func:`rng_state`."""
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    npst = state["numpy"]
    np.random.set_state(
        (npst["key"], npst["state"].numpy().astype(np.uint32), npst["pos"], npst["has_gauss"], npst["cached_gaussian"])
    )
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))


def adapter_root(model: nn.Module) -> nn.Module:
    """The module ``inject_adapters`` was applied to: ``model`` itself or a wrapped sub-module."""
    from nora_core.inject import adapter_config

    for module in model.modules():
        if adapter_config(module) is not None:
            return module
    raise ValueError("the model holds adapter layers but no adapter config (use inject_adapters or load_adapter)")


def save_weights(model: nn.Module, directory: Path, has_adapters: bool) -> None:
    """Write the adapter (PEFT layout) or, for a model without adapters, its whole state dict."""
    if has_adapters:
        from nora_core.checkpoint import write_adapter_files

        write_adapter_files(adapter_root(model), directory)  # directory: a fresh .tmp-* the caller renames
    else:
        with atomic_write(directory / MODEL_STATE_NAME) as handle:
            torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, handle)


def load_weights(model: nn.Module, directory: Path, has_adapters: bool) -> None:
    """Load what :func:`save_weights` wrote into ``model``."""
    if has_adapters:
        from nora_core.checkpoint import load_adapter

        load_adapter(adapter_root(model), directory)
    else:
        state = torch.load(directory / MODEL_STATE_NAME, map_location="cpu", weights_only=True)
        model.load_state_dict(state)


def replace_dir(tmp: Path, final: Path) -> None:
    """Move the finished directory ``tmp`` onto ``final`` in one step (:func:`nora_core.atomic.replace_directory`)."""
    replace_directory(tmp, final)


def clean_partial(run_dir: Path) -> None:
    """Remove temporary directories a killed run may have left behind."""
    for parent in (run_dir, run_dir / "checkpoints"):
        if parent.is_dir():
            for child in parent.iterdir():
                if child.name.startswith((".tmp-", ".old-")) and child.is_dir():
                    shutil.rmtree(child, ignore_errors=True)


def rng_state_to_cpu(state: dict[str, Any]) -> dict[str, Any]:
    """``state`` (from :func:`rng_state`) with its CUDA generator states moved to CPU tensors."""
    cuda = state.get("cuda")
    return {**state, "cuda": None if cuda is None else [s.cpu() for s in cuda]}
