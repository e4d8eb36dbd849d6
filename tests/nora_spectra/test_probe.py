"""Probe spectra: exact against dense float64 for given inputs; LoRA probe == weight space up to sampling error."""

import json
import math

import numpy as np
import pytest
import torch

from nora_core.checkpoint import save_adapter
from nora_core.config import AdapterConfig
from nora_core.inject import adapter_layers, inject_adapters
from nora_core.models.gpt import GPT, GPTConfig
from nora_spectra.analysis import analyze, probe_spectra
from nora_spectra.errors import UsageError
from nora_spectra.spaces.probe import apply_activation, probe_layer, probe_response_singular_values
from nora_spectra.spectrum import adapter_singular_values

RTOL = 1e-9


def dense_probe(A, B, scale, activation, X):
    """Reference: form Y = s act(X A^T) B^T in float64, centre the columns, dense SVD."""
    Y = scale * apply_activation(activation, X @ A.T) @ B.T
    return np.linalg.svd(Y - Y.mean(axis=0), compute_uv=False)


@pytest.mark.parametrize("activation", ["identity", "silu", "relu", "gelu"])
@pytest.mark.parametrize(
    "r, d_in, d_out, n",
    # r smallest (hidden path); d_out smallest, samples smallest, and r above both (output path)
    [(4, 10, 7, 50), (8, 6, 12, 3000), (5, 9, 3, 4), (40, 10, 6, 300), (50, 12, 60, 20), (30, 5, 25, 7)],
)
def test_response_matches_dense_float64(activation, r, d_in, d_out, n):
    rng = np.random.default_rng(0)
    A, B, X = rng.standard_normal((r, d_in)), rng.standard_normal((d_out, r)), rng.standard_normal((n, d_in))
    got = probe_response_singular_values(A, B, 0.7, activation, X)
    want = dense_probe(A, B, 0.7, activation, X)
    k = len(got)
    assert k == min(r, d_out)
    j = min(k, want.size)  # with fewer samples than min(r, d_out), the rest are exact zeros
    np.testing.assert_allclose(got[:j], want[:j], rtol=0, atol=RTOL * want[0])
    assert np.all(got[j:] == 0) and np.all(want[k:] <= 1e-10 * want[0])


@pytest.mark.parametrize(
    "r, d_in, d_out, samples, width",
    [(6000, 1, 1, 4096, 1), (300, 4, 20, 64, 20), (16, 8, 64, 4096, 16), (64, 8, 2, 3, 2)],
)
def test_probe_work_follows_min_of_rank_output_and_samples(monkeypatch, r, d_in, d_out, samples, width):
    """The streamed factor is r wide only when r is the smallest side; otherwise d_out (the 24 KB file
    with r = 6000 and d_in = d_out = 1 took 7-20 s with an r x r factor)."""
    from nora_spectra.spaces import centred

    widths, rows = [], []
    original = centred.CentredFactor

    class Spy(original):  # type: ignore[misc, valid-type]
        def __init__(self, w: int) -> None:
            widths.append(w)
            super().__init__(w)

        def update(self, batch: np.ndarray) -> None:
            rows.append(batch.shape)
            super().update(batch)

    monkeypatch.setattr(centred, "CentredFactor", Spy)
    rng = np.random.default_rng(1)
    A, B = rng.standard_normal((r, d_in)), rng.standard_normal((d_out, r))
    got = probe_layer(A, B, 0.5, "silu", samples=samples, rng=np.random.default_rng(2))
    assert widths == [width] and got.shape == (min(r, d_out),)
    assert sum(m for m, _ in rows) == samples
    assert max(m * max(r, d_in, d_out) for m, _ in rows) <= 2**21 or max(m for m, _ in rows) == 1
    if r * samples <= 2_000_000:  # the reference forms every output row
        X = np.random.default_rng(2).standard_normal((samples, d_in))
        want = dense_probe(A, B, 0.5, "silu", X) / math.sqrt(samples - 1)
        np.testing.assert_allclose(got[: min(want.size, got.size)], want[: got.size], rtol=0, atol=1e-9 * want[0])


def test_activations_match_torch():
    z = np.linspace(-30, 30, 601)
    for name, module in [("silu", torch.nn.SiLU()), ("relu", torch.nn.ReLU()), ("gelu", torch.nn.GELU())]:
        np.testing.assert_allclose(apply_activation(name, z), module(torch.tensor(z)).numpy(), rtol=1e-13, atol=1e-15)
    with pytest.raises(UsageError, match="tanh"):
        apply_activation("tanh", z)


