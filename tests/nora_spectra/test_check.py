"""Gate decisions of ``nora_spectra.gates`` on checkpoints whose spectra are chosen by hand.

Each module's update is ``B A`` with ``B = U diag(s)`` and ``A = V^T`` (orthonormal ``U``, ``V``; scale
``alpha / r = 1``), so its singular values are exactly ``s`` and the effective rank is the closed form
``exp(-sum p ln p)``, ``p = s / sum(s)``. Factors are stored in float64, so the analysis reproduces these
numbers to ~1e-12 and every gate can be tested a hair on each side of its threshold.
"""

from __future__ import annotations

import json
import math
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import pytest
from safetensors.numpy import save_file

from nora_spectra.analysis import analyze
from nora_spectra.baseline import load_baseline, match_baseline, write_baseline
from nora_spectra.gates import CHECKPOINT_SCOPE, check, evaluate
from nora_spectra.check_config import CheckSettings, Override
from nora_spectra.errors import UsageError
from nora_spectra.render.check_report import (
    escape_data,
    escape_property,
    render_github,
    render_json,
    render_junit,
    render_text,
)

R = 8  # rank budget of every module
D = 16  # d_in = d_out
EPS = 1e-9  # distance of a threshold from the exact value

Q = "model.layers.0.self_attn.q_proj"
K = "model.layers.0.self_attn.k_proj"
V = "model.layers.0.self_attn.v_proj"
O = "model.layers.1.self_attn.o_proj"

FLAT = [1.0] * R  # effective rank 8, utilization 1
HALF = [1.0] * 4 + [0.0] * 4  # effective rank 4, utilization 0.5
SKEW = [2.0, 1.0, 1.0] + [0.0] * 5  # p = (1/2, 1/4, 1/4): effective rank 2**1.5
SPIKE = [1.0] + [0.0] * 7  # effective rank 1, utilization 1/8 < 0.25: collapsed
ZERO = [0.0] * R  # status "zero"
NAN = "nan"  # factors holding NaN: status "non_finite"

ERANK_SKEW = 2**1.5
UTIL_SKEW = ERANK_SKEW / R


def hand_effective_rank(s: Sequence[float]) -> float:
    """exp of the entropy of p = s / sum(s), computed independently of nora_spectra.metrics."""
    total = sum(s)
    return math.exp(-sum((x / total) * math.log(x / total) for x in s if x > 0))


def write_checkpoint(path: Path, spectra: Mapping[str, Sequence[float] | str], *, seed: int = 0) -> Path:
    """A PEFT LoRA directory whose module ``m`` has update singular values ``spectra[m]`` (or NaN factors).

    Returns:
        ``path`` (created).
    """
    rng = np.random.default_rng(seed)
    path.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for module, s in spectra.items():
        u, _ = np.linalg.qr(rng.standard_normal((D, R)))
        v, _ = np.linalg.qr(rng.standard_normal((D, R)))
        if s == NAN:
            b, a = u.copy(), v.T.copy()
            a[0, 0] = np.nan
        else:
            b, a = u * np.asarray(s, dtype=np.float64), v.T.copy()
        tensors[f"base_model.model.{module}.lora_A.weight"] = np.ascontiguousarray(a)
        tensors[f"base_model.model.{module}.lora_B.weight"] = np.ascontiguousarray(b)
    save_file(tensors, str(path / "adapter_model.safetensors"))
    targets = sorted({m.rsplit(".", 1)[-1] for m in spectra})
    config = {"peft_type": "LORA", "r": R, "lora_alpha": R, "target_modules": targets}
    (path / "adapter_config.json").write_text(json.dumps(config))
    return path


@pytest.fixture()
def mixed(tmp_path: Path) -> Path:
    """Four modules: flat, half, skewed and collapsed."""
    return write_checkpoint(tmp_path / "mixed", {Q: FLAT, K: HALF, V: SKEW, O: SPIKE})


def outcome(result, module: str, gate: str):
    found = [o for o in result.outcomes if o.module == module and o.gate == gate]
    assert len(found) == 1, (module, gate, result.outcomes)
    return found[0]


