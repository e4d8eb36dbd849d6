"""Bad input for the kohya, diffusers, LyCORIS, mlx-lm and torchtune readers: one line naming the file, exit 2.

Each case builds a broken file from a real fixture (truncated, inconsistent, a pair member missing, shapes that
do not compose, an unknown layout) and checks the library's ``CheckpointError`` and the CLI's one-line message.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Callable

import numpy as np
import pytest

from nora_spectra.cli.main import main
from nora_spectra.errors import CheckpointError
from nora_spectra.io import load_checkpoint
from nora_spectra.io.safetensors_file import SafetensorsFile
from tests.nora_spectra.golden_fixtures import write_safetensors

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "formats"
_TAGS = {"float16": "F16", "bfloat16": "BF16", "float32": "F32", "float64": "F64"}


def _tensors(path: Path) -> dict[str, tuple[str, np.ndarray]]:
    source = SafetensorsFile(path)
    return {name: (_TAGS[source.info(name).dtype_name], source.read(name)) for name in source.keys()}


def _rewrite(src: Path, dst: Path, change: Callable[[dict], None]) -> Path:
    tensors = _tensors(src)
    change(tensors)
    return write_safetensors(dst, tensors, dict(SafetensorsFile(src).metadata))


def _truncate(src: Path, dst: Path) -> Path:
    data = src.read_bytes()
    dst.write_bytes(data[: len(data) - 100])
    return dst


def _copy_dir(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


KOHYA = FIXTURES / "kohya" / "kohya_sd_tiny.safetensors"
K_Q = "lora_te_text_model_encoder_layers_0_self_attn_q_proj"
K_CONV = "lora_unet_down_blocks_0_resnets_0_conv1"
LOHA = FIXTURES / "lycoris" / "loha.safetensors"
LOKR = FIXTURES / "lycoris" / "lokr_both.safetensors"
DIFF = FIXTURES / "diffusers" / "sd_peft" / "pytorch_lora_weights.safetensors"
D_Q = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
MLX = FIXTURES / "mlx" / "lora"
MOE = FIXTURES / "mlx" / "moe"
TT = FIXTURES / "torchtune" / "lora" / "epoch_0"


def _set(key: str, value: np.ndarray, tag: str = "F32") -> Callable[[dict], None]:
    return lambda t: t.__setitem__(key, (tag, value))


def _drop(key: str) -> Callable[[dict], None]:
    return lambda t: t.pop(key)


def _mlx_variant(tmp_path: Path, change: Callable[[dict], None] | None = None, config: Callable[[dict], None] | None = None,
                 src: Path = MLX) -> Path:
    d = _copy_dir(src, tmp_path / "mlx")
    if change is not None:
        _rewrite(src / "adapters.safetensors", d / "adapters.safetensors", change)
    if config is not None:
        raw = json.loads((d / "adapter_config.json").read_text())
        config(raw)
        (d / "adapter_config.json").write_text(json.dumps(raw))
    return d


def _tt_safetensors(tmp_path: Path, change: Callable[[dict], None] | None = None, r: int = 2) -> Path:
    """torchtune's keys in a .safetensors file (so no torch is needed) with its adapter_config.json."""
    rng = np.random.default_rng(0)
    tensors = {"layers.0.attn.q_proj.lora_a.weight": ("F32", rng.standard_normal((2, 6))),
               "layers.0.attn.q_proj.lora_b.weight": ("F32", rng.standard_normal((4, 2)))}
    if change is not None:
        change(tensors)
    (tmp_path / "adapter_config.json").write_text(json.dumps({"r": r, "lora_alpha": 4, "peft_type": "LORA"}))
    return write_safetensors(tmp_path / "adapter_0.safetensors", tensors)


