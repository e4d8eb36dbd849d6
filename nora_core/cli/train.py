"""``nora train``: fine-tune LoRA or NoRA adapters on a JSONL dataset.

Takes flags or a TOML file (``--config run.toml``) whose keys are the option names (``steps = 200``,
``method = "nora"``, ``targets = ["q_proj", "v_proj"]``); flags given on the command line override the
file. Relative paths in the file are relative to the file's directory. With ``--track-every N`` the
adapters' spectra are tracked through :class:`nora_spectra.tracking.SpectralTracking`.
"""

from __future__ import annotations

import os
from typing import Any

import click

from nora_core.cli._common import (
    BoundedInt,
    ExistingPath,
    csv_list,
    load_toml,
    progress_wanted,
    run_or_fail,
    seed_everything,
)

__all__ = ["train_command", "tracking_callbacks"]


def tracking_callbacks(track_every: int) -> list[Any]:
    """The trainer callbacks for ``--track-every``: the spectral tracking of nora_spectra, or none."""
    if not track_every:
        return []
    from nora_spectra.tracking import SpectralTracking

    return [SpectralTracking()]


@click.command("train")
@click.option("--config", type=click.Path(dir_okay=False), is_eager=True, expose_value=False,
              callback=load_toml, help="TOML file of option values (flags override it).")
@click.option("--model", "model_dir", type=ExistingPath(directory=True), required=True,
              help="Base model directory written by `nora pretrain` (config.json + model.safetensors).")
@click.option("--data", type=ExistingPath(directory=False), required=True, help="Training JSONL.")
@click.option("--eval-data", type=ExistingPath(directory=False), help="Validation JSONL.")
@click.option("--format", "data_format", type=click.Choice(["auto", "text", "qa", "mathinstruct", "conversations"]),
              default="auto", show_default=True, help="Record format of the JSONL files.")
@click.option("--max-length", type=BoundedInt(max=2**20), default=256, show_default=True,
              help="Longest sequence in tokens (capped at the model's block size).")
@click.option("--response-only/--full-sequence", default=True, show_default=True,
              help="Compute the loss on the answer only, or on prompt and answer.")
@click.option("--skip-malformed", is_flag=True, help="Skip malformed JSONL lines (counted) instead of failing.")
@click.option("--method", type=click.Choice(["lora", "nora"]), default="nora", show_default=True)
@click.option("--rank", "--r", "rank", type=BoundedInt(max=2**16), default=8, show_default=True,
              help="Adapter rank r (--r also works, but not under torchrun, which takes --r for its own options).")
@click.option("--alpha", type=float, help="Scale numerator (scale = alpha / r); default alpha = r.")
@click.option("--rslora", is_flag=True, help="Scale alpha / sqrt(r).")
@click.option("--activation", type=click.Choice(["silu", "relu", "gelu", "identity"]), default="silu",
              show_default=True, help="NoRA's activation.")
@click.option("--dropout", type=float, help="Adapter dropout (default: LoRA 0.0, NoRA 0.1).")
@click.option("--targets", default="q_proj,v_proj", show_default=True, help="Comma-separated target modules.")
@click.option("--run-dir", type=click.Path(file_okay=False), required=True,
              help="Where checkpoints, metrics.jsonl and the adapter go.")
