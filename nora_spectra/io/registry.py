"""The reader registry: which format a path is in, and ``load_checkpoint``.

A format is a module under :mod:`nora_spectra.io.formats` that defines ``FORMAT``, a :class:`Format`:
its name, a one-line summary, a cheap ``sniff(probe) -> bool`` (file names, config keys, tensor-key
patterns, header metadata; never a tensor) and ``open(probe, adapter) -> Checkpoint``. The registry
finds the modules itself, so adding a format touches only its own new file (and its tests).

``load_checkpoint(path, format="auto")`` asks every format's ``sniff``; exactly one must claim the
path. Two or more is an ambiguity, refused with a message naming them and ``--format-in``; none
falls back to the reader whose error explains best what is missing (the PEFT directory reader for a
directory, the bare-safetensors reader for a safetensors file).
"""

from __future__ import annotations

import importlib
import os
import pkgutil
from dataclasses import dataclass
from functools import cached_property
from typing import TYPE_CHECKING, Any, Callable

from nora_core.parsing import ParseError, read_json
from nora_spectra.errors import CheckpointError, UsageError
from nora_spectra.io.safetensors_file import SafetensorsFile

if TYPE_CHECKING:  # pragma: no cover
    from nora_spectra.io.checkpoint import Checkpoint
    from nora_spectra.io.model_weights import ModelWeights
    from nora_spectra.io.writing import ResizeWriter

__all__ = ["Format", "Probe", "detect_format", "formats", "get_format", "load_checkpoint"]

#: what ``format=`` takes to detect the format.
AUTO = "auto"


@dataclass(frozen=True)
class Format:
    """A registered checkpoint format.

    Attributes:
        name: the name ``--format-in`` takes and the analysis JSON's ``format`` reports.
        summary: one line for ``--help`` and ``docs/formats.md``.
        sniff: True when the path is in this format; reads configs and headers only, never raises.
        open: validate the path and return its :class:`~nora_spectra.io.checkpoint.Checkpoint`; raises
            :class:`~nora_spectra.errors.CheckpointError` naming the file on anything wrong.
        resize_writer: where the :class:`~nora_spectra.io.writing.ResizeWriter` that ``spectra resize``
            writes this format with lives, as ``"module:attribute"``, or None when it cannot yet (resize
            then refuses it, naming the formats it can write). A name, not the object, so that reading
            a checkpoint does not import the writers.
    """

    name: str
    summary: str
    sniff: Callable[["Probe"], bool]
    open: Callable[["Probe", "str | None"], "Checkpoint"]
    resize_writer: str | None = None

    @property
    def resize(self) -> "ResizeWriter | None":
        """The format's resize writer (imported on first use), or None when it has none."""
        if self.resize_writer is None:
            return None
        module, _, attribute = self.resize_writer.partition(":")
        return getattr(importlib.import_module(module), attribute)


class Probe:
    """A path as the sniffers see it: listing, JSON configs and safetensors headers, each read once.

    Args:
        path: the file or directory the user gave.
        adapter: the adapter sub-directory asked for, or None.
        base: the base model of a base-aware analysis (``--base``), opened, or None. Only formats that
            are a difference against a base (``full``) read it.
    """

    def __init__(self, path: str, adapter: str | None = None, base: "ModelWeights | None" = None) -> None:
        self.path = path
        self.adapter = adapter
        self.base = base
        self.is_dir = os.path.isdir(path)
        self.is_file = os.path.isfile(path)
        self.name = os.path.basename(os.path.normpath(path))
        self._json: dict[str, Any] = {}
        self._headers: dict[str, SafetensorsFile] = {}

    @property
    def directory(self) -> str:
        """The directory itself, or the directory holding the file."""
        return self.path if self.is_dir else os.path.dirname(os.path.abspath(self.path))

    @cached_property
    def entries(self) -> list[str]:
        """Names in the directory (``[]`` for a file, or when it cannot be listed)."""
        if not self.is_dir:
            return []
        try:
            return sorted(os.listdir(self.path))
        except OSError:
            return []

    def json(self, path: str) -> Any:
        """The parsed JSON at ``path``, or None when it is missing or unreadable (sniffers never raise)."""
        if path not in self._json:
            try:
                self._json[path] = read_json(path)
            except (OSError, ParseError):
                self._json[path] = None
        return self._json[path]

    def safetensors(self, path: str | None = None) -> SafetensorsFile:
        """The validated header of a safetensors file (default: the probed file), parsed once.

        Raises:
            CheckpointError: the file is not a valid safetensors file (a container error is an error
                whatever the format, so sniffers let it through).
        """
        path = self.path if path is None else path
        if path not in self._headers:
            self._headers[path] = SafetensorsFile(path)
        return self._headers[path]

    def looks_like_safetensors(self) -> bool:
        """A cheap test of the probed file: a ``.safetensors`` name, or a header length then ``{``."""
        if not self.is_file:
            return False
        if self.path.endswith(".safetensors"):
            return True
        try:
            with open(self.path, "rb") as handle:
                prefix = handle.read(9)
            size = os.path.getsize(self.path)
        except OSError:
            return False
        return len(prefix) == 9 and 8 + int.from_bytes(prefix[:8], "little") <= size and prefix[8:9] == b"{"


