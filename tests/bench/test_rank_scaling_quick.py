"""bench/rank_scaling.py --quick end to end in a subprocess: every method x rank, finite numbers, 1 <= ER <= r."""

import csv
import json
import math
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "bench" / "rank_scaling.py"
METHODS = ("lora", "rslora", "nora_silu", "nora_identity")


def test_quick_sweep_writes_every_method_and_rank(tmp_path):
    out = tmp_path / "rs"
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""), MPLBACKEND="Agg")
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--out", str(out)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    meta = json.loads((out / "results.json").read_text())
    ranks = meta["ranks"]
    assert ranks[0] == 4 and ranks[-1] == meta["config"]["n_embd"]
    with (out / "results.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert sorted((r["method"], int(r["rank"])) for r in rows) == sorted((m, r) for m in METHODS for r in ranks)
    for row in rows:
        r = int(row["rank"])
        assert math.isfinite(float(row["val_ppl"])) and float(row["val_ppl"]) > 1.0
        assert math.isfinite(float(row["answer_ppl"])) and float(row["answer_ppl"]) > 1.0
        for key in ("weight_erank", "activation_erank"):
            assert 1.0 <= float(row[key]) <= r + 1e-9, (row["method"], r, key, row[key])
        assert int(row["activation_tokens"]) > r
    table = (out / "results.md").read_text()
    assert all(f"| {m} |" in table for m in METHODS)
    assert "| nora_silu |" in proc.stdout  # the table is printed too
    for name in ("ppl_vs_rank.png", "erank_vs_rank_activation.png", "erank_vs_rank_weight.png", f"spectra_r{ranks[-1]}.png"):
        assert (out / name).stat().st_size > 1000, name
    # each adapter is a real checkpoint with its activation analysis next to it
    activation = json.loads((out / "adapters" / f"nora_silu-r{ranks[-1]}" / "activation.json").read_text())
    assert activation["space"] == "activation" and activation["layers"]
