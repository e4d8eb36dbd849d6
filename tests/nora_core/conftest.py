"""Small models shared by the nora_core tests."""

from __future__ import annotations

import pytest
import torch
from torch import nn


class Block(nn.Module):
    """One residual block with attention-like and MLP-like linears (names as in Llama)."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.self_attn = nn.ModuleDict(
            {name: nn.Linear(dim, dim, bias=name == "q_proj") for name in ("q_proj", "k_proj", "v_proj", "o_proj")}
        )
        self.mlp = nn.ModuleDict({"up_proj": nn.Linear(dim, hidden), "down_proj": nn.Linear(hidden, dim)})
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.self_attn
        x = x + a["o_proj"](torch.tanh(a["q_proj"](x)) * a["k_proj"](x) + a["v_proj"](x))
        return x + self.mlp["down_proj"](torch.relu(self.mlp["up_proj"](self.norm(x))))


class Toy(nn.Module):
    """``model.layers.<i>.self_attn.q_proj`` ... then ``lm_head``: input (batch, seq, dim) floats."""

    def __init__(self, dim: int = 16, hidden: int = 24, layers: int = 3, out: int = 10) -> None:
        super().__init__()
        self.model = nn.Module()
        self.model.layers = nn.ModuleList(Block(dim, hidden) for _ in range(layers))
        self.lm_head = nn.Linear(dim, out)
        self.dim = dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.model.layers:
            x = block(x)
        return self.lm_head(x)


@pytest.fixture
def toy() -> Toy:
    return Toy().eval()


@pytest.fixture
def toy_input() -> torch.Tensor:
    return torch.randn(2, 5, 16)


def randomize_b(model: nn.Module, std: float = 0.5) -> None:
    """Give every adapter a non-zero B (a fresh adapter is a no-op, which would hide bugs)."""
    from nora_core.inject import adapter_layers

    with torch.no_grad():
        for _, layer in adapter_layers(model):
            layer.lora_B.weight.normal_(0.0, std)
