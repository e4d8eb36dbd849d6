"""Training data: JSONL readers, a byte-level tokenizer, and a padded token dataset.

Supported JSONL record formats (one JSON object per line; blank lines are ignored):

========================  =======================================================  =========================
format                    fields                                                   rendered as
========================  =======================================================  =========================
``text``                  ``{"text": str}``                                        the text itself
``qa``                    ``{"question": str, "answer": str}``                     ``Question: q\\nAnswer: a``
``mathinstruct``          ``{"instruction": str, "output": str}``                  ``Question: q\\nAnswer: a``
``conversations``         ``{"conversations": [{"from": "human"|"gpt"|"system",     ``User: h\\nAssistant: g``
                          "value": str}, ...]}`` (SlimOrca / ShareGPT)             (first human turn and the
                                                                                   first gpt reply after it)
========================  =======================================================  =========================

Each record becomes a :class:`Sample` (``prompt``, ``response``); the prompt is the part before the
answer (``"Question: q\\nAnswer: "``), empty for plain text. Tokenised samples form a
:class:`TokenDataset`: ``input_ids`` and next-token ``labels`` of shape (N, T), right-padded, with
``-100`` wherever the loss must not look (padding, and the prompt when ``response_only=True``).
A sample left with no label token (with ``response_only``, a prompt that fills ``max_length`` truncates
the whole response away) would train on nothing, so it is dropped, counted and logged; if no sample
keeps a label token, :meth:`TokenDataset.from_samples` raises ``ValueError``.

Measuring a model is not training it: a :class:`TokenDataset` is shaped for the next-token loss (its
inputs drop the last token, whose only role is to be predicted, and prompt and response are encoded
without the tokenizer's own special tokens). :class:`TokenSequences` (:func:`load_sequences`) holds
sequences exactly as the model sees them in use: ``prompt + response`` as one text through
:func:`encode_for_model` (the tokenizer's own special tokens: ``[CLS] ... [SEP]`` for BERT, its BOS for a
Llama tokenizer, BOS and EOS for the byte tokenizer), every position kept, truncated to ``max_length``
the way the tokenizer truncates (special tokens kept).
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Protocol, Sequence

import torch

from nora_core.parsing import ParseError, parse_json

__all__ = [
    "IGNORE_INDEX",
    "FORMATS",
    "DataFormatError",
    "Sample",
    "ReadResult",
    "ByteTokenizer",
    "Tokenizer",
    "TokenDataset",
    "TokenSequences",
    "encode_for_model",
    "load_sequences",
    "parse_record",
    "read_jsonl",
    "write_jsonl",
    "load_dataset",
]

logger = logging.getLogger(__name__)

#: label value ignored by the loss (PyTorch's ``cross_entropy`` default)
IGNORE_INDEX = -100
FORMATS = ("auto", "text", "qa", "mathinstruct", "conversations")


class DataFormatError(ValueError):
    """A data file or record is malformed; the message starts with ``file:line``."""


class Tokenizer(Protocol):
    """Anything with ``encode(text) -> list[int]`` (a HuggingFace tokenizer qualifies)."""

    def encode(self, text: str) -> list[int]: ...


@dataclass(frozen=True)
class Sample:
    """One training example before tokenisation.

    Attributes:
        prompt: text the model is conditioned on (masked from the loss with ``response_only``).
        response: text the model learns to produce.
    """

    prompt: str
    response: str


@dataclass
class ReadResult:
    """What :func:`read_jsonl` found.

    Attributes:
        samples: parsed samples, in file order.
        skipped: number of malformed lines skipped (only with ``skip_malformed=True``).
        path: the file read.
    """

    samples: list[Sample]
    skipped: int
    path: str


class ByteTokenizer:
    """Byte-level tokenizer: ids 0-255 are UTF-8 bytes, then BOS, EOS and PAD.

    Attributes:
        vocab_size: 259.
        bos_id, eos_id, pad_id: 256, 257, 258.
    """

    bos_id = 256
    eos_id = 257
    pad_id = 258
    vocab_size = 259

    def encode(self, text: str) -> list[int]:
        """UTF-8 bytes of ``text`` as ids (no special tokens added)."""
        return list(text.encode("utf-8"))

    def decode(self, ids: Iterable[int]) -> str:
        """Inverse of :meth:`encode`; special and out-of-range ids are dropped."""
        return bytes(i for i in ids if 0 <= i < 256).decode("utf-8", errors="replace")


def _require_str(record: dict, key: str) -> str:
    value = record.get(key)
    if not isinstance(value, str):
        kind = "missing" if key not in record else f"not a string ({type(value).__name__})"
        raise ValueError(f'field "{key}" is {kind}')
    return value


def _detect_format(record: dict) -> str:
    if "conversations" in record:
        return "conversations"
    if "instruction" in record and "output" in record:
        return "mathinstruct"
    if "question" in record and "answer" in record:
        return "qa"
    if "text" in record:
        return "text"
    raise ValueError(
        f"unknown record format with keys {sorted(record)}: expected text, question/answer, "
        "instruction/output or conversations"
    )


def parse_record(record: Any, format: str = "auto") -> Sample:
    """Render one JSON record as a :class:`Sample`.

    Args:
        record: the decoded JSON value of one line.
        format: one of :data:`FORMATS`; ``"auto"`` picks by the keys present.

    Returns:
        The sample.

    Raises:
        ValueError: the record does not fit the format (the caller adds ``file:line``).
    """
    if format not in FORMATS:
        raise ValueError(f"unknown data format {format!r}; expected one of {', '.join(FORMATS)}")
    if not isinstance(record, dict):
        raise ValueError(f"expected a JSON object, got {type(record).__name__}")
    fmt = _detect_format(record) if format == "auto" else format
    if fmt == "text":
        return Sample("", _require_str(record, "text"))
    if fmt == "qa":
        return Sample(f"Question: {_require_str(record, 'question')}\nAnswer: ", _require_str(record, "answer"))
    if fmt == "mathinstruct":
        return Sample(
            f"Question: {_require_str(record, 'instruction')}\nAnswer: ", _require_str(record, "output")
        )
    turns = record.get("conversations")
    if not isinstance(turns, list):
        raise ValueError('field "conversations" must be a list of {"from", "value"} objects')
    human = None
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict) or not isinstance(turn.get("from"), str):
            raise ValueError(f'conversations[{i}] must be an object with a string "from"')
        if turn["from"] == "human" and human is None:
            human = _require_str(turn, "value")
        elif turn["from"] == "gpt" and human is not None:
            return Sample(f"User: {human}\nAssistant: ", _require_str(turn, "value"))
    raise ValueError('conversations has no "human" turn followed by a "gpt" turn')


def read_jsonl(
    path: str | os.PathLike[str], *, format: str = "auto", skip_malformed: bool = False
) -> ReadResult:
    """Read a JSONL file of training records.

    Args:
        path: the file.
        format: record format (see the module docstring); ``"auto"`` detects it per line.
        skip_malformed: skip lines that are not valid records (counted in ``ReadResult.skipped`` and
            logged) instead of raising.

    Returns:
        The samples and the number of skipped lines.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        DataFormatError: a line is malformed (``"file:line: problem"``) and ``skip_malformed`` is off,
            or the file holds no valid record at all.
    """
    if format not in FORMATS:
        raise ValueError(f"unknown data format {format!r}; expected one of {', '.join(FORMATS)}")
    src = Path(path)
    if not src.is_file():
        raise FileNotFoundError(f"{src}: no such data file")
    samples: list[Sample] = []
    skipped = 0
    with src.open("rb") as handle:
        for lineno, raw in enumerate(handle, start=1):
            try:
                line = raw.decode("utf-8")
                if not line.strip():
                    continue
                samples.append(parse_record(parse_json(line, src), format))
            except (UnicodeDecodeError, ParseError, ValueError) as exc:
                if isinstance(exc, UnicodeDecodeError):
                    problem = f"not valid UTF-8 ({exc.reason})"
                elif isinstance(exc, ParseError):
                    problem = exc.problem.replace("not valid JSON", "invalid JSON", 1)
                else:
                    problem = str(exc)
                if not skip_malformed:
                    raise DataFormatError(f"{src}:{lineno}: {problem}") from None
                skipped += 1
                logger.debug("%s:%d: skipped: %s", src, lineno, problem)
    if skipped:
        logger.warning("%s: skipped %d malformed line(s)", src, skipped)
    if not samples:
        raise DataFormatError(f"{src}: no valid records")
    return ReadResult(samples, skipped, str(src))


def write_jsonl(path: str | os.PathLike[str], records: Iterable[dict]) -> Path:
    """Write ``records`` as JSONL, atomically. Returns the path."""
    from nora_core.atomic import atomic_write_text

    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    atomic_write_text(path, text)
    return Path(path)


def _encode(tokenizer: Any, text: str) -> list[int]:
    if not text:
        return []
    try:  # HuggingFace tokenizers: no BOS/EOS between prompt and response
        ids = tokenizer.encode(text, add_special_tokens=False)
    except TypeError:
        ids = tokenizer.encode(text)
    return [int(i) for i in ids]


def _special(tokenizer: Any, *names: str) -> int | None:
    for name in names:
        value = getattr(tokenizer, name, None)
        if isinstance(value, int):
            return value
    return None


@dataclass
class TokenDataset:
    """Right-padded token sequences with next-token labels.

    Attributes:
        input_ids: shape (N, T), long; padding positions hold ``pad_id``.
        labels: shape (N, T), long; ``labels[i, t]`` is the target after ``input_ids[i, :t+1]``, or
            ``IGNORE_INDEX`` where the loss must not look.
        lengths: shape (N,), number of real (non-padding) input positions of each row.
        skipped: malformed lines skipped when the data was read.
        dropped: samples :meth:`from_samples` dropped because no label token was left after truncation.
    """

    input_ids: torch.Tensor
    labels: torch.Tensor
    lengths: torch.Tensor
    skipped: int = 0
    dropped: int = 0
    label_counts: torch.Tensor = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if self.input_ids.ndim != 2 or self.input_ids.shape != self.labels.shape:
            raise ValueError(
                f"input_ids and labels must both be (N, T); got {tuple(self.input_ids.shape)} "
                f"and {tuple(self.labels.shape)}"
            )
        if self.lengths.shape != (self.input_ids.shape[0],):
            raise ValueError(f"lengths must be (N,) = ({self.input_ids.shape[0]},), got {tuple(self.lengths.shape)}")
        if len(self) == 0:
            raise ValueError("empty dataset")
        self.input_ids = self.input_ids.long().contiguous()
        self.labels = self.labels.long().contiguous()
        self.lengths = self.lengths.long()
        self.label_counts = (self.labels != IGNORE_INDEX).sum(dim=1)  # (N,)

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def seq_len(self) -> int:
        """T, the padded length."""
        return int(self.input_ids.shape[1])

    def batch(self, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows ``indices``, trimmed to the longest real length among them.

        Args:
            indices: shape (b,), long.

        Returns:
            ``(input_ids, labels)``, each shape (b, L) with L = max(lengths[indices]).
        """
        length = int(self.lengths[indices].max())
        return self.input_ids[indices, :length], self.labels[indices, :length]

    @classmethod
    def from_samples(
        cls,
        samples: Sequence[Sample],
        tokenizer: Any | None = None,
        *,
        max_length: int = 256,
        response_only: bool = False,
        skipped: int = 0,
        source: str | None = None,
    ) -> "TokenDataset":
        """Tokenise samples as ``[BOS] prompt response [EOS]`` (BOS/EOS when the tokenizer has them).

        A sample that has no label token after truncation (with ``response_only``, a prompt of
        ``max_length`` tokens or more leaves no response token to learn; or a sample of fewer than two
        tokens) would contribute nothing to the loss: it is dropped, counted in :attr:`dropped` and
        logged as a warning with ``max_length`` and the number kept.

        Args:
            samples: prompt/response pairs.
            tokenizer: object with ``encode``; default :class:`ByteTokenizer`.
            max_length: longest input length T; longer sequences are truncated on the right.
            response_only: mask prompt tokens out of the loss (train on the answer only).
            skipped: carried into :attr:`skipped`.
            source: where the samples came from (a file name), for the warning and the error.

        Returns:
            The dataset (padded to the longest kept sample, at most ``max_length``).

        Raises:
            ValueError: no sample keeps a label token (``"<source>: no sample has a response token
                within max_length=N; ..."``), or ``max_length < 1``.
        """
        if max_length < 1:
            raise ValueError(f"max_length must be >= 1, got {max_length}")
        tok = tokenizer if tokenizer is not None else ByteTokenizer()
        bos = _special(tok, "bos_id", "bos_token_id")
        eos = _special(tok, "eos_id", "eos_token_id")
        pad = _pad_id(tok)
        rows: list[tuple[list[int], list[int]]] = []
        too_short = masked = 0  # samples dropped: fewer than two tokens / every label masked
        for sample in samples:
            prompt = ([bos] if bos is not None else []) + _encode(tok, sample.prompt)
            ids = prompt + _encode(tok, sample.response) + ([eos] if eos is not None else [])
            ids = ids[: max_length + 1]
            if len(ids) < 2:
                too_short += 1
                continue
            inputs, targets = ids[:-1], ids[1:]
            if response_only:  # target position t predicts token t + 1: masked while it is in the prompt
                first = max(len(prompt) - 1, 0)
                targets = [IGNORE_INDEX] * min(first, len(targets)) + targets[first:]
                if first >= len(targets):  # truncation cut every response token: nothing to learn
                    masked += 1
                    continue
            rows.append((inputs, targets))
        where = f"{source}: " if source else ""
        if not rows:
            if masked:
                raise ValueError(
                    f"{where}no sample has a response token within max_length={max_length}; "
                    "raise --block-size (and --max-length) or use --full-sequence"
                )
            raise ValueError(f"{where}no sample has at least two tokens")
        dropped = too_short + masked
        if dropped:
            logger.warning(
                "%sdropped %d of %d sample(s) with no response token within max_length=%d; %d kept",
                where, dropped, len(samples), max_length, len(rows),
            )
        width = max(len(r[0]) for r in rows)
        input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
        labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
        for i, (inputs, targets) in enumerate(rows):
            input_ids[i, : len(inputs)] = torch.tensor(inputs)
            labels[i, : len(targets)] = torch.tensor(targets)
        lengths = torch.tensor([len(r[0]) for r in rows])
        return cls(input_ids, labels, lengths, skipped=skipped, dropped=dropped)

    @classmethod
    def from_token_stream(cls, ids: Sequence[int] | torch.Tensor, block_size: int) -> "TokenDataset":
        """Cut one long token stream into non-overlapping blocks for language-model pretraining.

        Args:
            ids: the stream, length n.
            block_size: input length T of each block; each block uses T + 1 tokens.

        Returns:
            ``(n - 1) // block_size`` rows, no padding.
        """
        stream = torch.as_tensor(ids, dtype=torch.long).flatten()
        n = (stream.numel() - 1) // block_size
        if n < 1:
            raise ValueError(f"a stream of {stream.numel()} tokens is too short for block_size {block_size}")
        inputs = stream[: n * block_size].view(n, block_size)
        labels = stream[1 : n * block_size + 1].view(n, block_size)
        return cls(inputs.clone(), labels.clone(), torch.full((n,), block_size))


