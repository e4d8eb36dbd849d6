"""Fine-tune adapters (or any trainable parameters) of a causal language model.

``train(model, config, train_data, eval_data=None)`` runs AdamW on the parameters that require grad
(after ``inject_adapters`` those are exactly the adapter factors) with linear warmup then cosine decay,
gradient accumulation, grad-norm clipping, optional bf16 autocast, periodic evaluation, atomic
checkpoints that resume bit-exactly on CPU, and spectral tracking of the adapters through
``nora_spectra`` into ``run_dir/metrics.jsonl``. The same code runs under ``torchrun`` with
DistributedDataParallel (gloo on CPU, nccl on GPU); only rank 0 writes.

Batching (global, independent of the number of processes)::

    step s uses the samples at positions [s * batch_size, (s + 1) * batch_size) of an endless
    stream of per-epoch permutations (seeded by (seed, epoch)); the global batch is cut into
    grad_accum_steps * world_size micro-batches; process `rank` runs micro-batch m * world_size + rank.

The loss is the mean cross entropy over every non-ignored label of the *global* batch, so one process
and N processes (or any accumulation) optimise the same objective. A mean over zero labels is never
reported as 0: training data with a row that has no label token is refused before the first step (so
every batch has one), and :func:`evaluate` raises when the rows it evaluates hold none.

Run directory layout (``TrainConfig.run_dir``)::

    train_config.json                  the TrainConfig
    metrics.jsonl                      one JSON record per logged step (schema in docs/training.md)
    checkpoints/step-000050/           adapter_config.json, adapter_model.safetensors (PEFT layout;
                                       model_state.pt when the model has no adapters), trainer_state.pt
    best/                              the adapter with the lowest validation loss, plus best.json
    adapter/                           the final adapter
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import random
import re
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from nora_core.atomic import atomic_write, atomic_write_text
from nora_core.data import IGNORE_INDEX, TokenDataset

__all__ = [
    "TrainConfig",
    "TrainResult",
    "NonFiniteLossError",
    "train",
    "get_lr",
    "evaluate",
    "adapter_spectra",
    "latest_checkpoint",
    "METRICS_NAME",
    "STATE_NAME",
]

logger = logging.getLogger(__name__)

METRICS_NAME = "metrics.jsonl"
STATE_NAME = "trainer_state.pt"
MODEL_STATE_NAME = "model_state.pt"
_CKPT_RE = re.compile(r"^step-(\d+)$")
_STATE_VERSION = 1


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
        track_spectra_every: record adapter spectra every N steps and at the end (0: never).
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
        if self.grad_clip is not None and not self.grad_clip > 0:
            raise ValueError(f"TrainConfig.grad_clip must be > 0 or None, got {self.grad_clip!r}")
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


# ----------------------------------------------------------------------------------------- helpers


def _logits(model: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    """``model(input_ids)`` as a logits tensor (B, T, V); accepts ``.logits`` objects and tuples."""
    out = model(input_ids)
    if hasattr(out, "logits"):
        out = out.logits
    elif isinstance(out, (tuple, list)):
        out = out[0]
    return out


def _loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed next-token cross entropy over non-ignored labels.

    Args:
        logits: (B, T, V).
        labels: (B, T), ``IGNORE_INDEX`` where masked.

    Returns:
        A 0-d float32 tensor.
    """
    return F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum"
    )


def _autocast(device: torch.device, enabled: bool) -> contextlib.AbstractContextManager:
    if not enabled:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def _as_dataset(data: Any, name: str) -> TokenDataset:
    if isinstance(data, TokenDataset):
        return data
    if isinstance(data, torch.Tensor) and data.ndim == 2 and data.shape[1] >= 2:
        # a (N, T + 1) block of token ids: plain language modelling
        ids = data.long()
        return TokenDataset(ids[:, :-1].clone(), ids[:, 1:].clone(), torch.full((ids.shape[0],), ids.shape[1] - 1))
    raise TypeError(
        f"{name} must be a nora_core.data.TokenDataset or a (N, T+1) LongTensor of token ids, "
        f"got {type(data).__name__}"
    )


