"""Probe-space spectra: the response of each adapter branch alone to isotropic Gaussian inputs.

Without a base model or data, a NoRA branch ``y = s B act(A x)`` can still be probed: draw
``x ~ N(0, probe_scale^2 I)`` (``samples`` rows per layer, seeded), compute the hidden
``H = act(X A^T)`` (``act`` from the checkpoint's config; the identity for LoRA), centre it and take
the singular values of ``s B H_c^T`` through THE spectrum function (the same streamed QR reduction as
:mod:`nora_spectra.activation`), divided by ``sqrt(samples - 1)`` so that they do not grow with the
number of probes.

What it tells:

* For LoRA (and NoRA with the identity activation) ``E[X_c^T X_c] / (n - 1) = probe_scale^2 I``, so the
  probe spectrum equals ``probe_scale * sigma(s B A)``, the weight-space spectrum, up to sampling
  error: each singular value is off by a relative ``O(sqrt(r / n))`` (Marchenko-Pastur spread of the
  ``r``-dimensional projection of ``n`` Gaussian vectors). A probe of a linear adapter is therefore only
  a consistency check.
* For a non-linear branch it is the spectrum of the branch's response to white input *of that scale*:
  how many output directions the branch can excite when every input direction is equally likely.

What it does not tell:

* How the branch behaves on real inputs. Real hidden states are anisotropic and concentrated on few
  directions; the activation spectrum weighs ``A``'s directions by the input covariance (for LoRA,
  ``sigma(s B A Sigma^{1/2})``) and can be far lower-rank than the probe. Use ``--space activation``.
* A scale-free answer: a non-linear branch responds differently to small and large inputs (SiLU is
  ``z/2 + z^2/4 + ...`` near 0, ReLU-like far from it), so the probe spectrum, its effective rank
  included, depends on ``probe_scale``. It is recorded in the result; compare probes at equal scale.

This module is torch-free (numpy and scipy only), like the weight-space path.
"""

from __future__ import annotations

import math
import os
import zlib
from typing import TYPE_CHECKING, Any, Callable, Iterator, Sequence

import numpy as np
from numpy.typing import ArrayLike
from scipy.special import erfc, expit

from nora_spectra.errors import UsageError
from nora_spectra.schema import ACTIVATION_COLUMNS, DEFAULT_PROBE_SAMPLES
from nora_spectra.spaces import LayerSpectrum, Report, SourceInfo, source_info
from nora_spectra.spaces.centred import centred_response_spectrum
from nora_spectra.spaces.selection import select_layers
from nora_spectra.spaces.weight import open_checkpoint
from nora_spectra.spectrum import NonFiniteFactorsError
from nora_spectra.updates import HadamardUpdate, LowRankUpdate

if TYPE_CHECKING:  # pragma: no cover
    from nora_spectra.io import Checkpoint

__all__ = [
    "ACTIVATIONS",
    "DEFAULT_PROBE_SAMPLES",
    "OPTIONS",
    "ProbeRun",
    "apply_activation",
    "checkpoint_activation",
    "prepare",
    "probe_layer",
    "probe_response_singular_values",
]

#: keyword options of this space.
OPTIONS = ("adapter", "format", "probe_scale", "probe_samples", "seed", "layers")

#: rows drawn and reduced at a time, at most.
_CHUNK = 1024
#: ...and at most this many floats in one batch of inputs, hidden or output rows (16 MiB).
_BATCH_FLOATS = 2**21


