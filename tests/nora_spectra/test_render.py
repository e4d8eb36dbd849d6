"""Renderers format what the records say: CSV reads back exactly, Markdown to its rounding, no recomputing."""

from __future__ import annotations

import csv
import io
import json
import re

import numpy as np
import pytest

from nora_spectra.analysis import LAYER_COLUMNS, analyze
from nora_spectra.render import FORMATS, render
from nora_spectra.render.table import render_table
from nora_spectra.render.text_formats import CSV_COLUMNS, render_csv, render_json, render_markdown
from tests.nora_spectra.test_analysis import SHAPES, random_factors, write_peft_dir


@pytest.fixture()
def result(tmp_path):
    rng = np.random.default_rng(11)
    factors = random_factors(rng, 8, SHAPES, decay=0.4)
    a, b = factors["model.layers.1.mlp.down_proj"]
    factors["model.layers.1.mlp.down_proj"] = (a, np.zeros_like(b))
    a, b = factors["model.layers.1.self_attn.q_proj"]
    a = a.copy()
    a[2, 3] = np.inf
    factors["model.layers.1.self_attn.q_proj"] = (a, b)
    return analyze(write_peft_dir(tmp_path / "ck", factors, r=8, alpha=16), emit_warnings=False)


def _parse_csv_cell(key: str, text: str):
    if text == "":
        return None
    if key in ("shape", "singular_values"):
        return json.loads(text)
    if key == "collapsed":
        return {"true": True, "false": False}[text]
    if key in ("rank", "layer_index", "energy_rank_90", "energy_rank_99", "numerical_rank"):
        return int(text)
    if key in ("module", "key", "module_type", "kind", "layer_type", "dtype", "status"):
        return text
    return float(text)


def test_csv_reads_back_the_exact_records(result):
    rows = list(csv.reader(io.StringIO(render_csv(result))))
    assert tuple(rows[0]) == CSV_COLUMNS
    assert len(rows) == 1 + len(result)
    for row, record in zip(rows[1:], result.records):
        assert row[0] == result.checkpoint and row[1] == ""  # default adapter: empty cell
        parsed = {key: _parse_csv_cell(key, cell) for key, cell in zip(LAYER_COLUMNS, row[2:])}
        assert parsed == record


def test_csv_of_several_checkpoints_has_one_header(result):
    text = render([result, result], "csv")
    rows = list(csv.reader(io.StringIO(text)))
    assert len(rows) == 1 + 2 * len(result)


def test_markdown_reads_back_to_its_rounding(result):
    text = render_markdown(result)
    assert text.startswith(f"## `{result.checkpoint}`")
    lines = [line for line in text.splitlines() if line.startswith("| `")]
    assert len(lines) == len(result)
    header = next(line for line in text.splitlines() if line.startswith("| module | kind"))
    titles = [c.strip() for c in header.strip("|").split("|")]
    for line, record in zip(lines, result.records):
        cells = dict(zip(titles, (c.strip() for c in line.strip("|").split("|"))))
        assert cells["module"] == f"`{record['module']}`"
        assert cells["status"] == record["status"]
        assert int(cells["r"]) == record["rank"]
        if record["status"] == "non_finite":
            assert cells["erank"] == "-" and cells["util"] == "-"
            continue
        assert float(cells["erank"]) == pytest.approx(record["effective_rank"], abs=0.005)
        assert float(cells["util"]) == pytest.approx(record["utilization"], abs=0.0005)
        assert float(cells["stable"]) == pytest.approx(record["stable_rank"], abs=0.005)
        assert int(cells["e90"]) == record["energy_rank_90"]
        assert float(cells["sigma_max"]) == pytest.approx(record["sigma_max"], rel=1e-3, abs=1e-12)
    assert "> warning:" in text
    mean_util = result.summary["metrics"]["utilization"]["mean"]
    assert f"mean {mean_util:.4f}" in text


def test_json_one_object_or_checkpoints(result):
    one = json.loads(render_json(result))
    assert one["layers"] == json.loads(result.to_json())["layers"]
    many = json.loads(render([result, result], "json"))
    assert list(many) == ["checkpoints"] and len(many["checkpoints"]) == 2


def test_table_full_and_effective_rank_views(result):
    full = render_table(result)
    focus = render_table(result, effective_rank=True)
    for record in result.records:
        assert record["module"] in full and record["module"] in focus
    header_full = full.splitlines()[2].split()
    header_focus = focus.splitlines()[2].split()
    assert header_focus == ["module", "r", "effective_rank", "utilization", "collapsed", "status"]
    assert "stable" in header_full and "e90" in header_full and "status" in header_full
    assert "non_finite" in focus and "zero" in focus
    assert "module type" in full
    assert "\nlayer " not in full
    assert "\nlayer " in render_table(result, by_layer=True)


def test_renderers_never_recompute(result):
    # A renderer shows the stored numbers, even if they were edited after the analysis.
    result.records[0]["effective_rank"] = 123.456
    result.records[0]["utilization"] = 0.987654
    assert "123.46" in render_table(result, effective_rank=True)
    assert "0.988" in render_table(result, effective_rank=True)
    assert "123.4560" not in render_markdown(result)  # layer table rounds to 2 decimals
    assert "| 123.46 |" in render_markdown(result)
    assert "123.456" in render_csv(result)


def test_unknown_format(result):
    assert set(FORMATS) == {"table", "json", "csv", "markdown"}
    with pytest.raises(ValueError, match="unknown format"):
        render(result, "html")


def test_table_of_empty_summary_numbers_shows_dashes(result):
    for record in result.records:
        record["status"] = "non_finite"
    from nora_spectra.summary import summarize

    result.summary = summarize(result.records)
    text = render_table(result)
    assert re.search(r"^effective_rank\s+-\s+-\s+-\s+-\s+-$", text, re.M)
    assert "nan" not in text.lower()
