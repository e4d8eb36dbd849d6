"""Fine-tune adapters (or any trainable parameters) of a causal language model.

``train(model, config, train_data, eval_data=None)`` runs AdamW on the parameters that require grad
(after ``inject_adapters`` those are exactly the adapter factors) with linear warmup then cosine decay,
gradient accumulation, grad-norm clipping, optional bf16 autocast, periodic evaluation, atomic
checkpoints that resume bit-exactly on CPU, and tracking callbacks (such as the spectral tracking of
:class:`nora_spectra.tracking.SpectralTracking`) whose fields go into ``run_dir/metrics.jsonl``. The same code runs under ``torchrun`` with
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

This module holds the loop; its parts live in :mod:`nora_core.train_config` (TrainConfig, TrainResult,
get_lr), :mod:`nora_core.evaluation` (the loss, :func:`evaluate`), :mod:`nora_core.run_state` (checkpoint
directories, weights, RNG state) and :mod:`nora_core.distributed`. The public names are re-exported here.
This module never imports ``nora_spectra``: a face (the ``nora`` command, a notebook) passes the
spectral tracking in as a callback.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from nora_core.atomic import atomic_write, atomic_write_text
from nora_core.data import IGNORE_INDEX, TokenDataset
from nora_core.distributed import all_reduce_sum, resolve_device, setup_distributed
from nora_core.evaluation import bf16_autocast, evaluate, forward_logits, loss_sum
from nora_core.run_state import (
    METRICS_NAME,
    MODEL_STATE_NAME,  # noqa: F401  (re-exported: it was defined here)
    STATE_NAME,
    STATE_VERSION,
    adapter_root,
    clean_partial,
    latest_checkpoint,
    list_checkpoints,
    load_weights,
    replace_dir,
    rng_state,
    rng_state_to_cpu,
    save_weights,
    set_rng_state,
)
from nora_core.inject import adapter_layers
from nora_core.jsonable import to_jsonable
from nora_core.train_config import (
    NonFiniteLossError,
    TrainCallback,
    TrainConfig,
    TrainResult,
    check_step_size,
    get_lr,
)

__all__ = [
    "TrainConfig",
    "TrainResult",
    "NonFiniteLossError",
    "train",
    "get_lr",
    "evaluate",
    "latest_checkpoint",
    "METRICS_NAME",
    "STATE_NAME",
]

logger = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------- helpers


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

    def __init__(
        self,
        model: nn.Module,
        config: TrainConfig,
        train_data: Any,
        eval_data: Any | None,
        callbacks: Sequence[TrainCallback] = (),
    ) -> None:
        self.config = config
        self.callbacks = list(callbacks)
        self.ctx = setup_distributed(config.device)
        self.device = resolve_device(config.device, self.ctx)
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
        layers = list(adapter_layers(model))
        self.has_adapters = bool(layers)
        if self.has_adapters:
            adapter_ids = {id(p) for _, layer in layers for p in layer.parameters()}
            extra = sum(1 for p in self.params if id(p) not in adapter_ids)
            if extra:
                logger.warning("%d trainable tensors are not adapter factors; they are trained too", extra)
        if self.has_adapters and config.run_dir is not None:
            adapter_root(model)  # fail before training, not at the first checkpoint
        if config.track_spectra_every and not self.has_adapters:
            raise ValueError("track_spectra_every needs a model with adapters (inject_adapters)")
        if config.track_spectra_every and not self.callbacks:
            raise ValueError(
                "track_spectra_every needs a tracking callback: pass "
                "callbacks=[nora_spectra.tracking.SpectralTracking()] to train()"
            )
        for dtype in sorted({p.dtype for p in self.params}, key=str):
            if dtype.is_floating_point:
                check_step_size(config.lr, config.betas[0], torch.finfo(dtype).max, str(dtype).removeprefix("torch."))
        self.optimizer = torch.optim.AdamW(
            self.params, lr=config.lr, betas=config.betas, eps=config.adam_eps, weight_decay=config.weight_decay
        )
        self.order = _Order(len(self.data), config.seed, config.shuffle)
        self.step = 0
        self.best_val: float | None = None
        self.best_step: int | None = None
        self.resumed_from: int | None = None
        # A checkpoint is "last good" only once the loss of the step after it was finite: until then it
        # is pending (its weights may be finite but already diverging).
        self.last_checkpoint: Path | None = None
        self.pending_checkpoints: list[Path] = []
        self.history: list[dict[str, Any]] = []
        self._metrics_file = None

    # -- setup ---------------------------------------------------------------------------------

    def prepare_run_dir(self) -> None:
        if self.run_dir is None:
            return
        if self.ctx.main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            clean_partial(self.run_dir)
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
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"{ckpt / STATE_NAME}: unsupported trainer state version {state.get('version')!r}")
        data = state["data"]
        if data["dataset_size"] != len(self.data) or data["batch_size"] != self.config.batch_size:
            raise ValueError(
                f"{ckpt}: saved with {data['dataset_size']} training rows and batch_size {data['batch_size']}, "
                f"now {len(self.data)} and {self.config.batch_size}; resuming would change the data order"
            )
        load_weights(self.model, ckpt, self.has_adapters)
        self.optimizer.load_state_dict(state["optimizer"])
        self.step = int(state["step"])
        self.best_val, self.best_step = state["best_val_loss"], state["best_step"]
        self.resumed_from = self.step
        self.pending_checkpoints = [ckpt]  # confirmed by the first finite loss after resuming
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
        record = to_jsonable(record)
        self.history.append(record)
        if self.run_dir is None or not self.ctx.main:
            return
        if self._metrics_file is None:
            self._metrics_file = open(self.run_dir / METRICS_NAME, "a", encoding="utf-8")
        self._metrics_file.write(json.dumps(record, allow_nan=False) + "\n")
        self._metrics_file.flush()

    def save_checkpoint(self) -> None:
        """Write ``checkpoints/step-N`` as a whole (temporary directory, then rename); prune old ones."""
        rng = rng_state()
        rngs = [rng]
        if self.ctx.world > 1:
            import torch.distributed as dist

            rngs = [None] * self.ctx.world
            dist.all_gather_object(rngs, rng)
        if not all(bool(torch.isfinite(p).all()) for p in self.params):
            # every process holds the same weights, so every process raises here
            raise self._non_finite(None, None, weights=True)
        if not self.ctx.main:
            return
        root = self.run_dir / "checkpoints"
        root.mkdir(parents=True, exist_ok=True)
        final = root / f"step-{self.step:06d}"
        tmp = root / f".tmp-{final.name}-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        save_weights(self._unwrapped, tmp, self.has_adapters)
        cfg = self.config
        state = {
            "version": STATE_VERSION,
            "step": self.step,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": {
                "name": "warmup_cosine", "lr": cfg.lr, "warmup_steps": cfg.warmup_steps,
                "steps": cfg.steps, "min_lr_ratio": cfg.min_lr_ratio, "last_lr": get_lr(self.step - 1, cfg),
            },
            "rng": [rng_state_to_cpu(r) for r in rngs],
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
        replace_dir(tmp, final)
        self.pending_checkpoints.append(final)
        for _, old in list_checkpoints(self.run_dir)[: -cfg.keep_last]:
            if old != self.last_checkpoint:  # the last good one is kept until a newer one is confirmed
                shutil.rmtree(old, ignore_errors=True)

    def save_best(self, val: dict[str, float]) -> None:
        if not self.ctx.main or self.run_dir is None:
            return
        final = self.run_dir / "best"
        tmp = self.run_dir / f".tmp-best-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        save_weights(self._unwrapped, tmp, self.has_adapters)
        info = {"step": self.step, "val_loss": val["loss"], "val_ppl": val["ppl"]}
        atomic_write_text(tmp / "best.json", json.dumps(to_jsonable(info), indent=2) + "\n")
        replace_dir(tmp, final)

    # -- the loop ------------------------------------------------------------------------------

    def run(self) -> TrainResult:
        """Set up (run directory, resume, DDP, RNG), train to ``config.steps``, save the final weights."""
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
            set_rng_state(rng)
        was_training = self.model.training
        self.model.train()
        bar = _progress(cfg, self.step, enabled=cfg.progress and ctx.main)
        window = _Window()
        self.total_tokens, self.train_time = 0, 0.0
        self.last_loss: float | None = None
        self.val: dict[str, float] | None = None
        try:
            while self.step < cfg.steps:
                t_step = time.perf_counter()
                lr = get_lr(self.step, cfg)
                step_loss, step_tokens = self._train_step(model, lr)
                self.train_time += time.perf_counter() - t_step
                self.total_tokens += step_tokens
                window.add(step_loss, step_tokens)
                bar.update(1)
                record = self._maybe_log(lr, window)
                if record is not None:
                    bar.set_postfix(loss=f"{record['train_loss']:.4f}", tok_s=f"{record['tokens_per_s'] or 0:.0f}",
                                    refresh=False)
            self._save_final()
        finally:
            bar.close()
            if self._metrics_file is not None:
                self._metrics_file.close()
            self.model.train(was_training)
            if ctx.created:
                import torch.distributed as dist

                dist.destroy_process_group()
        return self._result()

    def _train_step(self, model: nn.Module, lr: float) -> tuple[float, int]:
        """One optimizer step over the global batch: ``(mean loss, tokens processed)``.

        Raises:
            NonFiniteLossError: the loss or gradient norm is NaN/Inf (gradients are dropped, weights kept).
        """
        cfg, ctx = self.config, self.ctx
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        n_chunks = cfg.grad_accum_steps * ctx.world
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
            with (contextlib.nullcontext() if sync else model.no_sync()), bf16_autocast(self.device, cfg.bf16):
                loss = loss_sum(forward_logits(model, input_ids), labels) / n_labels
            # DDP averages gradients over processes; scale so the sum over the global batch results
            (loss * ctx.world).backward()
            loss_local += loss.detach()
        step_loss = float(all_reduce_sum(loss_local, ctx))
        norm = float(torch.nn.utils.clip_grad_norm_(self.params, cfg.grad_clip or math.inf))
        if not (math.isfinite(step_loss) and math.isfinite(norm)):
            self.optimizer.zero_grad(set_to_none=True)
            raise self._non_finite(step_loss, norm)
        self._confirm_checkpoints()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        return step_loss, step_tokens

    def _confirm_checkpoints(self) -> None:
        """The loss after the pending checkpoints was finite: the newest becomes the last good one."""
        if self.pending_checkpoints:
            self.last_checkpoint = self.pending_checkpoints[-1]
            self.pending_checkpoints = []

    def _set_aside_pending(self) -> list[Path]:
        """Rename checkpoints whose following loss was not finite to ``diverged-step-N`` (``--resume`` skips them)."""
        moved = []
        for path in self.pending_checkpoints:
            if self.ctx.main and path.is_dir():
                aside = path.with_name(f"diverged-{path.name}")
                shutil.rmtree(aside, ignore_errors=True)
                os.replace(path, aside)
                moved.append(aside)
        self.pending_checkpoints = []
        return moved

    def _non_finite(self, step_loss: float | None, norm: float | None, *, weights: bool = False) -> NonFiniteLossError:
        """The error for a non-finite loss, gradient norm or weights, naming the last good checkpoint.

        Checkpoints saved after the last good one (their weights led to this loss) are set aside as
        ``checkpoints/diverged-step-N``, so that ``--resume`` continues from the last good one.
        """
        cfg = self.config
        moved = self._set_aside_pending()
        if self.last_checkpoint is not None:
            where = str(self.last_checkpoint)
        elif moved:
            where = "none (the checkpoint the run started from led to this loss)"
        elif cfg.save_every:  # the first checkpoint comes at save_every, or at the end if sooner
            where = f"none yet (the first is written at step {min(cfg.save_every, cfg.steps)})"
        else:
            where = "none (set save_every to keep checkpoints)"
        if weights:
            what = f"non-finite adapter weights after step {self.step}; not saved"
        else:
            what = (
                f"non-finite training loss ({step_loss}) or gradient norm ({norm}) at step "
                f"{self.step + 1}; stopped before the optimizer step"
            )
        aside = f" Set aside as diverged: {', '.join(p.name for p in moved)}." if moved else ""
        return NonFiniteLossError(
            f"{what}. Last good checkpoint: {where}.{aside} "
            "Lower the learning rate, keep grad_clip on, or check the data, then resume from it."
        )

    def _maybe_log(self, lr: float, window: "_Window") -> dict[str, Any] | None:
        """At a logging, evaluation, tracking or checkpoint step: write the metrics record (evaluating,
        calling the tracking callbacks and checkpointing as due); None at other steps."""
        cfg, ctx = self.config, self.ctx
        last = self.step == cfg.steps
        do_eval = self.eval_data is not None and (last or (cfg.eval_every and self.step % cfg.eval_every == 0))
        do_track = cfg.track_spectra_every and (last or self.step % cfg.track_spectra_every == 0)
        do_save = cfg.save_every and (last or self.step % cfg.save_every == 0)
        if not (last or do_eval or do_track or do_save or self.step % cfg.log_every == 0):
            return None
        self.last_loss = window.mean_loss
        record: dict[str, Any] = {
            "step": self.step,
            "train_loss": self.last_loss,
            "lr": lr,
            "tokens_per_s": window.tokens_per_s(),
        }
        if do_eval:
            self.val = evaluate(
                self.model, self.eval_data, batch_size=cfg.eval_batch_size or cfg.batch_size,
                max_batches=cfg.eval_batches, bf16=cfg.bf16, _ctx=ctx,
            )
            record["val_loss"], record["val_ppl"] = self.val["loss"], self.val["ppl"]
            if self.best_val is None or self.val["loss"] < self.best_val:
                self.best_val, self.best_step = self.val["loss"], self.step
                self.save_best(self.val)
        if do_track and ctx.main:
            for callback in self.callbacks:
                record.update(callback(self.step, self.model))
        self.write_record(record)
        if do_save:
            self.save_checkpoint()
        _log_record(record, cfg.steps)
        window.reset()
        return record

    def _save_final(self) -> None:
        """``run_dir/adapter`` (or ``model``), written as a whole (temporary directory, then rename)."""
        if self.run_dir is None or not self.ctx.main:
            return
        final = self.run_dir / "adapter" if self.has_adapters else self.run_dir / "model"
        tmp = self.run_dir / f".tmp-final-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        save_weights(self.model, tmp, self.has_adapters)
        replace_dir(tmp, final)

    def _result(self) -> TrainResult:
        val = self.val
        return TrainResult(
            steps=self.step,
            train_loss=self.last_loss,
            val_loss=None if val is None else val["loss"],
            val_ppl=None if val is None else val["ppl"],
            best_val_loss=self.best_val,
            best_step=self.best_step,
            tokens=self.total_tokens,
            elapsed_s=self.train_time,
            tokens_per_s=self.total_tokens / self.train_time if self.train_time > 0 else 0.0,
            resumed_from=self.resumed_from,
            run_dir=self.run_dir,
            history=self.history,
        )


class _Window:
    """Loss and tokens since the last metrics record (the record reports their means)."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.loss, self.steps, self.tokens = 0.0, 0, 0
        self.started = time.perf_counter()

    def add(self, loss: float, tokens: int) -> None:
        self.loss += loss
        self.steps += 1
        self.tokens += tokens

    @property
    def mean_loss(self) -> float:
        return self.loss / self.steps

    def tokens_per_s(self) -> float | None:
        elapsed = time.perf_counter() - self.started
        return self.tokens / elapsed if elapsed > 0 else None


