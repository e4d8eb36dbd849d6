"""Trainer: schedule, objective, freezing, checkpoints, NaN handling, spectral tracking."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from nora_core import AdapterConfig, TrainConfig, inject_adapters, train
from nora_core.arithmetic import ArithmeticTask, arithmetic_splits
from nora_core.data import IGNORE_INDEX, Sample, TokenDataset
from nora_core.models import GPT, GPTConfig
from nora_core.trainer import NonFiniteLossError, evaluate, get_lr, latest_checkpoint

# ------------------------------------------------------------------------------ shared tiny setup


@pytest.fixture(autouse=True)
def single_thread():
    """Tiny models run as fast on one thread, and two OpenMP threads crawl on a loaded 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_model(method: str = "lora", r: int = 4, dropout: float = 0.0, seed: int = 0) -> nn.Module:
    """A 1-layer, 32-wide GPT with adapters on q_proj and v_proj, deterministic for ``seed``."""
    torch.manual_seed(seed)
    model = GPT(GPTConfig(n_layer=1, n_embd=32, n_head=2, block_size=96))
    return inject_adapters(
        model, AdapterConfig(method=method, r=r, alpha=2 * r, target_modules=["q_proj", "v_proj"], dropout=dropout)
    )


def tiny_data(n: int = 48, seed: int = 0, response_only: bool = True) -> tuple[TokenDataset, TokenDataset]:
    """Short arithmetic train/val sets, byte-tokenised (at most 96 tokens: nothing is truncated)."""
    train_rows, val_rows = arithmetic_splits(n, 16, seed=seed, task=ArithmeticTask(1, 2, 20))

    def to_ds(rows: list[dict]) -> TokenDataset:
        samples = [Sample(f"Question: {r['instruction']}\nAnswer: ", r["output"]) for r in rows]
        return TokenDataset.from_samples(samples, max_length=96, response_only=response_only)

    return to_ds(train_rows), to_ds(val_rows)


def adapter_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items() if "lora_" in k}


# ----------------------------------------------------------------------------------------- get_lr


def test_get_lr_follows_warmup_then_cosine() -> None:
    cfg = TrainConfig(steps=110, lr=1e-3, warmup_steps=10, min_lr_ratio=0.1)
    assert get_lr(0, cfg) == pytest.approx(1e-4)
    assert get_lr(4, cfg) == pytest.approx(5e-4)
    assert get_lr(9, cfg) == pytest.approx(1e-3)
    assert get_lr(10, cfg) == pytest.approx(1e-3)  # cosine starts at the peak
    assert get_lr(60, cfg) == pytest.approx(1e-4 + 0.5 * (1e-3 - 1e-4))  # half-way: the mean
    assert get_lr(110, cfg) == pytest.approx(1e-4)
    assert get_lr(500, cfg) == pytest.approx(1e-4)  # clamped past the end
    for s in range(10, 110):
        p = (s - 10) / 100
        assert get_lr(s, cfg) == pytest.approx(1e-4 + 0.5 * (1 + math.cos(math.pi * p)) * 9e-4, rel=1e-12)
    no_warmup = TrainConfig(steps=4, lr=2.0, min_lr_ratio=0.0)
    assert [get_lr(s, no_warmup) for s in range(4)] == pytest.approx([2.0, 1.0 + math.sqrt(0.5), 1.0, 1.0 - math.sqrt(0.5)])


@pytest.mark.parametrize(
    "kwargs, word",
    [
        ({"steps": 0}, "steps"),
        ({"batch_size": 6, "grad_accum_steps": 4}, "batch_size"),
        ({"warmup_steps": 11, "steps": 10}, "warmup_steps"),
        ({"lr": -1.0}, "lr"),
        ({"lr": float("nan")}, "lr"),
        ({"grad_clip": 0.0}, "grad_clip"),
        ({"save_every": 5}, "run_dir"),
        ({"betas": (0.9, 1.5)}, "betas"),
        ({"steps": True}, "steps"),
    ],
)
def test_train_config_rejects_bad_values(kwargs: dict, word: str) -> None:
    with pytest.raises(ValueError, match=word):
        TrainConfig(**kwargs)


