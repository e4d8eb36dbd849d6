"""Loading the model an adapter was trained on, and feeding it what it sees in use (tiny random models).

Every architecture family PEFT adapters are trained on: a bare encoder (``AutoModel``), a sequence-
classification head (with PEFT's ``modules_to_save`` classifier), an encoder-decoder, a causal LM and the
built-in GPT. Each is compared with an independent float64 reference over PEFT's own modules
(``tests/nora_spectra/peft_reference.py``). The same checks on real pretrained weights are in
``test_real_models.py``.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from nora_spectra import analyze
from nora_spectra.errors import CheckpointError, UsageError
from nora_spectra.model_loading import choose_model_class, load_model, model_max_length

from .peft_reference import assert_matches_reference, peft_branch_outputs

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [chr(c) for c in range(ord("a"), ord("z") + 1)] + [
    "the", "quick", "brown", "fox", "jumps", "over", "lazy", "dog", "question", "answer", ":", "?", ".", "2", "+", "4",
]
TEXTS = [
    {"text": "the quick brown fox jumps over the lazy dog"},
    {"question": "2 + 2 ?", "answer": "4"},
    {"text": "a b c"},
    {"text": "the dog . the fox . the quick dog jumps over the brown fox ."},
    {"text": "lazy"},
]


def _tokenizer(directory: Path):
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "vocab.txt").write_text("\n".join(VOCAB) + "\n")
    tok = transformers.BertTokenizerFast(str(directory / "vocab.txt"))  # vocab (5.x) / vocab_file (4.x)
    tok.model_max_length = 24
    tok.save_pretrained(directory)
    return tok


def _texts(records: list[dict]) -> list[str]:
    out = []
    for rec in records:
        out.append(rec["text"] if "text" in rec else f"Question: {rec['question']}\nAnswer: {rec['answer']}")
    return out


def _bert_config(**kwargs):
    return transformers.BertConfig(vocab_size=len(VOCAB), hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                   intermediate_size=24, max_position_embeddings=24, **kwargs)


def _train_briefly(model, batch: dict, steps: int = 2) -> None:
    """A few AdamW steps on the mean output, so that B is no longer zero."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-2)
    model.train()
    for _ in range(steps):
        out = model(**batch)
        value = out.logits if hasattr(out, "logits") else out.last_hidden_state
        value.pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
    model.eval()


@pytest.fixture
def data_file(tmp_path: Path) -> Path:
    path = tmp_path / "data.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in TEXTS))
    return path


def _batches(tok, texts, max_length, batch_size=2, extra=None):
    for i in range(0, len(texts), batch_size):
        enc = tok(texts[i : i + batch_size], padding=True, truncation=True, max_length=max_length, return_tensors="pt")
        batch = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
        if extra is not None:
            batch.update(extra(batch))
        yield batch


def test_choose_model_class_precedence() -> None:
    bert = {"model_type": "bert", "architectures": ["BertModel"]}
    assert choose_model_class(bert) == ("encoder", "the model's architecture BertModel")
    assert choose_model_class(bert, task_type="CAUSAL_LM")[0] == "causal-lm"
    assert choose_model_class(bert, task_type="seq_cls")[0] == "sequence-classification"
    assert choose_model_class(bert, task_type="SEQ_CLS", model_class="encoder") == ("encoder", "--model-class")
    assert choose_model_class({"architectures": ["LlamaForCausalLM"]})[0] == "causal-lm"
    assert choose_model_class({"architectures": ["GPT2LMHeadModel"]})[0] == "causal-lm"
    assert choose_model_class({"architectures": ["T5ForConditionalGeneration"]})[0] == "encoder-decoder"
    assert choose_model_class({"architectures": ["RobertaForTokenClassification"]})[0] == "token-classification"
    assert choose_model_class({"is_encoder_decoder": True})[0] == "encoder-decoder"
    assert choose_model_class({}, task_type="UNKNOWN")[0] == "causal-lm"
    assert choose_model_class(None, task_type="FEATURE_EXTRACTION")[0] == "encoder"
    with pytest.raises(UsageError, match="--model-class must be one of causal-lm, encoder"):
        choose_model_class(bert, model_class="decoder")


@pytest.fixture
def bert_encoder(tmp_path: Path):
    """A tiny BERT saved as the bare encoder, and a PEFT FEATURE_EXTRACTION adapter trained on it."""
    model_dir = tmp_path / "bert"
    tok = _tokenizer(model_dir)
    transformers.BertModel(_bert_config()).save_pretrained(model_dir)
    base = transformers.AutoModel.from_pretrained(model_dir)
    model = peft.get_peft_model(base, peft.LoraConfig(task_type="FEATURE_EXTRACTION", r=4, lora_alpha=8,
                                                      target_modules=["query", "value"]))
    _train_briefly(model, next(_batches(tok, _texts(TEXTS), 24, batch_size=4)))
    model.save_pretrained(tmp_path / "adapter")
    return model_dir, tmp_path / "adapter", model, tok


