"""bench/rank_scaling.py --quick end to end in subprocesses: every method x rank x seed recorded, and a rerun
of one committed configuration reproduces it bit for bit (``--check``), while a changed record is caught."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "bench" / "rank_scaling.py"
METHODS = ("lora", "rslora", "nora_silu", "nora_identity")
ENV = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""), MPLBACKEND="Agg")


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=ROOT, env=ENV, capture_output=True, text=True,
                          timeout=600)


def test_quick_sweep_records_every_run_and_a_rerun_reproduces_it(tmp_path):
    out = tmp_path / "rs"
    proc = _run("--quick", "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert results["study"] == "rank_scaling"
    meta, runs = results["meta"], results["runs"]
    ranks, seeds = meta["config"]["rank_list"], meta["config"]["seeds"]
    assert ranks == [4, 16] and seeds == [0, 1]
    assert sorted((r["method"], r["rank"], r["seed"]) for r in runs) == sorted(
        (m, r, s) for m in METHODS for r in ranks for s in seeds
    )
    assert meta["machine"]["torch_threads"] == 1 and meta["machine"]["torch_interop_threads"] == 1
    assert len(meta["base"]["sha256"]) == 64
    for run in runs:
        assert math.isfinite(run["val_ppl"]) and run["val_ppl"] > 1.0
        for key in ("weight_erank", "activation_erank"):
            assert 1.0 <= run[key] <= run["rank"] + 1e-9, (run, key)
        assert run["activation_tokens"] > run["rank"]
    # one line per run was appended as it finished; the seeds differ
    log = (out / "runs.jsonl").read_text().splitlines()
    assert len(log) == 1 + len(runs)
    by_seed = {r["seed"]: r["val_ppl"] for r in runs if r["method"] == "lora" and r["rank"] == 4}
    assert by_seed[0] != by_seed[1]
    table = (out / "results.md").read_text()
    assert all(f"| {m} |" in table for m in METHODS) and " ± " in table
    assert "| nora_silu |" in proc.stdout
    for name in ("ppl_vs_rank.png", "erank_vs_rank_activation.png", "erank_vs_rank_weight.png", "spectra_r16.png"):
        assert (out / name).stat().st_size > 1000, name
    activation = json.loads((out / "adapters" / "nora_silu-r16-s1" / "activation.json").read_text())
    assert activation["space"] == "activation" and activation["layers"]

    # a fresh process, a fresh base: the committed numbers come back bit for bit
    check = _run("--check", str(out / "results.json"), "--methods", "nora_silu", "--ranks", "16", "--seeds", "1",
                 "--out", str(tmp_path / "check"))
    assert check.returncode == 0, check.stdout + check.stderr[-3000:]
    assert "REPRODUCED  nora_silu r=16 seed 1 (bit for bit)" in check.stdout
    assert "base model differs" not in check.stdout

    # a committed number that the code does not produce is caught at the printed precision
    for run in runs:
        if (run["method"], run["rank"], run["seed"]) == ("nora_silu", 16, 1):
            run["val_ppl"] += 0.002
    (tmp_path / "edited.json").write_text(json.dumps(results))
    check = _run("--check", str(tmp_path / "edited.json"), "--methods", "nora_silu", "--ranks", "16", "--seeds", "1",
                 "--out", str(tmp_path / "check"))
    assert check.returncode == 1
    assert "DIFFERS  nora_silu r=16 seed 1: val_ppl: committed" in check.stdout
