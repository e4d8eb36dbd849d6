"""Property-based fuzzing of every reader and every command that takes a file (about a minute in CI).

For each class of :mod:`tests.fuzz.cases`, hypothesis draws the random choices of the seeded mutators
(``st.randoms``: shrinkable, derandomized so CI is reproducible) and every case must hold the property of
:func:`tests.fuzz.harness.check`: exit 0/1 with valid output or exit 2 with one line naming an input file,
no traceback, no input modified, no partial output, and a peak memory under 500 MB. ``bench/fuzz.py`` runs
the same classes 10,000 cases each and also reports wall time per case.
"""

from __future__ import annotations

import random
import tempfile
from pathlib import Path

import pytest

pytest.importorskip("peft")
pytest.importorskip("transformers")
hypothesis = pytest.importorskip("hypothesis", reason="the fuzz suite needs hypothesis (the dev extra)")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from tests.fuzz.cases import CLASSES, make_case  # noqa: E402
from tests.fuzz.harness import check, run_binary  # noqa: E402

from tests.fuzz.seeds import Seeds, build_seeds  # noqa: E402

#: examples per class in CI (report draws six PNG plots per valid case, so it gets fewer).
EXAMPLES = {name: 25 for name in CLASSES} | {"report": 8, "train_config": 15}
MAX_PEAK_MB = 500

_SEEDS: Seeds | None = None


def _seeds() -> Seeds:
    global _SEEDS
    if _SEEDS is None:
        _SEEDS = build_seeds(Path(tempfile.mkdtemp(prefix="nora-fuzz-")) / "seeds")
    return _SEEDS


def _assert_holds(name: str, rng: random.Random) -> None:
    root = Path(tempfile.mkdtemp(prefix=f"fuzz-{name}-"))
    case = make_case(name, rng, _seeds(), root / "case")
    outcome, problems = check(case)
    assert not problems, f"{name}: {case.program} {' '.join(case.argv)}\n" + "\n".join(problems)
    if outcome.peak_mb is not None:
        assert outcome.peak_mb < MAX_PEAK_MB, f"{name}: peak {outcome.peak_mb:.0f} MB: {case.argv}"


def _fuzz_test(name: str):
    @settings(max_examples=EXAMPLES[name], deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    @given(rng=st.randoms(use_true_random=False))
    def test(rng: random.Random) -> None:
        _assert_holds(name, rng)

    test.__name__ = f"test_fuzz_{name}"
    test.__doc__ = f"Mutated inputs of class {name!r} keep the CLI's promise."
    return test


for _name in CLASSES:
    globals()[f"test_fuzz_{_name}"] = _fuzz_test(_name)


@pytest.mark.parametrize("name", ["safetensors_header", "adapter_config", "analysis_json", "baseline", "check_config"])
def test_a_sample_through_the_real_spectra_binary(name: str) -> None:
    """The in-process runs stand for the real console script: a few seeded cases run through it too."""
    for seed in range(2):
        root = Path(tempfile.mkdtemp(prefix=f"fuzz-bin-{name}-"))
        case = make_case(name, random.Random(f"binary-{name}-{seed}"), _seeds(), root / "case")
        _, problems = check(case, run=run_binary)
        assert not problems, f"{name}: spectra {' '.join(case.argv)}\n" + "\n".join(problems)
