"""Throughput of ``nora_core.train`` against a bare hand-written PyTorch loop doing the same work.

Both fine-tune LoRA (r=16, q_proj/v_proj) on the built-in small GPT (4 layers, width 128, block 128),
batch 16 x 128 tokens, AdamW, warmup+cosine learning rate, grad-norm clipping 1.0: forward, loss,
backward, clip, step. The bare loop indexes a pre-tokenised tensor and calls the same modules; the
difference is the trainer's bookkeeping (batching by global position, token-count normalisation, loss
sync for the NaN check, metrics records). Runs alternate (bare, train, bare, train, ...) so machine load
affects both alike; the median of the repeats is reported.

Second measurement: spectral tracking every 50 steps, as a fraction of training time, both from
end-to-end runs with and without tracking, and from timing ``adapter_spectra`` itself.

Usage::

    python bench/train_throughput.py [--steps 60] [--repeats 3] [--threads N]

Targets (issue 6): train/bare >= 0.9; tracking overhead < 5 %.
"""

from __future__ import annotations

import argparse
import copy
import math
import statistics
import time

import torch
import torch.nn.functional as F

from nora_core import AdapterConfig, TrainConfig, inject_adapters, train
from nora_core.data import TokenDataset
from nora_core.models import GPT, GPTConfig
from nora_core.trainer import get_lr
from nora_spectra.tracking import SpectralTracking, adapter_spectra

BATCH, BLOCK = 16, 128


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=4, n_embd=128, n_head=4, block_size=BLOCK))
    return inject_adapters(model, AdapterConfig(method="lora", r=16, alpha=32, target_modules=["q_proj", "v_proj"]))


def _data(n_rows: int = 256) -> TokenDataset:
    gen = torch.Generator().manual_seed(0)
    return TokenDataset.from_token_stream(torch.randint(0, 256, (n_rows * BLOCK + 1,), generator=gen), BLOCK)


def bare_loop(model: torch.nn.Module, data: TokenDataset, steps: int) -> float:
    """The hand-written loop; returns tokens/s."""
    cfg = TrainConfig(steps=steps, batch_size=BATCH, lr=1e-3, warmup_steps=5)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr)
    gen = torch.Generator().manual_seed(0)
    perm = torch.randperm(len(data), generator=gen)
    model.train()
    start = time.perf_counter()
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = get_lr(step, cfg)
        idx = perm[(step * BATCH) % len(data) :][:BATCH]
        x, y = data.input_ids[idx], data.labels[idx]  # (B, T)
        logits = model(x)  # (B, T, V)
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    elapsed = time.perf_counter() - start
    return steps * BATCH * BLOCK / elapsed


def trainer(model: torch.nn.Module, data: TokenDataset, steps: int, track_every: int = 0) -> tuple[float, float]:
    """``nora_core.train`` on the same work; returns (tokens/s, wall seconds of the whole call)."""
    cfg = TrainConfig(steps=steps, batch_size=BATCH, lr=1e-3, warmup_steps=5, log_every=steps,
                      track_spectra_every=track_every, device="cpu")
    start = time.perf_counter()
    train(model, cfg, data, callbacks=[SpectralTracking()] if track_every else [])
    elapsed = time.perf_counter() - start
    return steps * BATCH * BLOCK / elapsed, elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: leave the default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    data = _data()
    base = _model()
    bare_loop(copy.deepcopy(base), data, 5)  # warm-up: allocator, kernels
    bare, ours = [], []
    for _ in range(args.repeats):
        bare.append(bare_loop(copy.deepcopy(base), data, args.steps))
        ours.append(trainer(copy.deepcopy(base), data, args.steps)[0])
    b, o = statistics.median(bare), statistics.median(ours)
    print(f"threads={torch.get_num_threads()} steps={args.steps} batch={BATCH}x{BLOCK}")
    print(f"bare loop        {b:10.0f} tokens/s   (runs: {', '.join(f'{v:.0f}' for v in bare)})")
    print(f"nora_core.train  {o:10.0f} tokens/s   (runs: {', '.join(f'{v:.0f}' for v in ours)})")
    print(f"ratio train/bare {o / b:10.3f}   (target >= 0.9)")

    # spectral tracking every 50 steps
    steps = max(100, args.steps)
    plain, tracked = [], []
    for _ in range(args.repeats):
        plain.append(trainer(copy.deepcopy(base), data, steps)[1])
        tracked.append(trainer(copy.deepcopy(base), data, steps, track_every=50)[1])
    p, t = statistics.median(plain), statistics.median(tracked)
    model = copy.deepcopy(base)
    trainer(model, data, 10)  # non-zero B, so the spectra are not trivially zero
    reps = 20
    start = time.perf_counter()
    for _ in range(reps):
        adapter_spectra(model)
    per_call = (time.perf_counter() - start) / reps
    calls = math.ceil(steps / 50)
    print(f"tracking every 50 of {steps} steps: end-to-end overhead {100 * (t / p - 1):+.2f} % "
          f"(with {t:.2f} s, without {p:.2f} s; noisy on a loaded machine)")
    print(f"adapter_spectra: {1000 * per_call:.2f} ms per call for {len(adapter_spectra(model))} modules; "
          f"{calls} calls = {100 * calls * per_call / p:.3f} % of training time (target < 5 %)")


if __name__ == "__main__":
    main()
