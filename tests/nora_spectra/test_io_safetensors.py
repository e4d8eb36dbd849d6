"""The torch-free safetensors reader: exact upcasts, lazy reads and strict header validation."""

from __future__ import annotations

import sys

import numpy as np
import pytest

from nora_spectra.errors import CheckpointError
from nora_spectra.io.safetensors_file import SafetensorsFile
from tests.nora_spectra.io_builders import write_numpy, write_raw

torch = pytest.importorskip("torch")


def _save_torch(path, tensors):
    from safetensors.torch import save_file

    save_file(tensors, str(path))
    return path


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_numpy_dtypes_upcast_exactly(tmp_path, dtype):
    x = (np.random.standard_normal((5, 7)) * 100).astype(dtype)
    f = SafetensorsFile(write_numpy(tmp_path / "t.safetensors", {"x": x}))
    got = f.read("x")
    assert got.dtype == np.float64 and got.shape == (5, 7)
    np.testing.assert_array_equal(got, x.astype(np.float64))


@pytest.mark.parametrize(
    ("torch_dtype", "name"),
    [("bfloat16", "bfloat16"), ("float16", "float16"), ("float8_e4m3fn", "float8_e4m3fn"), ("float8_e5m2", "float8_e5m2")],
)
def test_torch_low_precision_upcast_exactly(tmp_path, torch_dtype, name):
    pytest.importorskip("ml_dtypes")
    t = (torch.randn(6, 3, dtype=torch.float64) * 10).to(getattr(torch, torch_dtype))
    # extreme values representable in the format: largest and smallest magnitudes, signed zero
    if torch_dtype in ("bfloat16", "float16"):
        t[0, 0] = torch.finfo(t.dtype).max
        t[0, 1] = torch.finfo(t.dtype).tiny
        t[0, 2] = -0.0
    f = SafetensorsFile(_save_torch(tmp_path / "t.safetensors", {"w": t}))
    assert f.info("w").dtype_name == name
    got = f.read("w")
    expected = t.to(torch.float64).numpy()
    np.testing.assert_array_equal(got, expected)
    assert np.signbit(got).tolist() == np.signbit(expected).tolist()


def test_bf16_nan_and_inf_are_kept(tmp_path):
    t = torch.tensor([float("nan"), float("inf"), -float("inf"), 1.5], dtype=torch.bfloat16)
    got = SafetensorsFile(_save_torch(tmp_path / "t.safetensors", {"w": t})).read("w")
    assert np.isnan(got[0]) and got[1] == np.inf and got[2] == -np.inf and got[3] == 1.5


def test_f8_without_ml_dtypes_is_a_clear_error(tmp_path, monkeypatch):
    t = torch.ones(2, 2).to(torch.float8_e4m3fn)
    f = SafetensorsFile(_save_torch(tmp_path / "f8.safetensors", {"w": t}))
    monkeypatch.setitem(sys.modules, "ml_dtypes", None)
    with pytest.raises(CheckpointError, match=r"f8\.safetensors: .*F8_E4M3.*ml_dtypes"):
        f.read("w")


def test_metadata_and_keys(tmp_path):
    from safetensors.numpy import save_file

    save_file({"b": np.zeros(2, np.float32), "a": np.ones((1, 3))}, str(tmp_path / "m.safetensors"), metadata={"format": "pt"})
    f = SafetensorsFile(tmp_path / "m.safetensors")
    assert f.metadata == {"format": "pt"}
    assert sorted(f.keys()) == ["a", "b"] and len(f) == 2 and "a" in f
    assert f.info("a").shape == (1, 3) and f.info("a").dtype == "F64"


def test_non_float_tensor_read_is_an_error(tmp_path):
    f = SafetensorsFile(write_numpy(tmp_path / "i.safetensors", {"i": np.arange(4, dtype=np.int32)}))
    with pytest.raises(CheckpointError, match="non-float dtype I32"):
        f.read("i")


def test_zero_size_tensor(tmp_path):
    f = SafetensorsFile(write_numpy(tmp_path / "z.safetensors", {"z": np.zeros((0, 4), np.float32), "x": np.ones(2, np.float32)}))
    assert f.read("z").shape == (0, 4)
    np.testing.assert_array_equal(f.read("x"), [1.0, 1.0])


