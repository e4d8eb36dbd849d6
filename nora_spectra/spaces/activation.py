"""Activation-space spectra: the SVD of an adapter branch's centred outputs over real inputs.

A NoRA branch ``dY = s B act(A x)`` is non-linear and has no single update matrix, so the NoRA paper
measures its spectrum in *activation space*: run the adapted model in eval mode over ``samples``
training examples, capture every branch's output ``dY`` (tokens x d_out), centre each column (subtract
its mean over tokens) and take the singular values. This module does that without ever forming ``dY``:

* With ``H`` (tokens x r) the branch hidden (LoRA ``A x``, NoRA ``act(A x)``; dropout is off in eval
  mode), ``dY = s H B^T`` and the centred ``dY_c = s H_c B^T`` with ``H_c = H - 1 mean(H)``.
* ``H_c`` is reduced on the fly to its ``r x r`` triangular factor ``R`` (``H_c = Q R``, Householder QR
  per batch, batches merged with the exact pooled-scatter update, so memory is ``O(r^2)`` per layer
  whatever the number of tokens, and the condition number is never squared):
  :class:`nora_spectra.spaces.centred.CentredFactor`.
* Then ``sigma(dY_c) = sigma(s B H_c^T) = sigma(s B R^T)``, computed by THE spectrum function
  :func:`nora_spectra.spectrum.adapter_singular_values` ``(R^T, B, s)``; metrics by
  :func:`nora_spectra.metrics.spectrum_metrics`.

Records have the weight-space fields (:data:`nora_spectra.schema.LAYER_COLUMNS`) plus ``"space":
"activation"`` and ``"tokens"``; ``shape`` is ``[d_out, tokens]``, the shape of ``dY_c^T``. Singular
values are those of the centred ``dY`` as is (they grow like ``sqrt(tokens)``); every rank metric is
scale-invariant. See ``docs/activation.md``.

torch is imported only when a model is run.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator, Mapping, Sequence, Union

import numpy as np

from nora_spectra.errors import CheckpointError, UsageError
from nora_spectra.schema import ACTIVATION_COLUMNS
from nora_spectra.spaces import LayerSpectrum, Report, SourceInfo, source_info
from nora_spectra.spaces.centred import CentredFactor, centred_spectrum
from nora_spectra.spaces.selection import select_layers
from nora_spectra.spectrum import NonFiniteFactorsError

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from torch import nn

    from nora_spectra.model_loading import LoadedModel

__all__ = ["OPTIONS", "ActivationRun", "prepare"]

log = logging.getLogger(__name__)

#: keyword options of this space.
OPTIONS = ("model", "data", "samples", "layers", "batch_size", "tokenizer", "max_length", "model_class")

DataArg = Union[str, "os.PathLike[str]", Any]


# --------------------------------------------------------------------------- running the model
def _token_batches(sequences: Any, samples: int, batch_size: int) -> Iterable[tuple["torch.Tensor", "torch.Tensor"]]:
    """``(input_ids (b, L), mask (b, L) bool)`` for the first ``samples`` rows, real tokens masked in."""
    import torch

    n = min(samples, len(sequences))
    for start in range(0, n, batch_size):
        yield sequences.batch(torch.arange(start, min(start + batch_size, n)))


def _as_sequences(data: DataArg, loaded: "LoadedModel") -> tuple[Any, str]:
    """``TokenSequences`` from a JSONL path, a ``TokenSequences``/``TokenDataset`` or an (N, T) id tensor,
    and a description of the data.

    A path is encoded for measurement (:func:`nora_core.data.load_sequences`: the tokenizer's own special
    tokens, no next-token shift, at most ``loaded.max_length`` tokens). An in-memory ``TokenDataset`` is
    measured as it is (its ``input_ids`` up to each row's length); an id tensor has no padding.
    """
    import torch

    from nora_core.data import DataFormatError, TokenDataset, TokenSequences, load_sequences

    if isinstance(data, TokenSequences):
        return data, f"<TokenSequences of {len(data)}>"
    if isinstance(data, TokenDataset):
        return TokenSequences(data.input_ids, data.lengths), f"<TokenDataset of {len(data)}>"
    if isinstance(data, (str, os.PathLike)):
        if loaded.tokenizer is None:
            raise UsageError(
                f"{loaded.source}: the model directory has no tokenizer; pass --tokenizer DIR (or token ids as data)"
            )
        try:
            sequences = load_sequences(data, loaded.tokenizer, max_length=loaded.max_length)
        except FileNotFoundError:
            raise UsageError(f"{os.fspath(data)}: data file not found") from None
        except (DataFormatError, ValueError) as exc:
            message = str(exc)
            if not message.startswith(os.fspath(data)):
                message = f"{os.fspath(data)}: {message}"
            raise UsageError(message) from None
        return sequences, os.fspath(data)
    if isinstance(data, (torch.Tensor, np.ndarray)):
        ids = torch.as_tensor(data, dtype=torch.long)
        if ids.ndim != 2 or ids.shape[0] == 0 or ids.shape[1] == 0:
            raise UsageError(f"data ids must be a non-empty (N, T) array, got shape {tuple(ids.shape)}")
        lengths = torch.full((ids.shape[0],), ids.shape[1])
        return TokenSequences(ids, lengths), f"<ids {tuple(ids.shape)}>"
    raise UsageError(
        "data must be a JSONL path, TokenSequences, a TokenDataset or an (N, T) id tensor, "
        f"got {type(data).__name__}"
    )


def _capture(
    loaded: "LoadedModel",
    layers: Mapping[str, Any],
    batches: Iterable[tuple["torch.Tensor", "torch.Tensor"]],
    progress: Callable[[int], None] | None = None,
) -> dict[str, CentredFactor]:
    """Run the model over ``batches`` in eval mode and stream each selected branch's hidden into a factor."""
    import torch

    factors = {name: CentredFactor(layer.r) for name, layer in layers.items()}
    state: dict[str, Any] = {"mask": None, "warned": False}

    def make_hook(name: str) -> Callable[..., None]:
        def hook(module: Any, args: tuple, kwargs: dict) -> None:
            x = args[0] if args else kwargs.get("x", kwargs.get("input"))
            with torch.no_grad():
                h = module.adapter_hidden(x)  # (..., r)
            mask = state["mask"]
            if mask is not None and tuple(h.shape[:-1]) == tuple(mask.shape):
                h = h[mask.to(h.device)]  # (real tokens, r)
            elif mask is not None and not state["warned"]:
                state["warned"] = True
                log.warning("adapter input of shape %s does not match the token mask; using every row", tuple(h.shape))
            factors[name].update(h.detach().reshape(-1, h.shape[-1]).to("cpu", torch.float64).numpy())

        return hook

    model = loaded.model
    was_training = {m: m.training for m in model.modules()}
    handles = [layer.register_forward_pre_hook(make_hook(name), with_kwargs=True) for name, layer in layers.items()]
    try:
        model.eval()
        with torch.no_grad():
            for ids, mask in batches:
                state["mask"] = mask
                loaded.forward(ids, mask)
                if progress is not None:
                    progress(int(ids.shape[0]))
    finally:
        for handle in handles:
            handle.remove()
        for module, training in was_training.items():
            module.training = training
    return factors


def _load_adapter_into(module: "nn.Module", path: "str | os.PathLike[str]") -> bool:
    """Inject the adapter at ``path`` into the plain ``module``; True when injected (to unload later)."""
    from nora_core.checkpoint import load_adapter
    from nora_core.inject import adapter_layers

    if any(True for _ in adapter_layers(module)):
        raise UsageError("the base model already holds adapters; pass a plain model with a checkpoint path")
    try:  # modules_to_save (a SEQ_CLS head, a trained embedding) are loaded too, and restored by unload
        load_adapter(module, path, modules_to_save=True)
    except FileNotFoundError as exc:
        raise CheckpointError(path, str(exc)) from None
    except ValueError as exc:
        raise CheckpointError(path, f"does not fit the model: {exc}") from None
    return True


#: a saved classification head's output layer (PEFT's SEQ_CLS / TOKEN_CLS ``modules_to_save``).
_HEAD_MODULES = ("classifier", "score", "classifier.out_proj")


def _saved_head_labels(path: "str | os.PathLike[str]") -> int | None:
    """The number of labels of a classification head saved with the adapter (rows of its output weight),
    read from the header of its weights file (``path``, or ``adapter_model.safetensors`` in the directory
    ``path``); None when there is none."""
    from nora_spectra.io.peft_keys import PEFT_PREFIX, dense_module
    from nora_spectra.io.safetensors_file import SafetensorsFile

    file = os.fspath(path)
    if os.path.isdir(file):
        file = os.path.join(file, "adapter_model.safetensors")
    if not file.endswith(".safetensors") or not os.path.isfile(file):
        return None
    header = SafetensorsFile(file)
    for key in header.keys():
        if not key.endswith(".weight"):
            continue
        module = dense_module(key.removeprefix(PEFT_PREFIX))  # also older PEFT's <module>.modules_to_save.<adapter>
        if any(module == head or module.endswith("." + head) for head in _HEAD_MODULES):
            shape = header.info(key).shape
            if len(shape) == 2:
                return int(shape[0])
    return None


class ActivationRun:
    """The activation-space measurement: a model holding the adapters, data, and the layers to measure."""

    columns = ACTIVATION_COLUMNS
    unit = "sample"
    desc = "activations"

    def __init__(
        self,
        loaded: "LoadedModel",
        selected: dict[str, Any],
        sequences: Any,
        data_desc: str,
        samples: int,
        batch_size: int,
        info: SourceInfo,
        injected: bool,
    ) -> None:
        self.loaded = loaded
        self.selected = selected
        self.sequences = sequences
        self.data_desc = data_desc
        self.total = samples
        self.batch_size = batch_size
        self.info = info
        self.injected = injected
        self.tokens = 0
        #: module name -> tensor-key prefix as stored (checkpoint paths); an in-memory model's names are its keys.
        self.keys: dict[str, str] = {}

    def layers(self, report: Report | None) -> Iterator[LayerSpectrum]:
        done = [0]

        def on_batch(k: int) -> None:
            done[0] += k
            report(done[0], self.total, "samples")  # type: ignore[misc]

        batches = _token_batches(self.sequences, self.total, self.batch_size)
        factors = _capture(self.loaded, self.selected, batches, on_batch if report else None)
        self.tokens = max((f.n for f in factors.values()), default=0)
        top_rank = max(layer.r for layer in self.selected.values())
        if self.tokens < top_rank:
            self.info.warnings.append(
                f"only {self.tokens} tokens for rank up to {top_rank}: "
                "the activation spectrum cannot exceed the token count minus one"
            )
        kinds = {layer.method for layer in self.selected.values()}
        if not self.info.method:
            self.info.method = kinds.pop() if len(kinds) == 1 else "mixed"
        for name, layer in self.selected.items():
            factor = factors[name]
            B = layer.lora_B.weight.detach().to("cpu").double().numpy()
            try:
                sigma = centred_spectrum(factor, B, layer.scaling)
            except NonFiniteFactorsError:
                sigma = None
            identity = {
                "module": name,
                "key": self.keys.get(name, name),
                "kind": layer.method,
                "layer_type": "linear",
                "dtype": str(layer.lora_A.weight.dtype).removeprefix("torch."),
                "rank": layer.r,
                "scale": float(layer.scaling),
                "shape": (layer.out_features, factor.n),
                "space": "activation",
                "tokens": int(factor.n),
            }
            yield LayerSpectrum(identity, sigma)

    def fields(self) -> dict[str, Any]:
        return {
            "tokens": self.tokens,
            "samples": self.total,
            "model": self.loaded.source,
            "data": self.data_desc,
            "probe_scale": None,
        }

    def close(self) -> None:
        """Remove the adapters injected from a checkpoint path (the caller's model is left as given)."""
        if self.injected:
            from nora_core.inject import unload

            unload(self.loaded.model)
            self.injected = False


def prepare(
    source: "str | os.PathLike[str] | nn.Module",
    *,
    model: "str | os.PathLike[str] | nn.Module | LoadedModel | None" = None,
    data: DataArg = None,
    samples: int = 128,
    layers: Sequence[Any] | str | None = None,
    batch_size: int = 8,
    tokenizer: Any | None = None,
    max_length: int | None = None,
    model_class: str | None = None,
) -> ActivationRun:
    """Load the model, inject the adapter, read the data and select the layers.

    Args:
        source: an adapter checkpoint directory (loaded into ``model`` with :func:`nora_core.load_adapter`,
            and removed again by :meth:`ActivationRun.close`), or an ``nn.Module`` that already holds
            ``AdapterLinear`` layers (then ``model`` must be None).
        model: the base model: a directory (see :func:`nora_spectra.model_loading.load_model`), an
            ``nn.Module`` without adapters, or a ``LoadedModel``. Required with a checkpoint path.
        data: a JSONL file (any format of :mod:`nora_core.data`, encoded as the model sees it in use:
            :func:`nora_core.data.load_sequences`), ``TokenSequences``, a ``TokenDataset`` (measured as it
            is), or an ``(N, T)`` tensor of token ids (every position real).
        samples: number of sequences (the first ones) to run; the paper uses 128.
        layers: which adapter modules to measure, see :func:`select_layers` (paper: ``"last:5"``).
        batch_size: sequences per forward pass.
        tokenizer: a tokenizer directory (``--tokenizer DIR``) or object, overriding the model's own when
            ``data`` is a path.
        max_length: longest tokenised sequence, special tokens included; default the model's maximum
            (:func:`nora_spectra.model_loading.model_max_length`), which it may not exceed.
        model_class: the transformers class to load a model directory as (``--model-class``, one of
            :data:`nora_spectra.model_loading.MODEL_CLASSES`); default chosen from the adapter's
            ``task_type`` and the model config.

    Raises:
        CheckpointError: the checkpoint or model path is missing or malformed, or the adapter's modules
            are not in the model (the message says why and which ``--model-class`` fits).
        UsageError: bad options (no model, no data, no adapters, nothing selected, unreadable data).
    """
    from nora_spectra._torch import require_torch

    require_torch("--space activation")
    from nora_core.inject import adapter_layers
    from nora_spectra.model_loading import LoadedModel, as_loaded_model, load_tokenizer, module_mismatch

    if isinstance(samples, bool) or not isinstance(samples, int) or samples < 1:
        raise UsageError(f"samples must be >= 1, got {samples}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise UsageError(f"batch_size must be >= 1, got {batch_size}")
    if max_length is not None and (isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 1):
        raise UsageError(f"max_length must be an integer >= 1, got {max_length!r}")
    from_path = isinstance(source, (str, os.PathLike))
    if from_path and (model is None or data is None):
        raise UsageError("--space activation needs --model MODEL and --data FILE")
    if data is None:
        raise UsageError("activation space needs data (--data FILE)")
    if isinstance(tokenizer, (str, os.PathLike)):
        tokenizer = load_tokenizer(tokenizer)
    injected = False
    if from_path:
        from nora_spectra.io import load_checkpoint

        checkpoint = load_checkpoint(source)
        keys = {entry.module: entry.key for entry in checkpoint.entries}
        info = source_info(checkpoint)
        info.checkpoint = os.fspath(source)
        info.adapter = None
        info.skipped = []
        task_type = (checkpoint.config or {}).get("task_type") if isinstance(checkpoint.config, dict) else None
        loaded = as_loaded_model(model, model_class=model_class, task_type=task_type,
                                 num_labels=_saved_head_labels(checkpoint.weights_path))
        config = getattr(getattr(loaded.model, "config", None), "to_dict", lambda: None)()
        problem = module_mismatch(loaded.model, list(checkpoint.modules), config=config, task_type=task_type)
        if problem is not None:
            loaded_as = f" (loaded as {loaded.model_class}: {loaded.why})" if loaded.model_class else ""
            raise CheckpointError(source, f"does not fit the model {loaded.source}{loaded_as}: {problem}")
        injected = _load_adapter_into(loaded.model, source)
    else:
        keys = {}
        if model is not None:
            raise UsageError("pass either a checkpoint path with model=..., or a model holding adapters, not both")
        loaded = as_loaded_model(source, model_class=model_class)
        info = SourceInfo(checkpoint="<in-memory model>", format="in-memory", method="")
    try:
        if tokenizer is not None:
            loaded = dataclasses.replace(loaded, tokenizer=tokenizer)
        if max_length is not None:
            if loaded.kind != "module" and max_length > loaded.max_length:
                raise UsageError(f"--max-length {max_length} exceeds the model's maximum of {loaded.max_length} tokens")
            loaded = dataclasses.replace(loaded, max_length=max_length)
        assert isinstance(loaded, LoadedModel)
        all_layers = dict(adapter_layers(loaded.model))
        if not all_layers:
            raise UsageError("the model holds no adapter layers (AdapterLinear) to measure")
        names = select_layers(list(all_layers), layers)
        sequences, data_desc = _as_sequences(data, loaded)
        n_samples = min(samples, len(sequences))
        if n_samples < samples:
            info.warnings.append(f"asked for {samples} samples but the data holds {len(sequences)}; used {n_samples}")
    except BaseException:
        if injected:
            from nora_core.inject import unload

            unload(loaded.model)
        raise
    selected = {name: all_layers[name] for name in names}
    run = ActivationRun(loaded, selected, sequences, data_desc, n_samples, batch_size, info, injected)
    run.keys = keys
    return run
