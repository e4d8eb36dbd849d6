"""``spectra overlap`` and ``nora_spectra.overlap``: phi, principal angles and overlaps against dense
float64 SVDs and scipy's ``subspace_angles``; the plots; ``spectra report --overlap``."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from scipy.linalg import subspace_angles

from nora_spectra.errors import UsageError
from nora_spectra.overlap import overlap, phi_matrix
from tests.nora_spectra.io_builders import PREFIX, peft_dir, write_numpy

D_OUT, D_IN = 48, 40


def _pair(rng: np.random.Generator, r: int, shared: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    a = rng.standard_normal((r, D_IN))
    b = rng.standard_normal((D_OUT, r)) * np.exp(-np.arange(r) / 3.0)
    if shared is not None:  # start from the same top directions, plus noise
        b[:, : shared.shape[1]] += shared
    return a, b


def _adapters(tmp_path: Path) -> tuple[Path, Path, dict]:
    rng = np.random.default_rng(0)
    common = rng.standard_normal((D_OUT, 3)) * 5
    first, second, dense = {}, {}, {}
    for name, (ra, rb) in {"layers.0.q_proj": (8, 16), "layers.1.q_proj": (4, 4), "layers.1.v_proj": (6, 2)}.items():
        a1, b1 = _pair(rng, ra, common)
        a2, b2 = _pair(rng, rb, common[:, : min(3, rb)])
        first[f"{PREFIX}{name}.lora_A.weight"], first[f"{PREFIX}{name}.lora_B.weight"] = a1, b1
        second[f"{PREFIX}{name}.lora_A.weight"], second[f"{PREFIX}{name}.lora_B.weight"] = a2, b2
        dense[name] = (2.0 * b1 @ a1, 0.5 * b2 @ a2)
    extra = rng.standard_normal((2, D_IN)), rng.standard_normal((D_OUT, 2))
    second[f"{PREFIX}layers.2.o_proj.lora_A.weight"], second[f"{PREFIX}layers.2.o_proj.lora_B.weight"] = extra
    a = peft_dir(tmp_path / "a", first, r=8, lora_alpha=16, rank_pattern={"layers.1.q_proj": 4, "v_proj": 6},
                 alpha_pattern={"layers.1.q_proj": 8, "v_proj": 12})
    b = peft_dir(tmp_path / "b", second, r=16, lora_alpha=8, rank_pattern={"layers.1.q_proj": 4, "v_proj": 2,
                                                                            "o_proj": 2},
                 alpha_pattern={"layers.1.q_proj": 2, "v_proj": 1, "o_proj": 1})
    return a, b, dense


def test_phi_angles_and_overlaps_match_dense_references(tmp_path):
    a, b, dense = _adapters(tmp_path)
    result = overlap(a, b)
    assert result.labels == ["a", "b"] and result.only_in == {"layers.2.o_proj": "b"}
    assert [row["module"] for row in result.modules] == list(dense)
    for row in result.modules:
        da, db = dense[row["module"]]
        ua, sa, vta = np.linalg.svd(da)
        ub, sb, vtb = np.linalg.svd(db)
        na, nb = int(np.sum(sa > sa[0] * 1e-12)), int(np.sum(sb > sb[0] * 1e-12))
        assert row["status"] == "ok" and row["k"] == min(na, nb) == min(row["rank_a"], row["rank_b"])
        k = row["k"]
        for side, (xa, xb, d) in {"left": (ua[:, :na], ub[:, :nb], D_OUT), "right": (vta[:na].T, vtb[:nb].T, D_IN)}.items():
            want = np.empty((na, nb))
            for i in range(1, na + 1):
                for j in range(1, nb + 1):
                    want[i - 1, j - 1] = np.linalg.norm(xa[:, :i].T @ xb[:, :j]) ** 2 / min(i, j)
            np.testing.assert_allclose(result.phi_of(row["module"], side), want, atol=1e-10)
            angles = np.degrees(subspace_angles(xa[:, :k], xb[:, :k]))[::-1]  # scipy: radians, descending
            np.testing.assert_allclose(row[f"{side}_angles"], angles, atol=1e-6)
            assert row[f"{side}_overlap"] == pytest.approx(np.mean(np.cos(np.radians(angles)) ** 2), abs=1e-10)
            assert row[f"{side}_overlap"] == pytest.approx(want[k - 1, k - 1], abs=1e-12)
            assert row[f"chance_{side}"] == k / d
    ok = [row["left_overlap"] for row in result.modules]
    assert result.summary["mean_left_overlap"] == pytest.approx(math.fsum(ok) / len(ok), rel=1e-15)
    assert result.summary["by_module_type"]["q_proj"]["modules"] == 2


def test_identical_truncated_and_orthogonal_subspaces(tmp_path):
    from nora_spectra.resize import resize

    a, _, _ = _adapters(tmp_path)
    same = overlap(a, a)
    for row in same.modules:
        assert row["left_overlap"] == pytest.approx(1.0, abs=1e-12) and max(row["left_angles"]) < 1e-4
    resize(a, tmp_path / "small", rank=2)
    top = overlap(a, tmp_path / "small")  # the resized update keeps the top-2 subspace exactly
    for row in top.modules:
        assert row["k"] == 2 and row["left_overlap"] == pytest.approx(1.0, abs=1e-12)
        assert row["right_overlap"] == pytest.approx(1.0, abs=1e-12)
        phi = top.phi_of(row["module"])
        assert phi.shape == (row["rank_a"], 2) and np.allclose(phi[:2, :2], 1.0)
    rng = np.random.default_rng(1)
    basis = np.linalg.qr(rng.standard_normal((D_OUT, 8)))[0]
    files = []
    for n, cols in enumerate((basis[:, :4], basis[:, 4:])):
        tensors = {f"{PREFIX}m.q_proj.lora_A.weight": rng.standard_normal((4, D_IN)),
                   f"{PREFIX}m.q_proj.lora_B.weight": cols}
        files.append(write_numpy(tmp_path / f"o{n}.safetensors", tensors))
    orth = overlap(*files, top_k=3)
    row = orth.modules[0]
    assert row["k"] == 3 and row["left_overlap"] == pytest.approx(0.0, abs=1e-15)
    assert row["left_angles"] == pytest.approx([90.0] * 3, abs=1e-6)


def test_phi_matrix_by_hand():
    m = np.array([[1.0, 0.0, 0.0], [0.0, 0.6, 0.8]])
    phi = phi_matrix(m)
    assert phi[0].tolist() == [1.0, 1.0, 1.0]
    assert phi[1, 0] == 1.0 and phi[1, 1] == pytest.approx((1 + 0.36) / 2) and phi[1, 2] == pytest.approx(1.0)


def test_zero_and_non_finite_modules_are_reported_not_compared(tmp_path):
    rng = np.random.default_rng(2)
    base = {f"{PREFIX}m.{n}.lora_A.weight": rng.standard_normal((3, D_IN)) for n in ("q", "v", "k")}
    base.update({f"{PREFIX}m.{n}.lora_B.weight": rng.standard_normal((D_OUT, 3)) for n in ("q", "v", "k")})
    other = dict(base)
    other[f"{PREFIX}m.v.lora_B.weight"] = np.zeros((D_OUT, 3))
    other[f"{PREFIX}m.k.lora_B.weight"] = base[f"{PREFIX}m.k.lora_B.weight"].copy()
    other[f"{PREFIX}m.k.lora_B.weight"][0, 0] = np.nan
    result = overlap(write_numpy(tmp_path / "x.safetensors", base), write_numpy(tmp_path / "y.safetensors", other))
    status = {row["module"]: row["status"] for row in result.modules}
    assert status == {"m.k": "non_finite", "m.q": "ok", "m.v": "zero"}
    assert result.summary["compared"] == 1 and set(result.phi) == {"m.q"}
    assert json.loads(result.to_json())["modules"][0]["left_overlap"] is None


def test_errors(tmp_path):
    a, b, _ = _adapters(tmp_path)
    with pytest.raises(UsageError, match="--top-k"):
        overlap(a, b, top_k=0)
    rng = np.random.default_rng(3)
    lonely = write_numpy(tmp_path / "z.safetensors", {"other.lora_A.weight": rng.standard_normal((2, 4)),
                                                     "other.lora_B.weight": rng.standard_normal((4, 2))})
    with pytest.raises(UsageError, match="no adapted module in common"):
        overlap(a, lonely)


def test_cli_json_csv_plot_and_errors(tmp_path, capsys):
    from tests.nora_spectra.test_resize import spectra

    a, b, _ = _adapters(tmp_path)
    code, out, err = spectra(capsys, "overlap", a, b, "--format", "json", "--plot", tmp_path / "phi.png",
                             "--module", "layers.1.v_proj", "--top-k", "2")
    assert code == 0, err
    data = json.loads(out)
    assert data["top_k"] == 2 and [row["k"] for row in data["modules"]] == [2, 2, 2]
    assert (tmp_path / "phi.png").read_bytes().startswith(b"\x89PNG")
    code, out, _ = spectra(capsys, "overlap", a, b, "--format", "csv")
    assert code == 0 and out.splitlines()[0].startswith("module,module_type,layer_index,shape,rank_a")
    code, out, _ = spectra(capsys, "overlap", a, b)
    assert code == 0 and "mean left overlap" in out and "layers.2.o_proj (b)" in out
    for args, message in (([a, b, "--module", "x"], "give --plot"),
                          ([a, b, "--plot", tmp_path / "p.png", "--module", "nope"], "was not compared"),
                          ([a, tmp_path / "missing"], "no such file")):
        code, out, err = spectra(capsys, "overlap", *args)
        assert code == 2 and len(err.strip().splitlines()) == 1 and message in err, err


def test_plots_read_the_overlap(tmp_path):
    from nora_spectra.plots import overlap_bars, phi_heatmap

    a, b, _ = _adapters(tmp_path)
    result = overlap(a, b)
    fig = phi_heatmap(result, "layers.0.q_proj", max_j=5)
    image = fig.axes[0].images[0]
    np.testing.assert_array_equal(image.get_array(), result.phi_of("layers.0.q_proj")[:, :5])
    assert fig.axes[0].get_xlabel().startswith("j (top directions of b")
    bars = overlap_bars(result, sides=("left",))
    heights = [patch.get_height() for patch in bars.axes[0].patches]
    assert heights == [row["left_overlap"] for row in result.modules]
    with pytest.raises(ValueError, match="was not compared"):
        phi_heatmap(result, "layers.2.o_proj")
    assert result.plot_phi().axes[0].get_title().startswith("Subspace similarity")
    html = result._repr_html_()
    assert 'data-key="left_overlap"' in html and "layers.1.v_proj" in html


def test_report_with_overlap(tmp_path, capsys):
    from nora_spectra.report import build_report, write_report
    from tests.nora_spectra.test_resize import spectra

    a, b, _ = _adapters(tmp_path)
    data = build_report([a, b], overlap=True, overlap_module="layers.1.q_proj", dpi=50)
    assert len(data.overlaps) == 1
    names = [fig.name for fig in data.figures]
    assert "overlap_bars" in names and "overlap_phi" in names
    phi = next(fig for fig in data.figures if fig.name == "overlap_phi")
    assert "layers.1.q_proj" in phi.title
    write_report(data, tmp_path / "r.html")
    html = (tmp_path / "r.html").read_text()
    assert 'id="overlap"' in html and 'href="#overlap"' in html
    for row in data.overlaps[0].modules:
        value = json.dumps(row["left_overlap"], separators=(",", ":"))
        assert f'data-key="left_overlap" data-value="{value}"' in html
    write_report(data, tmp_path / "r.md")
    assert "## Subspace overlap" in (tmp_path / "r.md").read_text()
    assert (tmp_path / "r_files" / "overlap_phi.png").is_file()
    code, _, err = spectra(capsys, "report", a, "-o", tmp_path / "x.html", "--overlap")
    assert code == 2 and "needs at least two checkpoints" in err
    code, _, err = spectra(capsys, "report", a, b, "-o", tmp_path / "x.html", "--overlap-module", "m")
    assert code == 2 and "--overlap-module needs --overlap" in err
