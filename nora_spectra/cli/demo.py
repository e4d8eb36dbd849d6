"""``spectra demo``: train a small LoRA and a small NoRA adapter on built-in data, then analyse both.

No downloads, a few seconds on two CPU cores. The task is teacher-student regression: a frozen,
seeded residual MLP (the "base model") must learn to imitate a teacher, the same network whose
``up_proj``/``down_proj`` weights were moved by a fixed rank-24 update with a decaying spectrum. A
rank-16 adapter on every projection is trained by real gradient descent (Adam, MSE); the checkpoints
are written in PEFT's layout by ``nora_core.save_adapter`` and analysed exactly as a user's would be.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass
from typing import Any

import click

__all__ = ["DemoSettings", "command", "run_demo"]


@dataclass(frozen=True)
class DemoSettings:
    """Sizes of the demo (defaults keep it well under 30 s on 2 cores).

    Attributes:
        width: model width d (every projection is d -> 2d -> d).
        layers: residual MLP blocks.
        target_rank: rank of the teacher's weight update in every projection.
        r: adapter rank.
        steps: optimiser steps per adapter.
        batch: samples per step (fresh Gaussian inputs every step).
        lr: Adam learning rate.
        seed: seeds the base model, the teacher and the data.
    """

    width: int = 64
    layers: int = 2
    target_rank: int = 24
    r: int = 16
    steps: int = 400
    batch: int = 128
    lr: float = 3e-3
    seed: int = 0


def _build_models(settings: DemoSettings) -> tuple[Any, Any]:
    """(base, teacher): seeded residual MLPs with modules ``layers.{i}.up_proj`` / ``layers.{i}.down_proj``."""
    import torch
    from torch import nn

    class Block(nn.Module):
        def __init__(self, d: int) -> None:
            super().__init__()
            self.up_proj = nn.Linear(d, 2 * d)
            self.down_proj = nn.Linear(2 * d, d)

        def forward(self, x: torch.Tensor) -> torch.Tensor:  # (batch, d) -> (batch, d)
            return x + self.down_proj(torch.nn.functional.gelu(self.up_proj(x)))

    class ResidualMLP(nn.Module):
        def __init__(self, d: int, n: int) -> None:
            super().__init__()
            self.layers = nn.ModuleList(Block(d) for _ in range(n))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            for block in self.layers:
                x = block(x)
            return x

    gen = torch.Generator().manual_seed(settings.seed)
    torch.manual_seed(settings.seed)
    base = ResidualMLP(settings.width, settings.layers)
    teacher = ResidualMLP(settings.width, settings.layers)
    teacher.load_state_dict(base.state_dict())
    k = settings.target_rank
    decay = torch.exp(-torch.arange(k, dtype=torch.float32) / (k / 4))  # a decaying target spectrum
    with torch.no_grad():
        for module in teacher.modules():
            if isinstance(module, nn.Linear):
                d_out, d_in = module.weight.shape
                u = torch.linalg.qr(torch.randn(d_out, k, generator=gen))[0]
                v = torch.linalg.qr(torch.randn(d_in, k, generator=gen))[0]
                module.weight += 0.5 * (u * decay) @ v.T
    base.requires_grad_(False)
    teacher.requires_grad_(False)
    return base, teacher


def _train(method: str, settings: DemoSettings, directory: str) -> float:
    """Inject a ``method`` adapter into a fresh base model, train it, save it; return the final MSE."""
    import torch

    from nora_core import AdapterConfig, inject_adapters, save_adapter

    base, teacher = _build_models(settings)
    config = AdapterConfig(method=method, r=settings.r, alpha=settings.r, target_modules=["up_proj", "down_proj"])
    model = inject_adapters(base, config)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=settings.lr)
    gen = torch.Generator().manual_seed(settings.seed + 1)
    model.train()
    loss = torch.tensor(math.nan)
    for _ in range(settings.steps):
        x = torch.randn(settings.batch, settings.width, generator=gen)
        loss = torch.nn.functional.mse_loss(model(x), teacher(x))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    model.eval()
    with torch.no_grad():
        x = torch.randn(4 * settings.batch, settings.width, generator=gen)
        final = float(torch.nn.functional.mse_loss(model(x), teacher(x)))
    save_adapter(model, directory)
    return final


def run_demo(output_dir: str, settings: DemoSettings = DemoSettings()) -> dict[str, Any]:
    """Train both adapters into ``output_dir/{lora,nora}`` and analyse them.

    Returns:
        ``{"lora": Analysis, "nora": Analysis, "loss": {method: eval MSE}, "seconds": float}``.
    """
    import torch

    from nora_spectra.analysis import analyze

    start = time.perf_counter()
    # The model is tiny: one thread is fastest, and intra-op threads spin badly on a busy machine.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    os.makedirs(output_dir, exist_ok=True)
    result: dict[str, Any] = {"loss": {}}
    try:
        for method in ("lora", "nora"):
            directory = os.path.join(output_dir, method)
            result["loss"][method] = _train(method, settings, directory)
            result[method] = analyze(directory, emit_warnings=False)
    finally:
        torch.set_num_threads(threads)
    result["seconds"] = time.perf_counter() - start
    return result


def _num(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


@click.command("demo")
@click.option(
    "--output-dir",
    type=click.Path(file_okay=False),
    default="spectra-demo",
    show_default=True,
    help="Where to write the lora/ and nora/ checkpoints.",
)
@click.option("--steps", type=click.IntRange(1, 100_000), default=DemoSettings.steps, show_default=True,
              help="Training steps per adapter.")
@click.option("--report/--no-report", default=True, show_default=True,
              help="Also write OUTPUT_DIR/report.html (spectra report of both checkpoints).")
def command(output_dir: str, steps: int, report: bool) -> None:
    """Train a rank-16 LoRA and NoRA adapter on a built-in task and show how much rank each uses."""
    from nora_spectra._torch import require_torch
    from nora_spectra.render import render

    require_torch("spectra demo")
    result = run_demo(output_dir, DemoSettings(steps=steps))
    for method in ("lora", "nora"):
        analysis = result[method]
        click.echo(f"== {method.upper()} (eval MSE {result['loss'][method]:.4g})")
        click.echo(render(analysis, "table", effective_rank=True))
    util = {m: result[m].summary["metrics"]["utilization"] for m in ("lora", "nora")}
    click.echo(
        f"mean utilization: LoRA {_num(util['lora']['mean'])}, NoRA {_num(util['nora']['mean'])} "
        f"(rank-weighted {_num(util['lora']['weighted_mean'])} vs {_num(util['nora']['weighted_mean'])}, "
        f"r={DemoSettings.r})"
    )
    lora_mean, nora_mean = util["lora"]["mean"], util["nora"]["mean"]
    ratio = f"{nora_mean / lora_mean:.2f}" if lora_mean and nora_mean is not None else "n/a"
    click.echo(
        f"NoRA/LoRA mean utilization on this task: {ratio}; checkpoints in {output_dir}/ "
        f"(try: spectra analyze {output_dir}/nora --format json)"
    )
    if report:
        from nora_spectra.report import report as write_report

        html = os.path.join(output_dir, "report.html")
        write_report([result["lora"], result["nora"]], html, labels=["LoRA", "NoRA"],
                     title=f"spectra demo: LoRA vs NoRA, r={DemoSettings.r}")
        click.echo(f"report with plots: {html}")
    click.echo(f"demo took {result['seconds']:.1f} s", err=True)
