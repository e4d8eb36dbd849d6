"""``spectra check`` end to end through the real entry point: exit codes, outputs, baseline, config."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from nora_spectra.analysis import analyze
from nora_spectra.cli.main import main
from nora_spectra.render.text_formats import render_json
from tests.nora_spectra.test_check import (
    EPS,
    ERANK_SKEW,
    FLAT,
    HALF,
    NAN,
    Q,
    R,
    SKEW,
    UTIL_SKEW,
    V,
    write_checkpoint,
)


@pytest.fixture(autouse=True)
def _isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Run from an empty directory (no pyproject.toml of this repo) outside GitHub Actions."""
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    monkeypatch.delenv("GITHUB_ACTIONS", raising=False)


def run(capsys: pytest.CaptureFixture[str], *args: object) -> tuple[int, str, str]:
    """Run ``spectra check ARGS``; return (exit code, stdout, stderr)."""
    with pytest.raises(SystemExit) as info:
        main(["check", *map(str, args)])
    out, err = capsys.readouterr()
    return info.value.code, out, err


@pytest.fixture()
def ckpt(tmp_path: Path) -> Path:
    return write_checkpoint(tmp_path / "adapter", {Q: FLAT, V: SKEW})


def test_exit_0_when_every_gate_passes(capsys, ckpt: Path) -> None:
    code, out, err = run(capsys, ckpt, "--min-utilization", UTIL_SKEW - EPS)
    assert code == 0 and err == ""
    assert "PASSED: all 2 gates passed" in out


def test_exit_1_names_the_failing_module_value_and_limit(capsys, ckpt: Path) -> None:
    code, out, _ = run(capsys, ckpt, "--min-utilization", UTIL_SKEW + EPS)
    assert code == 1
    # just enough digits to tell value and limit apart: 9 significant digits here
    assert f"FAIL [min_utilization] {V}: utilization {UTIL_SKEW:.9g} is below" in out
    assert f"below min_utilization {UTIL_SKEW + EPS:.9g} by 1e-09" in out
    assert Q not in out.split("FAIL", 1)[1]


def test_quiet(capsys, ckpt: Path) -> None:
    assert run(capsys, ckpt, "--min-effective-rank", 1, "-q")[:2] == (0, "")
    code, out, _ = run(capsys, ckpt, "--min-effective-rank", ERANK_SKEW + EPS, "--quiet")
    assert code == 1 and out.splitlines()[0].startswith(f"  FAIL [min_effective_rank] {V}")


def test_quiet_with_several_checkpoints_names_each_failure_s_checkpoint(capsys, ckpt: Path, tmp_path: Path) -> None:
    import shutil

    twin = tmp_path / "twin"
    shutil.copytree(ckpt, twin)
    code, out, _ = run(capsys, ckpt, twin, "--min-effective-rank", ERANK_SKEW + EPS, "-q")
    failures = [line for line in out.splitlines() if "FAIL [" in line]
    assert code == 1 and len(failures) == 2
    assert failures[0].startswith(f"  FAIL [min_effective_rank] {ckpt}: {V}")
    assert failures[1].startswith(f"  FAIL [min_effective_rank] {twin}: {V}")


@pytest.mark.parametrize(
    "args, match",
    [
        (["{missing}", "--min-utilization", "0.1"], "nope: no such file or directory"),
        (["{ckpt}"], "no gate configured"),
        (["{ckpt}", "--min-utilization", "2"], "--min-utilization: min_utilization must be a number in [0, 1]"),
        (["{ckpt}", "--baseline", "{missing}.json"], "baseline not found"),
        (["{ckpt}", "--min-utilization", "0.1", "--config", "{missing}.toml"], "config file not found"),
        (["{ckpt}", "--baseline", "{ckpt}/adapter_config.json", "--metric", "loss"], "--metric: metric must be one of"),
    ],
)
def test_exit_2_with_one_line_on_user_errors(capsys, ckpt: Path, tmp_path: Path, args: list[str], match: str) -> None:
    missing = tmp_path / "nope"
    code, out, err = run(capsys, *(a.format(ckpt=ckpt, missing=missing) for a in args))
    assert code == 2 and out == ""
    assert err.startswith("spectra: error: ") and err.count("\n") == 1 and match in err


