"""CI job: nora-spectra installed WITHOUT torch reads safetensors checkpoints (issue 10, item 6).

Run with the interpreter of a virtual environment made by ``pip install .`` (no extras). It checks that
torch is absent, builds a PEFT LoRA checkpoint with ``safetensors.numpy``, and runs the real ``spectra``
binary: ``analyze --format json`` (numbers against a dense float64 SVD), ``check`` (a passing and a
failing gate), ``report`` (an HTML file), ``resize`` (its spectral error against a dense SVD),
``overlap``, ``scan`` (its worker processes import no torch either) and one torch-only feature (one
line, exit 2).
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file


def spectra(*args: str) -> subprocess.CompletedProcess:
    binary = Path(sys.executable).with_name("spectra")
    return subprocess.run([str(binary), *args], capture_output=True, text=True, timeout=120)


def main() -> None:
    assert importlib.util.find_spec("torch") is None, "torch is installed: this job must run without it"
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        ck = Path(tmp) / "adapter"
        ck.mkdir()
        tensors, deltas = {}, {}
        for layer in range(2):
            a, b = rng.standard_normal((4, 24)), rng.standard_normal((16, 4))
            key = f"base_model.model.layers.{layer}.q_proj"
            tensors[f"{key}.lora_A.weight"] = a.astype(np.float32)
            tensors[f"{key}.lora_B.weight"] = b.astype(np.float32)
            deltas[f"layers.{layer}.q_proj"] = 2.0 * b.astype(np.float32).astype(float) @ a.astype(np.float32).astype(float)
        save_file(tensors, str(ck / "adapter_model.safetensors"))
        (ck / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 8}))

        out = spectra("analyze", str(ck), "--format", "json", "-q")
        assert out.returncode == 0, out.stderr
        for rec in json.loads(out.stdout)["layers"]:
            want = np.linalg.svd(deltas[rec["module"]], compute_uv=False)[:4]
            assert np.allclose(rec["singular_values"], want, rtol=0, atol=1e-9 * want[0]), rec["module"]

        assert spectra("check", str(ck), "--min-utilization", "0.01", "-q").returncode == 0
        failing = spectra("check", str(ck), "--min-utilization", "1.0", "-q")
        assert failing.returncode == 1 and "below min_utilization" in failing.stdout, failing.stdout

        out = spectra("resize", str(ck), "-o", str(Path(tmp) / "small"), "--rank", "2", "--format", "json", "-q")
        assert out.returncode == 0, out.stderr
        for rec in json.loads(out.stdout)["modules"]:
            want = np.linalg.svd(deltas[rec["module"]], compute_uv=False)
            assert rec["rank_after"] == 2 and abs(rec["spectral_error"] - want[2]) <= 1e-9 * want[0], rec
        out = spectra("overlap", str(ck), str(Path(tmp) / "small"), "--format", "json", "-q")
        assert out.returncode == 0 and json.loads(out.stdout)["summary"]["compared"] == 2, out.stderr
        scan_dir = Path(tmp) / "scan"
        out = spectra("scan", str(ck), "-o", str(scan_dir), "--workers", "1", "-q")
        assert out.returncode == 0 and (scan_dir / "layers.parquet").is_file(), out.stderr

        report = Path(tmp) / "new" / "report.html"
        out = spectra("report", str(ck), "-o", str(report), "-q")
        assert out.returncode == 0 and report.read_text().startswith("<!DOCTYPE html>"), out.stderr

        out = spectra("demo", "--output-dir", str(Path(tmp) / "demo"))
        lines = out.stderr.strip().splitlines()
        assert out.returncode == 2 and len(lines) == 1 and "needs torch" in lines[0], out.stderr
    print("no-torch install: spectra analyze, check, report, resize, overlap and scan work; torch-only features say what to install")


if __name__ == "__main__":
    main()
