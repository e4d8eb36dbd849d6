"""The settings and the result of a training run, and its learning-rate schedule.

:class:`TrainConfig` holds everything :func:`nora_core.trainer.train` needs besides the model and
the data, validated when it is built; :class:`TrainResult` is what a run returns; :func:`get_lr` is
the pure warmup + cosine schedule (nanoGPT's ``get_lr``); :class:`NonFiniteLossError` is raised when
the loss or gradient norm stops being finite; :class:`TrainCallback` is what ``train(callbacks=...)`` takes.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Protocol

__all__ = ["FLOAT32_MAX", "TrainCallback", "TrainConfig", "TrainResult", "NonFiniteLossError", "check_step_size", "get_lr"]


class TrainCallback(Protocol):
    """Called by the trainer at tracking steps; what it returns is merged into that step's metrics record.

    The spectral tracking of :class:`nora_spectra.tracking.SpectralTracking` is one: it returns
    ``{"spectra": [record, ...]}``.
    """

    def __call__(self, step: int, model: Any) -> Mapping[str, Any]: ...


class NonFiniteLossError(RuntimeError):
    """The training loss or gradient norm became NaN/Inf; the run stopped before updating the weights."""


@dataclass
class TrainConfig:
    """Everything :func:`train` needs besides the model and the data.

    Attributes:
        run_dir: where checkpoints, ``metrics.jsonl`` and the final adapter go; None writes nothing.
        steps: optimizer steps to run in total (a resumed run continues up to this number).
        batch_size: sequences per optimizer step, across all processes and accumulation steps
            (the global batch). Must be divisible by ``grad_accum_steps * world_size``.
        grad_accum_steps: micro-batches accumulated per optimizer step (per process).
        lr: peak learning rate.
        min_lr_ratio: the cosine decays to ``lr * min_lr_ratio``.
        warmup_steps: linear warmup steps (0 to ``steps``).
        weight_decay: AdamW's decoupled weight decay.
        betas: AdamW's betas.
        adam_eps: AdamW's epsilon.
        grad_clip: maximum global grad norm; None disables clipping.
        bf16: run forward and loss under ``torch.autocast(dtype=torch.bfloat16)``.
        seed: seeds the data order and the torch RNG (``seed + rank``) used by dropout.
        shuffle: permute the data each epoch (False: file order).
        device: ``"auto"`` (the local CUDA device if there is one, else CPU), ``"cpu"``, ``"cuda"``...
        eval_every: evaluate on ``eval_data`` every N steps and at the end (0: only at the end).
        eval_batch_size: sequences per evaluation batch (global); default ``batch_size``.
        eval_batches: evaluate on at most this many batches (None: the whole set).
        save_every: checkpoint every N steps and at the end (0: never); needs ``run_dir``.
        keep_last: how many of the latest checkpoints to keep (the best adapter is kept separately).
        track_spectra_every: call the tracking callbacks (``train(callbacks=...)``; e.g. the adapters'
            spectra) every N steps and at the end (0: never).
        log_every: write a metrics record every N steps (also at eval/tracking/last steps).
        resume: continue from the latest checkpoint in ``run_dir`` (start fresh if there is none).
        progress: show a tqdm progress bar on stderr (rank 0).
    """

    run_dir: str | None = None
    steps: int = 100
    batch_size: int = 8
    grad_accum_steps: int = 1
    lr: float = 3e-4
    min_lr_ratio: float = 0.1
    warmup_steps: int = 0
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    adam_eps: float = 1e-8
    grad_clip: float | None = 1.0
    bf16: bool = False
    seed: int = 0
    shuffle: bool = True
    device: str = "auto"
    eval_every: int = 0
    eval_batch_size: int | None = None
    eval_batches: int | None = None
    save_every: int = 0
    keep_last: int = 2
    track_spectra_every: int = 0
    log_every: int = 10
    resume: bool = False
    progress: bool = False

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "grad_accum_steps", "keep_last", "log_every"):
            _check_int(name, getattr(self, name), minimum=1)
        for name in ("warmup_steps", "eval_every", "save_every", "track_spectra_every", "seed"):
            _check_int(name, getattr(self, name), minimum=0)
        for name in ("eval_batch_size", "eval_batches"):
            if getattr(self, name) is not None:
                _check_int(name, getattr(self, name), minimum=1)
        if self.warmup_steps > self.steps:
            raise ValueError(f"TrainConfig.warmup_steps ({self.warmup_steps}) exceeds steps ({self.steps})")
        if self.batch_size % self.grad_accum_steps:
            raise ValueError(
                f"TrainConfig.batch_size ({self.batch_size}) must be divisible by grad_accum_steps "
                f"({self.grad_accum_steps})"
            )
        if not (isinstance(self.lr, (int, float)) and math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"TrainConfig.lr must be a positive number, got {self.lr!r}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"TrainConfig.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio!r}")
        if self.weight_decay < 0:
            raise ValueError(f"TrainConfig.weight_decay must be >= 0, got {self.weight_decay!r}")
        self.betas = tuple(float(b) for b in self.betas)  # type: ignore[assignment]
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise ValueError(f"TrainConfig.betas must be two numbers in [0, 1), got {self.betas!r}")
        check_step_size(self.lr, self.betas[0], FLOAT32_MAX, "float32")
        if not (isinstance(self.adam_eps, (int, float)) and math.isfinite(self.adam_eps) and self.adam_eps > 0):
            raise ValueError(f"TrainConfig.adam_eps must be a positive number, got {self.adam_eps!r}")
        if not math.isfinite(self.weight_decay):
            raise ValueError(f"TrainConfig.weight_decay must be a finite number >= 0, got {self.weight_decay!r}")
        if self.grad_clip is not None and not self.grad_clip > 0:
            raise ValueError(f"TrainConfig.grad_clip must be > 0 or None, got {self.grad_clip!r}")
        if not isinstance(self.device, str) or not _DEVICE.fullmatch(self.device):
            raise ValueError(
                f"TrainConfig.device must be 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps', got {self.device!r}"
            )
        if self.run_dir is None and (self.save_every or self.resume):
            raise ValueError("TrainConfig.save_every and resume need a run_dir")
        if self.run_dir is not None:
            self.run_dir = os.fspath(self.run_dir)

    @property
    def min_lr(self) -> float:
        """The floor of the cosine decay."""
        return self.lr * self.min_lr_ratio

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (``betas`` as a list)."""
        data = dataclasses.asdict(self)
        data["betas"] = list(self.betas)
        return data


