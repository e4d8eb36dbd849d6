"""save_adapter writes the config and the weights as one unit: SIGKILL at random points never leaves a
mismatched pair, and what it leaves loads in PEFT."""

from __future__ import annotations

import json
import os
import random
import signal
import struct
import time
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from nora_core.checkpoint import CONFIG_NAME, WEIGHTS_NAME, save_adapter
from nora_core.config import AdapterConfig
from nora_core.inject import inject_adapters

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork to kill a saver mid-write")

KILLS = 100


def _llama() -> torch.nn.Module:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
    )
    return transformers.LlamaForCausalLM(config).eval()


def _version(alpha: float) -> torch.nn.Module:
    """An adapter whose every factor entry equals ``alpha``: the pair on disk must agree on it."""
    model = inject_adapters(_llama(), AdapterConfig(r=4, alpha=alpha, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.fill_(alpha)
    return model


def _pair_on_disk(directory: Path) -> float:
    """The alpha both files agree on; fails on a mismatched or partial pair."""
    names = sorted(os.listdir(directory))
    assert names == [CONFIG_NAME, WEIGHTS_NAME], names
    alpha = json.loads((directory / CONFIG_NAME).read_text())["lora_alpha"]
    values = {float(v) for t in load_file(directory / WEIGHTS_NAME).values() for v in t.unique()}
    assert values == {float(alpha)}, f"config alpha {alpha} beside weights {values}"
    return alpha


def test_sigkill_during_save_never_leaves_a_mismatched_pair(tmp_path: Path) -> None:
    versions = [_version(1.0), _version(2.0)]
    target = tmp_path / "adapter"
    save_adapter(versions[0], target)
    rng = random.Random(1234)
    seen = set()
    for kill in range(KILLS):
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:  # the saver: one timed save, then alternate the two versions until killed
            os.close(read)
            try:
                first = kill % 2
                start = time.perf_counter()
                save_adapter(versions[first], target)
                os.write(write, struct.pack("d", time.perf_counter() - start))
                i = first + 1
                while True:
                    save_adapter(versions[i % 2], target)
                    i += 1
            finally:
                os._exit(0)
        os.close(write)
        # The kill lands within the next two saves, timed in the saver itself: a forked process can save
        # much slower than its parent (copy-on-write, cold caches), and a delay timed in the parent would
        # then kill every saver during its first save.
        (one_save,) = struct.unpack("d", os.read(read, 8))
        os.close(read)
        time.sleep(rng.uniform(0, 2 * one_save))
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        seen.add(_pair_on_disk(target))
    # Each saver completed one save of alternating version before it could be killed, so both show up.
    assert seen == {1.0, 2.0}
    leftovers = [p.name for p in tmp_path.iterdir() if p.name != "adapter"]
    assert all(name.startswith((".tmp-adapter-", ".old-adapter-")) for name in leftovers)


def test_the_pair_left_behind_loads_in_peft(tmp_path: Path) -> None:
    peft = pytest.importorskip("peft")
    (tmp_path / "README.md").write_text("kept")
    save_adapter(_version(1.0), tmp_path / "a")
    (tmp_path / "a" / "README.md").write_text("kept")
    (tmp_path / "a" / "other").mkdir()
    (tmp_path / "a" / "other" / "note.txt").write_text("kept too")
    save_adapter(_version(2.0), tmp_path / "a")
    assert (tmp_path / "a" / "README.md").read_text() == "kept"
    assert (tmp_path / "a" / "other" / "note.txt").read_text() == "kept too"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = peft.PeftModel.from_pretrained(_llama(), str(tmp_path / "a"))
    weights = [p for n, p in model.named_parameters() if "lora_A" in n]
    assert weights and all(torch.all(p == 2.0) for p in weights)