def _record_step(line: str) -> int:
    from nora_core.parsing import parse_json

    try:
        return int(parse_json(line, METRICS_NAME)["step"])
    except (ValueError, KeyError, TypeError, IndexError):
        return sys.maxsize  # an unreadable (half-written) line is dropped


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
    model: nn.Module,
    config: TrainConfig,
    train_data: Any,
    eval_data: Any | None = None,
    *,
    callbacks: Sequence[TrainCallback] = (),
) -> TrainResult:
    """Train the parameters of ``model`` that require grad (the adapters, after ``inject_adapters``).

    Args:
        model: any ``nn.Module`` mapping ``input_ids`` (B, T) to logits (B, T, V), or to an object with
            ``.logits`` (transformers models). Moved to ``config.device``; trained in place.
        config: the run's settings.
        train_data: a :class:`nora_core.data.TokenDataset` (or a (N, T+1) LongTensor of token ids).
        eval_data: same types; evaluated every ``config.eval_every`` steps and at the end.
        callbacks: called as ``callback(step, model)`` every ``config.track_spectra_every`` steps and at
            the last step (main process only); the mapping each returns is merged into that step's
            metrics record. :class:`nora_spectra.tracking.SpectralTracking` adds the adapters' spectra.

    Returns:
        A :class:`TrainResult`.

    Raises:
        ValueError: inconsistent settings, no trainable parameters, a run directory that already holds
            a run without ``resume``, a checkpoint that does not fit the data, a training row without a
            label token, or evaluated rows without any.
        NonFiniteLossError: the loss or gradient norm became NaN/Inf (the weights are left as they were
            before that step; checkpoints already written stay intact).
    """
    return _Trainer(model, config, train_data, eval_data, callbacks).run()
