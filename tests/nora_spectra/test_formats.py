"""The kohya, diffusers, LyCORIS, mlx-lm and torchtune readers on files their own libraries wrote.

Every file under ``tests/fixtures/formats/`` was saved by the format's library, and its ``reference.json``
holds the singular values of the dense update the library itself computes in float64 from that file (see
``tests/fixtures/formats/README.md``). Our spectra come from the factors alone (low-rank, Hadamard and
Kronecker kinds, never the dense product) and must agree to ``1e-9 * sigma_max``, with the library's scale.
None of the libraries is needed here.
"""

from __future__ import annotations

import gzip
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from nora_spectra.analysis import analyze
from nora_spectra.io import detect_format, formats, load_checkpoint
from nora_spectra.io.kohya_names import PREFIXES, dotted_module
from nora_spectra.io.safetensors_file import SafetensorsFile
from nora_spectra.updates import HadamardUpdate, KroneckerUpdate, LowRankUpdate
from tests.nora_spectra.golden_fixtures import write_safetensors

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "formats"
#: the agreement asked of every spectrum, relative to the layer's largest singular value.
TOLERANCE = 1e-9


def reference(fmt: str, root: Path = FIXTURES) -> dict[str, Any]:
    return json.loads((root / fmt / "reference.json").read_text())


def cases() -> list[tuple[str, str]]:
    return [(fmt, name) for fmt in ("kohya", "diffusers", "lycoris", "mlx", "torchtune")
            for name in reference(fmt)["files"]]


def _fixture_path(fmt: str, name: str, tmp_path: Path, root: Path = FIXTURES) -> Path:
    if name == "kohya_sd_tiny_noalpha.safetensors":  # an old-format file: the same tensors, no .alpha
        return _without_alpha(tmp_path)
    return root / fmt / name


def _without_alpha(tmp_path: Path) -> Path:
    source = SafetensorsFile(FIXTURES / "kohya" / "kohya_sd_tiny.safetensors")
    tensors = {name: ("F16", source.read(name)) for name in source.keys() if not name.endswith(".alpha")}
    return write_safetensors(tmp_path / "kohya_noalpha.safetensors", tensors, dict(source.metadata))


def assert_spectrum(ours: list[float], library: list[float], where: str) -> None:
    """Our leading values equal the library's to 1e-9 sigma_max; the library's remaining ones are zero."""
    ours_a, ref = np.asarray(ours), np.asarray(library)
    scale = ref[0]
    assert scale > 0, where
    assert len(ours_a) <= len(ref), where
    err = np.max(np.abs(ours_a - ref[: len(ours_a)]))
    tail = np.max(ref[len(ours_a):], initial=0.0)
    assert err <= TOLERANCE * scale and tail <= TOLERANCE * scale, f"{where}: error {err / scale:.2e}, tail {tail / scale:.2e}"


# --------------------------------------------------------------------------------------------- spectra
@pytest.mark.parametrize(("fmt", "name"), cases())
def test_spectra_and_scales_match_the_library(fmt: str, name: str, tmp_path: Path) -> None:
    check_against_reference(fmt, name, tmp_path)


def check_against_reference(fmt: str, name: str, tmp_path: Path, root: Path = FIXTURES) -> None:
    """Every module of ``root/fmt/name``: our spectrum and scale against the library's, in ``reference.json``."""
    spec = reference(fmt, root)["files"][name]
    path = _fixture_path(fmt, name, tmp_path, root)
    result = analyze(path, emit_warnings=False)
    assert result.format == fmt and detect_format(path) == fmt
    match = spec.get("match", "key")
    checked = set()
    for rec in result.records:
        ref = spec["modules"].get(rec[match])
        if ref is None:
            continue  # diffusers text-encoder modules: checked by formula below
        sigma = ref["sigma"]
        if sigma and isinstance(sigma[0], list):  # mlx-lm MoE: one list per expert
            sigma = sigma[int(rec["module"].split(".experts.")[1].split(".")[0])]
        assert_spectrum(rec["singular_values"], sigma, f"{name}: {rec['module']}")
        assert rec["scale"] == pytest.approx(ref["scale"], rel=1e-12), rec["module"]
        assert rec["status"] in ("ok", "dora_direction_only")
        checked.add(rec[match])
    assert checked == set(spec["modules"]), "every module the library adapted is in the analysis"