def _relative_error(r=4, d_in=16, d_out=10, n=1000, seed=0, probe_scale=1.0):
    rng = np.random.default_rng(123)
    A, B = rng.standard_normal((r, d_in)), rng.standard_normal((d_out, r))
    weight = adapter_singular_values(A, B, 0.5) * probe_scale
    probe = probe_layer(A, B, 0.5, "identity", probe_scale=probe_scale, samples=n, rng=np.random.default_rng(seed))
    return np.max(np.abs(probe - weight) / weight)


def test_lora_probe_equals_weight_space_times_probe_scale_within_sampling_error():
    n = 200_000
    for probe_scale in (1.0, 0.25, 3.0):
        err = _relative_error(n=n, probe_scale=probe_scale)
        assert err < 4 * math.sqrt(4 / n), err  # O(sqrt(r / n)), here about 0.009


def test_lora_probe_error_shrinks_like_one_over_sqrt_n():
    small = np.mean([_relative_error(n=1_000, seed=s) for s in range(8)])
    large = np.mean([_relative_error(n=16_000, seed=s) for s in range(8)])
    assert 2.0 < small / large < 8.0  # sqrt(16) = 4


# ----------------------------------------------------------------------------- whole checkpoints
def _checkpoint(tmp_path, config, seed=0):
    torch.manual_seed(seed)
    model = GPT(GPTConfig(block_size=16, n_layer=2, n_head=2, n_embd=32))
    inject_adapters(model, config)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in adapter_layers(model):
            layer.lora_B.weight.copy_(torch.randn(layer.lora_B.weight.shape, generator=gen) * 0.05)
    return save_adapter(model, tmp_path / config.method)


def test_lora_checkpoint_probe_tracks_weight_space(tmp_path):
    path = _checkpoint(tmp_path, AdapterConfig(method="lora", r=4, alpha=8, target_modules=["q_proj", "v_proj"]))
    weight = analyze(path, emit_warnings=False)
    probe = probe_spectra(path, probe_scale=2.0, samples=100_000, seed=1)
    assert probe.space == "probe" and probe.probe_scale == 2.0 and probe.tokens == 100_000
    assert [r["module"] for r in probe.records] == [r["module"] for r in weight.records]
    for p, w in zip(probe.records, weight.records):
        assert p["space"] == "probe" and p["shape"] == [w["shape"][0], 100_000]
        np.testing.assert_allclose(p["singular_values"], 2.0 * np.asarray(w["singular_values"]), rtol=0.03)
        assert p["effective_rank"] == pytest.approx(w["effective_rank"], rel=0.01)
    assert json.loads(probe.to_json())["space"] == "probe"


def test_nora_identity_probe_tracks_weight_space_and_silu_is_half_at_small_scale(tmp_path):
    ident = _checkpoint(tmp_path / "i", AdapterConfig(method="nora", r=4, activation="identity", target_modules=["v_proj"]))
    silu = _checkpoint(tmp_path / "s", AdapterConfig(method="nora", r=4, activation="silu", target_modules=["v_proj"]))
    weight = analyze(ident, emit_warnings=False)  # the same factors (same seeds): the linear map B A
    p_ident = probe_spectra(ident, samples=50_000)
    for p, w in zip(p_ident.records, weight.records):
        np.testing.assert_allclose(p["singular_values"], w["singular_values"], rtol=0.05)
    # SiLU(z) = z/2 + z^2/4 + O(z^4): at a small input scale the branch is nearly B A / 2
    p_silu = probe_spectra(silu, probe_scale=1e-3, samples=50_000)
    for p, w in zip(p_silu.records, weight.records):
        np.testing.assert_allclose(p["singular_values"], 0.5e-3 * np.asarray(w["singular_values"]), rtol=0.05)
    # ... and not at a large one: the probe depends on its scale for a non-linear branch
    big = probe_spectra(silu, probe_scale=10.0, samples=20_000)
    ratio = np.asarray(big.records[0]["singular_values"]) / (10.0 * np.asarray(weight.records[0]["singular_values"]))
    assert not np.allclose(ratio, 0.5, rtol=0.05)


def test_probe_is_seeded_and_per_layer(tmp_path):
    path = _checkpoint(tmp_path, AdapterConfig(method="nora", r=3, target_modules=["q_proj", "v_proj"]))
    a = probe_spectra(path, samples=500, seed=7)
    b = probe_spectra(path, samples=500, seed=7)
    only_last = probe_spectra(path, samples=500, seed=7, layers="last:1")
    assert [r["singular_values"] for r in a.records] == [r["singular_values"] for r in b.records]
    assert only_last.records == [r for r in a.records if r["layer_index"] == 1]
    c = probe_spectra(path, samples=500, seed=8)
    assert a.records[0]["singular_values"] != c.records[0]["singular_values"]


