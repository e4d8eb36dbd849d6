"""JSONL readers, tokenisation and masking, the arithmetic task and the stdlib corpus."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from nora_core.arithmetic import ArithmeticTask, arithmetic_splits, generate_arithmetic
from nora_core.corpus import stdlib_docstrings
from nora_core.data import (
    IGNORE_INDEX,
    ByteTokenizer,
    DataFormatError,
    Sample,
    TokenDataset,
    load_dataset,
    parse_record,
    read_jsonl,
    write_jsonl,
)


def _write(path: Path, lines: list) -> Path:
    path.write_text("".join((l if isinstance(l, str) else json.dumps(l)) + "\n" for l in lines), encoding="utf-8")
    return path


def test_each_record_format_is_rendered_as_the_paper_does(tmp_path: Path) -> None:
    rows = [
        {"text": "plain text"},
        {"question": "2+2?", "answer": "4"},
        {"instruction": "Compute 3 * 5.", "output": "15"},
        {"conversations": [
            {"from": "system", "value": "be brief"},
            {"from": "human", "value": "Hi"},
            {"from": "gpt", "value": "Hello!"},
            {"from": "human", "value": "again"},
            {"from": "gpt", "value": "ignored"},
        ]},
    ]
    result = read_jsonl(_write(tmp_path / "mixed.jsonl", rows[:2] + [""] + rows[2:]))
    assert result.skipped == 0
    assert result.samples == [
        Sample("", "plain text"),
        Sample("Question: 2+2?\nAnswer: ", "4"),
        Sample("Question: Compute 3 * 5.\nAnswer: ", "15"),
        Sample("User: Hi\nAssistant: ", "Hello!"),
    ]
    # an explicit format reads the same fields
    assert parse_record(rows[2], "mathinstruct") == result.samples[2]
    assert parse_record({"text": "x", "question": "q", "answer": "a"}, "text") == Sample("", "x")


@pytest.mark.parametrize(
    "bad, problem",
    [
        ("{not json", "invalid JSON"),
        ("[1, 2]", "expected a JSON object"),
        ({"question": "q"}, "unknown record format"),
        ({"question": "q", "answer": 3}, 'field "answer" is not a string'),
        ({"conversations": [{"from": "gpt", "value": "no human first"}]}, "no \"human\" turn"),
        ({"conversations": "nope"}, "must be a list"),
        ({"conversations": [{"value": "x"}]}, "conversations\\[0\\]"),
    ],
)
def test_malformed_lines_are_reported_with_file_and_line(tmp_path: Path, bad, problem: str) -> None:
    path = _write(tmp_path / "data.jsonl", [{"text": "ok"}, "", bad, {"text": "ok too"}])
    with pytest.raises(DataFormatError, match=rf"data\.jsonl:3: .*{problem}"):
        read_jsonl(path)
    skipped = read_jsonl(path, skip_malformed=True)
    assert skipped.skipped == 1 and [s.response for s in skipped.samples] == ["ok", "ok too"]


def test_files_without_records_or_with_bad_bytes_are_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        read_jsonl(tmp_path / "missing.jsonl")
    with pytest.raises(DataFormatError, match="no valid records"):
        read_jsonl(_write(tmp_path / "bad.jsonl", ["{", "{"]), skip_malformed=True)
    (tmp_path / "latin.jsonl").write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(DataFormatError, match=r"latin\.jsonl:2: not valid UTF-8"):
        read_jsonl(tmp_path / "latin.jsonl")
    with pytest.raises(ValueError, match="unknown data format"):
        read_jsonl(tmp_path / "bad.jsonl", format="csv")


def test_byte_tokenizer_round_trips_and_marks_sequences() -> None:
    tok = ByteTokenizer()
    assert tok.encode("héllo") == list("héllo".encode())
    assert tok.decode(tok.encode("héllo") + [tok.eos_id]) == "héllo"
    ds = TokenDataset.from_samples([Sample("Q ", "A")], max_length=16)
    assert ds.input_ids.tolist() == [[tok.bos_id, ord("Q"), ord(" "), ord("A")]]
    assert ds.labels.tolist() == [[ord("Q"), ord(" "), ord("A"), tok.eos_id]]


def test_padding_and_prompt_are_masked_and_batches_are_trimmed() -> None:
    samples = [Sample("Question: 1+1\nAnswer: ", "2"), Sample("", "a longer plain text sample")]
    full = TokenDataset.from_samples(samples, max_length=64)
    resp = TokenDataset.from_samples(samples, max_length=64, response_only=True)
    tok = ByteTokenizer()
    n0, n1 = len("Question: 1+1\nAnswer: 2") + 1, len("a longer plain text sample") + 1  # + BOS
    assert full.lengths.tolist() == [n0, n1] and full.seq_len == max(n0, n1)
    # padding: inputs hold PAD, labels are ignored
    assert (full.input_ids[0, n0:] == tok.pad_id).all() and (full.labels[0, n0:] == IGNORE_INDEX).all()
    assert full.label_counts.tolist() == [n0, n1]
    # response only: just "2" and EOS are learned in the QA row; plain text rows have no prompt
    assert resp.labels[0, : n0 - 2].eq(IGNORE_INDEX).all()
    assert resp.labels[0, n0 - 2 : n0].tolist() == [ord("2"), tok.eos_id]
    assert torch.equal(resp.labels[1], full.labels[1])
    x, y = full.batch(torch.tensor([0]))
    assert x.shape == y.shape == (1, n0)
    # truncation keeps the first max_length inputs
    short = TokenDataset.from_samples(samples, max_length=8)
    assert short.seq_len == 8 and short.input_ids[1].tolist() == [tok.bos_id] + list(b"a longe")


def test_samples_whose_prompt_fills_max_length_are_dropped_and_counted(caplog) -> None:
    # BOS + prompt is P tokens; with max_length L the response keeps a token only while P <= L
    L = 8
    samples = [
        Sample("x" * (L - 1), "yz"),  # P = L: exactly one label left (the first response byte)
        Sample("x" * L, "yz"),  # P = L + 1: every response token truncated away
        Sample("Q ", "A"),
        Sample("Question: a very long question\nAnswer: ", "4"),
    ]
    with caplog.at_level("WARNING", logger="nora_core.data"):
        ds = TokenDataset.from_samples(samples, max_length=L, response_only=True)
    assert len(ds) == 2 and ds.dropped == 2
    assert (ds.label_counts > 0).all()
    assert ds.labels[0].tolist() == [IGNORE_INDEX] * (L - 1) + [ord("y")]
    assert ds.labels[1, :4].tolist() == [IGNORE_INDEX, IGNORE_INDEX, ord("A"), ByteTokenizer.eos_id]
    assert "dropped 2 of 4 sample(s)" in caplog.text and "max_length=8" in caplog.text and "2 kept" in caplog.text
    # the full sequence keeps every sample: the prompt itself is learned
    full = TokenDataset.from_samples(samples, max_length=L)
    assert len(full) == 4 and full.dropped == 0


def test_no_sample_with_a_response_token_is_an_error_naming_the_file(tmp_path: Path) -> None:
    path = _write(tmp_path / "long.jsonl", [{"question": "q" * 40, "answer": "a"}] * 3)
    with pytest.raises(ValueError, match=r"long\.jsonl: no sample has a response token within max_length=16; "
                                         r"raise --block-size .*--full-sequence"):
        load_dataset(path, max_length=16, response_only=True)
    assert len(load_dataset(path, max_length=16)) == 3  # --full-sequence trains on the prompt


def test_any_tokenizer_with_encode_is_accepted(tmp_path: Path) -> None:
    class WordTokenizer:  # HuggingFace-like: encode(text, add_special_tokens=...) and *_token_id
        eos_token_id = 1
        pad_token_id = 0

        def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
            assert add_special_tokens is False
            return [2 + len(w) for w in text.split()]

    path = _write(tmp_path / "qa.jsonl", [{"question": "a bb", "answer": "ccc"}])
    ds = load_dataset(path, WordTokenizer(), response_only=True)
    # prompt words "Question:", "a", "bb", "Answer:" (no BOS: the tokenizer has none), response "ccc", EOS
    assert ds.input_ids.tolist() == [[11, 3, 4, 9, 5]]
    assert ds.labels.tolist() == [[IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX, 5, 1]]


def test_token_stream_blocks_shift_by_one() -> None:
    ds = TokenDataset.from_token_stream(list(range(10)), block_size=4)
    assert ds.input_ids.tolist() == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert ds.labels.tolist() == [[1, 2, 3, 4], [5, 6, 7, 8]]
    with pytest.raises(ValueError, match="too short"):
        TokenDataset.from_token_stream([1, 2], block_size=4)


def test_write_jsonl_round_trips(tmp_path: Path) -> None:
    rows = [{"question": "ü?", "answer": "ß"}]
    assert read_jsonl(write_jsonl(tmp_path / "x.jsonl", rows)).samples == [Sample("Question: ü?\nAnswer: ", "ß")]


def test_arithmetic_is_seeded_correct_and_split_disjointly() -> None:
    a = generate_arithmetic(50, seed=7)
    assert a == generate_arithmetic(50, seed=7) and a != generate_arithmetic(50, seed=8)
    for row in a:
        expression = row["instruction"].removeprefix("Compute ").removesuffix(".")
        answer = int(row["output"].rsplit(" ", 1)[-1].rstrip("."))
        assert eval(expression) == answer  # noqa: S307 - generated arithmetic only
        steps = row["output"].count("=")
        assert 2 <= steps <= 3
        for step in row["output"].split(". ")[:steps]:  # every intermediate step is right
            left, right = step.rstrip(".").split(" = ")
            assert eval(left) == int(right)  # noqa: S307
    train_rows, val_rows = arithmetic_splits(40, 10, seed=1)
    assert len(train_rows) == 40 and len(val_rows) == 10
    assert not {r["instruction"] for r in train_rows} & {r["instruction"] for r in val_rows}
    with pytest.raises(ValueError, match="min_steps"):
        ArithmeticTask(min_steps=3, max_steps=2)


def test_stdlib_corpus_is_deterministic_and_bounded() -> None:
    text = stdlib_docstrings(max_bytes=50_000)
    assert text == stdlib_docstrings(max_bytes=50_000)
    assert 40_000 < len(text.encode()) <= 50_000
    assert text.isprintable() is False and "\n\n" in text  # docstrings separated by blank lines


def test_docstring_pairs_split_first_sentence_from_the_rest(tmp_path: Path) -> None:
    from nora_core.corpus import docstring_pairs

    (tmp_path / "mod.py").write_text(
        'def f():\n    """Return the sum of two numbers.\n\n    Both must be integers; floats are rejected with\n'
        '    a TypeError naming the bad argument."""\n\n'
        'def g():\n    """Too short to pair. Tiny rest here that is not long."""\n\n'
        'class C:\n    """A class with a long enough first sentence!   And a description that is long enough to be\n'
        '    kept as the positive side."""\n'
    )
    pairs = docstring_pairs(directory=tmp_path)
    assert sorted(pairs) == [
        ("A class with a long enough first sentence!", "And a description that is long enough to be kept as the positive side."),
        ("Return the sum of two numbers.", "Both must be integers; floats are rejected with a TypeError naming the bad argument."),
    ]
    assert docstring_pairs(directory=tmp_path, seed=0) == pairs and len(docstring_pairs(1, directory=tmp_path)) == 1
    real = docstring_pairs(64)
    assert real == docstring_pairs(64) and len(real) == 64 and len(set(real)) == 64
    assert all(len(a) >= 15 and a[-1] in ".!?" and len(b) >= 40 for a, b in real)
    with pytest.raises(FileNotFoundError):
        docstring_pairs(directory=tmp_path / "empty")