# (name, builder(tmp_path) -> path, the message's problem part)
CASES: list[tuple[str, Callable[[Path], Path], str]] = [
    # kohya
    ("kohya truncated", lambda p: _truncate(KOHYA, p / "k.safetensors"), "truncated"),
    ("kohya missing up", lambda p: _rewrite(KOHYA, p / "k.safetensors", _drop(f"{K_Q}.lora_up.weight")),
     f"module '{K_Q}' has alpha, lora_down.weight but no lora_up.weight"),
    ("kohya shapes", lambda p: _rewrite(KOHYA, p / "k.safetensors", _set(f"{K_Q}.lora_up.weight", np.ones((8, 3)))),
     f"module '{K_Q}': shapes do not compose, lora_down [4, 8] vs lora_up [8, 3] (rank 4 vs 3)"),
    ("kohya conv up kernel", lambda p: _rewrite(KOHYA, p / "k.safetensors", _set(f"{K_CONV}.lora_up.weight", np.ones((4, 2, 3, 3)))),
     "a conv lora_up must have a 1x1 kernel"),
    ("kohya alpha not scalar", lambda p: _rewrite(KOHYA, p / "k.safetensors", _set(f"{K_Q}.alpha", np.ones(2))),
     f"module '{K_Q}': '{K_Q}.alpha' has shape [2], expected 1 values (alpha is one number)"),
    ("kohya dotted names", lambda p: write_safetensors(p / "k.safetensors", {
        "lora_unet_a.lora_down.weight": ("F32", np.ones((2, 3))), "lora_unet_a.lora_up.weight": ("F32", np.ones((4, 2))),
        "x.y.lora_down.weight": ("F32", np.ones((2, 3))), "x.y.lora_up.weight": ("F32", np.ones((4, 2)))}),
     "no kohya LoRA modules (expected <name>.lora_down.weight / .lora_up.weight keys; found x.y"),
    # LyCORIS
    ("loha truncated", lambda p: _truncate(LOHA, p / "l.safetensors"), "truncated"),
    ("loha missing factor", lambda p: _rewrite(LOHA, p / "l.safetensors", _drop("lycoris_q_proj.hada_w2_b")),
     "module 'lycoris_q_proj' has alpha, hada_w1_a, hada_w1_b, hada_w2_a but no hada_w2_b"),
    ("loha shapes", lambda p: _rewrite(LOHA, p / "l.safetensors", _set("lycoris_q_proj.hada_w2_b", np.ones((4, 40)))),
     "module 'lycoris_q_proj': shapes do not compose"),
    ("lokr shapes", lambda p: _rewrite(LOKR, p / "l.safetensors", _set("lycoris_q_proj.lokr_w1_b", np.ones((3, 6)))),
     "lokr_w1_a (a, r), lokr_w1_b (r, c)"),
    ("lokr missing w2", lambda p: _rewrite(LOKR, p / "l.safetensors", _drop("lycoris_q_proj.lokr_w2_a")),
     "module 'lycoris_q_proj' has alpha, lokr_w1_a, lokr_w1_b, lokr_w2_b but no lokr_w2_a"),
    ("lycoris mixed kinds", lambda p: _rewrite(LOHA, p / "l.safetensors", _set("lycoris_q_proj.lokr_w1", np.ones((2, 2)))),
     "module 'lycoris_q_proj' mixes LoHa (hada_*) and LoKr (lokr_*) tensors"),
    ("lycoris bad dora_scale", lambda p: _rewrite(LOHA, p / "l.safetensors", _set("lycoris_q_proj.dora_scale", np.ones((5, 1)))),
     "DoRA magnitude 'lycoris_q_proj.dora_scale' has shape [5, 1]"),
    ("lycoris unknown algorithm only", lambda p: write_safetensors(p / "l.safetensors", {
        "lycoris_q.oft_blocks": ("F32", np.ones((2, 4, 4))), "lycoris_q.alpha": ("F32", np.array(1.0)),
        "lycoris_r.hada_w1_a": ("F32", np.ones((2, 2)))}),
     "module 'lycoris_r' has hada_w1_a but no hada_w1_b, hada_w2_a, hada_w2_b"),
    # diffusers
    ("diffusers truncated", lambda p: _truncate(DIFF, p / "d.safetensors"), "truncated"),
    ("diffusers missing B", lambda p: _rewrite(DIFF, p / "d.safetensors", _drop(f"{D_Q}.lora_B.weight")),
     f"module '{D_Q}' has '{D_Q}.lora_A.weight' without its up / lora_B factor"),
    ("diffusers shapes", lambda p: _rewrite(DIFF, p / "d.safetensors", _set(f"{D_Q}.lora_B.weight", np.ones((4, 3)))),
     f"module '{D_Q}': shapes do not compose, down [4, 4] vs up [4, 3] (rank 4 vs 3)"),
    ("diffusers rank vs metadata", lambda p: _rewrite(DIFF, p / "d.safetensors", lambda t: t.update({
        f"{D_Q}.lora_A.weight": ("F32", np.ones((3, 4))), f"{D_Q}.lora_B.weight": ("F32", np.ones((4, 3)))})),
     f"module '{D_Q}': lora_adapter_metadata gives rank 4 but the tensors have rank 3"),
    ("diffusers alpha and metadata", lambda p: _rewrite(DIFF, p / "d.safetensors", _set(f"{D_Q}.alpha", np.array(2.0))),
     "has both .alpha tensors and a lora_adapter_metadata header entry"),
    # mlx-lm
    ("mlx truncated", lambda p: (_copy_dir(MLX, p / "mlx"), _truncate(MLX / "adapters.safetensors", p / "mlx" / "adapters.safetensors"))[0],
     "truncated"),
    ("mlx missing lora_b", lambda p: _mlx_variant(p, _drop("model.layers.1.self_attn.q_proj.lora_b")),
     "module 'model.layers.1.self_attn.q_proj' has lora_a without lora_b"),
    ("mlx shapes", lambda p: _mlx_variant(p, _set("model.layers.1.self_attn.q_proj.lora_b", np.ones((3, 16)))),
     "module 'model.layers.1.self_attn.q_proj': shapes do not compose, lora_a [16, 4] vs lora_b [3, 16]"),
    ("mlx moe shapes", lambda p: _mlx_variant(p, _set("model.layers.1.block_sparse_moe.switch_mlp.gate_proj.lora_b",
                                                       np.ones((2, 24, 2))), src=MOE),
     "(MoE: lora_a (E, r, d_in), lora_b (E, d_out, r))"),
    ("mlx rank vs config", lambda p: _mlx_variant(p, config=lambda c: c["lora_parameters"].update(rank=8)),
     "the config gives rank 8 but the tensors have rank 4"),
    ("mlx no scale", lambda p: _mlx_variant(p, config=lambda c: c["lora_parameters"].update(alpha=16, scale=None) or c["lora_parameters"].pop("scale")),
     "lora_parameters has no scale (it has alpha: mlx-lm now takes an absolute scale instead)"),
    ("mlx full fine-tune", lambda p: _mlx_variant(p, config=lambda c: c.update(fine_tune_type="full")),
     "fine_tune_type is full: the adapter file holds full weights, not a low-rank adapter"),
    ("mlx no config", lambda p: (shutil.copy(MLX / "adapters.safetensors", p / "adapters.safetensors"), p / "adapters.safetensors")[1],
     "an mlx-lm adapter needs the adapter_config.json mlx_lm.lora writes beside it"),
    ("mlx bad dora m", lambda p: _mlx_variant(p, _set("model.layers.1.self_attn.q_proj.m", np.ones(5)), src=FIXTURES / "mlx" / "dora"),
     "'model.layers.1.self_attn.q_proj.m' has shape [5], expected 16 values"),
    # torchtune
    ("torchtune no config", lambda p: (shutil.copy(TT / "adapter_model.pt", p / "adapter_0.pt"), p / "adapter_0.pt")[1],
     "no adapter_config.json beside it: torchtune keeps lora_alpha out of the weights"),
    ("torchtune missing lora_b", lambda p: _tt_safetensors(p, _drop("layers.0.attn.q_proj.lora_b.weight")),
     "module 'layers.0.attn.q_proj' has lora_a without lora_b"),
    ("torchtune shapes", lambda p: _tt_safetensors(p, _set("layers.0.attn.q_proj.lora_b.weight", np.ones((4, 3)))),
     "module 'layers.0.attn.q_proj': shapes do not compose, lora_a [2, 6] vs lora_b [4, 3] (rank 2 vs 3)"),
    ("torchtune rank vs config", lambda p: _tt_safetensors(p, r=4),
     "module 'layers.0.attn.q_proj': the config gives r 4 but the tensors have rank 2"),
    # two formats at once
    ("ambiguous", lambda p: write_safetensors(p / "two.safetensors", {
        "lora_unet_a.lora_down.weight": ("F32", np.ones((2, 3))), "lora_unet_a.lora_up.weight": ("F32", np.ones((4, 2))),
        "m.q_proj.lora_a": ("F32", np.ones((3, 2))), "m.q_proj.lora_b": ("F32", np.ones((2, 4)))}),
     "ambiguous: the path matches the formats kohya, mlx; choose one with --format-in NAME"),
]


