"""Benchmark: ``spectra analyze`` against gradience on a Llama-2-7B-shaped PEFT adapter.

Generates, in a temporary directory, PEFT LoRA adapters with Llama-2-7B shapes (32 layers x q, k, v,
o: 4096x4096; gate, up: 4096 -> 11008; down: 11008 -> 4096; 224 pairs; bf16) at r=16 and r=64, then
runs, side by side in one process tree, each as a whole process:

    spectra analyze D --format json          (this project)
    gradience audit --peft-dir D --json      (gradience 0.11, a public peer on PyPI)

and prints wall time and peak RSS (from ``/usr/bin/time -v``-style accounting of each child) and the
ratios. It also prints the factored-vs-dense speed-up of the spectrum per module shape (ours: r x r
core from the factors; dense: ``np.linalg.svd`` of the formed float64 product) and an in-process
breakdown of where our time goes (imports, reading, spectrum, metrics).

gradience is looked up as ``--gradience CMD`` (default: ``/tmp/gradvenv/bin/gradience``, a separate
virtualenv so that it cannot change this project's environment). When it is missing, the published
reference numbers (1.7 s / 324 MB at r=16, 3.5 s / 570 MB at r=64, 2-core machine) are used instead.

Usage::

    .venv/bin/python bench/analyze_vs_gradience.py [--ranks 16 64] [--repeats 3] [--skip-dense]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

__all__ = ["main", "make_llama2_adapter", "run_measured"]

LAYERS = 32
#: module path inside a decoder layer -> (d_out, d_in)
SHAPES: dict[str, tuple[int, int]] = {
    "self_attn.q_proj": (4096, 4096),
    "self_attn.k_proj": (4096, 4096),
    "self_attn.v_proj": (4096, 4096),
    "self_attn.o_proj": (4096, 4096),
    "mlp.gate_proj": (11008, 4096),
    "mlp.up_proj": (11008, 4096),
    "mlp.down_proj": (4096, 11008),
}
#: gradience 0.11 on the reference 2-core machine: rank -> (wall s, peak RSS MB)
REFERENCE_GRADIENCE = {16: (1.7, 324.0), 64: (3.5, 570.0)}


def make_llama2_adapter(directory: Path, r: int, seed: int = 0) -> Path:
    """Write a PEFT LoRA adapter with Llama-2-7B shapes (bf16) into ``directory``.

    A is Kaiming-uniform-like (``U(-1/sqrt(d_in), 1/sqrt(d_in))``), as PEFT initialises it; B is what
    training leaves behind: small, with a decaying column spectrum (``B = G diag(exp(-i / (r/4)))``,
    ``G ~ N(0, 1e-3^2)``), so spectra are realistic rather than flat.
    """
    import torch
    from safetensors.torch import save_file

    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    decay = torch.exp(-torch.arange(r, dtype=torch.float32) / max(r / 4, 1.0))
    for layer in range(LAYERS):
        for name, (d_out, d_in) in SHAPES.items():
            prefix = f"base_model.model.model.layers.{layer}.{name}"
            bound = 1.0 / d_in**0.5
            a = (torch.rand(r, d_in, generator=gen) * 2 - 1) * bound
            b = torch.randn(d_out, r, generator=gen) * 1e-3 * decay
            tensors[f"{prefix}.lora_A.weight"] = a.to(torch.bfloat16)
            tensors[f"{prefix}.lora_B.weight"] = b.to(torch.bfloat16)
    directory.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(directory / "adapter_model.safetensors"), metadata={"format": "pt"})
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": "meta-llama/Llama-2-7b-hf",
        "r": r,
        "lora_alpha": 2 * r,
        "lora_dropout": 0.05,
        "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "rank_pattern": {},
        "alpha_pattern": {},
    }
    (directory / "adapter_config.json").write_text(json.dumps(config, indent=2))
    return directory


_TIMER = r"""
import os, resource, subprocess, sys, time, json
t0 = time.perf_counter()
proc = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
wall = time.perf_counter() - t0
usage = resource.getrusage(resource.RUSAGE_CHILDREN)
print(json.dumps({"wall": wall, "cpu": usage.ru_utime + usage.ru_stime, "rss_mb": usage.ru_maxrss / 1024,
                  "rc": proc.returncode, "err": proc.stderr.decode()[-500:]}))
