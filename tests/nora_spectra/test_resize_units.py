"""The pieces of resize and overlap: factored singular vectors, rank policies, truncation errors,
Gavish-Donoho's omega, tensor encoding and the safetensors writer, each against an independent reference."""

from __future__ import annotations

import io
import math
from fractions import Fraction

import numpy as np
import pytest

from nora_spectra.io.safetensors_file import SafetensorsFile
from nora_spectra.io.writing import OutTensor, encode, write_safetensors
from nora_spectra.rank_policy import MIN_RANK, gavish_donoho_omega, make_policy, optimal_threshold, truncation
from nora_spectra.spectrum import spectrum
from nora_spectra.subspaces import CHOLESKY_RCOND_LIMIT, NonFiniteUpdateError, factored_svd
from nora_spectra.updates import LowRankUpdate
from nora_spectra.errors import UsageError


def nearest_bfloat16(x: float) -> float:
    """The bfloat16 value nearest to ``x``, ties to an even mantissa, by exact rational arithmetic.

    Independent of the code under test: the candidates are the bfloat16 neighbours of ``float32(x)``.
    """
    if x == 0:
        return x
    bits = int(np.array([x], dtype=np.float32).view(np.uint32)[0]) >> 16
    best = None
    for b in (bits - 1, bits, bits + 1):
        if b < 0 or (b & 0x7F80) == 0x7F80 and (b & 0x7F) != 0:
            continue
        value = float(np.array([b << 16], dtype=np.uint32).view(np.float32)[0])
        if math.isinf(value):
            distance = Fraction(2**128) - abs(Fraction(x))  # inf is what lies past the largest finite value
            distance = abs(distance)
        else:
            distance = abs(Fraction(value) - Fraction(x))
        key = (distance, b & 1)
        if best is None or key < best[0]:
            best = (key, value)
    return best[1]


# ----------------------------------------------------------------------------- subspaces


@pytest.mark.parametrize("shape", [(8, 50, 40), (8, 5, 40), (8, 50, 3), (16, 64, 64), (1, 9, 7)])
@pytest.mark.parametrize("scale", [1.0, -0.75, 3e-5])
def test_factored_svd_matches_a_dense_svd(shape, scale):
    r, d_out, d_in = shape
    rng = np.random.default_rng(r * d_out + d_in)
    A, B = rng.standard_normal((r, d_in)), rng.standard_normal((d_out, r))
    dense = scale * B @ A
    svd = factored_svd(A, B, scale)
    u, sigma, vt = np.linalg.svd(dense, full_matrices=False)
    k = min(shape)
    assert svd.k == k
    np.testing.assert_allclose(svd.values, sigma[:k], rtol=1e-12, atol=1e-14 * sigma[0])
    np.testing.assert_allclose(svd.left @ np.diag(svd.values) @ svd.right, dense, rtol=0, atol=1e-13 * sigma[0])
    np.testing.assert_allclose(svd.left.T @ svd.left, np.eye(k), atol=1e-13)
    np.testing.assert_allclose(svd.right @ svd.right.T, np.eye(k), atol=1e-13)
    # the same vectors as the dense SVD, up to sign (the values are distinct)
    signs = np.sign(np.sum(svd.left * u[:, :k], axis=0))
    np.testing.assert_allclose(svd.left * signs, u[:, :k], atol=1e-10)
    np.testing.assert_allclose(svd.right * signs[:, None], vt[:k], atol=1e-10)


