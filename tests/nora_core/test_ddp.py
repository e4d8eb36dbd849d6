"""DistributedDataParallel on 2 CPU processes (gloo) trains the same adapters as one process.

Both runs see the same global batch (8 sequences: 2 processes x 1 micro-batch of 4, against 1 process x
2 accumulated micro-batches of 4) and optimise the same token-mean loss over it, so they differ only
by floating-point summation order. Stated tolerance: atol 1e-5, rtol 1e-4 after 6 AdamW steps (measured
on this model: the weights come out identical, max difference 0.0).
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file

from nora_core import TrainConfig, train
from nora_spectra.tracking import SpectralTracking
from tests.nora_core.test_trainer import single_thread, tiny_data, tiny_model  # noqa: F401 (autouse)

STEPS = 6


def _config(run_dir: str, accum: int) -> TrainConfig:
    return TrainConfig(
        run_dir=run_dir, steps=STEPS, batch_size=8, grad_accum_steps=accum, lr=1e-2, warmup_steps=2,
        eval_every=3, save_every=3, track_spectra_every=3, device="cpu",
    )


def _worker(rank: int, world: int, port: int, run_dir: str) -> None:
    """What ``torchrun --nproc_per_node 2`` would start: env vars, then plain ``train``."""
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world)
    )
    torch.set_num_threads(1)
    model = tiny_model(seed=rank)  # different inits: DDP must broadcast rank 0's
    data, val = tiny_data(n=32)
    result = train(model, _config(run_dir, accum=1), data, val, callbacks=[SpectralTracking()])
    torch.save({"weights": {k: v for k, v in model.state_dict().items() if "lora_" in k}, "val": result.val_loss},
               Path(run_dir).parent / f"rank{rank}.pt")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_two_gloo_processes_match_one_process(tmp_path: Path) -> None:
    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path / "ddp")), nprocs=2, join=True)

    model = tiny_model(seed=0)
    data, val = tiny_data(n=32)
    single = train(model, _config(str(tmp_path / "single"), accum=2), data, val, callbacks=[SpectralTracking()])

    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    want = {k: v for k, v in model.state_dict().items() if "lora_" in k}
    for key, value in want.items():
        assert torch.equal(ranks[0]["weights"][key], ranks[1]["weights"][key]), "ranks diverged"
        torch.testing.assert_close(ranks[0]["weights"][key], value, atol=1e-5, rtol=1e-4)
    assert abs(ranks[0]["val"] - single.val_loss) < 1e-5
    # only rank 0 wrote: one metrics file with one record per logged step, and the saved adapter
    saved = load_file(tmp_path / "ddp" / "adapter" / "adapter_model.safetensors")
    for key, value in want.items():
        torch.testing.assert_close(saved["base_model.model." + key], value, atol=1e-5, rtol=1e-4)
    lines = (tmp_path / "ddp" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == len((tmp_path / "single" / "metrics.jsonl").read_text().splitlines()) == 2
    assert sorted(p.name for p in (tmp_path / "ddp" / "checkpoints").iterdir()) == ["step-000003", "step-000006"]
