"""Put adapters into any PyTorch model, find them again, and take them out.

Target matching follows PEFT (``peft.tuners.tuners_utils.check_target_module_exists``):

* ``exclude_modules`` first: a string is a regex full-match, a list matches a name exactly or as a
  dotted suffix (``name.endswith("." + entry)``);
* ``target_modules`` as a string: ``re.fullmatch(target_modules, name)``;
* as a list: the exact name, or a dotted suffix; only in the suffix case, ``layers_to_transform``
  keeps modules whose layer index (the first numbered segment, or the one after ``layers_pattern``)
  is listed.
"""

from __future__ import annotations

import copy
import re
import warnings
from dataclasses import dataclass, field
from typing import Iterator

import torch
from torch import nn

from nora_core.config import AdapterConfig
from nora_core.layers import AdapterLinear, is_conv1d

__all__ = [
    "adapter_config",
    "adapter_layers",
    "inject_adapters",
    "matches_target",
    "matching_modules",
    "overwrite_tensors",
    "unload",
]

_STATE_ATTR = "_nora_adapter_state"


@dataclass
class _AdapterState:
    """What ``inject_adapters`` remembers on the model: the config, the parameters it froze, and the
    original values of tensors :func:`overwrite_tensors` replaced (restored by :func:`unload`)."""

    config: AdapterConfig
    frozen: list[nn.Parameter] = field(default_factory=list)
    replaced: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)


def matches_target(config: AdapterConfig, name: str) -> bool:
    """Whether the module called ``name`` is adapted under ``config`` (PEFT's rules, see module doc)."""
    excl = config.exclude_modules
    if excl is not None:
        if isinstance(excl, str):
            if re.fullmatch(excl, name):
                return False
        elif name in excl or any(name.endswith("." + e) for e in excl):
            return False
    targets = config.target_modules
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    if name in targets:
        return True
    if not any(name.endswith("." + t) for t in targets):
        return False
    if config.layers_to_transform is None:
        return True
    index = _layer_index(name, config.layers_pattern)
    return index is not None and index in config.layers_to_transform


