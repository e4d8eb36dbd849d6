"""Generate ``docs/results.md`` from the committed raw results in ``docs/results/*.json``.

Every number on the page comes from those files (one record per run, written by
``bench/rank_scaling.py`` and ``bench/encoder_rank_scaling.py``); nothing is typed by hand. Tables show
the mean and the sample standard deviation over seeds; every comparison the page draws is computed by
:func:`compare` and worded by :func:`verdict`, which calls a difference a tie unless it exceeds the spread
across seeds (``|mean_a - mean_b| > sd_a + sd_b``).

Run::

    .venv/bin/python bench/results_page.py            # write docs/results.md
    .venv/bin/python bench/results_page.py --check    # exit 1 unless docs/results.md is up to date

This script needs only the standard library.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from repro import PRECISION, fmt  # noqa: E402

__all__ = ["Stat", "compare", "rank_scaling_table", "render_page", "stat", "verdict", "main"]

ROOT = Path(__file__).resolve().parents[1]
RESULTS_DIR = ROOT / "docs" / "results"
PAGE = ROOT / "docs" / "results.md"

METHOD_ORDER = ("lora", "rslora", "nora_silu", "nora_identity")


# ------------------------------------------------------------------------------------------ statistics
@dataclass(frozen=True)
class Stat:
    """Mean and sample standard deviation (``ddof = 1``; 0 for one value) of one metric over seeds."""

    mean: float
    sd: float
    n: int

    def show(self, metric: str) -> str:
        """``mean ± sd`` at the metric's printed precision."""
        return f"{fmt(metric, self.mean)} ± {fmt(metric, self.sd)}"