@pytest.mark.parametrize(("name", "build", "problem"), CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_checkpoint_error_naming_the_file(name, build, problem, tmp_path) -> None:
    path = build(tmp_path)
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path)
    message = str(info.value)
    assert problem in message, message
    assert Path(info.value.path).resolve().is_relative_to(tmp_path.resolve()), message  # names the broken file
    assert "\n" not in message


@pytest.mark.parametrize(("name", "build", "problem"), CASES[::3], ids=[c[0] for c in CASES[::3]])
def test_cli_prints_one_line_and_exits_2(name, build, problem, tmp_path, capsys) -> None:
    path = build(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        main(["analyze", str(path)])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2
    assert err.count("\n") == 1 and "Traceback" not in err and problem in err, err


def test_a_torchtune_pickle_that_would_run_code_is_refused_before_torch(tmp_path) -> None:
    import pickle
    import zipfile

    class Evil:
        def __reduce__(self):  # pragma: no cover - never unpickled
            import os

            return os.system, ("echo pwned",)

    path = tmp_path / "adapter_0.pt"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("archive/data.pkl", pickle.dumps({"layers.0.attn.q_proj.lora_a.weight": Evil()}))
    (tmp_path / "adapter_config.json").write_text(json.dumps({"r": 2, "lora_alpha": 4}))
    with pytest.raises(CheckpointError, match="refused to unpickle: it refers to posix.system"):
        load_checkpoint(path)


def test_forcing_a_format_on_a_file_of_another(tmp_path) -> None:
    with pytest.raises(CheckpointError, match="no kohya LoRA modules"):
        load_checkpoint(DIFF, format="kohya")
    with pytest.raises(CheckpointError, match="no LoHa, LoKr or LoCon modules"):
        load_checkpoint(DIFF, format="lycoris")
    with pytest.raises(CheckpointError, match="no diffusers LoRA factors found"):
        load_checkpoint(KOHYA, format="diffusers")
    with pytest.raises(CheckpointError, match="an mlx-lm adapter needs the adapter_config.json"):
        load_checkpoint(KOHYA, format="mlx")
    with pytest.raises(CheckpointError, match="no adapter_config.json beside it"):
        load_checkpoint(KOHYA, format="torchtune")
    forced = load_checkpoint(FIXTURES / "lycoris" / "locon.safetensors", format="kohya")  # LoCon keys are kohya's
    assert forced.format == "kohya" and len(forced) == 4


def test_peft_magnitude_vector_of_the_wrong_size(tmp_path) -> None:
    from tests.nora_spectra.io_builders import lora_tensors, peft_dir

    tensors = lora_tensors({"m.q_proj": (6, 5, 2)})
    tensors["base_model.model.m.q_proj.lora_magnitude_vector"] = np.ones(4, np.float32)
    with pytest.raises(CheckpointError, match=r"DoRA magnitude .* is F32 \[4\], expected 6 float values"):
        load_checkpoint(peft_dir(tmp_path, tensors, r=2))