def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, (np.floating, np.integer, np.bool_)):
        return _json_safe(value.item())
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def _adapter_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    from nora_core.inject import adapter_layers

    return list(adapter_layers(model))


def adapter_spectra(model: nn.Module) -> list[dict[str, Any]]:
    """Weight-space spectra of every adapter of ``model``, one record per module.

    The singular values of ``scaling * B @ A`` come from
    :func:`nora_spectra.spectrum.adapter_singular_values` and every metric from
    :func:`nora_spectra.metrics.spectrum_metrics` (nothing is computed here). For NoRA the branch is
    non-linear; these are the spectra of its linear factors (``docs/training.md``).

    Returns:
        ``[{"module", "module_type", "rank", "effective_rank", "utilization", "stable_rank",
        "sigma_max", "status"}, ...]`` in module order; metrics of a NaN/Inf factor are None.
    """
    from nora_spectra.metrics import non_finite_metrics, spectrum_metrics
    from nora_spectra.spectrum import NonFiniteFactorsError, adapter_singular_values

    records = []
    for name, layer in _adapter_layers(model):
        A = layer.lora_A.weight.detach().to("cpu", torch.float64).numpy()  # (r, d_in)
        B = layer.lora_B.weight.detach().to("cpu", torch.float64).numpy()  # (d_out, r)
        shape = (layer.in_features, layer.out_features) if layer.fan_in_fan_out else (layer.out_features, layer.in_features)
        try:
            sigma = adapter_singular_values(A, B, layer.scaling)
            metrics = spectrum_metrics(sigma, rank=layer.r, shape=shape)
        except NonFiniteFactorsError:
            metrics = non_finite_metrics()
        records.append(
            {
                "module": name,
                "module_type": name.rsplit(".", 1)[-1],
                "rank": layer.r,
                "effective_rank": metrics["effective_rank"],
                "utilization": metrics["utilization"],
                "stable_rank": metrics["stable_rank"],
                "sigma_max": metrics["sigma_max"],
                "status": metrics["status"],
            }
        )
    return records


@dataclass
class _Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    created: bool = False

    @property
    def main(self) -> bool:
        return self.rank == 0