# ------------------------------------------------------------------------------------- objective


def test_padding_is_masked_from_the_loss() -> None:
    model = tiny_model()
    data, _ = tiny_data(n=6)
    assert (data.lengths < data.seq_len).any(), "the test needs padded rows"
    got = evaluate(model, data, batch_size=3)
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(len(data)):
            n = int(data.lengths[i])
            logits = model(data.input_ids[i : i + 1, :n])[0]  # (n, V), unpadded
            for t in range(n):
                y = int(data.labels[i, t])
                if y != IGNORE_INDEX:
                    total -= float(torch.log_softmax(logits[t].double(), -1)[y])
                    count += 1
    assert got["tokens"] == count == int(data.label_counts.sum())
    assert got["loss"] == pytest.approx(total / count, rel=1e-5)
    assert got["ppl"] == pytest.approx(math.exp(total / count), rel=1e-5)
    # the pad token's value cannot matter
    repadded = TokenDataset(data.input_ids.clone(), data.labels.clone(), data.lengths.clone())
    for i in range(len(data)):
        repadded.input_ids[i, int(data.lengths[i]) :] = 7
    assert evaluate(model, repadded, batch_size=3)["loss"] == pytest.approx(got["loss"], rel=1e-6)


def test_only_adapter_parameters_change_and_the_loss_falls() -> None:
    model = tiny_model(method="nora", dropout=0.1)
    data, val = tiny_data(n=16)
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    start = evaluate(model, data, batch_size=16)["loss"]
    result = train(model, TrainConfig(steps=30, batch_size=8, lr=3e-2, log_every=5), data, val)
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(".lora_A." in k or ".lora_B." in k for k in changed)
    assert {k for k in before if ".lora_B." in k} <= changed
    # a random 1-layer base with rank-4 adapters on q/v learns slowly; the seeded run drops by ~0.15
    assert evaluate(model, data, batch_size=16)["loss"] < start - 0.1
    assert result.history[-1]["train_loss"] < result.history[0]["train_loss"]
    assert result.steps == 30 and result.val_loss is not None and result.tokens > 0
    assert [r["step"] for r in result.history] == [5, 10, 15, 20, 25, 30]


def test_gradient_accumulation_matches_one_big_batch() -> None:
    data, _ = tiny_data(n=16)
    weights = []
    for accum in (1, 4):
        model = tiny_model()
        train(model, TrainConfig(steps=4, batch_size=8, grad_accum_steps=accum, lr=1e-2), data)
        weights.append(adapter_weights(model))
    for key in weights[0]:
        torch.testing.assert_close(weights[0][key], weights[1][key], atol=1e-6, rtol=1e-5)