def test_probe_options_are_validated(tmp_path):
    path = _checkpoint(tmp_path, AdapterConfig(method="lora", r=2, target_modules=["q_proj"]))
    for bad in (0.0, -1.0, float("nan")):
        with pytest.raises(UsageError, match="probe scale"):
            probe_spectra(path, probe_scale=bad)
    with pytest.raises(UsageError, match="samples"):
        probe_spectra(path, samples=1)


# ----------------------------------------------------------------------------- CLI options of `spectra analyze`
def _analyze(args):
    """Run the real `spectra analyze` command with JSON output."""
    from click.testing import CliRunner

    from nora_spectra.cli.analyze import command

    return CliRunner().invoke(command, [*args, "--format", "json", "-q"])


def test_space_options_drive_probe_and_activation(tmp_path):
    path = _checkpoint(tmp_path, AdapterConfig(method="nora", r=3, target_modules=["q_proj", "v_proj"]))
    out = _analyze([str(path), "--space", "probe", "--probe-scale", "0.5", "--probe-samples", "300", "--layers", "q_proj"])
    assert out.exit_code == 0, out.output
    data = json.loads(out.output)
    assert data["space"] == "probe" and data["probe_scale"] == 0.5 and len(data["layers"]) == 2

    torch.manual_seed(0)
    base = GPT(GPTConfig(block_size=16, n_layer=2, n_head=2, n_embd=32)).save_pretrained(tmp_path / "base")
    jsonl = tmp_path / "d.jsonl"
    jsonl.write_text('{"text": "hello world, adapters"}\n{"text": "spectra"}\n')
    out = _analyze([str(path), "--space", "activation", "--model", str(base), "--data", str(jsonl), "--samples", "2"])
    assert out.exit_code == 0, out.output
    data = json.loads(out.output)
    # BOS + text + EOS, every position measured; the first text cut to block_size 16 keeping BOS and EOS
    assert data["space"] == "activation" and data["tokens"] == 16 + len("spectra") + 2

    from click.testing import CliRunner

    from nora_spectra.cli.analyze import command

    table = CliRunner().invoke(command, [str(path), "--space", "probe", "-q"]).output
    assert table.splitlines()[0].endswith("; probe space, 4096 Gaussian inputs per layer)")
    weight = json.loads(_analyze([str(path)]).output)
    assert "space" not in weight  # weight space is analyze()'s plain result


@pytest.mark.parametrize(
    "args, message",
    [
        (["--space", "activation"], "needs --model"),
        (["--space", "probe", "--samples", "3", "--data", "{data}"], "only apply to --space activation"),
        (["--layers", "0"], "--layers applies"),
    ],
)
def test_space_options_refuse_misfits(tmp_path, args, message):
    path = _checkpoint(tmp_path, AdapterConfig(method="lora", r=2, target_modules=["q_proj"]))
    data = tmp_path / "d.jsonl"
    data.write_text('{"text": "x"}\n')
    out = _analyze([str(path)] + [a.format(data=data) for a in args])
    assert out.exit_code != 0 and isinstance(out.exception, UsageError) and message in str(out.exception)
    with pytest.raises(UsageError, match="--space must be"):
        analyze(path, space="dense")


def test_library_analyze_takes_the_space_and_its_options(tmp_path):
    path = _checkpoint(tmp_path, AdapterConfig(method="nora", r=3, target_modules=["q_proj", "v_proj"]))
    via_analyze = analyze(path, space="probe", probe_samples=300, layers="q_proj", seed=3, emit_warnings=False)
    via_wrapper = probe_spectra(path, samples=300, layers="q_proj", seed=3)
    assert via_analyze.space == "probe" and via_analyze.to_dict() == via_wrapper.to_dict()
    assert [r["tokens"] for r in via_analyze.records] == [300, 300]
    with pytest.raises(UsageError, match=r"^--model applies only to --space activation$"):
        analyze(path, model="x")
    with pytest.raises(UsageError, match=r"^--probe-scale and --seed only apply to --space probe$"):
        analyze(path, probe_scale=2.0, seed=1)
    with pytest.raises(UsageError, match="unknown option"):
        analyze(path, space="probe", temperature=1.0)