def _setup_distributed(device_pref: str) -> _Dist:
    import torch.distributed as dist

    env_world = int(os.environ.get("WORLD_SIZE", "1"))
    if not dist.is_available() or (env_world <= 1 and not dist.is_initialized()):
        return _Dist()
    created = False
    if not dist.is_initialized():
        use_cuda = torch.cuda.is_available() and device_pref != "cpu"
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
        created = True
    return _Dist(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")), created)


def _resolve_device(pref: str, ctx: _Dist) -> torch.device:
    if pref == "auto":
        pref = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(pref)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", ctx.local_rank if ctx.world > 1 else torch.cuda.current_device())
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return device


def _all_reduce_sum(values: torch.Tensor, ctx: _Dist) -> torch.Tensor:
    if ctx.world > 1:
        import torch.distributed as dist

        dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values


class _Order:
    """Endless stream of per-epoch permutations; position p -> dataset index. Pure in (seed, p)."""

    def __init__(self, n: int, seed: int, shuffle: bool) -> None:
        self.n, self.seed, self.shuffle = n, seed, shuffle
        self._epoch = -1
        self._perm = torch.arange(n)

    def _permutation(self, epoch: int) -> torch.Tensor:
        if epoch != self._epoch:
            self._epoch = epoch
            if self.shuffle:
                gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
                self._perm = torch.randperm(self.n, generator=gen)
        return self._perm

    def take(self, start: int, count: int) -> torch.Tensor:
        """Dataset indices of stream positions ``[start, start + count)``, shape (count,)."""
        out = []
        pos = start
        while pos < start + count:
            epoch, offset = divmod(pos, self.n)
            chunk = min(self.n - offset, start + count - pos)
            out.append(self._permutation(epoch)[offset : offset + chunk])
            pos += chunk
        return torch.cat(out)


def evaluate(
    model: nn.Module,
    data: TokenDataset,
    *,
    batch_size: int = 8,
    max_batches: int | None = None,
    bf16: bool = False,
    _ctx: _Dist | None = None,
) -> dict[str, float]:
    """Mean next-token loss over every non-ignored label of ``data``, and its perplexity.

    Args:
        model: maps (B, T) ids to (B, T, V) logits (or an object with ``.logits``).
        data: the evaluation set.
        batch_size: sequences per batch (across processes under DDP).
        max_batches: evaluate on the first ``max_batches * batch_size`` rows only.
        bf16: evaluate under bf16 autocast.

    Returns:
        ``{"loss", "ppl", "tokens"}`` (``ppl = exp(loss)``, inf on overflow).

    Raises:
        ValueError: the evaluated rows hold no label token (every label is ``IGNORE_INDEX``): the mean
            loss over no token is undefined, and reporting 0 (ppl 1) would pass for a perfect model.
    """
    ctx = _ctx or _Dist()
    device = next(model.parameters()).device
    rows = len(data) if max_batches is None else min(len(data), max_batches * batch_size)
    was_training = model.training
    model.eval()
    totals = torch.zeros(2, dtype=torch.float64, device=device)
    with torch.no_grad():
        for start in range(0, rows, batch_size):
            idx = torch.arange(start, min(start + batch_size, rows))[ctx.rank :: ctx.world]
            if idx.numel() == 0:
                continue
            input_ids, labels = data.batch(idx)
            input_ids, labels = input_ids.to(device), labels.to(device)
            with _autocast(device, bf16):
                loss = _loss_sum(_logits(model, input_ids), labels)
            totals[0] += loss.double()
            totals[1] += (labels != IGNORE_INDEX).sum()
    model.train(was_training)
    _all_reduce_sum(totals, ctx)
    if totals[1] == 0:  # the same on every process after the all-reduce: all raise together
        raise ValueError(
            f"evaluation data: the {rows} evaluated row(s) hold no label token (every label is {IGNORE_INDEX}); "
            "the loss is undefined"
        )
    loss = float(totals[0] / totals[1])
    ppl = math.exp(loss) if loss < 700 else math.inf
    return {"loss": loss, "ppl": ppl, "tokens": int(totals[1])}


# ------------------------------------------------------------------------------------ checkpoints


def latest_checkpoint(run_dir: str | os.PathLike[str]) -> Path | None:
    """The complete checkpoint with the highest step in ``run_dir/checkpoints``, or None."""
    root = Path(run_dir) / "checkpoints"
    best: tuple[int, Path] | None = None
    if root.is_dir():
        for child in root.iterdir():
            match = _CKPT_RE.match(child.name)
            if match and (child / STATE_NAME).is_file() and (best is None or int(match.group(1)) > best[0]):
                best = (int(match.group(1)), child)
    return None if best is None else best[1]


def _list_checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    root = run_dir / "checkpoints"
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), c) for c in root.iterdir() if (m := _CKPT_RE.match(c.name))]
    return sorted(found)


def _rng_state() -> dict[str, Any]:
    """RNG states in a form ``torch.load(weights_only=True)`` accepts."""
    np_state = np.random.get_state()
    py_state = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        "numpy": {
            "key": np_state[0],
            "state": torch.from_numpy(np_state[1].astype(np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
        "python": [py_state[0], list(py_state[1]), py_state[2]],
    }


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    npst = state["numpy"]
    np.random.set_state(
        (npst["key"], npst["state"].numpy().astype(np.uint32), npst["pos"], npst["has_gauss"], npst["cached_gaussian"])
    )
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))