def load_dataset(
    path: str | os.PathLike[str],
    tokenizer: Any | None = None,
    *,
    format: str = "auto",
    max_length: int = 256,
    response_only: bool = False,
    skip_malformed: bool = False,
) -> TokenDataset:
    """Read a JSONL file and tokenise it: :func:`read_jsonl` then :meth:`TokenDataset.from_samples`.

    Samples left without a label token by ``max_length`` are dropped (see ``from_samples``); a
    ``ValueError`` starting with the file name is raised when none is left.
    """
    result = read_jsonl(path, format=format, skip_malformed=skip_malformed)
    return TokenDataset.from_samples(
        result.samples, tokenizer, max_length=max_length, response_only=response_only, skipped=result.skipped,
        source=result.path,
    )


# ---------------------------------------------------------------------------------- measurement path
def _is_transformers_tokenizer(tokenizer: Any) -> bool:
    return callable(tokenizer) and hasattr(tokenizer, "model_input_names")


def encode_for_model(tokenizer: Any, text: str, *, max_length: int) -> list[int]:
    """The token ids a model sees for ``text`` in use, at most ``max_length`` of them.

    * A transformers tokenizer: ``tokenizer(text, add_special_tokens=True, truncation=True,
      max_length=max_length)``: its own special tokens (BERT ``[CLS] text [SEP]``, a Llama tokenizer's
      BOS, none for GPT-2), truncated as it truncates (the special tokens are kept).
    * A tokenizer with integer ``bos_id`` and ``eos_id`` (:class:`ByteTokenizer`): ``BOS text EOS``,
      the text cut to ``max_length - 2`` tokens so that both special tokens stay.
    * Anything else with ``encode(text)``: its ids, cut to ``max_length``.

    Args:
        tokenizer: one of the above.
        text: the text.
        max_length: the longest sequence, >= 1.

    Returns:
        The ids (an empty text gives only the special tokens, possibly nothing).

    Raises:
        ValueError: ``max_length < 1``.
    """
    if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 1:
        raise ValueError(f"max_length must be an integer >= 1, got {max_length!r}")
    if _is_transformers_tokenizer(tokenizer):
        encoded = tokenizer(text, add_special_tokens=True, truncation=True, max_length=max_length)
        return [int(i) for i in encoded["input_ids"]][:max_length]
    bos, eos = _special(tokenizer, "bos_id"), _special(tokenizer, "eos_id")
    if bos is not None and eos is not None:
        body = [int(i) for i in tokenizer.encode(text)] if text else []
        return ([bos] + body[: max(max_length - 2, 0)] + [eos])[:max_length]
    return [int(i) for i in tokenizer.encode(text)][:max_length] if text else []