def _layer_index(name: str, layers_pattern: list[str] | str | None) -> int | None:
    if not layers_pattern:
        match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", name)
    else:
        match = None
        for pattern in [layers_pattern] if isinstance(layers_pattern, str) else layers_pattern:
            match = re.match(rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\.", name)
            if match is not None:
                break
    return None if match is None else int(match.group("idx"))


def _candidate_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """Named modules, with the insides of existing adapter layers skipped."""
    skip: list[str] = []
    for name, module in model.named_modules():
        if not name or any(name.startswith(prefix) for prefix in skip):
            continue
        if isinstance(module, AdapterLinear):
            skip.append(name + ".")
        yield name, module


def matching_modules(model: nn.Module, config: AdapterConfig) -> list[str]:
    """Names of the modules of ``model`` that ``config`` targets (existing adapter layers count by name)."""
    return [name for name, _ in _candidate_modules(model) if matches_target(config, name)]


def _no_match_error(model: nn.Module, config: AdapterConfig) -> ValueError:
    linear = [n for n, m in _candidate_modules(model) if isinstance(m, nn.Linear) or is_conv1d(m)]
    suffixes = list(dict.fromkeys(n.rsplit(".", 1)[-1] for n in linear))
    examples = linear[:4] or [n for n, _ in _candidate_modules(model)][:4]
    details = f"target_modules={config.target_modules!r}"
    if config.exclude_modules is not None:
        details += f", exclude_modules={config.exclude_modules!r}"
    if config.layers_to_transform is not None:
        details += f", layers_to_transform={config.layers_to_transform!r}"
    return ValueError(
        f"no module of the model matched {details}. "
        f"Linear layers end in {suffixes[:12]!r}; examples: {examples!r}"
    )


def inject_adapters(model: nn.Module, config: AdapterConfig) -> nn.Module:
    """Wrap every matching ``nn.Linear`` / ``Conv1D`` in an :class:`AdapterLinear` and freeze the rest.

    Args:
        model: any ``nn.Module``; modified in place.
        config: what to adapt and how.

    Returns:
        ``model``, in which only the adapters' ``lora_A.weight`` / ``lora_B.weight`` require grad.

    Raises:
        ValueError: if the model already holds adapters, if nothing matches (the message lists the
            targets and module names that exist), or if a matching module is not a linear layer.
    """
    if any(isinstance(m, AdapterLinear) for m in model.modules()):
        raise ValueError("the model already holds adapters; call unload(model) first")
    targets = [(name, model.get_submodule(name)) for name in matching_modules(model, config)]
    if not targets:
        raise _no_match_error(model, config)
    for name, module in targets:
        if not (isinstance(module, nn.Linear) or is_conv1d(module)):
            raise ValueError(
                f"module {name!r} matched the targets but is a {type(module).__name__}; "
                "only nn.Linear and transformers' Conv1D can be adapted"
            )
        if is_conv1d(module) != config.fan_in_fan_out:
            warnings.warn(
                f"fan_in_fan_out={config.fan_in_fan_out} but {name!r} is a {type(module).__name__}; "
                "using the layer's own weight layout",
                stacklevel=2,
            )
    state = _AdapterState(config=copy.deepcopy(config))  # later edits to the caller's config change nothing
    for param in model.parameters():
        if param.requires_grad:
            param.requires_grad_(False)
            state.frozen.append(param)
    for name, module in targets:
        layer = AdapterLinear(
            module,
            config.rank_for(name),
            config.scale_for(name),
            method=config.method,
            dropout=config.dropout,
            activation=config.activation,
            init=config.init,
        )
        _set_submodule(model, name, layer)
    setattr(model, _STATE_ATTR, state)
    return model


def adapter_layers(model: nn.Module) -> Iterator[tuple[str, AdapterLinear]]:
    """``(module name, layer)`` for every :class:`AdapterLinear` in ``model``, in module order."""
    for name, module in model.named_modules():
        if isinstance(module, AdapterLinear):
            yield name, module


def adapter_config(model: nn.Module) -> AdapterConfig | None:
    """The config ``inject_adapters`` (or ``load_adapter``) used on ``model``, or None."""
    state = getattr(model, _STATE_ATTR, None)
    return None if state is None else state.config


def unload(model: nn.Module) -> nn.Module:
    """Replace every adapter layer by its plain base layer (the adapter is discarded, not merged).

    Parameters that ``inject_adapters`` froze get ``requires_grad=True`` back.

    Returns:
        ``model``, modified in place.

    Raises:
        ValueError: if the model holds no adapters.
    """
    layers = list(adapter_layers(model))
    if not layers:
        raise ValueError("the model holds no adapters to unload")
    for name, layer in layers:
        _set_submodule(model, name, layer.base_layer)
    state = getattr(model, _STATE_ATTR, None)
    if state is not None:
        for param in state.frozen:
            param.requires_grad_(True)
        with torch.no_grad():
            for target, original in reversed(state.replaced):
                target.copy_(original)
        delattr(model, _STATE_ATTR)
    return model


def overwrite_tensors(model: nn.Module, values: dict[str, torch.Tensor]) -> None:
    """Copy ``values`` into the model's parameters or buffers (by state-dict name), in place, keeping the
    originals so that :func:`unload` restores them (PEFT's ``modules_to_save``: whole modules saved with
    an adapter, such as a classifier head).

    Args:
        model: a model holding adapters (injected by :func:`inject_adapters`).
        values: state-dict name -> tensor of the target's shape (cast to its dtype).

    Raises:
        ValueError: the model holds no adapters, a name is not a tensor of the model, or a shape differs.
    """
    state = getattr(model, _STATE_ATTR, None)
    if state is None:
        raise ValueError("the model holds no adapters (call inject_adapters first)")
    targets = dict(model.named_parameters())
    targets.update(dict(model.named_buffers()))
    for name, value in values.items():
        if name not in targets:
            raise ValueError(f"{name}: not a parameter or buffer of the model")
        if tuple(value.shape) != tuple(targets[name].shape):
            raise ValueError(f"{name} has shape {tuple(value.shape)}, the model's is {tuple(targets[name].shape)}")
    with torch.no_grad():
        for name, value in values.items():
            target = targets[name]
            state.replaced.append((target, target.detach().clone()))
            target.copy_(value)


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)
