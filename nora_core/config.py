"""AdapterConfig: what to adapt and how, with a JSON form that PEFT reads as a ``LoraConfig``.

The per-module scale follows PEFT exactly:

.. math::

    s(\\text{name}) = \\frac{\\alpha(\\text{name})}{r(\\text{name})} \\quad\\text{or}\\quad
    \\frac{\\alpha(\\text{name})}{\\sqrt{r(\\text{name})}} \\;(\\text{rsLoRA})

where ``r(name)`` and ``alpha(name)`` come from ``rank_pattern`` / ``alpha_pattern`` when a key
matches (``re.match(rf"(.*\\.)?({key})$", name)``, first key in insertion order wins), else from
``r`` / ``alpha``. ``alpha=None`` means ``alpha(name) = r(name)``, i.e. scale 1 for every module
(``sqrt(r)`` with rsLoRA).
"""

from __future__ import annotations

import functools
import math
import re
from dataclasses import dataclass, field
from typing import Any

__all__ = ["ACTIVATIONS", "INITS", "METHODS", "AdapterConfig", "lora_scale", "match_pattern", "pattern_regex"]

METHODS = ("lora", "nora")
ACTIVATIONS = ("silu", "relu", "gelu", "identity")
INITS = ("default", "kaiming_uniform", "kaiming_normal")

_DEFAULT_DROPOUT = {"lora": 0.0, "nora": 0.1}
_DEFAULT_ACTIVATION = "silu"
_PEFT_TYPES = {"LORA": "lora", "NORA": "nora"}