# ------------------------------------------------------------------------ measurement path (TokenSequences)
def _bert_tokenizer(tmp_path: Path):
    """A real transformers BERT tokenizer built offline from a tiny WordPiece vocabulary."""
    transformers = pytest.importorskip("transformers")
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "quick", "brown", "fox", "question", ":", "answer",
             "2", "+", "?", "4", "a", "b", "c"]
    (tmp_path / "vocab.txt").write_text("\n".join(vocab) + "\n")
    return transformers.BertTokenizerFast(str(tmp_path / "vocab.txt"))  # the first argument: vocab (5.x) or vocab_file (4.x)


def test_byte_tokenizer_measurement_is_bos_text_eos_every_position_kept() -> None:
    from nora_core.data import TokenSequences, encode_for_model

    tok = ByteTokenizer()
    assert encode_for_model(tok, "abc", max_length=64) == [tok.bos_id, 97, 98, 99, tok.eos_id]
    # truncation keeps both special tokens, like a transformers tokenizer
    assert encode_for_model(tok, "abcdef", max_length=4) == [tok.bos_id, 97, 98, tok.eos_id]
    assert encode_for_model(tok, "", max_length=8) == [tok.bos_id, tok.eos_id]
    assert encode_for_model(tok, "abc", max_length=1) == [tok.bos_id]
    with pytest.raises(ValueError, match="max_length"):
        encode_for_model(tok, "abc", max_length=0)
    seqs = TokenSequences.from_samples([Sample("Question: q\nAnswer: ", "a"), Sample("", "xy")], max_length=64)
    first = [tok.bos_id] + list(b"Question: q\nAnswer: a") + [tok.eos_id]
    assert seqs.lengths.tolist() == [len(first), 4]
    assert seqs.tokens == len(first) + 4
    assert seqs.input_ids[0].tolist() == first
    assert seqs.input_ids[1].tolist() == [tok.bos_id, 120, 121, tok.eos_id] + [tok.pad_id] * (len(first) - 4)
    # unlike the training dataset, nothing is shifted off: the training inputs lack the final EOS
    train = TokenDataset.from_samples([Sample("Question: q\nAnswer: ", "a")], max_length=64)
    assert train.input_ids[0, : int(train.lengths[0])].tolist() == first[:-1]
    ids, mask = seqs.batch(torch.tensor([1]))
    assert ids.tolist() == [[tok.bos_id, 120, 121, tok.eos_id]] and mask.tolist() == [[True] * 4]
    ids, mask = seqs.batch(torch.tensor([0, 1]))
    assert ids.shape == (2, len(first)) and int(mask.sum()) == seqs.tokens


