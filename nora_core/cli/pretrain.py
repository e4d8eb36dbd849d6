"""``nora pretrain``: pretrain the small built-in GPT on Python's own docstrings (offline)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from nora_core.cli._common import progress_wanted, run_or_fail
from nora_core.pretrain import pretrain_base

__all__ = ["pretrain_command"]


@click.command("pretrain")
@click.option("--out", type=click.Path(file_okay=False), required=True, help="Directory for the base model.")
@click.option("--steps", type=int, default=400, show_default=True)
@click.option("--batch-size", type=int, default=16, show_default=True)
@click.option("--block-size", type=int, default=128, show_default=True)
@click.option("--n-layer", type=int, default=4, show_default=True)
@click.option("--n-embd", type=int, default=128, show_default=True)
@click.option("--n-head", type=int, default=4, show_default=True)
@click.option("--lr", type=float, default=2e-3, show_default=True)
@click.option("--corpus-bytes", type=int, default=1_000_000, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--progress/--no-progress", default=None, help="Progress bar on stderr (default: only when stderr is a terminal, never in CI logs).")
def pretrain_command(out: str, **opts: Any) -> None:
    """Pretrain the small built-in GPT on Python's own docstrings (offline)."""
    opts["progress"] = progress_wanted(opts["progress"])
    result = run_or_fail(pretrain_base, Path(out), **opts)
    click.echo(f"base model: {out}")
    click.echo(f"steps: {result.steps}  train_loss: {result.train_loss:.4f}  tokens/s: {result.tokens_per_s:.0f}")
