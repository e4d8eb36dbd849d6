"""Load the base model that activation-space spectra run: a nora_core small GPT or a local transformers model.

MODEL may be

* a directory written by ``nora_core.models.gpt.GPT.save_pretrained`` (``config.json`` with the
  ``GPTConfig`` fields and ``model.safetensors``), tokenised with the byte-level ``ByteTokenizer``;
* a local transformers model directory (``config.json`` with ``model_type``), loaded with
  ``AutoModelForCausalLM`` and ``AutoTokenizer`` and ``local_files_only=True``: transformers is an
  optional dependency and nothing is ever downloaded.

Anything else is a :class:`~nora_spectra.errors.CheckpointError` naming the path and the problem.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from nora_core.parsing import ParseError, read_json
from nora_spectra.errors import CheckpointError, UsageError

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from torch import nn

__all__ = ["DEFAULT_MAX_LENGTH", "LoadedModel", "as_loaded_model", "load_model"]

#: longest tokenised sequence when the model states no limit (the paper's max length).
DEFAULT_MAX_LENGTH = 512

#: ``GPTConfig`` fields whose presence marks a nora_core small-GPT ``config.json``.
_GPT_KEYS = frozenset({"vocab_size", "block_size", "n_layer", "n_head", "n_embd"})


@dataclasses.dataclass(frozen=True)
class LoadedModel:
    """A base model ready to run over token ids.

    Attributes:
        model: the ``nn.Module``.
        tokenizer: object with ``encode(text)`` (``ByteTokenizer`` for the small GPT), or None when the
            directory has no tokenizer files (then pass token ids or a tokenizer explicitly).
        source: the directory it came from, or the class name of an in-memory model.
        kind: ``"nora-gpt"``, ``"transformers"`` or ``"module"`` (any other ``nn.Module``, called as
            ``model(input_ids)``).
        max_length: longest token sequence to feed it.
    """

    model: "nn.Module"
    tokenizer: Any
    source: str
    kind: str
    max_length: int

    def forward(self, input_ids: "torch.Tensor", mask: "torch.Tensor") -> Any:
        """Run the model once.

        Args:
            input_ids: ``(B, T)`` long.
            mask: ``(B, T)`` bool, True at real (non-padding) tokens; passed as ``attention_mask``
                to transformers models (the small GPT is causal and right-padded, so padding never
                reaches a real token).

        Returns:
            Whatever the model returns (ignored by the callers, which read hooks).
        """
        device = _device(self.model)
        ids = input_ids.to(device)
        if self.kind == "transformers":
            return self.model(input_ids=ids, attention_mask=mask.to(device).long())
        return self.model(ids)


def _device(model: "nn.Module") -> "torch.device":
    import torch

    for param in model.parameters():
        return param.device
    return torch.device("cpu")


def _is_transformers_model(model: Any) -> bool:
    modeling = sys.modules.get("transformers.modeling_utils")
    base = getattr(modeling, "PreTrainedModel", None)
    return base is not None and isinstance(model, base)


def as_loaded_model(model: Any) -> LoadedModel:
    """Turn a path, an ``nn.Module`` or a :class:`LoadedModel` into a :class:`LoadedModel`.

    Raises:
        CheckpointError: a path that is not a loadable model directory.
        UsageError: an object that is none of these.
    """
    if isinstance(model, LoadedModel):
        return model
    if isinstance(model, (str, os.PathLike)):
        return load_model(model)
    from torch import nn

    if not isinstance(model, nn.Module):
        raise UsageError(f"model must be a directory or an nn.Module, got {type(model).__name__}")
    from nora_core.data import ByteTokenizer
    from nora_core.models.gpt import GPT

    if isinstance(model, GPT):
        return LoadedModel(model, ByteTokenizer(), type(model).__name__, "nora-gpt", int(model.config.block_size))
    if _is_transformers_model(model):
        limit = getattr(model.config, "max_position_embeddings", None) or DEFAULT_MAX_LENGTH
        return LoadedModel(model, None, type(model).__name__, "transformers", min(int(limit), DEFAULT_MAX_LENGTH))
    return LoadedModel(model, ByteTokenizer(), type(model).__name__, "module", DEFAULT_MAX_LENGTH)


def load_model(path: "str | os.PathLike[str]", *, dtype: "torch.dtype | None" = None) -> LoadedModel:
    """Load a base model directory (never downloads).

    Args:
        path: a nora_core small-GPT directory or a local transformers model directory.
        dtype: cast the model to this dtype (default: as stored; the small GPT is float32).

    Returns:
        The :class:`LoadedModel`, in eval mode.

    Raises:
        CheckpointError: the path is missing, not a directory, has no readable ``config.json``, is of an
            unknown kind, or needs transformers when it is not installed.
    """
    src = Path(path)
    if not src.exists():
        raise CheckpointError(src, "model directory not found")
    if not src.is_dir():
        raise CheckpointError(src, "MODEL must be a directory (a nora_core GPT or a local transformers model)")
    config_file = src / "config.json"
    if not config_file.is_file():
        if (src / "adapter_config.json").is_file():
            raise CheckpointError(src, "this is an adapter checkpoint, not a base model (no config.json)")
        raise CheckpointError(src, "no config.json: not a nora_core GPT or transformers model directory")
    try:
        config = read_json(config_file)
    except OSError as exc:
        raise CheckpointError(config_file, f"unreadable model config ({exc.strerror or exc})") from None
    except ParseError as exc:
        raise CheckpointError(config_file, f"unreadable model config: {exc.problem}") from None
    if not isinstance(config, dict):
        raise CheckpointError(config_file, "model config is not a JSON object")
    if "model_type" in config:
        loaded = _load_transformers(src)
    elif _GPT_KEYS <= set(config):
        loaded = _load_gpt(src)
    else:
        raise CheckpointError(
            config_file, "unknown model config: neither a nora_core GPT (n_embd, n_layer, ...) nor transformers (model_type)"
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


def _load_transformers(src: Path) -> LoadedModel:
    try:
        import transformers
    except ImportError:
        raise CheckpointError(
            src, "a transformers model directory needs the optional 'transformers' package (pip install transformers)"
        ) from None
    try:
        model = transformers.AutoModelForCausalLM.from_pretrained(src, local_files_only=True)
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise CheckpointError(src, f"cannot load the transformers model locally ({exc})") from None
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(src, local_files_only=True)
    except (OSError, ValueError, KeyError, TypeError):
        tokenizer = None
    limit = getattr(model.config, "max_position_embeddings", None) or getattr(model.config, "n_positions", None)
    max_length = min(int(limit), DEFAULT_MAX_LENGTH) if limit else DEFAULT_MAX_LENGTH
    return LoadedModel(model, tokenizer, os.fspath(src), "transformers", max_length)