def test_adapter_option_selects_a_sub_directory(capsys, tmp_path: Path) -> None:
    write_checkpoint(tmp_path / "multi" / "good", {Q: FLAT})
    write_checkpoint(tmp_path / "multi" / "bad", {Q: SKEW})
    code, _, err = run(capsys, tmp_path / "multi", "--min-utilization", 0.5)
    assert code == 2 and "several adapters" in err
    assert run(capsys, tmp_path / "multi", "--adapter", "good", "--min-utilization", 0.5)[0] == 0
    assert run(capsys, tmp_path / "multi", "--adapter", "bad", "--min-utilization", 0.5)[0] == 1


def test_non_finite_module_fails(capsys, tmp_path: Path) -> None:
    path = write_checkpoint(tmp_path / "n", {Q: FLAT, V: NAN})
    code, out, _ = run(capsys, path, "--min-utilization", 0)
    assert code == 1 and f"FAIL [finite] {V}: adapter factors hold NaN/Inf" in out


def test_baseline_round_trip_degrade_and_update(capsys, tmp_path: Path) -> None:
    path = write_checkpoint(tmp_path / "adapter", {Q: FLAT, V: FLAT})
    baseline = tmp_path / "baseline.json"
    # the JSON `spectra analyze --format json` writes is a valid baseline
    baseline.write_text(render_json(analyze(path, emit_warnings=False)))
    assert run(capsys, path, "--baseline", baseline)[0] == 0

    write_checkpoint(path, {Q: FLAT, V: SKEW})  # v_proj degrades: effective rank 8 -> 2**1.5
    code, out, _ = run(capsys, path, "--baseline", baseline)
    drop = 1 - ERANK_SKEW / R
    assert code == 1
    assert f"FAIL [max_drop] {V}: effective_rank dropped {100 * drop:.3g}% from the baseline (8 -> 2.828)" in out
    assert "more than max_drop 5%" in out
    assert run(capsys, path, "--baseline", baseline, "--max-drop", drop + EPS)[0] == 0

    code, out, err = run(capsys, path, "--baseline", baseline, "--update-baseline")
    assert code == 0 and out == "" and "wrote baseline" in err
    stored = json.loads(baseline.read_text())
    assert stored == json.loads(render_json(analyze(path, emit_warnings=False)))
    assert run(capsys, path, "--baseline", baseline)[0] == 0

    write_checkpoint(path, {Q: FLAT, "model.layers.0.mlp.up_proj": HALF})  # v_proj gone, up_proj new
    code, out, _ = run(capsys, path, "--baseline", baseline)
    assert code == 1
    assert f"FAIL [missing_module] {V}: in the baseline but missing from this checkpoint" in out
    assert "note: model.layers.0.mlp.up_proj: not in the baseline (new module, not gated)" in out


def test_update_baseline_creates_its_directory(capsys, ckpt: Path, tmp_path: Path) -> None:
    baseline = tmp_path / "ci" / "nested" / "baseline.json"
    code, _, err = run(capsys, ckpt, "--baseline", baseline, "--update-baseline")
    assert code == 0 and "wrote baseline" in err
    assert json.loads(baseline.read_text())["layers"]


def test_update_baseline_needs_a_path(capsys, ckpt: Path) -> None:
    code, _, err = run(capsys, ckpt, "--update-baseline")
    assert code == 2 and "--update-baseline needs a baseline path" in err


