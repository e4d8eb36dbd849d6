"""Next-token loss of a causal language model, and :func:`evaluate` (mean loss and perplexity).

The loss is a sum of cross entropy over non-ignored labels (``IGNORE_INDEX`` masks the rest); the
trainer divides it by the label count of the global batch, and :func:`evaluate` by the label count of
every evaluated row, all-reduced across processes.
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F
from torch import nn

from nora_core.data import IGNORE_INDEX, TokenDataset
from nora_core.distributed import DistContext, all_reduce_sum

__all__ = ["forward_logits", "loss_sum", "bf16_autocast", "evaluate"]


def forward_logits(model: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    """``model(input_ids)`` as a logits tensor (B, T, V); accepts ``.logits`` objects and tuples."""
    out = model(input_ids)
    if hasattr(out, "logits"):
        out = out.logits
    elif isinstance(out, (tuple, list)):
        out = out[0]
    return out


def loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
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


def bf16_autocast(device: torch.device, enabled: bool) -> contextlib.AbstractContextManager:
    """``torch.autocast`` to bfloat16 on ``device`` when ``enabled``, else a null context."""
    if not enabled:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def evaluate(
    model: nn.Module,
    data: TokenDataset,
    *,
    batch_size: int = 8,
    max_batches: int | None = None,
    bf16: bool = False,
    _ctx: DistContext | None = None,
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
    ctx = _ctx or DistContext()
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
            with bf16_autocast(device, bf16):
                loss = loss_sum(forward_logits(model, input_ids), labels)
            totals[0] += loss.double()
            totals[1] += (labels != IGNORE_INDEX).sum()
    model.train(was_training)
    all_reduce_sum(totals, ctx)
    if totals[1] == 0:  # the same on every process after the all-reduce: all raise together
        raise ValueError(
            f"evaluation data: the {rows} evaluated row(s) hold no label token (every label is {IGNORE_INDEX}); "
            "the loss is undefined"
        )
    loss = float(totals[0] / totals[1])
    ppl = math.exp(loss) if loss < 700 else math.inf
    return {"loss": loss, "ppl": ppl, "tokens": int(totals[1])}
