"""``overlap(a, b) -> Overlap``: how much two adapters' updates share their singular subspaces, module by module.

For a module present in both adapters (matched by name; ranks may differ), with ``U_a``, ``U_b`` the left
singular vectors of the two updates (from the factored SVD, :func:`nora_spectra.subspaces.factored_svd`:
``U = Q_B U_c``, never a dense ``d_out x d_in`` matrix) and ``M = U_a^T U_b``:

* the LoRA paper's normalised subspace similarity (Hu et al. 2021, Sec. 7, Fig. 3),

  .. math:: \\phi(i, j) = \\frac{\\|U_a[:, :i]^T U_b[:, :j]\\|_F^2}{\\min(i, j)} \\in [0, 1],

  for every ``i <= n_a``, ``j <= n_b`` (``n`` the numerical rank: directions with a zero singular value
  have no meaning and are left out);
* the principal angles between the top-``k`` subspaces, ``arccos`` of the singular values of
  ``M[:k, :k]`` (``k = min(n_a, n_b)``, or ``top_k``);
* the one-number summary ``left_overlap``: the mean squared cosine of those angles, which equals
  ``phi(k, k)``: 1 when the subspaces coincide, 0 when orthogonal; two random ``k``-dimensional
  subspaces of ``R^d`` give ``k / d`` on average (``chance_left``, ``d = d_out``).

The same with the right singular vectors (``V^T = V_c^T Q_A^T``, ``d = d_in``) gives ``right_overlap``.
Numerical ranks come from :func:`nora_spectra.metrics.numerical_rank` of the spectrum
(:func:`nora_spectra.spectrum.spectrum` of the ``r x r`` core, which has the update's singular values). Uses: one task at r = 8 and r = 64 (do the top directions
agree?), two seeds, or two tasks before a merge (a high overlap means their updates write into the same
directions: interference risk).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from nora_spectra._progress import ProgressArg, progress_callback
from nora_spectra.errors import UsageError
from nora_spectra.io import load_checkpoint
from nora_spectra.io.checkpoint import materialize
from nora_spectra.labels import default_labels
from nora_spectra.metrics import numerical_rank
from nora_spectra.schema import OVERLAP_COLUMNS, layer_index, module_type, to_jsonable
from nora_spectra.spectrum import NonFiniteFactorsError
from nora_spectra.subspaces import FactoredSVD, factor_bases
from nora_spectra.updates import HadamardUpdate, LowRankUpdate

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd
    from matplotlib.figure import Figure

    from nora_spectra.io import Checkpoint, ModuleUpdate

__all__ = ["OVERLAP_COLUMNS", "Overlap", "overlap", "phi_matrix"]


def phi_matrix(m: np.ndarray) -> np.ndarray:
    """``phi(i, j) = ||m[:i, :j]||_F^2 / min(i, j)`` for every ``i``, ``j`` (1-based), from ``m = U_a^T U_b``.

    Args:
        m: ``(n_a, n_b)`` inner products of two orthonormal bases.

    Returns:
        ``(n_a, n_b)`` float64, entry ``[i - 1, j - 1]`` is ``phi(i, j)``, clipped to [0, 1].
    """
    squares = np.cumsum(np.cumsum(m * m, axis=0), axis=1)
    i = np.arange(1, m.shape[0] + 1)[:, None]
    j = np.arange(1, m.shape[1] + 1)[None, :]
    return np.clip(squares / np.minimum(i, j), 0.0, 1.0)


@dataclasses.dataclass
class Overlap:
    """Subspace overlap of two adapters, module by module.

    Attributes:
        labels: the two adapters' labels (``a`` first).
        checkpoints: their paths.
        top_k: the ``k`` asked for (None: ``min(n_a, n_b)`` per module).
        modules: one dict per module present in both, keys :data:`OVERLAP_COLUMNS`: ``status`` (``ok``,
            ``zero``, ``non_finite``, ``shape_mismatch``, ``unsupported``), ``k``, ``left_overlap`` /
            ``right_overlap`` (mean squared cosine of the top-``k`` principal angles, ``= phi(k, k)``),
            ``chance_left`` / ``chance_right`` (``k / d``: the expectation for random subspaces),
            ``left_angles`` / ``right_angles`` (degrees, ascending); None where not computed.
        only_in: module -> the label of the only adapter that has it.
        summary: ``modules`` (compared), ``mean_left_overlap``, ``mean_right_overlap`` and
            ``by_module_type`` (the same means per type).
        phi: module -> ``{"left": (n_a, n_b) array, "right": ...}`` (:func:`phi_matrix`).
    """

    labels: list[str]
    checkpoints: list[str]
    top_k: int | None
    modules: list[dict[str, Any]]
    only_in: dict[str, str]
    summary: dict[str, Any]
    phi: dict[str, dict[str, np.ndarray]] = dataclasses.field(repr=False, default_factory=dict)

    def __len__(self) -> int:
        return len(self.modules)

    def __repr__(self) -> str:
        mean = self.summary.get("mean_left_overlap")
        shown = "None" if mean is None else f"{mean:.4f}"
        return (f"Overlap(a={self.labels[0]!r}, b={self.labels[1]!r}, modules={len(self.modules)}, "
                f"mean_left_overlap={shown}, only_in_one={len(self.only_in)})")

    @property
    def table(self) -> "pd.DataFrame":
        """:attr:`modules` as a DataFrame, columns :data:`OVERLAP_COLUMNS` (pandas imported on first use)."""
        import pandas as pd

        return pd.DataFrame.from_records(self.modules, columns=list(OVERLAP_COLUMNS))

    def phi_of(self, module: str, side: str = "left") -> np.ndarray:
        """The ``phi(i, j)`` matrix of one module (``side`` ``"left"`` or ``"right"``).

        Raises:
            KeyError: the module was not compared (absent from one adapter, or not ``ok``).
            ValueError: an unknown side.
        """
        if side not in ("left", "right"):
            raise ValueError(f"side must be 'left' or 'right', got {side!r}")
        return self.phi[module][side]

    def to_dict(self) -> dict[str, Any]:
        """Strict-JSON form: ``a``, ``b``, ``top_k``, ``modules``, ``only_in``, ``summary`` (phi matrices left out)."""
        return to_jsonable({
            "a": {"label": self.labels[0], "checkpoint": self.checkpoints[0]},
            "b": {"label": self.labels[1], "checkpoint": self.checkpoints[1]},
            "top_k": self.top_k,
            "modules": self.modules,
            "only_in": [{"module": m, "label": label} for m, label in self.only_in.items()],
            "summary": self.summary,
        })

    def to_json(self, indent: int | None = 2) -> str:
        """:meth:`to_dict` as strict JSON."""
        return json.dumps(self.to_dict(), indent=indent, allow_nan=False)

    def plot_phi(self, module: str | None = None, **options: Any) -> "Figure":
        """The phi heat map of one module (:func:`nora_spectra.plots.phi_heatmap`; default: the first compared)."""
        from nora_spectra.plots import phi_heatmap

        return phi_heatmap(self, module, **options)

    def plot_overlap(self, **options: Any) -> "Figure":
        """Per-module bars of the overlap (:func:`nora_spectra.plots.overlap_bars`)."""
        from nora_spectra.plots import overlap_bars

        return overlap_bars(self, **options)

    def _repr_html_(self) -> str:
        from nora_spectra.render.overlap import overlap_html

        return overlap_html(self)


def _low_rank(update: Any) -> LowRankUpdate | None:
    if isinstance(update, LowRankUpdate):
        return update
    if isinstance(update, HadamardUpdate):
        u, v = update.factors()
        return LowRankUpdate(v, u, update.scale)
    return None


def _basis(layer: "ModuleUpdate") -> tuple[str, FactoredSVD | None, int]:
    """``(status, factored SVD, numerical rank)`` of one module's update."""
    update = _low_rank(layer.update)
    if update is None:
        return "unsupported", None, 0
    try:
        bases = factor_bases(update.A, update.B, update.scale)
        values = bases.singular_values()  # the update's singular values, from its r x r core
    except NonFiniteFactorsError:
        return "non_finite", None, 0
    n = numerical_rank(values, layer.shape)
    if n == 0:
        return "zero", None, 0
    return "ok", bases.svd(n), n


