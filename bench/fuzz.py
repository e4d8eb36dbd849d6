"""The long fuzz run: 10,000 seeded cases of every class of tests/fuzz/cases.py, with time and memory.

Usage::

    python bench/fuzz.py                      # 10,000 cases per class, 2 worker processes
    python bench/fuzz.py --cases 500 --classes report,baseline --jobs 1 --json fuzz.json

Every case is checked against the property of tests/fuzz/harness.py (exit 0/1 with valid output, or exit 2
with one line naming an input file; no traceback; no input modified; no partial output) and against the
limits: under 2 s of wall time and under 500 MB of peak memory (the resident-set high-water mark, reset
before each case). Cases run in-process through the CLI's ``main`` (fast); every ``--binary-every``-th case
also runs through the real console script. ``spectra report`` draws six PNG plots per valid case (about
0.5-2 s of matplotlib): the report class draws them in one case of ``--figures-every`` and skips the
drawing in the others (the report is still built, rendered and written). Case ``i`` of class ``c`` is
seeded ``random.Random(f"{c}-{i}")``: a failure printed here is reproduced with ``--start i --cases 1``.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.fspath(Path(__file__).resolve().parents[1]))

LIMIT_SECONDS = 2.0
LIMIT_MB = 500.0

_SEEDS = None


def _work(args: tuple[str, int, int, int, int, str]) -> dict:
    name, start, count, binary_every, figures_every, root = args
    import nora_spectra.report as report_module
    from tests.fuzz.cases import make_case
    from tests.fuzz.harness import check, run_binary

    draw = report_module._figures
    result = {"class": name, "cases": 0, "codes": {}, "seconds": [], "peak_mb": [], "problems": [], "binary": 0,
              "slow": [], "heavy": []}
    for i in range(start, start + count):
        directory = Path(root) / f"{name}-{i}"
        case = make_case(name, random.Random(f"{name}-{i}"), _SEEDS, directory)
        figures = name != "report" or i % figures_every == 0
        report_module._figures = draw if figures else (lambda *a, **k: [])
        try:
            outcome, problems = check(case)
        finally:
            report_module._figures = draw
        result["cases"] += 1
        result["codes"][str(outcome.code)] = result["codes"].get(str(outcome.code), 0) + 1
        result["seconds"].append(outcome.seconds)
        if outcome.peak_mb is not None:
            result["peak_mb"].append(outcome.peak_mb)
            if outcome.peak_mb > LIMIT_MB:
                result["heavy"].append((i, round(outcome.peak_mb), case.argv[:2]))
        if outcome.seconds > LIMIT_SECONDS:
            result["slow"].append((i, round(outcome.seconds, 2), "figures" if figures and name == "report" else ""))
        if problems:
            result["problems"].append((i, problems[0][:2000]))
        if binary_every and i % binary_every == 0:
            shutil.rmtree(directory, ignore_errors=True)
            case = make_case(name, random.Random(f"{name}-{i}"), _SEEDS, directory)
            _, problems = check(case, run=run_binary)
            result["binary"] += 1
            if problems:
                result["problems"].append((i, "binary: " + problems[0][:2000]))
        shutil.rmtree(directory, ignore_errors=True)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=10_000, help="cases per class")
    parser.add_argument("--start", type=int, default=0, help="index of the first case")
    parser.add_argument("--classes", default="", help="comma-separated classes (default: all)")
    parser.add_argument("--jobs", type=int, default=2, help="worker processes")
    parser.add_argument("--binary-every", type=int, default=500, help="also run every N-th case through the binary")
    parser.add_argument("--figures-every", type=int, default=50, help="report: draw the plots in every N-th case")
    parser.add_argument("--json", help="write the per-class results here")
    args = parser.parse_args(argv)

    import matplotlib

    matplotlib.use("Agg")
    import torch

    torch.set_num_threads(1)
    from tests.fuzz.cases import CLASSES
    from tests.fuzz.seeds import build_seeds

    global _SEEDS
    root = Path(tempfile.mkdtemp(prefix="nora-fuzz-bench-"))
    started = time.perf_counter()
    _SEEDS = build_seeds(root / "seeds")
    print(f"seeds built in {time.perf_counter() - started:.1f} s", flush=True)
    names = [n for n in args.classes.split(",") if n] or list(CLASSES)
    # one case of each class here, before forking: every module the commands import lazily is loaded once
    # (the workers share it, and edits to the source tree during a long run do not reach them)
    for name in names:
        _work((name, -1, 1, 0, 1, os.fspath(root / "warmup")))
    chunk = max(1, -(-args.cases // (args.jobs * 4)))
    tasks = [
        (name, s, min(chunk, args.start + args.cases - s), args.binary_every, args.figures_every, os.fspath(root / "cases"))
        for name in names
        for s in range(args.start, args.start + args.cases, chunk)
    ]
    merged: dict[str, dict] = {}
    context = multiprocessing.get_context("fork")
    with context.Pool(args.jobs) as pool:
        for part in pool.imap_unordered(_work, tasks):
            total = merged.setdefault(part["class"], {"cases": 0, "codes": {}, "seconds": [], "peak_mb": [],
                                                      "problems": [], "binary": 0, "slow": [], "heavy": []})
            for key in ("cases", "binary"):
                total[key] += part[key]
            for key in ("seconds", "peak_mb", "problems", "slow", "heavy"):
                total[key] += part[key]
            for code, n in part["codes"].items():
                total["codes"][code] = total["codes"].get(code, 0) + n
            for i, problem in part["problems"][:3]:
                print(f"PROBLEM {part['class']} case {i}: {problem[:600]}", flush=True)
            if total["cases"] == args.cases:
                _print_row(part["class"], total)
    elapsed = time.perf_counter() - started
    print(f"total {sum(t['cases'] for t in merged.values())} cases in {elapsed:.0f} s with {args.jobs} workers")
    failures = sum(len(t["problems"]) for t in merged.values())
    for name, total in merged.items():
        for i, seconds, note in total["slow"][:5]:
            print(f"SLOW {name} case {i}: {seconds} s {note}")
        for i, mb, argv in total["heavy"][:5]:
            print(f"HEAVY {name} case {i}: {mb} MB {argv}")
    if args.json:
        summary = {name: {k: v for k, v in t.items() if k not in ("seconds", "peak_mb")} | _stats(t)
                   for name, t in merged.items()}
        Path(args.json).write_text(json.dumps(summary, indent=2) + "\n")
    shutil.rmtree(root, ignore_errors=True)
    return 1 if failures else 0


def _stats(total: dict) -> dict:
    seconds = sorted(total["seconds"])
    peaks = total["peak_mb"] or [float("nan")]
    return {
        "mean_ms": 1000 * statistics.fmean(seconds),
        "p99_ms": 1000 * seconds[int(0.99 * (len(seconds) - 1))],
        "max_s": seconds[-1],
        "max_peak_mb": max(peaks),
    }


def _print_row(name: str, total: dict) -> None:
    s = _stats(total)
    codes = " ".join(f"{k}:{v}" for k, v in sorted(total["codes"].items()))
    print(
        f"{name:20s} {total['cases']:6d} cases  exit {codes:24s} problems {len(total['problems']):3d}  "
        f"mean {s['mean_ms']:6.1f} ms  p99 {s['p99_ms']:7.1f} ms  max {s['max_s']:5.2f} s  "
        f"peak {s['max_peak_mb']:6.1f} MB  over 2 s {len(total['slow']):3d}  over 500 MB {len(total['heavy'])}  "
        f"binary {total['binary']}",
        flush=True,
    )


if __name__ == "__main__":
    sys.exit(main())