def test_fixture_spectra_are_what_we_chose(mixed: Path) -> None:
    records = {r["module"]: r for r in analyze(mixed, emit_warnings=False).records}
    assert ERANK_SKEW == pytest.approx(hand_effective_rank(SKEW), rel=1e-15)
    assert records[V]["effective_rank"] == pytest.approx(ERANK_SKEW, rel=1e-12)
    assert records[K]["utilization"] == pytest.approx(0.5, rel=1e-12)
    assert records[O]["collapsed"] is True and records[V]["collapsed"] is False


@pytest.mark.parametrize("delta, passed", [(-EPS, True), (+EPS, False)])
def test_min_utilization_either_side_of_threshold(mixed: Path, delta: float, passed: bool) -> None:
    limit = UTIL_SKEW + delta
    result = check(mixed, min_utilization=limit)
    got = outcome(result, V, "min_utilization")
    assert got.passed is passed
    assert got.value == pytest.approx(UTIL_SKEW, rel=1e-12) and got.limit == limit
    assert outcome(result, Q, "min_utilization").passed and outcome(result, K, "min_utilization").passed
    assert not outcome(result, O, "min_utilization").passed  # 1/8 is far below
    if not passed:
        # the message names the module, its value, the limit and the miss, with enough digits to differ
        assert V in got.message and "below min_utilization" in got.message
        assert f"{UTIL_SKEW:.10g}"[:8] in got.message and "by 1e-09" in got.message


@pytest.mark.parametrize("delta, passed", [(-EPS, True), (+EPS, False)])
def test_min_effective_rank_either_side_of_threshold(mixed: Path, delta: float, passed: bool) -> None:
    result = check(mixed, min_effective_rank=ERANK_SKEW + delta)
    got = outcome(result, V, "min_effective_rank")
    assert got.passed is passed
    assert got.value == pytest.approx(ERANK_SKEW, rel=1e-12)
    assert result.passed is False  # the collapsed o_proj (erank 1) fails either way
    assert [o.module for o in result.failures] == ([O] if passed else [V, O])


def test_value_equal_to_limit_passes(mixed: Path) -> None:
    assert outcome(check(mixed, min_utilization=0.5), K, "min_utilization").passed


@pytest.mark.parametrize("limit, passed", [(0.25, True), (0.25 - EPS, False)])
def test_max_collapsed_fraction(mixed: Path, limit: float, passed: bool) -> None:
    result = check(mixed, max_collapsed_fraction=limit)
    got = outcome(result, CHECKPOINT_SCOPE, "max_collapsed_fraction")
    assert (got.passed, got.value, result.passed) == (passed, 0.25, passed)
    assert "1 of 4 modules collapsed" in got.message
    if not passed:
        assert O in got.message


def test_zero_layers_have_utilization_zero_and_count_as_collapsed(tmp_path: Path) -> None:
    path = write_checkpoint(tmp_path / "z", {Q: FLAT, V: ZERO})
    result = check(path, min_utilization=0.01, max_collapsed_fraction=0.4)
    got = outcome(result, V, "min_utilization")
    assert (got.passed, got.value) == (False, 0.0)
    assert "all-zero update" in got.message
    collapsed = outcome(result, CHECKPOINT_SCOPE, "max_collapsed_fraction")
    assert (collapsed.passed, collapsed.value) == (False, 0.5)


def test_non_finite_layer_always_fails_with_one_clear_outcome(tmp_path: Path) -> None:
    path = write_checkpoint(tmp_path / "n", {Q: FLAT, V: NAN})
    result = check(path, min_effective_rank=0.0)
    assert [(o.module, o.gate) for o in result.failures] == [(V, "finite")]
    assert "NaN/Inf" in result.failures[0].message
    assert [o.gate for o in result.outcomes if o.module == V] == ["finite"]


