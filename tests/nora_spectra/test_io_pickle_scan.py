"""The opcode scan that refuses code-running pickles before torch is imported."""

import pickle
import subprocess
import sys

import pytest

from nora_spectra.io.pickle_scan import forbidden_globals, pickle_globals

torch = pytest.importorskip("torch")


class _Runs:
    def __reduce__(self):
        import os

        return (os.system, ("echo never",))


def _state():
    return {"base_model.model.q.lora_A.weight": torch.randn(2, 3, dtype=torch.bfloat16), "b": torch.randn(3, 2)}


@pytest.mark.parametrize("zip_format", [True, False])
def test_real_torch_state_dicts_use_only_allowed_globals(tmp_path, zip_format):
    path = tmp_path / "adapter_model.bin"
    state = _state()
    torch.save(state, path, _use_new_zipfile_serialization=zip_format)
    found = pickle_globals(path)
    assert ("torch._utils", "_rebuild_tensor_v2") in found
    assert ("torch", "BFloat16Storage") in found and ("torch", "FloatStorage") in found
    assert forbidden_globals(path) == []
    loaded = torch.load(path, weights_only=True)  # and torch agrees it is a plain state dict
    assert all(torch.equal(loaded[k], state[k]) for k in state)


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_code_running_globals_are_named(tmp_path, protocol):
    path = tmp_path / "evil.bin"
    path.write_bytes(pickle.dumps({"x": _Runs()}, protocol=protocol))
    assert forbidden_globals(path) == ["posix.system"]


def test_torch_save_of_a_code_running_object_is_caught_inside_the_zip(tmp_path):
    path = tmp_path / "evil.bin"
    torch.save({"w": torch.ones(2), "x": _Runs()}, path)
    assert forbidden_globals(path) == ["posix.system"]


def test_damaged_pickles_report_what_was_readable(tmp_path):
    path = tmp_path / "cut.bin"
    data = pickle.dumps({"x": _Runs()}, protocol=2)
    path.write_bytes(data[: len(data) // 2])
    assert forbidden_globals(path) in ([], ["posix.system"])  # a cut stream just ends the scan
    path.write_bytes(b"\x00garbage" * 10)
    assert forbidden_globals(path) == []


def test_fast_refusal_does_not_import_torch(tmp_path):
    import json

    directory = tmp_path / "ckpt"
    directory.mkdir()
    (directory / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 2}))
    (directory / "adapter_model.bin").write_bytes(pickle.dumps({"x": _Runs()}))
    code = (
        "import sys\n"
        "from nora_spectra.io import load_checkpoint\n"
        "from nora_spectra.errors import CheckpointError\n"
        f"try:\n    load_checkpoint({str(directory)!r})\n"
        "except CheckpointError as exc:\n    print(exc)\n"
        "print('torch' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.splitlines()
    assert out[0].endswith("refused to unpickle: it refers to posix.system, which could run code")
    assert out[1] == "False"
