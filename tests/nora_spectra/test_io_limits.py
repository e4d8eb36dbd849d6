"""Headers whose declared tensors could not fit the file or the machine are refused before any allocation."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from nora_spectra.errors import CheckpointError
from nora_spectra.io import load_checkpoint
from nora_spectra.io.assemble import machine_memory, module_memory
from tests.nora_spectra.io_builders import write_config, write_raw

A, B = "base_model.model.m.lora_A.weight", "base_model.model.m.lora_B.weight"


def _pair(shape_a, shape_b, data_a=0, data_b=0):
    return {
        A: {"dtype": "F32", "shape": shape_a, "data_offsets": [0, data_a]},
        B: {"dtype": "F32", "shape": shape_b, "data_offsets": [data_a, data_a + data_b]},
    }


def test_a_dimension_beyond_2_40_is_refused_even_when_empty(tmp_path: Path) -> None:
    path = write_raw(tmp_path / "x.safetensors", _pair([10**30, 0], [0, 10**30]))
    with pytest.raises(CheckpointError, match=r"tensor '.*lora_A.weight' declares a dimension beyond 2\*\*40"):
        load_checkpoint(path)


def test_empty_factor_dimensions_are_refused(tmp_path: Path) -> None:
    # rank 4096 with d_in = d_out = 0: no bytes, but the probe would draw 4096-wide hidden rows
    path = write_raw(tmp_path / "x.safetensors", _pair([4096, 0], [0, 4096]))
    with pytest.raises(CheckpointError, match=r"module 'm': a factor has an empty dimension \(lora_A \[4096, 0\]"):
        load_checkpoint(path)


def test_a_module_larger_than_the_machine_is_refused_from_its_header(tmp_path: Path, monkeypatch) -> None:
    from nora_spectra.io import assemble

    data = np.ones(4 * 2 + 2 * 4, np.float32).tobytes()
    path = write_raw(tmp_path / "x.safetensors", _pair([4, 2], [2, 4], 32, 32), data)
    monkeypatch.setattr(assemble, "machine_memory", lambda: module_memory(4, 2, 2) - 1)
    with pytest.raises(CheckpointError, match=r"module 'm': analysing its factors \(rank 4, shape \[2, 2\]\) needs"):
        load_checkpoint(path)
    monkeypatch.setattr(assemble, "machine_memory", lambda: module_memory(4, 2, 2))
    assert load_checkpoint(path).modules == ["m"]
    assert machine_memory() is None or machine_memory() > 2**28


def test_module_memory_follows_the_smallest_side() -> None:
    # r = 20000 over 1 x 1: the factors (16 bytes per element, read and upcast) and a 1 x r block
    assert module_memory(20000, 1, 1) == 16 * 2 * 20000 + 32 * 20000
    assert module_memory(16, 4096, 4096) == 16 * 8192 * 16 + 32 * 16 * 16


@pytest.mark.parametrize("zip_format", [True, False])
def test_bin_storage_larger_than_the_file_is_refused_before_torch_allocates(tmp_path: Path, zip_format: bool) -> None:
    torch = pytest.importorskip("torch")
    directory = tmp_path / "ck"
    write_config(directory, r=2, lora_alpha=2)
    path = directory / "adapter_model.bin"
    state = {A: torch.ones(2, 3), B: torch.ones(3, 2)}
    torch.save(state, path, _use_new_zipfile_serialization=zip_format)
    assert load_checkpoint(directory).modules == ["m"]

    def bigger(pickled: bytes, end: bytes) -> bytes:
        """The first storage's declared element count: BININT1 6 -> BININT 2**31 - 1."""
        index = pickled.index(b"K\x06" + end)
        return pickled[:index] + b"J\xff\xff\xff\x7f" + pickled[index + 2 :]

    if zip_format:
        import zipfile

        with zipfile.ZipFile(path) as archive:
            members = [(info.filename, archive.read(info)) for info in archive.infolist()]
        with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as archive:
            for name, data in members:
                archive.writestr(name, bigger(data, b"t") if name.endswith("data.pkl") else data)
    else:
        path.write_bytes(bigger(path.read_bytes(), b"N"))
    with pytest.raises(CheckpointError, match=r"refused to load: .*declares? \d+ bytes"):
        load_checkpoint(directory)


def test_a_damaged_bin_never_reaches_torch_load(tmp_path: Path, monkeypatch) -> None:
    """A 100 KB run of '[' spliced into a legacy pickle kept torch.load's error-message regexes busy for
    minutes (fuzz case torch_bin-8061): damaged pickles and huge string operands are refused from the opcodes."""
    torch = pytest.importorskip("torch")
    import nora_spectra.io.torch_bin  # noqa: F401 - imported before torch.load is replaced

    directory = tmp_path / "ck"
    write_config(directory, r=2, lora_alpha=2)
    path = directory / "adapter_model.bin"
    torch.save({A: torch.ones(2, 3), B: torch.ones(3, 2)}, path, _use_new_zipfile_serialization=False)
    raw = path.read_bytes()
    at = raw.index(b"torch._utils")
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("torch.load was called"))
    path.write_bytes(raw[: at + 12] + b"[" * 100_000 + raw[at + 12 :])
    with pytest.raises(CheckpointError, match=r"refused to unpickle: it refers to torch._utils\[\[\["):
        load_checkpoint(directory)
    path.write_bytes(raw[: at + 40] + b"[" * 100_000)
    with pytest.raises(CheckpointError, match=r"not a readable torch checkpoint: damaged pickle \("):
        load_checkpoint(directory)
    key = raw.index(A.encode())
    long_key = raw[: key - 4] + (10_000).to_bytes(4, "little") + b"k" * 10_000 + raw[key + len(A) :]
    path.write_bytes(long_key)
    with pytest.raises(CheckpointError, match=r"its pickle holds a 10000-character BINUNICODE operand"):
        load_checkpoint(directory)