def _adapter_root(model: nn.Module) -> nn.Module:
    """The module ``inject_adapters`` was applied to: ``model`` itself or a wrapped sub-module."""
    from nora_core.inject import adapter_config

    for module in model.modules():
        if adapter_config(module) is not None:
            return module
    raise ValueError("the model holds adapter layers but no adapter config (use inject_adapters or load_adapter)")


def _save_weights(model: nn.Module, directory: Path, has_adapters: bool) -> None:
    if has_adapters:
        from nora_core.checkpoint import save_adapter

        save_adapter(_adapter_root(model), directory)
    else:
        with atomic_write(directory / MODEL_STATE_NAME) as handle:
            torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, handle)


def _load_weights(model: nn.Module, directory: Path, has_adapters: bool) -> None:
    if has_adapters:
        from nora_core.checkpoint import load_adapter

        load_adapter(_adapter_root(model), directory)
    else:
        state = torch.load(directory / MODEL_STATE_NAME, map_location="cpu", weights_only=True)
        model.load_state_dict(state)


def _replace_dir(tmp: Path, final: Path) -> None:
    """Move the finished directory ``tmp`` onto ``final`` (a rename: readers never see it half-written)."""
    old = None
    if final.exists():
        old = final.with_name(f".old-{final.name}-{os.getpid()}")
        os.replace(final, old)
    os.replace(tmp, final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _clean_partial(run_dir: Path) -> None:
    """Remove temporary directories a killed run may have left behind."""
    for parent in (run_dir, run_dir / "checkpoints"):
        if parent.is_dir():
            for child in parent.iterdir():
                if child.name.startswith((".tmp-", ".old-")) and child.is_dir():
                    shutil.rmtree(child, ignore_errors=True)


# ------------------------------------------------------------------------------------------- train


def _check_labels(data: TokenDataset, eval_data: TokenDataset | None, config: TrainConfig) -> None:
    """Refuse data whose loss would be a mean over no label token, before the first step.

    Every training row must have a label token: a row without one trains on nothing, and a batch of
    such rows would report a loss of 0. The evaluated part of ``eval_data`` must hold at least one.
    """
    empty = int((data.label_counts == 0).sum())
    if empty:
        raise ValueError(
            f"train_data: {empty} of {len(data)} row(s) have no label token (every label is {IGNORE_INDEX}), "
            "so they would train on nothing; drop them (TokenDataset.from_samples and load_dataset do), "
            "or raise max_length when response_only truncated their response away"
        )
    if eval_data is not None:
        size = config.eval_batch_size or config.batch_size
        rows = len(eval_data) if config.eval_batches is None else min(len(eval_data), config.eval_batches * size)
        if int(eval_data.label_counts[:rows].sum()) == 0:
            raise ValueError(
                f"eval_data: the {rows} evaluated row(s) hold no label token (every label is {IGNORE_INDEX}); "
                "the validation loss would be undefined"
            )


class _Trainer:
    """The state of one :func:`train` call (kept private; the public surface is :func:`train`)."""

    def __init__(self, model: nn.Module, config: TrainConfig, train_data: Any, eval_data: Any | None) -> None:
        self.config = config
        self.ctx = _setup_distributed(config.device)
        self.device = _resolve_device(config.device, self.ctx)
        self.model = model.to(self.device)
        self.data = _as_dataset(train_data, "train_data")
        self.eval_data = None if eval_data is None else _as_dataset(eval_data, "eval_data")
        _check_labels(self.data, self.eval_data, config)
        self.run_dir = None if config.run_dir is None else Path(config.run_dir)
        world = self.ctx.world
        if config.batch_size % (config.grad_accum_steps * world):
            raise ValueError(
                f"batch_size ({config.batch_size}) must be divisible by grad_accum_steps * world_size "
                f"({config.grad_accum_steps} * {world})"
            )
        self.micro = config.batch_size // (config.grad_accum_steps * world)
        self.params = [p for p in model.parameters() if p.requires_grad]
        if not self.params:
            raise ValueError("the model has no trainable parameters (call inject_adapters first)")
        self.has_adapters = bool(_adapter_layers(model))
        if self.has_adapters:
            adapter_ids = {id(p) for _, layer in _adapter_layers(model) for p in layer.parameters()}
            extra = sum(1 for p in self.params if id(p) not in adapter_ids)
            if extra:
                logger.warning("%d trainable tensors are not adapter factors; they are trained too", extra)
        if self.has_adapters and config.run_dir is not None:
            _adapter_root(model)  # fail before training, not at the first checkpoint
        if config.track_spectra_every and not self.has_adapters:
            raise ValueError("track_spectra_every needs a model with adapters (inject_adapters)")
        self.optimizer = torch.optim.AdamW(
            self.params, lr=config.lr, betas=config.betas, eps=config.adam_eps, weight_decay=config.weight_decay
        )
        self.order = _Order(len(self.data), config.seed, config.shuffle)
        self.step = 0
        self.best_val: float | None = None
        self.best_step: int | None = None
        self.resumed_from: int | None = None
        self.last_checkpoint: Path | None = None
        self.history: list[dict[str, Any]] = []
        self._metrics_file = None

    # -- setup ---------------------------------------------------------------------------------

    def prepare_run_dir(self) -> None:
        if self.run_dir is None:
            return
        if self.ctx.main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            _clean_partial(self.run_dir)
        if not self.config.resume and (latest_checkpoint(self.run_dir) or (self.run_dir / METRICS_NAME).exists()):
            raise ValueError(
                f"{self.run_dir}: already holds a run (metrics.jsonl or checkpoints); pass --resume "
                "(resume=True in Python) to continue it or choose a new run_dir"
            )

    def maybe_resume(self) -> dict[str, Any] | None:
        if not self.config.resume:
            return None
        ckpt = latest_checkpoint(self.run_dir)
        if ckpt is None:
            logger.info("%s: no checkpoint to resume from; starting fresh", self.run_dir)
            self._truncate_metrics(0)
            return None
        state = torch.load(ckpt / STATE_NAME, map_location="cpu", weights_only=True)
        if state.get("version") != _STATE_VERSION:
            raise ValueError(f"{ckpt / STATE_NAME}: unsupported trainer state version {state.get('version')!r}")
        data = state["data"]
        if data["dataset_size"] != len(self.data) or data["batch_size"] != self.config.batch_size:
            raise ValueError(
                f"{ckpt}: saved with {data['dataset_size']} training rows and batch_size {data['batch_size']}, "
                f"now {len(self.data)} and {self.config.batch_size}; resuming would change the data order"
            )
        _load_weights(self.model, ckpt, self.has_adapters)
        self.optimizer.load_state_dict(state["optimizer"])
        self.step = int(state["step"])
        self.best_val, self.best_step = state["best_val_loss"], state["best_step"]
        self.resumed_from = self.step
        self.last_checkpoint = ckpt
        self._truncate_metrics(self.step)
        logger.info("resumed from %s (step %d)", ckpt, self.step)
        rngs = state["rng"]
        if len(rngs) != self.ctx.world:
            logger.warning("checkpoint written by %d processes, now %d: RNG streams differ", len(rngs), self.ctx.world)
        return rngs[self.ctx.rank] if self.ctx.rank < len(rngs) else None

    def _truncate_metrics(self, step: int) -> None:
        """Drop records a killed run wrote after its last checkpoint."""
        if self.run_dir is None or not self.ctx.main:
            return
        path = self.run_dir / METRICS_NAME
        if not path.exists():
            return
        kept = [line for line in path.read_text(encoding="utf-8").splitlines(keepends=True)
                if line.strip() and _record_step(line) <= step]
        atomic_write_text(path, "".join(kept))

    # -- writing -------------------------------------------------------------------------------

    def write_record(self, record: dict[str, Any]) -> None:
        record = _json_safe(record)
        self.history.append(record)
        if self.run_dir is None or not self.ctx.main:
            return
        if self._metrics_file is None:
            self._metrics_file = open(self.run_dir / METRICS_NAME, "a", encoding="utf-8")
        self._metrics_file.write(json.dumps(record, allow_nan=False) + "\n")
        self._metrics_file.flush()

    def save_checkpoint(self) -> None:
        """Write ``checkpoints/step-N`` as a whole (temporary directory, then rename); prune old ones."""
        rng = _rng_state()
        rngs = [rng]
        if self.ctx.world > 1:
            import torch.distributed as dist

            rngs = [None] * self.ctx.world
            dist.all_gather_object(rngs, rng)
        if not self.ctx.main:
            return
        root = self.run_dir / "checkpoints"
        root.mkdir(parents=True, exist_ok=True)
        final = root / f"step-{self.step:06d}"
        tmp = root / f".tmp-{final.name}-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        _save_weights(self._unwrapped, tmp, self.has_adapters)
        cfg = self.config
        state = {
            "version": _STATE_VERSION,
            "step": self.step,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": {
                "name": "warmup_cosine", "lr": cfg.lr, "warmup_steps": cfg.warmup_steps,
                "steps": cfg.steps, "min_lr_ratio": cfg.min_lr_ratio, "last_lr": get_lr(self.step - 1, cfg),
            },
            "rng": [_to_cpu(r) for r in rngs],
            "data": {
                "samples_seen": self.step * cfg.batch_size, "epoch": self.step * cfg.batch_size // len(self.data),
                "dataset_size": len(self.data), "batch_size": cfg.batch_size, "seed": cfg.seed, "shuffle": cfg.shuffle,
            },
            "best_val_loss": self.best_val,
            "best_step": self.best_step,
            "world_size": self.ctx.world,
            "config": json.dumps(cfg.to_dict()),
        }
        with atomic_write(tmp / STATE_NAME) as handle:
            torch.save(state, handle)
        _replace_dir(tmp, final)
        self.last_checkpoint = final
        for _, old in _list_checkpoints(self.run_dir)[: -cfg.keep_last]:
            shutil.rmtree(old, ignore_errors=True)

    def save_best(self, val: dict[str, float]) -> None:
        if not self.ctx.main or self.run_dir is None:
            return
        final = self.run_dir / "best"
        tmp = self.run_dir / f".tmp-best-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        _save_weights(self._unwrapped, tmp, self.has_adapters)
        info = {"step": self.step, "val_loss": val["loss"], "val_ppl": val["ppl"]}
        atomic_write_text(tmp / "best.json", json.dumps(_json_safe(info), indent=2) + "\n")
        _replace_dir(tmp, final)

    # -- the loop ------------------------------------------------------------------------------

    def run(self) -> TrainResult:
        cfg, ctx = self.config, self.ctx
        self.prepare_run_dir()
        rng = self.maybe_resume()
        if self.run_dir is not None and ctx.main:
            atomic_write_text(self.run_dir / "train_config.json", json.dumps(cfg.to_dict(), indent=2) + "\n")
        self._unwrapped = self.model
        model: nn.Module = self.model
        if ctx.world > 1:
            from torch.nn.parallel import DistributedDataParallel as DDP

            model = DDP(self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        torch.manual_seed(cfg.seed + ctx.rank)
        if rng is not None:
            _set_rng_state(rng)
        was_training = self.model.training
        self.model.train()
        bar = _progress(cfg, self.step, enabled=cfg.progress and ctx.main)
        n_chunks = cfg.grad_accum_steps * ctx.world
        window_loss, window_steps, window_tokens = 0.0, 0, 0
        total_tokens, train_time = 0, 0.0
        last_loss: float | None = None
        val: dict[str, float] | None = None
        t_window = time.perf_counter()
        try:
            while self.step < cfg.steps:
                t_step = time.perf_counter()
                lr = get_lr(self.step, cfg)
                for group in self.optimizer.param_groups:
                    group["lr"] = lr
                chunks = self.order.take(self.step * cfg.batch_size, cfg.batch_size).view(n_chunks, self.micro)
                n_labels = int(self.data.label_counts[chunks].sum())
                if n_labels == 0:  # _check_labels rules this out; never divide to a loss of 0
                    raise ValueError(f"the batch of step {self.step + 1} has no label token")
                step_tokens = int(self.data.lengths[chunks].max(dim=1).values.sum()) * self.micro
                loss_local = torch.zeros((), device=self.device)
                for m in range(cfg.grad_accum_steps):
                    input_ids, labels = self.data.batch(chunks[m * ctx.world + ctx.rank])
                    input_ids = input_ids.to(self.device, non_blocking=True)
                    labels = labels.to(self.device, non_blocking=True)
                    sync = ctx.world == 1 or m == cfg.grad_accum_steps - 1
                    with (contextlib.nullcontext() if sync else model.no_sync()), _autocast(self.device, cfg.bf16):
                        loss = _loss_sum(_logits(model, input_ids), labels) / n_labels
                    # DDP averages gradients over processes; scale so the sum over the global batch results
                    (loss * ctx.world).backward()
                    loss_local += loss.detach()
                step_loss = float(_all_reduce_sum(loss_local, ctx))
                norm = float(torch.nn.utils.clip_grad_norm_(self.params, cfg.grad_clip or math.inf))
                if not (math.isfinite(step_loss) and math.isfinite(norm)):
                    self.optimizer.zero_grad(set_to_none=True)
                    if self.last_checkpoint is not None:
                        where = str(self.last_checkpoint)
                    elif cfg.save_every:  # the first checkpoint comes at save_every, or at the end if sooner
                        where = f"none yet (the first is written at step {min(cfg.save_every, cfg.steps)})"
                    else:
                        where = "none (set save_every to keep checkpoints)"
                    raise NonFiniteLossError(
                        f"non-finite training loss ({step_loss}) or gradient norm ({norm}) at step "
                        f"{self.step + 1}; stopped before the optimizer step. Last good checkpoint: {where}. "
                        "Lower the learning rate, keep grad_clip on, or check the data, then resume from it."
                    )
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
                self.step += 1
                train_time += time.perf_counter() - t_step
                window_loss += step_loss
                window_steps += 1
                window_tokens += step_tokens
                total_tokens += step_tokens
                bar.update(1)
                last = self.step == cfg.steps
                do_eval = self.eval_data is not None and (last or (cfg.eval_every and self.step % cfg.eval_every == 0))
                do_track = cfg.track_spectra_every and (last or self.step % cfg.track_spectra_every == 0)
                do_save = cfg.save_every and (last or self.step % cfg.save_every == 0)
                if not (last or do_eval or do_track or do_save or self.step % cfg.log_every == 0):
                    continue
                elapsed = time.perf_counter() - t_window
                last_loss = window_loss / window_steps
                record: dict[str, Any] = {
                    "step": self.step,
                    "train_loss": last_loss,
                    "lr": lr,
                    "tokens_per_s": window_tokens / elapsed if elapsed > 0 else None,
                }
                if do_eval:
                    val = evaluate(
                        self.model, self.eval_data, batch_size=cfg.eval_batch_size or cfg.batch_size,
                        max_batches=cfg.eval_batches, bf16=cfg.bf16, _ctx=ctx,
                    )
                    record["val_loss"], record["val_ppl"] = val["loss"], val["ppl"]
                    if self.best_val is None or val["loss"] < self.best_val:
                        self.best_val, self.best_step = val["loss"], self.step
                        self.save_best(val)
                if do_track and ctx.main:
                    record["spectra"] = adapter_spectra(self.model)
                self.write_record(record)
                if do_save:
                    self.save_checkpoint()
                _log_record(record, cfg.steps)
                bar.set_postfix(loss=f"{last_loss:.4f}", tok_s=f"{record['tokens_per_s'] or 0:.0f}", refresh=False)
                window_loss, window_steps, window_tokens = 0.0, 0, 0
                t_window = time.perf_counter()
            if self.run_dir is not None and ctx.main:
                final = self.run_dir / "adapter" if self.has_adapters else self.run_dir / "model"
                tmp = self.run_dir / f".tmp-final-{os.getpid()}"
                shutil.rmtree(tmp, ignore_errors=True)
                tmp.mkdir()
                _save_weights(self.model, tmp, self.has_adapters)
                _replace_dir(tmp, final)
        finally:
            bar.close()
            if self._metrics_file is not None:
                self._metrics_file.close()
            self.model.train(was_training)
            if ctx.created:
                import torch.distributed as dist

                dist.destroy_process_group()
        return TrainResult(
            steps=self.step,
            train_loss=last_loss,
            val_loss=None if val is None else val["loss"],
            val_ppl=None if val is None else val["ppl"],
            best_val_loss=self.best_val,
            best_step=self.best_step,
            tokens=total_tokens,
            elapsed_s=train_time,
            tokens_per_s=total_tokens / train_time if train_time > 0 else 0.0,
            resumed_from=self.resumed_from,
            run_dir=self.run_dir,
            history=self.history,
        )


def _record_step(line: str) -> int:
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return sys.maxsize  # an unreadable (half-written) line is dropped


def _to_cpu(state: dict[str, Any]) -> dict[str, Any]:
    cuda = state.get("cuda")
    return {**state, "cuda": None if cuda is None else [s.cpu() for s in cuda]}


def _log_record(record: dict[str, Any], total: int) -> None:
    parts = [f"step {record['step']}/{total}", f"loss {record['train_loss']:.4f}", f"lr {record['lr']:.3g}"]
    if record.get("val_loss") is not None:
        parts.append(f"val_loss {record['val_loss']:.4f} ppl {record['val_ppl']:.3f}")
    if record.get("tokens_per_s"):
        parts.append(f"{record['tokens_per_s']:.0f} tok/s")
    if "spectra" in record:
        ranks = [s["effective_rank"] for s in record["spectra"] if s["effective_rank"] is not None]
        if ranks:
            parts.append(f"mean erank {sum(ranks) / len(ranks):.2f}")
    logger.info(" | ".join(parts))


class _NoBar:
    def update(self, n: int = 1) -> None: ...
    def set_postfix(self, **kwargs: Any) -> None: ...
    def close(self) -> None: ...


def _progress(config: TrainConfig, initial: int, *, enabled: bool) -> Any:
    if not enabled:
        return _NoBar()
    from tqdm.auto import tqdm

    return tqdm(total=config.steps, initial=initial, file=sys.stderr, unit="step", dynamic_ncols=True, desc="train")


def train(
    model: nn.Module, config: TrainConfig, train_data: Any, eval_data: Any | None = None
) -> TrainResult:
    """Train the parameters of ``model`` that require grad (the adapters, after ``inject_adapters``).

    Args:
        model: any ``nn.Module`` mapping ``input_ids`` (B, T) to logits (B, T, V), or to an object with
            ``.logits`` (transformers models). Moved to ``config.device``; trained in place.
        config: the run's settings.
        train_data: a :class:`nora_core.data.TokenDataset` (or a (N, T+1) LongTensor of token ids).
        eval_data: same types; evaluated every ``config.eval_every`` steps and at the end.

    Returns:
        A :class:`TrainResult`.

    Raises:
        ValueError: inconsistent settings, no trainable parameters, a run directory that already holds
            a run without ``resume``, a checkpoint that does not fit the data, a training row without a
            label token, or evaluated rows without any.
        NonFiniteLossError: the loss or gradient norm became NaN/Inf (the weights are left as they were
            before that step; checkpoints already written stay intact).
    """
    return _Trainer(model, config, train_data, eval_data).run()
