"""A small nanoGPT-style causal language model, the base model of the demos and tests.

The attention projections are separate ``nn.Linear`` layers named like Llama's
(``blocks.0.attn.q_proj``, ``k_proj``, ``v_proj``, ``o_proj``; MLP ``up_proj``, ``down_proj``), so
adapters target them by the same names as on real checkpoints (``target_modules=["q_proj", "v_proj"]``).

Layout (pre-norm, as in nanoGPT / GPT-2):

    x = wte(ids) + wpe(pos)                     # (B, T, C)
    for block in blocks:
        x = x + attn(ln_1(x))                   # causal self-attention
        x = x + mlp(ln_2(x))                    # up_proj -> GELU -> down_proj
    logits = lm_head(ln_f(x))                   # (B, T, V), lm_head tied to wte
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from nora_core.atomic import atomic_write, atomic_write_text

__all__ = ["GPTConfig", "GPT", "CONFIG_NAME", "WEIGHTS_NAME"]

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"


@dataclass
class GPTConfig:
    """Hyper-parameters of :class:`GPT`.

    Attributes:
        vocab_size: number of token ids (259 = 256 bytes + BOS/EOS/PAD of the built-in tokenizer).
        block_size: longest sequence the position embedding covers.
        n_layer: transformer blocks.
        n_head: attention heads; must divide ``n_embd``.
        n_embd: model width C.
        mlp_ratio: hidden width of the MLP as a multiple of ``n_embd``.
        dropout: dropout on attention output, MLP output and embeddings (0 for fine-tuning).
        bias: whether linear layers and LayerNorms carry a bias.
    """

    vocab_size: int = 259
    block_size: int = 256
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    mlp_ratio: int = 4
    dropout: float = 0.0
    bias: bool = False

    def __post_init__(self) -> None:
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd", "mlp_ratio"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"GPTConfig.{name} must be a positive int, got {value!r}")
        if self.n_embd % self.n_head:
            raise ValueError(f"GPTConfig.n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"GPTConfig.dropout must be in [0, 1), got {self.dropout!r}")

    @classmethod
    def from_dict(cls, data: dict) -> "GPTConfig":
        """Build a config from a dict, ignoring unknown keys (forward compatibility)."""
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention with separate q/k/v/o projections."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        c = config.n_embd
        self.n_head = config.n_head
        self.q_proj = nn.Linear(c, c, bias=config.bias)
        self.k_proj = nn.Linear(c, c, bias=config.bias)
        self.v_proj = nn.Linear(c, c, bias=config.bias)
        self.o_proj = nn.Linear(c, c, bias=config.bias)
        self.dropout = config.dropout
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Attend causally.

        Args:
            x: hidden states, shape (B, T, C).

        Returns:
            Shape (B, T, C).
        """
        b, t, c = x.shape
        hs = c // self.n_head
        q = self.q_proj(x).view(b, t, self.n_head, hs).transpose(1, 2)  # (B, nh, T, hs)
        k = self.k_proj(x).view(b, t, self.n_head, hs).transpose(1, 2)  # (B, nh, T, hs)
        v = self.v_proj(x).view(b, t, self.n_head, hs).transpose(1, 2)  # (B, nh, T, hs)
        y = F.scaled_dot_product_attention(
            q, k, v, dropout_p=self.dropout if self.training else 0.0, is_causal=True
        )  # (B, nh, T, hs)
        y = y.transpose(1, 2).contiguous().view(b, t, c)  # (B, T, C)
        return self.resid_dropout(self.o_proj(y))


class MLP(nn.Module):
    """Position-wise feed-forward: ``down_proj(GELU(up_proj(x)))``."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        hidden = config.mlp_ratio * config.n_embd
        self.up_proj = nn.Linear(config.n_embd, hidden, bias=config.bias)
        self.down_proj = nn.Linear(hidden, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Args: x (B, T, C). Returns: (B, T, C)."""
        return self.dropout(self.down_proj(F.gelu(self.up_proj(x))))


class Block(nn.Module):
    """Pre-norm transformer block."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Args: x (B, T, C). Returns: (B, T, C)."""
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    """Decoder-only transformer: ``forward(input_ids) -> logits``.

    Args:
        config: model hyper-parameters.
    """

    def __init__(self, config: GPTConfig | None = None) -> None:
        super().__init__()
        self.config = config or GPTConfig()
        cfg = self.config
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.wpe = nn.Embedding(cfg.block_size, cfg.n_embd)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight  # weight tying (GPT-2)
        self.apply(self._init_weights)
        # GPT-2: scale the residual projections by 1/sqrt(2 * n_layer).
        for name, param in self.named_parameters():
            if name.endswith(("o_proj.weight", "down_proj.weight")):
                nn.init.normal_(param, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def num_parameters(self) -> int:
        """Number of distinct parameters (the tied head counted once)."""
        return sum(p.numel() for p in self.parameters())

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Compute next-token logits.

        Args:
            input_ids: token ids, shape (B, T), T <= ``config.block_size``.

        Returns:
            Logits, shape (B, T, V).

        Raises:
            ValueError: the sequence is longer than ``block_size``.
        """
        b, t = input_ids.shape
        if t > self.config.block_size:
            raise ValueError(f"sequence length {t} exceeds the model's block_size {self.config.block_size}")
        pos = torch.arange(t, device=input_ids.device)  # (T,)
        x = self.drop(self.wte(input_ids) + self.wpe(pos))  # (B, T, C)
        for block in self.blocks:
            x = block(x)
        return self.lm_head(self.ln_f(x))  # (B, T, V)

    def save_pretrained(self, directory: str | os.PathLike[str]) -> Path:
        """Write ``config.json`` and ``model.safetensors`` (atomically) into ``directory``.

        Adapter layers, if injected, are not part of the base checkpoint: save them with
        ``nora_core.save_adapter``. The tied ``lm_head.weight`` is stored once (as ``wte.weight``).

        Returns:
            The directory.
        """
        from safetensors.torch import save

        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items() if k != "lm_head.weight"}
        with atomic_write(out / WEIGHTS_NAME) as handle:
            handle.write(save(state, metadata={"format": "pt"}))
        atomic_write_text(out / CONFIG_NAME, json.dumps(asdict(self.config), indent=2) + "\n")
        return out

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike[str]) -> "GPT":
        """Load a model written by :meth:`save_pretrained`.

        Raises:
            FileNotFoundError: ``config.json`` or ``model.safetensors`` is missing.
        """
        from safetensors.torch import load_file

        src = Path(directory)
        for name in (CONFIG_NAME, WEIGHTS_NAME):
            if not (src / name).is_file():
                raise FileNotFoundError(f"{src / name}: not found (expected a GPT saved by save_pretrained)")
        from nora_core.parsing import read_json  # bounded: depth, numbers, UTF-8 (a ParseError is a ValueError)

        config = GPTConfig.from_dict(read_json(src / CONFIG_NAME))
        model = cls(config)
        state = load_file(str(src / WEIGHTS_NAME))
        state["lm_head.weight"] = state["wte.weight"]
        model.load_state_dict(state)
        return model
