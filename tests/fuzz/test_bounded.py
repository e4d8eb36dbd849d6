"""Tiny files with absurd but legal shapes: the work they cause is bounded (issue 12, item 2).

Each runs through the CLI like a fuzz case and must keep its property and stay under 500 MB of peak
memory (wall time is reported by bench/fuzz.py, never asserted in CI).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from tests.fuzz.harness import Case, check
from tests.nora_spectra.io_builders import write_numpy

MAX_PEAK_MB = 500


def _bare(path: Path, r: int, d_in: int, d_out: int, dtype=np.float16) -> Path:
    rng = np.random.default_rng(0)
    return write_numpy(path, {
        "base_model.model.m.lora_A.weight": rng.standard_normal((r, d_in)).astype(dtype),
        "base_model.model.m.lora_B.weight": rng.standard_normal((d_out, r)).astype(dtype),
    })


def _holds(case: Case) -> dict:
    outcome, problems = check(case)
    assert not problems, "\n".join(problems)
    assert outcome.code == 0, outcome.stderr
    if outcome.peak_mb is not None:
        assert outcome.peak_mb < MAX_PEAK_MB, f"peak {outcome.peak_mb:.0f} MB"
    import json

    return json.loads(outcome.stdout)


def test_a_24_kb_file_with_rank_6000_under_the_probe(tmp_path: Path) -> None:
    """r = 6000 over 1 x 1 factors (24 KB in float16): the probe reduces 1-wide output rows, not 6000-wide
    hidden rows (it took 7-20 s and a 6000 x 6000 triangle before)."""
    path = _bare(tmp_path / "wide.safetensors", 6000, 1, 1)
    assert path.stat().st_size < 25_000
    case = Case("spectra", ["analyze", str(path), "--space", "probe", "--format", "json"], [path], json_stdout=True,
                cwd=tmp_path)
    record = _holds(case)["layers"][0]
    assert record["rank"] == 6000 and len(record["singular_values"]) == 1 and record["status"] == "ok"


def test_an_80_kb_file_with_rank_20000_in_weight_space(tmp_path: Path) -> None:
    """lora_A [20000, 1] and lora_B [1, 20000]: the update has rank 1, so its spectrum must cost O(r)."""
    path = _bare(tmp_path / "wide.safetensors", 20000, 1, 1, dtype=np.float16)
    case = Case("spectra", ["analyze", str(path), "--format", "json"], [path], json_stdout=True, cwd=tmp_path)
    record = _holds(case)["layers"][0]
    assert record["rank"] == 20000 and len(record["singular_values"]) == 1
