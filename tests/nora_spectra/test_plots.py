"""Plot functions: one line per checkpoint, data taken from the records, labelled axes, headless PNGs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from nora_spectra import plots
from nora_spectra.analysis import analyze
from nora_spectra.comparison import compare
from tests.nora_spectra.test_compare import random_checkpoint


@pytest.fixture(scope="module")
def comparison(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("plots")
    paths = [
        random_checkpoint(root / "lora8", kind="lora", r=8, decay=3.0, seed=1),
        random_checkpoint(root / "nora8", kind="nora", r=8, decay=0.5, seed=2),
        random_checkpoint(root / "lora4", kind="lora", r=4, decay=3.0, seed=3, types=("q_proj", "v_proj", "o_proj")),
    ]
    return compare(paths, emit_warnings=False)


def _curves(fig):
    return [line for line in fig.axes[0].get_lines() if not line.get_label().startswith("_")]


def _labelled(fig) -> None:
    for ax in fig.axes[:1]:
        assert ax.get_xlabel() and ax.get_ylabel()
    assert fig.axes[0].get_title() or (fig._suptitle is not None and fig._suptitle.get_text())


def test_spectrum_decay_averaged_draws_one_l1_line_per_checkpoint(comparison) -> None:
    fig = plots.spectrum_decay(comparison)
    lines = fig.axes[0].get_lines()
    assert len(lines) == 3
    assert [line.get_label().split(" ")[0] for line in lines] == comparison.labels
    assert "L1-normalised" in fig.axes[0].get_title() and fig.axes[0].get_yscale() == "log"
    _labelled(fig)
    # the L1 average by hand from the stored singular values of the first checkpoint
    spectra = [np.asarray(r["singular_values"]) for r in comparison.analyses[0].records]
    expected = np.mean([s / s.sum() for s in spectra], axis=0)
    np.testing.assert_allclose(lines[0].get_ydata(), expected, rtol=1e-12)
    assert "max-normalised" in plots.spectrum_decay(comparison, average="max").axes[0].get_title()
    with pytest.raises(ValueError):
        plots.spectrum_decay(comparison, average="median")


def test_spectrum_decay_of_one_module(comparison) -> None:
    module = "model.layers.1.self_attn.v_proj"
    fig = plots.spectrum_decay(comparison, module=module)
    lines = fig.axes[0].get_lines()
    assert [line.get_label() for line in lines] == comparison.labels
    record = next(r for r in comparison.analyses[1].records if r["module"] == module)
    sigma = np.asarray(record["singular_values"])
    np.testing.assert_allclose(lines[1].get_ydata(), sigma / sigma[0], rtol=1e-12)
    assert module in fig.axes[0].get_title() and fig.axes[0].get_ylabel() == "σ_i / σ_1"
    # a module only one checkpoint has: one line
    only = plots.spectrum_decay(comparison, module="model.layers.0.self_attn.o_proj")
    assert [line.get_label() for line in only.axes[0].get_lines()] == ["lora4"]


def test_effective_rank_vs_rank_has_one_line_per_method_and_y_equals_r(comparison) -> None:
    fig = plots.effective_rank_vs_rank(comparison)
    lines = {line.get_label(): line for line in _curves(fig)}
    assert set(lines) == {"lora", "nora", "y = r (every direction used)"}
    lora = lines["lora"]
    assert list(lora.get_xdata()) == [4, 8]
    summaries = {a.checkpoint.rsplit("/", 1)[-1]: a.summary for a in comparison.analyses}
    assert lora.get_ydata()[0] == summaries["lora4"]["metrics"]["effective_rank"]["mean"]
    assert lora.get_ydata()[1] == summaries["lora8"]["metrics"]["effective_rank"]["mean"]
    ref = lines["y = r (every direction used)"]
    np.testing.assert_allclose(ref.get_xdata(), ref.get_ydata())
    _labelled(fig)
    custom = plots.effective_rank_vs_rank(comparison, series=["a", "b", "a"], module_type="q_proj")
    assert {line.get_label() for line in custom.axes[0].get_lines()} >= {"a", "b"}
    assert "q_proj" in custom.axes[0].get_title()


def test_utilization_heatmap_cells_are_record_utilizations(comparison) -> None:
    fig = plots.utilization_heatmap(comparison)
    panels = [ax for ax in fig.axes if ax.get_images()]
    assert len(panels) == 3
    grid = panels[2].get_images()[0].get_array()
    assert grid.shape == (2, 3)  # layers x (q_proj, v_proj, o_proj) of lora4
    records = {r["module"]: r for r in comparison.analyses[2].records}
    cols = [t.get_text() for t in panels[2].get_xticklabels()]
    for i in range(2):
        for j, name in enumerate(cols):
            assert grid[i, j] == records[f"model.layers.{i}.self_attn.{name}"]["utilization"]
    assert panels[0].get_xlabel() == "module type" and panels[0].get_ylabel() == "layer index"
    assert fig._suptitle.get_text()


def test_cumulative_energy_lines_and_marks(comparison) -> None:
    fig = plots.cumulative_energy(comparison)
    curves = _curves(fig)
    assert len(curves) == 3 and all(line.get_ydata()[-1] == pytest.approx(1.0) for line in curves)
    levels = sorted(float(line.get_ydata()[0]) for line in fig.axes[0].get_lines() if line.get_label().startswith("_"))
    assert levels == [0.9, 0.99]
    _labelled(fig)
    module = "model.layers.0.self_attn.q_proj"
    one = plots.cumulative_energy(comparison, module=module)
    assert [line.get_label() for line in _curves(one)] == comparison.labels
    record = next(r for r in comparison.analyses[0].records if r["module"] == module)
    markers = [line for line in one.axes[0].get_lines() if line.get_marker() == "o"]
    assert record["energy_rank_90"] in {int(m.get_xdata()[0]) for m in markers}


HISTORY = [
    {"step": s, "train_loss": 3.0 / s, "lr": 1e-3, **({"val_loss": 3.5 / s, "val_ppl": 1.0} if s % 20 == 0 else {}),
     **({"spectra": [{"module": f"model.layers.{i}.self_attn.{t}", "module_type": t, "rank": 8,
                      "effective_rank": s / 10 + i, "utilization": s / 80, "stable_rank": 1.0, "sigma_max": 1.0}
                     for i in range(2) for t in ("q_proj", "v_proj")]} if s % 10 == 0 else {})}
    for s in range(5, 45, 5)
]


def test_training_plots_from_step_records() -> None:
    fig = plots.training_loss({"lora": HISTORY, "nora": HISTORY})
    labels = [line.get_label() for line in fig.axes[0].get_lines()]
    assert labels == ["lora: train", "lora: validation", "nora: train", "nora: validation"]
    assert list(fig.axes[0].get_lines()[1].get_xdata()) == [20.0, 40.0]
    _labelled(fig)
    traj = plots.effective_rank_trajectory(HISTORY)
    lines = _curves(traj)
    assert [line.get_label() for line in lines] == ["q_proj", "v_proj"]
    np.testing.assert_allclose(lines[0].get_ydata(), [1.5, 2.5, 3.5, 4.5])  # mean over layers 0 and 1
    assert any(line.get_ydata()[0] == 8 for line in traj.axes[0].get_lines())  # the r = 8 reference
    _labelled(traj)
    empty = plots.effective_rank_trajectory([{"step": 1, "train_loss": 1.0}])
    assert "no spectra" in empty.axes[0].texts[0].get_text()


def test_plot_methods_and_png_output(comparison, tmp_path: Path) -> None:
    fig = comparison.plot_spectrum()
    assert len(fig.axes[0].get_lines()) == 3
    png = plots.figure_png(comparison.plot_energy(), dpi=50)
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    single = analyze(comparison.analyses[0].checkpoint, emit_warnings=False)
    fig = plots.spectrum_decay(single, labels=["only"])
    assert [line.get_label().split(" ")[0] for line in fig.axes[0].get_lines()] == ["only"]
    assert len(plots.series_of([("x", single), single])) == 2
    with pytest.raises(ValueError):
        plots.series_of(comparison, labels=["too", "few"])


def test_analysis_renders_in_notebooks_and_offers_plot_methods(comparison) -> None:
    analysis = comparison.analyses[0]
    html = analysis._repr_html_()
    for record in analysis.records:
        assert record["module"] in html
        assert f'data-value="{record["effective_rank"]!r}"' in html or repr(record["effective_rank"]) in html
    fig = analysis.plot_spectrum()
    assert len(fig.axes[0].get_lines()) == 1
    assert analysis.plot_utilization().axes and analysis.plot_energy().axes


@pytest.mark.parametrize("plot", [plots.spectrum_decay, plots.cumulative_energy])
def test_unknown_module_is_an_error_naming_it_and_some_available_ones(comparison, plot) -> None:
    with pytest.raises(ValueError) as info:
        plot(comparison, module="nonexistent")
    message = str(info.value)
    assert "'nonexistent'" in message
    assert comparison.analyses[0].records[0]["module"] in message
    # a module that only some checkpoints have is fine (those draw no line)
    plot(comparison, module="model.layers.0.self_attn.o_proj")


def _inside_figure(fig, artist, margin: float = 3.0) -> bool:
    """The artist is drawn at least ``margin`` pixels inside the figure and uses under 85% of its height."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    box = artist.get_window_extent(canvas.get_renderer())
    width, height = fig.bbox.width, fig.bbox.height
    inside = box.x0 >= margin and box.y0 >= margin and box.x1 <= width - margin and box.y1 <= height - margin
    return inside and box.height < 0.85 * height


