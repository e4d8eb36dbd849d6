"""adapter_singular_values against a dense float64 SVD of the formed update."""

import subprocess
import sys

import numpy as np
import pytest

import nora_spectra.spectrum as spectrum_module
from nora_spectra.spectrum import GRAM_RCOND_LIMIT, NonFiniteFactorsError, adapter_singular_values, blas_threads

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


def run_in_fresh_interpreter(code: str) -> None:
    """Run ``code`` (which asserts what it checks) in a new Python; fail with its stderr unless it got to the end."""
    out = subprocess.run([sys.executable, "-c", code + "print('ok')\n"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


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


# --------------------------------------------------------------------------- ill-conditioned adapters
# The factors a collapsed or barely trained adapter has. Each case is checked against the dense float64
# SVD at the contract (1e-9 of sigma_max) and, where the equilibrated Gram route is accurate, that it
# does not pay for Householder QR: the ill-conditioned path must cost what the well-conditioned one does.


def bf16(x: np.ndarray) -> np.ndarray:
    """Round to bfloat16 (nearest, ties to even) and back to float64, as a bf16 checkpoint stores it."""
    bits = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32).astype(np.uint64)
    rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint32) << 16
    return rounded.view(np.float32).astype(np.float64)


@pytest.fixture
def no_householder(monkeypatch):
    """Fail the test if any factor is re-factored by Householder QR."""

    def refuse(self):
        raise AssertionError("Householder fallback taken")

    monkeypatch.setattr(spectrum_module._Side, "householder_r", refuse)


@pytest.mark.parametrize("r, d_out, d_in", [(16, 120, 90), (64, 150, 200), (128, 260, 180)])
@pytest.mark.parametrize("which", ["A rows", "B columns", "both", "both reversed"])
@pytest.mark.parametrize("to", [1e-6, 1e-14])
def test_geometrically_decaying_factors_take_the_gram_route(r, d_out, d_in, which, to, no_householder):
    rng = np.random.default_rng(r + d_out)
    decay = np.geomspace(1.0, to, r)
    if which == "both reversed":
        decay_a, decay_b = decay, decay[::-1]
    else:
        decay_a = decay if which != "B columns" else np.ones(r)
        decay_b = decay if which != "A rows" else np.ones(r)
    A = bf16(rng.uniform(-1, 1, (r, d_in)) / np.sqrt(d_in) * decay_a[:, None])
    B = bf16(rng.standard_normal((d_out, r)) * 1e-3 * decay_b)
    assert_matches_dense(A, B, 2.0)


