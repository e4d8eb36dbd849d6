"""adapter_singular_values against a dense float64 SVD of the formed update."""

import numpy as np
import pytest

from nora_spectra.spectrum import GRAM_RCOND_LIMIT, NonFiniteFactorsError, adapter_singular_values

RTOL = 1e-9  # the bound, relative to sigma_max


def dense(A: np.ndarray, B: np.ndarray, scale: float = 1.0) -> np.ndarray:
    """Reference: every singular value of the formed float64 update."""
    return np.linalg.svd(scale * (B.astype(np.float64) @ A.astype(np.float64)), compute_uv=False)


def assert_matches_dense(A, B, scale=1.0):
    got = adapter_singular_values(A, B, scale)
    want = dense(A, B, scale)
    k = min(A.shape[0], B.shape[0], A.shape[1])
    assert got.shape == (k,)
    assert got.dtype == np.float64
    assert np.all(np.diff(got) <= 0), "descending"
    assert np.all(got >= 0)
    top = max(want[0], np.finfo(float).tiny)
    np.testing.assert_allclose(got, want[:k], rtol=0, atol=RTOL * top)
    # the values the factored route leaves out are exactly zero in the dense SVD too (up to rounding)
    assert np.all(want[k:] <= 1e-12 * top)
    return got


def with_singular_values(rng, m, n, values):
    """An (m, n) matrix with the given singular values and random singular vectors."""
    U, _ = np.linalg.qr(rng.standard_normal((m, len(values))))
    V, _ = np.linalg.qr(rng.standard_normal((n, len(values))))
    return (U * values) @ V.T


@pytest.mark.parametrize(
    "r, d_out, d_in",
    [(1, 7, 5), (4, 64, 32), (8, 32, 64), (16, 300, 200), (64, 256, 512), (8, 4, 6), (8, 6, 4), (12, 3, 3)],
)
@pytest.mark.parametrize("scale", [1.0, 0.5, 2.0 / np.sqrt(16), -3.0])
def test_random_factors_match_dense(r, d_out, d_in, scale):
    rng = np.random.default_rng(r * 1000 + d_out)
    A = rng.standard_normal((r, d_in))
    B = rng.standard_normal((d_out, r))
    assert_matches_dense(A, B, scale)


def test_rank_deficient_factors_use_householder_and_stay_exact():
    rng = np.random.default_rng(1)
    A = rng.standard_normal((16, 300))
    B = rng.standard_normal((200, 3)) @ rng.standard_normal((3, 16))  # rank 3
    got = assert_matches_dense(A, B)
    assert np.all(got[3:] <= 1e-12 * got[0])
    assert np.all(got[:3] > 1e-3 * got[0])


@pytest.mark.parametrize("cond", [1e2, 1e5, 1e9, 1e14])
def test_ill_conditioned_factors(cond):
    rng = np.random.default_rng(int(np.log10(cond)))
    A = with_singular_values(rng, 24, 180, np.geomspace(1, 1 / cond, 24))
    B = with_singular_values(rng, 150, 24, np.geomspace(1, 1 / cond, 24))
    assert_matches_dense(A, B)


def test_collapsed_update_onto_one_direction():
    rng = np.random.default_rng(2)
    u = rng.standard_normal((128, 1))
    B = u @ rng.standard_normal((1, 32)) + 1e-9 * rng.standard_normal((128, 32))
    A = rng.standard_normal((32, 96))
    got = assert_matches_dense(A, B)
    assert got[1] < 1e-6 * got[0]


@pytest.mark.parametrize("magnitude", [1e-300, 1e-200, 1e-150, 1e150, 1e200, 1e300])
def test_tiny_and_huge_factors_neither_underflow_nor_overflow(magnitude):
    rng = np.random.default_rng(3)
    A = rng.standard_normal((8, 40))
    B = rng.standard_normal((30, 8))
    # scale one factor only, so the product stays representable and the dense reference is valid
    got = adapter_singular_values(A * magnitude, B)
    want = dense(A, B) * magnitude
    np.testing.assert_allclose(got, want[:8], rtol=1e-12)


def test_low_precision_inputs_are_upcast_exactly():
    torch = pytest.importorskip("torch")
    A = torch.randn(8, 64, dtype=torch.bfloat16)
    B = torch.randn(48, 8, dtype=torch.float16)
    A64 = A.to(torch.float64).numpy()
    B64 = B.to(torch.float64).numpy()
    got = adapter_singular_values(A.float().numpy(), B.numpy(), 0.25)
    np.testing.assert_allclose(got, dense(A64, B64, 0.25)[:8], rtol=0, atol=RTOL * dense(A64, B64, 0.25)[0])


def test_zero_update():
    A = np.random.default_rng(4).standard_normal((4, 10))
    np.testing.assert_array_equal(adapter_singular_values(A, np.zeros((6, 4))), np.zeros(4))
    np.testing.assert_array_equal(adapter_singular_values(np.zeros((4, 10)), np.ones((6, 4))), np.zeros(4))


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("which", ["A", "B"])
def test_non_finite_factors_raise(bad, which):
    A = np.ones((3, 5))
    B = np.ones((4, 3))
    (A if which == "A" else B)[1, 2] = bad
    with pytest.raises(NonFiniteFactorsError):
        adapter_singular_values(A, B)


def test_non_finite_scale_raises():
    with pytest.raises(NonFiniteFactorsError, match="scale"):
        adapter_singular_values(np.ones((2, 3)), np.ones((3, 2)), float("nan"))


@pytest.mark.parametrize(
    "a_shape, b_shape", [((4, 10), (6, 5)), ((4,), (6, 4)), ((4, 10, 1), (6, 4))]
)
def test_shapes_that_do_not_compose(a_shape, b_shape):
    with pytest.raises(ValueError, match="do not compose"):
        adapter_singular_values(np.ones(a_shape), np.ones(b_shape))


def test_gram_route_threshold_boundary_is_exact_on_both_sides():
    # factors just better and just worse conditioned than the Gram route accepts
    rng = np.random.default_rng(5)
    for cond in (0.5 / GRAM_RCOND_LIMIT, 5 / GRAM_RCOND_LIMIT):
        A = with_singular_values(rng, 16, 100, np.geomspace(1, 1 / cond, 16))
        B = with_singular_values(rng, 90, 16, np.geomspace(1, 1 / cond, 16))
        assert_matches_dense(A, B)
