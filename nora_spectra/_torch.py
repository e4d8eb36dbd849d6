"""torch is an optional dependency of nora_spectra: the features that need it say so in one line.

The weight-space analysis of safetensors checkpoints, ``spectra check`` and ``spectra report`` need
no torch. Activation space, ``.bin`` checkpoints, ``spectra demo`` and spectral tracking do; without
it they raise :class:`~nora_spectra.errors.UsageError` (exit code 2) naming the extra to install.
"""

from __future__ import annotations

from types import ModuleType

from nora_spectra.errors import UsageError

__all__ = ["INSTALL_HINT", "require_torch"]

#: how to get torch, in every message about it.
INSTALL_HINT = "pip install 'nora-spectra[torch]' (the CPU build: pip install torch --index-url https://download.pytorch.org/whl/cpu)"


def require_torch(feature: str) -> ModuleType:
    """Import and return torch, or raise a one-line :class:`UsageError` saying ``feature`` needs it.

    Args:
        feature: what needs torch, e.g. ``"--space activation"``.
    """
    try:
        import torch
    except ImportError:
        raise UsageError(f"{feature} needs torch, which is not installed: {INSTALL_HINT}") from None
    return torch
