"""``spectra demo``: trains real LoRA and NoRA adapters on built-in data and analyses them, quickly."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

pytest.importorskip("torch")

from nora_spectra.analysis import analyze  # noqa: E402
from nora_spectra.cli.demo import DemoSettings, command, run_demo  # noqa: E402


def test_demo_command_writes_and_analyses_both_checkpoints(tmp_path):
    out_dir = tmp_path / "demo"
    result = CliRunner().invoke(command, ["--output-dir", str(out_dir)])
    assert result.exit_code == 0, result.output
    assert "== LORA" in result.output and "== NORA" in result.output
    assert "mean utilization: LoRA" in result.output
    assert "NoRA/LoRA mean utilization" in result.output
    for method in ("lora", "nora"):
        config = json.loads((out_dir / method / "adapter_config.json").read_text())
        assert config["r"] == 16
        analysis = analyze(out_dir / method, emit_warnings=False)
        assert analysis.method == method
        assert len(analysis) == 4
        assert all(rec["status"] == "ok" for rec in analysis.records)  # trained: no zero B left
        assert f"{analysis.summary['metrics']['utilization']['mean']:.3f}" in result.output
    html = (out_dir / "report.html").read_text(encoding="utf-8")
    assert f"report with plots: {out_dir / 'report.html'}" in result.output
    for method in ("lora", "nora"):
        for record in analyze(out_dir / method, emit_warnings=False).records:
            assert record["module"] in html
    assert html.count("data:image/png;base64,") >= 3


def test_training_really_reduces_the_loss(tmp_path):
    short = run_demo(str(tmp_path / "short"), DemoSettings(steps=5))
    full = run_demo(str(tmp_path / "full"), DemoSettings(steps=200))
    for method in ("lora", "nora"):
        assert full["loss"][method] < 0.5 * short["loss"][method]