@dataclass
class AdapterConfig:
    """Configuration of LoRA / NoRA adapters.

    Args:
        method: ``"lora"`` (``y = W0 x + s B A Dropout(x)``) or ``"nora"``
            (``y = W0 x + s B Dropout(act(A x))``).
        r: default rank of every adapter.
        alpha: default numerator of the scale; ``None`` means ``alpha = r`` of each module (scale 1).
        use_rslora: scale ``alpha / sqrt(r)`` instead of ``alpha / r`` (Kalajdzievski 2023).
        target_modules: a list (a module matches when its name equals an entry or ends with
            ``"." + entry``) or a string (a regex that must match the whole module name).
        exclude_modules: same forms as ``target_modules``; matching modules are never adapted.
        layers_to_transform: only adapt modules whose layer index (the first ``.<digits>.`` segment
            after a named parent, as PEFT) is in this list. Only with a list ``target_modules``.
        layers_pattern: name(s) of the layer container (``"layers"``, ``"h"``) used to find the layer
            index; ``None`` means the first numbered segment. Requires ``layers_to_transform``.
        rank_pattern: ``{regex key: rank}`` overriding ``r`` per module (PEFT semantics).
        alpha_pattern: ``{regex key: alpha}`` overriding ``alpha`` per module (PEFT semantics).
        dropout: LoRA: dropout on the input ``x`` (default 0.0, as PEFT). NoRA: dropout on the
            r-dimensional hidden after the activation (default 0.1). ``None`` picks the default.
        activation: NoRA's activation: ``"silu"`` (default), ``"relu"``, ``"gelu"``, ``"identity"``.
            With ``method="lora"`` only the default is accepted (LoRA has no activation; another value
            raises ``ValueError``).
        init: ``"default"`` (LoRA: A Kaiming-uniform ``a=sqrt(5)``; NoRA: A Kaiming-normal for relu),
            or force ``"kaiming_uniform"`` / ``"kaiming_normal"``. B is always zero.
        fan_in_fan_out: the targets store their weight as ``(d_in, d_out)`` (GPT-2's ``Conv1D``).
            As in PEFT, the layer type decides the orientation; a mismatch only warns.
        task_type: PEFT task type written to the JSON (e.g. ``"CAUSAL_LM"``), informational.
        base_model_name_or_path: written to the JSON, informational.

    Raises:
        ValueError: on construction, naming the bad field, when a value is invalid.
    """

    method: str = "lora"
    r: int = 8
    alpha: float | None = None
    use_rslora: bool = False
    target_modules: list[str] | str = field(default_factory=lambda: ["q_proj", "v_proj"])
    exclude_modules: list[str] | str | None = None
    layers_to_transform: list[int] | None = None
    layers_pattern: list[str] | str | None = None
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    dropout: float | None = None
    activation: str = _DEFAULT_ACTIVATION
    init: str = "default"
    fan_in_fan_out: bool = False
    task_type: str | None = None
    base_model_name_or_path: str | None = None

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")
        self.r = _positive_int("r", self.r)
        if self.alpha is not None:
            self.alpha = _positive_number("alpha", self.alpha)
        self.use_rslora = _boolean("use_rslora", self.use_rslora)
        self.fan_in_fan_out = _boolean("fan_in_fan_out", self.fan_in_fan_out)
        self.target_modules = _module_spec("target_modules", self.target_modules)
        if self.exclude_modules is not None:
            self.exclude_modules = _module_spec("exclude_modules", self.exclude_modules)
        self._check_layers()
        self.rank_pattern = _pattern("rank_pattern", self.rank_pattern, _positive_int)
        self.alpha_pattern = _pattern("alpha_pattern", self.alpha_pattern, _positive_number)
        if self.dropout is None:
            self.dropout = _DEFAULT_DROPOUT[self.method]
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float)):
            raise ValueError(f"dropout must be a number in [0, 1), got {self.dropout!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout!r}")
        self.dropout = float(self.dropout)
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {ACTIVATIONS}, got {self.activation!r}")
        if self.method == "lora" and self.activation != _DEFAULT_ACTIVATION:
            # LoRA has no activation: accepting one would train a linear adapter the user thinks is not
            raise ValueError(
                f"activation={self.activation!r} is NoRA-only; LoRA has no activation (use method='nora' "
                f"or leave activation at its default {_DEFAULT_ACTIVATION!r})"
            )
        if self.init not in INITS:
            raise ValueError(f"init must be one of {INITS}, got {self.init!r}")
        for name in ("task_type", "base_model_name_or_path"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, str):
                raise ValueError(f"{name} must be a string or None, got {value!r}")

    def _check_layers(self) -> None:
        layers = self.layers_to_transform
        if layers is not None:
            if isinstance(layers, int) and not isinstance(layers, bool):
                layers = [layers]
            if not isinstance(layers, (list, tuple)) or not all(
                isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in layers
            ):
                raise ValueError(f"layers_to_transform must be a list of non-negative ints, got {layers!r}")
            self.layers_to_transform = list(layers)
            if isinstance(self.target_modules, str):
                raise ValueError("layers_to_transform cannot be used when target_modules is a regex string")
        if self.layers_pattern is not None:
            if isinstance(self.layers_pattern, (list, tuple)):
                self.layers_pattern = list(self.layers_pattern)
            if not isinstance(self.layers_pattern, (str, list)) or not all(
                isinstance(p, str) and p for p in _as_list(self.layers_pattern)
            ):
                raise ValueError(f"layers_pattern must be a string or list of strings, got {self.layers_pattern!r}")
            if self.layers_to_transform is None:
                raise ValueError("layers_pattern requires layers_to_transform")
            if isinstance(self.target_modules, str):
                raise ValueError("layers_pattern cannot be used when target_modules is a regex string")

    # ------------------------------------------------------------------ per-module values
    def rank_for(self, module_name: str) -> int:
        """Rank of the adapter at ``module_name``: the first matching ``rank_pattern`` key, else ``r``."""
        key = match_pattern(self.rank_pattern, module_name)
        return self.r if key is None else self.rank_pattern[key]

    def alpha_for(self, module_name: str) -> float:
        """Alpha at ``module_name``: the first matching ``alpha_pattern`` key, else ``alpha``,
        else (``alpha=None``) the module's rank."""
        key = match_pattern(self.alpha_pattern, module_name)
        if key is not None:
            return self.alpha_pattern[key]
        return self.rank_for(module_name) if self.alpha is None else self.alpha

    def scale_for(self, module_name: str) -> float:
        """Scale ``s = alpha / r`` (or ``alpha / sqrt(r)`` with rsLoRA) at ``module_name``."""
        return lora_scale(self.alpha_for(module_name), self.rank_for(module_name), self.use_rslora)

    # ------------------------------------------------------------------ JSON (PEFT field names)
    def to_dict(self) -> dict[str, Any]:
        """The ``adapter_config.json`` content, with PEFT's field names.

        LoRA gives a dict that ``peft.LoraConfig`` accepts unchanged (``peft_type: "LORA"``). NoRA uses
        ``peft_type: "NORA"`` (unknown to PEFT, so PEFT refuses it) and adds ``activation``, ``dropout``
        (on the hidden) and ``init``; its ``lora_dropout`` (input dropout) is 0. ``alpha=None`` is
        written as ``lora_alpha = r`` plus an ``alpha_pattern`` entry per ``rank_pattern`` key, so every
        module keeps scale 1 when PEFT reads it.
        """
        alpha_pattern = dict(self.alpha_pattern)
        if self.alpha is None:
            for key, rank in self.rank_pattern.items():
                alpha_pattern.setdefault(key, rank)
        lora = self.method == "lora"
        out: dict[str, Any] = {
            "peft_type": self.method.upper(),
            "task_type": self.task_type,
            "base_model_name_or_path": self.base_model_name_or_path,
            "revision": None,
            "inference_mode": True,
            "r": self.r,
            "lora_alpha": self.r if self.alpha is None else self.alpha,
            "use_rslora": self.use_rslora,
            "target_modules": _copy_spec(self.target_modules),
            "exclude_modules": _copy_spec(self.exclude_modules),
            "layers_to_transform": None if self.layers_to_transform is None else list(self.layers_to_transform),
            "layers_pattern": _copy_spec(self.layers_pattern),
            "rank_pattern": dict(self.rank_pattern),
            "alpha_pattern": alpha_pattern,
            "lora_dropout": self.dropout if lora else 0.0,
            "fan_in_fan_out": self.fan_in_fan_out,
            "bias": "none",
            "use_dora": False,
            "modules_to_save": None,
            "init_lora_weights": True,
        }
        if not lora:
            out.update(activation=self.activation, dropout=self.dropout, init=self.init)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, allow_modules_to_save: bool = False) -> AdapterConfig:
        """Read an ``adapter_config.json`` dict written by us or by PEFT (LoRA); unknown fields are ignored.

        Args:
            data: the JSON object.
            allow_modules_to_save: accept PEFT's ``modules_to_save`` (modules trained in full, e.g. the
                classifier head PEFT adds for ``SEQ_CLS``). The config does not carry them: a caller that
                accepts them loads their saved weights itself (:func:`nora_core.checkpoint.load_adapter`
                with ``modules_to_save=True``); training never trains them.

        Raises:
            ValueError: for a ``peft_type`` other than LORA/NORA, or PEFT features these layers do not
                implement (DoRA, trained biases, ``modules_to_save`` unless allowed, ``target_parameters``).
        """
        if not isinstance(data, dict):
            raise ValueError(f"adapter config must be a JSON object, got {type(data).__name__}")
        peft_type = str(data.get("peft_type", "")).upper()
        if peft_type not in _PEFT_TYPES:
            raise ValueError(f"peft_type must be 'LORA' or 'NORA', got {data.get('peft_type')!r}")
        method = _PEFT_TYPES[peft_type]
        unsupported = {
            "use_dora": data.get("use_dora") not in (None, False),
            "lora_bias": data.get("lora_bias") not in (None, False),
            "bias": data.get("bias", "none") not in (None, "none"),
            "modules_to_save": bool(data.get("modules_to_save")) and not allow_modules_to_save,
            "target_parameters": bool(data.get("target_parameters")),
        }
        for name, bad in unsupported.items():
            if bad:
                raise ValueError(f"{name}={data.get(name)!r} is not supported (plain LoRA/NoRA factors only)")
        if data.get("target_modules") is None:
            raise ValueError("target_modules is missing or null")
        kwargs: dict[str, Any] = {
            "method": method,
            "r": data.get("r", 8),
            "alpha": data.get("lora_alpha", 8),
            "use_rslora": bool(data.get("use_rslora", False)),
            "target_modules": data["target_modules"],
            "exclude_modules": data.get("exclude_modules"),
            "layers_to_transform": data.get("layers_to_transform"),
            "layers_pattern": data.get("layers_pattern"),
            "rank_pattern": data.get("rank_pattern") or {},
            "alpha_pattern": data.get("alpha_pattern") or {},
            "fan_in_fan_out": bool(data.get("fan_in_fan_out", False)),
            "task_type": data.get("task_type"),
            "base_model_name_or_path": data.get("base_model_name_or_path"),
        }
        if method == "lora":
            kwargs["dropout"] = data.get("lora_dropout", 0.0)
        else:
            kwargs.update(
                dropout=data.get("dropout"),
                activation=data.get("activation", "silu"),
                init=data.get("init", "default"),
            )
        return cls(**kwargs)


