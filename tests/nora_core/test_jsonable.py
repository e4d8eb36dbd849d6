"""``to_jsonable``: every kind of value an analysis or a metrics line holds, to strict JSON."""

from __future__ import annotations

import enum
import json
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nora_core.jsonable import dumps_indented, integral_number, to_jsonable


class _Name(str):
    pass


class _Level(enum.IntEnum):
    HIGH = 3


def test_values_of_every_kind() -> None:
    value = {
        "float": 0.25, "nan": math.nan, "inf": -math.inf, "int": 7, "bool": True, "none": None, "str": "x",
        "np_float": np.float64(1.5), "np_nan": np.float32("nan"), "np_int": np.int64(-3), "np_bool": np.bool_(False),
        "array": np.array([[1.0, np.inf], [2.0, 3.0]]), "tuple": (1, (2.0, math.nan)), 4: "int key",
        "nested": [{"a": np.float16(0.5)}, []], "object": object.__new__(_Opaque),
        "str_subclass": _Name("sub"), "int_enum": _Level.HIGH,
    }
    out = to_jsonable(value)
    assert out == {
        "float": 0.25, "nan": None, "inf": None, "int": 7, "bool": True, "none": None, "str": "x",
        "np_float": 1.5, "np_nan": None, "np_int": -3, "np_bool": False,
        "array": [[1.0, None], [2.0, 3.0]], "tuple": [1, [2.0, None]], "4": "int key",
        "nested": [{"a": 0.5}, []], "object": "opaque",
        "str_subclass": "sub", "int_enum": 3,
    }
    assert type(out["np_int"]) is int and type(out["np_bool"]) is bool and isinstance(out["np_float"], float)
    json.dumps(out, allow_nan=False)  # strict JSON: raises on NaN or an unknown type


class _Opaque:
    def __str__(self) -> str:
        return "opaque"


@pytest.mark.parametrize(("value", "expected"), [(16.0, 16), (2.0**53, 2.0**53), (0.5, 0.5), (-3.0, -3)])
def test_integral_number(value: float, expected: float) -> None:
    out = integral_number(value)
    assert out == expected and type(out) is type(expected)


_scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text()
_json_values = st.recursive(
    _scalars,
    lambda children: st.lists(children, max_size=5) | st.tuples(children, children)
    | st.dictionaries(st.text() | st.integers() | st.booleans() | st.none(), children, max_size=5),
    max_leaves=40,
)


@settings(max_examples=300, deadline=None)
@given(value=_json_values, indent=st.none() | st.integers(0, 4))
def test_dumps_indented_is_the_standard_library_text(value: object, indent: int) -> None:
    assert dumps_indented(value, indent) == json.dumps(value, indent=indent, allow_nan=False)


def test_dumps_indented_refuses_what_strict_json_refuses() -> None:
    for bad in ([1.0, math.nan], {"a": {"b": math.inf}}, {math.nan: 1}):
        with pytest.raises(ValueError, match="not JSON compliant"):
            dumps_indented(bad)
    with pytest.raises(TypeError, match="not JSON serializable"):
        dumps_indented({"a": [object()]})
    with pytest.raises(TypeError, match="keys must be"):
        dumps_indented({(1, 2): 3})
    loop: list[object] = []
    loop.append(loop)
    with pytest.raises(ValueError, match="Circular reference"):
        dumps_indented(loop)


def test_dumps_indented_leaves_string_indents_and_deep_nesting_to_json() -> None:
    value = {"a": [1, {"b": None}]}
    assert dumps_indented(value, "\t") == json.dumps(value, indent="\t", allow_nan=False)
    deep: object = 1
    for _ in range(700):  # deeper than this walk's recursion allows, within json.dumps's
        deep = [deep]
    assert dumps_indented(deep, 1) == json.dumps(deep, indent=1, allow_nan=False)
