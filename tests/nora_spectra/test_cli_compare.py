"""`spectra compare`: formats, labels, --output, and exit code 2 with one line on stderr for bad input."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import pytest

from nora_spectra.cli.main import main
from nora_spectra.comparison import ROW_COLUMNS
from tests.nora_spectra.test_compare import random_checkpoint


def run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exc:
        main(argv)
    out, err = capsys.readouterr()
    return exc.value.code, out, err


@pytest.fixture(scope="module")
def paths(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    root = tmp_path_factory.mktemp("cli_compare")
    return [
        str(random_checkpoint(root / "lora", kind="lora", r=8, decay=3.0, seed=1)),
        str(random_checkpoint(root / "nora", kind="nora", r=8, decay=0.5, seed=2, types=("q_proj", "v_proj", "k_proj"))),
    ]


def test_table_lists_every_module_and_the_partial_ones(paths: list[str], capsys) -> None:
    code, out, err = run(["compare", *paths], capsys)
    assert code == 0 and err == ""
    assert "lora (reference)" in out and "Δerank nora" in out
    for i in range(2):
        for t in ("q_proj", "v_proj", "k_proj"):
            assert f"model.layers.{i}.self_attn.{t}" in out
    assert "modules not in every checkpoint" in out and "k_proj: only in nora (missing from lora)" in out


def test_json_csv_markdown_and_labels(paths: list[str], capsys) -> None:
    code, out, _ = run(["compare", *paths, "--format", "json", "--labels", "base,new"], capsys)
    data = json.loads(out)
    assert code == 0 and data["reference"] == "base" and len(data["modules"]) == 12
    row = next(r for r in data["modules"] if r["label"] == "new" and r["module"].endswith("0.self_attn.q_proj"))
    ref = next(r for r in data["modules"] if r["label"] == "base" and r["module"] == row["module"])
    assert row["d_effective_rank"] == pytest.approx(row["effective_rank"] - ref["effective_rank"], rel=1e-12)
    code, out, _ = run(["compare", *paths, "--format", "csv"], capsys)
    rows = list(csv.reader(io.StringIO(out)))
    assert code == 0 and tuple(rows[0]) == ROW_COLUMNS and len(rows) == 13
    code, out, _ = run(["compare", *paths, "--format", "markdown", "--by-layer"], capsys)
    assert code == 0 and out.startswith("## Comparison") and "| `model.layers.1.self_attn.k_proj` |" in out


def test_output_file(paths: list[str], capsys, tmp_path: Path) -> None:
    target = tmp_path / "cmp.json"
    code, out, err = run(["compare", *paths, "--format", "json", "-o", str(target)], capsys)
    assert code == 0 and out == "" and "wrote" in err
    assert json.loads(target.read_text())["checkpoints"][1]["method"] == "nora"


@pytest.mark.parametrize(
    "args, message",
    [
        (["{a}", "/no/such/checkpoint"], "no such file or directory"),
        (["{a}"], "at least two checkpoints"),
        (["{a}", "{b}", "--labels", "x,y,z"], "3 labels for 2"),
    ],
)
def test_bad_input_exits_2_with_one_line(paths: list[str], capsys, args: list[str], message: str) -> None:
    code, out, err = run(["compare"] + [arg.format(a=paths[0], b=paths[1]) for arg in args], capsys)
    assert code == 2 and out == ""
    assert len(err.strip().splitlines()) == 1 and message in err and err.startswith("spectra: error:")


def test_adapter_names_are_in_labels_and_headers(tmp_path: Path, capsys) -> None:
    from nora_spectra.analysis import analyze
    from nora_spectra.comparison import compare

    multi = tmp_path / "multi"
    random_checkpoint(multi / "code", kind="lora", r=8, decay=3.0, seed=1)
    random_checkpoint(multi / "math", kind="lora", r=8, decay=0.5, seed=2)
    code, out, _ = run(["compare", str(multi), str(multi), "--adapter", "code", "--format", "json"], capsys)
    data = json.loads(out)
    assert code == 0 and [c["label"] for c in data["checkpoints"]] == ["multi/code", "multi/code#2"]
    assert [c["adapter"] for c in data["checkpoints"]] == ["code", "code"]
    code, out, _ = run(["compare", str(multi), str(multi), "--adapter", "code"], capsys)
    assert f"multi/code (reference): {multi} (adapter code)  (format peft" in out
    # two adapters of one directory: labelled by their names, not multi / multi#2
    cmp = compare([analyze(multi, adapter=name, emit_warnings=False) for name in ("code", "math")])
    assert cmp.labels == ["multi/code", "multi/math"]