def test_encoder_adapter_is_measured_on_the_bare_encoder_with_its_special_tokens(bert_encoder, data_file) -> None:
    model_dir, adapter, peft_model, tok = bert_encoder
    result = analyze(adapter, space="activation", model=model_dir, data=data_file)
    reference = peft_branch_outputs(peft_model, _batches(tok, _texts(TEXTS), 24))
    assert_matches_reference(result.records, reference)
    # [CLS] ... [SEP] of every text, nothing shifted off
    want_tokens = sum(len(tok(t)["input_ids"]) for t in _texts(TEXTS))
    assert result.tokens == want_tokens and result.records[0]["tokens"] == want_tokens
    # --max-length truncates as the tokenizer does (special tokens kept) and counts what is measured
    short = analyze(adapter, space="activation", model=model_dir, data=data_file, max_length=6)
    assert short.tokens == sum(min(len(tok(t)["input_ids"]), 6) for t in _texts(TEXTS))
    assert_matches_reference(short.records, peft_branch_outputs(peft_model, _batches(tok, _texts(TEXTS), 6)))


def test_a_model_class_that_does_not_fit_is_diagnosed_with_a_hint(bert_encoder, data_file, tmp_path) -> None:
    model_dir, adapter, _, _ = bert_encoder
    with pytest.raises(CheckpointError) as info:
        analyze(adapter, space="activation", model=model_dir, data=data_file, model_class="causal-lm")
    message = str(info.value)
    assert "adapter keys start with encoder.layer, the model's with bert.encoder.layer" in message
    assert "try --model-class encoder" in message and "(loaded as causal-lm: --model-class)" in message
    # the other way round: an adapter trained with a head, measured on the bare encoder
    head = transformers.BertForSequenceClassification(_bert_config(num_labels=3))
    seq = peft.get_peft_model(head, peft.LoraConfig(task_type="SEQ_CLS", r=2, target_modules=["query"]))
    seq.save_pretrained(tmp_path / "seq")
    with pytest.raises(CheckpointError, match=r"adapter keys start with bert\.encoder, the model's with encoder\.layer: "
                                              r".*try --model-class sequence-classification"):
        analyze(tmp_path / "seq", space="activation", model=model_dir, data=data_file, model_class="encoder")
    with pytest.raises(UsageError, match="--max-length 25 exceeds the model's maximum of 24 tokens"):
        analyze(adapter, space="activation", model=model_dir, data=data_file, max_length=25)


def test_sequence_classification_adapter_loads_its_head_and_labels(tmp_path: Path, data_file) -> None:
    model_dir = tmp_path / "bert"
    tok = _tokenizer(model_dir)
    transformers.BertModel(_bert_config()).save_pretrained(model_dir)  # a bare encoder: BertModel, 2 labels
    head = transformers.AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=3)
    model = peft.get_peft_model(head, peft.LoraConfig(task_type="SEQ_CLS", r=3, target_modules=["query", "value"]))
    _train_briefly(model, next(_batches(tok, _texts(TEXTS), 24, batch_size=4)))
    model.save_pretrained(tmp_path / "adapter")
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["modules_to_save"]
    result = analyze(tmp_path / "adapter", space="activation", model=model_dir, data=data_file)
    assert_matches_reference(result.records, peft_branch_outputs(model, _batches(tok, _texts(TEXTS), 24)))
    assert all(r["module"].startswith("bert.encoder.layer.") for r in result.records)


def test_load_adapter_copies_modules_to_save_and_unload_restores_them(tmp_path: Path) -> None:
    from nora_core.checkpoint import load_adapter
    from nora_core.inject import unload

    head = transformers.BertForSequenceClassification(_bert_config(num_labels=3))
    model = peft.get_peft_model(head, peft.LoraConfig(task_type="SEQ_CLS", r=2, target_modules=["query"]))
    with torch.no_grad():
        model.base_model.model.classifier.modules_to_save["default"].weight.normal_()
    model.save_pretrained(tmp_path / "adapter")
    trained = model.base_model.model.classifier.modules_to_save["default"].weight.detach().clone()
    plain = transformers.BertForSequenceClassification(_bert_config(num_labels=3))
    original = plain.classifier.weight.detach().clone()
    with pytest.raises(ValueError, match="modules_to_save"):
        load_adapter(plain, tmp_path / "adapter")  # training never accepts them
    load_adapter(plain, tmp_path / "adapter", modules_to_save=True)
    assert torch.equal(plain.classifier.weight, trained)
    unload(plain)
    assert torch.equal(plain.classifier.weight, original)
    wrong = transformers.BertForSequenceClassification(_bert_config(num_labels=2))
    with pytest.raises(ValueError, match=r"modules_to_save do not fit the model: classifier\.(weight|bias) has shape \(3"):
        load_adapter(wrong, tmp_path / "adapter", modules_to_save=True)
    assert not any("lora" in n for n, _ in wrong.named_modules())  # nothing left behind


