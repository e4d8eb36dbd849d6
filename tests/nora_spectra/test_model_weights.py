"""Safetensors models (base or fully fine-tuned): layouts, module-name resolution, digests and bad input."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from nora_spectra.errors import CheckpointError
from nora_spectra.io.model_weights import is_model_layout, open_model_weights
from tests.nora_spectra.io_builders import write_raw
from tests.nora_spectra.model_builders import write_model, write_sharded

RNG = np.random.default_rng(7)
TENSORS = {
    "model.layers.0.self_attn.q_proj.weight": RNG.standard_normal((6, 4)).astype(np.float32),
    "model.layers.0.self_attn.v_proj.weight": RNG.standard_normal((6, 4)).astype(np.float16),
    "model.layers.1.self_attn.q_proj.weight": RNG.standard_normal((6, 4)).astype(np.float32),
    "model.norm.weight": np.ones(4, np.float32),
}
SHARDS = [["model.layers.0.self_attn.q_proj.weight", "model.norm.weight"],
          ["model.layers.0.self_attn.v_proj.weight", "model.layers.1.self_attn.q_proj.weight"]]


def test_single_file_directory_and_shards_read_the_same_tensors(tmp_path: Path) -> None:
    single = open_model_weights(write_model(tmp_path / "one.safetensors", TENSORS))
    directory = open_model_weights(write_model(tmp_path / "dir", TENSORS))
    sharded = open_model_weights(write_sharded(tmp_path / "sharded", TENSORS, SHARDS))
    index = open_model_weights(tmp_path / "sharded" / "model.safetensors.index.json")
    assert sharded.index_path == index.index_path and len(sharded.files) == 2 and single.index_path is None
    for weights in (single, directory, sharded, index):
        assert sorted(weights.keys()) == sorted(TENSORS)
        for name, value in TENSORS.items():
            np.testing.assert_array_equal(weights.read(name), value.astype(np.float64))
    assert sharded.file_of("model.norm.weight").endswith("model-00001-of-00002.safetensors")
    assert is_model_layout(str(tmp_path / "sharded")) and is_model_layout(str(tmp_path / "one.safetensors"))
    assert not is_model_layout(str(tmp_path))


def test_digest_is_a_content_hash(tmp_path: Path) -> None:
    a = open_model_weights(write_model(tmp_path / "a.safetensors", TENSORS))
    b = open_model_weights(write_sharded(tmp_path / "b", TENSORS, SHARDS))  # same tensors, other files
    name = "model.layers.0.self_attn.q_proj.weight"
    assert a.digest(name) == b.digest(name)
    assert a.digest(name) != a.digest("model.layers.1.self_attn.q_proj.weight")
    changed = dict(TENSORS, **{name: TENSORS[name] + np.float32(1e-3)})
    assert open_model_weights(write_model(tmp_path / "c.safetensors", changed)).digest(name) != a.digest(name)
    as_f64 = {name: TENSORS[name].astype(np.float64)}  # same values, another dtype: another digest
    assert open_model_weights(write_model(tmp_path / "d.safetensors", as_f64)).digest(name) != a.digest(name)


def test_resolve_module_names(tmp_path: Path) -> None:
    weights = open_model_weights(write_model(tmp_path / "m.safetensors", TENSORS))
    assert weights.resolve("model.layers.0.self_attn.q_proj") == "model.layers.0.self_attn.q_proj.weight"
    assert weights.resolve("layers.0.self_attn.v_proj") == "model.layers.0.self_attn.v_proj.weight"  # base prefix
    assert weights.resolve("unet.model.layers.1.self_attn.q_proj") == "model.layers.1.self_attn.q_proj.weight"
    assert weights.resolve("model.norm.weight") == "model.norm.weight"  # a tensor name itself
    assert weights.resolve("q_proj") is None  # ambiguous: two layers end with it
    assert weights.resolve("model.layers.0.mlp.up_proj") is None


def _missing_shard(tmp: Path) -> tuple[Path, str]:
    write_sharded(tmp / "m", TENSORS, SHARDS)
    (tmp / "m" / "model-00002-of-00002.safetensors").unlink()
    return tmp / "m", f"{tmp / 'm' / 'model-00002-of-00002.safetensors'}: missing shard"


def _corrupt_shard(tmp: Path) -> tuple[Path, str]:
    write_sharded(tmp / "m", TENSORS, SHARDS)
    write_raw(tmp / "m" / "model-00001-of-00002.safetensors", {"x": 1}, header_len=99999)
    return tmp / "m", f"{tmp / 'm' / 'model-00001-of-00002.safetensors'}: truncated or corrupt safetensors file"


def _index(text: str):
    def build(tmp: Path) -> tuple[Path, str]:
        write_sharded(tmp / "m", TENSORS, SHARDS)
        (tmp / "m" / "model.safetensors.index.json").write_text(text)
        return tmp / "m", f"{tmp / 'm' / 'model.safetensors.index.json'}: "

    return build


def _inconsistent(tmp: Path) -> tuple[Path, str]:
    write_sharded(tmp / "m", TENSORS, SHARDS)
    index = json.loads((tmp / "m" / "model.safetensors.index.json").read_text())
    index["weight_map"]["model.norm.weight"] = "model-00002-of-00002.safetensors"
    (tmp / "m" / "model.safetensors.index.json").write_text(json.dumps(index))
    return tmp / "m", "inconsistent shard: the index places tensor 'model.norm.weight' here but it is absent"


def _no_model(tmp: Path) -> tuple[Path, str]:
    (tmp / "m").mkdir()
    (tmp / "m" / "config.json").write_text("{}")
    return tmp / "m", "no safetensors model: expected model.safetensors.index.json or model.safetensors (found config.json)"


def _two_files(tmp: Path) -> tuple[Path, str]:
    write_model(tmp / "m" / "a.safetensors", TENSORS)
    write_model(tmp / "m" / "b.safetensors", TENSORS)
    return tmp / "m", "several .safetensors files"


def _pickle(tmp: Path) -> tuple[Path, str]:
    (tmp / "pytorch_model.bin").write_bytes(b"\x80\x04K\x01.")
    return tmp / "pytorch_model.bin", "a torch pickle is not supported as a model"


@pytest.mark.parametrize(
    "build",
    [
        _missing_shard,
        _corrupt_shard,
        _index("{not json"),
        _index("[]"),
        _index('{"weight_map": {}}'),
        _index('{"weight_map": {"model.norm.weight": "../elsewhere.safetensors"}}'),
        _index('{"weight_map": {"model.norm.weight": 3}}'),
        _inconsistent,
        _no_model,
        _two_files,
        _pickle,
        lambda tmp: (tmp / "absent", f"{tmp / 'absent'}: no such file or directory"),
    ],
)
def test_bad_models_are_one_line_errors_naming_the_file(tmp_path: Path, build) -> None:
    path, expected = build(tmp_path)
    with pytest.raises(CheckpointError) as info:
        open_model_weights(path)
    message = str(info.value)
    assert expected in message and "\n" not in message
    assert message.startswith(str(tmp_path))


def test_index_names_only_files_inside_the_model_directory(tmp_path: Path) -> None:
    path, _ = _index('{"weight_map": {"model.norm.weight": "../elsewhere.safetensors"}}')(tmp_path)
    with pytest.raises(CheckpointError, match="not a file name in the model directory"):
        open_model_weights(path)


def test_chunked_reads_are_exact_across_chunk_boundaries(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import nora_spectra.io.model_weights as model_weights
    from nora_spectra.io.safetensors_file import SafetensorsFile
    from tests.nora_spectra.golden_fixtures import write_safetensors

    monkeypatch.setattr(model_weights, "_CHUNK_ELEMENTS", 7)  # 7 does not divide 6 x 5 = 30
    values = RNG.standard_normal((6, 5))
    path = write_safetensors(tmp_path / "m.safetensors", {"bf": ("BF16", values), "f16": ("F16", values),
                                                         "f32": ("F32", values), "f64": ("F64", values)})
    weights, whole = open_model_weights(path), SafetensorsFile(path)
    for name in ("bf", "f16", "f32", "f64"):
        np.testing.assert_array_equal(weights.read(name), whole.read(name))
        read, digest = weights.read_with_digest(name)
        np.testing.assert_array_equal(read, whole.read(name))
        assert digest == weights.digest(name)
        out = np.ones((6, 5))
        np.testing.assert_array_equal(weights.subtract_from(name, out), 1.0 - whole.read(name))


def test_opening_reads_no_tensor(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from nora_spectra.io import load_checkpoint
    from nora_spectra.io.model_weights import ModelWeights
    from nora_spectra.io.safetensors_file import SafetensorsFile

    base = write_sharded(tmp_path / "base", TENSORS, SHARDS)
    tuned = write_model(tmp_path / "tuned.safetensors", {k: v + 1 for k, v in TENSORS.items()})

    def refuse(self, name, *args, **kwargs):  # pragma: no cover - failing is the point
        raise AssertionError(f"read tensor {name} while opening")

    for cls, method in ((SafetensorsFile, "read"), (ModelWeights, "_chunks")):
        monkeypatch.setattr(cls, method, refuse)
    checkpoint = load_checkpoint(tuned, base=base)
    assert checkpoint.format == "full" and len(checkpoint) == 3


def test_base_aware_analysis_needs_no_torch(tmp_path: Path) -> None:
    from tests.nora_spectra.test_layering import _BLOCK_TORCH, _python

    base = write_sharded(tmp_path / "base", TENSORS, SHARDS)
    tuned = write_model(tmp_path / "tuned.safetensors", {k: v + 1 for k, v in TENSORS.items()})
    code = _BLOCK_TORCH + (
        "import sys\n"
        "from nora_spectra.analysis import analyze\n"
        f"a = analyze({str(tuned)!r}, base={str(base)!r}, intruders=True, cache={str(tmp_path / 'c')!r}, emit_warnings=False)\n"
        "print(a.format, len(a.records), 'torch' in sys.modules)\n"
    )
    out = _python(code)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["full", "3", "False"]
