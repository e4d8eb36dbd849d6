"""Resume after SIGKILL ends with bit-identical adapter weights (CPU)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from nora_core import TrainConfig, train
from tests.nora_core.test_trainer import single_thread, tiny_data, tiny_model  # noqa: F401 (autouse)

ROOT = Path(__file__).resolve().parents[2]
STEPS = 24


def _run(run_dir: str, *, resume: bool = False, sleep: float = 0.0) -> None:
    """One training run of the test (also the body of the subprocess that gets killed).

    NoRA with hidden dropout, so the resumed run must restore the RNG as well as the optimizer.
    One thread, so the three runs use the same reduction order.
    """
    torch.set_num_threads(1)
    model = tiny_model(method="nora", dropout=0.2, seed=1)
    if sleep:  # slow each forward down so the parent can kill mid-run; numerics are untouched
        model.register_forward_pre_hook(lambda *_: time.sleep(sleep))
    data, val = tiny_data(n=24)
    cfg = TrainConfig(
        run_dir=run_dir, steps=STEPS, batch_size=4, grad_accum_steps=2, lr=1e-2, warmup_steps=3,
        save_every=4, keep_last=2, eval_every=8, log_every=2, resume=resume, seed=3,
    )
    train(model, cfg, data, val)


def test_sigkill_then_resume_is_bit_exact(tmp_path: Path) -> None:
    killed = tmp_path / "killed"
    code = f"from tests.nora_core.test_resume import _run; _run({str(killed)!r}, sleep=0.05)"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, env=env, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60
        while not (killed / "checkpoints" / "step-000008" / "trainer_state.pt").exists():
            assert proc.poll() is None, proc.stderr.read().decode()
            assert time.monotonic() < deadline, "no checkpoint within 60 s"
            time.sleep(0.01)
        time.sleep(0.1)  # let it run a little past the checkpoint
        assert proc.poll() is None, "the run finished before it could be killed"
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not (killed / "adapter").exists()

    _run(str(killed), resume=True)
    reference = tmp_path / "reference"
    _run(str(reference))

    got = load_file(killed / "adapter" / "adapter_model.safetensors")
    want = load_file(reference / "adapter" / "adapter_model.safetensors")
    assert got.keys() == want.keys() and len(got) == 4
    for key in want:
        assert torch.equal(got[key], want[key]), key

    def records(run: Path) -> list[dict]:
        rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        return [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in rows]

    assert records(killed) == records(reference)  # no duplicated or lost lines, same losses
    assert json.loads((killed / "best" / "best.json").read_text()) == json.loads(
        (reference / "best" / "best.json").read_text()
    )