# ---------------------------------------------------------------------- PEFT's rules (also used by nora_spectra.io)
def match_pattern(patterns: dict[str, Any], module_name: str) -> str | None:
    """PEFT's ``get_pattern_key``: the first key matching ``module_name`` as ``(.*\\.)?(key)$``, or None.

    Args:
        patterns: ``rank_pattern`` / ``alpha_pattern``: regex keys, tried in insertion order.
        module_name: a base-model module name, e.g. ``model.layers.0.self_attn.q_proj``.
    """
    for key in patterns:
        if pattern_regex(key).match(module_name):
            return key
    return None


@functools.lru_cache(maxsize=8192)
def pattern_regex(key: str) -> "re.Pattern[str]":
    """PEFT's anchored form ``(.*\.)?(key)$`` of a ``rank_pattern`` / ``alpha_pattern`` key, compiled once.

    ``re``'s own cache holds 512 patterns: a resized adapter with a key per module (hundreds of exact
    names) recompiled every key for every module lookup, seconds for a few hundred modules.

    Raises:
        re.error: ``key`` is not a regex (and whatever ``re.compile`` raises on absurd input).
    """
    return re.compile(rf"(.*\.)?({key})$")


def lora_scale(alpha: float, r: int, use_rslora: bool) -> float:
    """The adapter scale ``s``: ``alpha / r``, or ``alpha / sqrt(r)`` with rsLoRA (Kalajdzievski 2023)."""
    return alpha / (math.sqrt(r) if use_rslora else r)


