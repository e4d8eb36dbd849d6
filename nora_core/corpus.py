"""A built-in offline pretraining corpus: the docstrings of the Python standard library.

Every Python install carries its standard library's source, so the small GPT can be pretrained on a fresh
machine with no download. The text is the module, class and function docstrings (English prose with
code samples) of the top-level ``.py`` modules in the standard library directory, taken in sorted file
order until ``max_bytes`` is reached: deterministic for a given Python version.

:func:`docstring_pairs` cuts the same docstrings into (first sentence, rest) pairs: a contrastive
sentence-pair task (match a summary line to its description) for sentence encoders, offline as well.
"""

from __future__ import annotations

import ast
import logging
import random
import re
import sysconfig
from pathlib import Path

__all__ = ["docstring_pairs", "stdlib_dir", "stdlib_docstrings"]

logger = logging.getLogger(__name__)


def stdlib_dir() -> Path:
    """Directory of the running interpreter's pure-Python standard library."""
    return Path(sysconfig.get_paths()["stdlib"])


def _docstrings(source: str) -> list[str]:
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return []
    out = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node, clean=True)
            if doc and len(doc) >= 40:
                out.append(doc)
    return out


def stdlib_docstrings(max_bytes: int = 1_000_000, directory: str | Path | None = None) -> str:
    """Concatenate standard-library docstrings into one text.

    Args:
        max_bytes: stop once the UTF-8 text reaches this size (the last docstring is cut).
        directory: where to look; default :func:`stdlib_dir`.

    Returns:
        Docstrings separated by blank lines, at most ``max_bytes`` bytes of UTF-8.

    Raises:
        FileNotFoundError: no standard-library source is found (a stripped install).
    """
    root = Path(directory) if directory is not None else stdlib_dir()
    files = sorted(p for p in root.glob("*.py") if not p.name.startswith("_"))
    parts: list[str] = []
    size = 0
    for path in files:
        try:
            source = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        for doc in _docstrings(source):
            chunk = doc + "\n\n"
            parts.append(chunk)
            size += len(chunk.encode("utf-8"))
            if size >= max_bytes:
                text = "".join(parts).encode("utf-8")[:max_bytes].decode("utf-8", errors="ignore")
                logger.debug("stdlib corpus: %d bytes from %s", len(text), root)
                return text
    if not parts:
        raise FileNotFoundError(f"{root}: no standard-library .py sources with docstrings found")
    return "".join(parts)


_FIRST_SENTENCE = re.compile(r"(.{15,200}?[.!?])\s+(.*)", re.DOTALL)


def docstring_pairs(
    max_pairs: int | None = None, *, seed: int = 0, max_rest: int = 600, directory: str | Path | None = None
) -> list[tuple[str, str]]:
    """(first sentence, rest) pairs from the standard library's class and function docstrings.

    Each docstring of at least 40 characters (module docstrings excluded) has its whitespace collapsed;
    its first sentence (15-200 characters, ending in ``.``, ``!`` or ``?``) is the anchor and the rest,
    cut to ``max_rest`` characters, the positive, when it holds at least 40 characters. Duplicate
    docstrings count once. The pairs are shuffled with ``random.Random(seed)``, so any prefix is a fair
    sample; the result is deterministic for a given Python version.

    Args:
        max_pairs: keep at most this many (after shuffling); None keeps all.
        seed: the shuffle's seed.
        max_rest: longest positive, in characters.
        directory: where to look; default :func:`stdlib_dir`.

    Returns:
        The pairs.

    Raises:
        FileNotFoundError: no standard-library source is found.
    """
    root = Path(directory) if directory is not None else stdlib_dir()
    files = sorted(p for p in root.glob("*.py") if not p.name.startswith("_"))
    pairs: list[tuple[str, str]] = []
    seen: set[str] = set()
    for path in files:
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, SyntaxError, ValueError):
            continue
        for node in ast.walk(tree):
            if not isinstance(node, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            doc = ast.get_docstring(node, clean=True)
            if not doc or len(doc) < 40:
                continue
            text = re.sub(r"\s+", " ", doc).strip()
            if text in seen:
                continue
            seen.add(text)
            match = _FIRST_SENTENCE.match(text)
            if match is None or len(match.group(2)) < 40:
                continue
            pairs.append((match.group(1), match.group(2)[:max_rest]))
    if not pairs:
        raise FileNotFoundError(f"{root}: no standard-library docstrings to pair")
    random.Random(seed).shuffle(pairs)
    return pairs if max_pairs is None else pairs[:max_pairs]