def _t(dtype="F32", shape=(2,), offsets=(0, 8)):
    return {"dtype": dtype, "shape": list(shape), "data_offsets": list(offsets)}


# (case id, file bytes builder arguments, expected problem fragment)
CORRUPT = [
    ("too_short", dict(raw=b"\x01\x02"), "no header"),
    ("header_beyond_file", dict(header={"x": _t()}, data=b"\0" * 8, header_len=10_000), "beyond the file"),
    ("header_over_100mb", dict(header={"x": _t()}, data=b"\0" * 8, header_len=200_000_000), "100 MB"),
    ("header_not_json", dict(header=b"{not json", data=b""), "not valid JSON"),
    ("header_not_utf8", dict(header=b"\xff\xfe{}", data=b""), "not UTF-8 JSON (byte 0xff at offset 0"),
    ("header_not_object", dict(header=[1, 2], data=b""), "expected a JSON object"),
    ("entry_not_object", dict(header={"x": 3}, data=b""), "'x' is not a JSON object"),
    ("unknown_dtype", dict(header={"x": _t(dtype="F12")}, data=b"\0" * 8), "unknown dtype 'F12'"),
    ("missing_dtype", dict(header={"x": {"shape": [2], "data_offsets": [0, 8]}}, data=b"\0" * 8), "no dtype"),
    ("bad_shape", dict(header={"x": _t(shape=(-2,))}, data=b"\0" * 8), "invalid shape"),
    ("bad_offsets", dict(header={"x": _t(offsets=(8, 0))}, data=b"\0" * 8), "invalid data_offsets"),
    ("offsets_out_of_range", dict(header={"x": _t(offsets=(0, 8))}, data=b"\0" * 4), "out of range"),
    ("offsets_not_matching_shape", dict(header={"x": _t(shape=(3,), offsets=(0, 8))}, data=b"\0" * 8), "not matching shape"),
    (
        "overlapping",
        dict(header={"x": _t(offsets=(0, 8)), "y": _t(offsets=(4, 12))}, data=b"\0" * 12),
        "overlap",
    ),
    ("gap", dict(header={"x": _t(offsets=(4, 12))}, data=b"\0" * 12), "gap in the data region"),
    ("trailing_bytes", dict(header={"x": _t()}, data=b"\0" * 12), "data region holds 12"),
    (
        "duplicate_key",
        dict(header=b'{"x":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"x":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}', data=b"\0" * 8),
        "'x' appears twice",
    ),
    ("bad_metadata", dict(header={"__metadata__": {"a": 1}, "x": _t()}, data=b"\0" * 8), "__metadata__"),
]


@pytest.mark.parametrize(("case", "spec", "problem"), CORRUPT, ids=[c[0] for c in CORRUPT])
def test_corrupt_files_raise_checkpoint_error(tmp_path, case, spec, problem):
    path = tmp_path / f"{case}.safetensors"
    if "raw" in spec:
        path.write_bytes(spec["raw"])
    else:
        write_raw(path, spec["header"], spec["data"], spec.get("header_len"))
    with pytest.raises(CheckpointError) as info:
        SafetensorsFile(path)
    message = str(info.value)
    assert message.startswith(str(path) + ": ")
    assert problem in message
    assert "\n" not in message


def test_missing_file(tmp_path):
    with pytest.raises(CheckpointError, match="cannot read file"):
        SafetensorsFile(tmp_path / "nope.safetensors")


def test_file_truncated_after_validation(tmp_path):
    path = write_numpy(tmp_path / "t.safetensors", {"x": np.ones(100, np.float32)})
    f = SafetensorsFile(path)
    with open(path, "r+b") as handle:
        handle.truncate(path.stat().st_size - 40)
    with pytest.raises(CheckpointError, match="truncated while reading tensor 'x'"):
        f.read("x")


def test_padded_header_is_accepted(tmp_path):
    # The official writer pads the header with spaces to an 8-byte boundary; trailing spaces are valid JSON.
    header = b'{"x":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}' + b" " * 5
    path = write_raw(tmp_path / "p.safetensors", header, np.array([1.0, 2.0], np.float32).tobytes())
    np.testing.assert_array_equal(SafetensorsFile(path).read("x"), [1.0, 2.0])
