"""The NoRA paper's rank-scaling study at small scale, offline: perplexity and effective rank against r.

Pipeline (every step seeded; nothing is downloaded):

1. Base model: the small GPT (``nora_core.models.gpt``) pretrained on the built-in corpus (standard
   library docstrings, ``nora_core.corpus``). Cached in ``OUT/base`` and reused when its settings match.
2. Task: the built-in arithmetic word problems (``nora_core.arithmetic``, MathInstruct-like records
   rendered ``Question: ...\\nAnswer: ...``), disjoint train and validation splits.
3. For every method and every rank ``r`` in ``4, 8, ..., n_embd`` (powers of two up to the model width):
   inject adapters into q_proj and v_proj of every block (the paper's targets), fine-tune with the same
   steps, data order and seed, then measure

   * validation perplexity over every non-padding label (the paper's definition) and over the answer
     tokens only;
   * weight-space effective rank: ``spectra analyze`` of the saved adapter (sigma of ``s B A``; for
     NoRA that is the linear skeleton without the activation);
   * activation-space effective rank: the paper's measurement (``nora_spectra.spaces.activation``) over 128
     training samples, eval mode, every adapted layer (the model has at most 5 blocks, so this is the
     paper's "last 5 layers").

Methods (``METHODS``): LoRA with ``s = alpha / r``, rsLoRA with ``s = alpha / sqrt(r)`` (both alpha = 16,
Kaiming-uniform A, no dropout: PEFT defaults), NoRA with SiLU and the NoRA *identity* control (both
``s = 1``, Kaiming-normal A, hidden dropout 0.1: the paper's reference code and sweep setting). The
identity control is the same function class as LoRA: what separates it from LoRA is scale and init,
what separates it from NoRA-SiLU is the non-linearity.

Outputs in ``OUT``: ``results.csv`` / ``results.json`` (one row per method x rank), ``results.md``
(the table), ``ppl_vs_rank.png``, ``erank_vs_rank_activation.png``, ``erank_vs_rank_weight.png``,
``spectra_r{R}.png`` (activation spectra at the largest rank) and ``adapters/`` (every adapter).

Run::

    nice -n 10 .venv/bin/python bench/rank_scaling.py --out runs/rank_scaling             # full, < 30 min
    .venv/bin/python bench/rank_scaling.py --quick --out /tmp/rs_quick                  # CI, < 90 s
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import logging
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from nora_core.arithmetic import arithmetic_splits
from nora_core.checkpoint import save_adapter
from nora_core.config import AdapterConfig
from nora_core.corpus import stdlib_docstrings
from nora_core.data import ByteTokenizer, TokenDataset, parse_record
from nora_core.inject import inject_adapters
from nora_core.models.gpt import GPT, GPTConfig
from nora_core.trainer import TrainConfig, evaluate, train
from nora_spectra.analysis import activation_spectra
from nora_spectra.analysis import analyze
from nora_spectra.summary import mean

__all__ = ["METHODS", "SweepConfig", "QUICK", "FULL", "method_config", "run_sweep", "main"]

log = logging.getLogger("rank_scaling")

#: method name -> (AdapterConfig keyword arguments without r, learning-rate key of SweepConfig)
METHODS: dict[str, dict[str, Any]] = {
    "lora": {"method": "lora", "alpha": 16.0, "dropout": 0.0},
    "rslora": {"method": "lora", "alpha": 16.0, "use_rslora": True, "dropout": 0.0},
    "nora_silu": {"method": "nora", "alpha": None, "activation": "silu", "dropout": 0.1},
    "nora_identity": {"method": "nora", "alpha": None, "activation": "identity", "dropout": 0.1},
}

#: the CSV columns, in order.
COLUMNS = (
    "method",
    "rank",
    "scale",
    "lr",
    "val_loss",
    "val_ppl",
    "answer_ppl",
    "train_loss",
    "weight_erank",
    "weight_utilization",
    "activation_erank",
    "activation_utilization",
    "activation_energy_rank_90",
    "activation_tokens",
    "seconds",
)


@dataclass(frozen=True)
class SweepConfig:
    """Sizes of one sweep (see :data:`QUICK` and :data:`FULL`).

    Attributes:
        n_layer, n_head, n_embd, block_size: the small GPT; ranks go from 4 up to ``n_embd``.
        corpus_bytes: bytes of the built-in corpus used for pretraining.
        pretrain_steps, pretrain_batch, pretrain_lr: base-model pretraining.
        n_train, n_val: arithmetic problems in the two splits.
        steps, batch_size: fine-tuning steps and global batch (the same for every run).
        lr: peak learning rate of every fine-tuning run (one rate for all methods, so that scale and
            init are the only optimisation differences; the paper tuned LoRA ~3e-4 and NoRA ~1e-3).
        activation_samples: training sequences the activation spectra are measured on (paper: 128).
        seed: every run uses it (data order, adapter init, dropout).
        threads: torch intra-op threads.
    """

    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 64
    block_size: int = 128
    corpus_bytes: int = 400_000
    pretrain_steps: int = 400
    pretrain_batch: int = 16
    pretrain_lr: float = 3e-3
    n_train: int = 3200
    n_val: int = 256
    steps: int = 120
    batch_size: int = 16
    lr: float = 2e-3
    activation_samples: int = 128
    seed: int = 0
    threads: int = 2

    @property
    def ranks(self) -> list[int]:
        """4, 8, ..., n_embd."""
        out, r = [], 4
        while r <= self.n_embd:
            out.append(r)
            r *= 2
        return out


QUICK = SweepConfig(
    n_layer=1,
    n_head=2,
    n_embd=16,
    block_size=128,
    corpus_bytes=20_000,
    pretrain_steps=15,
    pretrain_batch=8,
    n_train=64,
    n_val=16,
    steps=8,
    batch_size=8,
    activation_samples=16,
)
FULL = SweepConfig()


def method_config(name: str, rank: int) -> AdapterConfig:
    """The adapter config of ``name`` (a key of :data:`METHODS`) at rank ``rank``, targets q_proj and v_proj."""
    return AdapterConfig(r=rank, target_modules=["q_proj", "v_proj"], **METHODS[name])


def _samples(records: list[dict[str, str]]) -> list[Any]:
    return [parse_record(rec, "mathinstruct") for rec in records]


def _pretrain(cfg: SweepConfig, out: Path) -> GPT:
    """Pretrain (or reuse from ``out/base``) the small GPT on the built-in corpus."""
    gpt_config = GPTConfig(n_layer=cfg.n_layer, n_head=cfg.n_head, n_embd=cfg.n_embd, block_size=cfg.block_size)
    stamp = {"gpt": dataclasses.asdict(gpt_config), "corpus_bytes": cfg.corpus_bytes, "steps": cfg.pretrain_steps,
             "batch": cfg.pretrain_batch, "lr": cfg.pretrain_lr, "seed": cfg.seed}
    base_dir, stamp_file = out / "base", out / "base" / "pretrain.json"
    if stamp_file.is_file() and json.loads(stamp_file.read_text()).get("settings") == stamp:
        log.info("reusing the pretrained base in %s", base_dir)
        return GPT.from_pretrained(base_dir)
    text = stdlib_docstrings(max_bytes=cfg.corpus_bytes)
    ids = ByteTokenizer().encode(text)
    split = int(len(ids) * 0.95)
    train_set = TokenDataset.from_token_stream(ids[:split], cfg.block_size)
    val_set = TokenDataset.from_token_stream(ids[split:], cfg.block_size)
    torch.manual_seed(cfg.seed)
    model = GPT(gpt_config)
    t0 = time.perf_counter()
    result = train(
        model,
        TrainConfig(steps=cfg.pretrain_steps, batch_size=cfg.pretrain_batch, lr=cfg.pretrain_lr,
                    warmup_steps=max(1, cfg.pretrain_steps // 20), weight_decay=0.1, seed=cfg.seed, device="cpu",
                    log_every=max(1, cfg.pretrain_steps)),
        train_set,
        val_set,
    )
    log.info("pretrained base: %d params, val ppl %.3f on held-out corpus bytes, %.0f s",
             model.num_parameters(), result.val_ppl, time.perf_counter() - t0)
    model.save_pretrained(base_dir)
    stamp_file.write_text(json.dumps({"settings": stamp, "val_ppl": result.val_ppl}, indent=2) + "\n")
    return model


def _run_one(cfg: SweepConfig, base_dir: Path, name: str, rank: int, data: dict[str, TokenDataset], out: Path) -> dict[str, Any]:
    """Fine-tune one (method, rank) and measure it."""
    t0 = time.perf_counter()
    model = GPT.from_pretrained(base_dir)
    config = method_config(name, rank)
    torch.manual_seed(cfg.seed)  # same adapter-init stream for every run
    inject_adapters(model, config)
    lr = cfg.lr
    result = train(
        model,
        TrainConfig(steps=cfg.steps, batch_size=cfg.batch_size, lr=lr, warmup_steps=max(1, cfg.steps // 10),
                    seed=cfg.seed, device="cpu", log_every=max(1, cfg.steps)),
        data["train"],
    )
    full = evaluate(model, data["val"], batch_size=64)
    answer = evaluate(model, data["val_answer"], batch_size=64)
    adapter_dir = save_adapter(model, out / "adapters" / f"{name}-r{rank}")
    weight = analyze(adapter_dir, emit_warnings=False)
    act = activation_spectra(model, data=data["train"], samples=cfg.activation_samples, batch_size=16)
    act.checkpoint = str(adapter_dir)
    (adapter_dir / "activation.json").write_text(act.to_json() + "\n")
    row = {
        "method": name,
        "rank": rank,
        "scale": config.scale_for("q_proj"),
        "lr": lr,
        "val_loss": full["loss"],
        "val_ppl": full["ppl"],
        "answer_ppl": answer["ppl"],
        "train_loss": result.train_loss,
        "weight_erank": mean(weight.records, "effective_rank"),
        "weight_utilization": mean(weight.records, "utilization"),
        "activation_erank": mean(act.records, "effective_rank"),
        "activation_utilization": mean(act.records, "utilization"),
        "activation_energy_rank_90": mean(act.records, "energy_rank_90"),
        "activation_tokens": act.tokens,
        "seconds": time.perf_counter() - t0,
    }
    log.info("%-13s r=%-4d val ppl %.4f  answer ppl %.4f  ER weight %.1f  activation %.1f  (%.0f s)", name, rank,
             row["val_ppl"], row["answer_ppl"], row["weight_erank"] or 0, row["activation_erank"] or 0, row["seconds"])
    return {"row": row, "weight": weight, "activation": act}


def run_sweep(cfg: SweepConfig, out: Path, methods: list[str] | None = None, ranks: list[int] | None = None) -> list[dict[str, Any]]:
    """Pretrain (or reuse) the base, then fine-tune and measure every method x rank; write every output.

    Returns:
        The result rows (keys :data:`COLUMNS`).
    """
    torch.set_num_threads(cfg.threads)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    _pretrain(cfg, out)
    base_dir = out / "base"
    train_recs, val_recs = arithmetic_splits(cfg.n_train, cfg.n_val, seed=cfg.seed)
    data = {
        "train": TokenDataset.from_samples(_samples(train_recs), max_length=cfg.block_size),
        "val": TokenDataset.from_samples(_samples(val_recs), max_length=cfg.block_size),
        "val_answer": TokenDataset.from_samples(_samples(val_recs), max_length=cfg.block_size, response_only=True),
    }
    base = GPT.from_pretrained(base_dir)
    base_eval = {"val_ppl": evaluate(base, data["val"], batch_size=64)["ppl"],
                 "answer_ppl": evaluate(base, data["val_answer"], batch_size=64)["ppl"]}
    runs = [
        _run_one(cfg, base_dir, name, rank, data, out)
        for name in (methods or list(METHODS))
        for rank in (ranks or cfg.ranks)
    ]
    rows = [run["row"] for run in runs]
    elapsed = time.perf_counter() - t0
    _write_tables(cfg, out, rows, base_eval, elapsed)
    _write_plots(out, runs)
    log.info("sweep done in %.0f s; outputs in %s", elapsed, out)
    return rows


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}" if math.isfinite(value) else str(value)
    return str(value)


def _write_tables(cfg: SweepConfig, out: Path, rows: list[dict[str, Any]], base_eval: dict[str, float], elapsed: float) -> None:
    with (out / "results.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(COLUMNS))
        writer.writeheader()
        writer.writerows(rows)
    meta = {"config": dataclasses.asdict(cfg), "ranks": cfg.ranks, "methods": METHODS, "base": base_eval,
            "elapsed_s": elapsed, "torch": torch.__version__, "rows": rows}
    (out / "results.json").write_text(json.dumps(meta, indent=2) + "\n")
    lines = [
        f"Small GPT {cfg.n_layer} layers x {cfg.n_embd} wide, {cfg.steps} steps x batch {cfg.batch_size}, seed {cfg.seed}; "
        f"base (no adapter): val PPL {base_eval['val_ppl']:.3f}, answer PPL {base_eval['answer_ppl']:.3f}. "
        f"ER = mean effective rank over q_proj/v_proj modules.",
        "",
        "| method | r | scale | val PPL | answer PPL | weight ER | activation ER | act. util. | act. energy-90 |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        lines.append(
            f"| {row['method']} | {row['rank']} | {_fmt(row['scale'], 3)} | {_fmt(row['val_ppl'], 4)} | "
            f"{_fmt(row['answer_ppl'], 4)} | {_fmt(row['weight_erank'], 1)} | {_fmt(row['activation_erank'], 1)} | "
            f"{_fmt(row['activation_utilization'], 2)} | {_fmt(row['activation_energy_rank_90'], 1)} |"
        )
    (out / "results.md").write_text("\n".join(lines) + "\n")


def _write_plots(out: Path, runs: list[dict[str, Any]]) -> None:
    from matplotlib.figure import Figure

    from nora_spectra.plots import color, effective_rank_vs_rank, spectrum_decay

    methods = list(dict.fromkeys(run["row"]["method"] for run in runs))
    fig = Figure(figsize=(6.4, 4.0), dpi=100, layout="constrained")
    ax = fig.add_subplot()
    for i, name in enumerate(methods):
        pts = sorted((run["row"]["rank"], run["row"]["val_ppl"]) for run in runs if run["row"]["method"] == name)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", color=color(i), label=name)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("rank r")
    ax.set_ylabel("validation perplexity")
    ax.set_title("Validation perplexity against rank (arithmetic task)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize="small")
    fig.savefig(out / "ppl_vs_rank.png")
    for space in ("activation", "weight"):
        analyses = [run[space] for run in runs]
        series = [run["row"]["method"] for run in runs]
        fig = effective_rank_vs_rank(analyses, series=series, annotate=False,
                                     title=f"Effective rank against rank budget ({space} space)")
        fig.savefig(out / f"erank_vs_rank_{space}.png")
    top = max(run["row"]["rank"] for run in runs)
    at_top = [(run["row"]["method"], run["activation"]) for run in runs if run["row"]["rank"] == top]
    fig = spectrum_decay(at_top, title=f"Activation-space spectra at r={top} (mean over modules)")
    fig.savefig(out / f"spectra_r{top}.png")


def main(argv: list[str] | None = None) -> int:
    """Command line: ``--quick`` | full sweep, ``--out DIR``, optional ``--methods`` / ``--ranks`` subsets."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny model and few steps (CI smoke test, < 90 s)")
    parser.add_argument("--out", type=Path, default=Path("runs/rank_scaling"), help="output directory")
    parser.add_argument("--methods", nargs="+", choices=list(METHODS), help="subset of methods")
    parser.add_argument("--ranks", nargs="+", type=int, help="subset of ranks")
    parser.add_argument("--steps", type=int, help="override the fine-tuning steps")
    parser.add_argument("--threads", type=int, help="torch threads (default 2)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)
    cfg = QUICK if args.quick else FULL
    if args.steps:
        cfg = dataclasses.replace(cfg, steps=args.steps)
    if args.threads:
        cfg = dataclasses.replace(cfg, threads=args.threads)
    run_sweep(cfg, args.out, args.methods, args.ranks)
    print((args.out / "results.md").read_text(), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
