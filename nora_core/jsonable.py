"""``to_jsonable``: strict-JSON values from numpy scalars and arrays, tuples and non-finite floats;
``dumps_indented``: ``json.dumps(value, indent=n, allow_nan=False)``, byte for byte, at C-encoder speed.

Torch-free; shared by the trainer's ``metrics.jsonl`` and by every JSON that ``nora_spectra`` writes.
"""

from __future__ import annotations

import json
import math
from json.encoder import encode_basestring_ascii
from typing import Any, Callable, Mapping

__all__ = ["dumps_indented", "integral_number", "to_jsonable"]


def to_jsonable(value: Any) -> Any:
    """Convert numpy scalars/arrays, tuples and non-finite floats into strict-JSON values (NaN/Inf -> None).

    Mappings get string keys; lists and tuples become lists; anything else unknown becomes its ``str``.
    """
    kind = type(value)  # the exact built-in types first: an analysis holds thousands of them
    if kind is float:
        return value if math.isfinite(value) else None
    if kind is str or kind is int or kind is bool or value is None:
        return value
    if kind is dict:
        return {k if type(k) is str else str(k): to_jsonable(v) for k, v in value.items()}
    if kind is list:
        return [to_jsonable(v) for v in value]
    if isinstance(value, Mapping):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_jsonable(v) for v in value]
    if isinstance(value, (bool, str)):
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


def dumps_indented(value: Any, indent: "int | str | None" = 2) -> str:
    """``json.dumps(value, indent=indent, allow_nan=False)``, the same text, about twice as fast.

    The standard library encodes indented JSON in pure Python, one generator step per token (its C
    encoder serves only ``indent=None``): 13-16 ms for the 224-module analysis of a Llama-2-7B LoRA,
    half of ``spectra analyze --format json``'s rendering. This walks the value once, joining each
    container's lines; strings go through the C ``encode_basestring_ascii`` and numbers through ``float.__repr__``
    / ``int.__repr__``, as in the standard encoder (``ensure_ascii``, separators ``", "`` / ``": "``
    turned ``","`` / ``": "`` by the indentation, keys of any JSON scalar type, no sorting).

    Args:
        value: dicts, lists, tuples, str, int, float, bool and None (subclasses included), nested.
        indent: spaces per level; None gives compact JSON (``json.dumps``'s C encoder). A string indent,
            and nesting deeper than this walk recurses, are left to ``json.dumps`` too.

    Returns:
        The JSON text (no trailing newline).

    Raises:
        ValueError: a NaN or infinite float (strict JSON), or a container nested inside itself.
        TypeError: a value or key of another type.
    """
    if not isinstance(indent, int):
        return json.dumps(value, indent=indent, allow_nan=False)
    try:
        return _text(value, "\n", " " * indent, set())
    except RecursionError:  # json.dumps recurses once per level, this walk twice
        return json.dumps(value, indent=indent, allow_nan=False)


def _float_text(value: float) -> str:
    if value != value or value in (math.inf, -math.inf):
        raise ValueError(f"Out of range float values are not JSON compliant: {value!r}")
    return float.__repr__(value)


def _scalar_text(value: Any) -> str | None:
    """The JSON text of a scalar, or None for a container (or an unknown type)."""
    if isinstance(value, str):
        return encode_basestring_ascii(value)
    if value is None:
        return "null"
    if value is True:
        return "true"
    if value is False:
        return "false"
    if isinstance(value, int):
        return int.__repr__(value)
    if isinstance(value, float):
        return _float_text(value)
    return None


def _key_text(key: Any) -> str:
    if isinstance(key, str):
        return encode_basestring_ascii(key)
    text = _scalar_text(key)
    if text is None:
        raise TypeError(f"keys must be str, int, float, bool or None, not {type(key).__name__}")
    return '"' + text + '"'


#: exact type -> its JSON text, for the scalars that fill an analysis (subclasses take the general path).
_SCALAR_TEXT: dict[type, Callable[[Any], str]] = {
    str: encode_basestring_ascii,
    float: _float_text,
    int: int.__repr__,
    bool: lambda value: "true" if value else "false",
    type(None): lambda value: "null",
}


def _text(value: Any, newline: str, step: str, active: set[int]) -> str:
    """``value``'s JSON text; ``newline`` is ``"\n"`` plus the indentation of ``value``'s own level."""
    text_of = _SCALAR_TEXT.get(type(value))
    if text_of is not None:
        return text_of(value)
    text = _scalar_text(value)
    if text is not None:
        return text
    is_list = isinstance(value, (list, tuple))
    if not is_list and not isinstance(value, dict):
        raise TypeError(f"Object of type {type(value).__name__} is not JSON serializable")
    if not value:
        return "[]" if is_list else "{}"
    marker = id(value)
    if marker in active:
        raise ValueError("Circular reference detected")
    active.add(marker)
    inner = newline + step
    scalar = _SCALAR_TEXT.get
    if is_list:
        lines = [
            text_of(item) if (text_of := scalar(type(item))) is not None else _text(item, inner, step, active)
            for item in value
        ]
        out = "[" + inner + ("," + inner).join(lines) + newline + "]"
    else:
        lines = [
            _key_text(key) + ": "
            + (text_of(item) if (text_of := scalar(type(item))) is not None else _text(item, inner, step, active))
            for key, item in value.items()
        ]
        out = "{" + inner + ("," + inner).join(lines) + newline + "}"
    active.discard(marker)
    return out