def test_models_returning_an_object_with_logits_are_accepted() -> None:
    class Output:
        def __init__(self, logits: torch.Tensor) -> None:
            self.logits = logits

    class Wrapped(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = tiny_model()

        def forward(self, input_ids: torch.Tensor) -> Output:
            return Output(self.inner(input_ids))

    data, _ = tiny_data(n=8)
    result = train(Wrapped(), TrainConfig(steps=2, batch_size=4), data)
    assert result.steps == 2 and math.isfinite(result.train_loss)


def test_bf16_autocast_trains_with_finite_losses() -> None:
    model = tiny_model()
    data, val = tiny_data(n=8)
    result = train(model, TrainConfig(steps=3, batch_size=4, lr=1e-2, bf16=True), data, val)
    assert math.isfinite(result.train_loss) and math.isfinite(result.val_loss)
    assert all(v.dtype == torch.float32 for v in adapter_weights(model).values())  # master weights stay fp32
    assert any(v.abs().sum() > 0 for k, v in adapter_weights(model).items() if "lora_B" in k)


def test_a_model_without_trainable_parameters_is_refused() -> None:
    model = GPT(GPTConfig(n_layer=1, n_embd=32, n_head=2, block_size=96)).requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        train(model, TrainConfig(steps=1), tiny_data(n=4)[0])


def test_a_loss_over_zero_label_tokens_is_an_error_not_zero() -> None:
    model = tiny_model()
    data, val = tiny_data(n=4)
    masked = TokenDataset(data.input_ids.clone(), torch.full_like(data.labels, IGNORE_INDEX), data.lengths.clone())
    with pytest.raises(ValueError, match="no label token"):  # was {"loss": 0.0, "ppl": 1.0}
        evaluate(model, masked, batch_size=2)
    # evaluating only masked rows (max_batches) is the same error
    mixed = TokenDataset(data.input_ids.clone(), data.labels.clone(), data.lengths.clone())
    mixed.labels[:2] = IGNORE_INDEX
    mixed = TokenDataset(mixed.input_ids, mixed.labels, mixed.lengths)
    with pytest.raises(ValueError, match="no label token"):
        evaluate(model, mixed, batch_size=2, max_batches=1)
    assert evaluate(model, mixed, batch_size=2)["tokens"] == int(data.label_counts[2:].sum())
    # training refuses a row without labels (a batch of them would report loss 0) before any step
    before = adapter_weights(model)
    with pytest.raises(ValueError, match=r"train_data: 2 of 4 row\(s\) have no label token"):
        train(model, TrainConfig(steps=2, batch_size=2), mixed, val)
    with pytest.raises(ValueError, match=r"eval_data: the 2 evaluated row\(s\) hold no label token"):
        train(model, TrainConfig(steps=2, batch_size=2, eval_batches=1), data, mixed)
    assert all(torch.equal(before[k], v) for k, v in adapter_weights(model).items())


# ------------------------------------------------------------------------------------ checkpoints


def test_checkpoints_keep_the_last_k_and_the_best(tmp_path: Path) -> None:
    model = tiny_model()
    data, val = tiny_data(n=16)
    cfg = TrainConfig(run_dir=str(tmp_path), steps=20, batch_size=4, lr=5e-3, save_every=5, keep_last=2, eval_every=5)
    result = train(model, cfg, data, val)
    ckpts = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert ckpts == ["step-000015", "step-000020"]
    assert not [p for p in tmp_path.rglob(".*") if p.name != ".pytest_cache"], "temporary files left behind"
    for name in ckpts:
        state = torch.load(tmp_path / "checkpoints" / name / "trainer_state.pt", weights_only=True)
        assert state["step"] == int(name[5:]) and "optimizer" in state and state["rng"][0]["torch"].dtype == torch.uint8
        assert (tmp_path / "checkpoints" / name / "adapter_model.safetensors").is_file()
    best = json.loads((tmp_path / "best" / "best.json").read_text())
    assert best["step"] == result.best_step and best["val_loss"] == pytest.approx(result.best_val_loss)
    final = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    for key, value in adapter_weights(model).items():
        assert torch.equal(final["base_model.model." + key], value)
    with pytest.raises(ValueError, match="already holds a run"):
        train(tiny_model(), cfg, data, val)


def test_a_crash_while_checkpointing_leaves_the_previous_checkpoint_intact(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import nora_core.trainer as trainer_module

    real_save = torch.save
    calls = {"n": 0}

    def flaky_save(obj, f, *args, **kwargs):  # the 2nd trainer_state.pt write dies half-way
        calls["n"] += 1
        if calls["n"] == 2:
            f.write(b"partial")
            raise OSError("disk full")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(trainer_module.torch, "save", flaky_save)
    data, _ = tiny_data(n=16)
    cfg = TrainConfig(run_dir=str(tmp_path), steps=20, batch_size=4, save_every=5)
    with pytest.raises(OSError, match="disk full"):
        train(tiny_model(), cfg, data)
    monkeypatch.setattr(trainer_module.torch, "save", real_save)
    assert latest_checkpoint(tmp_path).name == "step-000005"
    assert not (tmp_path / "checkpoints" / "step-000010").exists()
    torch.load(tmp_path / "checkpoints" / "step-000005" / "trainer_state.pt", weights_only=True)
    # resuming cleans the partial directory and continues from step 5
    result = train(tiny_model(), TrainConfig(**{**cfg.to_dict(), "resume": True}), data)
    assert result.resumed_from == 5 and result.steps == 20
    assert not list((tmp_path / "checkpoints").glob(".tmp-*"))
    steps = [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(set(steps)) and steps[-1] == 20


def test_a_nan_loss_stops_with_a_clear_error_and_keeps_the_last_checkpoint(tmp_path: Path) -> None:
    class PoisonAfter(nn.Module):
        def __init__(self, calls: int) -> None:
            super().__init__()
            self.inner = tiny_model()
            self.calls, self.left = 0, calls

        def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
            self.calls += 1
            logits = self.inner(input_ids)
            return logits * float("nan") if self.calls > self.left else logits

    model = PoisonAfter(calls=7)  # steps 1-7 fine, step 8 NaN
    data, _ = tiny_data(n=16)
    cfg = TrainConfig(run_dir=str(tmp_path), steps=20, batch_size=4, lr=1e-2, save_every=5)
    with pytest.raises(NonFiniteLossError, match=r"step 8.*step-000005"):
        train(model, cfg, data)
    assert all(torch.isfinite(p).all() for p in model.parameters())  # the bad step was not applied
    assert not list((tmp_path / "checkpoints").glob(".tmp-*"))
    assert latest_checkpoint(tmp_path).name == "step-000005"
    restored = tiny_model()
    from nora_core import load_adapter

    load_adapter(restored, tmp_path / "checkpoints" / "step-000005")
    assert all(torch.isfinite(v).all() for v in adapter_weights(restored).values())
    assert any(v.abs().sum() > 0 for k, v in adapter_weights(restored).items() if "lora_B" in k)


@pytest.mark.parametrize(
    ("save_every", "steps", "where"),
    [(5, 20, "none yet (the first is written at step 5)"), (50, 20, "none yet (the first is written at step 20)"),
     (0, 20, "none (set save_every to keep checkpoints)")],
)
def test_a_nan_loss_before_the_first_checkpoint_says_when_it_comes(
    tmp_path: Path, save_every: int, steps: int, where: str
) -> None:
    class PoisonAfter(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner, self.calls = tiny_model(), 0

        def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
            self.calls += 1
            logits = self.inner(input_ids)
            return logits * float("nan") if self.calls > 2 else logits

    data, _ = tiny_data(n=16)
    cfg = TrainConfig(run_dir=str(tmp_path), steps=steps, batch_size=4, save_every=save_every, track_spectra_every=0)
    with pytest.raises(NonFiniteLossError) as info:
        train(PoisonAfter(), cfg, data)
    assert f"step 3; stopped before the optimizer step. Last good checkpoint: {where}." in str(info.value)


def test_an_existing_run_dir_names_the_cli_flag_and_the_python_argument(tmp_path: Path) -> None:
    data, _ = tiny_data(n=16)
    cfg = TrainConfig(run_dir=str(tmp_path), steps=1, batch_size=4, track_spectra_every=0)
    train(tiny_model(), cfg, data)
    with pytest.raises(ValueError, match=r"pass --resume \(resume=True in Python\)"):
        train(tiny_model(), cfg, data)


# ------------------------------------------------------------------------------ spectral tracking


def test_metrics_jsonl_spectra_equal_nora_spectra_on_the_saved_factors(tmp_path: Path) -> None:
    from nora_spectra.metrics import spectrum_metrics
    from nora_spectra.tracking import SpectralTracking
    from nora_spectra.spectrum import adapter_singular_values

    model = tiny_model(method="nora", r=4)
    data, val = tiny_data(n=16)
    cfg = TrainConfig(
        run_dir=str(tmp_path), steps=10, batch_size=4, lr=1e-2, save_every=5, keep_last=5,
        track_spectra_every=5, eval_every=5, log_every=2,
    )
    train(model, cfg, data, val, callbacks=[SpectralTracking()])
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [2, 4, 5, 6, 8, 10]
    tracked = [r for r in records if "spectra" in r]
    assert [r["step"] for r in tracked] == [5, 10]
    for record in records:
        assert {"step", "train_loss", "lr", "tokens_per_s"} <= record.keys()
        assert ("val_loss" in record) == (record["step"] in (5, 10))
    scale = 2.0  # alpha / r = 8 / 4
    for record in tracked:
        tensors = load_file(tmp_path / "checkpoints" / f"step-{record['step']:06d}" / "adapter_model.safetensors")
        modules = [s["module"] for s in record["spectra"]]
        assert modules == ["blocks.0.attn.q_proj", "blocks.0.attn.v_proj"]
        for spec in record["spectra"]:
            A = tensors[f"base_model.model.{spec['module']}.lora_A.weight"].double().numpy()
            B = tensors[f"base_model.model.{spec['module']}.lora_B.weight"].double().numpy()
            expected = spectrum_metrics(adapter_singular_values(A, B, scale), rank=4, shape=B.shape[:1] + A.shape[1:])
            assert spec["module_type"] == spec["module"].rsplit(".", 1)[-1] and spec["rank"] == 4
            for key in ("effective_rank", "utilization", "stable_rank", "sigma_max"):
                assert spec[key] == expected[key], key


def test_save_every_1_never_names_the_checkpoint_of_the_diverging_update(tmp_path: Path) -> None:
    """The checkpoint written right after the update that diverged holds finite but bad weights; the loss
    after it is the first non-finite one, so the last good checkpoint is the one before it, and --resume
    must continue from that one."""

    class DivergesAfter(nn.Module):
        def __init__(self, calls: int) -> None:
            super().__init__()
            self.inner, self.calls, self.left = tiny_model(), 0, calls

        def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
            self.calls += 1
            logits = self.inner(input_ids)
            return logits * float("nan") if self.calls > self.left else logits

    data, _ = tiny_data(n=16)
    cfg = TrainConfig(run_dir=str(tmp_path), steps=20, batch_size=4, lr=1e-2, save_every=1, keep_last=1)
    with pytest.raises(NonFiniteLossError) as info:
        train(DivergesAfter(calls=7), cfg, data)  # the weights of step 7 give the first NaN loss (step 8)
    message = str(info.value)
    assert f"Last good checkpoint: {tmp_path / 'checkpoints' / 'step-000006'}." in message
    assert "Set aside as diverged: diverged-step-000007." in message
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == ["diverged-step-000007", "step-000006"]  # keep_last=1 did not prune the good one
    assert latest_checkpoint(tmp_path).name == "step-000006"
    resumed = train(tiny_model(), TrainConfig(**{**cfg.to_dict(), "resume": True, "lr": 1e-3, "steps": 8}), data)
    assert resumed.resumed_from == 6 and resumed.steps == 8


def test_non_finite_weights_are_never_saved_as_a_checkpoint(tmp_path: Path) -> None:
    def poison(step: int, model: nn.Module) -> dict:
        if step == 3:
            with torch.no_grad():
                next(p for n, p in model.named_parameters() if "lora_B" in n).fill_(float("inf"))
        return {}

    data, _ = tiny_data(n=16)
    cfg = TrainConfig(run_dir=str(tmp_path), steps=10, batch_size=4, save_every=1, track_spectra_every=1)
    with pytest.raises(NonFiniteLossError, match=r"non-finite adapter weights after step 3; not saved\. "
                       r"Last good checkpoint: .*step-000002\."):
        train(tiny_model(), cfg, data, callbacks=[poison])
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-000001", "step-000002"]


@pytest.mark.parametrize(("lr", "dtype"), [(1e39, torch.float32), (1e38, torch.float32), (1e5, torch.float16)])
def test_a_learning_rate_adamw_cannot_apply_is_refused_before_training(lr: float, dtype: torch.dtype) -> None:
    data, _ = tiny_data(n=8)
    if dtype == torch.float32:
        with pytest.raises(ValueError, match=r"TrainConfig.lr .* too large for AdamW on float32 parameters"):
            TrainConfig(lr=lr, steps=1, batch_size=4)
        return
    model = tiny_model().to(dtype)
    with pytest.raises(ValueError, match=r"too large for AdamW on float16 parameters: its first step, "
                       r"lr / \(1 - beta1\) = 1e\+06, exceeds the largest float16 value, 6\.55e\+04"):
        train(model, TrainConfig(lr=lr, steps=1, batch_size=4, device="cpu"), data)