@pytest.mark.parametrize("panels", [1, 3])
def test_utilization_colour_bar_label_is_inside_the_figure(comparison, panels) -> None:
    fig = plots.utilization_heatmap(comparison.analyses[:panels])
    bar = next(ax for ax in fig.axes if not ax.get_images())  # the colour-bar axes holds no image
    label = bar.yaxis.label
    assert "utilization" in label.get_text() and "effective rank / r" in label.get_text()
    assert _inside_figure(fig, label)


def test_effective_rank_vs_rank_keeps_every_checkpoint_of_a_shared_rank(comparison) -> None:
    # two LoRA checkpoints at r = 8 (and one at r = 4): one line through the per-r means, one marker each
    analyses = [comparison.analyses[0], comparison.analyses[2], comparison.analyses[0]]
    fig = plots.effective_rank_vs_rank(analyses, labels=["a8", "b4", "c8"], series=["lora", "lora", "lora"])
    ax = fig.axes[0]
    (line,) = [line for line in _curves(fig) if line.get_label().startswith("lora")]
    assert line.get_label() == "lora: mean per r"
    assert list(line.get_xdata()) == [4, 8]  # no vertical segment: one point per r
    means = {a.checkpoint: a.summary["metrics"]["effective_rank"]["mean"] for a in analyses}
    assert line.get_ydata()[1] == pytest.approx(means[analyses[0].checkpoint])
    markers = [line for line in ax.get_lines() if line.get_label() == "_lora checkpoints"]
    assert len(markers) == 1 and sorted(markers[0].get_xdata()) == [4, 8, 8]
    legend = [text.get_text() for text in ax.get_legend().get_texts()]
    assert legend == ["lora: mean per r", "one checkpoint", "y = r (every direction used)"]
    # different values at one r: the mean sits between the two markers
    other = [comparison.analyses[0], comparison.analyses[1]]
    fig = plots.effective_rank_vs_rank(other, series=["m", "m"])
    (line,) = [line for line in _curves(fig) if line.get_label() == "m: mean per r"]
    values = sorted(a.summary["metrics"]["effective_rank"]["mean"] for a in other)
    assert values[0] < line.get_ydata()[0] < values[1]
