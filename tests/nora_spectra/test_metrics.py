"""Every metric against a hand-written float64 formula (plain Python loops, no shared code)."""

import math

import numpy as np
import pytest

from nora_spectra import metrics as M


def ref_erank(s):
    total = sum(s)
    return math.exp(-sum((x / total) * math.log(x / total) for x in s if x > 0))


def ref_energy_rank(s, q):
    total = sum(x * x for x in s)
    acc = 0.0
    for i, x in enumerate(s, start=1):
        acc += x * x
        if acc >= q * total - 1e-12 * total:
            return i
    raise AssertionError


SPECTRA = [
    [5.0, 3.0, 1.0, 0.5, 0.1, 0.0, 0.0, 0.0],
    [1.0] * 10,
    [2.0, 1e-3, 1e-6],
    [7.0],
    list(np.geomspace(10, 0.01, 64)),
]


@pytest.mark.parametrize("s", SPECTRA)
def test_each_metric_matches_its_formula(s):
    r = max(len(s), 4)
    shape = (4096, 1024)
    got = M.spectrum_metrics(s, rank=r, shape=shape, collapse_threshold=0.3)
    erank = ref_erank(s)
    assert got["effective_rank"] == pytest.approx(erank, rel=1e-13)
    assert got["utilization"] == pytest.approx(erank / r, rel=1e-13)
    assert got["stable_rank"] == pytest.approx(sum(x * x for x in s) / max(s) ** 2, rel=1e-13)
    assert got["energy_rank_90"] == ref_energy_rank(s, 0.90)
    assert got["energy_rank_99"] == ref_energy_rank(s, 0.99)
    tol = max(s) * 4096 * 2.0**-52
    assert got["numerical_rank"] == sum(1 for x in s if x > tol)
    expected_entropy = 1.0 if len(s) == 1 else math.log(erank) / math.log(len(s))
    assert got["spectral_entropy"] == pytest.approx(expected_entropy, rel=1e-12, abs=1e-15)
    assert got["sigma_max"] == max(s)
    assert got["frobenius_norm"] == pytest.approx(math.sqrt(sum(x * x for x in s)), rel=1e-13)
    tail = [x * x for i, x in enumerate(s, start=1) if i > math.ceil(r / 2)]
    assert got["tail_energy"] == pytest.approx(sum(tail) / sum(x * x for x in s), rel=1e-12, abs=1e-300)
    assert got["participation_ratio"] == pytest.approx(
        sum(x * x for x in s) ** 2 / sum(x**4 for x in s), rel=1e-12
    )
    assert got["collapsed"] == (erank / r < 0.3)
    assert got["status"] == "ok"
    assert list(got) == list(M.METRIC_FIELDS)


def test_flat_spectrum_is_full_rank_everywhere():
    got = M.spectrum_metrics([2.0] * 10, rank=10, shape=(64, 64))
    assert got["effective_rank"] == pytest.approx(10)
    assert got["utilization"] == pytest.approx(1.0)
    assert got["spectral_entropy"] == pytest.approx(1.0)
    assert got["energy_rank_90"] == 9  # not 10 through rounding in the cumulative sum
    assert got["energy_rank_99"] == 10
    assert got["tail_energy"] == pytest.approx(0.5)
    assert got["participation_ratio"] == pytest.approx(10)


def test_single_direction_is_collapsed():
    got = M.spectrum_metrics([3.0] + [0.0] * 15, rank=16, shape=(32, 32))
    assert got["effective_rank"] == 1.0
    assert got["utilization"] == 1 / 16
    assert got["collapsed"] is True
    assert got["stable_rank"] == 1.0
    assert got["numerical_rank"] == 1
    assert got["tail_energy"] == 0.0


def test_zero_update_has_status_zero_and_no_division_by_zero():
    got = M.spectrum_metrics(np.zeros(8), rank=8, shape=(16, 16))
    assert got["status"] == "zero"
    assert got["effective_rank"] == 0.0
    assert got["utilization"] == 0.0
    assert got["collapsed"] is True  # utilization 0 is below any threshold > 0
    for name in ("stable_rank", "energy_rank_90", "numerical_rank", "sigma_max", "frobenius_norm",
                 "tail_energy", "participation_ratio", "spectral_entropy"):
        assert got[name] == 0


