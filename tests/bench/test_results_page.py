"""docs/results.md is generated from the committed raw results, and its statistics and verdicts are right."""

import importlib.util
import json
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", ROOT / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[f"bench_{name}"] = module  # dataclasses look their module up while the class is built
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(ROOT / "bench"))
    return module


page = _load("results_page")


def test_the_committed_page_regenerates_byte_for_byte_from_the_committed_json():
    results = sorted((ROOT / "docs" / "results").glob("*.json"))
    assert {p.stem for p in results} >= {"rank_scaling", "encoder_rank_scaling"}
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "results_page.py"), "--check"], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    text = (ROOT / "docs" / "results.md").read_text()
    for path in results:  # every run of every file is on the page (in a mean), with its count of seeds
        data = json.loads(path.read_text())
        assert data["runs"] and f"docs/results/{path.stem}.json" in text


def test_mean_and_sample_standard_deviation():
    values = [11.3991, 11.5601, 11.3521]
    got = page.stat(values)
    assert got.mean == pytest.approx(statistics.fmean(values), abs=1e-15)
    assert got.sd == pytest.approx(statistics.stdev(values), abs=1e-15)
    assert page.stat([2.5]) == page.Stat(2.5, 0.0, 1)
    assert got.show("val_ppl") == f"{statistics.fmean(values):.3f} ± {statistics.stdev(values):.3f}"


def test_a_difference_within_the_spread_is_a_tie():
    a, b = page.Stat(8.02, 0.02, 3), page.Stat(8.05, 0.02, 3)
    assert page.compare(a, b) == (pytest.approx(-0.03), False)
    assert "a tie" in page.verdict("val_ppl", "A", a, "B", b, lower_is_better=True)
    c = page.Stat(7.90, 0.02, 3)
    assert page.compare(c, b)[1]
    assert "A is better by 0.150" in page.verdict("val_ppl", "A", c, "B", b, lower_is_better=True)
    assert "B is better" in page.verdict("val_top1", "A", c, "B", b, lower_is_better=False)


def _runs(values: dict) -> list[dict]:
    runs = []
    for (method, rank), (ppl, er) in values.items():
        for seed, noise in enumerate((-0.01, 0.0, 0.01)):
            runs.append({"method": method, "rank": rank, "seed": seed, "scale": 1.0, "val_ppl": ppl + noise,
                         "activation_erank": er + noise})
    return runs


def test_claims_are_computed_from_the_runs():
    values = {
        ("lora", 4): (10.0, 2.0), ("lora", 64): (10.005, 2.01),          # flat: saturated, ER plateau
        ("rslora", 4): (9.0, 2.5), ("rslora", 64): (8.0, 4.0),
        ("nora_silu", 4): (11.0, 2.0), ("nora_silu", 64): (7.0, 8.0),    # beats LoRA's best at 64 only
        ("nora_identity", 4): (11.0, 2.0), ("nora_identity", 64): (8.5, 5.0),
    }
    c = page.claims({"study": "rank_scaling", "meta": {"config": {"steps": 1}, "base": {"val_ppl": 25.0}},
                     "runs": _runs(values)})
    assert c["lora_saturates"] and c["best_lora"] == 4
    assert c["nora_beats"] == [64] and c["nora_matches"] == [64]
    # the control recovers (10 - 8.5) / (10.005 - 7) of NoRA's gain at r = 64; at r = 4 there is no gain
    assert set(c["recovered"]) == {64}
    assert c["recovered"][64] == pytest.approx((10.005 - 8.5) / (10.005 - 7.0))
    assert c["er_ratio"] == pytest.approx(8.0 / 2.01)
    assert c["er_gap_recovered"] == pytest.approx((5.0 - 2.01) / (8.0 - 2.01))
    assert c["silu_vs_identity"][4][1] is False and c["silu_vs_identity"][64][1] is True
    bullets = "\n".join(page._bullets(c))
    assert "LoRA (s = alpha/r) saturates: holds" in bullets
    assert "The gain comes from the non-linearity: holds only in part" in bullets
    assert "recovers 50 % at r = 64" in bullets
    assert "Every adapter helps.** Without an adapter the val PPL is 25.000; the 8 configurations reach 7.000 to 11.000" in bullets
    assert c["others_improve"] == ["rslora", "nora_silu", "nora_identity"] and page._verdict_word(c, "saturates") == "holds"
