"""Activation-space spectra: the SVD of an adapter branch's centred outputs over real inputs.

A NoRA branch ``dY = s B act(A x)`` is non-linear and has no single update matrix, so the NoRA paper
measures its spectrum in *activation space*: run the adapted model in eval mode over ``samples``
training examples, capture every branch's output ``dY`` (tokens x d_out), centre each column (subtract
its mean over tokens) and take the singular values. This module does that without ever forming ``dY``:

* With ``H`` (tokens x r) the branch hidden (LoRA ``A x``, NoRA ``act(A x)``; dropout is off in eval
  mode), ``dY = s H B^T`` and the centred ``dY_c = s H_c B^T`` with ``H_c = H - 1 mean(H)``.
* ``H_c`` is reduced on the fly to its ``r x r`` triangular factor ``R`` (``H_c = Q R``, Householder QR
  per batch, batches merged with the exact pooled-scatter update, so memory is ``O(r^2)`` per layer
  whatever the number of tokens, and the condition number is never squared).
* Then ``sigma(dY_c) = sigma(s B H_c^T) = sigma(s B R^T)``, computed by THE spectrum function
  :func:`nora_spectra.spectrum.adapter_singular_values` ``(R^T, B, s)``; metrics by
  :func:`nora_spectra.metrics.spectrum_metrics`.

Records have the weight-space fields (:data:`nora_spectra.analysis.LAYER_COLUMNS`) plus ``"space":
"activation"`` and ``"tokens"``; ``shape`` is ``[d_out, tokens]``, the shape of ``dY_c^T``. Singular
values are those of the centred ``dY`` as is (they grow like ``sqrt(tokens)``); every rank metric is
scale-invariant. See ``docs/activation.md``.

torch is imported only when a model is run; :class:`CentredFactor` and :func:`centred_spectrum` are
plain numpy (the probe in :mod:`nora_spectra.probe` uses them without torch).
"""

from __future__ import annotations

import dataclasses
import fnmatch
import logging
import math
import os
from typing import TYPE_CHECKING, Any, Callable, Iterable, Mapping, Sequence, Union

import numpy as np

from nora_spectra.analysis import (
    LAYER_COLUMNS,
    Analysis,
    layer_index,
    layer_record,
    module_type,
    progress_callback,
    to_jsonable,
)
from nora_spectra.errors import CheckpointError, UsageError
from nora_spectra.spectrum import NonFiniteFactorsError, adapter_singular_values
from nora_spectra.summary import summarize

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from torch import nn

    from nora_spectra.model_loading import LoadedModel

__all__ = [
    "ACTIVATION_COLUMNS",
    "ActivationAnalysis",
    "CentredFactor",
    "activation_spectra",
    "analyze_activation",
    "centred_spectrum",
    "select_layers",
    "spectrum_record",
]

log = logging.getLogger(__name__)

#: keys of an activation- or probe-space record: the weight-space columns, then ``space`` and ``tokens``.
ACTIVATION_COLUMNS: tuple[str, ...] = LAYER_COLUMNS + ("space", "tokens")


DataArg = Union[str, "os.PathLike[str]", Any]


# --------------------------------------------------------------------------- numpy core
class CentredFactor:
    """Streaming triangular factor of column-centred rows: after all updates ``H_c = Q R``.

    Rows arrive in batches; each batch is centred on its own mean and reduced by Householder QR, and
    two partial results ``(n_a, mean_a, R_a)``, ``(n_b, mean_b, R_b)`` merge exactly through the
    pooled scatter identity

    .. math:: H_c^T H_c = R_a^T R_a + R_b^T R_b + \\frac{n_a n_b}{n_a + n_b} (m_b - m_a)(m_b - m_a)^T,

    realised as the QR of ``[R_a; R_b; sqrt(n_a n_b / n) (m_b - m_a)^T]`` (never forming a Gram
    matrix). Memory is ``O(width^2)`` whatever the number of rows.

    Args:
        width: number of columns ``r``.

    Attributes:
        n: rows seen so far.
        mean: ``(width,)`` column means of the rows seen.
        finite: False once a batch held NaN or Inf (later batches are then ignored).
    """

    def __init__(self, width: int) -> None:
        if width < 1:
            raise ValueError(f"width must be >= 1, got {width}")
        self.width = int(width)
        self.n = 0
        self.mean = np.zeros(self.width)
        self.finite = True
        self._r = np.zeros((0, self.width))

    def update(self, rows: np.ndarray) -> None:
        """Add a batch of rows.

        Args:
            rows: ``(m, width)`` array (upcast to float64); ``m == 0`` is a no-op.

        Raises:
            ValueError: when ``rows`` is not ``(m, width)``.
        """
        rows = np.asarray(rows, dtype=np.float64)
        if rows.ndim != 2 or rows.shape[1] != self.width:
            raise ValueError(f"rows must be (m, {self.width}), got {rows.shape}")
        m = rows.shape[0]
        if m == 0 or not self.finite:
            return
        if not np.all(np.isfinite(rows)):
            self.finite = False
            return
        batch_mean = rows.mean(axis=0)
        batch_r = np.linalg.qr(rows - batch_mean, mode="r")
        if self.n == 0:
            self.n, self.mean, self._r = m, batch_mean, batch_r
            return
        total = self.n + m
        shift = batch_mean - self.mean
        stacked = np.vstack([self._r, batch_r, math.sqrt(self.n * m / total) * shift[None, :]])
        self._r = np.linalg.qr(stacked, mode="r")
        self.mean = self.mean + shift * (m / total)
        self.n = total

    @property
    def R(self) -> np.ndarray:
        """``(width, width)`` upper-triangular ``R`` with ``R^T R = H_c^T H_c`` (zero rows padded)."""
        out = np.zeros((self.width, self.width))
        k = min(self._r.shape[0], self.width)
        out[:k] = self._r[:k]
        return out