def _pad_id(tokenizer: Any) -> int:
    pad = _special(tokenizer, "pad_id", "pad_token_id")
    if pad is None:
        pad = _special(tokenizer, "eos_id", "eos_token_id")
    return 0 if pad is None else pad


@dataclass
class TokenSequences:
    """Token sequences as a model sees them in use: what activation spectra are measured on.

    Unlike :class:`TokenDataset` there are no labels and no next-token shift: every real position of
    every row is an input the model is run on and measured at.

    Attributes:
        input_ids: shape (N, T), long, right-padded with ``pad_id``.
        lengths: shape (N,), long, the real (non-padding) positions of each row, each >= 1.
        pad_id: the padding id (the tokenizer's pad, else its EOS, else 0); masked out, never measured.
        dropped: rows left out because they had no token at all.
    """

    input_ids: torch.Tensor
    lengths: torch.Tensor
    pad_id: int = 0
    dropped: int = 0

    def __post_init__(self) -> None:
        if self.input_ids.ndim != 2:
            raise ValueError(f"input_ids must be (N, T), got shape {tuple(self.input_ids.shape)}")
        if self.lengths.shape != (self.input_ids.shape[0],):
            raise ValueError(f"lengths must be (N,) = ({self.input_ids.shape[0]},), got {tuple(self.lengths.shape)}")
        if len(self) == 0:
            raise ValueError("no sequences")
        self.input_ids = self.input_ids.long().contiguous()
        self.lengths = self.lengths.long()
        if int(self.lengths.min()) < 1 or int(self.lengths.max()) > self.input_ids.shape[1]:
            raise ValueError(f"lengths must lie in [1, {self.input_ids.shape[1]}]")

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def tokens(self) -> int:
        """Real positions in all rows together."""
        return int(self.lengths.sum())

    def mask(self, indices: torch.Tensor, width: int) -> torch.Tensor:
        """``(b, width)`` bool, True at the real positions of rows ``indices``."""
        return torch.arange(width)[None, :] < self.lengths[indices][:, None]

    def batch(self, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows ``indices``, trimmed to the longest among them.

        Args:
            indices: shape (b,), long.

        Returns:
            ``(input_ids, mask)``, each (b, L) with L = max(lengths[indices]); ``mask`` is True at real
            positions.
        """
        length = int(self.lengths[indices].max())
        return self.input_ids[indices, :length], self.mask(indices, length)

    @classmethod
    def from_ids(cls, rows: Sequence[Sequence[int]], *, pad_id: int = 0, dropped: int = 0) -> "TokenSequences":
        """Right-pad ``rows`` of ids (empty rows are dropped and counted)."""
        kept = [list(row) for row in rows if len(row)]
        dropped += len(rows) - len(kept)
        if not kept:
            raise ValueError("no sequence has a token")
        width = max(len(row) for row in kept)
        input_ids = torch.full((len(kept), width), pad_id, dtype=torch.long)
        for i, row in enumerate(kept):
            input_ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        lengths = torch.tensor([len(row) for row in kept], dtype=torch.long)
        return cls(input_ids, lengths, pad_id=pad_id, dropped=dropped)

    @classmethod
    def from_samples(
        cls, samples: Sequence[Sample], tokenizer: Any | None = None, *, max_length: int, source: str | None = None
    ) -> "TokenSequences":
        """Encode each sample's ``prompt + response`` with :func:`encode_for_model`.

        Args:
            samples: the samples (a prompt and its response are one text, as the model reads them).
            tokenizer: see :func:`encode_for_model`; default :class:`ByteTokenizer`.
            max_length: the longest sequence (the model's maximum, usually).
            source: where the samples came from, for the messages.

        Raises:
            ValueError: ``max_length < 1``, or no sample has a token.
        """
        tok = tokenizer if tokenizer is not None else ByteTokenizer()
        rows = [encode_for_model(tok, s.prompt + s.response, max_length=max_length) for s in samples]
        try:
            out = cls.from_ids(rows, pad_id=_pad_id(tok))
        except ValueError:
            raise ValueError(f"{source + ': ' if source else ''}no sample has a token") from None
        if out.dropped:
            logger.warning("%sdropped %d empty sample(s)", f"{source}: " if source else "", out.dropped)
        return out


def load_sequences(
    path: str | os.PathLike[str],
    tokenizer: Any | None = None,
    *,
    max_length: int,
    format: str = "auto",
    skip_malformed: bool = False,
) -> TokenSequences:
    """Read a JSONL file and encode it for measurement: :func:`read_jsonl` then
    :meth:`TokenSequences.from_samples` (every record format of this module).

    Raises:
        FileNotFoundError: ``path`` does not exist.
        DataFormatError: a malformed line (``file:line: problem``) or no record.
        ValueError: starting with the file name, when no sample has a token.
    """
    result = read_jsonl(path, format=format, skip_malformed=skip_malformed)
    return TokenSequences.from_samples(result.samples, tokenizer, max_length=max_length, source=result.path)
