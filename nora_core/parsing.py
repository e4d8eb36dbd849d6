"""Bounded parsing of the JSON and TOML files users give: one reader for every such file.

Every JSON or TOML document that comes from a user (``adapter_config.json``, a safetensors header, an
analysis JSON or baseline, ``metrics.jsonl`` lines, ``spectra check`` and ``nora train`` configs) is
parsed here, so each gets the same limits and the same one-line errors:

* the file must be UTF-8 text and at most :data:`MAX_FILE_BYTES` long;
* nesting deeper than :data:`MAX_DEPTH` arrays/objects (tables) is refused (the standard parsers
  recurse and raise ``RecursionError`` around depth 1000);
* every number must be a finite float64: an integer literal that does not fit one (Python refuses
  to even convert literals of more than 4300 digits), a float literal that overflows to infinity
  (``1e400``) and the non-standard ``NaN`` / ``Infinity`` tokens are refused, naming the JSON path of
  the value;
* strings (and object keys) holding lone UTF-16 surrogates (the JSON escape ``"\\ud800"`` decodes to
  one) get each surrogate replaced by U+FFFD, so no renderer later fails to encode them.

Errors are :class:`ParseError` (a ``ValueError``) carrying the path and the problem; callers turn them
into their own user errors. Torch-free: ``nora_spectra`` and the ``nora`` command both use it.
"""

from __future__ import annotations

import json
import math
import os
import re
import sys
from typing import Any, Iterator, Sequence

__all__ = [
    "MAX_DEPTH",
    "MAX_FILE_BYTES",
    "ParseError",
    "check_tree",
    "decode_utf8",
    "json_path",
    "parse_json",
    "parse_toml",
    "read_json",
    "read_json_lines",
    "read_toml",
    "type_name",
]

#: deepest nesting of arrays and objects (tables) accepted; our own files nest 7 levels at most.
MAX_DEPTH = 64

#: largest JSON or TOML file read (64 MiB): an analysis of a 7B-model adapter at r=64 is about 1 MB.
MAX_FILE_BYTES = 64 * 2**20

#: integer literals longer than this cannot be a finite float64 (its largest value has 309 digits).
_MAX_INT_CHARS = 320

_SURROGATE = re.compile("[\ud800-\udfff]")
_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


