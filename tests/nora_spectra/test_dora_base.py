"""DoRA's true update and relative size, checked against PEFT's own merged weights on a tiny model.

PEFT builds and saves a DoRA adapter on Linear, GPT-2 Conv1D (fan_in_fan_out), Conv2d and Embedding
layers of a float64 model; ``merge_and_unload()`` gives ``W'`` and the true update is ``W' - W0``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft", reason="peft is a dev dependency: pip install -e '.[dev]'")
pytorch_utils = pytest.importorskip("transformers.pytorch_utils", reason="transformers is a dev dependency")

from nora_spectra.analysis import analyze  # noqa: E402
from nora_spectra.dora import dora_update  # noqa: E402
from nora_spectra.io import load_checkpoint  # noqa: E402
from nora_spectra.io.model_weights import open_model_weights  # noqa: E402
from nora_spectra.schema import DORA_PROXY_WARNING  # noqa: E402
from nora_spectra.spaces.base_aware import BaseAware  # noqa: E402
from nora_spectra.spaces.weight import DORA_TRUE_WARNING  # noqa: E402
from nora_spectra.svd_cache import SvdCache  # noqa: E402
from nora_spectra.updates import dense_matrix  # noqa: E402
from tests.nora_spectra.model_builders import write_model  # noqa: E402


class Tiny(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(50, 16)
        self.q_proj = torch.nn.Linear(16, 24)
        self.c_attn = pytorch_utils.Conv1D(24, 16)  # weight stored (d_in, d_out) = (16, 24)
        self.c_proj = pytorch_utils.Conv1D(16, 16)  # square Conv1D: only the config flag tells the orientation
        self.conv = torch.nn.Conv2d(8, 12, 3)


MODULES = ["embed", "q_proj", "c_attn", "c_proj", "conv"]


@pytest.fixture(scope="module")
def dora(tmp_path_factory) -> tuple[Path, Path, dict[str, np.ndarray]]:
    """(adapter dir, base model file, merged weights) of a trained-looking DoRA adapter."""
    tmp = tmp_path_factory.mktemp("dora")
    torch.manual_seed(0)
    model = Tiny().double()
    base = {name: value.detach().numpy().copy() for name, value in model.state_dict().items()}
    # PEFT flips the shared fan_in_fan_out flag to true when it meets the first Conv1D (after q_proj, a
    # Linear that keeps false): the saved config says true for every module, as in real mixed models.
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=MODULES, use_dora=True, init_lora_weights=False)
    with pytest.warns(UserWarning, match="fan_in_fan_out"):
        peft_model = peft.get_peft_model(model, config)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_" in name:
                param.mul_(1.0 + torch.rand_like(param))  # magnitude away from ||W0 + sBA||, B away from init
    peft_model.save_pretrained(tmp / "adapter")
    assert '"fan_in_fan_out": true' in (tmp / "adapter" / "adapter_config.json").read_text()
    merged = peft_model.merge_and_unload()
    merged_weights = {name: value.detach().numpy().copy() for name, value in merged.state_dict().items()}
    return tmp / "adapter", write_model(tmp / "base.safetensors", base), {"base": base, "merged": merged_weights}


def _true_update(weights: dict, module: str) -> np.ndarray:
    """PEFT's ``W' - W0`` in the (d_out, d_in) orientation (Conv1D transposed, conv flattened)."""
    delta = weights["merged"][f"{module}.weight"] - weights["base"][f"{module}.weight"]
    if module in ("c_attn", "c_proj"):
        delta = delta.T
    return delta.reshape(delta.shape[0], -1)


def test_the_true_update_is_peft_merged_minus_base(dora) -> None:
    adapter, base_path, weights = dora
    checkpoint = load_checkpoint(adapter)
    aware = BaseAware(open_model_weights(base_path), checkpoint, cache=SvdCache(None), intruders=False,
                      intruder_k=10, intruder_eps=0.5)
    for layer in checkpoint.iter_layers():
        if layer.module not in MODULES or not layer.dora:
            continue
        plan = aware.plan(layer.module, layer.layer_type, layer.shape)
        assert plan.transposed == (layer.module in ("c_attn", "c_proj"))
        w0 = aware.matrix(plan)
        got = dora_update(w0, dense_matrix(layer.update), layer.read_magnitude(), layer_type=layer.layer_type)
        want = _true_update(weights, layer.module)
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-12 * np.abs(want).max())
        proxy = dense_matrix(layer.update)
        assert np.abs(proxy - want).max() > 1e-3 * np.abs(want).max()  # the proxy is not the update


def test_analysis_with_base_reports_true_spectra_and_relative_size(dora) -> None:
    adapter, base_path, weights = dora
    proxy = analyze(adapter, emit_warnings=False)
    assert {rec["status"] for rec in proxy.records} == {"dora_direction_only"}
    assert DORA_PROXY_WARNING in proxy.warnings and "base_tensor" not in proxy.records[0]
    analysis = analyze(adapter, base=base_path, cache=False, emit_warnings=False)
    assert DORA_TRUE_WARNING in analysis.warnings and DORA_PROXY_WARNING not in analysis.warnings
    assert sorted(rec["module"] for rec in analysis.records) == sorted(MODULES)
    for rec in analysis.records:
        want_dw = _true_update(weights, rec["module"])
        w0 = weights["base"][f"{rec['module']}.weight"]
        w0 = (w0.T if rec["module"] in ("c_attn", "c_proj") else w0).reshape(want_dw.shape)
        want = np.linalg.svd(want_dw, compute_uv=False)
        assert rec["status"] == "ok" and rec["base_tensor"] == f"{rec['module']}.weight"
        np.testing.assert_allclose(rec["singular_values"], want, rtol=0, atol=1e-10 * want[0])
        assert rec["relative_sigma_max"] == pytest.approx(want[0] / np.linalg.norm(w0, 2), rel=1e-10)
        assert rec["relative_frobenius_norm"] == pytest.approx(np.linalg.norm(want_dw) / np.linalg.norm(w0), rel=1e-10)
        assert rec["rank"] == 4 and rec["top_k"] is None and rec["captured_energy"] == 1.0


def test_relative_size_of_plain_lora_and_a_missing_module(tmp_path: Path) -> None:
    from nora_spectra.errors import CheckpointError
    from tests.nora_spectra.io_builders import lora_tensors, peft_dir

    shapes = {"model.layers.0.q_proj": (12, 10, 4), "model.layers.1.q_proj": (12, 10, 4)}
    tensors = lora_tensors(shapes, dtype=np.float64, seed=3)
    adapter = peft_dir(tmp_path / "lora", tensors, r=4, lora_alpha=8)
    rng = np.random.default_rng(4)
    base = {f"{m}.weight": rng.standard_normal((12, 10)) for m in shapes}
    base_path = write_model(tmp_path / "base.safetensors", base)
    analysis = analyze(adapter, base=base_path, cache=False, emit_warnings=False)
    for rec in analysis.records:
        a = tensors[f"base_model.model.{rec['module']}.lora_A.weight"]
        b = tensors[f"base_model.model.{rec['module']}.lora_B.weight"]
        dw, w0 = 2.0 * b @ a, base[f"{rec['module']}.weight"]
        assert rec["relative_sigma_max"] == pytest.approx(np.linalg.norm(dw, 2) / np.linalg.norm(w0, 2), rel=1e-12)
        assert rec["relative_frobenius_norm"] == pytest.approx(np.linalg.norm(dw) / np.linalg.norm(w0), rel=1e-12)
        assert rec["status"] == "ok" and rec["captured_energy"] == 1.0
    del base["model.layers.1.q_proj.weight"]
    write_model(tmp_path / "base.safetensors", base)
    with pytest.raises(CheckpointError) as info:
        analyze(adapter, base=base_path, cache=False, emit_warnings=False)
    assert str(info.value).startswith(f"{base_path}: no weight for module 'model.layers.1.q_proj' of ")


@pytest.mark.parametrize(
    "adapter, files_key",
    [
        ("mlx/dora", "dora/adapters.safetensors"),
        ("torchtune/dora/epoch_0/adapter_model.pt", "dora/epoch_0/adapter_model.pt"),
    ],
)
def test_true_dora_of_other_formats_matches_their_library(adapter: str, files_key: str) -> None:
    """mlx-lm's DoRALinear.fuse and torchtune's get_merged_lora_ckpt, minus the base, in float64
    (tests/fixtures/formats/*/reference.json): our true update's spectrum agrees to 1e-9 of sigma_max."""
    import json
    from pathlib import Path

    from nora_spectra.analysis import analyze

    root = Path(__file__).resolve().parents[1] / "fixtures" / "formats"
    fmt, _, rest = adapter.partition("/")
    reference = json.loads((root / fmt / "reference.json").read_text())["files"][files_key]["modules"]
    base = root / fmt / "dora" / "base.safetensors"
    result = analyze(root / adapter, base=base, emit_warnings=False)
    assert result.warnings[0].startswith("DoRA layers: spectra are of the true update")
    assert {rec["module"] for rec in result.records} == set(reference)
    for rec in result.records:
        want = np.asarray(reference[rec["module"]]["dora_true_sigma"])
        got = np.asarray(rec["singular_values"])
        assert rec["status"] == "ok" and len(got) == len(want)
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-9 * want[0])
