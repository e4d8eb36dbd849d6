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
from typing import TYPE_CHECKING, Any, Callable, Sequence

import numpy as np
from numpy.typing import ArrayLike
from scipy.special import erfc, expit

from nora_spectra.analysis import progress_callback
from nora_spectra.activation import ActivationAnalysis, CentredFactor, centred_spectrum, select_layers, spectrum_record
from nora_spectra.errors import UsageError
from nora_spectra.spectrum import NonFiniteFactorsError
from nora_spectra.summary import summarize

if TYPE_CHECKING:  # pragma: no cover
    from nora_spectra.io import Checkpoint

__all__ = [
    "ACTIVATIONS",
    "DEFAULT_PROBE_SAMPLES",
    "apply_activation",
    "checkpoint_activation",
    "probe_response_singular_values",
    "probe_layer",
    "probe_spectra",
]

#: default number of Gaussian inputs per layer.
DEFAULT_PROBE_SAMPLES = 4096

#: rows drawn and reduced at a time (bounds memory at ``_CHUNK * d_in`` floats).
_CHUNK = 1024


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
    X = np.asarray(X, dtype=np.float64)
    if X.ndim != 2 or X.shape[1] != A.shape[1]:
        raise ValueError(f"inputs must be (n, {A.shape[1]}), got {X.shape}")
    factor = CentredFactor(A.shape[0])
    for start in range(0, X.shape[0], _CHUNK):
        factor.update(apply_activation(activation, X[start : start + _CHUNK] @ A.T))
    return centred_spectrum(factor, np.asarray(B, dtype=np.float64), scale)


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
    factor = CentredFactor(A.shape[0])
    for start in range(0, samples, _CHUNK):
        m = min(_CHUNK, samples - start)
        X = rng.standard_normal((m, A.shape[1])) * probe_scale  # (m, d_in)
        factor.update(apply_activation(activation, X @ A.T))  # (m, r)
    return centred_spectrum(factor, np.asarray(B, dtype=np.float64), scale) / math.sqrt(samples - 1)


def _layer_seed(seed: int, module: str) -> list[int]:
    """Per-module seed, so a layer's probe does not depend on which other layers are selected."""
    return [int(seed), zlib.crc32(module.encode("utf-8"))]


def probe_spectra(
    checkpoint: "str | os.PathLike[str] | Checkpoint",
    *,
    probe_scale: float = 1.0,
    samples: int = DEFAULT_PROBE_SAMPLES,
    seed: int = 0,
    layers: Sequence[Any] | str | None = None,
    adapter: str | None = None,
    collapse_threshold: float = 0.25,
    progress: bool | Callable[[int, int, str], None] | None = None,
) -> ActivationAnalysis:
    """Probe-space spectra of every adapter branch of a checkpoint (no model, no data).

    Args:
        checkpoint: a checkpoint path (read with :func:`nora_spectra.io.load_checkpoint`) or a loaded
            ``Checkpoint``.
        probe_scale: standard deviation of the isotropic Gaussian inputs (> 0).
        samples: Gaussian inputs per layer (>= 2); sampling error is ``O(sqrt(r / samples))``.
        seed: random seed (combined with each module's name).
        layers: which modules, see :func:`nora_spectra.activation.select_layers`.
        adapter: non-default adapter sub-directory (with a path).
        collapse_threshold: utilization below which a layer is flagged ``collapsed``.
        progress: True for a tqdm bar, or a callable ``(done, total, module)``.

    Returns:
        An :class:`~nora_spectra.activation.ActivationAnalysis` with ``space == "probe"``; singular
        values are normalised by ``sqrt(samples - 1)``.

    Raises:
        CheckpointError: the checkpoint is missing or malformed.
        UsageError: bad options.
    """
    if not (isinstance(probe_scale, (int, float)) and math.isfinite(probe_scale) and probe_scale > 0):
        raise UsageError(f"probe scale must be a positive number, got {probe_scale!r}")
    if isinstance(samples, bool) or not isinstance(samples, int) or samples < 2:
        raise UsageError(f"probe samples must be an integer >= 2, got {samples!r}")
    if hasattr(checkpoint, "iter_layers"):
        ckpt = checkpoint
    else:
        from nora_spectra.io import load_checkpoint

        ckpt = load_checkpoint(checkpoint, adapter=adapter)
    activation = checkpoint_activation(ckpt)
    apply_activation(activation, np.zeros(1))  # validate the name before any work
    names = select_layers(list(ckpt.modules), layers)
    wanted = set(names)
    callback, bar = progress_callback(progress, len(names), desc="probing")
    records = []
    try:
        for layer in ckpt.iter_layers():
            if layer.module not in wanted:
                continue
            rng = np.random.default_rng(_layer_seed(seed, layer.module))
            try:
                sigma = probe_layer(
                    layer.A, layer.B, layer.scale, activation, probe_scale=probe_scale, samples=samples, rng=rng
                )
            except NonFiniteFactorsError:
                sigma = None
            records.append(
                spectrum_record(
                    module=layer.module,
                    kind=layer.kind,
                    rank=layer.rank,
                    scale=layer.scale,
                    shape=(layer.shape[0], samples),
                    sigma=sigma,
                    space="probe",
                    tokens=samples,
                    dtype=layer.dtype,
                    collapse_threshold=collapse_threshold,
                    layer_type=layer.layer_type,
                )
            )
            if callback is not None:
                callback(len(records), len(names), layer.module)
    finally:
        if bar is not None:
            bar.close()
    messages = list(getattr(ckpt, "warnings", None) or [])
    messages.append(
        f"probe space: response to N(0, {probe_scale:g}^2 I) inputs through {activation}; "
        "not the spectrum on real inputs (see docs/activation.md)"
    )
    return ActivationAnalysis(
        checkpoint=os.fspath(ckpt.path),
        format=str(ckpt.format),
        method=str(ckpt.method),
        records=records,
        summary=summarize(records),
        config=getattr(ckpt, "config", None),
        warnings=messages,
        skipped=[(str(n), str(r)) for n, r in (getattr(ckpt, "skipped", None) or [])],
        collapse_threshold=collapse_threshold,
        space="probe",
        tokens=samples,
        samples=0,
        model=None,
        data=None,
        probe_scale=float(probe_scale),
    )