@pytest.mark.parametrize("scale", [2.0, -0.5])
def test_truncated_factors_are_eckart_young_and_keep_the_scale(scale):
    from nora_spectra.subspaces import factor_bases

    rng = np.random.default_rng(8)
    A, B = rng.standard_normal((10, 30)), rng.standard_normal((25, 10)) * 1e120  # rescaled internally
    bases = factor_bases(A, B, scale)
    a_new, b_new = bases.truncated_factors(4)
    assert a_new.shape == (4, 30) and b_new.shape == (25, 4)
    u, sigma, vt = np.linalg.svd(scale * B @ A)
    best = (u[:, :4] * sigma[:4]) @ vt[:4]
    np.testing.assert_allclose(scale * b_new @ a_new, best, rtol=0, atol=1e-12 * sigma[0])
    # the values are split evenly: both factors carry sqrt(sigma_i / |s|)
    np.testing.assert_allclose(np.linalg.norm(b_new, axis=0), np.sqrt(sigma[:4] / abs(scale)), rtol=1e-12)
    np.testing.assert_allclose(np.linalg.norm(a_new, axis=1), np.sqrt(sigma[:4] / abs(scale)), rtol=1e-12)
    np.testing.assert_allclose(spectrum(bases.core).values, sigma[:10], rtol=1e-12)


def test_factored_svd_top_k_and_the_spectrum_agree():
    rng = np.random.default_rng(3)
    A, B = rng.standard_normal((12, 30)), rng.standard_normal((20, 12))
    full = factored_svd(A, B, 0.5)
    top = factored_svd(A, B, 0.5, top_k=4)
    assert top.left.shape == (20, 4) and top.right.shape == (4, 30)
    np.testing.assert_array_equal(top.values, full.values[:4])
    np.testing.assert_allclose(full.values, spectrum(LowRankUpdate(A, B, 0.5)).values, rtol=1e-13)
    assert factored_svd(A, B, top_k=0).k == 0


def test_factored_svd_rank_deficient_and_ill_conditioned_factors_take_householder():
    rng = np.random.default_rng(4)
    A = rng.standard_normal((8, 40))
    B = rng.standard_normal((60, 8))
    B[:, 5:] = 0.0  # a collapsed adapter: three dead columns
    A[3] = A[2] * (1 + 1e-9)  # nearly dependent rows: rcond far below the Cholesky limit
    assert CHOLESKY_RCOND_LIMIT > 1e-9
    svd = factored_svd(A, B)
    dense = B @ A
    sigma = np.linalg.svd(dense, compute_uv=False)[:8]
    np.testing.assert_allclose(svd.values, sigma, rtol=1e-9, atol=1e-12 * sigma[0])
    np.testing.assert_allclose(svd.left.T @ svd.left, np.eye(8), atol=1e-12)
    np.testing.assert_allclose(svd.left @ np.diag(svd.values) @ svd.right, dense, atol=1e-12 * sigma[0])
    zero = factored_svd(np.zeros((4, 10)), rng.standard_normal((6, 4)))
    assert np.all(zero.values == 0) and np.allclose(zero.left.T @ zero.left, np.eye(4))


def test_factored_svd_survives_huge_and_tiny_factors():
    rng = np.random.default_rng(5)
    A, B = rng.standard_normal((6, 20)), rng.standard_normal((15, 6))
    reference = factored_svd(A, B)
    for factor in (1e150, 1e-150):  # Grams of 1e300 and 1e-300 per entry: rescaled before they overflow
        svd = factored_svd(A * factor, B * factor)
        np.testing.assert_allclose(svd.values / factor**2, reference.values, rtol=1e-12)
        np.testing.assert_allclose(np.abs(svd.left.T @ reference.left), np.eye(6), atol=1e-10)


def test_factored_svd_refuses_non_finite_and_bad_shapes():
    A, B = np.ones((3, 4)), np.ones((5, 3))
    A[0, 0] = np.nan
    with pytest.raises(NonFiniteUpdateError):
        factored_svd(A, B)
    with pytest.raises(NonFiniteUpdateError):
        factored_svd(np.ones((3, 4)), B, float("inf"))
    with pytest.raises(ValueError, match="do not compose"):
        factored_svd(np.ones((3, 4)), np.ones((5, 2)))


# ----------------------------------------------------------------------------- rank policies


