"""Pretrain the small built-in GPT on Python's own docstrings (offline), for demos and tests."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

__all__ = ["pretrain_base"]

logger = logging.getLogger(__name__)


def pretrain_base(
    out: Path, *, steps: int, batch_size: int, block_size: int, n_layer: int, n_embd: int, n_head: int,
    lr: float, corpus_bytes: int, seed: int, progress: bool,
) -> Any:
    """Pretrain a small GPT on the standard-library docstring corpus and save it to ``out``.

    Returns:
        The :class:`~nora_core.trainer.TrainResult`.
    """
    import torch

    from nora_core.corpus import stdlib_docstrings
    from nora_core.data import ByteTokenizer, TokenDataset
    from nora_core.models import GPT, GPTConfig
    from nora_core.trainer import TrainConfig, train

    tok = ByteTokenizer()
    text = stdlib_docstrings(max_bytes=corpus_bytes)
    data = TokenDataset.from_token_stream(tok.encode(text), block_size)
    torch.manual_seed(seed)
    model = GPT(GPTConfig(vocab_size=tok.vocab_size, block_size=block_size, n_layer=n_layer, n_embd=n_embd,
                          n_head=n_head))
    config = TrainConfig(steps=steps, batch_size=batch_size, lr=lr, warmup_steps=min(20, steps),
                         weight_decay=0.1, betas=(0.9, 0.95), seed=seed, progress=progress, log_every=50)
    logger.info("pretraining a %.2fM-parameter GPT on %d bytes of stdlib docstrings (%d blocks)",
                model.num_parameters() / 1e6, len(text.encode()), len(data))
    result = train(model, config, data)
    model.save_pretrained(out)
    return result