def test_several_checkpoints_baseline_and_junit(capsys, tmp_path: Path) -> None:
    a = write_checkpoint(tmp_path / "a", {Q: FLAT, V: FLAT})
    b = write_checkpoint(tmp_path / "b", {Q: HALF})
    baseline = tmp_path / "base.json"
    assert run(capsys, a, b, "--baseline", baseline, "--update-baseline")[0] == 0
    assert len(json.loads(baseline.read_text())["checkpoints"]) == 2

    write_checkpoint(a, {Q: FLAT, V: SKEW})
    junit = tmp_path / "reports" / "spectra.xml"
    code, _, _ = run(capsys, a, b, "--baseline", baseline, "--min-utilization", 0.4, "--junit", junit)
    assert code == 1
    root = ET.parse(junit).getroot()
    suites = root.findall("testsuite")
    assert [s.get("name") for s in suites] == [str(a), str(b)]
    assert [(s.get("tests"), s.get("failures")) for s in suites] == [("4", "2"), ("2", "0")]
    messages = sorted(f.get("message") for f in root.iter("failure"))
    assert len(messages) == 2
    assert messages[0].startswith(f"{V}: effective_rank dropped 64.6% from the baseline (8 -> 2.828)")
    assert messages[1].startswith(f"{V}: utilization 0.3536 is below min_utilization 0.4 by 0.04645")


def test_json_format(capsys, ckpt: Path) -> None:
    code, out, _ = run(capsys, ckpt, "--min-utilization", 0.5, "--format", "json")
    data = json.loads(out)
    assert code == 1 and (data["passed"], data["gates"], data["failed"]) == (False, 2, 1)
    assert data["outcomes"][1]["value"] == pytest.approx(UTIL_SKEW, rel=1e-12)


def test_github_annotations_from_env_and_flags(capsys, ckpt: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    code, out, _ = run(capsys, ckpt, "--min-utilization", 0.5)
    assert code == 1 and "::error" not in out
    monkeypatch.setenv("GITHUB_ACTIONS", "true")
    _, out, _ = run(capsys, ckpt, "--min-utilization", 0.5)
    (line,) = [x for x in out.splitlines() if x.startswith("::error")]
    assert line.startswith(f"::error title=spectra check%3A min_utilization failed for {V}::{ckpt}: {V}: utilization")
    assert line.endswith("29.3%25 short")
    _, out, _ = run(capsys, ckpt, "--min-utilization", 0.5, "--no-github")
    assert "::error" not in out
    # beside JSON the annotations go to stderr so that stdout stays parseable
    _, out, err = run(capsys, ckpt, "--min-utilization", 0.5, "--format", "json", "--github")
    assert json.loads(out)["failed"] == 1 and err.startswith("::error title=")


def test_config_precedence_through_the_cli(capsys, ckpt: Path, tmp_path: Path) -> None:
    (Path.cwd() / "pyproject.toml").write_text("[tool.spectra.check]\nmin_utilization = 0.9\n")
    assert run(capsys, ckpt)[0] == 1  # pyproject: 0.354 < 0.9
    config = tmp_path / "spectra.toml"
    config.write_text(
        'min_utilization = 0.6\n[[overrides]]\npattern = "*.v_proj"\nmin_utilization = 0.3\n'
    )
    assert run(capsys, ckpt, "--config", config)[0] == 0  # --config beats pyproject; v_proj override 0.3
    assert run(capsys, ckpt, "--config", config, "--min-utilization", 0.99)[0] == 0
    # the flag set the global 0.99 (q_proj has 1.0) and the v_proj override still applied; without it:
    config.write_text("min_utilization = 0.6\n")
    code, out, _ = run(capsys, ckpt, "--config", config, "--min-utilization", 0.99)
    assert code == 1 and f"{V}: utilization 0.3536 is below min_utilization 0.99" in out
    code, out, _ = run(capsys, ckpt, "--min-effective-rank", 3)
    assert code == 1 and "below min_effective_rank 3" in out and "below min_utilization 0.9" in out


def test_bad_pyproject_exits_2_naming_file_and_key(capsys, ckpt: Path) -> None:
    (Path.cwd() / "pyproject.toml").write_text("[tool.spectra.check]\nmax_dorp = 0.1\n")
    code, out, err = run(capsys, ckpt, "--min-utilization", 0.1)
    assert code == 2 and out == "" and err.count("\n") == 1
    assert "pyproject.toml: unknown key tool.spectra.check.'max_dorp'" in err
