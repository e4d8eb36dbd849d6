"""Seeded mutations of bytes, JSON documents, safetensors headers and TOML text.

Every mutator takes a ``random.Random`` (seeded by the bench, or drawn by hypothesis) so a failing
case is reproduced from its seed. The hostile values are those that broke readers before: nesting
100,000 deep, integer literals of thousands of digits, ``1e400``, ``NaN``, lone UTF-16 surrogates,
non-UTF-8 bytes, wrong types, absurd shapes and offsets.
"""

from __future__ import annotations

import copy
import json
import random
import struct
from typing import Any

__all__ = ["RawToken", "dumps", "mutate_bytes", "mutate_json", "mutate_safetensors", "mutate_toml"]


class RawToken:
    """A JSON fragment emitted verbatim (what ``json.dumps`` cannot write: huge integers, NaN, deep nests)."""

    def __init__(self, text: str) -> None:
        self.text = text


def dumps(value: Any) -> str:
    """JSON text of ``value``, with :class:`RawToken` fragments spliced in verbatim."""
    tokens: list[str] = []

    def encode(node: Any) -> Any:
        if isinstance(node, RawToken):
            tokens.append(node.text)
            return f"\u0000RAW{len(tokens) - 1}\u0000"
        if isinstance(node, dict):
            return {k: encode(v) for k, v in node.items()}
        if isinstance(node, list):
            return [encode(v) for v in node]
        return node

    text = json.dumps(encode(value), allow_nan=True)
    for i, token in enumerate(tokens):
        text = text.replace(json.dumps(f"\u0000RAW{i}\u0000"), token)
    return text


def _hostile(rng: random.Random) -> Any:
    """One value of a kind that has crashed a reader before, or simply of the wrong type."""
    depth = rng.choice([65, 1000, 100_000])
    choices = [
        lambda: RawToken("[" * depth + "]" * depth),
        lambda: RawToken("{\"a\":" * depth + "1" + "}" * depth),
        lambda: RawToken("9" * rng.choice([310, 401, 4301, 5000])),
        lambda: RawToken("-" + "9" * 400),
        lambda: RawToken(rng.choice(["1e400", "-1e400", "NaN", "Infinity", "-Infinity", "1e-400"])),
        lambda: RawToken('"\\ud800"'),
        lambda: RawToken('"x\\udc80y"'),
        lambda: "a\nb\u0000c\u202e",
        lambda: "x" * rng.choice([0, 1, 10_000]),
        lambda: rng.choice([True, False, None]),
        lambda: rng.choice([0, -1, 1, 2**31, 2**40 + 1, 2**53 + 1, 2**63, -(2**63)]),
        lambda: rng.choice([0.0, -0.0, 0.5, -3.5, 1e308, 5e-324, 1.5]),
        lambda: [],
        lambda: {},
        lambda: [rng.randint(-3, 3) for _ in range(rng.randint(1, 5))],
        lambda: {"k": rng.choice([1, "v", None])},
        lambda: [[[]]],
    ]
    return rng.choice(choices)()


def _paths(value: Any, prefix: tuple = ()) -> list[tuple]:
    out = [prefix]
    if isinstance(value, dict):
        for key, item in value.items():
            out += _paths(item, (*prefix, key))
    elif isinstance(value, list):
        for i, item in enumerate(value[:20]):
            out += _paths(item, (*prefix, i))
    return out


def mutate_json(value: Any, rng: random.Random, *, ops: int | None = None) -> Any:
    """A mutated deep copy of a parsed JSON document (1-3 structural edits at random paths)."""
    value = copy.deepcopy(value)
    for _ in range(ops or rng.randint(1, 3)):
        paths = _paths(value)
        path = rng.choice(paths)
        if not path:
            if rng.random() < 0.2:
                return _hostile(rng)
            continue
        parent = value
        for part in path[:-1]:
            parent = parent[part]
        key = path[-1]
        op = rng.random()
        if op < 0.55:
            parent[key] = _hostile(rng)
        elif op < 0.7 and isinstance(parent, dict):
            del parent[key]
        elif op < 0.8 and isinstance(parent, list):
            parent.insert(rng.randint(0, len(parent)), copy.deepcopy(parent[key]))
        elif op < 0.9:
            item = parent[key]
            if isinstance(item, (int, float)) and not isinstance(item, bool):
                parent[key] = rng.choice([item * -1, item * 1e6, item + 1, int(item) if item == item else 0, str(item)])
            elif isinstance(item, str):
                parent[key] = rng.choice([item + "\ud800", item[::-1], item.upper(), "", item * 3])
            else:
                parent[key] = _hostile(rng)
        elif isinstance(parent, dict):
            parent[rng.choice(["__extra__", "\ud800", "", str(key) + "x"])] = parent.pop(key)
    return value


_TOKENS = [b"[" * 100_000, b"9" * 5000, b"1e400", b"NaN", b'"\\ud800"', b"\xff\xfe", b"\x00", b"{", b"}",
           b"]", b",", b'"', b"\\", b"\n", b"=", b"[[", b"\xed\xa0\x80"]