"""


def run_measured(cmd: list[str], env: dict[str, str] | None = None) -> dict:
    """Run ``cmd`` as a whole process under a fresh timer process; return wall s, CPU s, peak RSS MB, rc.

    The timer is a new interpreter per run, so ``RUSAGE_CHILDREN`` holds exactly this command's peak
    resident set size (its largest descendant).
    """
    full_env = {**os.environ, **(env or {})}
    out = subprocess.run([sys.executable, "-c", _TIMER, *cmd], capture_output=True, text=True, check=True, env=full_env)
    return json.loads(out.stdout)


def _median_runs(cmd: list[str], repeats: int, env: dict[str, str] | None = None) -> dict:
    run_measured(cmd, env)  # warm the page cache and the interpreter's .pyc files
    runs = [run_measured(cmd, env) for _ in range(repeats)]
    if any(r["rc"] != 0 for r in runs):
        bad = next(r for r in runs if r["rc"] != 0)
        raise SystemExit(f"command failed (rc {bad['rc']}): {' '.join(cmd)}\n{bad['err']}")
    return {
        "wall": statistics.median(r["wall"] for r in runs),
        "cpu": statistics.median(r["cpu"] for r in runs),
        "rss_mb": statistics.median(r["rss_mb"] for r in runs),
        "walls": [round(r["wall"], 3) for r in runs],
    }


def _profile_ours(directory: Path) -> dict[str, float]:
    """In a fresh interpreter: seconds spent importing, reading factors, in the spectrum and the metrics."""
    code = r"""
import json, sys, time
t0 = time.perf_counter()
import numpy, scipy.linalg
from nora_spectra.io import load_checkpoint
from nora_spectra.spectrum import adapter_singular_values
from nora_spectra.metrics import spectrum_metrics
t1 = time.perf_counter()
ck = load_checkpoint(sys.argv[1])
t_read = t_spec = t_met = 0.0
it = ck.iter_layers()
while True:
    a = time.perf_counter()
    try:
        layer = next(it)
    except StopIteration:
        break
    b = time.perf_counter()
    s = adapter_singular_values(layer.update.A, layer.update.B, layer.update.scale)
    c = time.perf_counter()
    spectrum_metrics(s, rank=layer.rank, shape=layer.shape)
    d = time.perf_counter()
    t_read += b - a; t_spec += c - b; t_met += d - c
