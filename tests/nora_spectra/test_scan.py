"""`spectra scan`: every adapter once with the right status, results equal to `analyze`, resume after SIGKILL.

The generated tree (:mod:`tests.nora_spectra.scan_tree`) holds PEFT, NoRA and bare safetensors adapters
of several ranks, shapes and dtypes, named adapters in sub-directories, NaN factors, corrupt files, a
file that cannot be read, a symbolic link loop, a dangling link and a link back to an ancestor.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from nora_spectra import load_scan
from nora_spectra.analysis import analyze
from nora_spectra.errors import UsageError
from nora_spectra.io import load_checkpoint
from nora_spectra.schema import LAYER_COLUMNS, SCAN_ADAPTER_COLUMNS, SCAN_LAYER_COLUMNS, SUMMARY_METRICS
from nora_spectra.scan import scan
from tests.nora_spectra.io_builders import lora_tensors, peft_dir, write_numpy
from tests.nora_spectra.scan_tree import build_tree
from tests.nora_spectra.test_cli_compare import run

ROOT = Path(__file__).resolve().parents[2]
SPECTRA = str(Path(sys.executable).with_name("spectra"))


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("scan") / "tree"
    root.mkdir()
    return root, build_tree(root)


@pytest.fixture(scope="module")
def scanned(tree, tmp_path_factory: pytest.TempPathFactory):
    """One scan of the tree on 2 local workers, with small parts: (summary, adapters, layers, out)."""
    root, _ = tree
    out = tmp_path_factory.mktemp("scan_out") / "out"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # results are data: the library issues no warning
        summary = scan([root], output=out, workers=2, part_size=4, csv=True)
    adapters, layers = load_scan(out)
    return summary, adapters, layers, out


def _comparable(frame):
    """Rows as plain values, without the timing column."""
    frame = frame.drop(columns=[c for c in ("seconds",) if c in frame.columns])
    rows = frame.astype(object).where(frame.notna(), None).to_dict("records")
    return [{k: (list(v) if isinstance(v, (list, tuple, np.ndarray)) else v) for k, v in row.items()} for row in rows]


# ------------------------------------------------------------------------------------------- contents


def test_every_adapter_exactly_once_with_the_right_status(tree, scanned) -> None:
    _, expected = tree
    summary, adapters, _, _ = scanned
    paths = adapters["path"].tolist()
    assert sorted(paths) == paths and len(set(paths)) == len(paths)
    assert set(paths) == set(expected)
    for row in adapters.itertuples():
        want = expected[row.path]
        assert row.status == want.status, (row.path, row.error)
        if want.status == "error":
            assert want.error in row.error and row.error.startswith(row.path) and "\n" not in row.error
            assert pd.isna(row.modules) and pd.isna(row.format)
        else:
            assert pd.isna(row.error) and row.modules >= 1
    assert summary.adapters == len(expected) == summary.analysed
    assert summary.errors == sum(e.status == "error" for e in expected.values())
    assert summary.ok + summary.errors == summary.adapters and summary.resumed == 0


def test_columns_come_from_the_schema(scanned) -> None:
    _, adapters, layers, out = scanned
    assert tuple(adapters.columns) == SCAN_ADAPTER_COLUMNS
    assert tuple(layers.columns) == SCAN_LAYER_COLUMNS == ("path",) + LAYER_COLUMNS
    assert not list((out / "parts").iterdir())  # parts are folded into the final tables
    header = (out / "layers.csv").read_text().splitlines()[0].split(",")
    assert tuple(header) == SCAN_LAYER_COLUMNS


def test_layer_rows_equal_spectra_analyze_per_adapter(scanned) -> None:
    _, adapters, layers, _ = scanned
    ok = adapters[adapters["status"] == "ok"]
    assert len(ok) >= 30
    for row in ok.itertuples():
        analysis = analyze(row.path, emit_warnings=False)
        mine = layers[layers["path"] == row.path].drop(columns=["path"])
        assert _comparable(mine) == _comparable(analysis.layers), row.path
        summary = analysis.summary
        assert (row.format, row.method, row.modules) == (analysis.format, analysis.method, len(analysis.records))
        assert (row.analysed, row.collapsed, row.total_rank) == (summary["analysed"], summary["collapsed"], summary["total_rank"])
        for name in SUMMARY_METRICS:
            assert getattr(row, f"mean_{name}") == summary["metrics"][name]["mean"]
        assert row.weighted_utilization == summary["metrics"]["utilization"]["weighted_mean"]
        assert row.r == max(rec["rank"] for rec in analysis.records)
        assert row.warnings == analysis.warnings


def test_singular_values_against_a_dense_float64_svd(scanned) -> None:
    _, adapters, layers, _ = scanned
    path = adapters[adapters["path"].str.endswith("peft/run01")]["path"].item()
    checkpoint = load_checkpoint(path)
    checked = 0
    for update in checkpoint.iter_layers():
        low = update.update
        dense = low.scale * (np.asarray(low.B, np.float64) @ np.asarray(low.A, np.float64))
        want = np.linalg.svd(dense, compute_uv=False)[: update.rank]
        got = layers[(layers["path"] == path) & (layers["module"] == update.module)]["singular_values"].item()
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12 * want[0])
        checked += 1
    assert checked >= 2


def test_base_model_and_warnings_are_data(scanned) -> None:
    _, adapters, _, _ = scanned
    by_path = adapters.set_index("path")
    run0 = next(p for p in by_path.index if p.endswith("peft/run00"))
    assert by_path.loc[run0, "base_model"] == "meta-llama/Llama-3.2-1B"
    nan = next(p for p in by_path.index if p.endswith("odd/nan_factors"))
    assert by_path.loc[nan, "status"] == "ok"
    assert any("NaN/Inf" in w for w in by_path.loc[nan, "warnings"])
    bare = next(p for p in by_path.index if p.endswith("bare/adapter0.safetensors"))
    assert by_path.loc[bare, "format"] == "safetensors" and any("scale 1" in w for w in by_path.loc[bare, "warnings"])


def test_content_key_columns(scanned) -> None:
    _, adapters, _, _ = scanned
    by_path = adapters.set_index("path")
    bare = next(p for p in by_path.index if p.endswith("bare/adapter0.safetensors"))
    info = os.stat(bare)
    assert by_path.loc[bare, "size"] == info.st_size and by_path.loc[bare, "mtime"] == info.st_mtime_ns
    run0 = next(p for p in by_path.index if p.endswith("peft/run00"))
    files = [os.path.join(run0, n) for n in os.listdir(run0) if os.path.isfile(os.path.join(run0, n))]
    assert by_path.loc[run0, "size"] == sum(os.path.getsize(f) for f in files)
    assert adapters["content_key"].str.fullmatch(r"[0-9a-f]{64}").all()


def test_csv_tables_match_parquet(scanned) -> None:
    _, adapters, layers, out = scanned
    import csv

    with open(out / "layers.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == len(layers)
    first = layers.iloc[0]
    assert rows[0]["path"] == first["path"] and json.loads(rows[0]["singular_values"]) == list(first["singular_values"])
    assert float(rows[0]["effective_rank"]) == first["effective_rank"]
    assert len((out / "adapters.csv").read_text().splitlines()) == len(adapters) + 1


FIXTURES = ROOT / "tests" / "fixtures" / "formats"


@pytest.mark.skipif(not FIXTURES.is_dir(), reason="no format fixtures in this checkout (tests/fixtures/formats)")
def test_the_format_fixtures_are_found_by_their_sniffers_and_analysed_as_analyze_does(tmp_path: Path) -> None:
    summary = scan([FIXTURES], output=tmp_path / "out", workers=2)
    adapters, layers = load_scan(tmp_path / "out")
    assert summary.errors == 0 and summary.adapters == len(adapters) >= 10
    assert {"diffusers", "kohya", "lycoris", "mlx", "peft"} <= set(adapters["format"])
    for path in adapters["path"]:
        mine = layers[layers["path"] == path].drop(columns=["path"])
        assert _comparable(mine) == _comparable(analyze(path, emit_warnings=False).layers), path


# ------------------------------------------------------------------------------------------- resume


def _spectra(*args: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([SPECTRA, *args], capture_output=True, text=True, timeout=300, cwd=ROOT, **kwargs)


def _many_adapters(root: Path, n: int) -> None:
    for i in range(n):
        peft_dir(root / f"a{i:03d}", lora_tensors({f"model.layers.{j}.q_proj": (24, 20, 4) for j in range(2)}, seed=i),
                 r=4, lora_alpha=8)


def test_resume_after_sigkill_equals_an_uninterrupted_scan(tmp_path: Path) -> None:
    root = tmp_path / "tree"
    _many_adapters(root, 24)
    write_numpy(root / "weights.safetensors", {"x": np.ones(2, np.float32)})  # not an adapter: not found
    (root / "corrupt.safetensors").write_bytes(b"\xff" * 20)
    reference = tmp_path / "reference"
    scan([root], output=reference, workers=1)

    out = tmp_path / "killed"
    process = subprocess.Popen([SPECTRA, "scan", str(root), "-o", str(out), "--workers", "1", "--part-size", "1", "-q"],
                               cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        parts = list((out / "parts").glob("*.adapters.parquet")) if (out / "parts").is_dir() else []
        if len(parts) >= 3 or process.poll() is not None:
            break
        time.sleep(0.005)
    os.killpg(process.pid, signal.SIGKILL)  # the scan and its workers, as a power loss would
    process.wait()
    assert process.returncode == -signal.SIGKILL, process.stderr.read()
    assert not (out / "adapters.parquet").exists(), "the scan finished before it could be killed"
    partial, _ = load_scan(out)  # a killed scan is readable: what it committed
    assert 3 <= len(partial) < 25 and partial["path"].is_unique

    resumed = _spectra("scan", str(root), "-o", str(out), "--workers", "2", "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert f"{len(partial)} already done" in resumed.stderr
    want_adapters, want_layers = load_scan(reference)
    got_adapters, got_layers = load_scan(out)
    assert _comparable(got_adapters) == _comparable(want_adapters)
    assert _comparable(got_layers) == _comparable(want_layers)
    assert len(got_adapters) == 25 and not list((out / "parts").iterdir())


def test_resume_analyses_only_new_and_changed_adapters_and_drops_removed_ones(tmp_path: Path) -> None:
    root = tmp_path / "tree"
    _many_adapters(root, 4)
    out = tmp_path / "out"
    first = scan([root], output=out, workers=1)
    assert (first.analysed, first.resumed) == (4, 0)
    same = scan([root], output=out, workers=1, resume=True)
    assert (same.analysed, same.resumed) == (0, 4)
    # change one adapter (same shapes, other values), add one, remove one
    peft_dir(root / "a001", lora_tensors({"model.layers.0.q_proj": (24, 20, 8)}, seed=99), r=8, lora_alpha=8)
    _many_adapters(root / "new", 1)
    for f in (root / "a003").iterdir():
        f.unlink()
    (root / "a003").rmdir()
    after = scan([root], output=out, workers=1, resume=True)
    assert (after.analysed, after.resumed) == (2, 2)
    adapters, layers = load_scan(out)
    assert [Path(p).relative_to(root).as_posix() for p in adapters["path"]] == ["a000", "a001", "a002", "new/a000"]
    changed = layers[layers["path"] == str(root / "a001")]
    assert changed["rank"].tolist() == [8]
    assert _comparable(changed.drop(columns=["path"])) == _comparable(analyze(root / "a001", emit_warnings=False).layers)


def test_retry_errors_analyses_failed_adapters_again(tmp_path: Path) -> None:
    root = tmp_path / "tree"
    _many_adapters(root, 1)
    (root / "corrupt.safetensors").write_bytes(b"\xff" * 20)
    out = tmp_path / "out"
    scan([root], output=out, workers=1)
    assert scan([root], output=out, workers=1, resume=True).analysed == 0
    assert scan([root], output=out, workers=1, resume=True, retry_errors=True).analysed == 1
    with pytest.raises(UsageError, match="--retry-errors needs --resume"):
        scan([root], output=out, retry_errors=True)


def test_a_worker_that_dies_gives_its_adapter_an_error_row(tmp_path: Path) -> None:
    from nora_spectra.scan.content_key import content_key
    from nora_spectra.scan.local_engine import run_local
    from nora_spectra.scan.task import AnalysisSettings, ScanItem

    root = tmp_path / "tree"
    _many_adapters(root, 4)
    items = [ScanItem(str(p), content_key(str(p), is_dir=True)) for p in sorted(root.iterdir())]
    results = []
    run_local(items, AnalysisSettings(), results.append, workers=2, task=dying_task)
    by_path = {r.adapter["path"]: r for r in results}
    assert sorted(by_path) == [i.path for i in items]
    dead = by_path[str(root / "a002")].adapter
    assert dead["status"] == "error" and "worker process analysing it died" in dead["error"]
    assert "killed by signal 9" in dead["error"]
    assert all(by_path[i.path].ok for i in items if not i.path.endswith("a002"))


def dying_task(item, settings):
    """A worker task that kills its own process on one adapter (as the out-of-memory killer would)."""
    from nora_spectra.scan.task import analyse_item

    if item.path.endswith("a002"):
        os.kill(os.getpid(), signal.SIGKILL)
    return analyse_item(item, settings)


def noisy_task(item, settings):
    """A worker task whose code prints to stdout, from Python and at the file-descriptor level."""
    from nora_spectra.scan.task import analyse_item

    print("chatter from Python")
    os.write(1, b"chatter from C\n")
    return analyse_item(item, settings)


def test_what_the_analysis_prints_cannot_corrupt_the_results(tmp_path: Path) -> None:
    from nora_spectra.scan.content_key import content_key
    from nora_spectra.scan.local_engine import run_local
    from nora_spectra.scan.task import AnalysisSettings, ScanItem

    _many_adapters(tmp_path, 2)
    items = [ScanItem(str(p), content_key(str(p), is_dir=True)) for p in sorted(tmp_path.iterdir())]
    results = []
    run_local(items, AnalysisSettings(), results.append, workers=1, task=noisy_task)
    assert sorted(r.adapter["path"] for r in results) == [i.path for i in items]
    assert all(r.ok and len(r.layers) == 2 for r in results)


def instant_task(item, settings):
    """A worker task that answers at once: results pile up in the pipe faster than they are read."""
    from nora_spectra.scan.task import ItemResult, _base_row

    row = _base_row(item)
    row["status"] = "ok"
    return ItemResult(row, [])


def test_results_queued_back_to_back_are_all_read(tmp_path: Path) -> None:
    import threading

    from nora_spectra.scan.content_key import ContentKey
    from nora_spectra.scan.local_engine import run_local
    from nora_spectra.scan.task import AnalysisSettings, ScanItem

    items = [ScanItem(str(tmp_path / f"x{i:03d}"), ContentKey(None, None, "k")) for i in range(60)]
    results = []

    def slow_emit(result) -> None:  # a driver scheduled late: several results wait in each pipe
        results.append(result)
        time.sleep(0.02)

    thread = threading.Thread(target=run_local, args=(items, AnalysisSettings(), slow_emit),
                              kwargs={"workers": 2, "task": instant_task}, daemon=True)
    thread.start()
    thread.join(timeout=120)
    assert not thread.is_alive(), "the scan waits for results it already received"
    assert sorted(r.adapter["path"] for r in results) == [i.path for i in items]


def blas_task(item, settings):
    """Reports what a worker's BLAS was told and how many threads OpenBLAS runs."""
    import ctypes

    from nora_spectra.scan.task import ItemResult, _base_row

    row = _base_row(item)
    row["status"] = "ok"
    row["error"] = os.environ.get("OPENBLAS_NUM_THREADS")
    threads = None
    with open("/proc/self/maps") as maps:
        libraries = {line.split()[-1] for line in maps if "openblas" in line.lower() and line.split()[-1].startswith("/")}
    for library in libraries:
        lib = ctypes.CDLL(library)
        for name in ("scipy_openblas_get_num_threads64_", "openblas_get_num_threads64_", "openblas_get_num_threads"):
            if hasattr(lib, name):
                threads = getattr(lib, name)()
                break
    row["r"] = threads
    return ItemResult(row, [])


@pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="reads /proc/self/maps (Linux)")
def test_workers_run_single_threaded_blas(tmp_path: Path) -> None:
    from nora_spectra.scan.content_key import content_key
    from nora_spectra.scan.local_engine import run_local
    from nora_spectra.scan.task import AnalysisSettings, ScanItem

    _many_adapters(tmp_path, 1)
    path = str(tmp_path / "a000")
    results = []
    run_local([ScanItem(path, content_key(path, is_dir=True))], AnalysisSettings(), results.append, workers=1, task=blas_task)
    (result,) = results
    assert result.adapter["error"] == "1"
    if result.adapter["r"] is None:
        pytest.skip("numpy's OpenBLAS exports no thread-count function here")
    assert result.adapter["r"] == 1


# ------------------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "argv, message",
    [
        (["scan", "{tmp}/missing", "-o", "{tmp}/out"], "no such file or directory"),
        (["scan", "{tmp}/empty", "-o", "{tmp}/out"], "no adapter found"),
        (["scan", "-o", "{tmp}/out"], "nothing to scan"),
        (["scan", "{tree}", "-o", "{tmp}/file.txt"], "is a file"),
        (["scan", "{tree}", "-o", "{tmp}/out", "--resume", "--overwrite"], "exclude each other"),
        (["scan", "{tree}", "-o", "{tmp}/out", "--ray-address", "x:1"], "--ray-address needs --engine ray"),
        (["scan", "{tree}", "-o", "{tmp}/out", "--collapse-threshold", "2"], "collapse threshold"),
        (["scan", "{tree}", "-o", "{tmp}/out", "--format-in", "nope"], "unknown checkpoint format"),
        (["scan", "{tree}", "-o", "{tmp}/out", "--manifest", "{tmp}/missing.csv"], "no such file"),
        (["census", "{tmp}/empty", "-o", "{tmp}/c.html"], "not a spectra scan directory"),
    ],
)
def test_bad_input_exits_2_with_one_line(tmp_path: Path, capsys, argv: list[str], message: str) -> None:
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("no adapter here")
    (tmp_path / "file.txt").write_text("")
    tree = tmp_path / "tree"
    _many_adapters(tree, 1)
    argv = [a.format(tmp=tmp_path, tree=tree) for a in argv]
    code, out, err = run(argv, capsys)
    assert code == 2 and out == "", err
    assert len(err.strip().splitlines()) == 1 and message in err, err
    assert not (tmp_path / "out" / "adapters.parquet").exists()


