"""A built-in offline pretraining corpus: the docstrings of the Python standard library.

Every Python install carries its standard library's source, so the small GPT can be pretrained on a fresh
machine with no download. The text is the module, class and function docstrings (English prose with
code samples) of the top-level ``.py`` modules in the standard library directory, taken in sorted file
order until ``max_bytes`` is reached: deterministic for a given Python version.
"""

from __future__ import annotations

import ast
import logging
import sysconfig
from pathlib import Path

__all__ = ["stdlib_dir", "stdlib_docstrings"]

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