def centred_spectrum(factor: CentredFactor, B: np.ndarray, scale: float) -> np.ndarray:
    """Singular values of the centred branch output ``s H_c B^T`` from the streamed factor of ``H_c``.

    Args:
        factor: the :class:`CentredFactor` of the hidden ``H`` (tokens x r).
        B: ``(d_out, r)`` up-projection.
        scale: the adapter's scale ``s``.

    Returns:
        ``(min(r, d_out),)`` float64, descending: ``sigma(s B H_c^T) = sigma(s B R^T)``.

    Raises:
        NonFiniteFactorsError: when the hidden or ``B`` held NaN/Inf.
    """
    if not factor.finite:
        raise NonFiniteFactorsError("the adapter hidden held NaN or Inf")
    return adapter_singular_values(factor.R.T, B, scale)


def spectrum_record(
    *,
    module: str,
    kind: str,
    rank: int,
    scale: float,
    shape: Sequence[int],
    sigma: np.ndarray | None,
    space: str,
    tokens: int,
    dtype: str,
    collapse_threshold: float,
    layer_type: str = "linear",
) -> dict[str, Any]:
    """One layer record with the weight-space field names (``ACTIVATION_COLUMNS``).

    Args:
        module: module name.
        kind: ``"lora"`` or ``"nora"``.
        rank: the rank budget ``r``.
        scale: the adapter's scale ``s`` (already applied to ``sigma``).
        shape: ``(rows, cols)`` of the measured matrix: ``[d_out, tokens]`` for ``dY_c^T``.
        sigma: the singular values, or None when the inputs held NaN/Inf (status ``non_finite``).
        space: ``"activation"`` or ``"probe"``.
        tokens: rows (tokens or probe inputs) the spectrum was measured over.
        dtype: dtype name of the adapter factors.
        collapse_threshold: see :func:`nora_spectra.metrics.spectrum_metrics`.
        layer_type: ``"linear"``.

    Returns:
        The record, keys in :data:`ACTIVATION_COLUMNS` order.
    """
    identity = {
        "module": module,
        "kind": kind,
        "layer_type": layer_type,
        "dtype": dtype,
        "rank": rank,
        "scale": float(scale),
        "shape": shape,
        "space": space,
        "tokens": int(tokens),
    }
    return layer_record(identity, sigma, collapse_threshold=collapse_threshold, columns=ACTIVATION_COLUMNS)


@dataclasses.dataclass
class ActivationAnalysis(Analysis):
    """An :class:`~nora_spectra.analysis.Analysis` measured in activation (or probe) space.

    Attributes (beyond :class:`Analysis`):
        space: ``"activation"`` or ``"probe"``.
        tokens: rows the spectra were measured over (real tokens, or Gaussian probe inputs).
        samples: sequences run through the model (activation) or 0 (probe).
        model: the base model's path or class name (activation), None for the probe.
        data: the data file, or a description of the in-memory data (activation).
        probe_scale: the standard deviation of the Gaussian probe inputs (probe only).
    """

    space: str = "activation"
    tokens: int = 0
    samples: int = 0
    model: str | None = None
    data: str | None = None
    probe_scale: float | None = None

    def to_dict(self) -> dict[str, Any]:
        """:meth:`Analysis.to_dict` plus ``space``, ``tokens``, ``samples``, ``model``, ``data``, ``probe_scale``."""
        out = super().to_dict()
        out.update(
            to_jsonable(
                {
                    "space": self.space,
                    "tokens": self.tokens,
                    "samples": self.samples,
                    "model": self.model,
                    "data": self.data,
                    "probe_scale": self.probe_scale,
                }
            )
        )
        return out


