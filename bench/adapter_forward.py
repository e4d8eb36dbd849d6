"""Forward+backward time of one adapted 2048x2048 linear (r=64, 512 tokens, float32).

Compares our LoRA, PEFT's LoRA layer and our NoRA, interleaved in one process (each round times a
few steps of each, in rotating order) so that machine noise hits all three alike. Prints the median
step time of each and the median over rounds of the paired per-round ratios (robust to load drifting
on a shared machine) for the two targets:

* our LoRA / PEFT LoRA   (target <= 1.05)
* our NoRA / our LoRA    (target <= 1.15)

Run: ``.venv/bin/python bench/adapter_forward.py [--repeats 40] [--iters 2]``.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

from nora_core.layers import AdapterLinear

D, R, TOKENS, ALPHA = 2048, 64, 512, 128.0


def _ours(base: nn.Linear, method: str) -> nn.Module:
    layer = AdapterLinear(base, R, ALPHA / R, method=method, dropout=0.0)
    nn.init.normal_(layer.lora_B.weight, std=0.02)
    return layer


def _peft(base: nn.Linear) -> nn.Module:
    from peft import LoraConfig, get_peft_model

    class Holder(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.proj = base

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.proj(x)

    model = get_peft_model(Holder(), LoraConfig(r=R, lora_alpha=ALPHA, target_modules=["proj"]))
    layer = model.base_model.model.proj
    nn.init.normal_(layer.lora_B["default"].weight, std=0.02)
    return layer


def _step(layer: nn.Module, x: torch.Tensor, grad: torch.Tensor) -> None:
    layer(x).backward(grad)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=40)
    parser.add_argument("--iters", type=int, default=2)
    args = parser.parse_args()
    torch.manual_seed(0)
    layers = {}
    for name in ("ours_lora", "peft_lora", "ours_nora"):
        base = nn.Linear(D, D)
        base.requires_grad_(False)
        layers[name] = _peft(base) if name == "peft_lora" else _ours(base, name.split("_")[1])
    x = torch.randn(1, TOKENS, D, requires_grad=True)
    grad = torch.randn(1, TOKENS, D)
    times: dict[str, list[float]] = {name: [] for name in layers}
    for layer in layers.values():  # warm-up
        for _ in range(3):
            _step(layer, x, grad)
    for rep in range(args.repeats):
        names = list(layers)
        order = names[rep % 3 :] + names[: rep % 3]
        order = order if rep % 2 == 0 else order[::-1]
        for name in order:
            start = time.perf_counter()
            for _ in range(args.iters):
                _step(layers[name], x, grad)
            times[name].append((time.perf_counter() - start) / args.iters)
    med = {name: statistics.median(t) for name, t in times.items()}
    print(f"threads={torch.get_num_threads()} d={D} r={R} tokens={TOKENS} float32, fwd+bwd per step (median):")
    for name, value in med.items():
        print(f"  {name:10s} {value * 1e3:8.3f} ms")
    for num, den, target in (("ours_lora", "peft_lora", 1.05), ("ours_nora", "ours_lora", 1.15)):
        paired = statistics.median(a / b for a, b in zip(times[num], times[den]))
        print(f"{num} / {den} = {paired:.3f} (median of per-round ratios; ratio of medians "
              f"{med[num] / med[den]:.3f})  target <= {target}")


if __name__ == "__main__":
    main()