def test_overrides_first_glob_match_wins_and_skip(mixed: Path) -> None:
    result = check(
        mixed,
        min_utilization=0.6,
        overrides=[
            {"pattern": "model.layers.1.*", "skip": True},
            {"pattern": "*.v_proj", "min_utilization": UTIL_SKEW - EPS},
            {"pattern": "*self_attn.*", "min_utilization": 0.99},  # v_proj and o_proj matched above already
        ],
    )
    assert outcome(result, V, "min_utilization").passed
    assert "(override *.v_proj)" in outcome(result, V, "min_utilization").message
    assert outcome(result, Q, "min_utilization").passed  # 1.0 >= 0.99
    assert not outcome(result, K, "min_utilization").passed  # 0.5 < 0.99
    assert not [o for o in result.outcomes if o.module == O]
    assert any(O in msg and "skipped" in msg for _, msg in result.notes)


def test_no_gate_is_a_usage_error(mixed: Path) -> None:
    with pytest.raises(UsageError, match="no gate configured"):
        check(mixed)


@pytest.mark.parametrize("bad", [{"min_utilization": 1.5}, {"max_drop": -0.1}, {"metric": "nope"}])
def test_bad_thresholds_are_usage_errors(mixed: Path, bad: dict) -> None:
    with pytest.raises(UsageError):
        check(mixed, **{"min_utilization": 0.1, **bad})


# ------------------------------------------------------------------------------------------------
# baseline regression gate


def test_baseline_round_trip_passes_with_zero_drop(mixed: Path, tmp_path: Path) -> None:
    baseline = tmp_path / "baseline.json"
    write_baseline(baseline, [analyze(mixed, emit_warnings=False)])
    result = check(mixed, baseline=baseline)
    drops = [o for o in result.outcomes if o.gate == "max_drop"]
    assert len(drops) == 4 and all(o.passed and o.value == 0.0 for o in drops)
    assert result.passed


@pytest.mark.parametrize("delta, passed", [(+EPS, True), (-EPS, False)])
def test_degraded_module_fails_the_baseline_gate_by_its_drop(tmp_path: Path, delta: float, passed: bool) -> None:
    base = write_checkpoint(tmp_path / "base", {Q: FLAT, V: FLAT})
    current = write_checkpoint(tmp_path / "cur", {Q: FLAT, V: SKEW}, seed=1)
    drop = 1 - ERANK_SKEW / R  # 8 -> 2**1.5
    result = check(current, baseline=analyze(base, emit_warnings=False), max_drop=drop + delta)
    got = outcome(result, V, "max_drop")
    assert got.passed is passed and result.passed is passed
    assert got.value == pytest.approx(drop, rel=1e-12)
    assert outcome(result, Q, "max_drop").value == pytest.approx(0.0, abs=1e-12)
    if not passed:
        assert V in got.message and f"{100 * drop:.3g}%" in got.message and "8 -> 2.828" in got.message


def test_other_metric_for_the_baseline_gate(tmp_path: Path) -> None:
    base = analyze(write_checkpoint(tmp_path / "b", {V: HALF}), emit_warnings=False)
    current = write_checkpoint(tmp_path / "c", {V: SKEW})
    # stable rank = sum(s^2) / s_1^2: HALF -> 4, SKEW -> 6/4 = 1.5, a drop of 62.5%
    result = check(current, baseline=base, metric="stable_rank", max_drop=0.625 + EPS)
    assert outcome(result, V, "max_drop").value == pytest.approx(0.625, rel=1e-12)
    assert result.passed
    assert not check(current, baseline=base, metric="stable_rank", max_drop=0.625 - EPS).passed


def test_missing_module_fails_by_default_and_new_module_is_a_note(tmp_path: Path) -> None:
    base = analyze(write_checkpoint(tmp_path / "b", {Q: FLAT, V: FLAT}), emit_warnings=False)
    current = write_checkpoint(tmp_path / "c", {Q: FLAT, K: FLAT})
    result = check(current, baseline=base)
    assert [(o.module, o.gate) for o in result.failures] == [(V, "missing_module")]
    assert any(K in msg and "not in the baseline" in msg for _, msg in result.notes)
    lenient = check(current, baseline=base, fail_on_missing=False)
    assert lenient.passed and any(V in msg and "missing" in msg for _, msg in lenient.notes)
    strict = check(current, baseline=base, fail_on_new=True)
    assert {(o.module, o.gate) for o in strict.failures} == {(V, "missing_module"), (K, "new_module")}


