"""Every bad input a user can give load_checkpoint: one CheckpointError naming the file and the problem."""

from __future__ import annotations

import json
import pickle
from pathlib import Path
from typing import Callable

import numpy as np
import pytest

from nora_spectra.errors import CheckpointError
from nora_spectra.io import load_checkpoint
from tests.nora_spectra.io_builders import PREFIX, lora_tensors, peft_dir, write_config, write_numpy, write_raw

Q0 = "model.layers.0.self_attn.q_proj"


def _pair(**config) -> Callable[[Path], tuple[Path, Path]]:
    """A valid one-module directory with the given config fields."""

    def build(tmp: Path) -> tuple[Path, Path]:
        peft_dir(tmp / "ckpt", lora_tensors({Q0: (4, 4, 8)}), **config)
        return tmp / "ckpt", tmp / "ckpt" / "adapter_config.json"

    return build


def _config_text(text: str) -> Callable[[Path], tuple[Path, Path]]:
    def build(tmp: Path) -> tuple[Path, Path]:
        peft_dir(tmp / "ckpt", lora_tensors({Q0: (4, 4, 8)}))
        (tmp / "ckpt" / "adapter_config.json").write_text(text)
        return tmp / "ckpt", tmp / "ckpt" / "adapter_config.json"

    return build


def _tensors(tensors: dict, **config) -> Callable[[Path], tuple[Path, Path]]:
    def build(tmp: Path) -> tuple[Path, Path]:
        peft_dir(tmp / "ckpt", tensors, **config)
        return tmp / "ckpt", tmp / "ckpt" / "adapter_model.safetensors"

    return build


def _missing(tmp: Path) -> tuple[Path, Path]:
    return tmp / "does_not_exist", tmp / "does_not_exist"


def _empty_dir(tmp: Path) -> tuple[Path, Path]:
    (tmp / "empty").mkdir()
    return tmp / "empty", tmp / "empty"


def _no_weights(tmp: Path) -> tuple[Path, Path]:
    write_config(tmp / "ckpt")
    return tmp / "ckpt", tmp / "ckpt"


def _weights_without_config(tmp: Path) -> tuple[Path, Path]:
    write_numpy((tmp / "ckpt").mkdir() or tmp / "ckpt" / "adapter_model.safetensors", lora_tensors({Q0: (4, 4, 8)}))
    return tmp / "ckpt", tmp / "ckpt"


def _several_adapters(tmp: Path) -> tuple[Path, Path]:
    for name in ("chat", "math"):
        peft_dir(tmp / "ckpt" / name, lora_tensors({Q0: (4, 4, 8)}))
    return tmp / "ckpt", tmp / "ckpt"


def _text_file(tmp: Path) -> tuple[Path, Path]:
    (tmp / "notes.txt").write_text("hello, not an adapter")
    return tmp / "notes.txt", tmp / "notes.txt"


def _bare_without_lora(tmp: Path) -> tuple[Path, Path]:
    write_numpy(tmp / "model.safetensors", {"model.embed_tokens.weight": np.ones((3, 2), np.float32)})
    return tmp / "model.safetensors", tmp / "model.safetensors"


def _corrupt_weights(tmp: Path) -> tuple[Path, Path]:
    write_config(tmp / "ckpt")
    write_raw(tmp / "ckpt" / "adapter_model.safetensors", {"x": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"", header_len=999)
    return tmp / "ckpt", tmp / "ckpt" / "adapter_model.safetensors"


def _truncated_bare(tmp: Path) -> tuple[Path, Path]:
    path = write_numpy(tmp / "lora.safetensors", lora_tensors({Q0: (4, 4, 8)}))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 10])
    return path, path


def _bare_bin(tmp: Path) -> tuple[Path, Path]:
    (tmp / "lora.bin").write_bytes(b"\x80\x04K\x01.")
    return tmp / "lora.bin", tmp / "lora.bin"