def test_truncation_against_hand_formulas():
    sigma = np.array([4.0, 3.0, 2.0, 1.0])
    cut = truncation(sigma, 2)
    assert cut.energy_kept == 25 / 30 and cut.spectral_error == 2.0
    assert cut.frobenius_error_rel == math.sqrt(5 / 30) and cut.energy == 30.0 and cut.tail_energy == 5.0
    whole = truncation(sigma, 4)
    assert (whole.energy_kept, whole.spectral_error, whole.frobenius_error_rel) == (1.0, 0.0, 0.0)
    zero = truncation(np.zeros(3), 1)
    assert (zero.energy_kept, zero.spectral_error, zero.frobenius_error_rel) == (1.0, 0.0, 0.0)
    huge = truncation(sigma * 1e200, 2)  # no overflow in the squares
    assert huge.energy_kept == pytest.approx(25 / 30, rel=1e-15)


def test_policies_choose_k():
    sigma = np.array([10.0, 5.0, 2.0, 1.0, 0.5])
    shape, rank = (64, 64), 5
    assert make_policy(rank=3).choose(sigma, shape=shape, rank=rank) == 3
    # energies 100, 25, 4, 1, 0.25 of 130.25: shares 0.768, 0.960, 0.990, 0.998, 1
    assert make_policy(energy=0.7).choose(sigma, shape=shape, rank=rank) == 1
    assert make_policy(energy=0.8).choose(sigma, shape=shape, rank=rank) == 2
    assert make_policy(energy=0.99).choose(sigma, shape=shape, rank=rank) == 3
    assert make_policy(energy=1.0).choose(sigma, shape=shape, rank=rank) == 5
    assert make_policy(sv_ratio=5.0).choose(sigma, shape=shape, rank=rank) == 3  # 10/5 = 2 -> keeps 10, 5, 2
    assert make_policy(sv_ratio=1.0).choose(sigma, shape=shape, rank=rank) == 1
    tau = gavish_donoho_omega(1.0) * 2.0  # median of sigma is 2
    assert optimal_threshold(sigma, shape, rank) == tau
    assert make_policy(threshold="optimal").choose(sigma, shape=shape, rank=rank) == int(np.sum(sigma > tau)) == 1
    assert make_policy(energy=0.9).choose(np.zeros(4), shape=shape, rank=4) == MIN_RANK


def test_gavish_donoho_omega_against_the_paper():
    # Gavish & Donoho (2014): omega(1) = 2.858; their cubic fit is within 0.02 over (0, 1]
    assert gavish_donoho_omega(1.0) == pytest.approx(2.858, abs=5e-4)
    for beta in (0.05, 0.1, 0.25, 0.5, 0.75, 1.0):
        fit = 0.56 * beta**3 - 0.95 * beta**2 + 1.82 * beta + 1.43
        assert abs(gavish_donoho_omega(beta) - fit) < 0.02
    with pytest.raises(ValueError):
        gavish_donoho_omega(0.0)


@pytest.mark.parametrize("kwargs, message", [
    ({}, "choose exactly one policy"),
    ({"rank": 2, "energy": 0.5}, "choose exactly one policy"),
    ({"rank": 0}, "--rank must be an integer >= 1"),
    ({"rank": 2.5}, "--rank must be an integer >= 1"),
    ({"energy": 0.0}, "(0, 1]"),
    ({"energy": float("nan")}, "(0, 1]"),
    ({"sv_ratio": 0.9}, ">= 1"),
    ({"threshold": "universal"}, "'optimal'"),
])
def test_make_policy_refuses(kwargs, message):
    with pytest.raises(UsageError, match=message.replace("(", r"\(").replace(")", r"\)").replace("]", r"\]")):
        make_policy(**kwargs)


# ----------------------------------------------------------------------------- writing