def test_multi_checkpoint_baseline_is_matched_by_path(tmp_path: Path) -> None:
    a = write_checkpoint(tmp_path / "a", {Q: FLAT})
    b = write_checkpoint(tmp_path / "b", {Q: HALF})
    baseline = tmp_path / "base.json"
    write_baseline(baseline, [analyze(b, emit_warnings=False), analyze(a, emit_warnings=False)])
    assert "checkpoints" in json.loads(baseline.read_text())
    assert [x.checkpoint for x in load_baseline(baseline)] == [str(b), str(a)]
    assert check([a, b], baseline=baseline).passed
    # swapped content: a now has b's spectrum, so a drops from 8 to 4
    write_checkpoint(tmp_path / "a", {Q: HALF})
    result = check([a, b], baseline=baseline)
    assert [(o.checkpoint, o.module) for o in result.failures] == [(str(a), Q)]
    assert result.failures[0].value == pytest.approx(0.5, rel=1e-12)


def test_match_baseline_by_normalised_path_then_position(tmp_path: Path) -> None:
    a = analyze(write_checkpoint(tmp_path / "a", {Q: FLAT}), emit_warnings=False)
    b = analyze(write_checkpoint(tmp_path / "b", {Q: HALF}), emit_warnings=False)
    c = analyze(write_checkpoint(tmp_path / "c", {Q: HALF}), emit_warnings=False)
    (tmp_path / "x").mkdir()
    b_dotted = analyze(str(tmp_path / "x" / ".." / "b"), emit_warnings=False)
    assert [id(m) for m in match_baseline([b_dotted, a], [a, b])] == [id(b), id(a)]
    # c is not in the baseline and the lists have the same length: matched by position, with a note
    notes: list = []
    assert [id(m) for m in match_baseline([c, a], [b, a], notes)] == [id(b), id(a)]
    assert notes == [(c.checkpoint, f"no baseline entry with this path; compared by position with entry 1, {b.checkpoint!r}")]
    # relative and absolute spellings of one path pair up
    import dataclasses, os

    relative = dataclasses.replace(b, checkpoint=os.path.relpath(b.checkpoint))
    assert [id(m) for m in match_baseline([a, relative], [b, a])] == [id(a), id(b)]
    with pytest.raises(UsageError, match="baseline has no entry for checkpoint"):
        match_baseline([c], [a, b])


def test_match_baseline_tells_adapters_of_one_directory_apart(tmp_path: Path) -> None:
    import dataclasses

    base = analyze(write_checkpoint(tmp_path / "multi", {Q: FLAT}), emit_warnings=False)
    code, math_ = (dataclasses.replace(base, adapter=name) for name in ("code", "math"))
    # same path, different adapters: each finds its own entry, whatever the order
    assert [m.adapter for m in match_baseline([math_, code], [code, math_])] == ["math", "code"]
    with pytest.raises(UsageError, match=r"checkpoint '.*multi' \(adapter math\)"):
        match_baseline([math_], [code, base])


@pytest.mark.parametrize(
    "content, match",
    [
        (None, "baseline not found"),
        ("{not json", "not valid JSON"),
        ('{"x": 1}', "not a spectra analysis"),
        ('{"space": "activation", "checkpoint": "x", "layers": []}', "baseline holds activation-space spectra"),
    ],
)
def test_bad_baseline_files_name_the_file(tmp_path: Path, mixed: Path, content: str | None, match: str) -> None:
    path = tmp_path / "base.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(UsageError, match=match) as info:
        check(mixed, baseline=path)
    assert str(path) in str(info.value)


# ------------------------------------------------------------------------------------------------
# renderings


@pytest.fixture()
def failing(tmp_path: Path):
    a = write_checkpoint(tmp_path / "a", {Q: FLAT, V: SKEW, O: SPIKE})
    b = write_checkpoint(tmp_path / "b", {Q: FLAT})
    return check([a, b], min_utilization=0.5, max_collapsed_fraction=0.5)


