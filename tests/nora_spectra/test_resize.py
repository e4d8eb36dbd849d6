"""``spectra resize`` and ``nora_spectra.resize``: numbers against dense float64 SVDs, the file formats
written, and every kind of bad input (one line, exit 2, nothing written, the input untouched)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from nora_spectra.errors import CheckpointError, UsageError
from nora_spectra.io import load_checkpoint
from nora_spectra.resize import resize
from nora_spectra.schema import RESIZE_MODULE_FIELDS
from nora_spectra.spectrum import spectrum
from tests.nora_spectra.io_builders import PREFIX, lora_tensors, peft_dir, write_numpy

SHAPES = {
    "model.layers.0.self_attn.q_proj": (40, 24, 8),
    "model.layers.0.mlp.up_proj": (56, 24, 8),
    "model.layers.1.self_attn.q_proj": (40, 24, 8),
}


def _decaying(seed: int = 0, prefix: str = PREFIX, dtype=np.float64) -> dict[str, np.ndarray]:
    tensors = lora_tensors(SHAPES, prefix=prefix, dtype=np.float64, seed=seed)
    for key, value in tensors.items():
        if key.endswith("lora_B.weight"):
            value *= np.exp(-np.arange(value.shape[1]) / 2.0)
    return {k: v.astype(dtype) for k, v in tensors.items()}


def _tree_digest(path: Path) -> str:
    digest = hashlib.sha256()
    for file in sorted(p for p in ([path] if path.is_file() else path.rglob("*")) if p.is_file()):
        digest.update(str(file).encode() + file.read_bytes())
    return digest.hexdigest()


def _dense(tensors: dict[str, np.ndarray], module: str, scale: float, prefix: str = PREFIX) -> np.ndarray:
    a = tensors[f"{prefix}{module}.lora_A.weight"].astype(np.float64)
    b = tensors[f"{prefix}{module}.lora_B.weight"].astype(np.float64)
    return scale * (b @ a)


def spectra(capsys: pytest.CaptureFixture[str], *args: object) -> tuple[int, str, str]:
    """Run ``spectra args`` in-process as the console script does: (exit code, stdout, stderr)."""
    from nora_spectra.cli.main import main

    with pytest.raises(SystemExit) as exit_info:
        main([str(a) for a in args])
    captured = capsys.readouterr()
    return exit_info.value.code, captured.out, captured.err


@pytest.fixture()
def adapter(tmp_path: Path) -> tuple[Path, dict[str, np.ndarray]]:
    tensors = _decaying()
    return peft_dir(tmp_path / "adapter", tensors, r=8, lora_alpha=4, target_modules=["q_proj", "up_proj"]), tensors


# ----------------------------------------------------------------------------- numbers


@pytest.mark.parametrize("policy", [{"rank": 3}, {"energy": 0.95}, {"sv_ratio": 4.0}, {"threshold": "optimal"}])
def test_reported_errors_match_a_dense_svd_and_the_files(tmp_path, adapter, policy):
    directory, tensors = adapter
    result = resize(directory, tmp_path / "out", **policy)
    written = load_checkpoint(tmp_path / "out")
    assert written.format == "peft"
    new = {layer.module: layer for layer in written.iter_layers()}
    for row in result.modules:
        dense = _dense(tensors, row["module"], 0.5)
        sigma = np.linalg.svd(dense, compute_uv=False)
        k = row["rank_after"]
        if policy.get("rank"):
            assert k == 3
        if policy.get("energy"):
            shares = np.cumsum(sigma**2) / np.sum(sigma**2)
            assert k == int(np.argmax(shares >= 0.95 * (1 - 1e-12))) + 1
        if policy.get("sv_ratio"):
            assert k == int(np.sum(sigma >= sigma[0] / 4.0))
        assert row["key"] == PREFIX + row["module"]
        assert row["energy_kept"] == pytest.approx(np.sum(sigma[:k] ** 2) / np.sum(sigma**2), rel=1e-12)
        assert row["spectral_error"] == pytest.approx(sigma[k], rel=1e-10)
        layer = new[row["module"]]
        assert layer.rank == k and layer.update.scale == pytest.approx(0.5, rel=1e-15)
        got = layer.update.scale * (layer.update.B @ layer.update.A)
        err = dense - got
        assert np.linalg.norm(err, 2) == pytest.approx(row["spectral_error"], rel=1e-9)
        assert np.linalg.norm(err) / np.linalg.norm(dense) == pytest.approx(row["frobenius_error_rel"], rel=1e-9)
        assert row["bytes_after"] == 8 * k * (dense.shape[0] + dense.shape[1])
    total = sum(np.sum(np.linalg.svd(_dense(tensors, m, 0.5), compute_uv=False) ** 2) for m in SHAPES)
    tail = sum(np.sum(np.linalg.svd(_dense(tensors, r["module"], 0.5), compute_uv=False)[r["rank_after"]:] ** 2)
               for r in result.modules)
    assert result.summary["frobenius_error_rel"] == pytest.approx(np.sqrt(tail / total), rel=1e-10)
    assert result.summary["energy_kept"] == pytest.approx(1 - tail / total, rel=1e-12)
    assert result.summary["bytes_after"] == (tmp_path / "out" / "adapter_model.safetensors").stat().st_size


def test_the_vectors_values_are_the_spectrum(adapter):
    from nora_spectra.subspaces import factor_bases, factored_svd

    directory, _ = adapter
    for layer in load_checkpoint(directory).iter_layers():
        reference = spectrum(layer.update).values  # what spectra analyze reports
        svd = factored_svd(layer.update.A, layer.update.B, layer.update.scale)
        np.testing.assert_allclose(svd.values, reference, rtol=1e-13, atol=0)
        core = factor_bases(layer.update.A, layer.update.B, layer.update.scale).core  # what resize reports
        assert core.shape == (8, 8)
        np.testing.assert_allclose(spectrum(core).values, reference, rtol=1e-13, atol=0)


def test_bare_safetensors_in_bare_safetensors_out(tmp_path):
    tensors = _decaying(prefix="")
    source = write_numpy(tmp_path / "lora.safetensors", tensors)
    result = resize(source, tmp_path / "small.safetensors", energy=0.9)
    assert result.format == "safetensors"
    written = load_checkpoint(tmp_path / "small.safetensors")
    assert written.format == "safetensors" and written.config is None
    for layer in written.iter_layers():
        row = next(r for r in result.modules if r["module"] == layer.module)
        dense = _dense(tensors, layer.module, 1.0, prefix="")
        assert layer.update.scale == 1.0 and layer.rank == row["rank_after"]
        got = layer.update.B @ layer.update.A
        assert np.linalg.norm(dense - got, 2) == pytest.approx(row["spectral_error"], rel=1e-9)


def test_bfloat16_factors_stay_bfloat16(tmp_path):
    torch = pytest.importorskip("torch")
    from safetensors.torch import load_file, save_file

    from tests.nora_spectra.test_resize_units import nearest_bfloat16

    tensors = {k: torch.from_numpy(v).to(torch.bfloat16) for k, v in _decaying().items()}
    directory = tmp_path / "bf16"
    directory.mkdir()
    save_file(tensors, str(directory / "adapter_model.safetensors"), metadata={"format": "pt"})
    (directory / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 8, "lora_alpha": 8}))
    resize(directory, tmp_path / "out", rank=2)
    resize(directory, tmp_path / "out64", rank=2, dtype="float64")
    got = load_file(str(tmp_path / "out" / "adapter_model.safetensors"))
    exact = load_file(str(tmp_path / "out64" / "adapter_model.safetensors"))
    assert sorted(got) == sorted(tensors)
    for key, value in got.items():
        assert value.dtype == torch.bfloat16 and exact[key].dtype == torch.float64
        want = [nearest_bfloat16(float(x)) for x in exact[key].numpy().ravel()]
        assert value.to(torch.float64).numpy().ravel().tolist() == want


def test_nested_module_names_get_exact_patterns():
    from nora_spectra.io.adapter_config import AdapterSettings
    from nora_spectra.io.peft_resize import resized_config

    settings = AdapterSettings(kind="lora", r=8, lora_alpha=16, use_rslora=True)
    ranks = {"layers.0.q": 4, "model.layers.0.q": 8, "model.layers.1.q": 2}
    config, _ = resized_config({"r": 8, "lora_alpha": 16, "use_rslora": True}, settings, ranks)
    written = AdapterSettings(kind="lora", r=config["r"], lora_alpha=config["lora_alpha"], use_rslora=True,
                              rank_pattern=config["rank_pattern"], alpha_pattern=config["alpha_pattern"])
    for module, k in ranks.items():
        assert written.rank_for(module) == k
        assert written.scale_for(module) == pytest.approx(16 / np.sqrt(8), rel=1e-15)
    assert list(config["rank_pattern"])[:2] == [r"model\.layers\.0\.q", r"model\.layers\.1\.q"]  # deeper first


# ----------------------------------------------------------------------------- bad input


def _refused(capsys, args: list, inputs: list[Path], absent: Path | None, *, contains: str) -> str:
    before = [_tree_digest(p) for p in inputs]
    code, stdout, stderr = spectra(capsys, "resize", *args)
    lines = stderr.strip().splitlines()
    assert code == 2, stderr
    assert len(lines) == 1 and lines[0].startswith("spectra: error:") and contains in lines[0], stderr
    assert "Traceback" not in stderr and stdout == ""
    assert [_tree_digest(p) for p in inputs] == before  # the input is never modified
    if absent is not None:
        assert not absent.exists() and not list(absent.parent.glob(f".{absent.name}.*"))
    return lines[0]


def test_rank_above_the_current_one_is_refused(tmp_path, adapter, capsys):
    directory, _ = adapter
    line = _refused(capsys, [directory, "-o", tmp_path / "out", "--rank", "9"], [directory], tmp_path / "out",
                    contains="--rank 9 is above the rank of module")
    assert "r = 8" in line


@pytest.mark.parametrize("value", ["0", "-0.5", "1.01", "nan", "inf"])
def test_energy_outside_zero_one_is_refused(tmp_path, adapter, value, capsys):
    directory, _ = adapter
    _refused(capsys, [directory, "-o", tmp_path / "out", "--energy", value], [directory], tmp_path / "out",
             contains="--energy must be a share in (0, 1]")


def test_a_non_finite_module_is_named_and_nothing_is_written(tmp_path, capsys):
    tensors = _decaying()
    tensors[f"{PREFIX}model.layers.1.self_attn.q_proj.lora_B.weight"][3, 2] = np.nan
    directory = peft_dir(tmp_path / "nan", tensors, r=8, lora_alpha=8)
    _refused(capsys, [directory, "-o", tmp_path / "out", "--energy", "0.9"], [directory], tmp_path / "out",
             contains="module 'model.layers.1.self_attn.q_proj' has NaN or Inf factors")
    bare = write_numpy(tmp_path / "nan.safetensors", _decaying(prefix=""))
    raw = _decaying(prefix="")
    raw["model.layers.0.mlp.up_proj.lora_A.weight"][0, 0] = np.inf
    write_numpy(bare, raw)
    _refused(capsys, [bare, "-o", tmp_path / "out.safetensors", "--rank", "2"], [bare], tmp_path / "out.safetensors",
             contains="'model.layers.0.mlp.up_proj' has NaN or Inf")


def test_output_equal_to_the_input_is_refused(tmp_path, adapter, capsys):
    directory, _ = adapter
    _refused(capsys, [directory, "-o", directory, "--rank", "2"], [directory], None, contains="the output is the input")
    _refused(capsys, [directory, "-o", directory, "--rank", "2", "--overwrite"], [directory], None,
             contains="the output is the input")
    _refused(capsys, [directory / "adapter_model.safetensors", "-o", directory, "--rank", "2"], [directory], None,
             contains="the output is the input")
    _refused(capsys, [directory, "-o", directory / "inner", "--rank", "2"], [directory], None, contains="inside the input")
    _refused(capsys, [directory, "-o", tmp_path, "--rank", "2", "--overwrite"], [directory], None,
             contains="holding the input")
    bare = write_numpy(tmp_path / "bare.safetensors", _decaying(prefix=""))
    _refused(capsys, [bare, "-o", bare, "--rank", "2", "--overwrite"], [bare], None, contains="the output is the input")


def test_existing_output_needs_overwrite_and_is_replaced_whole(tmp_path, adapter, capsys):
    directory, _ = adapter
    target = tmp_path / "out"
    target.mkdir()
    (target / "stale.txt").write_text("old")
    _refused(capsys, [directory, "-o", target, "--rank", "2"], [directory, target], None, contains="already exists")
    code, _, stderr = spectra(capsys, "resize", directory, "-o", target, "--rank", "2", "--overwrite", "-q")
    assert code == 0, stderr
    assert sorted(p.name for p in target.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    assert not list(tmp_path.glob(".out.*"))


def test_nora_and_dora_are_refused_with_the_reason(tmp_path, capsys):
    nora = peft_dir(tmp_path / "nora", _decaying(), peft_type="NORA", r=8, lora_alpha=8)
    _refused(capsys, [nora, "-o", tmp_path / "out", "--rank", "2"], [nora], tmp_path / "out",
             contains="a NoRA adapter cannot be resized")
    tensors = _decaying()
    tensors[f"{PREFIX}model.layers.0.self_attn.q_proj.lora_magnitude_vector"] = np.ones(40)
    dora = peft_dir(tmp_path / "dora", tensors, r=8, lora_alpha=8, use_dora=True)
    _refused(capsys, [dora, "-o", tmp_path / "out", "--rank", "2"], [dora], tmp_path / "out", contains="is a DoRA layer")


def test_policy_options_are_checked(tmp_path, adapter, capsys):
    directory, _ = adapter
    _refused(capsys, [directory, "-o", tmp_path / "out"], [directory], tmp_path / "out", contains="choose exactly one policy")
    _refused(capsys, [directory, "-o", tmp_path / "out", "--rank", "2", "--energy", "0.5"], [directory], tmp_path / "out",
             contains="choose exactly one policy")
    _refused(capsys, [directory, "-o", tmp_path / "out", "--sv-ratio", "0.5"], [directory], tmp_path / "out",
             contains="--sv-ratio must be a number >= 1")
    _refused(capsys, [directory, "-o", tmp_path / "out", "--rank", "0"], [directory], tmp_path / "out",
             contains="--rank must be an integer >= 1")
    _refused(capsys, [directory, "--rank", "2"], [directory], None, contains="needs an output path")
    _refused(capsys, [directory, "-o", tmp_path / "x.safetensors", "--rank", "2"], [directory], tmp_path / "x.safetensors",
             contains="written as a directory")


def test_json_report_has_exactly_the_documented_fields(tmp_path, adapter, capsys):
    directory, _ = adapter
    code, stdout, stderr = spectra(capsys, "resize", directory, "-o", tmp_path / "out", "--energy", "0.9", "--format",
                                   "json", "-q")
    assert code == 0, stderr
    data = json.loads(stdout)
    assert list(data) == ["input", "output", "policy", "modules", "summary"]
    assert data["policy"] == {"name": "energy", "value": 0.9}
    assert data["input"] == str(directory) and data["output"] == str(tmp_path / "out")
    for row in data["modules"]:
        assert tuple(row) == RESIZE_MODULE_FIELDS
    assert data["summary"]["rank_after"] == sum(row["rank_after"] for row in data["modules"])
    code, stdout, _ = spectra(capsys, "resize", directory, "--energy", "0.9", "--dry-run", "--format", "json")
    assert code == 0 and json.loads(stdout)["output"] is None
    assert json.loads(stdout)["modules"] == data["modules"]


def test_library_errors_are_typed(tmp_path, adapter, capsys):
    directory, _ = adapter
    with pytest.raises(UsageError, match="above the rank"):
        resize(directory, tmp_path / "out", rank=99)
    with pytest.raises(CheckpointError, match="no such file"):
        resize(tmp_path / "missing", tmp_path / "out", rank=1)
    with pytest.raises(UsageError, match="--dtype"):
        resize(directory, tmp_path / "out", rank=1, dtype="int8")
    assert not (tmp_path / "out").exists()


def test_an_untrained_module_keeps_rank_one_and_stays_zero(tmp_path):
    tensors = _decaying()
    tensors[f"{PREFIX}model.layers.1.self_attn.q_proj.lora_B.weight"][:] = 0.0  # B is zero at initialisation
    directory = peft_dir(tmp_path / "fresh", tensors, r=8, lora_alpha=8)
    result = resize(directory, tmp_path / "out", energy=0.9)
    row = next(r for r in result.modules if r["module"] == "model.layers.1.self_attn.q_proj")
    assert (row["rank_after"], row["energy_kept"], row["spectral_error"], row["frobenius_error_rel"]) == (1, 1.0, 0.0, 0.0)
    layer = load_checkpoint(tmp_path / "out").layer("model.layers.1.self_attn.q_proj")
    assert layer.rank == 1 and not np.any(layer.update.B @ layer.update.A)
