"""``spectra suggest`` and ``nora_spectra.suggest``: ranks from known spectra, the LoraConfig fragment as
PEFT reads it, and the ``spectra check`` thresholds as ``spectra check`` reads them."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from nora_spectra.errors import UsageError
from nora_spectra.suggest import suggest
from tests.nora_spectra.io_builders import PREFIX, peft_dir
from tests.nora_spectra.test_resize import spectra

D_OUT, D_IN, R = 40, 24, 8
SPECTRA = {
    "model.layers.0.self_attn.q_proj": [8, 4, 2, 1, 0.5, 0.25, 0.1, 0.05],  # k@0.9 = 2 (shares 0.75, 0.94)
    "model.layers.1.self_attn.q_proj": [1.0] * 8,  # flat: k@0.9 = 8 = ceil(0.9 * 8): saturated
    "model.layers.0.self_attn.v_proj": [5, 4, 3, 1e-3, 1e-3, 1e-3, 1e-3, 1e-3],  # k@0.9 = 3
    "model.layers.1.self_attn.v_proj": [0.0] * 8,  # an all-zero update
}


@pytest.fixture()
def adapter(tmp_path):
    rng = np.random.default_rng(0)
    tensors = {}
    for module, sigma in SPECTRA.items():
        u = np.linalg.qr(rng.standard_normal((D_OUT, R)))[0]
        v = np.linalg.qr(rng.standard_normal((D_IN, R)))[0]
        tensors[f"{PREFIX}{module}.lora_B.weight"] = u * np.asarray(sigma, dtype=float)
        tensors[f"{PREFIX}{module}.lora_A.weight"] = v.T.copy()
    return peft_dir(tmp_path / "adapter", tensors, r=R, lora_alpha=16, target_modules=["q_proj", "v_proj"])


def _erank(sigma):
    p = np.asarray(sigma, float) / np.sum(sigma)
    return math.exp(-sum(x * math.log(x) for x in p if x > 0))


def test_ranks_saturation_and_collapse_from_known_spectra(adapter):
    result = suggest(adapter, coverage=0.6)
    rows = {row["module"]: row for row in result.modules}
    q0, q1, v0, v1 = (rows[m] for m in SPECTRA)
    assert (q0["energy_rank"], q1["energy_rank"], v0["energy_rank"], v1["energy_rank"]) == (2, 8, 3, None)
    assert (q0["saturated"], q1["saturated"], v0["saturated"]) == (False, True, False)
    assert (q0["suggested_rank"], q1["suggested_rank"], v0["suggested_rank"], v1["suggested_rank"]) == (2, 16, 4, None)
    assert v1["collapsed"] and v1["status"] == "zero" and result.collapsed == ["model.layers.1.self_attn.v_proj"]
    assert result.saturated == ["model.layers.1.self_attn.q_proj"]
    assert q0["predicted_utilization"] == pytest.approx(_erank(SPECTRA[list(SPECTRA)[0]][:2]) / 2, rel=1e-12)
    assert q1["predicted_utilization"] == pytest.approx(1.0)  # saturated: its current utilization
    energy = np.cumsum(np.square(SPECTRA[list(SPECTRA)[0]])) / np.sum(np.square(SPECTRA[list(SPECTRA)[0]]))
    np.testing.assert_allclose(q0["energy_curve"], energy, rtol=1e-14)
    assert result.uniform_r == 4  # sorted suggestions 2, 4, 16: 60 % coverage needs the second
    assert suggest(adapter).uniform_r == 16 and suggest(adapter, coverage=0.3).uniform_r == 2


def test_lora_config_fragment_is_what_peft_reads(adapter):
    peft = pytest.importorskip("peft")
    from peft.utils.other import get_pattern_key

    result = suggest(adapter, coverage=0.6)
    fragment = json.loads(result.lora_config_json())
    assert fragment["r"] == 4 and fragment["lora_alpha"] == 8  # scale alpha / r = 2 kept at r = 4
    assert fragment["target_modules"] == ["q_proj", "v_proj"]
    config = peft.LoraConfig(**fragment)
    for row in result.modules:
        if row["suggested_rank"] is None:
            continue
        rank = config.rank_pattern.get(get_pattern_key(config.rank_pattern.keys(), row["module"]), config.r)
        alpha = config.alpha_pattern.get(get_pattern_key(config.alpha_pattern.keys(), row["module"]), config.lora_alpha)
        assert rank == row["suggested_rank"] and alpha / rank == pytest.approx(2.0)


def test_check_thresholds_are_valid_spectra_check_toml(adapter, tmp_path):
    from nora_spectra.check_config import load_config_file

    result = suggest(adapter, coverage=0.6)
    predicted = [r["predicted_utilization"] for r in result.modules if r["predicted_utilization"] and not r["collapsed"]]
    assert result.check["min_utilization"] == math.floor(0.8 * min(predicted) / 0.05 + 1e-9) * 0.05
    assert result.check["max_collapsed_fraction"] == 0.25 and result.check["collapse_threshold"] == 0.25
    file = tmp_path / "pyproject.toml"
    file.write_text(result.check_toml())
    assert load_config_file(file) == result.check


def test_cli_table_json_and_analysis_json_input(adapter, tmp_path, capsys):
    code, out, err = spectra(capsys, "suggest", adapter, "--coverage", "0.6")
    assert code == 0, err
    assert "recommended: r = 4" in out and "[tool.spectra.check]" in out and '"rank_pattern"' in out
    assert "saturated (k@0.9 >= 90% of ceil(0.9 r)): 1: model.layers.1.self_attn.q_proj" in out
    code, out, _ = spectra(capsys, "suggest", adapter, "--format", "json", "--energy", "0.99")
    data = json.loads(out)
    assert code == 0 and data["energy"] == 0.99 and list(data)[:4] == ["checkpoint", "energy", "coverage", "uniform_r"]
    code, analysis, _ = spectra(capsys, "analyze", adapter, "--format", "json", "-q")
    (tmp_path / "a.json").write_text(analysis)
    code, out, _ = spectra(capsys, "suggest", tmp_path / "a.json", "--format", "json", "--energy", "0.99")
    assert code == 0 and json.loads(out)["modules"] == data["modules"]
    code, out, _ = spectra(capsys, "suggest", adapter, "--format", "markdown")
    assert code == 0 and "```toml" in out and "| `model.layers.0.self_attn.q_proj` |" in out


@pytest.mark.parametrize("args, message", [(["--energy", "0"], "--energy must be a share in (0, 1]"),
                                           (["--coverage", "1.5"], "--coverage must be a share in (0, 1]")])
def test_cli_errors(adapter, capsys, args, message):
    code, out, err = spectra(capsys, "suggest", adapter, *args)
    assert code == 2 and out == "" and len(err.strip().splitlines()) == 1 and message in err


def test_bare_file_without_config_suggests_no_alpha(tmp_path):
    from tests.nora_spectra.io_builders import write_numpy

    rng = np.random.default_rng(1)
    file = write_numpy(tmp_path / "x.safetensors", {"m.lora_A.weight": rng.standard_normal((4, 12)),
                                                  "m.lora_B.weight": rng.standard_normal((10, 4))})
    result = suggest(file)
    assert "lora_alpha" not in result.lora_config and "alpha_pattern" not in result.lora_config
    assert any("scale is unknown" in note for note in result.notes)
    with pytest.raises(UsageError):
        suggest(file, energy=1.5)
    assert "Suggestion(" in repr(result) and "<table" in result._repr_html_()


def test_analysis_json_input_is_read_bounded_and_must_hold_one_checkpoint(adapter, tmp_path, capsys):
    code, both, _ = spectra(capsys, "analyze", adapter, adapter, "--format", "json", "-q")
    (tmp_path / "two.json").write_text(both)
    code, _, err = spectra(capsys, "suggest", tmp_path / "two.json")
    assert code == 2 and "holds 2 analyses; suggest takes the analysis of one checkpoint" in err
    (tmp_path / "deep.json").write_text("[" * 100_000)
    code, _, err = spectra(capsys, "suggest", tmp_path / "deep.json")
    assert code == 2 and "nested deeper than" in err and len(err.strip().splitlines()) == 1