A_KEY = PREFIX + Q0 + ".lora_A.weight"
B_KEY = PREFIX + Q0 + ".lora_B.weight"
F32 = np.float32

CASES = [
    ("missing_path", _missing, "no such file or directory"),
    ("empty_directory", _empty_dir, "empty directory"),
    ("no_weights_file", _no_weights, "no weights file"),
    ("weights_without_config", _weights_without_config, "no adapter_config.json"),
    ("several_adapters", _several_adapters, "several adapters, choose one with --adapter NAME (adapter=NAME in Python): chat, math"),
    ("not_an_adapter_file", _text_file, "not an adapter"),
    ("bare_file_without_lora", _bare_without_lora, "no LoRA factors found"),
    ("bare_torch_pickle", _bare_bin, "bare torch pickle is not supported"),
    ("corrupt_safetensors", _corrupt_weights, "beyond the file"),
    ("truncated_safetensors", _truncated_bare, "out of range (data region is 246 bytes; truncated file?)"),
    ("config_not_json", _config_text("{r: 8,"), "not valid JSON"),
    ("config_not_object", _config_text("[1, 2]"), "expected a JSON object"),
    ("config_r_zero", _pair(r=0), "r must be a positive integer"),
    ("config_r_string", _pair(r="8"), "r must be a positive integer"),
    ("config_r_bool", _pair(r=True), "r must be a positive integer"),
    ("config_r_float", _pair(r=8.0), "r must be a positive integer"),
    ("config_alpha_string", _pair(lora_alpha="16"), "lora_alpha must be a finite number"),
    ("config_rslora_string", _pair(use_rslora="yes"), "use_rslora must be true or false"),
    ("config_unknown_type", _pair(peft_type="IA3"), "unsupported adapter type 'IA3'"),
    ("config_bad_rank_pattern", _pair(rank_pattern={"q_proj": -1}), "rank_pattern must map"),
    ("config_bad_regex", _pair(alpha_pattern={"q_proj(": 3}), "is not a regex"),
    ("lora_A_without_lora_B", _tensors({A_KEY: np.ones((8, 4), F32)}), f"module '{Q0}' has lora_A without lora_B"),
    ("lora_B_without_lora_A", _tensors({B_KEY: np.ones((4, 8), F32)}), f"module '{Q0}' has lora_B without lora_A"),
    (
        "embedding_A_without_B",
        _tensors({PREFIX + "emb.lora_embedding_A": np.ones((8, 4), F32)}),
        "module 'emb' has lora_embedding_A without lora_embedding_B",
    ),
    (
        "mismatched_rank",
        _tensors({A_KEY: np.ones((8, 4), F32), B_KEY: np.ones((4, 6), F32)}),
        f"module '{Q0}': mismatched shapes, lora_A [8, 4] vs lora_B [4, 6]",
    ),
    (
        "mismatched_ndim",
        _tensors({A_KEY: np.ones((8, 4, 3, 3), F32), B_KEY: np.ones((4, 8), F32)}),
        "mismatched shapes",
    ),
    (
        "conv_B_kernel_not_1x1",
        _tensors({A_KEY: np.ones((8, 4, 3, 3), F32), B_KEY: np.ones((4, 8, 3, 3), F32)}),
        "1x1 kernel",
    ),
    (
        "integer_factor",
        _tensors({A_KEY: np.ones((8, 4), np.int32), B_KEY: np.ones((4, 8), F32)}),
        "non-float dtype I32",
    ),
    ("config_rank_mismatch", _tensors(lora_tensors({Q0: (4, 4, 16)}), r=8), f"module '{Q0}': the config gives rank 8 but the tensors have rank 16"),
    (
        "rank_pattern_mismatch",
        _tensors(lora_tensors({Q0: (4, 4, 8)}), r=8, rank_pattern={"q_proj": 4}),
        "the config gives rank 4 but the tensors have rank 8",
    ),
    (
        "two_adapters_in_one_file",
        _tensors(
            {
                **{k.replace("lora_A.", "lora_A.x.").replace("lora_B.", "lora_B.x."): v for k, v in lora_tensors({Q0: (4, 4, 8)}).items()},
                **{k.replace("lora_A.", "lora_A.y.").replace("lora_B.", "lora_B.y."): v for k, v in lora_tensors({"m.k": (4, 4, 8)}).items()},
            }
        ),
        "mixes several adapters (x, y)",
    ),
]


