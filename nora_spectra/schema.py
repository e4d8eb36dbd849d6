"""The shape of nora_spectra's data: record columns, statuses, spaces and shared defaults.

Every layer of the package imports its constants from here (this module imports nothing of the
package), so a column list or a default such as the collapse threshold is written exactly once.
Formulas and the meaning of each field: ``docs/metrics.md``.
"""

from __future__ import annotations

import re
from typing import Any

from nora_core.jsonable import dumps_indented, to_jsonable

__all__ = [
    "ACTIVATION_COLUMNS",
    "AVERAGED_STATUSES",
    "BASE_COLUMNS",
    "BASE_FIELDS",
    "COMPARED_METRICS",
    "COMPARISON_GROUP_COLUMNS",
    "COMPARISON_ROW_COLUMNS",
    "DEFAULT_COLLAPSE_THRESHOLD",
    "DEFAULT_INTRUDER_EPS",
    "DEFAULT_INTRUDER_K",
    "DEFAULT_PROBE_SAMPLES",
    "DEFAULT_TOP_K",
    "DORA_PROXY_WARNING",
    "DORA_PROXY_WARNING_PREFIX",
    "EXACT_SVD_MAX_DIM",
    "INTRUDER_COLUMNS",
    "LAYER_COLUMNS",
    "MODEL_CLASSES",
    "OPTIONAL_COLUMNS",
    "OVERLAP_COLUMNS",
    "RESIZE_COLUMNS",
    "RESIZE_MODULE_FIELDS",
    "SCAN_ADAPTER_COLUMNS",
    "SCAN_LAYER_COLUMNS",
    "SCAN_STATUSES",
    "SPACES",
    "SPACE_COLUMNS",
    "SPECTRUM_COLUMNS",
    "STATUSES",
    "SUGGEST_COLUMNS",
    "SUMMARY_METRICS",
    "json_text",
    "layer_index",
    "module_type",
    "to_jsonable",
]

#: A layer whose utilization (effective_rank / r) is below this is flagged ``collapsed``.
DEFAULT_COLLAPSE_THRESHOLD = 0.25

#: Gaussian inputs per layer of a probe-space spectrum (``--probe-samples``).
DEFAULT_PROBE_SAMPLES = 4096

#: dense updates (full fine-tunes, DoRA's true update) with ``min(d_out, d_in)`` above this get only their
#: leading :data:`DEFAULT_TOP_K` singular values (randomized SVD with an error bound) unless ``--top-k`` says
#: otherwise; smaller ones get an exact SVD.
EXACT_SVD_MAX_DIM = 1024

#: leading singular values computed for a large dense update by default (``--top-k``).
DEFAULT_TOP_K = 64

#: intruder dimensions: leading directions tested (``--intruder-k``) and the cosine threshold
#: (``--intruder-eps``), Shuttleworth et al. (2024) and PEFT's defaults.
DEFAULT_INTRUDER_K = 10
DEFAULT_INTRUDER_EPS = 0.5

#: the reader warning of a checkpoint with DoRA layers analysed without the base weight (the proxy
#: ``s * B @ A``); a base-aware analysis that computes the true update replaces it.
DORA_PROXY_WARNING = "DoRA layers: spectra are of the direction update B A only (magnitude vector not included)"

#: how every reader's proxy warning for DoRA layers starts (each names its format's magnitude tensor).
DORA_PROXY_WARNING_PREFIX = "DoRA layers: spectra are of the direction update"

#: the spaces a spectrum can be measured in (``analyze(..., space=...)``).
SPACES: tuple[str, ...] = ("weight", "activation", "probe")

#: keys of every weight-space layer record and columns of ``Analysis.layers``, in order.
LAYER_COLUMNS: tuple[str, ...] = (
    "module",
    "key",
    "module_type",
    "layer_index",
    "kind",
    "layer_type",
    "dtype",
    "rank",
    "scale",
    "shape",
    "status",
    "collapsed",
    "effective_rank",
    "utilization",
    "stable_rank",
    "energy_rank_90",
    "energy_rank_99",
    "numerical_rank",
    "spectral_entropy",
    "participation_ratio",
    "sigma_max",
    "frobenius_norm",
    "tail_energy",
    "singular_values",
)

#: columns of weight-space records whose spectrum may be truncated (an analysis with ``base`` or
#: ``top_k``, or a full fine-tune): how many leading values were computed and how accurately.
SPECTRUM_COLUMNS: tuple[str, ...] = ("top_k", "captured_energy", "sigma_error_bound")

#: columns of base-aware records (``base`` given): the base tensor and the update's size relative to it.
BASE_COLUMNS: tuple[str, ...] = ("base_tensor", "relative_sigma_max", "relative_frobenius_norm")

#: columns of records with intruder dimensions (``intruders=True``).
INTRUDER_COLUMNS: tuple[str, ...] = ("intruders", "intruder_indices", "intruder_max_cos")

#: columns a weight-space record has only in some analyses, in the order they follow :data:`LAYER_COLUMNS`.
OPTIONAL_COLUMNS: tuple[str, ...] = SPECTRUM_COLUMNS + BASE_COLUMNS + INTRUDER_COLUMNS

#: the fields a base-aware or truncated analysis adds to its JSON, in order.
BASE_FIELDS: tuple[str, ...] = ("base", "top_k", "intruder_k", "intruder_eps")

#: the columns activation- and probe-space records add after :data:`LAYER_COLUMNS`.
SPACE_COLUMNS: tuple[str, ...] = ("space", "tokens")

