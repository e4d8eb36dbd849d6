"""An independent float64 reference for activation spectra of PEFT LoRA models.

PEFT's own modules are hooked (``lora_B["default"]``, whose output is ``B A dropout(x)``; dropout is off
in eval mode), so the reference shares no code with nora_spectra or nora_core: ``dY = scaling * out`` at
every real position (``attention_mask == 1``), stacked over all batches, centred column by column and
decomposed with a dense ``numpy.linalg.svd``.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np
import torch

SPECTRA = str(Path(sys.executable).with_name("spectra"))

#: activation spectra must match the dense reference to this, relative to the largest singular value.
RTOL = 1e-6


def peft_branch_outputs(peft_model: Any, batches: Iterable[Mapping[str, torch.Tensor]]) -> dict[str, np.ndarray]:
    """``{module: dY (tokens, d_out) float64}`` of every PEFT LoRA layer over the real positions of ``batches``.

    Args:
        peft_model: a ``peft.PeftModel``.
        batches: keyword arguments of the model's forward; each holds ``attention_mask`` (b, T), and the
            branch inputs of every adapted module must be (b, T, d_in).
    """
    from peft.tuners.lora import LoraLayer

    layers = {
        name.removeprefix("base_model.model."): module
        for name, module in peft_model.named_modules()
        if isinstance(module, LoraLayer)
    }
    rows: dict[str, list[np.ndarray]] = {name: [] for name in layers}
    state: dict[str, torch.Tensor] = {}

    def make_hook(name: str, layer: Any):
        def hook(module, args, out):
            mask = state["mask"]
            assert out.shape[:-1] == mask.shape, (name, tuple(out.shape), tuple(mask.shape))
            dy = out.detach().double() * float(layer.scaling["default"])
            rows[name].append(dy[mask].numpy())

        return hook

    handles = [layer.lora_B["default"].register_forward_hook(make_hook(name, layer)) for name, layer in layers.items()]
    peft_model.eval()
    try:
        with torch.no_grad():
            for batch in batches:
                state["mask"] = batch["attention_mask"].bool()
                peft_model(**batch)
    finally:
        for handle in handles:
            handle.remove()
    return {name: np.concatenate(parts) for name, parts in rows.items()}


def centred_singular_values(dy: np.ndarray) -> np.ndarray:
    """Singular values of ``dY`` with each column's mean over tokens subtracted (dense, float64)."""
    return np.linalg.svd(dy - dy.mean(axis=0, keepdims=True), compute_uv=False)


def assert_matches_reference(records: list[dict[str, Any]], outputs: Mapping[str, np.ndarray], rtol: float = RTOL) -> None:
    """Every record's ``singular_values`` equal the dense reference's (to ``rtol`` of sigma_max), the values
    beyond its length are zero, and ``tokens`` counts the reference's positions."""
    assert sorted(r["module"] for r in records) == sorted(outputs)
    for record in records:
        dy = outputs[record["module"]]
        want = centred_singular_values(dy)
        got = np.asarray(record["singular_values"], dtype=np.float64)
        scale = want[0]
        assert scale > 0, record["module"]
        k = len(got)
        assert np.max(np.abs(got - want[:k])) <= rtol * scale, (record["module"], got[:4], want[:4])
        assert np.all(want[k:] <= rtol * scale), record["module"]  # rank(dY) <= r
        assert record["tokens"] == dy.shape[0]


def spectra_json(*args: str, timeout: float = 300) -> dict[str, Any]:
    """Run ``spectra ARGS --format json`` as a user would (the installed command) and parse its output."""
    proc = subprocess.run([SPECTRA, *args, "--format", "json"], capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout)