# --------------------------------------------------------------------------- layer selection
def select_layers(names: Sequence[str], layers: Sequence[Any] | str | None) -> list[str]:
    """The adapter modules to measure.

    Args:
        names: adapter module names, in model order.
        layers: None (all); or a sequence (or comma-separated string) of items, each an int layer
            index (negative counts from the end of the indices present, so ``-1`` is the last
            block), ``"last:N"`` (the last N layer indices, the paper's setting is ``last:5``), or a
            glob matched against the full module name and its last component (``"q_proj"``,
            ``"*.v_proj"``). A module is kept when it matches any item.

    Returns:
        The selected names, in model order.

    Raises:
        UsageError: an item is malformed or nothing is selected.
    """
    if layers is None:
        return list(names)
    items = [s.strip() for s in layers.split(",")] if isinstance(layers, str) else list(layers)
    items = [i for i in items if i != ""]
    indices = sorted({i for i in (layer_index(n) for n in names) if i is not None})
    wanted_idx: set[int] = set()
    patterns: list[str] = []
    for item in items:
        if isinstance(item, bool):
            raise UsageError(f"--layers: not a layer index or pattern: {item!r}")
        text = str(item)
        if isinstance(item, int) or _is_int(text):
            i = int(text)
            if i < 0:
                if -i > len(indices):
                    raise UsageError(f"--layers: {i} but the model has only {len(indices)} adapted layer indices")
                i = indices[i]
            wanted_idx.add(i)
        elif text.startswith("last:"):
            count = text[5:]
            if not _is_int(count) or int(count) < 1:
                raise UsageError(f"--layers: expected last:N with N >= 1, got {text!r}")
            wanted_idx.update(indices[-int(count) :])
        else:
            patterns.append(text)
    selected = [
        n
        for n in names
        if layer_index(n) in wanted_idx
        or any(fnmatch.fnmatchcase(n, p) or fnmatch.fnmatchcase(module_type(n), p) for p in patterns)
    ]
    if not selected:
        raise UsageError(f"--layers {layers!r} selects no adapter module (modules: {', '.join(names[:4])}, ...)")
    return selected


def _is_int(text: str) -> bool:
    return text.lstrip("-").isdigit()


# --------------------------------------------------------------------------- running the model
def _token_batches(dataset: Any, samples: int, batch_size: int) -> Iterable[tuple["torch.Tensor", "torch.Tensor"]]:
    """``(input_ids (b, L), mask (b, L) bool)`` for the first ``samples`` rows, real tokens masked in."""
    import torch

    n = min(samples, len(dataset))
    for start in range(0, n, batch_size):
        idx = torch.arange(start, min(start + batch_size, n))
        ids, _labels = dataset.batch(idx)
        mask = torch.arange(ids.shape[1])[None, :] < dataset.lengths[idx][:, None]
        yield ids, mask


def _as_dataset(data: DataArg, loaded: "LoadedModel") -> tuple[Any, str]:
    """A ``TokenDataset`` from a JSONL path, a TokenDataset or an (N, T) id tensor; and its description."""
    import torch

    from nora_core.data import DataFormatError, TokenDataset, load_dataset

    if isinstance(data, TokenDataset):
        return data, f"<TokenDataset of {len(data)}>"
    if isinstance(data, (str, os.PathLike)):
        if loaded.tokenizer is None:
            raise UsageError(f"{loaded.source}: the model has no tokenizer; pass tokenizer=... or token ids as data")
        try:
            dataset = load_dataset(data, loaded.tokenizer, max_length=loaded.max_length)
        except FileNotFoundError:
            raise UsageError(f"{os.fspath(data)}: data file not found") from None
        except (DataFormatError, ValueError) as exc:
            message = str(exc)
            if not message.startswith(os.fspath(data)):
                message = f"{os.fspath(data)}: {message}"
            raise UsageError(message) from None
        return dataset, os.fspath(data)
    if isinstance(data, (torch.Tensor, np.ndarray)):
        ids = torch.as_tensor(data, dtype=torch.long)
        if ids.ndim != 2:
            raise UsageError(f"data ids must be (N, T), got shape {tuple(ids.shape)}")
        lengths = torch.full((ids.shape[0],), ids.shape[1])
        return TokenDataset(ids, ids.clone(), lengths), f"<ids {tuple(ids.shape)}>"
    raise UsageError(f"data must be a JSONL path, a TokenDataset or an (N, T) id tensor, got {type(data).__name__}")


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