# ---------------------------------------------------------------------- helpers


def _positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


def _positive_number(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a positive finite number, got {value!r}")
    return value


def _boolean(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be a bool, got {value!r}")
    return value


def _module_spec(name: str, value: Any) -> list[str] | str:
    if isinstance(value, str):
        if not value:
            raise ValueError(f"{name} must not be empty")
        try:
            re.compile(value)
        except re.error as exc:
            raise ValueError(f"{name} is not a valid regex ({exc}): {value!r}") from None
        return value
    if isinstance(value, (list, tuple, set, frozenset)):
        items = sorted(value) if isinstance(value, (set, frozenset)) else list(value)
        if not items or not all(isinstance(v, str) and v for v in items):
            raise ValueError(f"{name} must be a regex string or a non-empty list of names, got {value!r}")
        return items
    raise ValueError(f"{name} must be a regex string or a list of names, got {value!r}")


def _pattern(name: str, value: Any, check: Any) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ValueError(f"{name} must be a dict of regex key -> value, got {value!r}")
    out = {}
    for key, item in value.items():
        if not isinstance(key, str) or not key:
            raise ValueError(f"{name} keys must be non-empty strings, got {key!r}")
        try:
            re.compile(key)
        except re.error as exc:
            raise ValueError(f"{name} key {key!r} is not a valid regex ({exc})") from None
        out[key] = check(f"{name}[{key!r}]", item)
    return out


def _as_list(value: list[str] | str) -> list[str]:
    return [value] if isinstance(value, str) else list(value)


def _copy_spec(value: list[str] | str | None) -> list[str] | str | None:
    return list(value) if isinstance(value, list) else value
