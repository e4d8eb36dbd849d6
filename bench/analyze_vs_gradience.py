"""Benchmark: ``spectra analyze`` against gradience and the read-only floor, on well- and ill-conditioned adapters.

Generates, in a temporary directory, PEFT LoRA adapters with Llama-2-7B shapes (32 layers x q, k, v,
o: 4096x4096; gate, up: 4096 -> 11008; down: 11008 -> 4096; 224 pairs; bf16) at r = 16, 64 and 256,
of these kinds (``--kinds``; each module's factors drawn afresh from a seeded generator):

=================  ================================================================================
``well``           A Kaiming-uniform-like (``U(+-1/sqrt(d_in))``), B small with columns decaying to
                   1/50 of the first (``N(0, 1e-3^2) exp(-i / (r/4))``): what training leaves
``a-rows-1e-14``   rows of A decaying geometrically to 1e-14 of the first; B ``N(0, 1e-3^2)``
``b-cols-1e-14``   columns of B decaying geometrically to 1e-14 of the first; A as in ``well``
``a-rows-exp``     rows of A decaying as ``exp(-i / (2 + layer % 8))`` (issue 13's collapsed-like adapter)
``rank-deficient`` the second half of A's rows exactly zero (rank r/2); B ``N(0, 1e-3^2)``
``half-trained``   A as initialised; B small and nearly rank-one: ``1e-4 (u v^T + 1e-3 G)``
=================  ================================================================================

The first is well-conditioned; the others are the ill-conditioned factors a collapsed or barely
trained adapter has (a plain Gram/Cholesky spectrum needs a Householder fallback on all of them).
For each adapter it runs, side by side in rounds (one run of each per round, in this order, after one
warm-up run of each), each as a whole process under a fresh timer process:

    spectra analyze D --format json --quiet          (this project)
    gradience audit --peft-dir D --json              (gradience 0.11, a public peer on PyPI)
    floor: python -c "import numpy, safetensors, ml_dtypes; read and upcast every tensor to float64"
    spectra analyze D ... while one CPU-bound process competes (the bench starts it, then kills it)

and prints, per adapter, the median wall time and peak RSS of each and every ratio, each the median of
the per-round ratios (robust to a machine whose load drifts): ours / gradience (time and peak RSS),
ours / floor, and ours under one competing process / ours idle. The goals (issue 13) are printed beside
them: time ratio to gradience <= 0.15 (r=16) and <= 0.2 (r=64), peak RSS <= 0.15x gradience, ratio
to the floor <= 2 (r=16) and <= 4 (r=64), slowdown under one competing process <= 1.6. Then, for
each adapter, an in-process breakdown of our time (imports, reading and upcasting, spectrum, metrics)
and how many modules took each route of :mod:`nora_spectra.spectrum` (1: Gram route; 2: Gram route
kept by its first-order error bounds; 3: Householder QR of an ill-conditioned factor); and, unless
``--skip-dense``, the factored-vs-dense speed-up of the spectrum per module shape.

gradience is looked up as ``--gradience CMD`` (default: ``/tmp/gradvenv/bin/gradience``, a separate
virtualenv so that it cannot change this project's environment: ``python3 -m venv /tmp/gradvenv &&
/tmp/gradvenv/bin/pip install torch==2.13.0 && /tmp/gradvenv/bin/pip install gradience==0.11.0``).
When it is missing, only our numbers and the floor are printed. The floor needs ``ml_dtypes`` in this
environment (a dependency of nora-spectra). Absolute times on a shared machine are noisy: read the ratios, and
the load average printed at the start and the end.

Usage::

    .venv/bin/python bench/analyze_vs_gradience.py [--ranks 16 64 256] [--kinds well half-trained ...]
        [--repeats 3] [--skip-dense] [--no-load] [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np

__all__ = ["KINDS", "compile_bytecode", "main", "make_llama2_adapter", "run_measured"]

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
#: issue 13's goals: rank -> (max time ratio to gradience, max time ratio to the floor)
GOALS = {16: (0.15, 2.0), 64: (0.2, 4.0)}
GOAL_RSS = 0.15
GOAL_SLOWDOWN = 1.6

Factors = Callable[[np.random.Generator, int, int, int, int], tuple[np.ndarray, np.ndarray]]


def _a_init(rng: np.random.Generator, r: int, d_in: int) -> np.ndarray:
    bound = 1.0 / math.sqrt(d_in)
    return rng.uniform(-bound, bound, (r, d_in)).astype(np.float32)


def _b_small(rng: np.random.Generator, d_out: int, r: int) -> np.ndarray:
    return (rng.standard_normal((d_out, r), dtype=np.float32) * np.float32(1e-3)).astype(np.float32)


def _well(rng, layer, r, d_out, d_in):
    decay = np.exp(-np.arange(r) / max(r / 4, 1.0)).astype(np.float32)
    return _a_init(rng, r, d_in), _b_small(rng, d_out, r) * decay


def _a_rows_1e14(rng, layer, r, d_out, d_in):
    decay = np.geomspace(1.0, 1e-14, r).astype(np.float32)
    return _a_init(rng, r, d_in) * decay[:, None], _b_small(rng, d_out, r)


def _b_cols_1e14(rng, layer, r, d_out, d_in):
    decay = np.geomspace(1.0, 1e-14, r).astype(np.float32)
    return _a_init(rng, r, d_in), _b_small(rng, d_out, r) * decay


def _a_rows_exp(rng, layer, r, d_out, d_in):
    decay = np.exp(-np.arange(r) / (2 + layer % 8)).astype(np.float32)
    return _a_init(rng, r, d_in) * decay[:, None], _b_small(rng, d_out, r)


def _rank_deficient(rng, layer, r, d_out, d_in):
    a = _a_init(rng, r, d_in)
    a[r // 2 :] = 0.0
    return a, _b_small(rng, d_out, r)


def _half_trained(rng, layer, r, d_out, d_in):
    u = rng.standard_normal((d_out, 1), dtype=np.float32)
    v = rng.standard_normal((1, r), dtype=np.float32)
    noise = rng.standard_normal((d_out, r), dtype=np.float32)
    return _a_init(rng, r, d_in), (np.float32(1e-4) * (u @ v + np.float32(1e-3) * noise)).astype(np.float32)


#: adapter kind -> factor generator ``(rng, layer, r, d_out, d_in) -> (A, B)`` (float32, rounded to bf16 on write)
KINDS: dict[str, Factors] = {
    "well": _well,
    "a-rows-1e-14": _a_rows_1e14,
    "b-cols-1e-14": _b_cols_1e14,
    "a-rows-exp": _a_rows_exp,
    "rank-deficient": _rank_deficient,
    "half-trained": _half_trained,
}


def _bf16_bits(values: np.ndarray) -> np.ndarray:
    """Round finite float32 values to bfloat16 (nearest, ties to even); the raw uint16 bits."""
    bits = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32)
    return ((bits + np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16)).astype("<u2")


def make_llama2_adapter(directory: Path, r: int, kind: str = "well", seed: int = 0) -> Path:
    """Write a PEFT LoRA adapter with Llama-2-7B shapes (bf16, ``alpha = 2r``) of ``kind`` into ``directory``.

    The safetensors file is streamed module by module (memory stays near one module, even at r=256).
    """
    make = KINDS[kind]
    rng = np.random.default_rng(seed)
    names = []
    for layer in range(LAYERS):
        for name, (d_out, d_in) in SHAPES.items():
            prefix = f"base_model.model.model.layers.{layer}.{name}"
            names += [(f"{prefix}.lora_A.weight", (r, d_in)), (f"{prefix}.lora_B.weight", (d_out, r))]
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for key, shape in names:
        size = 2 * shape[0] * shape[1]
        header[key] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / "adapter_model.safetensors", "wb") as out:
        out.write(len(text).to_bytes(8, "little") + text)
        for layer in range(LAYERS):
            for d_out, d_in in SHAPES.values():
                a, b = make(rng, layer, r, d_out, d_in)
                out.write(_bf16_bits(a).tobytes())
                out.write(_bf16_bits(b).tobytes())
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

#: the read-only floor: the cheapest whole process that reads every tensor and upcasts it to float64
_FLOOR = r"""
import sys
import numpy as np, ml_dtypes, safetensors
from safetensors import safe_open
with safe_open(sys.argv[1], framework="np") as f:
    for key in f.keys():
        f.get_tensor(key).astype(np.float64)
