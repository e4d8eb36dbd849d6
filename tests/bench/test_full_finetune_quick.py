"""bench/full_finetune.py at 1/16 scale end to end: both phases run and every randomized value is within its bound."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "bench" / "full_finetune.py"


def test_quick_bench_checks_the_bound(tmp_path):
    pytest.importorskip("torch")
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--scale", "16", "--top-k", "8", "--keep", str(tmp_path / "run")],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "randomized spectra within the stated bound: 7/7" in proc.stdout
    assert "dense / ours: wall" in proc.stdout and "NO" not in proc.stdout.split("phase")[0].split()
