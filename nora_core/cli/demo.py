"""``nora demo``: pretrain a small GPT (cached), fine-tune LoRA and NoRA at two ranks, analyse and report.

A face over both packages: training comes from ``nora_core``, the spectral tracking, the analysis JSON
and the HTML report from ``nora_spectra``.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any

import click

from nora_core.cli._common import csv_list, progress_wanted, run_or_fail, seed_everything
from nora_core.cli.train import tracking_callbacks
from nora_core.pretrain import pretrain_base

__all__ = ["DEMO_DEFAULTS", "demo_command", "run_demo"]

logger = logging.getLogger("nora_core.cli")

#: Settings of ``nora demo``, sized to finish within 3 minutes on 2 CPU cores (see docs/training.md).
DEMO_DEFAULTS: dict[str, Any] = {
    "base": {"steps": 250, "batch_size": 16, "block_size": 128, "n_layer": 4, "n_embd": 128, "n_head": 4,
             "lr": 2e-3, "corpus_bytes": 1_000_000, "seed": 0},
    "n_train": 2000,
    "n_val": 128,
    "finetune_steps": 100,
    "batch_size": 16,
    "lr": 5e-3,
    "track_every": 20,
}


def _base_is_cached(base: Path, settings: dict[str, Any]) -> bool:
    marker = base / "pretrain.json"
    return marker.is_file() and (base / "model.safetensors").is_file() and json.loads(
        marker.read_text(encoding="utf-8")
    ) == settings


def _spectra_report_hook(out: Path, run_dirs: list[Path]) -> str:
    """HOOK(spectra report): render the demo's HTML report with ``spectra report`` (nora_spectra.cli).

    ``spectra report RUN_DIR...`` reads each run's ``metrics.jsonl`` (loss curves, effective-rank
    trajectories) and final adapter. It belongs to nora_spectra; if it is missing or fails, the demo
    still succeeds and says which command to run.

    Returns:
        ``"wrote PATH"``, or the command line to run by hand.
    """
    target = out / "report.html"
    labels = ",".join(d.name for d in run_dirs)
    args = ["report", *(str(d) for d in run_dirs), "--labels", labels, "-o", str(target), "--quiet"]
    try:
        from nora_spectra.cli.main import cli as spectra_cli

        spectra_cli.main(args=args, prog_name="spectra", standalone_mode=False)
        return f"wrote {target}"
    except Exception as exc:  # noqa: BLE001 - the report is optional; the runs are already written
        logger.warning("spectra report failed (%s); run it by hand", exc)
        return "spectra " + " ".join(args[:-1])


@click.command("demo")
@click.option("--out", type=click.Path(file_okay=False), default="nora-demo", show_default=True,
              help="Folder for the base model (cached), data, runs and analyses.")
@click.option("--methods", default="lora,nora", show_default=True)
@click.option("--ranks", default="4,16", show_default=True)
@click.option("--pretrain-steps", type=int, default=DEMO_DEFAULTS["base"]["steps"], show_default=True)
@click.option("--finetune-steps", type=int, default=DEMO_DEFAULTS["finetune_steps"], show_default=True)
@click.option("--threads", type=int, default=1, show_default=True,
              help="torch CPU threads (0: torch's default). One thread keeps the small model fast even on a "
                   "machine busy with other work, where competing OpenMP threads slow it down many times.")
@click.option("--progress/--no-progress", default=None, help="Progress bar on stderr (default: only when stderr is a terminal, never in CI logs).")
def demo_command(
    out: str, methods: str, ranks: str, pretrain_steps: int, finetune_steps: int, threads: int, progress: bool
) -> None:
    """Pretrain a small GPT (cached), fine-tune LoRA and NoRA at two ranks on arithmetic, analyse spectra."""
    started = time.perf_counter()
    if threads:
        import torch

        torch.set_num_threads(threads)
    root = Path(out)
    summary = run_or_fail(
        run_demo, root, methods=csv_list(methods), ranks=[int(r) for r in csv_list(ranks)],
        pretrain_steps=pretrain_steps, finetune_steps=finetune_steps, progress=progress_wanted(progress),
    )
    click.echo(f"{'run':<10} {'val_loss':>9} {'val_ppl':>8} {'erank':>7} {'util':>6}  analysis")
    for row in summary:
        if "report_command" in row:
            continue
        erank = "-" if row["effective_rank"] is None else f"{row['effective_rank']:.2f}"
        util = "-" if row["utilization"] is None else f"{row['utilization']:.2f}"
        click.echo(f"{row['run']:<10} {row['val_loss']:>9.4f} {row['val_ppl']:>8.3f} {erank:>7} {util:>6}  "
                   f"{row['analysis'] or '-'}")
    click.echo(f"done in {time.perf_counter() - started:.1f} s; runs in {root / 'runs'}")
    click.echo(f"report: {summary[-1]['report_command']}")  # "wrote PATH" or the command to run


def run_demo(
    root: Path, *, methods: list[str], ranks: list[int], pretrain_steps: int, finetune_steps: int,
    progress: bool = False,
) -> list[dict[str, Any]]:
    """The body of ``nora demo``.

    Returns:
        One row per run: ``run``, ``val_loss``, ``val_ppl``, ``effective_rank`` and ``utilization``
        (means over modules at the last tracked step) and ``analysis`` (path of the JSON, or None);
        then a last row ``{"report_command": ...}`` from the report hook.
    """
    from nora_core.arithmetic import arithmetic_splits
    from nora_core.config import AdapterConfig
    from nora_core.data import TokenDataset, parse_record, write_jsonl
    from nora_core.inject import inject_adapters
    from nora_core.models import GPT
    from nora_core.trainer import TrainConfig, train

    if not methods or not ranks or any(r < 1 for r in ranks):
        raise ValueError("--methods and --ranks need at least one method and positive ranks")
    base_settings = {**DEMO_DEFAULTS["base"], "steps": pretrain_steps}
    base = root / "base"
    if _base_is_cached(base, base_settings):
        logger.info("using the cached base model in %s", base)
    else:
        t0 = time.perf_counter()
        pretrain_base(base, progress=progress, **base_settings)
        (base / "pretrain.json").write_text(json.dumps(base_settings, indent=2) + "\n", encoding="utf-8")
        logger.info("pretrained the base in %.1f s", time.perf_counter() - t0)

    train_rows, val_rows = arithmetic_splits(DEMO_DEFAULTS["n_train"], DEMO_DEFAULTS["n_val"], seed=0)
    write_jsonl(_mkdir(root / "data") / "train.jsonl", train_rows)
    write_jsonl(root / "data" / "val.jsonl", val_rows)
    block = json.loads((base / "config.json").read_text())["block_size"]

    def dataset(rows: list[dict]) -> TokenDataset:
        return TokenDataset.from_samples([parse_record(r) for r in rows], max_length=block, response_only=True)

    train_data, val_data = dataset(train_rows), dataset(val_rows)
    seed = 0
    summary = []
    run_dirs = []
    for method in methods:
        for r in ranks:
            name = f"{method}-r{r}"
            run_dir = root / "runs" / name
            if run_dir.exists():
                shutil.rmtree(run_dir)
            seed_everything(seed)  # each run's A init depends on its seed only, not on what ran before
            model = GPT.from_pretrained(base)
            inject_adapters(model, AdapterConfig(method=method, r=r, alpha=2 * r, target_modules=["q_proj", "v_proj"],
                                                 base_model_name_or_path=str(base)))
            config = TrainConfig(
                run_dir=str(run_dir), steps=finetune_steps, batch_size=DEMO_DEFAULTS["batch_size"],
                lr=DEMO_DEFAULTS["lr"], warmup_steps=min(10, finetune_steps),
                eval_every=max(1, finetune_steps // 2), track_spectra_every=DEMO_DEFAULTS["track_every"],
                log_every=10, seed=seed, progress=progress,
            )
            logger.info("fine-tuning %s", name)
            result = train(model, config, train_data, val_data, callbacks=tracking_callbacks(config.track_spectra_every))
            spectra = next((h["spectra"] for h in reversed(result.history) if "spectra" in h), [])
            eranks = [s["effective_rank"] for s in spectra if s["effective_rank"] is not None]
            utils = [s["utilization"] for s in spectra if s["utilization"] is not None]
            summary.append({
                "run": name, "val_loss": result.val_loss, "val_ppl": result.val_ppl,
                "effective_rank": sum(eranks) / len(eranks) if eranks else None,
                "utilization": sum(utils) / len(utils) if utils else None,
                "analysis": _write_analysis(run_dir),
            })
            run_dirs.append(run_dir)
    summary.append({"report_command": _spectra_report_hook(root, run_dirs)})
    return summary


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def _write_analysis(run_dir: Path) -> str | None:
    """``spectra analyze`` JSON of the run's final adapter, as ``run_dir/analysis.json``."""
    from nora_core.atomic import atomic_write_text
    from nora_spectra import analyze

    analysis = analyze(run_dir / "adapter", emit_warnings=False)
    path = run_dir / "analysis.json"
    atomic_write_text(path, analysis.to_json() + "\n")
    return os.fspath(path)