def activation_spectra(
    adapted: "str | os.PathLike[str] | nn.Module",
    *,
    model: "str | os.PathLike[str] | nn.Module | LoadedModel | None" = None,
    data: DataArg,
    samples: int = 128,
    layers: Sequence[Any] | str | None = None,
    batch_size: int = 8,
    tokenizer: Any | None = None,
    max_length: int | None = None,
    collapse_threshold: float = 0.25,
    progress: bool | Callable[[int, int, str], None] | None = None,
) -> ActivationAnalysis:
    """Activation-space spectra of every adapter branch over real inputs (the NoRA paper's measurement).

    Args:
        adapted: an adapter checkpoint directory (loaded into ``model`` with
            :func:`nora_core.load_adapter`, and removed again afterwards), or an ``nn.Module`` that
            already holds ``AdapterLinear`` layers (then ``model`` must be None).
        model: the base model: a directory (see :func:`nora_spectra.model_loading.load_model`), an
            ``nn.Module`` without adapters, or a ``LoadedModel``. Required with a checkpoint path.
        data: a JSONL file (any format of :mod:`nora_core.data`), a ``TokenDataset``, or an ``(N, T)``
            tensor of token ids (every position real).
        samples: number of sequences (the first ones) to run; the paper uses 128.
        layers: which adapter modules to measure, see :func:`select_layers` (paper: ``"last:5"``).
        batch_size: sequences per forward pass.
        tokenizer: overrides the model's tokenizer when ``data`` is a path.
        max_length: longest tokenised sequence; default the model's limit (at most 512).
        collapse_threshold: utilization below which a layer is flagged ``collapsed``.
        progress: True for a tqdm bar on stderr, or a callable ``(done, total, what)``.

    Returns:
        An :class:`ActivationAnalysis` with one record per measured module (space ``"activation"``).

    Raises:
        CheckpointError: the checkpoint or model path is missing or malformed.
        UsageError: bad options (no model, no adapters, nothing selected, unreadable data).
    """
    from nora_spectra.model_loading import LoadedModel, as_loaded_model

    if samples < 1:
        raise UsageError(f"samples must be >= 1, got {samples}")
    if batch_size < 1:
        raise UsageError(f"batch_size must be >= 1, got {batch_size}")
    checkpoint_info: dict[str, Any] = {"checkpoint": "<in-memory model>", "format": "in-memory", "config": None}
    warnings_out: list[str] = []
    injected = False
    if isinstance(adapted, (str, os.PathLike)):
        if model is None:
            raise UsageError("activation space needs the base model (--model MODEL)")
        loaded = as_loaded_model(model)
        checkpoint_info, warnings_out = _read_checkpoint_info(adapted)
        injected = _load_adapter_into(loaded.model, adapted)
    else:
        if model is not None:
            raise UsageError("pass either a checkpoint path with model=..., or a model holding adapters, not both")
        loaded = as_loaded_model(adapted)
    if tokenizer is not None:
        loaded = dataclasses.replace(loaded, tokenizer=tokenizer)
    if max_length is not None:
        loaded = dataclasses.replace(loaded, max_length=int(max_length))
    assert isinstance(loaded, LoadedModel)
    try:
        return _measure(
            loaded,
            data=data,
            samples=samples,
            layers=layers,
            batch_size=batch_size,
            collapse_threshold=collapse_threshold,
            progress=progress,
            checkpoint_info=checkpoint_info,
            warnings_out=warnings_out,
        )
    finally:
        if injected:
            from nora_core.inject import unload

            unload(loaded.model)


def analyze_activation(path: "str | os.PathLike[str]", *, model: Any, data: DataArg, **options: Any) -> ActivationAnalysis:
    """:func:`activation_spectra` of the checkpoint at ``path`` on ``model`` (the CLI's entry point).

    Args:
        path: adapter checkpoint directory.
        model: base model directory, ``nn.Module`` or ``LoadedModel``.
        data: JSONL path, ``TokenDataset`` or id tensor.
        **options: the keyword options of :func:`activation_spectra`.
    """
    return activation_spectra(path, model=model, data=data, **options)


