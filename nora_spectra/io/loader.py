"""``load_checkpoint``: decide what a path is and hand it to the right reader."""

from __future__ import annotations

import os

from nora_spectra.errors import CheckpointError
from nora_spectra.io.adapter_config import CONFIG_NAME
from nora_spectra.io.assemble import assemble_checkpoint
from nora_spectra.io.checkpoint import Checkpoint
from nora_spectra.io.peft import BIN_NAME, SAFETENSORS_NAME, load_adapter_directory
from nora_spectra.io.safetensors_file import SafetensorsFile

__all__ = ["load_checkpoint"]


def load_checkpoint(path: str | os.PathLike[str], adapter: str | None = None) -> Checkpoint:
    """Open and validate an adapter checkpoint without reading any tensor.

    Accepted inputs:

    - a PEFT LoRA directory (format ``"peft"``) or a NoRA directory (format ``"nora"``):
      ``adapter_config.json`` + ``adapter_model.safetensors`` (or ``adapter_model.bin``, loaded only with
      ``torch.load(weights_only=True)``); ``adapter=NAME`` selects the sub-directory ``<path>/NAME/``;
    - the weights file of such a directory (``adapter_model.safetensors`` / ``.bin`` next to an
      ``adapter_config.json``): loaded as the directory;
    - a bare ``.safetensors`` file with ``lora_A``/``lora_B`` keys (format ``"safetensors"``): no config,
      scale 1, with a warning.

    Args:
        path: a directory or a file.
        adapter: the name of an adapter saved in a sub-directory, or None for the default one.

    Returns:
        A :class:`Checkpoint`; iterate its layers with :meth:`Checkpoint.iter_layers`.

    Raises:
        CheckpointError: anything wrong with the input (missing path, empty directory, no weights file,
            invalid config, corrupt safetensors, unsafe pickle, unpaired or mismatched factors, rank
            mismatch with the config, a file that is not an adapter); the message starts with the path.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise CheckpointError(path, "no such file or directory")
    if os.path.isdir(path):
        return load_adapter_directory(path, adapter)
    if not os.path.isfile(path):
        raise CheckpointError(path, "not a regular file or directory")
    parent = os.path.dirname(os.path.abspath(path))
    name = os.path.basename(path)
    if name in (SAFETENSORS_NAME, BIN_NAME) and os.path.isfile(os.path.join(parent, CONFIG_NAME)):
        if adapter is not None:
            raise CheckpointError(path, "--adapter NAME (adapter=NAME) needs the adapter directory, not a weights file")
        checkpoint = load_adapter_directory(parent)
        checkpoint.path = path
        return checkpoint
    if adapter is not None:
        raise CheckpointError(path, "--adapter NAME (adapter=NAME) needs an adapter directory, not a file")
    if name.endswith(".safetensors") or _looks_like_safetensors(path):
        return assemble_checkpoint(path, "safetensors", SafetensorsFile(path), None)
    if name.endswith((".bin", ".pt", ".pth")):
        raise CheckpointError(
            path,
            f"a bare torch pickle is not supported: put it in a directory as {BIN_NAME} with an "
            f"{CONFIG_NAME}, or convert it to safetensors",
        )
    raise CheckpointError(path, "not an adapter: expected a .safetensors file or an adapter directory")


def _looks_like_safetensors(path: str) -> bool:
    """A cheap sniff for safetensors content under another file name: header length, then ``{``."""
    try:
        with open(path, "rb") as handle:
            prefix = handle.read(9)
        size = os.path.getsize(path)
    except OSError:
        return False
    return len(prefix) == 9 and 8 + int.from_bytes(prefix[:8], "little") <= size and prefix[8:9] == b"{"