print(json.dumps({"imports": t1 - t0, "read+upcast": t_read, "spectrum": t_spec, "metrics": t_met}))
"""
    out = subprocess.run([sys.executable, "-c", code, str(directory)], capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


def _dense_vs_factored(ranks: list[int], skip_dense: bool) -> list[tuple[str, int, float, float | None, float | None]]:
    from nora_spectra.spectrum import adapter_singular_values

    rng = np.random.default_rng(0)
    rows = []
    for d_out, d_in in sorted(set(SHAPES.values())):
        for r in ranks:
            A = rng.uniform(-1, 1, (r, d_in)) / d_in**0.5
            B = rng.standard_normal((d_out, r)) * 1e-3
            reps = 5
            t0 = time.perf_counter()
            for _ in range(reps):
                fast = adapter_singular_values(A, B, 2.0)
            t_fast = (time.perf_counter() - t0) / reps
            t_dense = err = None
            if not skip_dense:
                t0 = time.perf_counter()
                dense = np.linalg.svd(2.0 * (B @ A), compute_uv=False)[:r]
                t_dense = time.perf_counter() - t0
                err = float(np.max(np.abs(fast - dense)) / dense[0])
            rows.append((f"{d_out}x{d_in}", r, t_fast, t_dense, err))
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ranks", type=int, nargs="+", default=[16, 64])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--gradience", default="/tmp/gradvenv/bin/gradience")
    parser.add_argument("--skip-dense", action="store_true", help="skip the (slow, ~10 s per shape) dense SVDs")
    parser.add_argument("--keep", action="store_true", help="keep the generated adapters")
    parser.add_argument("--single-thread-gradience", action="store_true",
                        help="also time gradience with OMP/MKL/OpenBLAS limited to one thread (torch's intra-op "
                             "threads spin badly on a busy machine)")
    args = parser.parse_args(argv)

    spectra = str(Path(sys.executable).with_name("spectra"))
    have_gradience = shutil.which(args.gradience) is not None
    if not have_gradience:
        print(f"gradience not found at {args.gradience}: comparing with the reference numbers", file=sys.stderr)
    workdir = Path(tempfile.mkdtemp(prefix="spectra-bench-"))
    print(f"machine: {os.cpu_count()} CPUs visible; python {sys.version.split()[0]}; numpy {np.__version__}; "
          f"load average at start {os.getloadavg()[0]:.1f}")
    results = []
    try:
        for r in args.ranks:
            directory = make_llama2_adapter(workdir / f"r{r}", r)
            size_mb = (directory / "adapter_model.safetensors").stat().st_size / 2**20
            ours = _median_runs([spectra, "analyze", str(directory), "--format", "json", "--quiet"], args.repeats)
            gradience_cmd = [args.gradience, "audit", "--peft-dir", str(directory), "--json"]
            if have_gradience:
                theirs = _median_runs(gradience_cmd, args.repeats)
                source = "measured"
                if args.single_thread_gradience:
                    one = {k: "1" for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")}
                    theirs["single_thread"] = _median_runs(gradience_cmd, args.repeats, one)
            else:
                wall, rss = REFERENCE_GRADIENCE.get(r, (float("nan"), float("nan")))
                theirs = {"wall": wall, "rss_mb": rss, "walls": []}
                source = "reference"
            profile = _profile_ours(directory)
            results.append((r, size_mb, ours, theirs, source, profile))
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
        else:
            print(f"adapters kept in {workdir}")

    print(f"\nwhole process, median of {args.repeats} runs after one warm-up (target: ratio <= 0.50); "
          f"load average now {os.getloadavg()[0]:.1f}")
    print(f"{'r':>3} {'file MB':>8} {'spectra s':>10} {'other s':>8} {'time ratio':>10} {'spectra cpu':>11} "
          f"{'other cpu':>9} {'spectra MB':>11} {'other MB':>9} {'RSS ratio':>9}  other")
    for r, size_mb, ours, theirs, source, _ in results:
        rows = [(theirs, f"gradience ({source})")]
        if "single_thread" in theirs:
            rows.append((theirs["single_thread"], "gradience, 1 thread (measured)"))
        if source == "measured" and r in REFERENCE_GRADIENCE:
            wall, rss = REFERENCE_GRADIENCE[r]
            rows.append(({"wall": wall, "rss_mb": rss}, "gradience (REFERENCE.md, idle 2-core machine)"))
        for other, label in rows:
            other_cpu = f"{other['cpu']:>9.2f}" if "cpu" in other else f"{'-':>9}"
            print(f"{r:>3} {size_mb:>8.0f} {ours['wall']:>10.2f} {other['wall']:>8.2f} "
                  f"{ours['wall'] / other['wall']:>10.2f} {ours['cpu']:>11.2f} {other_cpu} "
                  f"{ours['rss_mb']:>11.0f} {other['rss_mb']:>9.0f} {ours['rss_mb'] / other['rss_mb']:>9.2f}  {label}")
    print("\nwhere our time goes (one in-process run, seconds)")
    for r, _, _, _, _, profile in results:
        print(f"  r={r}: " + ", ".join(f"{k} {v:.3f}" for k, v in profile.items()))

    print("\nspectrum per module: factored (r x r core) vs dense np.linalg.svd of the formed float64 product")
    print(f"{'shape':>11} {'r':>3} {'factored ms':>12} {'dense s':>8} {'speed-up':>9} {'max rel diff':>13}")
    for shape, r, t_fast, t_dense, err in _dense_vs_factored(args.ranks, args.skip_dense):
        dense = f"{t_dense:>8.2f} {t_dense / t_fast:>8.0f}x {err:>13.1e}" if t_dense is not None else f"{'-':>8} {'-':>9} {'-':>13}"
        print(f"{shape:>11} {r:>3} {t_fast * 1e3:>12.2f} {dense}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