def _chunk(*widths: int) -> int:
    """Rows per batch: ``_CHUNK``, fewer when a row is wide, so a batch holds at most ``_BATCH_FLOATS``."""
    return max(1, min(_CHUNK, _BATCH_FLOATS // max(1, *widths)))


def _silu(z: np.ndarray) -> np.ndarray:
    return z * expit(z)  # z * sigmoid(z), accurate and overflow-free in both tails


ACTIVATIONS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "identity": lambda z: z,
    "silu": _silu,
    "relu": lambda z: np.maximum(z, 0.0),
    "gelu": lambda z: 0.5 * z * erfc(-z / math.sqrt(2.0)),  # exact (erf) GELU as nn.GELU(), no cancellation
}


def apply_activation(name: str, z: np.ndarray) -> np.ndarray:
    """NoRA's activation ``name`` (``identity``, ``silu``, ``relu``, ``gelu``) applied element-wise.

    Raises:
        UsageError: on an unknown name.
    """
    try:
        return ACTIVATIONS[name](z)
    except KeyError:
        raise UsageError(f"unknown adapter activation {name!r}; the probe knows {', '.join(ACTIVATIONS)}") from None


def checkpoint_activation(checkpoint: "Checkpoint") -> str:
    """The branch activation of a checkpoint: the config's ``activation`` for NoRA (default silu), identity for LoRA."""
    if checkpoint.method != "nora":
        return "identity"
    config = checkpoint.config or {}
    return str(config.get("activation") or "silu")


def probe_response_singular_values(
    A: ArrayLike, B: ArrayLike, scale: float, activation: str, X: ArrayLike
) -> np.ndarray:
    """Singular values of the centred branch response ``s act(X A^T) B^T`` to given inputs (not normalised).

    Args:
        A: ``(r, d_in)``.
        B: ``(d_out, r)``.
        scale: ``s``.
        activation: ``identity``, ``silu``, ``relu`` or ``gelu``.
        X: ``(n, d_in)`` inputs.

    Returns:
        ``(min(r, d_out),)`` float64, descending.
    """
    A = np.asarray(A, dtype=np.float64)
    B = np.asarray(B, dtype=np.float64)
    X = np.asarray(X, dtype=np.float64)
    if X.ndim != 2 or X.shape[1] != A.shape[1]:
        raise ValueError(f"inputs must be (n, {A.shape[1]}), got {X.shape}")
    step = _chunk(*A.shape, B.shape[0])
    hidden = (apply_activation(activation, X[start : start + step] @ A.T) for start in range(0, X.shape[0], step))
    with np.errstate(over="ignore", invalid="ignore"):  # overflow is reported as non-finite, not warned
        return centred_response_spectrum(hidden, B, scale, X.shape[0])


def probe_layer(
    A: ArrayLike,
    B: ArrayLike,
    scale: float,
    activation: str,
    *,
    probe_scale: float = 1.0,
    samples: int = DEFAULT_PROBE_SAMPLES,
    rng: np.random.Generator,
) -> np.ndarray:
    """Probe spectrum of one branch: ``sigma(s B H_c^T) / sqrt(n - 1)`` with ``H = act(X A^T)``, ``X ~ N(0, probe_scale^2 I)``.

    Args:
        A: ``(r, d_in)``.
        B: ``(d_out, r)``.
        scale: ``s``.
        activation: the branch's activation (``identity`` for LoRA).
        probe_scale: standard deviation of each input coordinate.
        samples: number of Gaussian inputs ``n`` (>= 2).
        rng: the random generator (draws ``samples * d_in`` normals).

    Returns:
        ``(min(r, d_out),)`` float64, descending. For ``identity`` this estimates
        ``probe_scale * sigma(s B A)``.
    """
    A = np.asarray(A, dtype=np.float64)
    B = np.asarray(B, dtype=np.float64)
    step = _chunk(*A.shape, B.shape[0])

    def hidden() -> Iterator[np.ndarray]:
        for start in range(0, samples, step):
            m = min(step, samples - start)
            X = rng.standard_normal((m, A.shape[1])) * probe_scale  # (m, d_in)
            yield apply_activation(activation, X @ A.T)  # (m, r)

    with np.errstate(over="ignore", invalid="ignore"):  # overflow is reported as non-finite, not warned
        return centred_response_spectrum(hidden(), B, scale, samples) / math.sqrt(samples - 1)


def _layer_seed(seed: int, module: str) -> list[int]:
    """Per-module seed, so a layer's probe does not depend on which other layers are selected."""
    return [int(seed), zlib.crc32(module.encode("utf-8"))]


class ProbeRun:
    """The probe-space measurement of one checkpoint."""

    columns = ACTIVATION_COLUMNS
    unit = "layer"
    desc = "probing"

    def __init__(self, checkpoint: "Checkpoint", names: list[str], activation: str, probe_scale: float, samples: int, seed: int) -> None:
        self.checkpoint = checkpoint
        self.names = names
        self.activation = activation
        self.probe_scale = probe_scale
        self.samples = samples
        self.seed = seed
        self.info: SourceInfo = source_info(checkpoint)
        self.total = len(names)

    def layers(self, report: Report | None) -> Iterator[LayerSpectrum]:
        wanted = set(self.names)
        done = 0
        for layer in self.checkpoint.iter_layers():
            if layer.module not in wanted:
                continue
            update = layer.update
            if isinstance(update, HadamardUpdate):  # LoHa: exactly U @ V, a low-rank product of rank r1 * r2
                u, v = update.factors()
                update = LowRankUpdate(v, u, update.scale)
            rng = np.random.default_rng(_layer_seed(self.seed, layer.module))
            try:
                sigma = probe_layer(
                    update.A, update.B, update.scale, self.activation,
                    probe_scale=self.probe_scale, samples=self.samples, rng=rng,
                )
            except NonFiniteFactorsError:
                sigma = None
            identity = {
                "module": layer.module,
                "key": layer.key,
                "kind": layer.kind,
                "layer_type": layer.layer_type,
                "dtype": layer.dtype,
                "rank": layer.rank,
                "scale": float(update.scale),
                "shape": (layer.shape[0], self.samples),
                "space": "probe",
                "tokens": self.samples,
            }
            yield LayerSpectrum(identity, sigma)
            done += 1
            if report is not None:
                report(done, self.total, layer.module)
        self.info.warnings.append(
            f"probe space: response to N(0, {self.probe_scale:g}^2 I) inputs through {self.activation}; "
            "not the spectrum on real inputs (see docs/activation.md)"
        )

    def fields(self) -> dict[str, Any]:
        return {"tokens": self.samples, "samples": 0, "model": None, "data": None, "probe_scale": float(self.probe_scale)}


def prepare(
    source: "str | os.PathLike[str] | Checkpoint",
    *,
    adapter: str | None = None,
    format: str = "auto",
    probe_scale: float = 1.0,
    probe_samples: int = DEFAULT_PROBE_SAMPLES,
    seed: int = 0,
    layers: Sequence[Any] | str | None = None,
) -> ProbeRun:
    """Validate the probe options and open the checkpoint.

    Args:
        source: a checkpoint path or a loaded ``Checkpoint``.
        adapter, format: as for weight space.
        probe_scale: standard deviation of the isotropic Gaussian inputs (> 0).
        probe_samples: Gaussian inputs per layer (>= 2); sampling error is ``O(sqrt(r / samples))``.
        seed: random seed (combined with each module's name).
        layers: which modules, see :func:`nora_spectra.spaces.selection.select_layers`.

    Raises:
        CheckpointError: the checkpoint is missing or malformed.
        UsageError: bad options.
    """
    if isinstance(probe_scale, bool) or not (
        isinstance(probe_scale, (int, float)) and math.isfinite(probe_scale) and probe_scale > 0
    ):
        raise UsageError(f"probe scale must be a positive number, got {probe_scale!r}")
    if isinstance(probe_samples, bool) or not isinstance(probe_samples, int) or probe_samples < 2:
        raise UsageError(f"probe samples must be an integer >= 2, got {probe_samples!r}")
    checkpoint = open_checkpoint(source, adapter, format)
    activation = checkpoint_activation(checkpoint)
    apply_activation(activation, np.zeros(1))  # validate the name before any work
    names = select_layers(list(checkpoint.modules), layers)
    kron = [entry.module for entry in getattr(checkpoint, "entries", []) if entry.module in names and entry.kind == "lokr"]
    if kron:
        raise UsageError(
            f"--space probe measures low-rank branches s * B act(A x); {kron[0]} is a LoKr (Kronecker) update: "
            "use --space weight (for a linear update the probe only estimates the same spectrum)"
        )
    return ProbeRun(checkpoint, names, activation, float(probe_scale), probe_samples, int(seed))
