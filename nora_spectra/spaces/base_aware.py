"""What a base model adds to weight-space spectra: DoRA's true update, relative size, intruder dimensions.

With ``analyze(source, base=BASE)`` (``spectra analyze ... --base BASE``), each module's base weight
``W0`` is found in the base model (:meth:`ModelWeights.resolve`: ``<module>.weight``, then suffix
matches) and brought to the update's ``(d_out, d_in)`` orientation (transposed for GPT-2 ``Conv1D``
weights stored ``(d_in, d_out)``, flattened for conv kernels). Every module is resolved and its shape
checked before any tensor is read; a module the base lacks, or whose shape does not fit, is an error
naming both files. Per module, :class:`BaseAware` then

* turns a DoRA module's proxy ``s B A`` into its true update (:func:`nora_spectra.dora.dora_update`);
* reports ``relative_sigma_max = ||dW||_2 / ||W0||_2`` and ``relative_frobenius_norm = ||dW||_F / ||W0||_F``;
* with ``intruders=True``, counts the intruder dimensions of ``W0 + dW``
  (:func:`nora_spectra.intruders.intruder_dimensions`).

``||W0||_2`` and the base's left singular vectors come from :class:`nora_spectra.svd_cache.SvdCache`, keyed
by the base tensor's content, so they are computed once per base, not once per adapter.

:func:`spectrum_fields` and :func:`with_top_k` serve every analysis whose spectra may be truncated (a base,
``top_k``, or a full fine-tune): large dense updates get their leading ``top_k`` singular values only.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from nora_spectra._text import name_list
from nora_spectra.dora import DORA_NORM_AXIS, dora_update
from nora_spectra.errors import CheckpointError, UsageError
from nora_spectra.intruders import intruder_dimensions
from nora_spectra.io.model_weights import ModelWeights
from nora_spectra.io.safetensors_file import FLOAT_DTYPES
from nora_spectra.schema import DEFAULT_TOP_K, EXACT_SVD_MAX_DIM
from nora_spectra.spectrum import NonFiniteFactorsError, Spectrum
from nora_spectra.svd_cache import SvdCache
from nora_spectra.updates import DenseUpdate, Update, dense_matrix

__all__ = [
    "BaseAware",
    "BaseTensor",
    "effective_top_k",
    "spectrum_fields",
    "with_top_k",
]

def effective_top_k(requested: "int | str | None", shape: tuple[int, int]) -> int | None:
    """The number of leading singular values a dense update of ``shape`` gets (None: all of them, exactly).

    ``"all"`` -> None; an integer -> itself; None -> :data:`DEFAULT_TOP_K` when ``min(shape)`` exceeds
    :data:`EXACT_SVD_MAX_DIM`, else None.
    """
    if requested == "all":
        return None
    if requested is not None:
        return int(requested)
    return DEFAULT_TOP_K if min(shape) > EXACT_SVD_MAX_DIM else None


def with_top_k(update: Update, requested: "int | str | None") -> Update:
    """``update`` with the ``top_k`` of :func:`effective_top_k` when it is dense; other kinds are exact already."""
    if isinstance(update, DenseUpdate):
        return dataclasses.replace(update, top_k=effective_top_k(requested, update.shape))
    return update


def spectrum_fields(spec: Spectrum | None, update: Update) -> dict[str, Any]:
    """``top_k``, ``captured_energy`` and ``sigma_error_bound`` of one module's spectrum.

    ``top_k`` is the number of leading values computed when fewer than ``min(d_out, d_in)`` were asked
    for (else None); ``captured_energy`` is ``sum(sigma_i^2) / ||dW||_F^2`` over the values computed (None
    for a zero or non-finite update); ``sigma_error_bound`` is the spectrum's ``error_bound`` (0 when exact).
    """
    if spec is None:
        return {"top_k": None, "captured_energy": None, "sigma_error_bound": None}
    values = spec.values
    complete = not (isinstance(update, DenseUpdate) and update.top_k is not None and len(values) < min(update.shape))
    top = float(values[0]) if values.size else 0.0
    if top == 0.0:
        captured = None
    elif complete:
        captured = 1.0
    else:
        assert spec.total_energy is not None
        total = spec.total_energy / (top * top)
        captured = float(np.sum((values / top) ** 2) / total) if total > 0 and math.isfinite(total) else None
    return {
        "top_k": None if complete else len(values),
        "captured_energy": captured,
        "sigma_error_bound": float(spec.error_bound),
    }


def frobenius(spec: Spectrum) -> float:
    """``||dW||_F`` exactly: from the total energy of a dense update, else from the (complete) spectrum."""
    if spec.total_energy is not None:
        return math.sqrt(spec.total_energy)
    values = spec.values
    top = float(values[0]) if values.size else 0.0
    return 0.0 if top == 0.0 else top * math.sqrt(float(np.sum((values / top) ** 2)))


@dataclass(frozen=True)
class BaseTensor:
    """Where a module's base weight is, and how it maps to the update's ``(d_out, d_in)``.

    Attributes:
        name: the base model's tensor name.
        transposed: the base stores ``(d_in, d_out)`` (GPT-2 ``Conv1D``).
        shape: ``(d_out, d_in)`` of the update (conv kernels flattened).
    """

    name: str
    transposed: bool
    shape: tuple[int, int]


class BaseAware:
    """Base-model measurements of one checkpoint's modules.

    Args:
        base: the opened base model.
        checkpoint: the checkpoint analysed (its ``entries`` are resolved at once, so a missing module
            or a shape that does not fit is reported before any tensor is read).
        cache: where ``||W0||_2`` and the base's singular vectors are kept.
        intruders: also count intruder dimensions.
        intruder_k: leading directions of the tuned matrix tested.
        intruder_eps: the cosine threshold.

    Raises:
        CheckpointError: a module without a weight in the base, or whose shape does not fit it.
    """

    def __init__(
        self,
        base: ModelWeights,
        checkpoint: Any,
        *,
        cache: SvdCache,
        intruders: bool,
        intruder_k: int,
        intruder_eps: float,
    ) -> None:
        self.base = base
        self.cache = cache
        self.intruders = intruders
        self.intruder_k = intruder_k
        self.intruder_eps = intruder_eps
        self.source_path = str(getattr(checkpoint, "weights_path", None) or checkpoint.path)
        config = getattr(checkpoint, "config", None) or {}
        self.fan_in_fan_out = config.get("fan_in_fan_out") is True
        self.problems: list[str] = []
        self._plans: dict[str, BaseTensor] = {}
        for entry in getattr(checkpoint, "entries", None) or []:
            self.plan(entry.module, entry.layer_type, tuple(entry.shape))

    def plan(self, module: str, layer_type: str, shape: tuple[int, int]) -> BaseTensor:
        """The base tensor of ``module`` (resolved once).

        Raises:
            CheckpointError: the base has no weight for it, a non-float one, or one whose shape does not fit.
        """
        if module in self._plans:
            return self._plans[module]
        base = self.base
        name = base.resolve(module)
        if name is None:
            raise CheckpointError(
                base.path,
                f"no weight for module {module!r} of {self.source_path} (looked for '{module}.weight' and "
                "tensor names ending in it)",
            )
        info = base.info(name)
        if info.dtype not in FLOAT_DTYPES:
            raise CheckpointError(base.file_of(name), f"base tensor {name!r} has non-float dtype {info.dtype}")
        stored = tuple(int(n) for n in info.shape)
        rows, cols = shape
        transposed = False
        if layer_type == "conv":
            fits = len(stored) >= 3 and stored[0] == rows and math.prod(stored[1:]) == cols
        elif len(stored) != 2:
            fits = False
        elif stored == (cols, rows) and layer_type == "linear" and (rows != cols or self.fan_in_fan_out):
            fits, transposed = True, True  # Conv1D (fan_in_fan_out) stores (d_in, d_out)
        else:
            fits = stored == (rows, cols)
        if not fits:
            raise CheckpointError(
                self.source_path,
                f"module {module!r}: the update is {[rows, cols]} but the base tensor {name!r} in "
                f"{base.file_of(name)} has shape {list(stored)}",
            )
        self._plans[module] = BaseTensor(name, transposed, (rows, cols))
        return self._plans[module]

    def load(self, plan: BaseTensor) -> tuple[np.ndarray, str | None]:
        """``W0`` of ``plan`` in the update's orientation (float64, C-contiguous) and its cache key.

        The key is the tensor's content digest and orientation (``<digest>-N`` / ``-T``), computed in the
        same pass over the bytes as the read; None without a disk cache.
        """
        if self.cache.root is None:
            w, key = self.base.read(plan.name), None
        else:
            w, digest = self.base.read_with_digest(plan.name)
            key = f"{digest}-{'T' if plan.transposed else 'N'}"
        if plan.transposed:
            return np.ascontiguousarray(w.T), key
        return w.reshape(plan.shape), key

    def matrix(self, plan: BaseTensor) -> np.ndarray:
        """``W0`` of ``plan`` in the update's orientation, float64, C-contiguous."""
        return self.load(plan)[0]

    def true_dora(self, update: Update, base: np.ndarray, magnitude: np.ndarray, layer_type: str) -> DenseUpdate:
        """DoRA's true update ``m * (W0 + dW) / ||W0 + dW|| - W0`` as a dense update (``dW`` the proxy)."""
        direction = dense_matrix(update)
        if layer_type not in DORA_NORM_AXIS:
            raise CheckpointError(self.source_path, f"DoRA on a {layer_type} layer is not supported")
        return DenseUpdate(dora_update(base, direction, magnitude, layer_type=layer_type))

    def fields(
        self, plan: BaseTensor, base: np.ndarray, key: str | None, update: Update, spec: Spectrum | None
    ) -> dict[str, Any]:
        """``base_tensor``, the relative sizes and (``intruders``) the intruder fields of one module.

        Args:
            plan, base, key: the module's base tensor, ``W0`` and its cache key (:meth:`load`).
            update: the update analysed (the true one for DoRA).
            spec: its spectrum, or None when it holds NaN/Inf.
        """
        out: dict[str, Any] = {"base_tensor": plan.name, "relative_sigma_max": None, "relative_frobenius_norm": None}
        if self.intruders:
            out.update(intruders=None, intruder_indices=None, intruder_max_cos=None)
        if not np.isfinite(base).all():
            self.problems.append(plan.name)
            return out
        if spec is not None:
            base_2, vectors = self.cache.base_facts(key, base, vectors=self.intruders)
            base_f = float(np.linalg.norm(base))
            update_2 = float(spec.values[0]) if spec.values.size else 0.0
            out["relative_sigma_max"] = update_2 / base_2 if base_2 > 0 else None
            out["relative_frobenius_norm"] = frobenius(spec) / base_f if base_f > 0 else None
        if self.intruders and spec is not None:
            assert vectors is not None
            tuned = dense_matrix(update)
            np.add(tuned, base, out=tuned)
            try:
                found = intruder_dimensions(tuned, vectors, k=self.intruder_k, eps=self.intruder_eps)
            except NonFiniteFactorsError:
                return out
            out.update(intruders=found.count, intruder_indices=found.indices, intruder_max_cos=found.max_cos)
        return out

    def warnings(self) -> list[str]:
        """Problems met so far (non-finite base tensors, cache trouble), one line each."""
        messages = []
        if self.problems:
            messages.append(f"base tensors holding NaN/Inf (relative size and intruders null): {name_list(self.problems)}")
        return messages + list(self.cache.warnings)
