"""Regenerate the example images of ``docs/reports.md`` into ``docs/images/``.

Two kinds of input, both built here (no downloads):

* spectra plots: PEFT-layout checkpoints with *synthetic* factors whose spectra imitate the shapes the
  NoRA paper reports (LoRA: a fast geometric decay whose effective rank saturates as r grows; NoRA: a
  heavy power-law tail whose effective rank keeps rising). They illustrate the plots; they are not
  measurements of trained adapters.
* training plots: two short real runs of ``nora_core``'s trainer (a 2-layer GPT, LoRA and NoRA r=8 on
  q/k/v, a toy next-token task) with spectral tracking; their ``metrics.jsonl`` feeds the plots.

Run from the repository root::

    .venv/bin/python docs/scripts/make_report_images.py
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from nora_spectra import plots  # noqa: E402
from nora_spectra.analysis import analyze  # noqa: E402
from nora_spectra.comparison import compare  # noqa: E402
from nora_spectra.report import read_run  # noqa: E402

OUT = ROOT / "docs" / "images"
DPI = 80
WIDTH = 256  # d_in = d_out of the synthetic modules
LAYERS = 6


def synthetic_checkpoint(path: Path, method: str, r: int, seed: int) -> Path:
    """q_proj and v_proj of LAYERS layers with a LoRA-like or NoRA-like spectrum (see module docstring)."""
    rng = np.random.default_rng(seed)
    i = np.arange(r)
    tensors = {}
    for layer in range(LAYERS):
        for kind in ("q_proj", "v_proj"):
            if method == "lora":
                sigma = np.exp(-i / (3.0 + 0.4 * layer))
            else:
                sigma = (1.0 + i) ** -(0.45 + 0.05 * (kind == "v_proj"))
            sigma = sigma * (1 + 0.05 * rng.standard_normal(r)).clip(0.5)
            qa, _ = np.linalg.qr(rng.standard_normal((WIDTH, r)))
            qb, _ = np.linalg.qr(rng.standard_normal((WIDTH, r)))
            module = f"base_model.model.model.layers.{layer}.self_attn.{kind}"
            tensors[f"{module}.lora_A.weight"] = (np.sqrt(sigma)[:, None] * qa.T).astype(np.float32)  # (r, d_in)
            tensors[f"{module}.lora_B.weight"] = (qb * np.sqrt(sigma)[None, :]).astype(np.float32)  # (d_out, r)
    path.mkdir(parents=True)
    save_file(tensors, str(path / "adapter_model.safetensors"), metadata={"format": "pt"})
    config = {"peft_type": method.upper(), "r": r, "lora_alpha": r, "target_modules": ["q_proj", "v_proj"]}
    (path / "adapter_config.json").write_text(json.dumps(config))
    return path


def training_run(path: Path, method: str) -> Path:
    """A short real training run with spectral tracking; returns its run directory."""
    import torch

    from nora_core.config import AdapterConfig
    from nora_core.inject import inject_adapters
    from nora_core.models.gpt import GPT, GPTConfig
    from nora_core.trainer import TrainConfig, train

    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=64, block_size=32, n_layer=2, n_head=2, n_embd=64))
    targets = sorted({name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)})
    attention = [t for t in targets if t in ("q_proj", "k_proj", "v_proj", "c_attn", "qkv")] or targets[:2]
    inject_adapters(model, AdapterConfig(method=method, r=8, alpha=16, target_modules=attention))
    g = torch.Generator().manual_seed(1)
    start = torch.randint(0, 64, (512, 1), generator=g)
    step = torch.randint(1, 4, (512, 1), generator=g)
    data = (start + step * torch.arange(33)) % 64  # arithmetic progressions: learnable next tokens
    config = TrainConfig(run_dir=str(path), steps=120, batch_size=16, lr=3e-3 if method == "lora" else 1e-2,
                         warmup_steps=10, eval_every=20, eval_batches=2, track_spectra_every=10, log_every=5,
                         device="cpu")
    train(model, config, data[:448], data[448:])
    return path


def save(fig, name: str) -> None:
    data = plots.figure_png(fig, dpi=DPI)
    (OUT / f"{name}.png").write_bytes(data)
    print(f"docs/images/{name}.png: {len(data) / 1024:.0f} KiB")


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        ranks = (8, 16, 32, 64)
        paths = {(m, r): synthetic_checkpoint(root / f"{m}_r{r}", m, r, seed=r + (m == "nora"))
                 for m in ("lora", "nora") for r in ranks}
        analyses = {key: analyze(p, emit_warnings=False) for key, p in paths.items()}
        pair = compare([analyses["lora", 64], analyses["nora", 64]], labels=["LoRA r=64", "NoRA r=64"])
        save(plots.spectrum_decay(pair), "spectrum_decay")
        save(plots.cumulative_energy(pair), "cumulative_energy")
        save(plots.utilization_heatmap(pair), "utilization_heatmap")
        everything = [(f"{m} r={r}", analyses[m, r]) for m in ("lora", "nora") for r in ranks]
        save(plots.effective_rank_vs_rank(everything), "effective_rank_vs_rank")
        runs = {name: read_run(training_run(root / f"run_{m}", m)).history for m, name in (("lora", "LoRA"), ("nora", "NoRA"))}
        save(plots.training_loss(runs), "training_loss")
        save(plots.effective_rank_trajectory(runs), "effective_rank_trajectory")


if __name__ == "__main__":
    main()
