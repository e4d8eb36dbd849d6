"""Save and load adapters in PEFT's on-disk layout.

A checkpoint directory holds

* ``adapter_config.json``: :meth:`AdapterConfig.to_dict` (PEFT's ``LoraConfig`` fields; NoRA adds
  ``peft_type: "NORA"``, ``activation``, ``dropout``, ``init``);
* ``adapter_model.safetensors``: ``base_model.model.<module>.lora_A.weight`` (r, d_in) and
  ``...lora_B.weight`` (d_out, r), in the model's dtype, header metadata ``{"format": "pt"}``.

Both files are written as one unit (a temporary directory, fsync, then one rename or exchange): a
crash never leaves new weights beside an old config. Legacy ``adapter_model.bin`` files are read with
``torch.load(weights_only=True)``, never unpickled.
"""

from __future__ import annotations

import json
import math
import os
import pickle
import re
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save
from torch import nn

from nora_core.atomic import atomic_directory, fsync_directory
from nora_core.config import AdapterConfig
from nora_core.inject import (
    adapter_config,
    adapter_layers,
    inject_adapters,
    matching_modules,
    overwrite_tensors,
    unload,
)
from nora_core.parsing import ParseError, read_json, type_name

__all__ = [
    "CONFIG_NAME",
    "KEY_PREFIX",
    "LEGACY_WEIGHTS_NAME",
    "WEIGHTS_NAME",
    "adapter_state_dict",
    "load_adapter",
    "read_adapter_config",
    "read_adapter_weights",
    "save_adapter",
    "write_adapter_files",
]

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
LEGACY_WEIGHTS_NAME = "adapter_model.bin"
KEY_PREFIX = "base_model.model."


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter factors of ``model``, keyed ``<module>.lora_A.weight`` / ``<module>.lora_B.weight``.

    Returns:
        Detached tensors sharing storage with the model (clone them to keep a snapshot).

    Raises:
        ValueError: if the model holds no adapters.
    """
    out: dict[str, torch.Tensor] = {}
    for name, layer in adapter_layers(model):
        for local in layer.adapter_params():
            out[f"{name}.{local}"] = layer.get_parameter(local).detach()
    if not out:
        raise ValueError("the model holds no adapters (call inject_adapters first)")
    return out


def save_adapter(model: nn.Module, directory: str | os.PathLike[str]) -> Path:
    """Write ``adapter_config.json`` and ``adapter_model.safetensors`` into ``directory`` as one unit.

    Both files are written into a temporary directory beside ``directory`` (same parent, so the same
    file system), each fsynced, then that directory takes ``directory``'s place in one step
    (:func:`nora_core.atomic.atomic_directory`); anything else ``directory`` held (a README, other
    adapters' sub-directories) is hard-linked (else copied) into it first. A crash at any point leaves
    the old pair, or the new pair, never new weights beside an old config. Parents are created.

    Returns:
        The directory as a ``Path``.

    Raises:
        ValueError: if the model holds no adapters or was not injected by ``inject_adapters``.
    """
    files = _adapter_files(model)
    path = Path(directory)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_directory(path) as tmp:
        if path.is_dir():
            _carry_over(path, tmp)
        _write_synced(tmp, files)
    return path


def write_adapter_files(model: nn.Module, directory: str | os.PathLike[str]) -> None:
    """Write the adapter pair into ``directory``, an existing directory that the caller itself puts in place
    atomically (the trainer's checkpoint directories): each file and the directory are fsynced.

    Raises:
        ValueError: as :func:`save_adapter`.
    """
    _write_synced(Path(directory), _adapter_files(model))
    fsync_directory(directory)


def _adapter_files(model: nn.Module) -> dict[str, bytes]:
    """File name -> content of the adapter pair of ``model`` (PEFT layout)."""
    config = adapter_config(model)
    if config is None:
        raise ValueError("the model holds no adapter config (call inject_adapters or load_adapter first)")
    tensors = {KEY_PREFIX + k: v.contiguous() for k, v in adapter_state_dict(model).items()}
    text = json.dumps(config.to_dict(), indent=2, sort_keys=True) + "\n"
    return {WEIGHTS_NAME: save(tensors, metadata={"format": "pt"}), CONFIG_NAME: text.encode("utf-8")}


def _write_synced(directory: Path, files: dict[str, bytes]) -> None:
    for name, data in files.items():
        with open(directory / name, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())


def _carry_over(old: Path, new: Path) -> None:
    """Hard-link (else copy) everything of ``old`` but the adapter pair into ``new``, keeping the tree."""

    def link(src: str, dst: str) -> None:
        try:
            os.link(src, dst)
        except OSError:
            shutil.copy2(src, dst)

    for entry in os.scandir(old):
        if entry.name in (CONFIG_NAME, WEIGHTS_NAME):
            continue
        target = new / entry.name
        if entry.is_dir(follow_symlinks=False):
            shutil.copytree(entry.path, target, symlinks=True, copy_function=link)
        elif entry.is_symlink():
            os.symlink(os.readlink(entry.path), target)
        else:
            link(entry.path, os.fspath(target))


def _read_config_json(directory: str | os.PathLike[str]) -> tuple[dict, Path]:
    path = Path(directory)
    if not path.is_dir():
        raise FileNotFoundError(f"adapter directory not found: {path}")
    file = path / CONFIG_NAME
    if not file.is_file():
        raise FileNotFoundError(f"{file}: missing (an adapter directory needs {CONFIG_NAME})")
    try:
        data = read_json(file)
    except ParseError as exc:
        raise ValueError(str(exc)) from None
    if not isinstance(data, dict):
        raise ValueError(f"{file}: expected a JSON object, got {type_name(data)}")
    return data, file


def read_adapter_config(directory: str | os.PathLike[str], *, allow_modules_to_save: bool = False) -> AdapterConfig:
    """Parse ``directory/adapter_config.json`` (ours or PEFT's LoRA).

    Args:
        directory: the adapter directory.
        allow_modules_to_save: accept PEFT's ``modules_to_save`` (see :meth:`AdapterConfig.from_dict`).

    Raises:
        FileNotFoundError: if the directory or the file does not exist.
        ValueError: naming the file, if it is not valid JSON or not a supported config.
    """
    data, file = _read_config_json(directory)
    return _config_from(data, file, allow_modules_to_save=allow_modules_to_save)


def _config_from(data: dict, file: Path, *, allow_modules_to_save: bool) -> AdapterConfig:
    """:meth:`AdapterConfig.from_dict` of ``file``'s parsed content, errors naming ``file``."""
    try:
        return AdapterConfig.from_dict(data, allow_modules_to_save=allow_modules_to_save)
    except (ValueError, TypeError) as exc:
        raise ValueError(f"{file}: {exc}") from None


def read_adapter_weights(directory: str | os.PathLike[str]) -> tuple[dict[str, torch.Tensor], Path]:
    """Read the adapter tensors of ``directory``.

    Returns:
        ``(tensors, file)``: tensors keyed without the ``base_model.model.`` prefix, and the file read.

    Raises:
        FileNotFoundError: if neither ``adapter_model.safetensors`` nor ``adapter_model.bin`` exists.
        ValueError: naming the file, if it cannot be parsed.
    """
    path = Path(directory)
    file = path / WEIGHTS_NAME
    try:
        if file.is_file():
            raw = load_file(file)
        elif (path / LEGACY_WEIGHTS_NAME).is_file():
            file = path / LEGACY_WEIGHTS_NAME
            raw = torch.load(file, map_location="cpu", weights_only=True)
            if not isinstance(raw, dict) or not all(isinstance(v, torch.Tensor) for v in raw.values()):
                raise ValueError("expected a dict of tensors")
        else:
            raise FileNotFoundError(f"{file}: missing (and no {LEGACY_WEIGHTS_NAME} either)")
    except (SafetensorError, OSError, RuntimeError, ValueError, EOFError, pickle.UnpicklingError) as exc:
        if isinstance(exc, FileNotFoundError):
            raise
        raise ValueError(f"{file}: cannot read adapter weights ({exc})") from None
    return {k.removeprefix(KEY_PREFIX): v for k, v in raw.items()}, file


def load_adapter(model: nn.Module, directory: str | os.PathLike[str], *, modules_to_save: bool = False) -> nn.Module:
    """Load an adapter directory (ours, LoRA or NoRA, or PEFT's LoRA) into ``model``.

    On a plain model the adapters are injected per the saved config first. On a model that already
    holds adapters (e.g. a trainer resuming) the saved config must describe the same layers (modules,
    method, rank, scale, activation) and only the weights are loaded. Tensors are cast to the model's
    dtype, so same-dtype loads are bit-exact.

    Args:
        model: the base model (or the same model with adapters already injected).
        directory: a directory holding ``adapter_config.json`` and the weights.
        modules_to_save: accept a PEFT config with ``modules_to_save`` (e.g. the classifier head of a
            ``SEQ_CLS`` adapter) and copy those modules' saved weights into the model, in place;
            :func:`nora_core.inject.unload` restores the originals. Only on a plain model.

    Returns:
        ``model``, modified in place.

    Raises:
        FileNotFoundError: naming the missing directory or file.
        ValueError: naming the file, for a bad config, missing or unexpected keys, or shape mismatches.
    """
    data, config_file = _read_config_json(directory)  # read once: the config and its modules_to_save
    config = _config_from(data, config_file, allow_modules_to_save=modules_to_save)
    saved_modules = _modules_to_save(data, config_file) if modules_to_save else []
    tensors, weights_file = read_adapter_weights(directory)
    injected_here = not any(True for _ in adapter_layers(model))
    if injected_here:
        inject_adapters(model, config)
    else:
        if saved_modules:
            raise ValueError(f"{Path(directory) / CONFIG_NAME}: modules_to_save can only be loaded into a plain model")
        _check_compatible(model, config, Path(directory) / CONFIG_NAME)
    try:
        own = adapter_state_dict(model)
        full = _saved_module_tensors(tensors, set(own), saved_modules, weights_file)
        _copy_weights(model, {k: v for k, v in tensors.items() if k not in full}, weights_file)
        if full:
            try:
                overwrite_tensors(model, {name: tensors[key] for key, name in full.items()})
            except ValueError as exc:
                raise ValueError(f"{weights_file}: modules_to_save do not fit the model: {exc}") from None
    except BaseException:
        if injected_here:
            unload(model)
        raise
    return model


def _modules_to_save(data: dict, file: Path) -> list[str]:
    """The ``modules_to_save`` names of a parsed adapter config (``file``, for messages)."""
    names = data.get("modules_to_save")
    if names is None:
        return []
    names = [names] if isinstance(names, str) else names
    if not isinstance(names, list) or not all(isinstance(n, str) and n for n in names):
        raise ValueError(f"{file}: modules_to_save must be a list of module names, got {names!r}")
    return names


def _saved_module_tensors(
    tensors: dict[str, torch.Tensor], adapter_keys: set[str], saved_modules: list[str], file: Path
) -> dict[str, str]:
    """Stored key -> model state-dict name, for the tensors of ``modules_to_save`` modules.

    PEFT stores them as ``<module>.<param>`` (older versions ``<module>.modules_to_save.<adapter>.<param>``);
    a module matches an entry by name or dotted suffix, as PEFT matches ``modules_to_save``.
    """
    out: dict[str, str] = {}
    if not saved_modules:
        return out
    for key in tensors:
        if key in adapter_keys:
            continue
        name = re.sub(r"\.modules_to_save\.[^.]+(?=\.)", "", key)
        module = name.rpartition(".")[0]
        if any(module == m or module.endswith("." + m) for m in saved_modules):
            out[key] = name
    return out


def _check_compatible(model: nn.Module, config: AdapterConfig, file: Path) -> None:
    layers = dict(adapter_layers(model))
    expected = set(matching_modules(model, config))
    if expected != set(layers):
        differ = sorted(set(layers) ^ expected)[:3]
        raise ValueError(
            f"{file}: the model already holds adapters on other modules than the saved config targets "
            f"(they differ on e.g. {differ}); call unload(model) first or load into a plain model"
        )
    for name, layer in layers.items():
        want = (config.method, config.rank_for(name), config.activation if config.method == "nora" else "identity")
        have = (layer.method, layer.r, layer.activation_name)
        if want != have or not math.isclose(layer.scaling, config.scale_for(name), rel_tol=1e-12):
            raise ValueError(
                f"{file}: module {name!r} holds a {have[0]} adapter (r={have[1]}, scaling={layer.scaling:g}, "
                f"activation={have[2]}) but the saved config asks for {want[0]} (r={want[1]}, "
                f"scaling={config.scale_for(name):g}, activation={want[2]})"
            )


def _copy_weights(model: nn.Module, tensors: dict[str, torch.Tensor], file: Path) -> None:
    own = adapter_state_dict(model)
    missing = sorted(set(own) - set(tensors))
    unexpected = sorted(set(tensors) - set(own))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing key(s), e.g. {missing[:3]}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected key(s), e.g. {unexpected[:3]}")
        raise ValueError(f"{file}: keys do not match the model's adapters: " + "; ".join(parts))
    for key, target in own.items():
        if tuple(tensors[key].shape) != tuple(target.shape):
            raise ValueError(
                f"{file}: {key} has shape {tuple(tensors[key].shape)}, the model expects {tuple(target.shape)}"
            )
    with torch.no_grad():
        for key, target in own.items():
            target.copy_(tensors[key])
