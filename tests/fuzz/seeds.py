"""The real inputs the fuzz suite mutates, built once per run (no download): a PEFT LoRA adapter saved by
the real ``peft``, a NoRA adapter saved by ``nora_core``, their ``.bin`` forms, analysis JSON of both
spaces, a training run directory, and TOML configs for ``spectra check`` and ``nora train``."""

from __future__ import annotations

import dataclasses
import json
import shutil
import warnings
from pathlib import Path

__all__ = ["Seeds", "build_seeds"]


@dataclasses.dataclass(frozen=True)
class Seeds:
    """Paths of the seed inputs (never modified: cases copy what they mutate)."""

    root: Path
    peft_dir: Path  # adapter_config.json + adapter_model.safetensors (+ README.md) from peft
    nora_dir: Path  # a NoRA adapter from nora_core.save_adapter
    bin_zip: bytes  # the PEFT adapter's state dict as a torch zip pickle
    bin_legacy: bytes  # ... and as a legacy (non-zip) torch pickle
    analysis: dict  # spectra analyze --format json of peft_dir
    probe_analysis: dict  # ... of nora_dir in probe space
    run_dir: Path  # metrics.jsonl, train_config.json, adapter/
    check_toml: str  # a spectra check --config file
    pyproject: str  # a pyproject.toml with [tool.spectra.check]
    train_toml: str  # a nora train --config file (model and data paths filled by the case)
    base_model: Path  # a tiny GPT for nora train
    train_data: Path  # arithmetic JSONL for nora train


def _peft_adapter(directory: Path) -> None:
    import peft
    import torch
    import transformers

    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=32, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=16,
    )
    model = transformers.LlamaForCausalLM(config)
    lora = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                           rank_pattern={"down_proj": 2}, modules_to_save=["lm_head"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        wrapped = peft.get_peft_model(model, lora)
        with torch.no_grad():
            for name, param in wrapped.named_parameters():
                if "lora_B" in name:
                    param.normal_(0.0, 0.5)
        wrapped.save_pretrained(str(directory))


def _nora_adapter(directory: Path) -> None:
    import torch

    from nora_core.checkpoint import save_adapter
    from nora_core.config import AdapterConfig
    from nora_core.inject import inject_adapters
    from nora_core.models.gpt import GPT, GPTConfig

    torch.manual_seed(1)
    model = inject_adapters(GPT(GPTConfig(n_layer=1, n_embd=16, n_head=2, block_size=32)),
                            AdapterConfig(method="nora", r=3, alpha=6, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.5)
    save_adapter(model, directory)


def build_seeds(root: Path) -> Seeds:
    """Write every seed under ``root`` (a fresh directory) and return their paths."""
    import io

    import torch
    from safetensors.torch import load_file

    from nora_core.arithmetic import ArithmeticTask, arithmetic_splits
    from nora_core.data import write_jsonl
    from nora_core.models.gpt import GPT, GPTConfig
    from nora_spectra.analysis import analyze

    root.mkdir(parents=True, exist_ok=True)
    peft_dir, nora_dir = root / "peft", root / "nora"
    _peft_adapter(peft_dir)
    _nora_adapter(nora_dir)
    state = load_file(peft_dir / "adapter_model.safetensors")
    buffers = []
    for zip_format in (True, False):
        buffer = io.BytesIO()
        torch.save(state, buffer, _use_new_zipfile_serialization=zip_format)
        buffers.append(buffer.getvalue())
    analysis = analyze(peft_dir, emit_warnings=False).to_dict()
    probe = analyze(nora_dir, space="probe", probe_samples=64, emit_warnings=False).to_dict()

    run_dir = root / "run"
    shutil.copytree(nora_dir, run_dir / "adapter")
    records = []
    for step in (5, 10):
        spectra = [{"module": m, "module_type": m.rsplit(".", 1)[-1], "rank": 3, "effective_rank": 2.0 + step / 10,
                    "utilization": 0.7, "stable_rank": 1.5, "sigma_max": 0.9, "status": "ok"}
                   for m in ("blocks.0.attn.q_proj", "blocks.0.attn.v_proj")]
        records.append({"step": step, "train_loss": 3.0 - step / 10, "lr": 1e-3, "tokens_per_s": 1000.0,
                        "val_loss": 3.1 - step / 10, "val_ppl": 20.0, "spectra": spectra})
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (run_dir / "train_config.json").write_text(json.dumps({"steps": 10, "lr": 1e-3}))

    base = root / "base"
    GPT(GPTConfig(n_layer=1, n_embd=16, n_head=2, block_size=64)).save_pretrained(base)
    rows, _ = arithmetic_splits(8, 2, task=ArithmeticTask(1, 2, 20))
    data = write_jsonl(root / "train.jsonl", rows)
    check_toml = (
        "min_utilization = 0.1\nmax_collapsed_fraction = 0.9\nmax_drop = 0.5\nmetric = \"effective_rank\"\n"
        "fail_on_missing = true\n\n[[overrides]]\npattern = \"*.v_proj\"\nmin_utilization = 0.05\n"
    )
    pyproject = "[project]\nname = \"x\"\n\n[tool.spectra.check]\n" + check_toml.replace("[[overrides]]", "[[tool.spectra.check.overrides]]")
    train_toml = (
        "model = \"MODEL\"\ndata = \"DATA\"\nrun_dir = \"run\"\nmethod = \"lora\"\nr = 2\nalpha = 4.0\n"
        "targets = [\"q_proj\"]\nsteps = 1\nbatch_size = 2\nmax_length = 48\nsave_every = 0\ntrack_every = 0\n"
        "eval_every = 0\nprogress = false\nlr = 1e-3\ndevice = \"cpu\"\n"
    )
    return Seeds(root, peft_dir, nora_dir, buffers[0], buffers[1], analysis, probe, run_dir, check_toml,
                 pyproject, train_toml, base, data)
