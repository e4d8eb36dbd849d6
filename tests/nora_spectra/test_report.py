"""Reports: every module with exactly the numbers of the JSON analysis, self-contained HTML, Markdown + PNGs."""

from __future__ import annotations

import json
import re
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest

from nora_spectra.analysis import analyze
from nora_spectra.comparison import compare
from nora_spectra.errors import CheckpointError, UsageError
from nora_spectra.render.html import analysis_html, comparison_html
from nora_spectra.report import build_report, read_run, report
from tests.nora_spectra.test_compare import diagonal_factors, random_checkpoint, write_peft


class Collector(HTMLParser):
    """Collects tags and attributes, and the data-key/data-value cells of each module row."""

    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.cells: dict[tuple[str, str], dict[str, object]] = {}
        self.ids: list[str] = []
        self._table_label: str | None = None
        self._module: str | None = None
        self.text: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        self.tags.append((tag, a))
        if "id" in a:
            self.ids.append(a["id"])
        if tag == "table":
            self._table_label = a.get("data-label") if "modules" in (a.get("class") or "") else None
        elif tag == "tr":
            self._module = a.get("data-module")
        elif tag == "td" and self._table_label and self._module and "data-key" in a:
            row = self.cells.setdefault((self._table_label, self._module), {})
            row[a["data-key"]] = json.loads(a["data-value"]) if "data-value" in a else None

    def handle_endtag(self, tag: str) -> None:
        if tag == "table":
            self._table_label = None

    def handle_data(self, data: str) -> None:
        self.text.append(data)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("report")
    lora = random_checkpoint(root / "lora", kind="lora", r=8, decay=3.0, seed=1)
    nora = random_checkpoint(root / "nora", kind="nora", r=8, decay=0.3, seed=2)
    # one collapsed module (one dominant direction) and one all-zero update
    collapsed = write_peft(
        root / "collapsed",
        {
            "model.layers.0.self_attn.q_proj": diagonal_factors([100] + [0.01] * 7),
            "model.layers.0.self_attn.v_proj": diagonal_factors([1] * 8),
            "model.layers.1.self_attn.q_proj": (np.ones((8, 12)), np.zeros((12, 8))),
        },
        r=8,
    )
    run = root / "run"
    run.mkdir()
    lines = []
    for step in (10, 20, 30, 40):
        rec = {"step": step, "train_loss": 4.0 / step, "lr": 1e-3, "tokens_per_s": 100.0}
        if step % 20 == 0:
            rec.update(val_loss=4.5 / step, val_ppl=float(np.exp(4.5 / step)))
            rec["spectra"] = [{"module": "model.layers.0.self_attn.q_proj", "module_type": "q_proj", "rank": 8,
                               "effective_rank": step / 10, "utilization": step / 80, "stable_rank": 1.0,
                               "sigma_max": 1.0, "status": "ok"}]
        lines.append(json.dumps(rec))
    (run / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    (run / "train_config.json").write_text(json.dumps({"steps": 40, "lr": 0.001}))
    random_checkpoint(run / "checkpoints" / "step-000020", kind="nora", r=8, seed=4)
    random_checkpoint(run / "checkpoints" / "step-000040", kind="nora", r=8, seed=5)
    return {"lora": lora, "nora": nora, "collapsed": collapsed, "run": run, "root": root}


@pytest.fixture(scope="module")
def html_report(checkpoints: dict[str, Path]) -> tuple[str, Collector, dict]:
    out = checkpoints["root"] / "report.html"
    data = report([checkpoints["lora"], checkpoints["nora"], checkpoints["collapsed"]], out,
                  labels=["LoRA", "NoRA", "bad"], title="Spectra <b>&</b> co", dpi=40)
    text = out.read_text(encoding="utf-8")
    parser = Collector()
    parser.feed(text)
    parser.close()
    return text, parser, data


def test_html_report_has_every_module_with_the_numbers_of_the_json_analysis(checkpoints, html_report) -> None:
    _, parser, _ = html_report
    for label, name in (("LoRA", "lora"), ("NoRA", "nora"), ("bad", "collapsed")):
        expected = json.loads(analyze(checkpoints[name], emit_warnings=False).to_json())["layers"]
        assert {m for (lab, m) in parser.cells if lab == label} == {rec["module"] for rec in expected}
        for rec in expected:
            cells = parser.cells[(label, rec["module"])]
            for key in ("rank", "effective_rank", "utilization", "stable_rank", "energy_rank_90", "energy_rank_99",
                        "numerical_rank", "spectral_entropy", "tail_energy", "sigma_max", "collapsed", "status"):
                assert cells[key] == rec[key], (label, rec["module"], key)


def test_html_is_self_contained(html_report) -> None:
    text, parser, data = html_report
    assert not re.search(r"https?:", text, re.IGNORECASE)
    assert "@import" not in text and "url(" not in text
    tags = [tag for tag, _ in parser.tags]
    assert "link" not in tags and "script" not in tags and "iframe" not in tags
    sources = [a["src"] for _, a in parser.tags if "src" in a]
    assert len(sources) == len(data.figures) >= 4
    assert all(src.startswith("data:image/png;base64,") for src in sources)
    hrefs = [a["href"] for _, a in parser.tags if "href" in a]
    assert hrefs and all(h.startswith("#") for h in hrefs)


def test_html_sections_in_order_with_collapse_warnings_first(html_report) -> None:
    text, parser, _ = html_report
    order = [i for i in parser.ids if i in ("warnings", "summary", "modules", "plots", "configs")]
    assert order == ["warnings", "summary", "modules", "plots", "configs"]
    warnings_part = text[text.index('id="warnings"') : text.index('id="summary"')]
    assert "<b>bad</b>: 2 of 3 layers collapsed" in warnings_part  # the all-zero layer (utilization 0) too
    assert warnings_part.index("collapsed") < warnings_part.index("all-zero")
    assert "Spectra &lt;b&gt;&amp;&lt;/b&gt; co" in text  # the title is escaped
    assert '"peft_type": &quot;' not in text and "&quot;peft_type&quot;" in text  # configs shown, escaped


def test_report_data_comparison_and_figures(html_report) -> None:
    _, _, data = html_report
    assert data.labels == ["LoRA", "NoRA", "bad"]
    assert data.comparison is not None and data.comparison.reference == "LoRA"
    names = [f.name for f in data.figures]
    assert names[:3] == ["spectrum_decay", "effective_rank_vs_rank", "cumulative_energy"]
    assert "utilization_heatmap" in names and "training_loss" not in names
    assert data.warnings[0]["kind"] == "collapse" and data.warnings[0]["modules"] == [
        "model.layers.0.self_attn.q_proj",
        "model.layers.1.self_attn.q_proj",  # the all-zero layer: utilization 0
    ]


def test_markdown_report_writes_pngs_next_to_it(checkpoints, tmp_path: Path) -> None:
    out = tmp_path / "report.md"
    data = report([checkpoints["lora"], checkpoints["nora"]], out, dpi=40)
    text = out.read_text()
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text)
    assert len(links) == len(data.figures)
    for link in links:
        assert link.startswith("report_files/") and (tmp_path / link).read_bytes()[:4] == b"\x89PNG"
    for analysis in data.analyses:
        for rec in analysis.records:
            assert rec["module"] in text
    assert text.index("## Warnings") < text.index("## Summary") < text.index("## Plots") < text.index("## Adapter configs")