#: keys of an activation- or probe-space record.
ACTIVATION_COLUMNS: tuple[str, ...] = LAYER_COLUMNS + SPACE_COLUMNS

#: every status a layer record can carry, in display order.
STATUSES: tuple[str, ...] = ("ok", "dora_direction_only", "zero", "non_finite")

#: statuses whose metrics enter means, medians and weighted means.
AVERAGED_STATUSES: frozenset[str] = frozenset({"ok", "dora_direction_only", "zero"})

#: per-layer metrics summarised (in this order).
SUMMARY_METRICS: tuple[str, ...] = (
    "effective_rank",
    "utilization",
    "stable_rank",
    "energy_rank_90",
    "tail_energy",
    "spectral_entropy",
)

#: per-module metrics compared (values copied from the records; ``d_<name>`` is the difference).
COMPARED_METRICS: tuple[str, ...] = ("effective_rank", "utilization", "sigma_max")

#: columns of ``Comparison.table`` (one row per module and checkpoint), in order.
COMPARISON_ROW_COLUMNS: tuple[str, ...] = (
    "module",
    "module_type",
    "layer_index",
    "label",
    "present",
    "kind",
    "rank",
    "rank_differs",
    "status",
    "collapsed",
    "effective_rank",
    "utilization",
    "sigma_max",
    "d_effective_rank",
    "d_utilization",
    "d_sigma_max",
)

#: columns of the group tables (by module type, by layer), in order.
COMPARISON_GROUP_COLUMNS: tuple[str, ...] = (
    "group",
    "label",
    "layers",
    "analysed",
    "collapsed",
    "mean_effective_rank",
    "mean_utilization",
    "weighted_utilization",
    "d_mean_effective_rank",
    "d_mean_utilization",
    "d_weighted_utilization",
)

#: keys of each module object of ``spectra resize --format json`` (exactly these, in this order).
RESIZE_MODULE_FIELDS: tuple[str, ...] = (
    "module",
    "key",
    "rank_before",
    "rank_after",
    "energy_kept",
    "spectral_error",
    "frobenius_error_rel",
)

#: columns of ``Resize.table`` (one row per module): the JSON fields, then shape and stored bytes.
RESIZE_COLUMNS: tuple[str, ...] = RESIZE_MODULE_FIELDS + ("shape", "bytes_before", "bytes_after")

#: columns of ``Suggestion.table`` (one row per module), in order.
SUGGEST_COLUMNS: tuple[str, ...] = (
    "module",
    "module_type",
    "layer_index",
    "rank",
    "status",
    "energy_rank",
    "energy_curve",
    "saturated",
    "collapsed",
    "suggested_rank",
    "predicted_utilization",
)

#: columns of ``Overlap.table`` (one row per module present in both adapters), in order.
OVERLAP_COLUMNS: tuple[str, ...] = (
    "module",
    "module_type",
    "layer_index",
    "shape",
    "rank_a",
    "rank_b",
    "status",
    "k",
    "left_overlap",
    "right_overlap",
    "chance_left",
    "chance_right",
    "left_angles",
    "right_angles",
)

#: statuses of an adapter row of a scan (``spectra scan``): analysed, or the one-line reason it was not.
SCAN_STATUSES: tuple[str, ...] = ("ok", "error")

#: columns of a scan's ``adapters.parquet``, in order (manifest metadata columns follow them).
SCAN_ADAPTER_COLUMNS: tuple[str, ...] = (
    ("path", "format", "method", "base_model", "r", "modules", "analysed", "collapsed", "total_rank")
    + tuple(f"mean_{name}" for name in SUMMARY_METRICS)
    + ("weighted_utilization", "skipped", "warnings", "status", "error", "seconds", "size", "mtime", "content_key")
)

#: columns of a scan's ``layers.parquet``: the adapter's ``path``, then every layer column of ``analyze``.
SCAN_LAYER_COLUMNS: tuple[str, ...] = ("path",) + LAYER_COLUMNS

_INTEGER = re.compile(r"^\d+$")


def module_type(module: str) -> str:
    """The last dotted component of a module name: ``model.layers.3.self_attn.q_proj`` -> ``q_proj``."""
    return module.rsplit(".", 1)[-1]


def layer_index(module: str) -> int | None:
    """The first all-digit dotted component of a module name (``model.layers.3.mlp.up_proj`` -> 3), else None."""
    for part in module.split("."):
        if _INTEGER.match(part):
            return int(part)
    return None


def json_text(items: list[dict[str, Any]], *, several: bool, indent: int | None = 2) -> str:
    """The JSON document of one or several analyses: the object itself, or ``{"checkpoints": [...]}``.

    Args:
        items: the analyses' ``to_dict()`` forms.
        several: nest them under ``"checkpoints"`` (also for a list of one).
        indent: JSON indentation.

    Returns:
        Strict JSON (``allow_nan=False``), newline-terminated.
    """
    data: Any = {"checkpoints": items} if several else items[0]
    return dumps_indented(data, indent) + "\n"


#: ``--model-class`` name -> transformers auto class (:mod:`nora_spectra.model_loading`; here so that the
#: CLI can offer the choices without importing the loader).
MODEL_CLASSES: dict[str, str] = {
    "causal-lm": "AutoModelForCausalLM",
    "encoder": "AutoModel",
    "sequence-classification": "AutoModelForSequenceClassification",
    "token-classification": "AutoModelForTokenClassification",
    "question-answering": "AutoModelForQuestionAnswering",
    "encoder-decoder": "AutoModelForSeq2SeqLM",
}
