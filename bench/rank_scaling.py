"""The NoRA paper's rank-scaling study at small scale, offline: perplexity and effective rank against r.

Pipeline (every step seeded, every thread pool pinned to one thread; nothing is downloaded):

1. Base model: the small GPT (``nora_core.models.gpt``) pretrained on the built-in corpus (standard
   library docstrings, ``nora_core.corpus``) with seed ``base_seed``. Cached in ``OUT/base`` and reused
   when its settings match; its weights' SHA-256 goes into the results.
2. Task: the built-in arithmetic word problems (``nora_core.arithmetic``, MathInstruct-like records
   rendered ``Question: ...\\nAnswer: ...``), disjoint train and validation splits (seed ``data_seed``).
3. For every method, every rank ``r`` in ``4, 8, ..., n_embd`` (powers of two up to the model width)
   and every seed of ``seeds``: inject adapters into q_proj and v_proj of every block (the paper's
   targets), fine-tune with the same steps (the seed sets the adapter init, the data order and the
   dropout), then measure

   * validation perplexity over every non-padding label (the paper's definition) and over the answer
     tokens only;
   * weight-space effective rank: ``spectra analyze`` of the saved adapter (sigma of ``s B A``; for
     NoRA that is the linear skeleton without the activation);
   * activation-space effective rank: the paper's measurement (``nora_spectra.spaces.activation``) over
     the first 128 training samples as the model reads them (BOS + text + EOS, every position), eval
     mode, every adapted layer (the model has at most 5 blocks, so this is the paper's "last 5 layers").

Methods (``METHODS``): LoRA with ``s = alpha / r``, rsLoRA with ``s = alpha / sqrt(r)`` (both alpha = 16,
Kaiming-uniform A, no dropout: PEFT defaults), NoRA with SiLU and the NoRA *identity* control (both
``s = 1``, Kaiming-normal A, hidden dropout 0.1: the paper's reference code and sweep setting). The
identity control is the same function class as LoRA: what separates it from LoRA is scale and init,
what separates it from NoRA-SiLU is the non-linearity.

Reproducibility (``bench/repro.py``): every BLAS and torch pool runs one thread, so the same command on
the same machine type gives the same numbers, however loaded the machine is. Each finished run is
appended to ``OUT/runs.jsonl`` at once (a restarted sweep skips the runs already there).

Outputs in ``OUT``: ``results.json`` (the raw results, one record per run, plus the settings, the base's
fingerprint and the machine), ``results.md`` (mean and standard deviation over seeds),
``ppl_vs_rank.png``, ``erank_vs_rank_activation.png``, ``erank_vs_rank_weight.png``, ``spectra_r{R}.png``
and ``adapters/`` (every adapter with its ``activation.json``). ``docs/results.md`` is generated from
the committed copies of ``results.json`` by ``bench/results_page.py``.

Run::

    nice -n 10 .venv/bin/python bench/rank_scaling.py --out runs/rank_scaling               # full sweep
    cp runs/rank_scaling/results.json docs/results/rank_scaling.json
    .venv/bin/python bench/results_page.py                                             # docs/results.md
    .venv/bin/python bench/rank_scaling.py --quick --out /tmp/rs_quick                    # CI smoke test

Check that one committed configuration reproduces (it pretrains the base again, or reuses one in
``--out`` whose fingerprint matches, then reruns that one configuration and compares every metric at
the precision ``docs/results.md`` prints; exit code 1 on a difference)::

    .venv/bin/python bench/rank_scaling.py --check docs/results/rank_scaling.json \\
        --methods lora --ranks 4 --seeds 0 --out runs/rank_scaling_check
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from repro import pin_threads  # noqa: E402  (before numpy and torch load their thread pools)

pin_threads()

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import torch  # noqa: E402

from nora_core.arithmetic import arithmetic_splits  # noqa: E402
from nora_core.checkpoint import save_adapter  # noqa: E402
from nora_core.config import AdapterConfig  # noqa: E402
from nora_core.corpus import stdlib_docstrings  # noqa: E402
from nora_core.data import ByteTokenizer, TokenDataset, TokenSequences, parse_record  # noqa: E402
from nora_core.inject import inject_adapters  # noqa: E402
from nora_core.models.gpt import GPT, GPTConfig  # noqa: E402
from nora_core.trainer import TrainConfig, evaluate, train  # noqa: E402
from nora_spectra.analysis import activation_spectra, analyze  # noqa: E402
from nora_spectra.result import Analysis  # noqa: E402
from nora_spectra.summary import mean  # noqa: E402
from repro import RunLog, check_run, machine_info, read_records, seed_everything, sha256_file, write_records  # noqa: E402

__all__ = ["METHODS", "SweepConfig", "QUICK", "FULL", "STUDY", "method_config", "run_sweep", "main"]

log = logging.getLogger("rank_scaling")

#: the study's name in its results file.
STUDY = "rank_scaling"

#: method name -> AdapterConfig keyword arguments without r.
METHODS: dict[str, dict[str, Any]] = {
    "lora": {"method": "lora", "alpha": 16.0, "dropout": 0.0},
    "rslora": {"method": "lora", "alpha": 16.0, "use_rslora": True, "dropout": 0.0},
    "nora_silu": {"method": "nora", "alpha": None, "activation": "silu", "dropout": 0.1},
    "nora_identity": {"method": "nora", "alpha": None, "activation": "identity", "dropout": 0.1},
}

#: fields that identify one run.
RUN_KEYS = ("method", "rank", "seed")


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
        seeds: one fine-tuning run per seed (adapter init, data order, dropout).
        base_seed: seed of the base model's pretraining (one base for every run).
        data_seed: seed of the arithmetic train/validation splits (one split for every run).
        rank_list: the ranks; empty means 4, 8, ..., n_embd.
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
    seeds: tuple[int, ...] = (0, 1, 2)
    base_seed: int = 0
    data_seed: int = 0
    rank_list: tuple[int, ...] = ()

    @property
    def ranks(self) -> list[int]:
        """``rank_list``, or 4, 8, ..., n_embd."""
        if self.rank_list:
            return list(self.rank_list)
        out, r = [], 4
        while r <= self.n_embd:
            out.append(r)
            r *= 2
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "SweepConfig":
        """Inverse of ``dataclasses.asdict`` (lists back to tuples)."""
        fields = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items() if k in fields}
        return cls(**kwargs)


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
    seeds=(0, 1),
    rank_list=(4, 16),
)
FULL = SweepConfig()


def method_config(name: str, rank: int) -> AdapterConfig:
    """The adapter config of ``name`` (a key of :data:`METHODS`) at rank ``rank``, targets q_proj and v_proj."""
    return AdapterConfig(r=rank, target_modules=["q_proj", "v_proj"], **METHODS[name])


def _samples(records: list[dict[str, str]]) -> list[Any]:
    return [parse_record(rec, "mathinstruct") for rec in records]


def _base_settings(cfg: SweepConfig) -> dict[str, Any]:
    gpt_config = GPTConfig(n_layer=cfg.n_layer, n_head=cfg.n_head, n_embd=cfg.n_embd, block_size=cfg.block_size)
    return {"gpt": dataclasses.asdict(gpt_config), "corpus_bytes": cfg.corpus_bytes, "steps": cfg.pretrain_steps,
            "batch": cfg.pretrain_batch, "lr": cfg.pretrain_lr, "seed": cfg.base_seed, "threads": 1}


def _pretrain(cfg: SweepConfig, out: Path) -> dict[str, Any]:
    """Pretrain (or reuse from ``out/base``) the small GPT on the built-in corpus; returns its stamp."""
    settings = _base_settings(cfg)
    base_dir, stamp_file = out / "base", out / "base" / "pretrain.json"
    if stamp_file.is_file():
        stamp = json.loads(stamp_file.read_text())
        if stamp.get("settings") == settings:
            log.info("reusing the pretrained base in %s", base_dir)
            return stamp
    text = stdlib_docstrings(max_bytes=cfg.corpus_bytes)
    ids = ByteTokenizer().encode(text)
    split = int(len(ids) * 0.95)
    train_set = TokenDataset.from_token_stream(ids[:split], cfg.block_size)
    val_set = TokenDataset.from_token_stream(ids[split:], cfg.block_size)
    seed_everything(cfg.base_seed)
    model = GPT(GPTConfig(**settings["gpt"]))
    t0 = time.perf_counter()
    result = train(
        model,
        TrainConfig(steps=cfg.pretrain_steps, batch_size=cfg.pretrain_batch, lr=cfg.pretrain_lr,
                    warmup_steps=max(1, cfg.pretrain_steps // 20), weight_decay=0.1, seed=cfg.base_seed,
                    device="cpu", log_every=max(1, cfg.pretrain_steps)),
        train_set,
        val_set,
    )
    seconds = time.perf_counter() - t0
    log.info("pretrained base: %d params, val ppl %.3f on held-out corpus bytes, %.0f s",
             model.num_parameters(), result.val_ppl, seconds)
    model.save_pretrained(base_dir)
    stamp = {"settings": settings, "val_ppl": result.val_ppl, "params": model.num_parameters(),
             "sha256": sha256_file(base_dir / "model.safetensors"), "seconds": seconds}
    stamp_file.write_text(json.dumps(stamp, indent=2) + "\n")
    return stamp


def _data(cfg: SweepConfig) -> dict[str, Any]:
    train_recs, val_recs = arithmetic_splits(cfg.n_train, cfg.n_val, seed=cfg.data_seed)
    train_samples = _samples(train_recs)
    return {
        "train": TokenDataset.from_samples(train_samples, max_length=cfg.block_size),
        "val": TokenDataset.from_samples(_samples(val_recs), max_length=cfg.block_size),
        "val_answer": TokenDataset.from_samples(_samples(val_recs), max_length=cfg.block_size, response_only=True),
        # what the activation spectra are measured on: the training texts as the model reads them
        "measure": TokenSequences.from_samples(train_samples[: cfg.activation_samples], ByteTokenizer(),
                                               max_length=cfg.block_size),
    }


def _run_one(cfg: SweepConfig, base_dir: Path, name: str, rank: int, seed: int, data: dict[str, Any],
             out: Path) -> dict[str, Any]:
    """Fine-tune one (method, rank, seed) and measure it."""
    t0 = time.perf_counter()
    model = GPT.from_pretrained(base_dir)
    config = method_config(name, rank)
    seed_everything(seed)  # the adapter-init stream of this seed
    inject_adapters(model, config)
    result = train(
        model,
        TrainConfig(steps=cfg.steps, batch_size=cfg.batch_size, lr=cfg.lr, warmup_steps=max(1, cfg.steps // 10),
                    seed=seed, device="cpu", log_every=max(1, cfg.steps)),
        data["train"],
    )
    full = evaluate(model, data["val"], batch_size=64)
    answer = evaluate(model, data["val_answer"], batch_size=64)
    adapter_dir = save_adapter(model, out / "adapters" / f"{name}-r{rank}-s{seed}")
    weight = analyze(adapter_dir, emit_warnings=False)
    act = activation_spectra(model, data=data["measure"], samples=cfg.activation_samples, batch_size=16)
    act.checkpoint = str(adapter_dir)
    (adapter_dir / "activation.json").write_text(act.to_json() + "\n")
    record = {
        "method": name,
        "rank": rank,
        "seed": seed,
        "scale": config.scale_for("q_proj"),
        "lr": cfg.lr,
        "steps": cfg.steps,
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
        "seconds": round(time.perf_counter() - t0, 1),
    }
    log.info("%-13s r=%-4d seed %d: val ppl %.4f  answer ppl %.4f  ER weight %.2f  activation %.2f  (%.0f s)",
             name, rank, seed, record["val_ppl"], record["answer_ppl"], record["weight_erank"] or 0,
             record["activation_erank"] or 0, record["seconds"])
    return record


def _settings(cfg: SweepConfig) -> dict[str, Any]:
    return {"config": dataclasses.asdict(cfg), "methods": METHODS}


def run_sweep(cfg: SweepConfig, out: Path, methods: list[str] | None = None, ranks: list[int] | None = None,
              seeds: list[int] | None = None, command: str = "") -> dict[str, Any]:
    """Pretrain (or reuse) the base, then fine-tune and measure every method x rank x seed; write every output.

    Returns:
        The results file's content (``study``, ``meta``, ``runs``).
    """
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    stamp = _pretrain(cfg, out)
    base_dir = out / "base"
    data = _data(cfg)
    base = GPT.from_pretrained(base_dir)
    base_eval = {"val_ppl": evaluate(base, data["val"], batch_size=64)["ppl"],
                 "answer_ppl": evaluate(base, data["val_answer"], batch_size=64)["ppl"]}
    runlog = RunLog(out / "runs.jsonl", _settings(cfg), RUN_KEYS)
    plan = [(name, rank, seed) for name in (methods or list(METHODS)) for rank in (ranks or cfg.ranks)
            for seed in (seeds or cfg.seeds)]
    for name, rank, seed in plan:
        if runlog.done(name, rank, seed) is None:
            runlog.add(_run_one(cfg, base_dir, name, rank, seed, data, out))
    runs = [runlog.done(*key) for key in plan]
    elapsed = time.perf_counter() - t0
    meta = {
        "config": dataclasses.asdict(cfg),
        "methods": METHODS,
        "base": {**base_eval, "pretrain_val_ppl": stamp["val_ppl"], "params": stamp["params"],
                 "sha256": stamp["sha256"], "pretrain_seconds": round(stamp["seconds"], 1)},
        "machine": machine_info(),
        "sweep_seconds": round(sum(run["seconds"] for run in runs), 1),
        "command": command,
    }
    results = {"study": STUDY, "meta": meta, "runs": runs}
    write_records(out / "results.json", STUDY, meta, runs)
    from results_page import rank_scaling_table

    (out / "results.md").write_text(rank_scaling_table(results) + "\n")
    _write_plots(out, runs)
    log.info("sweep done in %.0f s; outputs in %s", elapsed, out)
    return results


def _write_plots(out: Path, runs: list[dict[str, Any]]) -> None:
    from matplotlib.figure import Figure

    from nora_spectra.plots import color, effective_rank_vs_rank, spectrum_decay

    methods = list(dict.fromkeys(run["method"] for run in runs))
    fig = Figure(figsize=(6.4, 4.0), dpi=100, layout="constrained")
    ax = fig.add_subplot()
    for i, name in enumerate(methods):
        ranks = sorted({run["rank"] for run in runs if run["method"] == name})
        values = [[run["val_ppl"] for run in runs if run["method"] == name and run["rank"] == r] for r in ranks]
        means = [sum(v) / len(v) for v in values]
        ax.plot(ranks, means, marker="o", color=color(i), label=name)
        for r, v in zip(ranks, values):
            ax.scatter([r] * len(v), v, color=color(i), s=8, alpha=0.5)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("rank r")
    ax.set_ylabel("validation perplexity")
    ax.set_title("Validation perplexity against rank (mean over seeds; dots: seeds)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize="small")
    fig.savefig(out / "ppl_vs_rank.png")
    dirs = [out / "adapters" / f"{run['method']}-r{run['rank']}-s{run['seed']}" for run in runs]
    series = [run["method"] for run in runs]
    analyses = {
        "activation": [Analysis.from_json((d / "activation.json").read_text()) for d in dirs],
        "weight": [analyze(d, emit_warnings=False) for d in dirs],
    }
    for space, found in analyses.items():
        fig = effective_rank_vs_rank(found, series=series, annotate=False,
                                     title=f"Effective rank against rank budget ({space} space)")
        fig.savefig(out / f"erank_vs_rank_{space}.png")
    top = max(run["rank"] for run in runs)
    first = min(run["seed"] for run in runs)
    at_top = [(run["method"], a) for run, a in zip(runs, analyses["activation"])
              if run["rank"] == top and run["seed"] == first]
    fig = spectrum_decay(at_top, title=f"Activation-space spectra at r={top}, seed {first} (mean over modules)")
    fig.savefig(out / f"spectra_r{top}.png")


def check(results_file: Path, out: Path, methods: list[str] | None, ranks: list[int] | None,
          seeds: list[int] | None) -> int:
    """Rerun the selected committed runs and compare them at the printed precision; 0 when all reproduce."""
    committed = read_records(results_file)
    if committed["study"] != STUDY:
        raise SystemExit(f"{results_file}: a {committed['study']!r} results file, not {STUDY!r}")
    cfg = SweepConfig.from_dict(committed["meta"]["config"])
    chosen = [run for run in committed["runs"]
              if (not methods or run["method"] in methods) and (not ranks or run["rank"] in ranks)
              and (not seeds or run["seed"] in seeds)]
    if not chosen:
        raise SystemExit(f"{results_file}: no committed run matches the selection")
    out.mkdir(parents=True, exist_ok=True)
    stamp = _pretrain(cfg, out)
    want_sha = committed["meta"]["base"]["sha256"]
    if stamp["sha256"] != want_sha:
        print(f"base model differs: committed sha256 {want_sha}, here {stamp['sha256']} "
              "(another machine type or library version?); comparing the runs anyway")
    data = _data(cfg)
    failures = 0
    for run in chosen:
        rerun = _run_one(cfg, out / "base", run["method"], run["rank"], run["seed"], data, out)
        problems = check_run(run, rerun)
        label = f"{run['method']} r={run['rank']} seed {run['seed']}"
        if problems:
            failures += 1
            print(f"DIFFERS  {label}: " + "; ".join(problems))
        else:
            exact = all(run[k] == rerun[k] for k in run if k != "seconds")
            print(f"REPRODUCED  {label} ({'bit for bit' if exact else 'to the printed precision'})")
    return 1 if failures else 0


def main(argv: list[str] | None = None) -> int:
    """Command line: ``--quick`` | full sweep, ``--out DIR``, ``--methods`` / ``--ranks`` / ``--seeds``
    subsets, ``--steps``; ``--check RESULTS`` reruns committed runs and compares them."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny model and few steps (CI smoke test)")
    parser.add_argument("--out", type=Path, default=Path("runs/rank_scaling"), help="output directory")
    parser.add_argument("--methods", nargs="+", choices=list(METHODS), help="subset of methods")
    parser.add_argument("--ranks", nargs="+", type=int, help="subset of ranks")
    parser.add_argument("--seeds", nargs="+", type=int, help="seeds (default: the config's, 0 1 2)")
    parser.add_argument("--steps", type=int, help="override the fine-tuning steps")
    parser.add_argument("--check", type=Path, metavar="RESULTS",
                        help="rerun the selected runs of this committed results.json and compare them")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)
    if args.check:
        return check(args.check, args.out, args.methods, args.ranks, args.seeds)
    cfg = QUICK if args.quick else FULL
    if args.steps:
        cfg = dataclasses.replace(cfg, steps=args.steps)
    command = " ".join(["bench/rank_scaling.py"] + [a for a in (argv if argv is not None else sys.argv[1:])])
    run_sweep(cfg, args.out, args.methods, args.ranks, args.seeds, command)
    print((args.out / "results.md").read_text(), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