def _angles(m: np.ndarray) -> list[float]:
    cosines = np.clip(np.linalg.svd(m, compute_uv=False), 0.0, 1.0)
    return sorted(float(math.degrees(math.acos(c))) for c in cosines)


def _mean(values: Sequence[float | None]) -> float | None:
    finite = [v for v in values if v is not None]
    return math.fsum(finite) / len(finite) if finite else None


def _summary(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    ok = [row for row in rows if row["status"] == "ok"]
    groups: dict[str, list[dict[str, Any]]] = {}
    for row in ok:
        groups.setdefault(row["module_type"], []).append(row)
    return {
        "modules": len(rows),
        "compared": len(ok),
        "mean_left_overlap": _mean([row["left_overlap"] for row in ok]),
        "mean_right_overlap": _mean([row["right_overlap"] for row in ok]),
        "by_module_type": {
            name: {"modules": len(group), "mean_left_overlap": _mean([r["left_overlap"] for r in group]),
                   "mean_right_overlap": _mean([r["right_overlap"] for r in group])}
            for name, group in groups.items()
        },
    }


def _open(item: Any, adapter: str | None, fmt: str | None) -> "Checkpoint":
    from nora_spectra.io import Checkpoint

    if isinstance(item, Checkpoint):
        return item
    return load_checkpoint(os.fspath(item), adapter, format=fmt or "auto")


def overlap(
    a: "str | os.PathLike[str] | Checkpoint",
    b: "str | os.PathLike[str] | Checkpoint",
    *,
    top_k: int | None = None,
    labels: Sequence[str] | None = None,
    adapter: str | None = None,
    format: str | None = None,
    progress: ProgressArg = None,
) -> Overlap:
    """Subspace overlap of two adapters module by module (definitions: module docstring).

    Args:
        a, b: checkpoints (anything :func:`nora_spectra.io.load_checkpoint` reads) or loaded
            :class:`~nora_spectra.io.Checkpoint` s.
        top_k: compare the top ``k`` directions (capped per module at ``min(n_a, n_b)``); None for all.
        labels: two labels (default: short names from the paths).
        adapter: a non-default adapter name used for both.
        format: force a registered format for both.
        progress: None/False, True (a tqdm bar) or a callable ``progress(done, total, module)``.

    Returns:
        The :class:`Overlap`.

    Raises:
        UsageError: ``top_k`` < 1, not two labels, or no module in common.
        CheckpointError: a checkpoint is missing or unreadable.
    """
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise UsageError(f"--top-k must be an integer >= 1, got {top_k!r}")
    first, second = _open(a, adapter, format), _open(b, adapter, format)
    names = [first.path, second.path]
    labels = default_labels(names, [first.adapter, second.adapter]) if labels is None else [str(x) for x in labels]
    if len(labels) != 2:
        raise UsageError(f"overlap compares two adapters: got {len(labels)} labels")
    entries_a = {entry.module: entry for entry in first.entries}
    entries_b = {entry.module: entry for entry in second.entries}
    common = [entry.module for entry in first.entries if entry.module in entries_b]
    only_in = {entry.module: labels[0] for entry in first.entries if entry.module not in entries_b}
    only_in.update({entry.module: labels[1] for entry in second.entries if entry.module not in entries_a})
    if not common:
        raise UsageError(f"{first.path} and {second.path} have no adapted module in common (modules are matched by name)")
    rows: list[dict[str, Any]] = []
    phi: dict[str, dict[str, np.ndarray]] = {}
    callback, bar = progress_callback(progress, len(common), unit="layer", desc="overlap")
    try:
        for done, module in enumerate(common, start=1):
            la, lb = materialize(entries_a[module]), materialize(entries_b[module])  # by name, not a scan per module
            row: dict[str, Any] = dict.fromkeys(OVERLAP_COLUMNS)
            row.update(module=module, module_type=module_type(module), layer_index=layer_index(module),
                       shape=[int(n) for n in la.shape], rank_a=la.rank, rank_b=lb.rank)
            if tuple(la.shape) != tuple(lb.shape):
                row["status"] = "shape_mismatch"
            else:
                (status_a, svd_a, n_a), (status_b, svd_b, n_b) = _basis(la), _basis(lb)
                statuses = {status_a, status_b} - {"ok"}
                row["status"] = next((s for s in ("non_finite", "unsupported", "zero") if s in statuses), "ok")
                if row["status"] == "ok":
                    assert svd_a is not None and svd_b is not None
                    left = svd_a.left.T @ svd_b.left  # (n_a, n_b)
                    right = svd_a.right @ svd_b.right.T
                    k = min(n_a, n_b, top_k or n_a)
                    phi_left, phi_right = phi_matrix(left), phi_matrix(right)
                    phi[module] = {"left": phi_left, "right": phi_right}
                    row.update(k=k, left_overlap=float(phi_left[k - 1, k - 1]),
                               right_overlap=float(phi_right[k - 1, k - 1]),
                               chance_left=k / la.shape[0], chance_right=k / la.shape[1],
                               left_angles=_angles(left[:k, :k]), right_angles=_angles(right[:k, :k]))
            rows.append(row)
            if callback is not None:
                callback(done, len(common), module)
    finally:
        if bar is not None:
            bar.close()
    return Overlap(labels=labels, checkpoints=names, top_k=top_k, modules=rows, only_in=only_in,
                   summary=_summary(rows), phi=phi)

