"""nora_spectra: per-layer singular-value spectra and rank-utilization diagnostics of adapters.

Public names are imported lazily (PEP 562): ``import nora_spectra`` loads neither torch nor pandas.
"""

from nora_core._lazy import lazy_getattr

_EXPORTS = {
    "SpectraError": "errors",
    "CheckpointError": "errors",
    "adapter_singular_values": "spectrum",
    "spectrum_metrics": "metrics",
    "UsageError": "errors",
    "load_checkpoint": "io",
    "analyze": "analysis",
    "activation_spectra": "analysis",
    "probe_spectra": "analysis",
    "Analysis": "result",
    "compare": "comparison",
    "Comparison": "comparison",
    "check": "gates",
    "CheckResult": "gates",
    "resize": "resize",
    "Resize": "resize",
    "suggest": "suggest",
    "Suggestion": "suggest",
    "overlap": "overlap",
    "Overlap": "overlap",
    "load_scan": "scan",
}

__all__ = sorted(_EXPORTS)
__getattr__ = lazy_getattr(__name__, _EXPORTS)


def __dir__() -> list[str]:
    return __all__
