"""PEFT-layout adapter directories (PEFT LoRA and our NoRA): config, weights file, adapter sub-directories.

Layout: ``<dir>/adapter_config.json`` plus ``<dir>/adapter_model.safetensors`` (or the legacy
``adapter_model.bin``). PEFT saves a non-default adapter ``NAME`` under ``<dir>/NAME/``. The ``peft``
and ``nora`` formats both read this layout; :func:`config_kind` tells them apart from the config.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from nora_spectra.errors import CheckpointError
from nora_spectra.io.adapter_config import CONFIG_NAME, peft_kind, read_adapter_config
from nora_spectra.io.assemble import assemble_checkpoint
from nora_spectra.io.checkpoint import Checkpoint
from nora_spectra.io.peft_keys import natural_key
from nora_spectra.io.safetensors_file import SafetensorsFile

if TYPE_CHECKING:  # pragma: no cover
    from nora_spectra.io.registry import Probe

__all__ = [
    "BIN_NAME",
    "SAFETENSORS_NAME",
    "config_kind",
    "is_adapter_weights_file",
    "load_adapter_directory",
    "open_peft_layout",
    "resolve_adapter_directory",
]

SAFETENSORS_NAME = "adapter_model.safetensors"
BIN_NAME = "adapter_model.bin"


def resolve_adapter_directory(directory: str, adapter: str | None) -> tuple[str, str | None, list[str]]:
    """Find the directory holding the adapter to load.

    Args:
        directory: the directory the user gave.
        adapter: an adapter name (a sub-directory), or None for the default adapter.

    Returns:
        (adapter directory, adapter name chosen or None, warnings).

    Raises:
        CheckpointError: the directory is empty, ``adapter`` names no sub-directory with a config, or
            there is no top-level config and several adapter sub-directories (their names are listed).
    """
    try:
        entries = sorted(os.listdir(directory), key=natural_key)
    except OSError as exc:
        raise CheckpointError(directory, f"cannot list directory: {exc.strerror or exc}") from exc
    if not entries:
        raise CheckpointError(directory, "empty directory: no adapter_config.json or weights")
    named = [e for e in entries if os.path.isfile(os.path.join(directory, e, CONFIG_NAME))]
    has_top = os.path.isfile(os.path.join(directory, CONFIG_NAME))
    if adapter is not None:
        if os.path.isfile(os.path.join(directory, adapter, CONFIG_NAME)):
            return os.path.join(directory, adapter), adapter, []
        if adapter == "default" and has_top:
            return directory, None, []
        found = ", ".join(named) if named else "none"
        raise CheckpointError(directory, f"no adapter named {adapter!r} (adapters in sub-directories: {found})")
    if has_top:
        warnings = [f"other adapters in sub-directories not loaded: {', '.join(named)}"] if named else []
        return directory, None, warnings
    if len(named) == 1:
        return (
            os.path.join(directory, named[0]),
            named[0],
            [f"no adapter_config.json at the top; loaded the only adapter, {named[0]!r}"],
        )
    if named:
        raise CheckpointError(directory, f"several adapters, choose one with --adapter NAME (adapter=NAME in Python): {', '.join(named)}")
    weights = [e for e in entries if e.endswith((".safetensors", ".bin"))]
    if weights:
        raise CheckpointError(
            directory, f"no adapter_config.json (found {', '.join(weights)}; pass the file itself to load it without config)"
        )
    raise CheckpointError(directory, "no adapter_config.json and no adapter sub-directories")


def load_adapter_directory(path: str, adapter: str | None = None) -> Checkpoint:
    """Load a PEFT LoRA or NoRA adapter directory.

    Args:
        path: the directory the user gave.
        adapter: adapter sub-directory name, or None.

    Returns:
        A :class:`Checkpoint` with format ``"peft"`` (LoRA) or ``"nora"`` (NoRA).

    Raises:
        CheckpointError: see :func:`resolve_adapter_directory`, the config, the weights file (missing,
            corrupt, unsafe pickle) and the keys.
    """
    directory, chosen, warnings = resolve_adapter_directory(path, adapter)
    settings = read_adapter_config(os.path.join(directory, CONFIG_NAME))
    safetensors_path = os.path.join(directory, SAFETENSORS_NAME)
    bin_path = os.path.join(directory, BIN_NAME)
    if os.path.isfile(safetensors_path):
        source = SafetensorsFile(safetensors_path)
    elif os.path.isfile(bin_path):
        from nora_spectra.io.torch_bin import TorchBinFile

        source = TorchBinFile(bin_path)
    else:
        raise CheckpointError(directory, f"no weights file ({SAFETENSORS_NAME} or {BIN_NAME})")
    fmt = "nora" if settings.kind == "nora" else "peft"
    return assemble_checkpoint(path, fmt, source, settings, warnings=warnings, adapter=chosen)


def is_adapter_weights_file(probe: "Probe") -> bool:
    """True when ``probe`` is ``adapter_model.safetensors`` / ``.bin`` next to an ``adapter_config.json``."""
    return probe.is_file and probe.name in (SAFETENSORS_NAME, BIN_NAME) and os.path.isfile(
        os.path.join(probe.directory, CONFIG_NAME)
    )


def config_kind(probe: "Probe") -> str | None:
    """``"lora"`` or ``"nora"`` when ``probe`` is a PEFT-layout adapter of that kind, else None.

    Reads only the config that :func:`load_adapter_directory` would read (the top-level one, the chosen
    adapter's, or that of the only sub-directory adapter; with several sub-directory adapters, their
    common kind). Never raises.
    """
    if is_adapter_weights_file(probe):
        configs = [os.path.join(probe.directory, CONFIG_NAME)]
    elif probe.is_dir:
        top = os.path.join(probe.path, CONFIG_NAME)
        named = [os.path.join(probe.path, e, CONFIG_NAME) for e in probe.entries]
        named = [c for c in named if os.path.isfile(c)]
        if probe.adapter is not None and probe.adapter != "default":
            configs = [os.path.join(probe.path, probe.adapter, CONFIG_NAME)]
        elif os.path.isfile(top):
            configs = [top]
        else:
            configs = named
    else:
        return None
    kinds = {peft_kind(probe.json(config)) for config in configs}
    return kinds.pop() if len(kinds) == 1 else None


def open_peft_layout(probe: "Probe", adapter: str | None) -> Checkpoint:
    """Load a PEFT-layout directory, or the weights file of one (``adapter_model.*`` beside its config)."""
    if probe.is_dir:
        return load_adapter_directory(probe.path, adapter)
    if not is_adapter_weights_file(probe):
        raise CheckpointError(
            probe.path, f"not a PEFT adapter: expected a directory with {CONFIG_NAME}, or its weights file"
        )
    if adapter is not None:
        raise CheckpointError(probe.path, "--adapter NAME (adapter=NAME) needs the adapter directory, not a weights file")
    checkpoint = load_adapter_directory(probe.directory)
    checkpoint.path = probe.path
    return checkpoint
