"""The reader registry: detection by sniffing, forcing a format, ambiguity, and no tensor read to detect."""

from __future__ import annotations

from pathlib import Path

import pytest

from nora_spectra.errors import CheckpointError, UsageError
from nora_spectra.io import detect_format, formats, load_checkpoint
from nora_spectra.io import registry
from nora_spectra.io.safetensors_file import SafetensorsFile
from tests.nora_spectra.io_builders import lora_tensors, peft_dir, write_numpy

SHAPES = {"model.layers.0.q_proj": (8, 6, 2), "model.layers.1.q_proj": (8, 6, 2)}


def test_every_format_module_is_registered_with_a_summary() -> None:
    found = formats()
    assert {"peft", "nora", "safetensors"} <= set(found)
    for name, fmt in found.items():
        assert fmt.name == name and fmt.summary and callable(fmt.sniff) and callable(fmt.open)


def test_resize_writers_are_named_and_imported_only_when_asked_for() -> None:
    import subprocess
    import sys

    from nora_spectra.io.writing import ResizeWriter

    writers = {name: fmt.resize for name, fmt in formats().items() if fmt.resize_writer is not None}
    assert set(writers) == {"peft", "nora", "safetensors"}
    assert all(isinstance(writer, ResizeWriter) for writer in writers.values())
    assert all(fmt.resize is None for fmt in formats().values() if fmt.resize_writer is None)
    # reading a checkpoint registers every format without importing a writer
    code = ("import sys; from nora_spectra.io import formats; formats(); "
            "print(sorted(m for m in sys.modules if m.endswith(('peft_resize', 'io.writing'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_detection(tmp_path: Path) -> None:
    lora = peft_dir(tmp_path / "lora", lora_tensors(SHAPES), r=2, lora_alpha=4)
    nora = peft_dir(tmp_path / "nora", lora_tensors(SHAPES), r=2, lora_alpha=4, peft_type="NORA")
    bare = write_numpy(tmp_path / "bare.safetensors", lora_tensors(SHAPES, prefix=""))
    assert detect_format(lora) == "peft" and detect_format(nora) == "nora"
    assert detect_format(lora / "adapter_model.safetensors") == "peft"  # the weights file of a directory
    assert detect_format(bare) == "safetensors"
    other = write_numpy(tmp_path / "other.safetensors", {"w": lora_tensors(SHAPES)[next(iter(lora_tensors(SHAPES)))]})
    assert detect_format(other) is None
    with pytest.raises(CheckpointError, match="no LoRA factors found"):
        load_checkpoint(other)  # no format claims it: the bare reader says why


def test_detection_reads_no_tensor(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    bare = write_numpy(tmp_path / "bare.safetensors", lora_tensors(SHAPES, prefix=""))

    def refuse(self, name):  # pragma: no cover - failing is the point
        raise AssertionError(f"read tensor {name} while detecting the format")

    monkeypatch.setattr(SafetensorsFile, "read", refuse)
    assert load_checkpoint(bare).modules == sorted(SHAPES)


def test_forcing_a_format(tmp_path: Path) -> None:
    lora = peft_dir(tmp_path / "lora", lora_tensors(SHAPES), r=2, lora_alpha=4)
    forced = load_checkpoint(lora / "adapter_model.safetensors", format="safetensors")
    assert forced.format == "safetensors" and forced.config is None
    assert next(forced.iter_layers()).update.scale == 1.0  # the config beside it is not read
    assert next(load_checkpoint(lora).iter_layers()).update.scale == 2.0
    with pytest.raises(UsageError, match="unknown checkpoint format 'kohyaa'; choose one of auto, "):
        load_checkpoint(lora, format="kohyaa")


def test_two_claims_are_refused_with_both_names(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    lora = peft_dir(tmp_path / "lora", lora_tensors(SHAPES), r=2, lora_alpha=4)
    greedy = registry.Format(name="greedy", summary="claims everything", sniff=lambda probe: True,
                             open=lambda probe, adapter: None)
    monkeypatch.setattr(registry, "_FORMATS", {**formats(), "greedy": greedy})
    with pytest.raises(CheckpointError, match=r"matches the formats peft, greedy; choose one with --format-in"):
        load_checkpoint(lora)
    assert load_checkpoint(lora, format="peft").format == "peft"


def test_module_entries_keep_the_stored_key_prefix(tmp_path: Path) -> None:
    lora = peft_dir(tmp_path / "lora", lora_tensors(SHAPES), r=2, lora_alpha=4)
    bare = write_numpy(tmp_path / "bare.safetensors", lora_tensors(SHAPES, prefix=""))
    assert [e.key for e in load_checkpoint(lora).entries] == [f"base_model.model.{m}" for m in sorted(SHAPES)]
    assert [e.key for e in load_checkpoint(bare).entries] == sorted(SHAPES)