class ParseError(ValueError):
    """A user's JSON or TOML file is unreadable or beyond our limits.

    Args:
        path: the file (or a description such as ``"safetensors header"``); it starts the message.
        problem: what is wrong, one line, e.g. ``"r: integer of 5000 digits is out of range"``.
    """

    def __init__(self, path: "str | os.PathLike[str]", problem: str) -> None:
        self.path = os.fspath(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")


class _OversizedInt:
    """Stands for an integer literal too long to be a float64, so the walk can name its path."""

    def __init__(self, text: str) -> None:
        self.digits = len(text.lstrip("-"))


def type_name(value: Any) -> str:
    """How a parsed value is named in messages: ``a list``, ``an object``, ``a string``, ``true``..."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, (list, tuple)):
        return "a list"
    if isinstance(value, dict):
        return "an object"
    return f"a {type(value).__name__}"


def json_path(parts: Sequence[Any]) -> str:
    """``("layers", 3, "utilization")`` -> ``layers[3].utilization``; odd keys are quoted (``config["a.b"]``)."""
    out = ""
    for part in parts:
        if isinstance(part, int):
            out += f"[{part}]"
        elif _IDENTIFIER.fullmatch(str(part)):
            out += f".{part}" if out else str(part)
        else:
            out += f"[{json.dumps(str(part))}]"
    return out or "(top level)"


def _where(parts: Sequence[Any]) -> str:
    return json_path(parts) + ": " if parts else ""


def _clean(text: str) -> str:
    """``text`` with each lone UTF-16 surrogate replaced by U+FFFD (ASCII strings pass untouched)."""
    if text.isascii():
        return text
    return _SURROGATE.sub("\ufffd", text)


def check_tree(value: Any, path: "str | os.PathLike[str]", *, max_depth: int = MAX_DEPTH) -> Any:
    """Enforce the limits of this module on a parsed value, iteratively (no recursion).

    Args:
        value: what ``json.loads`` / ``tomllib.loads`` returned (dicts, lists, scalars).
        path: the file, for messages.
        max_depth: deepest nesting accepted.

    Returns:
        ``value`` itself, with lone surrogates in strings and keys replaced in place.

    Raises:
        ParseError: nesting deeper than ``max_depth``, or a number that is not a finite float64,
            naming the JSON path of the value.
    """
    if isinstance(value, str):
        return _clean(value)
    _check_scalar(value, (), path)
    stack: list[tuple[Any, tuple[Any, ...]]] = [(value, ())]
    while stack:
        node, parts = stack.pop()
        if len(parts) >= max_depth:
            raise ParseError(path, f"nested deeper than {max_depth} levels (under {json_path(parts[:3])})")
        if isinstance(node, dict):
            if not all(isinstance(key, str) and key.isascii() for key in node):
                renamed = {_clean(key) if isinstance(key, str) else key: item for key, item in node.items()}
                node.clear()
                node.update(renamed)
            items: Any = node.items()
        elif isinstance(node, list):
            items = enumerate(node)
        else:
            continue
        for key, item in items:  # exact types first: a safetensors header holds thousands of integers
            kind = type(item)
            if kind is int:
                if not -_FLOAT_MAX <= item <= _FLOAT_MAX:
                    _check_scalar(item, (*parts, key), path)
            elif kind is str:
                if not item.isascii():
                    node[key] = _clean(item)
            elif kind is dict or kind is list:
                stack.append((item, (*parts, key)))
            elif kind is float:
                if item - item != 0.0:  # NaN or infinite
                    _check_scalar(item, (*parts, key), path)
            elif isinstance(item, (dict, list)):
                stack.append((item, (*parts, key)))
            elif isinstance(item, str):
                if not item.isascii():
                    node[key] = _clean(item)
            else:
                _check_scalar(item, (*parts, key), path)
    return value


#: the largest finite float64; a larger integer literal cannot be one.
_FLOAT_MAX = sys.float_info.max


def _check_scalar(value: Any, parts: Sequence[Any], path: "str | os.PathLike[str]") -> None:
    if isinstance(value, _OversizedInt):
        raise ParseError(path, f"{_where(parts)}integer of {value.digits} digits is out of range")
    if isinstance(value, bool) or value is None:
        return
    if isinstance(value, int):
        if abs(value) > sys.float_info.max:
            raise ParseError(path, f"{_where(parts)}integer of {len(str(abs(value)))} digits is out of range")
    elif isinstance(value, float) and not math.isfinite(value):
        what = "NaN" if math.isnan(value) else "an infinite number (or one beyond the float range)"
        raise ParseError(path, f"{_where(parts)}{what} is not accepted: numbers must be finite")


#: a JSON string literal; TOML strings (basic, literal, multi-line) and comments.
_JSON_STRING = re.compile(r'"(?:[^"\\]|\\.)*"')
#: a JSON string literal in a text that holds no escaped quote.
_PLAIN_JSON_STRING = re.compile(r'"[^"]*"')
_TOML_SKIP = re.compile(r'"""[\s\S]*?"""|\'\'\'[\s\S]*?\'\'\'|"(?:[^"\\\n]|\\.)*"|\'[^\'\n]*\'|#[^\n]*')
#: every byte but the four bracket bytes, deleted by ``bytes.translate``.
_NOT_BRACKETS = bytes(byte for byte in range(256) if byte not in b"[]{}")


def _bracket_depth(text: str) -> int:
    """The deepest nesting of brackets and braces in ``text`` (strings already removed), without recursion.

    The standard parsers recurse once per level; past about 1000 levels they raise ``RecursionError``
    from deep inside (and may print "Exception ignored" lines while unwinding), so depth is measured
    first: the brackets are kept (``bytes.translate``: UTF-8 continuation bytes are never brackets) and
    their running sum taken by numpy.
    """
    import numpy as np

    brackets = text.encode("utf-8", "surrogatepass").translate(None, _NOT_BRACKETS)
    if not brackets:
        return 0
    codes = np.frombuffer(brackets, dtype=np.uint8)
    steps = np.where((codes == ord("[")) | (codes == ord("{")), 1, -1).astype(np.int64)
    return int(np.cumsum(steps).max())


def _nested_deeper(text: str, strings: "re.Pattern[str]", blank: str, max_depth: int) -> bool:
    """Whether ``text``'s brackets and braces, outside what ``strings`` matches, nest deeper than ``max_depth``.

    Each opening bracket or brace adds at most one level, so a text with no more than ``max_depth`` of
    them (strings included) cannot be too deep: the common case (a JSON Lines record, a config) is
    decided by two ``str.count`` calls instead of the regex and numpy pass (about 1 us against 40 us).
    """
    if text.count("[") + text.count("{") <= max_depth:
        return False
    return _bracket_depth(strings.sub(blank, text)) > max_depth


def _int(text: str) -> Any:
    return int(text) if len(text) <= _MAX_INT_CHARS else _OversizedInt(text)


class _DuplicateKey(Exception):
    pass


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result = dict(pairs)
    if len(result) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise _DuplicateKey(key)
            seen.add(key)
    return result


def decode_utf8(data: bytes, path: "str | os.PathLike[str]", what: str = "text") -> str:
    """``data`` decoded as UTF-8 (a leading byte-order mark dropped), else a one-line :class:`ParseError`."""
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ParseError(
            path, f"not UTF-8 {what} (byte 0x{data[exc.start]:02x} at offset {exc.start} cannot be decoded)"
        ) from None


def parse_json(
    data: "str | bytes", path: "str | os.PathLike[str]", *, reject_duplicates: bool = False, max_depth: int = MAX_DEPTH
) -> Any:
    """Parse one JSON document within the limits of this module.

    Args:
        data: the document (bytes are decoded as UTF-8).
        path: the file, for messages.
        reject_duplicates: refuse an object that repeats a key (``json`` keeps the last one silently).
        max_depth: deepest nesting accepted.

    Raises:
        ParseError: not UTF-8, not JSON, a repeated key, too deep, or a number that is not a finite float64.
    """
    text = decode_utf8(data, path, "JSON") if isinstance(data, bytes) else data
    # a text without an escaped quote (a safetensors header, an analysis) has its strings between
    # consecutive quotes: the simpler pattern removes them several times faster
    strings = _PLAIN_JSON_STRING if '\\"' not in text else _JSON_STRING
    if _nested_deeper(text, strings, '""', max_depth):  # before the recursive C parser sees it
        raise ParseError(path, f"not valid JSON: nested deeper than {max_depth} levels")
    hook = _no_duplicates if reject_duplicates else None
    try:
        value = json.loads(text, parse_int=_int, object_pairs_hook=hook)
    except RecursionError:
        raise ParseError(path, f"not valid JSON: nested deeper than {max_depth} levels") from None
    except _DuplicateKey as exc:
        raise ParseError(path, f"not valid JSON: key {_clean(str(exc.args[0]))!r} appears twice in one object") from None
    except json.JSONDecodeError as exc:
        raise ParseError(path, f"not valid JSON ({exc})") from None
    except ValueError as exc:  # e.g. a float literal Python cannot convert
        raise ParseError(path, f"not valid JSON ({_first_line(exc)})") from None
    return check_tree(value, path, max_depth=max_depth)


def _read_bytes(path: "str | os.PathLike[str]", max_bytes: int, what: str) -> bytes:
    """The whole file, refused when larger than ``max_bytes`` (``OSError`` propagates)."""
    with open(path, "rb") as handle:
        data = handle.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise ParseError(path, f"{what} file larger than the {max_bytes // 2**20} MiB limit")
    return data


def read_json(path: "str | os.PathLike[str]", *, max_bytes: int = MAX_FILE_BYTES, **options: Any) -> Any:
    """Read and parse a JSON file (see :func:`parse_json`).

    Raises:
        OSError: the file cannot be read (callers word "not found" themselves).
        ParseError: its content is refused.
    """
    return parse_json(_read_bytes(path, max_bytes, "JSON"), path, **options)


def read_json_lines(path: "str | os.PathLike[str]", *, max_bytes: int = MAX_FILE_BYTES) -> Iterator[tuple[int, Any]]:
    """``(line number, value)`` for each non-blank line of a JSON Lines file.

    Raises:
        OSError: the file cannot be read.
        ParseError: not UTF-8, or a line is refused (the message starts ``line N:``).
    """
    text = decode_utf8(_read_bytes(path, max_bytes, "JSON Lines"), path, "text")
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            yield number, parse_json(line, path)
        except ParseError as exc:
            raise ParseError(path, f"line {number}: {exc.problem}") from None


def parse_toml(data: "str | bytes", path: "str | os.PathLike[str]", *, max_depth: int = MAX_DEPTH) -> dict[str, Any]:
    """Parse a TOML document within the limits of this module.

    Raises:
        ParseError: not UTF-8, not TOML, too deep, or a number that is not a finite float64.
    """
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover - Python 3.10 uses the backport declared in pyproject.toml
        import tomli as tomllib
    text = decode_utf8(data, path, "TOML") if isinstance(data, bytes) else data
    if _nested_deeper(text, _TOML_SKIP, "", max_depth):  # before the recursive parser sees it
        raise ParseError(path, f"not valid TOML: nested deeper than {max_depth} levels")
    try:
        value = tomllib.loads(text)
    except RecursionError:
        raise ParseError(path, f"not valid TOML: nested deeper than {max_depth} levels") from None
    except tomllib.TOMLDecodeError as exc:
        raise ParseError(path, f"not valid TOML ({_first_line(exc)})") from None
    except ValueError as exc:  # int() of an over-long literal, raised from inside the parser
        if "integer string conversion" in str(exc):
            raise ParseError(path, "not valid TOML: an integer literal is longer than 4300 digits") from None
        raise ParseError(path, f"not valid TOML ({_first_line(exc)})") from None
    return check_tree(value, path, max_depth=max_depth)


def read_toml(path: "str | os.PathLike[str]", *, max_bytes: int = MAX_FILE_BYTES) -> dict[str, Any]:
    """Read and parse a TOML file (see :func:`parse_toml`).

    Raises:
        OSError: the file cannot be read.
        ParseError: its content is refused.
    """
    return parse_toml(_read_bytes(path, max_bytes, "TOML"), path)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return _clean(text.splitlines()[0]) if text else type(exc).__name__