"""

_SPIN = "while True: pass"


def run_measured(cmd: list[str], env: dict[str, str] | None = None) -> dict:
    """Run ``cmd`` as a whole process under a fresh timer process; return wall s, CPU s, peak RSS MB, rc.

    The timer is a new interpreter per run, so ``RUSAGE_CHILDREN`` holds exactly this command's peak
    resident set size (its largest descendant).
    """
    full_env = {**os.environ, **(env or {})}
    out = subprocess.run([sys.executable, "-c", _TIMER, *cmd], capture_output=True, text=True, check=True, env=full_env)
    result = json.loads(out.stdout)
    if result["rc"] != 0:
        raise SystemExit(f"command failed (rc {result['rc']}): {' '.join(cmd)}\n{result['err']}")
    return result


def run_loaded(cmd: list[str]) -> dict:
    """:func:`run_measured` while one CPU-bound process (a Python busy loop) competes for the cores."""
    spinner = subprocess.Popen([sys.executable, "-c", _SPIN])
    try:
        time.sleep(0.3)  # let it reach its loop
        return run_measured(cmd)
    finally:
        spinner.kill()
        spinner.wait()


def _rounds(commands: dict[str, Callable[[], dict]], repeats: int) -> dict[str, list[dict]]:
    """One warm-up run of each command, then ``repeats`` rounds running each once, in order."""
    for run in commands.values():
        run()  # page cache, .pyc files
    runs: dict[str, list[dict]] = {name: [] for name in commands}
    for _ in range(repeats):
        for name, run in commands.items():
            runs[name].append(run())
    return runs


def _median(runs: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in runs)


def _ratio(runs: dict[str, list[dict]], top: str, bottom: str, key: str = "wall") -> float | None:
    """Median over rounds of ``top / bottom`` (paired within each round)."""
    if top not in runs or bottom not in runs:
        return None
    return statistics.median(a[key] / b[key] for a, b in zip(runs[top], runs[bottom]))


_PROFILE = r"""
import json, sys, time
t0 = time.perf_counter()
import numpy
import nora_spectra.spectrum as S
from nora_spectra.io import load_checkpoint
from nora_spectra.metrics import spectrum_metrics
S.lapack_routines()
t1 = time.perf_counter()
routes = {"1": 0, "2": 0, "3": 0}
first_order, householder = S._first_order_values, S._Side.householder_r
def counted_first_order(*args):
    values = first_order(*args)
    routes["2"] += values is not None
    return values
