"""Update kinds and the one spectrum entry point, against dense float64 references (numpy SVD)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from nora_spectra.spectrum import NonFiniteFactorsError, dense_spectrum, singular_values, spectrum
from nora_spectra.updates import DenseUpdate, HadamardUpdate, KroneckerUpdate, LowRankUpdate

TOL = 1e-9  # of sigma_max, the spectrum engine's contract


def dense_sv(m: np.ndarray) -> np.ndarray:
    return np.linalg.svd(np.asarray(m, dtype=np.float64), compute_uv=False)


def assert_spectrum(got: np.ndarray, want: np.ndarray) -> None:
    k = len(got)
    np.testing.assert_allclose(got, want[:k], rtol=0, atol=TOL * want[0])
    assert np.all(want[k:] <= 1e-10 * want[0])  # what is left out is zero


def test_low_rank_kind_is_the_adapter_spectrum() -> None:
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((5, 30)), rng.standard_normal((20, 5))
    update = LowRankUpdate(a, b, -0.75)
    assert update.shape == (20, 30) and update.rank_bound == 5
    assert_spectrum(singular_values(update), dense_sv(-0.75 * b @ a))
    with pytest.raises(ValueError, match="do not compose"):
        LowRankUpdate(a, rng.standard_normal((20, 4)))


@pytest.mark.parametrize("r1, r2, m, n", [(3, 2, 15, 20), (4, 4, 40, 12), (8, 8, 10, 30)])
def test_hadamard_kind_matches_the_formed_product(r1: int, r2: int, m: int, n: int) -> None:
    rng = np.random.default_rng(r1 * 10 + r2)
    first = LowRankUpdate(rng.standard_normal((r1, n)), rng.standard_normal((m, r1)))
    second = LowRankUpdate(rng.standard_normal((r2, n)), rng.standard_normal((m, r2)))
    update = HadamardUpdate(first, second, 0.5)
    dense = 0.5 * (first.B @ first.A) * (second.B @ second.A)
    assert update.rank_bound == min(r1 * r2, m, n)
    u, v = update.factors()
    np.testing.assert_allclose(u @ v, dense / 0.5, rtol=1e-12, atol=1e-12)
    assert_spectrum(singular_values(update), dense_sv(dense))


def test_kronecker_kind_multiplies_the_factor_spectra() -> None:
    rng = np.random.default_rng(2)
    w1 = rng.standard_normal((4, 3))
    w2a, w2b = rng.standard_normal((5, 2)), rng.standard_normal((2, 6))
    update = KroneckerUpdate(DenseUpdate(w1), LowRankUpdate(w2b, w2a), 3.0)
    dense = 3.0 * np.kron(w1, w2a @ w2b)
    assert update.shape == dense.shape and update.rank_bound == 3 * 2
    assert_spectrum(singular_values(update), dense_sv(dense))
    both_low = KroneckerUpdate(LowRankUpdate(rng.standard_normal((2, 7)), rng.standard_normal((3, 2))),
                               LowRankUpdate(w2b, w2a))
    assert_spectrum(singular_values(both_low), dense_sv(np.kron(both_low.left.B @ both_low.left.A, w2a @ w2b)))


def test_dense_kind_exact_and_overflow_safe() -> None:
    rng = np.random.default_rng(3)
    m = rng.standard_normal((30, 18))
    result = spectrum(DenseUpdate(m))
    assert result.exact and result.error_bound == 0.0
    assert_spectrum(result.values, dense_sv(m))
    assert result.total_energy == pytest.approx(float(np.sum(m * m)), rel=1e-13)
    huge = spectrum(DenseUpdate(m * 1e300)).values  # m @ m.T would overflow; the rescaling keeps it exact
    np.testing.assert_allclose(huge / 1e300, dense_sv(m), rtol=1e-12)
    assert not spectrum(DenseUpdate(np.zeros((4, 3)))).values.any()
    with pytest.raises(NonFiniteFactorsError):
        spectrum(DenseUpdate(np.full((3, 3), np.inf)))


def test_randomized_top_k_lies_within_its_stated_bound() -> None:
    rng = np.random.default_rng(4)
    low = rng.standard_normal((300, 40)) @ rng.standard_normal((40, 250)) * np.exp(-np.arange(250) / 30.0)
    m = low + 1e-2 * rng.standard_normal((300, 250))
    result = dense_spectrum(m, top_k=16)
    assert not result.exact and len(result.values) == 16 and result.error_bound > 0
    want = dense_sv(m)[:16]
    assert np.all(result.values <= want * (1 + 1e-12))  # s_i <= sigma_i
    assert np.all(want <= np.sqrt(result.values**2 + result.error_bound**2) * (1 + 1e-12))
    assert np.max(np.abs(result.values - want)) <= 1e-3 * want[0]  # and, on a decaying spectrum, close
    captured = float(np.sum(result.values**2)) / result.total_energy
    assert 0 < captured <= 1 and captured == pytest.approx(float(np.sum(want**2) / np.sum(m * m)), rel=1e-4)
    again = dense_spectrum(m, top_k=16)
    assert np.array_equal(again.values, result.values)  # seeded: reproducible
    # asking for most of the spectrum is exact (a sketch would cost as much)
    assert dense_spectrum(m, top_k=200).exact


def test_dense_top_k_is_the_update_rank_bound() -> None:
    update = DenseUpdate(np.eye(6), top_k=2)
    assert update.rank_bound == 2 and update.shape == (6, 6)
    with pytest.raises(ValueError, match="top_k"):
        DenseUpdate(np.eye(3), top_k=0)
    with pytest.raises(ValueError, match="2-D"):
        DenseUpdate(np.zeros(3))


def test_non_finite_scale_and_unknown_kind() -> None:
    a = np.ones((1, 2))
    with pytest.raises(NonFiniteFactorsError):
        spectrum(HadamardUpdate(LowRankUpdate(a, a.T), LowRankUpdate(a, a.T), math.nan))
    with pytest.raises(TypeError, match="not an update kind"):
        spectrum((a, a))  # type: ignore[arg-type]