def test_encode_bfloat16_rounds_to_nearest_even_from_float64():
    rng = np.random.default_rng(6)
    # midpoints between neighbouring bfloat16 values, nudged below float32's resolution: where two
    # roundings through float32 would go wrong
    low = (rng.integers(0x0001, 0x7F7F, 600).astype(np.uint32) << 16).view(np.float32).astype(np.float64)
    high = ((low.astype(np.float32).view(np.uint32) + 0x10000)).view(np.float32).astype(np.float64)
    middle = (low + high) / 2
    nudged = np.concatenate([middle, middle * (1 + 2.0**-40), middle * (1 - 2.0**-40), -middle * (1 + 2.0**-40)])
    values = np.concatenate([
        nudged,
        rng.standard_normal(2000) * 10.0 ** rng.integers(-40, 38, 2000),
        [1 + 2**-8, 1 + 3 * 2**-8, 1 + 2**-8 + 2**-40, -(1 + 2**-8), 3.3895313892515355e38, 3.4e38, 2.0**-133,
         2.0**-134, 1.5 * 2.0**-133, 2.0**-127 * 1.00390625, 0.0, -0.0],
    ])
    got = np.frombuffer(encode(values, "BF16"), dtype="<u2").astype(np.uint32) << 16
    got = got.view(np.float32).astype(np.float64)
    want = [nearest_bfloat16(float(x)) for x in values]
    assert got.tolist() == want
    from nora_spectra.io.writing import _bfloat16_bits_to_odd  # the exact fallback, on every value

    grid = rng.permutation(values[: 40 * 60]).reshape(40, 60)  # 2-D, with ties at scattered positions
    flat = np.frombuffer(encode(grid, "BF16"), "<u2").astype(np.uint32) << 16
    assert flat.view(np.float32).astype(np.float64).tolist() == [nearest_bfloat16(float(x)) for x in grid.ravel()]

    with np.errstate(over="ignore"):
        assert _bfloat16_bits_to_odd(values).tolist() == np.frombuffer(encode(values, "BF16"), "<u2").tolist()
    with np.errstate(over="ignore"):
        assert np.frombuffer(encode(values, "F16"), "<f2").tolist() == values.astype(np.float16).tolist()
    with pytest.raises(ValueError):
        encode(values, "I8")


def test_bfloat16_matches_torch_where_torch_has_no_double_rounding():
    torch = pytest.importorskip("torch")
    single = np.random.default_rng(7).standard_normal(5000).astype(np.float32).astype(np.float64)
    ours = np.frombuffer(encode(single, "BF16"), dtype="<u2")
    theirs = torch.from_numpy(single).float().to(torch.bfloat16).view(torch.int16).numpy().view("<u2")
    np.testing.assert_array_equal(ours, theirs)


def test_write_safetensors_is_read_back_by_the_official_reader_and_ours(tmp_path):
    from safetensors.numpy import load_file

    a = np.arange(6, dtype=np.float64).reshape(2, 3)
    tensors = [OutTensor("half", "F16", (3,), encode(np.array([1.0, 2.0, 3.0]), "F16")),
               OutTensor("double", "F64", (2, 3), encode(a, "F64")),
               OutTensor("single", "F32", (1,), encode(np.array([0.5]), "F32"))]
    buffer = io.BytesIO()
    size = write_safetensors(buffer, tensors, {"format": "pt"})
    path = tmp_path / "t.safetensors"
    path.write_bytes(buffer.getvalue())
    assert size == path.stat().st_size
    header_len = int.from_bytes(buffer.getvalue()[:8], "little")
    assert header_len % 8 == 0
    loaded = load_file(str(path))
    np.testing.assert_array_equal(loaded["double"], a)
    np.testing.assert_array_equal(loaded["half"], np.array([1, 2, 3], np.float16))
    ours = SafetensorsFile(path)
    assert ours.metadata == {"format": "pt"}
    for name in ours.keys():  # each tensor starts at a multiple of its item size
        info = ours.info(name)
        assert (info.start - 8 - header_len) % {"F64": 8, "F32": 4, "F16": 2}[info.dtype] == 0