def _read_checkpoint_info(path: "str | os.PathLike[str]") -> tuple[dict[str, Any], list[str]]:
    """Validate the checkpoint cheaply with ``load_checkpoint``; its format, method, config and warnings."""
    from nora_spectra.io import load_checkpoint

    checkpoint = load_checkpoint(path)
    info = {
        "checkpoint": os.fspath(path),
        "format": str(checkpoint.format),
        "method": str(checkpoint.method),
        "config": checkpoint.config,
    }
    return info, list(checkpoint.warnings or [])


def _load_adapter_into(module: "nn.Module", path: "str | os.PathLike[str]") -> bool:
    """Inject the adapter at ``path`` into the plain ``module``; True when injected (to unload later)."""
    from nora_core.checkpoint import load_adapter
    from nora_core.inject import adapter_layers

    if any(True for _ in adapter_layers(module)):
        raise UsageError("the base model already holds adapters; pass a plain model with a checkpoint path")
    try:
        load_adapter(module, path)
    except FileNotFoundError as exc:
        raise CheckpointError(path, str(exc)) from None
    except ValueError as exc:
        raise CheckpointError(path, f"does not fit the model: {exc}") from None
    return True


def _measure(
    loaded: "LoadedModel",
    *,
    data: DataArg,
    samples: int,
    layers: Sequence[Any] | str | None,
    batch_size: int,
    collapse_threshold: float,
    progress: bool | Callable[[int, int, str], None] | None,
    checkpoint_info: dict[str, Any],
    warnings_out: list[str],
) -> ActivationAnalysis:
    from nora_core.inject import adapter_layers

    all_layers = dict(adapter_layers(loaded.model))
    if not all_layers:
        raise UsageError("the model holds no adapter layers (AdapterLinear) to measure")
    names = select_layers(list(all_layers), layers)
    selected = {name: all_layers[name] for name in names}
    dataset, data_desc = _as_dataset(data, loaded)
    n_samples = min(samples, len(dataset))
    if n_samples < samples:
        warnings_out.append(f"asked for {samples} samples but the data holds {len(dataset)}; used {n_samples}")

    report, bar = progress_callback(progress, n_samples, unit="sample", desc="activations")
    done = [0]

    def on_batch(k: int) -> None:
        done[0] += k
        report(done[0], n_samples, "samples")

    try:
        factors = _capture(loaded, selected, _token_batches(dataset, n_samples, batch_size), on_batch if report else None)
    finally:
        if bar is not None:
            bar.close()

    records = []
    for name, layer in selected.items():
        factor = factors[name]
        B = layer.lora_B.weight.detach().to("cpu").double().numpy()
        try:
            sigma = centred_spectrum(factor, B, layer.scaling)
        except NonFiniteFactorsError:
            sigma = None
        records.append(
            spectrum_record(
                module=name,
                kind=layer.method,
                rank=layer.r,
                scale=layer.scaling,
                shape=(layer.out_features, factor.n),
                sigma=sigma,
                space="activation",
                tokens=factor.n,
                dtype=str(layer.lora_A.weight.dtype).removeprefix("torch."),
                collapse_threshold=collapse_threshold,
            )
        )
    tokens = max((f.n for f in factors.values()), default=0)
    if tokens < max(layer.r for layer in selected.values()):
        warnings_out.append(
            f"only {tokens} tokens for rank up to {max(layer.r for layer in selected.values())}: "
            "the activation spectrum cannot exceed the token count minus one"
        )
    warnings_out.extend(_status_warnings(records))
    kinds = {rec["kind"] for rec in records}
    method = checkpoint_info.get("method") or (kinds.pop() if len(kinds) == 1 else "mixed")
    return ActivationAnalysis(
        checkpoint=checkpoint_info["checkpoint"],
        format=checkpoint_info["format"],
        method=method,
        records=records,
        summary=summarize(records),
        config=checkpoint_info.get("config"),
        warnings=warnings_out,
        skipped=[],
        collapse_threshold=collapse_threshold,
        space="activation",
        tokens=tokens,
        samples=n_samples,
        model=loaded.source,
        data=data_desc,
    )


def _status_warnings(records: Sequence[Mapping[str, Any]]) -> list[str]:
    """One line per problem kind (zero branch output, NaN/Inf hidden)."""
    out = []
    zero = [r["module"] for r in records if r["status"] == "zero"]
    bad = [r["module"] for r in records if r["status"] == "non_finite"]
    if zero:
        out.append(f"{len(zero)} module(s) with a constant (zero after centring) branch output: {', '.join(zero[:3])}")
    if bad:
        out.append(f"{len(bad)} module(s) whose hidden or B held NaN/Inf: {', '.join(bad[:3])}")
    return out
