"""`spectra census`: a self-contained HTML page whose numbers are those of the scan's tables."""

from __future__ import annotations

import html
import json
import re
from pathlib import Path

import numpy as np
import pytest

from nora_spectra import load_scan
from nora_spectra.scan import build_census, scan
from tests.nora_spectra.io_builders import lora_tensors, peft_dir
from tests.nora_spectra.test_cli_compare import run


@pytest.fixture(scope="module")
def scan_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("census")
    rng = np.random.default_rng(5)
    for i in range(8):
        r = (4, 8, 16)[i % 3]
        tensors = lora_tensors({f"model.layers.{j}.self_attn.{t}": (40, 36, r) for j in range(2) for t in ("q_proj", "v_proj")},
                               seed=i)
        if i % 2:  # a collapsed adapter: one direction dominates every B
            for key in [k for k in tensors if k.endswith("lora_B.weight")]:
                tensors[key][:, 1:] *= 1e-3
        peft_dir(root / "tree" / f"run{i}", tensors, r=r, lora_alpha=r,
                 base_model_name_or_path=("org/base-a", "org/base-b")[i % 2])
    (root / "tree" / "broken.safetensors").write_bytes(b"\x10" + bytes(rng.integers(0, 255, 30, dtype=np.uint8)))
    scan([root / "tree"], output=root / "out", workers=1)
    return root / "out"


def _values(page: str, key: str) -> list:
    return [json.loads(html.unescape(v)) for v in re.findall(rf'data-key="{key}" data-value="([^"]*)"', page)]


def test_census_html_is_self_contained_and_holds_the_tables_numbers(scan_dir: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "reports" / "census.html"
    code, stdout, err = run(["census", str(scan_dir), "-o", str(out), "--dpi", "50"], capsys)
    assert code == 0 and stdout == "" and "wrote" in err and "4 plots" in err
    page = out.read_text()
    assert page.startswith("<!DOCTYPE html>") and "<script" not in page
    assert not re.search(r'(src|href)="(https?:)?//', page)
    assert page.count('src="data:image/png;base64,') == 4

    adapters, layers = load_scan(scan_dir)
    known = layers[layers["status"].isin(["ok", "dora_direction_only", "zero"])]
    share = float((known["collapsed"] == True).sum()) / len(known)  # noqa: E712
    assert 0 < share < 1
    assert _values(page, "collapsed_share")[0] == share
    medians = {int(r): float(np.median(g["utilization"])) for r, g in known.groupby("rank")}
    by_rank = re.search(r'<table class="groups by-rank">(.*?)</table>', page, re.S).group(1)
    assert _values(by_rank, "median_utilization") == [medians[r] for r in sorted(medians)]
    by_base = re.search(r'<table class="groups by-base_model">(.*?)</table>', page, re.S).group(1)
    assert sorted(re.findall(r'<td class="t">(org/base-[ab])</td>', by_base)) == ["org/base-a", "org/base-b"]

    failed = adapters[adapters["status"] == "error"]
    assert len(failed) == 1 and html.escape(failed["error"].item()) in page
    slowest = re.search(r'<table class="slowest">(.*?)</table>', page, re.S).group(1)
    seconds = _values(slowest, "seconds")
    ok = adapters[adapters["status"] == "ok"]  # the slowest adapters that were analysed
    assert seconds == sorted(seconds, reverse=True) and seconds[0] == ok["seconds"].max()


def test_census_data_counts(scan_dir: Path) -> None:
    data = build_census(scan_dir, figures=False)
    adapters, layers = load_scan(scan_dir)
    assert data.counts["adapters"] == len(adapters) == 9 and data.counts["errors"] == 1
    assert data.counts["modules"] == len(layers) == 32 and data.counts["formats"] == {"peft": 8}
    assert [row["group"] for row in data.groups["rank"]] == ["4", "8", "16"]
    assert {row["group"]: row["modules"] for row in data.groups["module_type"]} == {"q_proj": 16, "v_proj": 16}
    assert sum(len(v) for v in data.values["rank"]["utilization"].values()) == 32
    assert data.figures == []


def test_census_needs_an_html_output(scan_dir: Path, tmp_path: Path, capsys) -> None:
    code, _, err = run(["census", str(scan_dir), "-o", str(tmp_path / "c.pdf")], capsys)
    assert code == 2 and "name it .html" in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("content, problem", [
    (b'{"kind": "nora-spectra scan", "settings": [1', "not valid JSON"),
    (b"\xff\xfe", "not UTF-8"),
    (b"[" * 100_000, "nested deeper"),
    (b'{"kind": "something else", "settings": {}}', "not the settings of a spectra scan"),
])
def test_census_refuses_a_damaged_scan_json_in_one_line(scan_dir: Path, tmp_path: Path, capsys, content: bytes,
                                                       problem: str) -> None:
    import shutil

    damaged = tmp_path / "out"
    shutil.copytree(scan_dir, damaged)
    (damaged / "scan.json").write_bytes(content)
    code, _, err = run(["census", str(damaged), "-o", str(tmp_path / "c.html")], capsys)
    assert code == 2 and problem in err and str(damaged / "scan.json") in err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "c.html").exists()