def stat(values: Sequence[float]) -> Stat:
    """The :class:`Stat` of ``values`` (at least one)."""
    n = len(values)
    mean = math.fsum(values) / n
    sd = math.sqrt(math.fsum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
    return Stat(mean, sd, n)


def group(runs: Iterable[Mapping[str, Any]], metric: str, **where: Any) -> Stat:
    """The :class:`Stat` of ``metric`` over the runs whose fields equal ``where``."""
    values = [float(r[metric]) for r in runs if all(r[k] == v for k, v in where.items()) and r[metric] is not None]
    if not values:
        raise KeyError(f"no run with {where} has {metric}")
    return stat(values)


def compare(a: Stat, b: Stat) -> tuple[float, bool]:
    """``(mean_a - mean_b, exceeds)``: whether the difference exceeds the spread ``sd_a + sd_b``."""
    diff = a.mean - b.mean
    return diff, abs(diff) > a.sd + b.sd


def verdict(metric: str, name_a: str, a: Stat, name_b: str, b: Stat, *, lower_is_better: bool) -> str:
    """One sentence comparing two configurations on ``metric``, calling a difference within the spread a tie."""
    diff, exceeds = compare(a, b)
    shown = f"{name_a} {a.show(metric)} vs {name_b} {b.show(metric)}"
    if not exceeds:
        return f"{shown}: a tie (the difference {fmt(metric, abs(diff))} is within the spread across seeds)"
    better = name_a if (diff < 0) == lower_is_better else name_b
    return f"{shown}: {better} is better by {fmt(metric, abs(diff))}, more than the spread across seeds"


# ---------------------------------------------------------------------------------------------- tables
def _methods(runs: Sequence[Mapping[str, Any]]) -> list[str]:
    present = {r["method"] for r in runs}
    return [m for m in METHOD_ORDER if m in present] + sorted(present - set(METHOD_ORDER))


def _ranks(runs: Sequence[Mapping[str, Any]], method: str) -> list[int]:
    return sorted({r["rank"] for r in runs if r["method"] == method})


def _table(runs: Sequence[Mapping[str, Any]], columns: Sequence[tuple[str, str]]) -> list[str]:
    lines = [
        "| method | r | scale | seeds | " + " | ".join(title for _, title in columns) + " |",
        "|---|---:|---:|---:|" + "---:|" * len(columns),
    ]
    for method in _methods(runs):
        for rank in _ranks(runs, method):
            cells = [group(runs, metric, method=method, rank=rank).show(metric) for metric, _ in columns]
            scale = next(r["scale"] for r in runs if r["method"] == method and r["rank"] == rank)
            n = group(runs, columns[0][0], method=method, rank=rank).n
            lines.append(f"| {method} | {rank} | {scale:.3f} | {n} | " + " | ".join(cells) + " |")
    return lines


RANK_SCALING_COLUMNS = (
    ("val_ppl", "val PPL"),
    ("answer_ppl", "answer PPL"),
    ("weight_erank", "weight ER"),
    ("activation_erank", "activation ER"),
    ("activation_utilization", "act. util."),
    ("activation_energy_rank_90", "act. energy-90"),
)


def rank_scaling_table(results: Mapping[str, Any]) -> str:
    """The small-GPT sweep's table: mean ± sd over seeds per (method, r)."""
    meta, runs = results["meta"], results["runs"]
    cfg = meta["config"]
    head = (
        f"Small GPT {cfg['n_layer']} layers x {cfg['n_embd']} wide, {cfg['steps']} steps x batch "
        f"{cfg['batch_size']}, seeds {', '.join(str(s) for s in cfg['seeds'])}; base (no adapter): val PPL "
        f"{fmt('val_ppl', meta['base']['val_ppl'])}, answer PPL {fmt('answer_ppl', meta['base']['answer_ppl'])}. "
        "Mean ± sample standard deviation over seeds; ER = mean effective rank over the q_proj/v_proj modules."
    )
    return "\n".join([head, ""] + _table(runs, RANK_SCALING_COLUMNS))


ENCODER_COLUMNS = (
    ("val_loss", "held-out loss"),
    ("val_top1", "held-out top-1"),
    ("weight_erank", "weight ER"),
    ("activation_erank", "activation ER"),
    ("activation_utilization", "act. util."),
    ("activation_energy_rank_90", "act. energy-90"),
)


def encoder_table(results: Mapping[str, Any]) -> str:
    """The real-encoder sweep's table: mean ± sd over seeds per (method, r)."""
    meta, runs = results["meta"], results["runs"]
    cfg = meta["config"]
    head = (
        f"all-MiniLM-L6-v2, {cfg['steps']} steps x batch {cfg['batch_size']}, seeds "
        f"{', '.join(str(s) for s in cfg['seeds'])}; base (no adapter): held-out loss "
        f"{fmt('val_loss', meta['base']['val_loss'])}, top-1 {fmt('val_top1', meta['base']['val_top1'])}. "
        "Mean ± sample standard deviation over seeds; ER = mean effective rank over the query/value modules."
    )
    return "\n".join([head, ""] + _table(runs, ENCODER_COLUMNS))


def render_page(results: Mapping[str, Mapping[str, Any]]) -> str:
    """The whole of ``docs/results.md`` from the results files (``{file stem: content}``)."""
    raise NotImplementedError


def _load_all(directory: Path) -> dict[str, dict[str, Any]]:
    return {p.stem: json.loads(p.read_text()) for p in sorted(directory.glob("*.json"))}


def main(argv: list[str] | None = None) -> int:
    """``results_page.py [--check] [--results DIR] [--page FILE]``."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="exit 1 unless the page is up to date")
    parser.add_argument("--results", type=Path, default=RESULTS_DIR, help="directory of the committed results")
    parser.add_argument("--page", type=Path, default=PAGE, help="the page to write or check")
    args = parser.parse_args(argv)
    text = render_page(_load_all(args.results))
    if args.check:
        current = args.page.read_text() if args.page.is_file() else ""
        if current != text:
            print(f"{args.page} is not what {Path(__file__).name} generates from {args.results}; rerun it")
            return 1
        print(f"{args.page} is up to date")
        return 0
    args.page.write_text(text)
    print(f"wrote {args.page}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