#: the largest float32 (and, within 0.4 %, bfloat16) value.
FLOAT32_MAX = 3.4028234663852886e38


def check_step_size(lr: float, beta1: float, largest: float, dtype: str) -> None:
    """Refuse a learning rate AdamW cannot apply to parameters whose largest value is ``largest``.

    AdamW's first update moves each parameter by ``lr / (1 - beta1)`` times a unit ratio, a scalar that
    torch converts to the parameters' dtype; beyond its largest value the step raises ``RuntimeError:
    value cannot be converted to type float without overflow`` (``nora train --lr 1e39``).

    Raises:
        ValueError: naming ``lr``, the step size and the limit.
    """
    step = lr / (1.0 - beta1)
    if not step <= largest:
        raise ValueError(
            f"TrainConfig.lr {lr:g} is too large for AdamW on {dtype} parameters: its first step, "
            f"lr / (1 - beta1) = {step:g}, exceeds the largest {dtype} value, {largest:.4g}"
        )


_DEVICE = re.compile(r"auto|cpu|cuda(:\d{1,4})?|mps")


def _check_int(name: str, value: Any, *, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"TrainConfig.{name} must be an int >= {minimum}, got {value!r}")


@dataclass
class TrainResult:
    """What a run did.

    Attributes:
        steps: optimizer steps completed (including those before a resume).
        train_loss: training loss of the last logged window (mean per-step loss).
        val_loss: validation loss at the end (None without eval data).
        val_ppl: ``exp(val_loss)``.
        best_val_loss: lowest validation loss seen, and ``best_step`` where.
        best_step: step of ``best_val_loss``.
        tokens: input tokens processed in this call (all processes).
        elapsed_s: seconds spent in training steps in this call (evaluation, tracking and checkpoint
            writing excluded).
        tokens_per_s: ``tokens / elapsed_s``.
        resumed_from: the checkpoint step the run resumed from, or None.
        run_dir: the run directory, or None.
        history: every metrics record of this call (the lines added to ``metrics.jsonl``).
    """

    steps: int
    train_loss: float | None
    val_loss: float | None
    val_ppl: float | None
    best_val_loss: float | None
    best_step: int | None
    tokens: int
    elapsed_s: float
    tokens_per_s: float
    resumed_from: int | None
    run_dir: Path | None
    history: list[dict[str, Any]] = field(default_factory=list, repr=False)


def get_lr(step: int, config: TrainConfig) -> float:
    """Learning rate of optimizer step ``step`` (0-based): linear warmup, then cosine decay.

    .. math::
        \\mathrm{lr}(s) = \\mathrm{lr} \\cdot \\frac{s + 1}{w} \\quad (s < w), \\qquad
        \\mathrm{lr}(s) = m + \\tfrac12 (1 + \\cos(\\pi p)) (\\mathrm{lr} - m), \\;
        p = \\min(1, \\tfrac{s - w}{\\max(1, S - w)})

    with warmup ``w``, total ``S`` steps and floor ``m = lr * min_lr_ratio``.

    Args:
        step: the step index, ``0 <= step``.
        config: supplies ``lr``, ``warmup_steps``, ``steps``, ``min_lr_ratio``.

    Returns:
        The learning rate.
    """
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    progress = min(1.0, (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps))
    return config.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (config.lr - config.min_lr)
