"""``to_jsonable``: strict-JSON values from numpy scalars and arrays, tuples and non-finite floats.

Torch-free; shared by the trainer's ``metrics.jsonl`` and by every JSON that ``nora_spectra`` writes.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

__all__ = ["integral_number", "to_jsonable"]


def to_jsonable(value: Any) -> Any:
    """Convert numpy scalars/arrays, tuples and non-finite floats into strict-JSON values (NaN/Inf -> None).

    Mappings get string keys; lists and tuples become lists; anything else unknown becomes its ``str``.
    """
    if isinstance(value, Mapping):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_jsonable(v) for v in value]
    if isinstance(value, (bool, str)) or value is None:
        return value
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    tolist = getattr(value, "tolist", None)  # numpy arrays and scalars
    if tolist is not None:
        return to_jsonable(tolist())
    return str(value)


def integral_number(value: float) -> float | int:
    """An integral float as an int (``lora_alpha: 16``, not ``16.0``), else the float (exactly representable
    integers only: below 2**53)."""
    return int(value) if float(value).is_integer() and abs(value) < 2**53 else float(value)