@pytest.mark.parametrize("r", [16, 64])
def test_exactly_zero_rows_are_dropped_from_both_factors(r, no_householder):
    rng = np.random.default_rng(r)
    A = rng.standard_normal((r, 150))
    B = rng.standard_normal((120, r))
    A[r // 2 :] = 0.0  # rank r/2: the Gram of A is singular, yet no fallback is needed
    B[:, 1 : r // 2 : 3] = 0.0
    got = assert_matches_dense(A, B)
    live = r // 2 - len(range(1, r // 2, 3))
    assert np.all(got[live:] == 0.0)
    assert np.all(got[:live] > 1e-3 * got[0])


@pytest.mark.parametrize("r", [8, 16])
def test_zero_rows_dropped_then_householder_on_the_rest(r):
    # a zero row of A, a zero column of B, and two equal columns of B (its Gram stays singular once
    # the zero index is dropped): the Householder route must take exactly the live columns
    rng = np.random.default_rng(r + 1)
    A = rng.standard_normal((r, 60))
    B = rng.standard_normal((50, r))
    A[1] = 0.0
    B[:, 5] = 0.0
    B[:, 2] = B[:, 3]
    got = assert_matches_dense(A, B)
    assert np.all(got[-3:] <= 1e-12 * got[0])  # two dropped indices and the duplicate


def test_a_row_whose_square_underflows_is_not_dropped():
    # only the tiny row of A meets a nonzero column of B: the update is that row, nothing else
    rng = np.random.default_rng(8)
    A = rng.standard_normal((8, 60))
    row = A[3].copy()
    A[3] = row * 1e-170  # its squared norm underflows to 0 in the Gram matrix
    B = np.zeros((40, 8))
    B[:, 3] = rng.standard_normal(40)
    got = adapter_singular_values(A, B)
    want = np.linalg.norm(B[:, 3]) * np.linalg.norm(row) * 1e-170
    np.testing.assert_allclose(got[0], want, rtol=1e-12)
    assert np.all(got[1:] == 0.0)


def half_trained(r: int, d_out: int, d_in: int, noise: float) -> tuple[np.ndarray, np.ndarray]:
    """A as initialised, B small and nearly rank-one (what a few steps from B = 0 leave), in bf16."""
    rng = np.random.default_rng(r + d_out)
    u = rng.standard_normal((d_out, 1))
    v = rng.standard_normal((1, r))
    B = bf16(1e-4 * (u @ v + noise * rng.standard_normal((d_out, r))))
    A = bf16(rng.uniform(-1, 1, (r, d_in)) / np.sqrt(d_in))
    return A, B


@pytest.mark.parametrize("r, d_out, d_in", [(16, 200, 150), (64, 300, 200), (128, 400, 260)])
@pytest.mark.parametrize("noise", [1e-2, 1e-3])
def test_half_trained_adapter_keeps_the_gram_route(r, d_out, d_in, noise, no_householder):
    # B's equilibrated Gram is ill-conditioned (rcond ~1e-4: noise and bf16 rounding are all that
    # separates its columns), yet the first-order error bounds show the Gram route's values are exact
    assert_matches_dense(*half_trained(r, d_out, d_in, noise), 0.5)


@pytest.mark.parametrize("r, d_out, d_in", [(16, 200, 150), (64, 300, 200), (128, 400, 260), (128, 600, 260)])
def test_rank_one_up_to_bf16_rounding(r, d_out, d_in):
    # B = bf16(u v^T): its Gram may be singular to working precision; any route, the contract holds
    assert_matches_dense(*half_trained(r, d_out, d_in, 0.0), 0.5)


@pytest.mark.parametrize("cond", [1e2, 1e4, 1e6, 1e10])
def test_ill_direction_of_b_amplified_by_a(cond):
    # adversarial for the Gram route: B is weak along w and A is strong along w, so the update's
    # largest singular values come from B's poorly determined direction; the error bounds must see it
    rng = np.random.default_rng(int(np.log10(cond)))
    r, d_out, d_in = 16, 200, 150
    w = np.linalg.qr(rng.standard_normal((r, 1)))[0]
    B = rng.standard_normal((d_out, r)) @ (np.eye(r) - w @ w.T) + rng.standard_normal((d_out, 1)) @ w.T / cond
    A = rng.standard_normal((r, d_in)) / np.sqrt(d_in) + 1e3 * w @ rng.standard_normal((1, d_in)) / np.sqrt(d_in)
    assert_matches_dense(A, B)


def test_rank_above_both_dimensions_costs_the_dimensions_not_r():
    # issue 12: lora_A [20000, 1] and lora_B [1, 20000] is a 1 x 1 update; an r x r Gram would take 3.2 GB
    import tracemalloc

    rng = np.random.default_rng(9)
    A = rng.standard_normal((20000, 1))
    B = rng.standard_normal((1, 20000))
    tracemalloc.start()
    try:
        got = adapter_singular_values(A, B, 0.5)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 1_000_000  # bytes: nothing of size r^2, nor even of size r
    np.testing.assert_allclose(got, [0.5 * abs(float(B[0] @ A[:, 0]))], rtol=1e-12)


@pytest.mark.parametrize("r, d_out, d_in", [(300, 40, 30), (300, 30, 40), (64, 5, 4000), (64, 4000, 5), (2000, 1, 1)])
def test_rank_above_a_dimension_forms_the_small_product(r, d_out, d_in):
    import tracemalloc

    rng = np.random.default_rng(r + d_out)
    A = rng.standard_normal((r, d_in))
    B = rng.standard_normal((d_out, r))
    tracemalloc.start()
    try:
        got = assert_matches_dense(A, B, -1.5)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert got.shape == (min(d_out, d_in),)
    # the dense reference itself allocates d_out * d_in; nothing of size r * r on top
    assert peak < 8 * (4 * d_out * d_in + 2 * r * max(d_out, d_in)) + 200_000


def test_lapack_loads_without_scipy_linalg():
    # start-up: only scipy's compiled LAPACK wrappers, not the whole of scipy.linalg (about 0.25 s)
    code = (
        "import sys, numpy as np\n"
        "from nora_spectra.spectrum import adapter_singular_values, lapack_routines\n"
        "adapter_singular_values(np.ones((2, 3)), np.ones((4, 2)))\n"
        "assert 'scipy.linalg' not in sys.modules, 'scipy.linalg imported'\n"
        "fast = lapack_routines()\n"
        "from scipy.linalg import lapack\n"
        "m = np.array([[4.0, 2.0], [2.0, 3.0]])\n"
        "assert np.array_equal(fast.dpotrf(m)[0], lapack.dpotrf(m)[0])\n"
    )
    run_in_fresh_interpreter(code)


@pytest.mark.parametrize("preset", [None, "20"])
def test_openblas_thread_timeout_is_set_only_while_loading(preset):
    # scipy's OpenBLAS is loaded with OPENBLAS_THREAD_TIMEOUT=4 (idle threads sleep instead of spinning)
    # unless the user chose a value; the environment is left as it was
    code = (
        "import os\n"
        f"preset = {preset!r}\n"
        "os.environ.pop('OPENBLAS_THREAD_TIMEOUT', None)\n"
        "if preset is not None: os.environ['OPENBLAS_THREAD_TIMEOUT'] = preset\n"
        "import nora_spectra.spectrum as s\n"
        "seen = []\n"
        "original = s._load_flapack.__globals__['_idle_blas_threads_sleep']\n"
        "s.lapack_routines()\n"
        "assert os.environ.get('OPENBLAS_THREAD_TIMEOUT') == preset, os.environ.get('OPENBLAS_THREAD_TIMEOUT')\n"
        "with original():\n"
        "    seen.append(os.environ.get('OPENBLAS_THREAD_TIMEOUT'))\n"
        "assert seen == [preset or '4'], seen\n"
    )
    run_in_fresh_interpreter(code)


def test_blas_threads_limits_every_blas_library_and_restores():
    threadpoolctl = pytest.importorskip("threadpoolctl")
    before = {info["filepath"]: info["num_threads"] for info in threadpoolctl.threadpool_info() if info["user_api"] == "blas"}
    with blas_threads(1):
        inside = [info for info in threadpoolctl.threadpool_info() if info["user_api"] == "blas"]
        assert len(inside) >= 1
        assert all(info["num_threads"] == 1 for info in inside)
    after = {info["filepath"]: info["num_threads"] for info in threadpoolctl.threadpool_info() if info["user_api"] == "blas"}
    assert all(after[path] == threads for path, threads in before.items())


def test_many_cores_at_once_equal_each_one_alone_on_every_route():
    # route 1 (plain, two ranks), zero rows dropped, every live index but one dropped, route 2
    # (half-trained), route 3 (a rank-deficient B: its factors are asked for again), and a row whose
    # square underflows (route 3 too)
    rng = np.random.default_rng(11)
    cases = [(rng.standard_normal((16, 90)), rng.standard_normal((70, 16)), 0.5),
             (rng.standard_normal((8, 40)), rng.standard_normal((50, 8)), 2.0)]
    A, B = rng.standard_normal((16, 80)), rng.standard_normal((60, 16))
    A[3], B[:, 9] = 0.0, 0.0
    cases.append((A, B, 1.0))
    A, B = rng.standard_normal((4, 30)), rng.standard_normal((20, 4))
    A[1:] = 0.0
    cases.append((A, B, 1.0))
    A, B = half_trained(16, 200, 150, 1e-3)
    cases.append((A.astype(np.float64), B.astype(np.float64), 0.5))
    cases.append((rng.standard_normal((16, 90)), rng.standard_normal((70, 3)) @ rng.standard_normal((3, 16)), 1.0))
    A = rng.standard_normal((8, 60))
    A[2] *= 1e-170
    cases.append((A, rng.standard_normal((40, 8)), 1.0))
    asked = []
    pairs = []
    for i, (A, B, scale) in enumerate(cases):
        pair = spectrum_module.gram_pair(A, B, scale, factors=lambda A=A, B=B, i=i: asked.append(i) or (A, B))
        assert pair is not None
        pairs.append(pair)
    together = spectrum_module.core_singular_values(pairs)
    for (A, B, scale), values in zip(cases, together):
        np.testing.assert_array_equal(values, adapter_singular_values(A, B, scale))  # one implementation
        want = dense(A, B, scale)
        np.testing.assert_allclose(values, want[: values.size], rtol=0, atol=RTOL * max(want[0], 1e-300))
    assert together[3][0] > 0 and together[3][1:].tolist() == [0.0] * 3
    assert 5 in asked and 6 in asked and 0 not in asked  # only the Householder routes read the factors again


def test_factors_to_rescale_or_non_finite_take_the_general_path():
    rng = np.random.default_rng(12)
    A, B = rng.standard_normal((4, 20)), rng.standard_normal((10, 4))
    assert spectrum_module.gram_pair(A * 1e300, B) is None  # its Gram overflows: rescaled on the general path
    assert spectrum_module.gram_pair(A, B * 1e-300) is None
    assert spectrum_module.gram_pair(np.zeros((4, 20)), B) is None  # a zero trace: the general path's zero update
    bad = B.copy()
    bad[0, 0] = np.nan
    assert spectrum_module.gram_pair(A, bad) is None
    with pytest.raises(NonFiniteFactorsError):
        adapter_singular_values(A, bad)