def test_text_report_names_failures_values_and_limits(failing) -> None:
    text = render_text(failing)
    assert "FAILED: 2 of 6 gates failed" in text
    assert f"FAIL [min_utilization] {V}: utilization 0.3536 is below min_utilization 0.5 by 0.1464" in text
    assert f"FAIL [min_utilization] {O}: utilization 0.125 is below min_utilization 0.5 by 0.375" in text
    assert render_text(failing, quiet=True).count("\n") == 3


def test_quiet_text_is_empty_when_everything_passes(mixed: Path) -> None:
    result = check(mixed, min_utilization=0.1)
    assert render_text(result, quiet=True) == ""
    assert render_text(result).endswith("PASSED: all 4 gates passed\n")


def test_json_report(failing) -> None:
    data = json.loads(render_json(failing))
    assert (data["passed"], data["gates"], data["failed"]) == (False, 6, 2)
    assert {o["module"] for o in data["outcomes"] if not o["passed"]} == {V, O}
    assert data["settings"]["min_utilization"] == 0.5


def test_junit_xml_parses_back_with_counts_and_numbers(failing) -> None:
    root = ET.fromstring(render_junit(failing).encode("utf-8"))
    assert root.tag == "testsuites" and (root.get("tests"), root.get("failures")) == ("6", "2")
    suites = root.findall("testsuite")
    assert [(s.get("tests"), s.get("failures")) for s in suites] == [("4", "2"), ("2", "0")]
    assert [s.get("name") for s in suites] == failing.checkpoints
    cases = suites[0].findall("testcase")
    assert [(c.get("classname"), c.get("name")) for c in cases] == [
        (Q, "min_utilization"), (V, "min_utilization"), (O, "min_utilization"),
        (CHECKPOINT_SCOPE, "max_collapsed_fraction"),
    ]
    failure = cases[1].find("failure")
    assert "0.3536" in failure.get("message") and "0.5" in failure.get("message")
    assert f"value: {UTIL_SKEW!r}"[:15] in failure.text and "limit: 0.5" in failure.text
    assert cases[0].find("failure") is None


def test_junit_escapes_markup_and_control_characters() -> None:
    from nora_spectra.gates import CheckResult, GateOutcome

    result = CheckResult(
        checkpoints=['ck<&>"'],
        outcomes=[GateOutcome('ck<&>"', "m<1>&\x01", "min_utilization", 0.1, 0.2, False, 'a < b & "c"\nline\x02')],
        settings=CheckSettings(min_utilization=0.2),
    )
    root = ET.fromstring(render_junit(result).encode("utf-8"))
    case = root.find("testsuite/testcase")
    assert root.find("testsuite").get("name") == 'ck<&>"'
    assert case.get("classname") == "m<1>&\ufffd"
    assert case.find("failure").get("message") == 'a < b & "c"\nline\ufffd'


def test_github_annotations_are_escaped_per_workflow_command_spec(failing) -> None:
    assert escape_data("50% a\r\nb") == "50%25 a%0D%0Ab"
    assert escape_property("a: b, c%\n") == "a%3A b%2C c%25%0A"
    lines = render_github(failing).splitlines()
    errors = [line for line in lines if line.startswith("::error ")]
    assert len(errors) == 2
    assert errors[0].startswith(f"::error title=spectra check%3A min_utilization failed for {V}::")
    assert errors[0].endswith("by 0.1464, 29.3%25 short")
    assert all("\n" not in line and "\r" not in line for line in lines)


def test_evaluate_is_a_pure_function_of_records(mixed: Path) -> None:
    analysis = analyze(mixed, emit_warnings=False)
    settings = CheckSettings(min_utilization=0.4, overrides=(Override("*.o_proj", skip=True),))
    first, second = evaluate([analysis], settings), evaluate([analysis], settings)
    assert first.outcomes == second.outcomes
    assert [o.module for o in first.failures] == [V]
