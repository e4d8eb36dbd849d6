"""The package version: the single source of truth, read by ``pyproject.toml`` (setuptools ``attr``)."""

__version__ = "0.1.0"