def test_transformers_tokenizer_measurement_keeps_its_own_special_tokens(tmp_path: Path) -> None:
    from nora_core.data import TokenSequences, encode_for_model

    tok = _bert_tokenizer(tmp_path)
    cls, sep = tok.cls_token_id, tok.sep_token_id
    assert encode_for_model(tok, "the quick brown fox", max_length=64) == [cls, 5, 6, 7, 8, sep]
    assert encode_for_model(tok, "the quick brown fox", max_length=4) == [cls, 5, 6, sep]
    path = _write(tmp_path / "qa.jsonl", [{"question": "2+2?", "answer": "4"}, {"text": "the fox"}])
    from nora_core.data import load_sequences

    seqs = load_sequences(path, tok, max_length=64)
    assert seqs.input_ids[0, : int(seqs.lengths[0])].tolist() == tok("Question: 2+2?\nAnswer: 4")["input_ids"]
    assert seqs.input_ids[1].tolist()[:4] == [cls, 5, 8, sep] and seqs.lengths.tolist()[1] == 4
    assert seqs.pad_id == tok.pad_token_id and set(seqs.input_ids[1, 4:].tolist()) == {tok.pad_token_id}


def test_token_sequences_validate_and_drop_empty_rows(caplog) -> None:
    from nora_core.data import TokenSequences

    class Plain:  # encode only, no special tokens
        def encode(self, text):
            return [ord(c) for c in text]

    seqs = TokenSequences.from_samples([Sample("", ""), Sample("", "ab")], Plain(), max_length=8, source="f.jsonl")
    assert len(seqs) == 1 and seqs.dropped == 1 and seqs.input_ids.tolist() == [[97, 98]]
    assert "f.jsonl: dropped 1 empty sample" in caplog.text
    with pytest.raises(ValueError, match="f.jsonl: no sample has a token"):
        TokenSequences.from_samples([Sample("", "")], Plain(), max_length=8, source="f.jsonl")
    with pytest.raises(ValueError, match="lengths must lie"):
        TokenSequences(torch.zeros(2, 3, dtype=torch.long), torch.tensor([0, 3]))
    with pytest.raises(ValueError, match=r"input_ids must be \(N, T\)"):
        TokenSequences(torch.zeros(3, dtype=torch.long), torch.tensor([1, 1, 1]))