def mutate_bytes(data: bytes, rng: random.Random, *, start: int = 0, end: int | None = None) -> bytes:
    """1-4 byte-level edits inside ``data[start:end]``: bit flips, overwrites, inserts, deletes, truncation."""
    out = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        hi = len(out) if end is None else min(end, len(out))
        lo = min(start, hi)
        pos = rng.randint(lo, hi) if hi > lo else lo
        op = rng.random()
        if op < 0.3 and pos < len(out):
            out[pos] ^= 1 << rng.randrange(8)
        elif op < 0.45 and pos < len(out):
            out[pos : pos + rng.randint(1, 8)] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 8)))
        elif op < 0.65:
            out[pos:pos] = rng.choice(_TOKENS)
        elif op < 0.8:
            del out[pos : pos + rng.randint(1, 64)]
        elif op < 0.9:
            del out[pos:]
        else:
            out[pos:pos] = out[max(0, pos - 64) : pos]
    return bytes(out)


def mutate_safetensors(data: bytes, rng: random.Random) -> bytes:
    """A safetensors file with its header mutated structurally (shapes, offsets, dtypes, names), its
    length prefix sometimes wrong, or its bytes mutated directly."""
    (length,) = struct.unpack("<Q", data[:8])
    header, body = json.loads(data[8 : 8 + length]), data[8 + length :]
    op = rng.random()
    if op < 0.2:
        return mutate_bytes(data, rng, start=0, end=8 + length)
    if op < 0.3:
        if rng.random() < 0.5:  # valid bytes of special values: NaN, Inf, zeros, huge (non_finite/zero paths)
            body = bytearray(body)
            pattern = rng.choice([b"\x00\x00\xc0\x7f", b"\x00\x00\x80\x7f", b"\x00\x00\x00\x00", b"\xff\xff\x7f\x7f"])
            start = rng.randrange(0, max(1, len(body) // 4)) * 4
            stop = start + 4 * rng.randint(1, max(1, (len(body) - start) // 4))
            body[start:stop] = pattern * ((stop - start) // 4)
            return data[: 8 + length] + bytes(body[: len(data) - 8 - length])
        return mutate_bytes(data, rng, start=8 + length)
    names = [k for k in header if k != "__metadata__"]
    if op < 0.4 and names:  # renamed keys: unpaired factors, odd module names, adapter-name segments
        old = rng.choice(names)
        new = rng.choice([old.replace("lora_A", "lora_B"), old.replace(".weight", ".default.weight"),
                          old.replace("base_model.model.", ""), old + "\n", "lora_A", old.replace("lora_A", "lora_embedding_A"),
                          "\ud800." + old, old.replace("q_proj", "q_proj.lora_A")])
        header = {(new if k == old else k): v for k, v in header.items()}
        blob = dumps(header).encode()
        return struct.pack("<Q", len(blob)) + blob + body
    if op < 0.75 and names:
        entry = header[rng.choice(names)]
        field = rng.choice(["shape", "data_offsets", "dtype"])
        choice = rng.random()
        if field == "shape":
            shape = entry["shape"]
            entry["shape"] = rng.choice([
                [0, 10**30], [shape[0], 0], [0] + shape[1:], [6000, 1], list(reversed(shape)), [],
                [2**40 + 1, 0], [1] * 40, shape + [1], [s * 2 for s in shape], [RawToken("9" * 5000)], [-1, 2],
            ]) if choice < 0.9 else _hostile(rng)
        elif field == "data_offsets":
            begin, end = entry["data_offsets"]
            entry["data_offsets"] = rng.choice([[end, begin], [begin, end + 4], [0, 2**63], [begin, begin],
                                                [-1, end], [begin], _hostile(rng)])
        else:
            entry["dtype"] = rng.choice(["F16", "BF16", "F64", "I32", "BOOL", "F8_E4M3", "C64", "X", _hostile(rng)])
    else:
        header = mutate_json(header, rng)
    blob = dumps(header).encode("utf-8", "surrogatepass")
    prefix = len(blob) if rng.random() < 0.85 else rng.choice([0, len(blob) + 1, len(blob) - 1, 2**63, 101_000_000])
    return struct.pack("<Q", max(0, min(prefix, 2**64 - 1))) + blob + body


_TOML_VALUES = [
    "9" * 5000, "9" * 400, "-" + "9" * 30, "inf", "-inf", "nan", "1e400", "[" * 100_000, "[" * 70 + "]" * 70,
    '"\\u0000"', '"\\ud800"', '"x"', "true", "[1, [2]]", "{ a = 1 }", "1979-05-27T07:32:00Z", "0.0", "-1", "2",
    '""', "[]", '"../../etc/passwd"', '"' + "a" * 5000 + '"',
]


def mutate_toml(text: str, rng: random.Random) -> bytes:
    """TOML with 1-3 edits: a value replaced by a hostile one, a line duplicated or dropped, a table
    header inserted (``[tool]\\nspectra = 5``), or bytes mutated (non-UTF-8)."""
    lines = text.splitlines()
    for _ in range(rng.randint(1, 3)):
        op = rng.random()
        i = rng.randrange(len(lines)) if lines else 0
        if op < 0.55 and lines and "=" in lines[i]:
            key = lines[i].split("=", 1)[0]
            lines[i] = f"{key}= {rng.choice(_TOML_VALUES)}"
        elif op < 0.65 and lines:
            lines.insert(i, lines[i])
        elif op < 0.75 and lines:
            del lines[i]
        elif op < 0.85:
            lines.insert(i, rng.choice(["[tool]\nspectra = 5", "[tool.spectra]\ncheck = 5", "tool = 3",
                                         "[[overrides]]\npattern = 5", "[tool.spectra.check]", "unknown = 1",
                                         "overrides = 5", "[overrides]"]))
        else:
            return mutate_bytes("\n".join(lines).encode(), rng)
    return "\n".join(lines).encode("utf-8", "surrogatepass")