def test_scale_invariance_of_rank_metrics_and_not_of_norms():
    s = np.array([4.0, 2.0, 1.0, 0.25])
    a = M.spectrum_metrics(s, rank=4, shape=(8, 8))
    b = M.spectrum_metrics(1e-7 * s, rank=4, shape=(8, 8))
    for name in ("effective_rank", "stable_rank", "energy_rank_90", "spectral_entropy", "tail_energy",
                 "participation_ratio"):
        assert a[name] == pytest.approx(b[name], rel=1e-12)
    assert b["sigma_max"] == pytest.approx(1e-7 * a["sigma_max"])


def test_huge_singular_values_do_not_overflow():
    got = M.spectrum_metrics([1e200, 1e200], rank=2, shape=(4, 4))
    assert got["frobenius_norm"] == pytest.approx(math.sqrt(2) * 1e200)
    assert got["participation_ratio"] == pytest.approx(2.0)


def test_non_finite_metrics_are_null():
    got = M.non_finite_metrics()
    assert got["status"] == "non_finite"
    assert got["effective_rank"] is None and got["utilization"] is None
    assert list(got) == list(M.METRIC_FIELDS)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"sigma": [1.0], "rank": 0, "shape": (2, 2)}, "rank"),
        ({"sigma": [1.0], "rank": 1, "shape": (2, 2), "collapse_threshold": 1.5}, "collapse_threshold"),
        ({"sigma": [[1.0]], "rank": 1, "shape": (2, 2)}, "1-D"),
        ({"sigma": [1.0, -1.0], "rank": 2, "shape": (2, 2)}, "non-negative"),
        ({"sigma": [float("nan")], "rank": 1, "shape": (2, 2)}, "finite"),
    ],
)
def test_invalid_arguments(kwargs, match):
    sigma = kwargs.pop("sigma")
    with pytest.raises(ValueError, match=match):
        M.spectrum_metrics(sigma, **kwargs)


def test_energy_rank_rejects_bad_q():
    with pytest.raises(ValueError, match="q must"):
        M.energy_rank([1.0], 0.0)


def test_many_spectra_at_once_match_their_formulas_one_by_one():
    rng = np.random.default_rng(7)
    spectra, ranks, shapes = [], [], []
    for k in (1, 3, 8, 9, 16, 16, 16, 40):
        s = np.sort(rng.exponential(size=k) * 10.0 ** rng.uniform(-8, 8))[::-1]
        if k > 4 and rng.random() < 0.5:
            s[k // 2:] = 0.0  # exact zeros in the tail
        spectra.append(s)
        ranks.append(int(rng.integers(k, 3 * k + 1)))
        shapes.append((int(rng.integers(k, 500)), int(rng.integers(k, 500))))
    spectra.append(np.zeros(16))
    ranks.append(16)
    shapes.append((32, 32))
    batch = M.spectra_metrics(spectra, ranks=ranks, shapes=shapes, collapse_threshold=0.4)
    assert len(batch) == len(spectra)
    for s, r, shape, got in zip(spectra, ranks, shapes, batch):
        assert got == M.spectrum_metrics(s, rank=r, shape=shape, collapse_threshold=0.4)
        if not s.any():
            assert got["status"] == "zero" and got["effective_rank"] == 0.0
            continue
        s = list(s)
        assert got["effective_rank"] == pytest.approx(ref_erank(s), rel=1e-13)
        assert got["energy_rank_90"] == ref_energy_rank(s, 0.90)
        assert got["numerical_rank"] == sum(1 for x in s if x > max(s) * max(shape) * 2.0**-52)
        tail = [x * x for i, x in enumerate(s, start=1) if i > math.ceil(r / 2)]
        assert got["tail_energy"] == pytest.approx(sum(tail) / sum(x * x for x in s), rel=1e-12, abs=1e-300)


def test_many_spectra_refuse_what_one_refuses():
    with pytest.raises(ValueError, match="rank must be >= 1"):
        M.spectra_metrics([[1.0], [2.0]], ranks=[1, 0], shapes=[(2, 2), (2, 2)])
    with pytest.raises(ValueError, match="2 spectra, 1 ranks"):
        M.spectra_metrics([[1.0], [2.0]], ranks=[1], shapes=[(2, 2), (2, 2)])
    with pytest.raises(ValueError, match="non-negative finite"):
        M.spectra_metrics([[1.0], [np.nan]], ranks=[1, 1], shapes=[(2, 2), (2, 2)])
