"""Benchmark: ``spectra resize --energy 0.9`` against ``spectra analyze`` on a Llama-2-7B-shaped adapter.

Generates, in a temporary directory, the PEFT LoRA adapter of ``bench/analyze_vs_gradience.py`` (224
pairs: 32 layers x q, k, v, o, gate, up, down; bf16; r = 64 by default; B with a decaying column
spectrum), then runs, side by side and alternating, each as a whole process:

    spectra analyze D --format json
    spectra resize D -o OUT --energy 0.9 --format json

and prints the median wall time and peak RSS of each, their ratio, the output's size and the two targets
of issue 16: resize under 1.5x the time of analyze, and peak memory under 2x the output file plus the
analyze footprint. The load average is printed before and after: other jobs share the machine, so
compare numbers within one run only. An in-process breakdown of resize's time follows.

Usage::

    .venv/bin/python bench/resize.py [--rank 64] [--energy 0.9] [--repeats 3]
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

sys.path.insert(0, str(Path(__file__).resolve().parent))
from analyze_vs_gradience import make_llama2_adapter, run_measured  # noqa: E402

__all__ = ["main"]


def _spectra() -> str:
    return str(Path(sys.executable).with_name("spectra"))


def _profile_resize(directory: Path, output: Path, energy: float) -> dict[str, float]:
    """In a fresh interpreter, resize's own steps timed one by one (seconds, summed over modules)."""
    code = r"""
import json, os, shutil, sys, time
t0 = time.perf_counter()
from nora_spectra.io import load_checkpoint
from nora_spectra.io.registry import get_format
from nora_spectra.io.writing import ResizedModule
from nora_spectra.outputs import output_directory
from nora_spectra.rank_policy import make_policy
from nora_spectra.spectrum import spectrum
from nora_spectra.subspaces import factor_bases
t1 = time.perf_counter()
ck = load_checkpoint(sys.argv[1])
policy = make_policy(energy=float(sys.argv[3]))
sink = get_format(ck.format).resize.open(ck, None)
times = dict.fromkeys(["read+upcast", "bases (Gram, Cholesky)", "spectrum of core+policy", "truncated factors",
                       "encode (sink.add)"], 0.0)
for entry in ck.entries:
    a = time.perf_counter(); update = entry.read()
    b = time.perf_counter(); bases = factor_bases(update.A, update.B, update.scale)
    c = time.perf_counter(); sigma = spectrum(bases.core).values; k = policy.choose(sigma, shape=entry.shape, rank=entry.rank)
    d = time.perf_counter(); factors = bases.truncated_factors(k) if k < entry.rank else (None, None)
    e = time.perf_counter(); sink.add(ResizedModule(entry.module, k, *factors))
    f = time.perf_counter()
    for key, dt in zip(times, (b - a, c - b, d - c, e - d, f - e)):
        times[key] += dt
shutil.rmtree(sys.argv[2], ignore_errors=True)
g = time.perf_counter()
with output_directory(sys.argv[2]) as tmp:
    sink.write(tmp)
times["write (copy, fsync, rename)"] = time.perf_counter() - g
times = {"imports": t1 - t0, **times}
print(json.dumps(times))
"""
    out = subprocess.run([sys.executable, "-c", code, str(directory), str(output), str(energy)],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rank", type=int, default=64)
    parser.add_argument("--energy", type=float, default=0.9)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--keep", action="store_true", help="keep the generated adapter")
    args = parser.parse_args(argv)

    root = Path(tempfile.mkdtemp(prefix="spectra-bench-resize-"))
    try:
        adapter = make_llama2_adapter(root / f"r{args.rank}", args.rank)
        output = root / "resized"
        size_in = (adapter / "adapter_model.safetensors").stat().st_size
        analyze_cmd = [_spectra(), "analyze", str(adapter), "--format", "json", "-q"]
        resize_cmd = [_spectra(), "resize", str(adapter), "-o", str(output), "--energy", str(args.energy), "--format",
                      "json", "-q"]
        print(f"adapter: 224 modules, Llama-2-7B shapes, r={args.rank}, bf16, {size_in / 2**20:.0f} MiB")
        print(f"load average before: {' '.join(f'{x:.2f}' for x in os.getloadavg())} ({os.cpu_count()} CPUs)")
        runs: dict[str, list[dict]] = {"analyze": [], "resize": []}
        for name, cmd in (("analyze", analyze_cmd), ("resize", resize_cmd)):  # warm the page cache and .pyc files
            shutil.rmtree(output, ignore_errors=True)
            run_measured(cmd)
        for _ in range(args.repeats):
            runs["analyze"].append(run_measured(analyze_cmd))
            shutil.rmtree(output, ignore_errors=True)
            runs["resize"].append(run_measured(resize_cmd))
        for name, items in runs.items():
            bad = [r for r in items if r["rc"] != 0]
            if bad:
                raise SystemExit(f"{name} failed (rc {bad[0]['rc']}): {bad[0]['err']}")
        print(f"load average after:  {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
        med = {name: {key: statistics.median(r[key] for r in items) for key in ("wall", "cpu", "rss_mb")}
               for name, items in runs.items()}
        size_out = (output / "adapter_model.safetensors").stat().st_size
        report = json.loads(subprocess.run(resize_cmd[:-1] + ["--dry-run"], capture_output=True, text=True,
                                           check=True).stdout)
        summary = report["summary"]
        print(f"resized: rank {summary['rank_before']} -> {summary['rank_after']}, energy kept "
              f"{summary['energy_kept']:.4f}, output {size_out / 2**20:.1f} MiB")
        print()
        print(f"{'command':<10}{'wall s (median)':>17}{'cpu s':>9}{'peak RSS MB':>13}   walls")
        for name, items in runs.items():
            m = med[name]
            walls = ", ".join(f"{r['wall']:.2f}" for r in items)
            print(f"{name:<10}{m['wall']:>17.2f}{m['cpu']:>9.2f}{m['rss_mb']:>13.0f}   {walls}")
        ratio = med["resize"]["wall"] / med["analyze"]["wall"]
        budget = 2 * size_out / 2**20 + med["analyze"]["rss_mb"]
        print()
        print(f"time: resize / analyze = {ratio:.2f} (target < 1.5): {'met' if ratio < 1.5 else 'NOT met'}")
        print(f"memory: resize peak {med['resize']['rss_mb']:.0f} MB vs 2 x output ({2 * size_out / 2**20:.0f} MB) "
              f"+ analyze peak ({med['analyze']['rss_mb']:.0f} MB) = {budget:.0f} MB: "
              f"{'met' if med['resize']['rss_mb'] < budget else 'NOT met'}")
        print()
        print("where resize's time goes (one in-process run, seconds):")
        for key, value in _profile_resize(adapter, output, args.energy).items():
            print(f"  {key:<30}{value:8.3f}")
    finally:
        if args.keep:
            print(f"kept {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