@pytest.mark.parametrize(("fmt", "name"), cases())
def test_each_real_file_is_claimed_by_exactly_one_format(fmt: str, name: str, tmp_path: Path) -> None:
    from nora_spectra.io.registry import Probe

    path = _fixture_path(fmt, name, tmp_path)
    claims = [n for n, f in formats().items() if f.sniff(Probe(str(path)))]
    assert claims == [fmt]


def test_directories_and_companion_files_are_claimed_by_the_right_format() -> None:
    assert detect_format(FIXTURES / "diffusers" / "sd_peft") == "diffusers"  # holds pytorch_lora_weights.safetensors
    assert detect_format(FIXTURES / "mlx" / "lora") == "mlx"  # adapter_config.json without peft_type
    assert detect_format(FIXTURES / "torchtune" / "lora" / "epoch_0") == "peft"  # torchtune's PEFT export
    assert detect_format(FIXTURES / "torchtune" / "lora" / "epoch_0" / "adapter_model.safetensors") == "peft"
    assert detect_format(FIXTURES / "torchtune" / "lora" / "epoch_0" / "adapter_model.pt") == "torchtune"
    assert detect_format(FIXTURES / "mlx" / "dora" / "base.safetensors") is None  # beside an mlx config, not adapters
    a = analyze(FIXTURES / "mlx" / "lora", emit_warnings=False)
    b = analyze(FIXTURES / "mlx" / "lora" / "adapters.safetensors", emit_warnings=False)
    assert a.records == b.records


