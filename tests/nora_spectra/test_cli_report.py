"""`spectra report`: HTML and Markdown outputs, labels and title, exit code 2 with one line for bad input."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.nora_spectra.test_cli_compare import run
from tests.nora_spectra.test_compare import random_checkpoint


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(random_checkpoint(tmp_path_factory.mktemp("cli_report") / "nora", kind="nora", r=4, seed=3))


def test_html_report(checkpoint: str, capsys, tmp_path: Path) -> None:
    out = tmp_path / "r.html"
    code, stdout, err = run(["report", checkpoint, "-o", str(out), "--labels", "mine", "--title", "My <run>",
                             "--dpi", "50"], capsys)
    assert code == 0 and stdout == "" and "wrote" in err
    text = out.read_text()
    assert text.startswith("<!DOCTYPE html>") and "<title>My &lt;run&gt;</title>" in text and 'data-label="mine"' in text


def test_markdown_report(checkpoint: str, capsys, tmp_path: Path) -> None:
    out = tmp_path / "r.md"
    code, _, _ = run(["report", checkpoint, "-o", str(out), "-q", "--dpi", "50"], capsys)
    assert code == 0 and out.read_text().startswith("# Adapter spectra report")
    assert sorted(p.name for p in (tmp_path / "r_files").iterdir())[0].endswith(".png")


@pytest.mark.parametrize(
    "argv, message",
    [
        (["report", "/no/such/path", "-o", "{tmp}/r.html"], "no such file or directory"),
        (["report", "{ckpt}", "-o", "{tmp}/r.pdf"], "cannot tell the report format"),
        (["report", "{ckpt}", "-o", "{tmp}"], "is a directory"),
        (["report", "{ckpt}", "-o", "{tmp}/r.html", "--labels", "a,b"], "2 labels for 1 paths"),
    ],
)
def test_bad_input_exits_2_with_one_line(checkpoint: str, capsys, tmp_path: Path, argv: list[str], message: str) -> None:
    argv = [a.format(tmp=tmp_path, ckpt=checkpoint) for a in argv]
    code, out, err = run(argv, capsys)
    assert code == 2 and out == ""
    assert len(err.strip().splitlines()) == 1 and message in err
    assert not (tmp_path / "r.html").exists()


def test_output_is_required(checkpoint: str, capsys) -> None:
    code, _, err = run(["report", checkpoint], capsys)
    assert code == 2 and "--output" in err
