"""bench/scan.py's generated adapters: every kind is found and read back with its rank, shape and dtype."""

import importlib.util
from pathlib import Path

import numpy as np

from nora_spectra.analysis import analyze
from nora_spectra.io.safetensors_file import SafetensorsFile
from nora_spectra.scan.discover import discover

ROOT = Path(__file__).resolve().parents[2]


def _bench():
    spec = importlib.util.spec_from_file_location("bench_scan", ROOT / "bench" / "scan.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_generated_adapters_are_found_and_read(tmp_path: Path) -> None:
    bench = _bench()
    meta = bench.generate(tmp_path, 3, seed=3)
    assert meta["kinds"] == {"peft": 1, "nora": 1, "safetensors": 1}
    assert bench.generate(tmp_path, 3, seed=3) == meta  # reused, not generated again
    found = discover([tmp_path / "adapters"])
    assert len(found) == 3
    for item in found:
        analysis = analyze(item.path, emit_warnings=False)
        assert analysis.format in ("peft", "nora", "safetensors") and len(analysis.records) >= 2
        ranks = {rec["rank"] for rec in analysis.records}
        assert len(ranks) == 1 and ranks.pop() in bench.RANKS
        assert all(rec["shape"][0] == rec["shape"][1] and rec["shape"][0] in bench.HIDDEN for rec in analysis.records)


def test_bf16_bytes_are_the_nearest_bfloat16(tmp_path: Path) -> None:
    bench = _bench()
    values = np.array([[1.0, -2.5, 3.14159265, 1e-3], [65504.0, -1e-8, 0.1, 7.0]])
    path = tmp_path / "x.safetensors"
    bench._write_safetensors(path, {"t": ("BF16", values.shape, bench._tensor_bytes(values, "BF16"))})
    read = SafetensorsFile(str(path)).read("t")
    want = values.astype(np.float32)
    # bfloat16 keeps 8 significant bits: the nearest one is within half a unit in the last place
    assert np.all(np.abs(read - want) <= np.abs(want) * 2.0**-8)
    assert read[0, 0] == 1.0 and read[0, 1] == -2.5 and read[1, 3] == 7.0