def test_run_directory_adds_training_plots_and_its_latest_adapter(checkpoints, tmp_path: Path) -> None:
    run = read_run(checkpoints["run"])
    assert len(run.history) == 4 and run.adapter.endswith("step-000040") and run.config == {"steps": 40, "lr": 0.001}
    out = tmp_path / "run.html"
    data = report([checkpoints["lora"], checkpoints["run"]], out, dpi=40)
    assert data.labels == ["lora", "run"] and data.analyses[1].checkpoint.endswith("step-000040")
    names = [f.name for f in data.figures]
    assert "training_loss" in names and "effective_rank_trajectory" in names
    text = out.read_text()
    assert 'id="runs"' in text and "step-000040" in text


def test_analysis_json_input_gives_the_same_numbers(checkpoints, tmp_path: Path) -> None:
    analysis = analyze(checkpoints["nora"], emit_warnings=False)
    file = tmp_path / "nora.json"
    file.write_text(analysis.to_json())
    data = build_report([file], dpi=40)
    assert data.labels == ["nora"] and data.analyses[0].records == json.loads(analysis.to_json())["layers"]
    assert data.comparison is None  # one checkpoint: nothing to compare (compare() needs two)


def test_bad_inputs(checkpoints, tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="no such file"):
        build_report([tmp_path / "missing"])
    with pytest.raises(UsageError, match="suffix"):
        report([checkpoints["lora"]], tmp_path / "report.pdf")
    with pytest.raises(UsageError, match="labels"):
        build_report([checkpoints["lora"]], labels=["a", "b"])
    bad_run = tmp_path / "badrun"
    bad_run.mkdir()
    (bad_run / "metrics.jsonl").write_text('{"step": 1}\nnot json\n')
    with pytest.raises(CheckpointError, match="line 2"):
        build_report([bad_run])
    with pytest.raises(UsageError, match="it is a directory"):
        report([checkpoints["lora"]], tmp_path)
    # a missing output directory is created (one rule for every writer), images before the Markdown
    report([checkpoints["lora"]], tmp_path / "new" / "dir" / "r.md")
    assert (tmp_path / "new" / "dir" / "r.md").read_text().startswith("# Adapter spectra report")
    assert any((tmp_path / "new" / "dir" / "r_files").iterdir())


def test_notebook_fragments(checkpoints) -> None:
    analysis = analyze(checkpoints["lora"], emit_warnings=False)
    fragment = analysis_html(analysis)
    parser = Collector()
    parser.feed(fragment)
    assert all(rec["module"] in fragment for rec in analysis.records)
    assert "<script" not in fragment
    cmp = compare([checkpoints["lora"], checkpoints["collapsed"]], emit_warnings=False)
    html = comparison_html(cmp)
    assert "not in every checkpoint" in html and "(reference)" in html
    assert html == cmp._repr_html_()