_FORMATS: dict[str, Format] | None = None


def formats() -> dict[str, Format]:
    """Every registered format by name, in module-name order (modules of :mod:`nora_spectra.io.formats`)."""
    global _FORMATS
    if _FORMATS is None:
        package = importlib.import_module("nora_spectra.io.formats")
        found: dict[str, Format] = {}
        for info in sorted(pkgutil.iter_modules(package.__path__), key=lambda m: m.name):
            if info.name.startswith("_"):
                continue
            module = importlib.import_module(f"{package.__name__}.{info.name}")
            fmt = getattr(module, "FORMAT", None)
            if isinstance(fmt, Format):
                if fmt.name in found or fmt.name == AUTO:
                    raise RuntimeError(f"format name {fmt.name!r} registered twice")  # pragma: no cover
                found[fmt.name] = fmt
        _FORMATS = found
    return _FORMATS


def get_format(name: str) -> Format:
    """The registered format ``name``.

    Raises:
        UsageError: no format has that name (the message lists them).
    """
    try:
        return formats()[name]
    except KeyError:
        raise UsageError(f"unknown checkpoint format {name!r}; choose one of {AUTO}, {', '.join(formats())}") from None


def detect_format(path: "str | os.PathLike[str]", adapter: str | None = None) -> str | None:
    """The name of the one format that claims ``path``, or None when none does.

    Raises:
        CheckpointError: the path does not exist, or several formats claim it.
    """
    return _detect(_probe(path, adapter))


def _probe(path: "str | os.PathLike[str]", adapter: str | None, base: "ModelWeights | None" = None) -> Probe:
    path = os.fspath(path)
    if not os.path.exists(path):
        raise CheckpointError(path, "no such file or directory")
    probe = Probe(path, adapter, base)
    if not (probe.is_dir or probe.is_file):
        raise CheckpointError(path, "not a regular file or directory")
    return probe


def _detect(probe: Probe) -> str | None:
    claims = [name for name, fmt in formats().items() if fmt.sniff(probe)]
    if len(claims) > 1:
        raise CheckpointError(
            probe.path,
            f"ambiguous: the path matches the formats {', '.join(claims)}; choose one with --format-in NAME "
            "(format=NAME in Python)",
        )
    return claims[0] if claims else None


def load_checkpoint(
    path: "str | os.PathLike[str]",
    adapter: str | None = None,
    *,
    format: str = AUTO,
    base: "str | os.PathLike[str] | ModelWeights | None" = None,
) -> "Checkpoint":
    """Open and validate a checkpoint of any registered format without reading any tensor.

    Args:
        path: a directory or a file.
        adapter: the name of an adapter saved in a sub-directory (PEFT layout), or None.
        format: ``"auto"`` to detect the format, or the name of a registered format to force it
            (``--format-in``).
        base: a safetensors base model (path or opened :class:`~nora_spectra.io.model_weights.ModelWeights`).
            With a base, a model that is no adapter is read as a full fine-tune (format ``full``: its
            updates are ``W_tuned - W_base``); adapters ignore it here.

    Returns:
        A :class:`~nora_spectra.io.checkpoint.Checkpoint`; iterate its modules with ``iter_layers()``.

    Raises:
        CheckpointError: anything wrong with the input (missing path, unknown or ambiguous format,
            invalid config, corrupt file, unsafe pickle, unpaired or mismatched factors); the message
            starts with the path.
        UsageError: ``format`` names no registered format.
    """
    probe = _probe(path, adapter)
    if base is not None:
        from nora_spectra.io.model_weights import open_model_weights

        probe.base = open_model_weights(base)
    if format != AUTO:
        return get_format(format).open(probe, adapter)
    name = _detect(probe)
    if name is None:
        name = _fallback(probe)
    return formats()[name].open(probe, adapter)


def _fallback(probe: Probe) -> str:
    """The reader whose error says best why no format claimed the path."""
    from nora_spectra.io.peft import is_adapter_weights_file

    if probe.is_dir or is_adapter_weights_file(probe):
        return "peft"
    if probe.adapter is not None:
        raise CheckpointError(probe.path, "--adapter NAME (adapter=NAME) needs an adapter directory, not a file")
    if probe.looks_like_safetensors():
        return "safetensors"
    if probe.path.endswith((".bin", ".pt", ".pth")):
        raise CheckpointError(
            probe.path,
            "a bare torch pickle is not supported unless it holds torchtune's <module>.lora_a.weight keys: put "
            "it in a directory as adapter_model.bin with an adapter_config.json, or convert it to safetensors",
        )
    raise CheckpointError(probe.path, "not an adapter: expected a .safetensors file or an adapter directory")
