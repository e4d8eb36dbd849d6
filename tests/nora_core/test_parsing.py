"""nora_core.parsing: the one bounded reader of users' JSON and TOML (limits, messages, sanitising)."""

from __future__ import annotations

import json

import pytest

from nora_core.parsing import MAX_DEPTH, ParseError, json_path, parse_json, parse_toml, read_json, read_json_lines


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("[" * 100_000, f"not valid JSON: nested deeper than {MAX_DEPTH} levels"),
        ("[" * 65 + "]" * 65, f"not valid JSON: nested deeper than {MAX_DEPTH} levels"),
        ('{"a": "[[[[", "b": ' + "[" * 65 + "]" * 65 + "}", f"not valid JSON: nested deeper than {MAX_DEPTH} levels"),
        ('{"r": ' + "9" * 5000 + "}", "r: integer of 5000 digits is out of range"),
        ('{"lora_alpha": ' + "9" * 401 + "}", "lora_alpha: integer of 401 digits is out of range"),
        ('{"a": [1, {"b": 1e400}]}', "a[1].b: an infinite number (or one beyond the float range) is not accepted"),
        ('{"x": NaN}', "x: NaN is not accepted: numbers must be finite"),
        ('{"x": -Infinity}', "x: an infinite number"),
        ('{"a": 1, "a": 2}', "not valid JSON: key 'a' appears twice in one object"),
        ("{not json", "not valid JSON (Expecting property name"),
    ],
)
def test_json_refusals_name_the_file_and_the_path(text: str, problem: str) -> None:
    with pytest.raises(ParseError) as info:
        parse_json(text, "f.json", reject_duplicates=True)
    assert str(info.value).startswith(f"f.json: {problem}")
    assert "\n" not in str(info.value)


def test_depth_64_is_accepted_and_numbers_at_the_float_edge_too() -> None:
    assert parse_json("[" * 64 + "]" * 64, "f") is not None
    assert parse_json('{"s": "' + "[" * 500 + '\\" {"}', "f") == {"s": "[" * 500 + '" {'}  # brackets in strings
    assert parse_toml('a = "[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[["  # [[[[[[[[[', "t")
    big = 2**1023
    assert parse_json(f'{{"a": {big}, "b": -1.7976931348623157e308}}', "f") == {"a": big, "b": -1.7976931348623157e308}


def test_lone_surrogates_are_replaced_in_strings_and_keys() -> None:
    value = parse_json('{"\\udc00k": ["a\\ud800", "\\ud83d\\ude00"]}', "f")
    assert value == {"\ufffdk": ["a\ufffd", "\U0001f600"]}
    json.dumps(value, ensure_ascii=False).encode("utf-8")  # encodable: the point of the replacement


def test_non_utf8_and_oversized_files(tmp_path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_bytes(b'{"a": "\xff"}')
    with pytest.raises(ParseError, match=r"bad.json: not UTF-8 JSON \(byte 0xff at offset 7 cannot be decoded\)"):
        read_json(bad)
    big = tmp_path / "big.json"
    big.write_bytes(b"[" + b"0," * 600 + b"0]")
    with pytest.raises(ParseError, match="larger than the 0 MiB limit"):
        read_json(big, max_bytes=1000)
    with pytest.raises(FileNotFoundError):
        read_json(tmp_path / "missing.json")


def test_json_lines_name_the_line(tmp_path) -> None:
    file = tmp_path / "m.jsonl"
    file.write_text('{"step": 1}\n\n{"step": ' + "1" * 400 + "}\n")
    with pytest.raises(ParseError, match=r"m.jsonl: line 3: step: integer of 400 digits is out of range"):
        list(read_json_lines(file))
    file.write_text('{"step": 1}\n\n{"step": 2}\n')
    assert list(read_json_lines(file)) == [(1, {"step": 1}), (3, {"step": 2})]


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("a = " + "[" * 100_000, f"not valid TOML: nested deeper than {MAX_DEPTH} levels"),
        ("a = " + "9" * 5000, "not valid TOML: an integer literal is longer than 4300 digits"),
        ("a = " + "9" * 400, "a: integer of 400 digits is out of range"),
        ("[t]\nx = nan", "t.x: NaN is not accepted"),
        ("x = inf", "x: an infinite number"),
        ("x = [", "not valid TOML ("),
    ],
)
def test_toml_refusals(text: str, problem: str) -> None:
    with pytest.raises(ParseError) as info:
        parse_toml(text, "c.toml")
    assert str(info.value).startswith(f"c.toml: {problem}")


def test_toml_non_utf8() -> None:
    with pytest.raises(ParseError, match=r"c.toml: not UTF-8 TOML \(byte 0xff at offset 4"):
        parse_toml(b"a = \xff", "c.toml")


def test_json_path_formatting() -> None:
    assert json_path(("layers", 3, "utilization")) == "layers[3].utilization"
    assert json_path(("config", "a.b", 0)) == 'config["a.b"][0]'
    assert json_path(()) == "(top level)"
