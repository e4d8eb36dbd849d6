"""``resize(source, output, policy) -> Resize``: a smaller adapter whose every update is its best rank-k part.

For each module with update ``dW = s * B @ A`` (a LoRA pair), the factors' orthonormal bases are
computed once (:func:`nora_spectra.subspaces.factor_bases`: one Gram matrix per factor, the
``d_out x d_in`` matrix is never formed); the singular values come from
:func:`nora_spectra.spectrum.spectrum` applied to the ``r x r`` core ``s R_B R_A^T``, which has exactly
the update's singular values (those ``spectra analyze`` reports, to rounding) at ``O(r^3)`` cost; a
:class:`~nora_spectra.rank_policy.RankPolicy` picks ``k``, and the new factors are Eckart-Young's best
rank-``k`` approximation:

.. math:: B' = Q_B U_c[:, :k] \\, S_k^{1/2}, \\qquad A' = S_k^{1/2} \\, V_c[:, :k]^T Q_A^T,
          \\qquad s B' A' = \\Delta W_k,

with ``S_k`` the kept singular values of ``B A`` (those of ``dW`` divided by ``|s|``), so the module keeps
its scale ``s``. The errors are exact: ``||dW - dW_k||_2 = sigma_{k+1}`` and
``||dW - dW_k||_F = sqrt(sum_{i>k} sigma_i^2)``; so for every input ``x`` the layer's output moves by at
most ``sigma_{k+1} ||x||``. A module whose ``k`` equals its rank is copied byte for byte.

The checkpoint's format writes the result (its ``Format.resize`` writer, :mod:`nora_spectra.io.writing`):
PEFT directories with ``rank_pattern`` / ``alpha_pattern``, bare safetensors files; NoRA adapters and DoRA
layers are refused. Everything is computed before anything is written, and the output appears at once
(a temporary file or directory renamed into place), so a refused module or a failure leaves no output
and the input is never touched.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
from typing import TYPE_CHECKING, Any

from nora_spectra._progress import ProgressArg, progress_callback
from nora_spectra._text import name_list, plural
from nora_spectra.errors import CheckpointError, UsageError
from nora_spectra.io import load_checkpoint
from nora_spectra.io.checkpoint import materialize
from nora_spectra.io.registry import formats, get_format
from nora_spectra.io.writing import TAG_OF_NAME, ResizedModule
from nora_spectra.rank_policy import RankPolicy, make_policy, optimal_threshold, truncation
from nora_spectra.schema import RESIZE_COLUMNS, RESIZE_MODULE_FIELDS, to_jsonable
from nora_spectra.spectrum import NonFiniteFactorsError
from nora_spectra.subspaces import factor_bases
from nora_spectra.updates import LowRankUpdate

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd

    from nora_spectra.io import Checkpoint

__all__ = ["RESIZE_COLUMNS", "RESIZE_MODULE_FIELDS", "Resize", "resizable_formats", "resize"]

log = logging.getLogger(__name__)


@dataclasses.dataclass
class Resize:
    """The result of :func:`resize`: what was kept and lost per module, and the file sizes.

    In Jupyter it renders as an HTML table (``_repr_html_``); :attr:`table` is a DataFrame.

    Attributes:
        input: the checkpoint path, as given.
        output: the written path, or None for a dry run.
        format: the checkpoint format (and the output's).
        policy: the :class:`~nora_spectra.rank_policy.RankPolicy`.
        modules: one dict per module, keys :data:`RESIZE_COLUMNS`: ``rank_before``, ``rank_after``,
            ``energy_kept`` (share of ``||dW||_F^2`` kept), ``spectral_error`` (``sigma_{k+1}`` of the
            scaled update, 0 when nothing is cut), ``frobenius_error_rel`` (``||dW - dW_k||_F / ||dW||_F``),
            ``shape``, ``bytes_before`` / ``bytes_after`` (stored bytes of the module's factors; None in a
            dry run).
        summary: totals: ``modules``, ``modules_cut``, ``rank_before`` / ``rank_after`` (sums),
            ``energy_kept`` and ``frobenius_error_rel`` over the whole adapter (every module's
            ``||dW||_F^2`` summed), ``max_spectral_error``, ``bytes_before`` / ``bytes_after`` (weights
            files) and ``size_reduction`` (``1 - after / before``; None in a dry run), ``warnings``, ``notes``.
    """

    input: str
    output: str | None
    format: str
    policy: RankPolicy
    modules: list[dict[str, Any]]
    summary: dict[str, Any]

    def __len__(self) -> int:
        return len(self.modules)

    def __repr__(self) -> str:
        s = self.summary
        return (
            f"Resize(input={self.input!r}, output={self.output!r}, policy='{self.policy}', modules={s['modules']}, "
            f"rank {s['rank_before']} -> {s['rank_after']}, energy_kept={s['energy_kept']:.4f})"
        )

    @property
    def table(self) -> "pd.DataFrame":
        """:attr:`modules` as a pandas DataFrame, columns :data:`RESIZE_COLUMNS` (pandas imported on first use)."""
        import pandas as pd

        return pd.DataFrame.from_records(self.modules, columns=list(RESIZE_COLUMNS))

    def to_dict(self) -> dict[str, Any]:
        """``{"input", "output", "policy", "modules", "summary"}`` (modules: the keys of :data:`RESIZE_MODULE_FIELDS`)."""
        return to_jsonable(
            {
                "input": self.input,
                "output": self.output,
                "policy": self.policy.to_dict(),
                "modules": [{name: row[name] for name in RESIZE_MODULE_FIELDS} for row in self.modules],
                "summary": self.summary,
            }
        )

    def to_json(self, indent: int | None = 2) -> str:
        """:meth:`to_dict` as strict JSON (``allow_nan=False``)."""
        return json.dumps(self.to_dict(), indent=indent, allow_nan=False)

    def _repr_html_(self) -> str:
        from nora_spectra.render.resize import resize_html

        return resize_html(self)


def resizable_formats() -> list[str]:
    """Names of the registered formats that ``spectra resize`` can write (they have a ``resize`` writer)."""
    return [name for name, fmt in formats().items() if fmt.resize_writer is not None]


def _inside(path: str, directory: str) -> bool:
    try:
        return os.path.commonpath([path, directory]) == directory
    except ValueError:  # different drives
        return False


def _check_output(checkpoint: "Checkpoint", source: str, output: str, kind: str, overwrite: bool) -> None:
    """Refuse outputs that would touch the input, clobber something or have the wrong kind.

    Raises:
        UsageError: the output is the input, lies inside the input's directory, holds the input, exists
            without ``overwrite``, or is a file where a directory is written (or the reverse).
    """
    out = os.path.realpath(output)
    weights = os.path.realpath(checkpoint.weights_path)
    given = os.path.realpath(source)
    footprint = {given, weights} | ({os.path.dirname(weights)} if kind == "directory" else set())
    if out in footprint:
        raise UsageError(f"{output}: the output is the input checkpoint; write the resized adapter elsewhere")
    for place in sorted(footprint):
        if os.path.isdir(place) and _inside(out, place):
            raise UsageError(f"{output}: the output lies inside the input checkpoint {place}; write it elsewhere")
        if _inside(place, out):
            raise UsageError(f"{output}: the output would replace a directory holding the input {place}")
    if os.path.lexists(output):
        if not overwrite:
            raise UsageError(f"{output}: already exists; choose a new path or pass --overwrite (overwrite=True)")
        if kind == "directory" and not os.path.isdir(output):
            raise UsageError(f"{output}: a {checkpoint.format} adapter is written as a directory, but this is a file")
        if kind == "file" and os.path.isdir(output):
            raise UsageError(f"{output}: a {checkpoint.format} checkpoint is written as one file, but this is a directory")
    if kind == "directory" and output.endswith(".safetensors"):
        raise UsageError(f"{output}: a {checkpoint.format} adapter is written as a directory, not a .safetensors file")


def _dtype_tag(dtype: str | None) -> str | None:
    if dtype is None or dtype == "same":
        return None
    try:
        return TAG_OF_NAME[dtype]
    except KeyError:
        raise UsageError(f"--dtype must be same or one of {', '.join(TAG_OF_NAME)}, got {dtype!r}") from None


def resize(
    source: "str | os.PathLike[str]",
    output: "str | os.PathLike[str] | None" = None,
    *,
    rank: int | None = None,
    energy: float | None = None,
    sv_ratio: float | None = None,
    threshold: str | None = None,
    adapter: str | None = None,
    format: str | None = None,
    dtype: str | None = None,
    overwrite: bool = False,
    dry_run: bool = False,
    progress: ProgressArg = None,
) -> Resize:
    """Write a smaller adapter of the same format: every module's best rank-``k`` approximation.

    Exactly one policy: ``rank`` (uniform ``K``, never above a module's rank), ``energy`` (smallest ``k``
    keeping that share of ``||dW||_F^2``, in (0, 1]), ``sv_ratio`` (keep ``sigma_i >= sigma_1 / R``) or
    ``threshold="optimal"`` (Gavish-Donoho, see :func:`nora_spectra.rank_policy.optimal_threshold`).
    Every module keeps at least rank 1.

    Args:
        source: the checkpoint (a PEFT directory, a bare .safetensors file, ...).
        output: the new checkpoint's path (a directory for PEFT, a file for bare safetensors); it must
            not be the input, lie inside it or hold it.
        rank, energy, sv_ratio, threshold: the policy (one of them).
        adapter: a non-default adapter of ``source`` (its sub-directory).
        format: force a registered format instead of detecting it.
        dtype: dtype of the new factors: None or ``"same"`` (each tensor's stored dtype), ``"float32"``,
            ``"float64"``, ``"float16"`` or ``"bfloat16"``. Reported errors are those of the exact
            truncation; storing in a 16-bit dtype adds its rounding, as it did to the input.
        overwrite: replace an existing output.
        dry_run: compute and report everything, write nothing (``output`` may be None).
        progress: None/False, True (a tqdm bar on stderr) or a callable ``progress(done, total, module)``.

    Returns:
        The :class:`Resize` report.

    Raises:
        UsageError: no or several policies, a value out of range, ``rank`` above a module's rank, a bad
            output path, a format that cannot be written.
        CheckpointError: the input is unreadable, a NoRA adapter, has DoRA layers, or a module holds
            NaN/Inf (that module is named and nothing is written).
    """
    policy = make_policy(rank=rank, energy=energy, sv_ratio=sv_ratio, threshold=threshold)
    tag = _dtype_tag(dtype)
    if output is None and not dry_run:
        raise UsageError("resize needs an output path (-o OUT), or a dry run (--dry-run)")
    source = os.fspath(source)
    checkpoint = load_checkpoint(source, adapter, format=format or "auto")
    writer = get_format(checkpoint.format).resize
    if writer is None:
        raise UsageError(
            f"{source}: spectra resize cannot write the {checkpoint.format} format yet "
            f"(it writes {', '.join(resizable_formats())})"
        )
    writer.check(checkpoint)
    out = None if output is None else os.fspath(output)
    if out is not None and not dry_run:
        _check_output(checkpoint, source, out, writer.output, overwrite)
    if policy.name == "rank":
        for entry in checkpoint.entries:
            if policy.value > entry.rank:
                raise UsageError(
                    f"--rank {policy.value} is above the rank of module {entry.module!r} (r = {entry.rank}): "
                    "resize only lowers ranks"
                )

    rows: list[dict[str, Any]] = []
    sink = None if dry_run else writer.open(checkpoint, tag)
    floored: list[str] = []  # threshold policy: modules where no value passed the threshold
    energy_total = tail_total = 0.0
    callback, bar = progress_callback(progress, len(checkpoint.entries), unit="layer", desc="resizing")
    try:
        for i, entry in enumerate(checkpoint.entries):
            update = materialize(entry).update  # NaN/Inf bits become the error below, not numpy warnings
            if not isinstance(update, LowRankUpdate):  # pragma: no cover - writers refuse other kinds first
                raise CheckpointError(source, f"module {entry.module!r} is not a low-rank pair; it cannot be resized")
            try:
                bases = factor_bases(update.A, update.B, update.scale)  # one Gram matrix per factor
                sigma = bases.singular_values()  # exactly the update's singular values (module docstring)
            except NonFiniteFactorsError as exc:
                raise CheckpointError(
                    source, f"module {entry.module!r} has NaN or Inf factors ({exc}): cannot resize it; nothing written"
                ) from None
            k = policy.choose(sigma, shape=entry.shape, rank=entry.rank)
            if policy.name == "threshold" and sigma.size and sigma[0] <= optimal_threshold(sigma, entry.shape, entry.rank):
                floored.append(entry.module)
            cut = truncation(sigma, k)
            if sink is not None and k == entry.rank:
                sink.add(ResizedModule(entry.module, k))
            elif sink is not None:
                a_new, b_new = bases.truncated_factors(k)
                sink.add(ResizedModule(entry.module, k, a_new, b_new))  # stored in the output dtype now
                del a_new, b_new
            energy_total += cut.energy
            tail_total += cut.tail_energy
            rows.append({
                "module": entry.module, "key": entry.key, "rank_before": entry.rank, "rank_after": k,
                "energy_kept": cut.energy_kept, "spectral_error": cut.spectral_error,
                "frobenius_error_rel": cut.frobenius_error_rel, "shape": list(entry.shape),
                "bytes_before": None, "bytes_after": None,
            })
            del update, bases
            if callback is not None:
                callback(i + 1, len(checkpoint.entries), entry.module)
    finally:
        if bar is not None:
            bar.close()

    bytes_before = bytes_after = None
    notes: list[str] = []
    if sink is not None and out is not None:
        from nora_spectra.outputs import output_directory, output_stream

        if writer.output == "directory":
            with output_directory(out, "resized adapter") as tmp:
                result = sink.write(tmp)
            weights_out = os.path.join(out, result.weights or "")
        else:
            with output_stream(out, "resized checkpoint") as handle:
                result = sink.write(handle)
            weights_out = out
        notes.extend(result.notes)
        for row in rows:
            row["bytes_before"], row["bytes_after"] = result.module_bytes[row["module"]]
        bytes_before = os.path.getsize(checkpoint.weights_path)
        bytes_after = os.path.getsize(weights_out)
    warnings = list(checkpoint.warnings)
    if floored:
        warnings.append(
            f"{plural(len(floored), 'module')} had no singular value above the Gavish-Donoho threshold (a flat "
            f"spectrum: no signal separates from the noise it assumes) and kept the minimum rank 1: {name_list(floored)}"
        )
    summary = {
        "modules": len(rows),
        "modules_cut": sum(1 for row in rows if row["rank_after"] < row["rank_before"]),
        "rank_before": sum(row["rank_before"] for row in rows),
        "rank_after": sum(row["rank_after"] for row in rows),
        "energy_kept": 1.0 if energy_total == 0 else 1.0 - tail_total / energy_total,
        "frobenius_error_rel": 0.0 if energy_total == 0 else math.sqrt(tail_total / energy_total),
        "max_spectral_error": max((row["spectral_error"] for row in rows), default=0.0),
        "bytes_before": bytes_before,
        "bytes_after": bytes_after,
        "size_reduction": None if not bytes_before or bytes_after is None else 1.0 - bytes_after / bytes_before,
        "warnings": warnings,
        "notes": notes,
    }
    log.debug("%s: resized %d modules (%s)", source, len(rows), policy)
    return Resize(input=source, output=None if dry_run else out, format=checkpoint.format, policy=policy,
                  modules=rows, summary=summary)