@pytest.mark.parametrize(("case", "build", "problem"), CASES, ids=[c[0] for c in CASES])
def test_bad_input_raises_one_line_checkpoint_error(tmp_path, case, build, problem):
    given, at_fault = build(tmp_path)
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(given)
    message = str(info.value)
    assert message.startswith(f"{at_fault}: "), message
    assert problem in message, message
    assert "\n" not in message
    assert isinstance(info.value, ValueError)


def test_unknown_adapter_name_lists_available(tmp_path):
    peft_dir(tmp_path / "math", lora_tensors({Q0: (4, 4, 8)}))
    with pytest.raises(CheckpointError, match=r"no adapter named 'chat' \(adapters in sub-directories: math\)"):
        load_checkpoint(tmp_path, adapter="chat")


def test_adapter_name_with_a_file_is_an_error(tmp_path):
    path = write_numpy(tmp_path / "lora.safetensors", lora_tensors({Q0: (4, 4, 8)}))
    with pytest.raises(CheckpointError, match="needs an adapter directory"):
        load_checkpoint(path, adapter="x")


class _Evil:
    """Unpickling this would create the marker file."""

    marker = ""

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


@pytest.mark.parametrize("use_torch_save", [True, False])
def test_malicious_pickle_never_runs(tmp_path, use_torch_save):
    torch = pytest.importorskip("torch")
    marker = tmp_path / "pwned"
    _Evil.marker = str(marker)
    write_config(tmp_path / "ckpt")
    bin_path = tmp_path / "ckpt" / "adapter_model.bin"
    payload = {A_KEY: torch.ones(8, 4), B_KEY: torch.ones(4, 8), "evil": _Evil()}
    if use_torch_save:
        torch.save(payload, bin_path)
    else:
        bin_path.write_bytes(pickle.dumps(payload))
    # sanity: the payload really would run code if unpickled unsafely
    assert not marker.exists()
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(tmp_path / "ckpt")
    assert not marker.exists()
    message = str(info.value)
    assert message.startswith(f"{bin_path}: refused to unpickle: ") and "could run code" in message
    assert "\n" not in message
    assert "weights_only" not in message  # never relay torch's advice to turn the safety off


def test_garbage_bin_is_an_error(tmp_path):
    pytest.importorskip("torch")
    write_config(tmp_path)
    (tmp_path / "adapter_model.bin").write_bytes(b"\x00garbage" * 10)
    with pytest.raises(CheckpointError, match=r"adapter_model.bin: not a readable torch checkpoint: damaged pickle \(at position 0, opcode b.\\x00. unknown\)$"):
        load_checkpoint(tmp_path)


def test_bin_that_is_not_a_state_dict(tmp_path):
    torch = pytest.importorskip("torch")
    write_config(tmp_path)
    torch.save([torch.ones(2)], tmp_path / "adapter_model.bin")
    with pytest.raises(CheckpointError, match="expected a state dict, got list"):
        load_checkpoint(tmp_path)


def test_unsafe_pickle_sanity_check(tmp_path):
    """The marker mechanism works: plain pickle.loads does run the payload (so the test above is meaningful)."""
    marker = tmp_path / "ran"
    _Evil.marker = str(marker)
    pickle.loads(pickle.dumps(_Evil()))
    assert marker.exists()


def test_config_error_names_the_config_file(tmp_path):
    peft_dir(tmp_path, lora_tensors({Q0: (4, 4, 8)}))
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 8, "lora_alpha": None}))
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(tmp_path)
    assert info.value.path == str(tmp_path / "adapter_config.json")
    assert "lora_alpha" in info.value.problem