def test_detection_reads_no_tensor(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from nora_spectra.io import torch_bin

    def refuse(*args: Any) -> Any:  # pragma: no cover - failing is the point
        raise AssertionError("a tensor was read while detecting the format")

    paths = [_fixture_path(fmt, name, tmp_path) for fmt, name in cases()]  # written before reads are refused
    monkeypatch.setattr(SafetensorsFile, "read", refuse)
    monkeypatch.setattr(SafetensorsFile, "read_index", refuse)
    monkeypatch.setattr(torch_bin, "TorchBinFile", refuse)
    for (fmt, _), path in zip(cases(), paths):
        assert detect_format(path) == fmt
        if fmt != "torchtune":  # opening a .pt loads it (torch.load); the safetensors formats read headers only
            assert len(load_checkpoint(path)) > 0


# ------------------------------------------------------------------------------------------------ kohya
def test_kohya_names_map_to_the_paths_sd_scripts_uses_for_real_sd15_and_sdxl() -> None:
    count = 0
    for fname in ("sd15_names.txt.gz", "sdxl_names.txt.gz"):
        with gzip.open(FIXTURES / "kohya" / fname, "rt") as handle:
            for line in handle:
                prefix, path = line.rstrip("\n").split("\t")
                name = f"{prefix}_{path.replace('.', '_')}"
                assert dotted_module(name) == f"{PREFIXES[prefix + '_']}.{path}", name
                count += 1
    assert count == 350 + 1052
    assert dotted_module("lora_unet_double_blocks_0_img_attn_proj") is None  # Flux: unknown components, kept
    assert dotted_module("lora_unet_down_blocks_0_attentions_0_to_q") == "unet.down_blocks.0.attentions.0.to_q"
    assert dotted_module("lycoris_q_proj") == "q_proj" and dotted_module("other_q_proj") is None


def test_kohya_file_agrees_with_diffusers_own_conversion(tmp_path: Path) -> None:
    """Module names, alphas and scales as diffusers 0.42's kohya -> diffusers conversion gives them
    (recorded at fixture time, ``kohya/diffusers_conversion.json``)."""
    conversion = json.loads((FIXTURES / "kohya" / "diffusers_conversion.json").read_text())["files"]
    for name, path in (("kohya_sd_tiny.safetensors", FIXTURES / "kohya" / "kohya_sd_tiny.safetensors"),
                       ("kohya_sd_tiny_noalpha.safetensors", _without_alpha(tmp_path))):
        ckpt = load_checkpoint(path)
        expected = conversion[name]
        assert {entry.key: entry.module for entry in ckpt.entries} == {k: v["diffusers_module"] for k, v in expected.items()}
        for layer in ckpt.iter_layers():
            theirs = expected[layer.key]
            assert theirs["factors_equal"]
            if theirs["network_alpha"] is not None:
                assert layer.update.scale == theirs["network_alpha"] / layer.rank
            else:
                assert layer.update.scale == 1.0
            if "scaling" in theirs:  # UNet modules went through diffusers' loader
                assert layer.update.scale == pytest.approx(theirs["scaling"], rel=1e-12)
    result = analyze(FIXTURES / "kohya" / "kohya_sd_tiny.safetensors", emit_warnings=False)
    by_key = {rec["key"]: rec for rec in result.records}
    for key, theirs in conversion["kohya_sd_tiny.safetensors"].items():
        if "sigma" in theirs:
            assert_spectrum(by_key[key]["singular_values"], theirs["sigma"], key)


def test_kohya_metadata_layer_types_and_missing_alpha(tmp_path: Path) -> None:
    result = analyze(FIXTURES / "kohya" / "kohya_sd_tiny.safetensors", emit_warnings=False)
    assert result.metadata["ss_network_dim"] == "4" and result.metadata["ss_network_alpha"] == "2.0"
    assert result.to_dict()["metadata"]["ss_network_args"] == '{"conv_dim": "2", "conv_alpha": "1"}'
    by_module = {rec["module"]: rec for rec in result.records}
    conv = by_module["unet.down_blocks.0.resnets.0.conv1"]
    assert conv["key"] == "lora_unet_down_blocks_0_resnets_0_conv1"
    assert conv["layer_type"] == "conv" and conv["shape"] == [4, 4 * 3 * 3] and conv["rank"] == 2
    assert conv["scale"] == 0.5 and conv["dtype"] == "float16"  # conv_alpha 1 / conv_dim 2
    assert by_module["unet.up_blocks.0.resnets.0.conv_shortcut"]["layer_type"] == "conv"  # 1x1
    q = by_module["text_encoder.text_model.encoder.layers.0.self_attn.q_proj"]
    assert q["layer_type"] == "linear" and q["scale"] == 0.5 and q["rank"] == 4
    noalpha = analyze(_without_alpha(tmp_path), emit_warnings=False)
    assert {rec["scale"] for rec in noalpha.records} == {1.0}
    (warning,) = [w for w in noalpha.warnings if "without .alpha" in w]
    assert "53 modules without .alpha" in warning and "scale 1" in warning
    assert "ss_network_alpha says the training used alpha 2.0" in warning


def test_kohya_tucker_locon_and_dora_scale(tmp_path: Path) -> None:
    """A kohya-keyed LoCon Tucker conv (lora_mid) and a dora_scale, against the hand-written dense formula."""
    rng = np.random.default_rng(3)
    down, mid, up = rng.standard_normal((3, 5, 1, 1)), rng.standard_normal((3, 3, 3, 3)), rng.standard_normal((7, 3, 1, 1))
    tensors = {
        "lora_unet_x_conv.lora_down.weight": ("F32", down), "lora_unet_x_conv.lora_mid.weight": ("F32", mid),
        "lora_unet_x_conv.lora_up.weight": ("F32", up), "lora_unet_x_conv.alpha": ("F32", np.array(6.0)),
        "lora_unet_x_conv.dora_scale": ("F32", rng.standard_normal((7, 1, 1, 1))),
    }
    path = write_safetensors(tmp_path / "k.safetensors", tensors)
    ckpt = load_checkpoint(path)
    assert ckpt.format == "kohya"
    (entry,) = ckpt.entries
    assert entry.module == "lora_unet_x_conv" and entry.dora and entry.shape == (7, 45) and entry.rank == 3
    np.testing.assert_array_equal(entry.read_magnitude(), tensors["lora_unet_x_conv.dora_scale"][1].astype(np.float32).reshape(-1))
    f32 = {k: v.astype(np.float32).astype(np.float64) for k, (_, v) in tensors.items()}
    # LyCORIS' rebuild_tucker: dW[p, q, h, w] = sum_ij mid[i, j, h, w] up[p, i] down[j, q]
    dense = 2.0 * np.einsum("ijhw,pi,jq->pqhw", f32["lora_unet_x_conv.lora_mid.weight"],
                            f32["lora_unet_x_conv.lora_up.weight"][:, :, 0, 0], f32["lora_unet_x_conv.lora_down.weight"][:, :, 0, 0])
    result = analyze(path, emit_warnings=False)
    assert_spectrum(result.records[0]["singular_values"], list(np.linalg.svd(dense.reshape(7, -1), compute_uv=False)), "tucker")
    assert result.records[0]["status"] == "dora_direction_only"


# ------------------------------------------------------------------------------------------------ diffusers
def test_diffusers_text_encoder_modules_by_formula() -> None:
    """Text-encoder modules (no library reference: transformers 5 + peft 0.21 cannot load them) by PEFT's formula."""
    for folder, scale in (("sd_peft", 2.0), ("sd_script", 1.0)):
        path = FIXTURES / "diffusers" / folder / "pytorch_lora_weights.safetensors"
        source = SafetensorsFile(path)
        te = [layer for layer in load_checkpoint(path).iter_layers() if layer.module.startswith("text_encoder.")]
        assert {layer.module.rsplit(".", 1)[1] for layer in te} == {"q_proj", "fc1"}
        for layer in te:
            down = next(k for k in source.keys() if k.startswith(layer.key + ".") and ("lora_A" in k or ".down." in k))
            up = next(k for k in source.keys() if k.startswith(layer.key + ".") and ("lora_B" in k or ".up." in k))
            dense = scale * source.read(up) @ source.read(down)
            assert layer.update.scale == scale
            assert_spectrum(list(np.linalg.svd(layer.update.scale * layer.update.B @ layer.update.A, compute_uv=False)),
                            list(np.linalg.svd(dense, compute_uv=False)), layer.module)


def test_diffusers_layouts_name_modules_as_the_model_does() -> None:
    legacy = load_checkpoint(FIXTURES / "diffusers" / "legacy_attn_procs.safetensors")
    q = next(e for e in legacy.entries if e.module.endswith("attn1.to_q"))
    assert q.key == q.module.removesuffix(".to_q") + ".processor.to_q_lora"
    assert any(e.module.endswith("attn1.to_out.0") and e.key.endswith("processor.to_out_lora") for e in legacy.entries)
    script = load_checkpoint(FIXTURES / "diffusers" / "sd_script" / "pytorch_lora_weights.safetensors")
    keys = {e.module: e.key for e in script.entries}
    assert keys["unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0"].endswith("attn1.to_out.0")
    assert script.config is None and any("scale 1 assumed" in w for w in script.warnings)
    peft = load_checkpoint(FIXTURES / "diffusers" / "sd_peft" / "pytorch_lora_weights.safetensors")
    assert set(peft.config) == {"unet", "text_encoder"} and peft.config["unet"]["rank_pattern"] == {"conv1": 2}
    assert not peft.warnings
    level = load_checkpoint(FIXTURES / "diffusers" / "unet_model_level")
    assert level.config["r"] == 4 and not any(e.module.startswith("unet.") for e in level.entries)
    flux = analyze(FIXTURES / "diffusers" / "flux", emit_warnings=False)
    assert {rec["dtype"] for rec in flux.records} == {"bfloat16"}
    assert "lora_adapter_metadata" in flux.metadata


def test_diffusers_alpha_tensors_under_the_down_key(tmp_path: Path) -> None:
    """``<A key>.alpha`` (diffusers' kohya conversion) and ``<prefix>.alpha`` both set alpha / r; a file without
    any alpha gets scale 1 and a warning."""
    rng = np.random.default_rng(5)
    a, b = rng.standard_normal((2, 6)), rng.standard_normal((5, 2))
    tensors = {
        "unet.m.to_q.lora.down.weight": ("F32", a), "unet.m.to_q.lora.up.weight": ("F32", b),
        "unet.m.to_q.lora.down.weight.alpha": ("F32", np.array(3.0)),
        "unet.m.proj.lora_A.weight": ("F32", a), "unet.m.proj.lora_B.weight": ("F32", b),
        "unet.m.proj.alpha": ("F32", np.array(1.0)),
        "unet.m.pool.down.weight": ("F32", a),  # ".down.weight" outside the legacy to_q_lora layout: not a factor
    }
    ckpt = load_checkpoint(write_safetensors(tmp_path / "d.safetensors", tensors))
    assert ckpt.format == "diffusers"
    assert {layer.module: layer.update.scale for layer in ckpt.iter_layers()} == {"unet.m.proj": 0.5, "unet.m.to_q": 1.5}
    assert ckpt.skipped == [("unet.m.pool.down.weight", "not a LoRA factor (unknown layout)")]
    assert ckpt.warnings == ["skipped 1 tensor (not LoRA factors): unet.m.pool.down.weight"]


# ------------------------------------------------------------------------------------------------ LyCORIS
def test_lycoris_kinds_ranks_and_scales() -> None:
    loha = load_checkpoint(FIXTURES / "lycoris" / "loha.safetensors")
    layers = {layer.key: layer for layer in loha.iter_layers()}
    q = layers["lycoris_q_proj"]
    assert isinstance(q.update, HadamardUpdate) and q.kind == "loha" and q.module == "q_proj"
    assert q.rank == 16 and q.shape == (64, 48)  # r1 * r2 = 4 * 4
    assert layers["lycoris_small"].rank == 6  # min(r1 r2, d_out, d_in)
    lokr = load_checkpoint(FIXTURES / "lycoris" / "lokr.safetensors")
    layers = {layer.key: layer for layer in lokr.iter_layers()}
    q = layers["lycoris_q_proj"]
    assert isinstance(q.update, KroneckerUpdate) and q.kind == "lokr" and q.shape == (64, 48)
    assert q.rank == min(8, 6) * 2 and q.update.scale == 0.5  # W1 (8, 6) dense, W2 rank 2; alpha 1 / r 2
    assert layers["lycoris_small"].update.scale == 1.0  # both factors full: scale 1 whatever alpha says
    assert layers["lycoris_conv3"].shape == (16, 16 * 9)
    tucker = {layer.key: layer for layer in load_checkpoint(FIXTURES / "lycoris" / "lokr_tucker.safetensors").iter_layers()}
    assert tucker["lycoris_conv3"].layer_type == "conv" and tucker["lycoris_conv3"].update.scale == 0.5  # conv_alpha 0.5 / 1
    locon = load_checkpoint(FIXTURES / "lycoris" / "locon_tucker.safetensors")
    assert locon.method == "lora" and all(isinstance(layer.update, LowRankUpdate) for layer in locon.iter_layers())


def test_lycoris_dora_magnitudes_and_their_axis() -> None:
    out_axis = load_checkpoint(FIXTURES / "lycoris" / "loha_dora.safetensors")
    in_axis = load_checkpoint(FIXTURES / "lycoris" / "lokr_dora_in.safetensors")
    for ckpt, axis in ((out_axis, "output row"), (in_axis, "input column")):
        source = SafetensorsFile(ckpt.weights_path)
        for entry in ckpt.entries:
            assert entry.dora and any(f"per {axis}" in note for note in entry.notes)
            stored = source.read(entry.key + ".dora_scale").reshape(-1)
            if axis == "output row":
                np.testing.assert_array_equal(entry.read_magnitude(), stored)
                assert stored.size == entry.shape[0]
            else:  # (1, c_in[, 1, 1]): one value per input channel; the true update (--base) normalises
                # rows, so per-column magnitudes are not offered to it and stay a labelled proxy
                assert entry.read_magnitude is None
                assert source.info(entry.key + ".dora_scale").shape[:2] == (1, stored.size)
                assert entry.shape[1] % stored.size == 0


def test_lycoris_exact_kinds_never_form_the_product(monkeypatch: pytest.MonkeyPatch) -> None:
    """LoKr spectra come from the Kronecker factors and LoHa's from the face-splitting factors."""
    import nora_spectra.spectrum as spectrum

    formed: list[tuple[int, int]] = []
    real = spectrum.dense_spectrum

    def watch(delta, *args, **kwargs):
        formed.append(np.shape(delta))
        return real(delta, *args, **kwargs)

    monkeypatch.setattr(spectrum, "dense_spectrum", watch)
    analyze(FIXTURES / "lycoris" / "lokr_both.safetensors", emit_warnings=False)
    analyze(FIXTURES / "lycoris" / "loha.safetensors", emit_warnings=False)
    assert all(math.prod(shape) <= 16 * 16 for shape in formed), formed  # only small dense Kronecker factors


# ------------------------------------------------------------------------------------------------ mlx-lm
def test_mlx_orientation_experts_and_dora() -> None:
    lora = load_checkpoint(FIXTURES / "mlx" / "lora")
    assert lora.config["lora_parameters"]["scale"] == 20.0
    k = next(layer for layer in lora.iter_layers() if layer.module.endswith("k_proj"))
    assert k.shape == (8, 16) and k.update.scale == 20.0  # GQA: d_out 8, d_in 16 (stored lora_a (16, 2), lora_b (2, 8))
    moe = load_checkpoint(FIXTURES / "mlx" / "moe")
    experts = [e for e in moe.entries if ".experts." in e.module]
    assert [e.module for e in experts[:3]] == [
        f"model.layers.1.block_sparse_moe.switch_mlp.experts.{i}.down_proj" for i in range(3)]
    assert {e.key for e in experts[:3]} == {"model.layers.1.block_sparse_moe.switch_mlp.down_proj"}
    records = analyze(moe, emit_warnings=False).records
    assert {r["module_type"] for r in records} == {"down_proj", "gate_proj", "v_proj"}
    assert {r["layer_index"] for r in records} == {1}
    dora = load_checkpoint(FIXTURES / "mlx" / "dora")
    source = SafetensorsFile(dora.weights_path)
    for entry in dora.entries:
        assert entry.dora
        np.testing.assert_array_equal(entry.read_magnitude(), source.read(entry.key + ".m"))


# ------------------------------------------------------------------------------------------------ torchtune
def test_torchtune_native_file_and_its_peft_export_have_the_same_spectra() -> None:
    """torchtune's PEFT export row-permutes q/k lora_B (RoPE): the singular values are unchanged."""
    pytest.importorskip("torch")
    for variant in ("lora", "dora"):
        native = analyze(FIXTURES / "torchtune" / variant / "epoch_0" / "adapter_model.pt", emit_warnings=False)
        export = analyze(FIXTURES / "torchtune" / variant / "epoch_0", emit_warnings=False)
        names = {"attn.q_proj": "self_attn.q_proj", "attn.k_proj": "self_attn.k_proj", "attn.v_proj": "self_attn.v_proj",
                 "attn.output_proj": "self_attn.o_proj", "mlp.w1": "mlp.gate_proj", "mlp.w2": "mlp.down_proj",
                 "mlp.w3": "mlp.up_proj"}
        exported = {rec["module"]: rec for rec in export.records}
        assert len(native.records) == len(exported) == 7
        for rec in native.records:
            layer, rest = rec["module"].split(".", 2)[1], rec["module"].split(".", 2)[2]
            other = exported[f"model.layers.{layer}.{names[rest]}"]
            assert rec["scale"] == other["scale"] == 2.0
            assert_spectrum(rec["singular_values"], other["singular_values"], rec["module"])
        if variant == "dora":
            entry = load_checkpoint(FIXTURES / "torchtune" / "dora" / "epoch_0" / "adapter_model.pt").entries[0]
            assert entry.dora and entry.read_magnitude().shape == (entry.shape[0],)


def test_torchtune_native_safetensors(tmp_path: Path) -> None:
    """torchtune's keys in a .safetensors file (no torch needed) read like the .pt."""
    rng = np.random.default_rng(2)
    tensors = {"layers.0.attn.q_proj.lora_a.weight": ("F32", rng.standard_normal((2, 6))),
               "layers.0.attn.q_proj.lora_b.weight": ("F32", rng.standard_normal((4, 2)))}
    path = write_safetensors(tmp_path / "adapter_0.safetensors", tensors)
    (tmp_path / "adapter_config.json").write_text(json.dumps({"r": 2, "lora_alpha": 8, "peft_type": "LORA"}))
    layer = next(load_checkpoint(path).iter_layers())
    assert layer.module == layer.key == "layers.0.attn.q_proj" and layer.update.scale == 4.0


def test_probe_space_takes_loha_as_its_low_rank_product_and_refuses_lokr() -> None:
    from nora_spectra.errors import UsageError

    weight = analyze(FIXTURES / "lycoris" / "loha.safetensors", emit_warnings=False)
    probe = analyze(FIXTURES / "lycoris" / "loha.safetensors", space="probe", probe_samples=6000, emit_warnings=False)
    for w, p in zip(weight.records, probe.records):
        # identity branch, N(0, I) inputs: the probe estimates sigma(dW) with sampling error ~ sqrt(rank / samples)
        top = min(len(w["singular_values"]), 3)
        np.testing.assert_allclose(p["singular_values"][:top], w["singular_values"][:top], rtol=0.15)
    with pytest.raises(UsageError, match="is a LoKr \\(Kronecker\\) update: use --space weight"):
        analyze(FIXTURES / "lycoris" / "lokr.safetensors", space="probe")


def test_tensors_that_are_not_factors_are_skipped_with_one_warning(tmp_path: Path) -> None:
    ones = np.ones((2, 3))
    kohya = {"lora_unet_a_proj.lora_down.weight": ("F32", ones), "lora_unet_a_proj.lora_up.weight": ("F32", ones.T),
             "bundle_emb.ti.string_to_param.*": ("F32", np.ones((1, 3)))}
    ckpt = load_checkpoint(write_safetensors(tmp_path / "k.safetensors", kohya))
    assert ckpt.format == "kohya" and ckpt.modules == ["lora_unet_a_proj"]
    assert ckpt.skipped == [("bundle_emb.ti.string_to_param.*", "not a LoRA factor (full tensor or unknown key)")]
    assert ckpt.warnings[-1] == "skipped 1 tensor (not LoRA factors): bundle_emb.ti.string_to_param.*"
    lycoris = {"lycoris_q.hada_w1_a": ("F32", ones.T), "lycoris_q.hada_w1_b": ("F32", ones),
               "lycoris_q.hada_w2_a": ("F32", ones.T), "lycoris_q.hada_w2_b": ("F32", ones),
               "lycoris_o.oft_blocks": ("F32", np.ones((2, 3, 3))), "lycoris_o.alpha": ("F32", np.array(1.0))}
    ckpt = load_checkpoint(write_safetensors(tmp_path / "l.safetensors", lycoris))
    assert ckpt.format == "lycoris" and ckpt.modules == ["lycoris_q"] and ckpt.method == "loha"
    assert sorted(name for name, _ in ckpt.skipped) == ["lycoris_o.alpha", "lycoris_o.oft_blocks"]
    assert ckpt.warnings[-1].startswith("skipped 2 tensors (not LoHa, LoKr or LoCon factors): ")
