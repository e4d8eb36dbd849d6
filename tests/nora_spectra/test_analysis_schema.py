"""The analysis-JSON schema: every command that reads one refuses a bad value with its file and JSON path."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from nora_spectra.analysis import analyze
from nora_spectra.cli.main import main
from nora_spectra.errors import UsageError
from nora_spectra.result import Analysis
from tests.nora_spectra.io_builders import lora_tensors, peft_dir

SHAPES = {"model.layers.0.self_attn.q_proj": (12, 10, 4), "model.layers.1.self_attn.v_proj": (12, 10, 4)}


@pytest.fixture()
def checkpoint(tmp_path: Path) -> Path:
    return peft_dir(tmp_path / "ck", lora_tensors(SHAPES), r=4, lora_alpha=8)


@pytest.fixture()
def good(checkpoint: Path) -> dict:
    return analyze(checkpoint, emit_warnings=False).to_dict()


def _run(capsys: pytest.CaptureFixture[str], *args: object) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as info:
        main([str(a) for a in args])
    out, err = capsys.readouterr()
    return info.value.code, out, err


def _edit(data: dict, path: tuple, value: object) -> dict:
    data = json.loads(json.dumps(data))
    node = data
    for part in path[:-1]:
        node = node[part]
    if value is _DELETE:
        del node[path[-1]]
    else:
        node[path[-1]] = value
    return data


_DELETE = object()

CASES = [
    (("layers", 1), 5, "layers[1]: expected an object, got an integer"),
    (("layers", 1, "utilization"), [1, 2], "layers[1].utilization: expected a number >= 0 or null, got a list"),
    (("layers", 0, "module"), _DELETE, "layers[0].module: missing (every layer record names its module)"),
    (("layers", 0, "status"), "great", "layers[0].status: expected one of ok, dora_direction_only, zero, non_finite, got 'great'"),
    (("layers", 0, "rank"), 0, "layers[0].rank: expected an integer in [1, 2**40] or null, got an integer"),
    (("layers", 0, "singular_values", 1), "x", "layers[0].singular_values[1]: expected a number >= 0, got a string"),
    (("layers", 0, "collapsed"), "no", "layers[0].collapsed: expected true, false or null, got a string"),
    (("collapse_threshold",), "0.25", "collapse_threshold: expected a number >= 0, got a string"),
    (("summary", "by_module_type", "q_proj", "metrics"), True, "summary.by_module_type.q_proj.metrics: expected an object, got true"),
    (("summary", "metrics", "utilization", "mean"), _DELETE, "summary.metrics.utilization.mean: missing"),
    (("skipped",), [{"name": 3}], "skipped[0].name: expected a string, got an integer"),
    (("warnings",), "one", "warnings: expected a list or null, got a string"),
    (("space",), "weights", "space: expected one of weight, activation, probe, got 'weights'"),
]


@pytest.mark.parametrize(("path", "value", "problem"), CASES, ids=[c[2].split(":")[0] for c in CASES])
def test_from_dict_names_the_json_path(good: dict, path: tuple, value: object, problem: str) -> None:
    with pytest.raises(UsageError) as info:
        Analysis.from_dict(_edit(good, path, value))
    assert str(info.value) == problem


def test_several_analyses_name_the_checkpoint_index(good: dict) -> None:
    from nora_spectra.result import analyses_from_data

    bad = _edit(good, ("layers", 0, "scale"), "big")
    with pytest.raises(UsageError, match=r"^checkpoints\[1\]\.layers\[0\]\.scale: expected a number or null, got a string$"):
        analyses_from_data({"checkpoints": [good, bad]})


def test_round_trip_is_exact_and_missing_columns_are_filled(good: dict) -> None:
    assert Analysis.from_dict(good).to_dict() == good
    minimal = {"layers": [{"module": "model.layers.7.mlp.up_proj", "status": "zero", "rank": 2}]}
    rec = Analysis.from_dict(minimal).records[0]
    assert rec["module_type"] == "up_proj" and rec["layer_index"] == 7 and rec["effective_rank"] is None
    assert "extra" not in Analysis.from_dict(_edit(minimal, ("layers", 0, "extra"), 1)).records[0]


@pytest.mark.parametrize("command", ["compare", "report", "check"])
def test_commands_print_file_and_path_and_exit_2(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, checkpoint: Path, good: dict, command: str
) -> None:
    bad = tmp_path / "base.json"
    bad.write_text(json.dumps(_edit(good, ("layers", 1, "utilization"), [0.5])))
    out_file = tmp_path / "out" / "report.html"
    args = {
        "compare": ["compare", checkpoint, bad],
        "report": ["report", checkpoint, bad, "-o", out_file],
        "check": ["check", checkpoint, "--baseline", bad],
    }[command]
    code, out, err = _run(capsys, *args)
    assert code == 2 and out == ""
    assert err == f"spectra: error: {bad}: layers[1].utilization: expected a number >= 0 or null, got a list\n"
    assert not out_file.exists() and not out_file.parent.exists()


def test_nan_in_a_baseline_and_surrogates_do_not_crash(capsys, tmp_path: Path, checkpoint: Path, good: dict) -> None:
    import re

    base = tmp_path / "base.json"
    base.write_text(re.sub(r'"utilization": [0-9.e-]+', '"utilization": NaN', json.dumps(good), count=1))
    code, out, err = _run(capsys, "check", checkpoint, "--baseline", base, "--format", "json")
    assert code == 2 and err.startswith(f"spectra: error: {base}: layers[0].utilization: NaN is not accepted")
    other = tmp_path / "odd.json"
    other.write_text(json.dumps(_edit(good, ("checkpoint",), "odd")).replace('"odd"', '"odd\\ud800name"'))
    for fmt in ("table", "markdown", "json", "csv"):
        code, out, err = _run(capsys, "compare", checkpoint, other, "--format", fmt)
        assert code == 0, err
        assert "odd\ufffdname" in out or "odd\\ufffdname" in out
