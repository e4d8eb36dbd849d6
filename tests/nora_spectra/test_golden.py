"""``spectra analyze --format json`` is pinned: golden files written before the pipeline redesign.

Two checks per case, both against ``tests/nora_spectra/golden/<case>.json``:

* the text with every number replaced by ``#`` is identical byte for byte (keys, order, strings,
  warnings, nulls, indentation: everything but the digits);
* every number equals the pinned one up to last-digit float noise: integers exactly, floats to 1e-12
  relative, singular values to 1e-12 of the layer's largest one (an algorithm change inside the
  spectrum may move the last digits, nothing more).

The package version is masked too (it changes on release, not with behaviour).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from tests.nora_spectra.golden_fixtures import CASES, GOLDEN_DIR, analyze_json

_NUMBER = re.compile(r"-?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?")
_VERSION = re.compile(r'"nora_spectra_version": "[^"]*"')


def _masked(text: str) -> str:
    return _NUMBER.sub("#", _VERSION.sub('"nora_spectra_version": "#"', text))


def _close(got: object, want: object, where: str, scale: float | None = None) -> None:
    if isinstance(want, dict):
        assert isinstance(got, dict) and list(got) == list(want), where
        for key in want:
            _close(got[key], want[key], f"{where}.{key}", scale)
    elif isinstance(want, list):
        assert isinstance(got, list) and len(got) == len(want), where
        inner = max((abs(v) for v in want), default=0.0) if where.endswith("singular_values") else scale
        for i, (g, w) in enumerate(zip(got, want)):
            _close(g, w, f"{where}[{i}]", inner)
    elif isinstance(want, float) and not isinstance(want, bool):
        tol = 1e-12 * (scale if scale is not None else max(abs(want), 1e-300))
        assert isinstance(got, float) and abs(got - want) <= tol, f"{where}: {got!r} != {want!r}"
    else:
        assert got == want and type(got) is type(want), f"{where}: {got!r} != {want!r}"


@pytest.mark.parametrize("case", list(CASES))
def test_analyze_json_matches_golden(tmp_path: Path, case: str) -> None:
    text = analyze_json(tmp_path, case)
    golden = (GOLDEN_DIR / f"{case}.json").read_text()
    assert _masked(text) == _masked(golden)
    got, want = json.loads(text), json.loads(golden)
    want["nora_spectra_version"] = got["nora_spectra_version"]
    _close(got, want, case)
