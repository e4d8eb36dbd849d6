"""``spectra analyze --base``: full fine-tunes and base-aware adapters from the command line; bad input exits 2."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import numpy as np
import pytest

from nora_spectra.cli.main import main
from tests.nora_spectra.io_builders import lora_tensors, peft_dir, write_raw
from tests.nora_spectra.model_builders import write_model, write_sharded

Q = "model.layers.0.q_proj"
V = "model.layers.0.v_proj"


def run(argv: list[str], capsys) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    captured = capsys.readouterr()
    return exit_info.value.code, captured.out, captured.err


@pytest.fixture
def files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Path]:
    monkeypatch.setenv("NORA_SPECTRA_CACHE", str(tmp_path / "cache"))
    rng = np.random.default_rng(0)
    base = {f"{Q}.weight": rng.standard_normal((12, 10)).astype(np.float32),
            f"{V}.weight": rng.standard_normal((12, 10)).astype(np.float32)}
    tuned = {name: value + np.float32(0.01) * rng.standard_normal(value.shape).astype(np.float32) for name, value in base.items()}
    adapter = peft_dir(tmp_path / "lora", lora_tensors({Q: (12, 10, 2), V: (12, 10, 2)}), r=2, lora_alpha=4)
    return {
        "base": write_sharded(tmp_path / "base", base, [[f"{Q}.weight"], [f"{V}.weight"]]),
        "tuned": write_model(tmp_path / "tuned.safetensors", tuned),
        "adapter": adapter,
        "tmp": tmp_path,
    }


def test_full_fine_tune_json_table_and_csv(files, capsys) -> None:
    code, out, err = run(["analyze", str(files["tuned"]), "--base", str(files["base"]), "--intruders",
                          "--format", "json"], capsys)
    assert code == 0 and err == ""
    data = json.loads(out)
    assert (data["format"], data["base"], data["top_k"], data["intruder_k"], data["intruder_eps"]) == (
        "full", str(files["base"]), None, 10, 0.5)
    assert [rec["module"] for rec in data["layers"]] == [Q, V]
    assert all(rec["intruders"] == 0 and rec["relative_frobenius_norm"] < 0.05 for rec in data["layers"])
    code, out, _ = run(["analyze", str(files["tuned"]), "--base", str(files["base"]), "--top-k", "3"], capsys)
    assert code == 0 and "captured" in out and "rel_2" in out and "intruders" not in out
    code, out, _ = run(["analyze", str(files["tuned"]), "--base", str(files["base"]), "--format", "csv"], capsys)
    rows = list(csv.DictReader(io.StringIO(out)))
    assert rows[0]["base_tensor"] == f"{Q}.weight" and float(rows[0]["captured_energy"]) == 1.0


def test_adapters_keep_their_json_without_a_base(files, capsys) -> None:
    code, out, _ = run(["analyze", str(files["adapter"]), "--format", "json"], capsys)
    data = json.loads(out)
    assert code == 0 and "base" not in data and "top_k" not in data["layers"][0]
    code, out, _ = run(["analyze", str(files["adapter"]), "--format", "json", "--base", str(files["base"]),
                        "--no-cache"], capsys)
    data = json.loads(out)
    assert code == 0 and data["base"] == str(files["base"]) and data["layers"][0]["relative_sigma_max"] > 0
    assert not (files["tmp"] / "cache").exists()


def _missing_shard(files: dict[str, Path]) -> tuple[list[str], str]:
    shard = files["base"] / "model-00002-of-00002.safetensors"
    shard.unlink()
    return [str(files["tuned"]), "--base", str(files["base"])], f"{shard}: missing shard"


def _corrupt_shard(files: dict[str, Path]) -> tuple[list[str], str]:
    shard = files["base"] / "model-00001-of-00002.safetensors"
    write_raw(shard, {"x": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"")
    return [str(files["adapter"]), "--base", str(files["base"])], f"{shard}: corrupt safetensors header"


def _shape_mismatch(files: dict[str, Path]) -> tuple[list[str], str]:
    other = write_model(files["tmp"] / "other.safetensors", {f"{Q}.weight": np.ones((10, 11), np.float32),
                                                             f"{V}.weight": np.ones((12, 10), np.float32)})
    return [str(files["tuned"]), "--base", str(other)], (
        f"{files['tuned']}: tensor '{Q}.weight' has shape [12, 10] but the base's '{Q}.weight' in {other} has shape [10, 11]"
    )


def _adapter_shape_mismatch(files: dict[str, Path]) -> tuple[list[str], str]:
    other = write_model(files["tmp"] / "other.safetensors", {f"{Q}.weight": np.ones((10, 11), np.float32),
                                                             f"{V}.weight": np.ones((12, 10), np.float32)})
    return [str(files["adapter"]), "--base", str(other)], (
        f"{files['adapter'] / 'adapter_model.safetensors'}: module '{Q}': the update is [12, 10] but the base tensor "
        f"'{Q}.weight' in {other} has shape [10, 11]"
    )


def _module_missing(files: dict[str, Path]) -> tuple[list[str], str]:
    other = write_model(files["tmp"] / "other.safetensors", {f"{Q}.weight": np.ones((12, 10), np.float32)})
    return [str(files["adapter"]), "--base", str(other)], f"{other}: no weight for module '{V}'"


CASES = [
    ("missing_base", lambda f: ([str(f["tuned"]), "--base", str(f["tmp"] / "nope")], f"{f['tmp'] / 'nope'}: no such file or directory")),
    ("missing_shard", _missing_shard),
    ("corrupt_shard", _corrupt_shard),
    ("shape_mismatch", _shape_mismatch),
    ("adapter_shape_mismatch", _adapter_shape_mismatch),
    ("module_missing", _module_missing),
    ("intruders_without_base", lambda f: ([str(f["adapter"]), "--intruders"], "--intruders needs the base model")),
    ("intruder_k_without_intruders", lambda f: ([str(f["adapter"]), "--base", str(f["base"]), "--intruder-k", "3"],
                                                "--intruder-k applies only with --intruders")),
    ("bad_top_k", lambda f: ([str(f["tuned"]), "--base", str(f["base"]), "--top-k", "many"], "is not a positive integer or 'all'")),
    ("full_without_base", lambda f: ([str(f["tuned"]), "--format-in", "full"], "pass --base BASE")),
]


@pytest.mark.parametrize("build", [c[1] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_and_exit_2(files, capsys, build) -> None:
    argv, expected = build(files)
    code, out, err = run(["analyze", *argv], capsys)
    assert code == 2 and out == ""
    assert expected in err and err.count("\n") == 1 and "Traceback" not in err