def test_encoder_decoder_reads_and_is_teacher_forced_on_the_sequence(tmp_path: Path, data_file) -> None:
    tok = _tokenizer(tmp_path / "tokenizer")  # not beside the model: --tokenizer DIR
    config = transformers.T5Config(vocab_size=len(VOCAB), d_model=16, d_kv=8, d_ff=24, num_layers=2, num_heads=2,
                                   decoder_start_token_id=0, pad_token_id=0, n_positions=24)
    transformers.T5ForConditionalGeneration(config).save_pretrained(tmp_path / "t5")
    base = transformers.AutoModelForSeq2SeqLM.from_pretrained(tmp_path / "t5")
    model = peft.get_peft_model(base, peft.LoraConfig(task_type="SEQ_2_SEQ_LM", r=3, target_modules=["q", "v"]))

    def decoder_inputs(batch):  # T5's own shift: start token, then the sequence shifted right
        return {"decoder_input_ids": base._shift_right(batch["input_ids"]), "decoder_attention_mask": batch["attention_mask"]}

    _train_briefly(model, next(_batches(tok, _texts(TEXTS), 24, batch_size=4, extra=decoder_inputs)))
    model.save_pretrained(tmp_path / "adapter")
    with pytest.raises(UsageError, match="no tokenizer; pass --tokenizer DIR"):
        analyze(tmp_path / "adapter", space="activation", model=tmp_path / "t5", data=data_file)
    result = analyze(tmp_path / "adapter", space="activation", model=tmp_path / "t5", data=data_file,
                     tokenizer=tmp_path / "tokenizer")
    # encoder self-attention, decoder self- and cross-attention: all on the same positions
    assert {r["module"].split(".")[0] for r in result.records} == {"encoder", "decoder"}
    assert any("EncDecAttention" in r["module"] for r in result.records)
    assert_matches_reference(result.records,
                             peft_branch_outputs(model, _batches(tok, _texts(TEXTS), 24, extra=decoder_inputs)))


def test_causal_lm_is_measured_without_a_shift(tmp_path: Path, data_file) -> None:
    tok = _tokenizer(tmp_path / "gpt2")
    config = transformers.GPT2Config(vocab_size=len(VOCAB), n_positions=24, n_embd=16, n_layer=2, n_head=2)
    transformers.GPT2LMHeadModel(config).save_pretrained(tmp_path / "gpt2")
    base = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "gpt2")
    model = peft.get_peft_model(base, peft.LoraConfig(task_type="CAUSAL_LM", r=3, target_modules=["c_attn"],
                                                      fan_in_fan_out=True))
    _train_briefly(model, next(_batches(tok, _texts(TEXTS), 24, batch_size=4)))
    model.save_pretrained(tmp_path / "adapter")
    loaded = load_model(tmp_path / "gpt2")
    assert (loaded.model_class, loaded.max_length) == ("causal-lm", 24)
    assert model_max_length(loaded.model, None) == 24
    result = analyze(tmp_path / "adapter", space="activation", model=tmp_path / "gpt2", data=data_file, batch_size=3)
    assert_matches_reference(result.records, peft_branch_outputs(model, _batches(tok, _texts(TEXTS), 24)))


def test_builtin_gpt_measures_bos_text_eos(tmp_path: Path, data_file) -> None:
    from nora_core.checkpoint import save_adapter
    from nora_core.config import AdapterConfig
    from nora_core.inject import inject_adapters
    from nora_core.models.gpt import GPT, GPTConfig

    gpt = GPT(GPTConfig(vocab_size=259, block_size=64, n_layer=1, n_head=2, n_embd=16))
    gpt.save_pretrained(tmp_path / "gpt")
    inject_adapters(gpt, AdapterConfig(r=2, target_modules=["q_proj"]))
    save_adapter(gpt, tmp_path / "adapter")
    result = analyze(tmp_path / "adapter", space="activation", model=tmp_path / "gpt", data=data_file)
    assert result.tokens == sum(len(t.encode()) + 2 for t in _texts(TEXTS))  # BOS + bytes + EOS, all measured
    short = analyze(tmp_path / "adapter", space="activation", model=tmp_path / "gpt", data=data_file, max_length=8)
    assert short.tokens == sum(min(len(t.encode()) + 2, 8) for t in _texts(TEXTS))


@pytest.mark.parametrize("key", ["base_model.model.classifier.weight", "base_model.model.score.weight",
                                 "base_model.model.classifier.modules_to_save.default.weight",
                                 "base_model.model.classifier.out_proj.weight"])
def test_the_head_size_is_read_from_the_adapter_header(tmp_path: Path, key: str) -> None:
    from safetensors.torch import save_file

    from nora_spectra.spaces.activation import _saved_head_labels

    save_file({key: torch.zeros(5, 16), "base_model.model.x.lora_A.weight": torch.zeros(2, 16)},
              str(tmp_path / "adapter_model.safetensors"))
    assert _saved_head_labels(tmp_path) == 5
    save_file({"base_model.model.x.lora_A.weight": torch.zeros(2, 16)}, str(tmp_path / "adapter_model.safetensors"))
    assert _saved_head_labels(tmp_path) is None