def test_an_output_directory_holding_another_scan_is_refused(tmp_path: Path) -> None:
    root = tmp_path / "tree"
    _many_adapters(root, 2)
    out = tmp_path / "out"
    scan([root], output=out, workers=1)
    before = (out / "adapters.parquet").read_bytes()
    with pytest.raises(UsageError, match="holds a scan already; use --resume"):
        scan([root], output=out, workers=1)
    with pytest.raises(UsageError, match=r"different settings \(collapse_threshold: 0.25 there, 0.5 now\)"):
        scan([root], output=out, workers=1, resume=True, collapse_threshold=0.5)
    with pytest.raises(UsageError, match="different settings"):
        scan([root / "a000"], output=out, workers=1, resume=True)
    assert (out / "adapters.parquet").read_bytes() == before
    replaced = scan([root], output=out, workers=1, overwrite=True, collapse_threshold=0.5)
    assert replaced.analysed == 2
    assert json.loads((out / "scan.json").read_text())["settings"]["collapse_threshold"] == 0.5
    (out / "scan.json").unlink()
    with pytest.raises(UsageError, match="holds scan outputs"):
        scan([root], output=out, workers=1)


def test_ray_missing_is_one_line(tmp_path: Path) -> None:
    _many_adapters(tmp_path / "tree", 1)
    block = (
        "import sys\n"
        "class _NoRay:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'ray' or name.startswith('ray.'):\n"
        "            raise ModuleNotFoundError(\"No module named 'ray'\", name='ray')\n"
        "sys.meta_path.insert(0, _NoRay())\n"
        "from nora_spectra.cli.main import main\n"
        f"main(['scan', {str(tmp_path / 'tree')!r}, '-o', {str(tmp_path / 'out')!r}, '--engine', 'ray'])\n"
    )
    out = subprocess.run([sys.executable, "-c", block], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 2 and out.stderr.strip() == (
        "spectra: error: --engine ray needs Ray: pip install 'nora-spectra[ray]'"
    )
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------------- progress


def test_progress_callback_and_the_summary_line(tmp_path: Path, capsys) -> None:
    root = tmp_path / "tree"
    _many_adapters(root, 3)
    (root / "corrupt.safetensors").write_bytes(b"\xff" * 20)
    write_numpy(root / "bare.safetensors", lora_tensors({"m.q_proj": (8, 8, 2)}, prefix=""))  # warns: no config
    calls = []
    scan([root], output=tmp_path / "lib", workers=1, progress=lambda *a: calls.append(a))
    assert [c[0] for c in calls] == [1, 2, 3, 4, 5] and {c[1] for c in calls} == {5} and calls[-1][2] == 1
    code, stdout, err = run(["scan", str(root), "-o", str(tmp_path / "cli"), "--workers", "1"], capsys)
    assert code == 0 and stdout == ""
    (line,) = err.strip().splitlines()  # not a terminal: no bar; warnings are in the table, not here
    assert line.startswith(f"spectra: scanned 5 adapters into {tmp_path / 'cli'}: 4 ok, 1 error (5 analysed in ")
    adapters, _ = load_scan(tmp_path / "cli")
    assert any("scale 1" in w for w in adapters.set_index("path").loc[str(root / "bare.safetensors"), "warnings"])


def test_importing_the_scan_workers_loads_no_pandas_or_pyarrow() -> None:
    code = (
        "import sys\n"
        "import nora_spectra.scan.task, nora_spectra.scan.worker, nora_spectra.scan.local_engine\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('pandas', 'pyarrow', 'ray', 'matplotlib', 'torch')))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stderr