@click.option("--steps", type=BoundedInt(max=2**40), default=200, show_default=True)
@click.option("--batch-size", type=BoundedInt(max=2**16), default=16, show_default=True, help="Global batch (sequences per step).")
@click.option("--grad-accum", type=BoundedInt(max=2**16), default=1, show_default=True)
@click.option("--lr", type=float, default=1e-3, show_default=True)
@click.option("--warmup", type=BoundedInt(max=2**40), default=10, show_default=True, help="Linear warmup steps (at most --steps).")
@click.option("--min-lr-ratio", type=float, default=0.1, show_default=True)
@click.option("--weight-decay", type=float, default=0.0, show_default=True)
@click.option("--grad-clip", type=float, default=1.0, show_default=True, help="Max grad norm (0 disables).")
@click.option("--bf16", is_flag=True, help="bf16 autocast.")
@click.option("--seed", type=BoundedInt(0, 2**63 - 1), default=0, show_default=True)
@click.option("--device", default="auto", show_default=True)
@click.option("--eval-every", type=BoundedInt(max=2**40), default=50, show_default=True)
@click.option("--eval-batches", type=BoundedInt(max=2**40), help="Evaluate on at most this many batches.")
@click.option("--save-every", type=BoundedInt(max=2**40), default=100, show_default=True, help="Checkpoint interval (0: never).")
@click.option("--keep-last", type=BoundedInt(max=2**40), default=2, show_default=True)
@click.option("--track-every", type=BoundedInt(max=2**40), default=25, show_default=True, help="Spectral tracking interval (0: off).")
@click.option("--log-every", type=BoundedInt(max=2**40), default=10, show_default=True)
@click.option("--resume", is_flag=True, help="Continue from the latest checkpoint in --run-dir.")
@click.option("--progress/--no-progress", default=None, help="Progress bar on stderr (default: only when stderr is a terminal, never in CI logs).")
def train_command(**opts: Any) -> None:
    """Fine-tune LoRA or NoRA adapters on a JSONL dataset.

    Integer options have upper bounds (rank 2**16, batch size 2**16, max length 2**20, counts 2**40)
    so that a value from a hostile config cannot ask for terabytes or an endless batch loop.
    """
    result = _train_from_options(opts)
    _echo_result(result)


def _train_from_options(opts: dict[str, Any]) -> Any:
    from nora_core.config import AdapterConfig
    from nora_core.data import load_dataset
    from nora_core.inject import inject_adapters
    from nora_core.models import GPT
    from nora_core.trainer import TrainConfig, train

    seed_everything(opts["seed"])  # before the adapters' random A: --seed N must give the same run twice
    model = run_or_fail(GPT.from_pretrained, opts["model_dir"])
    max_length = min(opts["max_length"], model.config.block_size)
    read = dict(format=opts["data_format"], max_length=max_length, response_only=opts["response_only"],
                skip_malformed=opts["skip_malformed"])
    train_data = run_or_fail(load_dataset, opts["data"], **read)
    eval_data = run_or_fail(load_dataset, opts["eval_data"], **read) if opts["eval_data"] else None
    adapter = run_or_fail(
        AdapterConfig, method=opts["method"], r=opts["rank"], alpha=opts["alpha"], use_rslora=opts["rslora"],
        target_modules=csv_list(opts["targets"]), dropout=opts["dropout"], activation=opts["activation"],
        base_model_name_or_path=opts["model_dir"],
    )
    run_or_fail(inject_adapters, model, adapter)
    config = run_or_fail(
        TrainConfig, run_dir=opts["run_dir"], steps=opts["steps"], batch_size=opts["batch_size"],
        grad_accum_steps=opts["grad_accum"], lr=opts["lr"], warmup_steps=min(opts["warmup"], opts["steps"]),
        min_lr_ratio=opts["min_lr_ratio"], weight_decay=opts["weight_decay"],
        grad_clip=opts["grad_clip"] or None, bf16=opts["bf16"], seed=opts["seed"], device=opts["device"],
        eval_every=opts["eval_every"], eval_batches=opts["eval_batches"], save_every=opts["save_every"],
        keep_last=opts["keep_last"], track_spectra_every=opts["track_every"], log_every=opts["log_every"],
        resume=opts["resume"], progress=progress_wanted(opts["progress"]),
    )
    return run_or_fail(train, model, config, train_data, eval_data, callbacks=tracking_callbacks(opts["track_every"]))


def _echo_result(result: Any) -> None:
    if int(os.environ.get("RANK", "0")) != 0:  # under torchrun only rank 0 reports
        return
    click.echo(f"run_dir: {result.run_dir}")
    loss = "-" if result.train_loss is None else f"{result.train_loss:.4f}"  # None: nothing left to train
    parts = [f"steps: {result.steps}", f"train_loss: {loss}"]
    if result.val_loss is not None:
        parts += [f"val_loss: {result.val_loss:.4f}", f"val_ppl: {result.val_ppl:.3f}"]
    parts.append(f"tokens/s: {result.tokens_per_s:.0f}")
    click.echo("  ".join(parts))
