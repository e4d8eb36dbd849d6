"""Every -o/--output/--junit/baseline writer: parents created, and a failing command never touches an existing file."""

from __future__ import annotations

from pathlib import Path

import pytest

from nora_spectra.cli.main import main
from tests.nora_spectra.io_builders import lora_tensors, peft_dir

SHAPES = {"model.layers.0.self_attn.q_proj": (12, 10, 4), "model.layers.1.self_attn.v_proj": (12, 10, 4)}


@pytest.fixture()
def good(tmp_path: Path) -> Path:
    return peft_dir(tmp_path / "good", lora_tensors(SHAPES), r=4, lora_alpha=8)


@pytest.fixture()
def bad(tmp_path: Path) -> Path:
    path = peft_dir(tmp_path / "bad", lora_tensors(SHAPES), r=4, lora_alpha=8)
    (path / "adapter_config.json").write_text('{"r": 4, "lora_alpha": [')
    return path


def _run(capsys, *args: object) -> tuple[int, str]:
    with pytest.raises(SystemExit) as info:
        main([str(a) for a in args])
    return info.value.code, capsys.readouterr().err


def _commands(good: Path, bad: Path, out: Path) -> dict[str, list[object]]:
    return {
        "analyze": ["analyze", good, bad, "--format", "json", "-o", out],
        "compare": ["compare", good, bad, "-o", out],
        "report-html": ["report", good, bad, "-o", out],
        "check-junit": ["check", good, bad, "--min-utilization", "0.1", "--junit", out],
        "update-baseline": ["check", good, bad, "--baseline", out, "--update-baseline"],
    }


@pytest.mark.parametrize("name", ["analyze", "compare", "report-html", "check-junit", "update-baseline"])
def test_a_failing_command_leaves_the_existing_output_alone(capsys, tmp_path: Path, good: Path, bad: Path, name: str):
    out = tmp_path / "out" / ("report.html" if name.startswith("report") else "result.json")
    out.parent.mkdir()
    out.write_text("OLD")
    before = out.stat().st_mtime_ns
    code, err = _run(capsys, *_commands(good, bad, out)[name])
    assert code == 2 and err.count("\n") == 1 and "adapter_config.json" in err
    assert out.read_text() == "OLD" and out.stat().st_mtime_ns == before
    assert sorted(p.name for p in out.parent.iterdir()) == [out.name]  # no temporary file left either


@pytest.mark.parametrize("name", ["analyze", "compare", "report-html", "check-junit", "update-baseline"])
def test_missing_parent_directories_are_created(capsys, tmp_path: Path, good: Path, name: str) -> None:
    out = tmp_path / "new_dir" / "deeper" / ("report.html" if name.startswith("report") else "result.json")
    args = [a for a in _commands(good, good, out)[name]]
    code, err = _run(capsys, *args)
    assert code == 0, err
    assert out.is_file() and out.stat().st_size > 0


def test_report_markdown_into_a_new_directory(capsys, tmp_path: Path, good: Path) -> None:
    out = tmp_path / "new_dir" / "report.md"
    code, err = _run(capsys, "report", good, "-o", out)
    assert code == 0, err
    assert out.is_file() and (out.parent / "report_files").is_dir()
