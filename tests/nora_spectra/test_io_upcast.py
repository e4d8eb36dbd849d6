"""The block-wise read and upcast to float64: every bit pattern, across block boundaries, from threads."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

import nora_spectra.io.safetensors_file as safetensors_file
from nora_spectra.errors import CheckpointError
from nora_spectra.io.safetensors_file import SafetensorsFile
from tests.nora_spectra.golden_fixtures import write_safetensors
from tests.nora_spectra.io_builders import write_raw


def bf16_reference(codes: np.ndarray) -> np.ndarray:
    """float64 values of bfloat16 bit patterns from the definition (sign, 8-bit exponent, 7-bit mantissa)."""
    codes = codes.astype(np.int64)
    sign = np.where(codes >> 15, -1.0, 1.0)
    exponent = (codes >> 7) & 0xFF
    mantissa = (codes & 0x7F).astype(np.float64)
    normal = sign * np.ldexp(1.0 + mantissa / 128.0, exponent - 127)
    subnormal = sign * np.ldexp(mantissa / 128.0, -126)
    special = np.where(mantissa == 0, sign * np.inf, np.nan)
    return np.where(exponent == 0, subnormal, np.where(exponent == 0xFF, special, normal))


@pytest.mark.parametrize("route", ["ml_dtypes", "bit shift"])
def test_every_bf16_bit_pattern_upcasts_exactly_across_block_boundaries(tmp_path, monkeypatch, route):
    if route == "bit shift":  # the fallback without ml_dtypes
        monkeypatch.setattr(safetensors_file, "_bfloat16", lambda: None)
    else:
        assert safetensors_file._bfloat16() is not None
    monkeypatch.setattr(safetensors_file, "_BLOCK", 1000)  # 65536 values: 66 blocks, the last one short
    codes = np.arange(1 << 16, dtype=np.uint16)
    data = codes.astype("<u2").tobytes()
    header = {"w": {"dtype": "BF16", "shape": [256, 256], "data_offsets": [0, len(data)]}}
    path = write_raw(tmp_path / "all.safetensors", header, data)
    with np.errstate(invalid="raise"):  # the NaN payloads must not warn or raise
        got = SafetensorsFile(path).read("w").ravel()
    want = bf16_reference(codes)
    assert got.dtype == np.float64
    finite = np.isfinite(want)
    np.testing.assert_array_equal(got[finite], want[finite])
    assert np.array_equal(np.signbit(got[finite]), np.signbit(want[finite]))  # -0.0 stays -0.0
    assert np.array_equal(np.isnan(got), np.isnan(want))
    assert np.array_equal(got[np.isinf(want)], want[np.isinf(want)])


@pytest.mark.parametrize("tag, dtype", [("F16", np.float16), ("F32", np.float32), ("F64", np.float64)])
def test_other_float_dtypes_upcast_exactly_across_block_boundaries(tmp_path, monkeypatch, tag, dtype):
    monkeypatch.setattr(safetensors_file, "_BLOCK", 7)
    x = (np.random.default_rng(0).standard_normal((5, 11)) * 50).astype(dtype)
    path = write_safetensors(tmp_path / "x.safetensors", {"x": (tag, x), "y": (tag, x[:1, :3])})
    reader = SafetensorsFile(path)
    np.testing.assert_array_equal(reader.read("x"), x.astype(np.float64))
    np.testing.assert_array_equal(reader.read("y"), x[:1, :3].astype(np.float64))


def test_empty_tensor(tmp_path):
    path = write_raw(tmp_path / "e.safetensors", {"e": {"dtype": "BF16", "shape": [0, 4], "data_offsets": [0, 0]}})
    got = SafetensorsFile(path).read("e")
    assert got.shape == (0, 4) and got.dtype == np.float64


def test_concurrent_reads_from_threads_agree_with_one_thread(tmp_path, monkeypatch):
    monkeypatch.setattr(safetensors_file, "_BLOCK", 64)
    rng = np.random.default_rng(1)
    tensors = {f"t{i}": ("BF16", rng.standard_normal((37, 29)).astype(np.float32)) for i in range(24)}
    reader = SafetensorsFile(write_safetensors(tmp_path / "m.safetensors", tensors))
    alone = {name: reader.read(name) for name in tensors}
    with ThreadPoolExecutor(4) as pool:
        together = dict(zip(tensors, pool.map(reader.read, tensors)))
    for name in tensors:
        np.testing.assert_array_equal(together[name], alone[name])


def test_a_file_cut_after_validation_is_a_checkpoint_error(tmp_path, monkeypatch):
    monkeypatch.setattr(safetensors_file, "_BLOCK", 16)
    path = write_safetensors(tmp_path / "c.safetensors", {"w": ("BF16", np.ones((10, 10), np.float32))})
    reader = SafetensorsFile(path)
    size = path.stat().st_size
    with open(path, "r+b") as handle:
        handle.truncate(size - 50)
    with pytest.raises(CheckpointError, match="truncated|changed size"):
        reader.read("w")