def counted_householder(self):
    counted_householder.calls += 1
    return householder(self)
counted_householder.calls = 0
S._first_order_values = counted_first_order
S._Side.householder_r = counted_householder
ck = load_checkpoint(sys.argv[1])
t_read = t_spec = t_met = 0.0
it = ck.iter_layers()
with S.blas_threads(1):
    while True:
        a = time.perf_counter()
        try:
            layer = next(it)
        except StopIteration:
            break
        b = time.perf_counter()
        before = (routes["2"], counted_householder.calls)
        s = S.adapter_singular_values(layer.update.A, layer.update.B, layer.update.scale)
        c = time.perf_counter()
        if counted_householder.calls > before[1]:
            routes["3"] += 1
        elif routes["2"] == before[0]:
            routes["1"] += 1
        spectrum_metrics(s, rank=layer.rank, shape=layer.shape)
        d = time.perf_counter()
        t_read += b - a; t_spec += c - b; t_met += d - c
print(json.dumps({"imports": t1 - t0, "read+upcast": t_read, "spectrum": t_spec, "metrics": t_met, "routes": routes}))
"""


def _profile_ours(directory: Path) -> dict:
    """In a fresh interpreter, one thread: seconds spent importing, reading, in the spectrum and the metrics."""
    out = subprocess.run([sys.executable, "-c", _PROFILE, str(directory)], capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


def _dense_vs_factored(ranks: list[int]) -> list[tuple[str, int, float, float, float]]:
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
            t0 = time.perf_counter()
            dense = np.linalg.svd(2.0 * (B @ A), compute_uv=False)[:r]
            t_dense = time.perf_counter() - t0
            err = float(np.max(np.abs(fast - dense)) / dense[0])
            rows.append((f"{d_out}x{d_in}", r, t_fast, t_dense, err))
    return rows


def _flag(value: float | None, goal: float | None) -> str:
    if value is None:
        return f"{'-':>7}"
    mark = "" if goal is None else (" ok" if value <= goal else " NO")
    return f"{value:>5.2f}{mark:<3}"


def compile_bytecode() -> None:
    """Write the bytecode of nora_core and nora_spectra, as ``pip install`` does for gradience.

    An editable install under ``PYTHONDONTWRITEBYTECODE=1`` (set on some machines, this one among them)
    never caches bytecode, so every ``spectra`` process would compile ~90 modules first (~70 ms): a
    start-up that no installed copy pays.
    """
    root = Path(__file__).resolve().parent.parent
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    subprocess.run([sys.executable, "-m", "compileall", "-q", str(root / "nora_core"), str(root / "nora_spectra")],
                   check=True, env=env, stdout=subprocess.DEVNULL)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ranks", type=int, nargs="+", default=[16, 64, 256])
    parser.add_argument("--kinds", nargs="+", default=list(KINDS), choices=list(KINDS))
    parser.add_argument("--repeats", type=int, default=3, help="rounds per adapter (medians of this many runs)")
    parser.add_argument("--gradience", default="/tmp/gradvenv/bin/gradience")
    parser.add_argument("--no-load", action="store_true", help="skip the runs beside a competing CPU-bound process")
    parser.add_argument("--skip-dense", action="store_true", help="skip the (slow, ~10 s per shape) dense SVDs")
    parser.add_argument("--keep", metavar="DIR", help="write the adapters into DIR and keep them (reused when present)")
    args = parser.parse_args(argv)

    spectra = str(Path(sys.executable).with_name("spectra"))
    compile_bytecode()
    have_gradience = shutil.which(args.gradience) is not None
    try:
        import ml_dtypes  # noqa: F401

        have_floor = True
    except ImportError:
        have_floor = False
        print("ml_dtypes is not installed here: no read-only floor (pip install ml_dtypes)", file=sys.stderr)
    if not have_gradience:
        print(f"gradience not found at {args.gradience}: no comparison with it", file=sys.stderr)
    workdir = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="spectra-bench-"))
    load_start = os.getloadavg()
    print(f"machine: {os.cpu_count()} CPUs visible; python {sys.version.split()[0]}; numpy {np.__version__}; "
          f"load average at start {load_start[0]:.2f} {load_start[1]:.2f} {load_start[2]:.2f}", flush=True)
    results = []
    try:
        for r in args.ranks:
            for kind in args.kinds:
                directory = workdir / f"{kind}-r{r}"
                if not (directory / "adapter_model.safetensors").is_file():
                    make_llama2_adapter(directory, r, kind)
                weights = directory / "adapter_model.safetensors"
                ours_cmd = [spectra, "analyze", str(directory), "--format", "json", "--quiet"]
                commands: dict[str, Callable[[], dict]] = {"ours": lambda c=ours_cmd: run_measured(c)}
                if have_gradience:
                    grad_cmd = [args.gradience, "audit", "--peft-dir", str(directory), "--json"]
                    commands["gradience"] = lambda c=grad_cmd: run_measured(c)
                if have_floor:
                    commands["floor"] = lambda w=weights: run_measured([sys.executable, "-c", _FLOOR, str(w)])
                if not args.no_load:
                    commands["ours_loaded"] = lambda c=ours_cmd: run_loaded(c)
                runs = _rounds(commands, args.repeats)
                profile = _profile_ours(directory)
                results.append((r, kind, weights.stat().st_size / 2**20, runs, profile))
                _print_row(r, kind, results[-1][2], runs, header=len(results) == 1)
                if not args.keep:
                    shutil.rmtree(directory, ignore_errors=True)
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)

    load_end = os.getloadavg()
    print(f"\nwhole processes, medians of {args.repeats} rounds after one warm-up (ratios: medians of the per-round "
          f"ratios); load average at the end {load_end[0]:.2f} {load_end[1]:.2f} {load_end[2]:.2f}")
    for i, (r, kind, size_mb, runs, _) in enumerate(results):
        _print_row(r, kind, size_mb, runs, header=i == 0)
    print(f"\ngoals (issue 13): ours/gradience time <= {GOALS[16][0]} (r=16), <= {GOALS[64][0]} (r=64); peak RSS "
          f"<= {GOAL_RSS}x gradience; ours/floor <= {GOALS[16][1]} (r=16), <= {GOALS[64][1]} (r=64); one competing "
          f"process slows ours by <= {GOAL_SLOWDOWN}x. 'ok'/'NO' mark each ratio against its goal.")

    print("\nwhere our time goes (one in-process run, one thread, seconds) and the spectrum's route per module "
          "(1 Gram, 2 Gram checked by its error bounds, 3 Householder QR)")
    for r, kind, _, _, profile in results:
        routes = profile.pop("routes")
        print(f"  r={r:<3} {kind:<15} " + ", ".join(f"{k} {v:.3f}" for k, v in profile.items())
              + f"; routes 1: {routes['1']}, 2: {routes['2']}, 3: {routes['3']}")

    if not args.skip_dense:
        print("\nspectrum per module: factored (r x r core) vs dense np.linalg.svd of the formed float64 product")
        print(f"{'shape':>11} {'r':>3} {'factored ms':>12} {'dense s':>8} {'speed-up':>9} {'max rel diff':>13}")
        for shape, r, t_fast, t_dense, err in _dense_vs_factored([r for r in args.ranks if r <= 64]):
            print(f"{shape:>11} {r:>3} {t_fast * 1e3:>12.2f} {t_dense:>8.2f} {t_dense / t_fast:>8.0f}x {err:>13.1e}")
    return 0


def _print_row(r: int, kind: str, size_mb: float, runs: dict[str, list[dict]], *, header: bool) -> None:
    if header:
        print(f"\n{'r':>3} {'adapter':<15} {'MB':>5} | {'ours s':>6} {'grad s':>6} {'floor s':>7} {'loaded s':>8} | "
              f"{'/grad':>7} {'/floor':>7} {'slowdn':>7} | {'ours MB':>7} {'grad MB':>7} {'RSS/grad':>8}")
    goal_grad, goal_floor = GOALS.get(r, (None, None))
    med = {name: _median(rs, "wall") for name, rs in runs.items()}
    rss = {name: _median(rs, "rss_mb") for name, rs in runs.items()}

    def cell(name: str, width: int, values: dict[str, float], fmt: str) -> str:
        return f"{values[name]:>{width}{fmt}}" if name in values else f"{'-':>{width}}"

    print(f"{r:>3} {kind:<15} {size_mb:>5.0f} | {cell('ours', 6, med, '.2f')} {cell('gradience', 6, med, '.2f')} "
          f"{cell('floor', 7, med, '.2f')} {cell('ours_loaded', 8, med, '.2f')} | "
          f"{_flag(_ratio(runs, 'ours', 'gradience'), goal_grad)} {_flag(_ratio(runs, 'ours', 'floor'), goal_floor)} "
          f"{_flag(_ratio(runs, 'ours_loaded', 'ours'), GOAL_SLOWDOWN)} | {cell('ours', 7, rss, '.0f')} "
          f"{cell('gradience', 7, rss, '.0f')} {_flag(_ratio(runs, 'ours', 'gradience', 'rss_mb'), GOAL_RSS):>8}",
          flush=True)


if __name__ == "__main__":
    sys.exit(main())
