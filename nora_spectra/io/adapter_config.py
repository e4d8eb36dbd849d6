"""``adapter_config.json``: validation and PEFT's per-module rank and scale rules.

PEFT (``peft/tuners/lora/model.py``) picks each module's rank and alpha from ``rank_pattern`` and
``alpha_pattern``, whose keys are regular expressions matched against the base-model module name as
``re.match(rf"(.*\\.)?({key})$", name)``; the first matching key wins, otherwise ``r`` and ``lora_alpha``
apply. The scale is ``alpha / r``, or ``alpha / sqrt(r)`` with ``use_rslora``. Unknown fields are ignored.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field
from typing import Any

from nora_core.config import (  # torch-free: PEFT's rules, written once
    lora_scale,
    match_pattern,
    pattern_regex,
)
from nora_core.parsing import ParseError, read_json, type_name
from nora_spectra.errors import CheckpointError

__all__ = ["CONFIG_NAME", "MAX_RANK", "AdapterSettings", "match_pattern", "peft_kind", "read_adapter_config", "settings_from_dict"]

CONFIG_NAME = "adapter_config.json"

# peft_type -> kind ("method") of the adapter.
_KINDS = {"LORA": "lora", "NORA": "nora"}
# PEFT's LoraConfig defaults, used when a field is absent.
_DEFAULT_R = 8
_DEFAULT_ALPHA = 8
#: the largest rank a config may give (a tensor dimension is at most 2**40 as well).
MAX_RANK = 2**40


@dataclass(frozen=True)
class AdapterSettings:
    """The fields of an adapter config that change the update ``scale * B @ A``.

    Attributes:
        kind: ``"lora"`` or ``"nora"``.
        r: default rank.
        lora_alpha: default alpha.
        use_rslora: scale by ``alpha / sqrt(r)`` instead of ``alpha / r``.
        rank_pattern: regex key -> rank, in file order (first match wins).
        alpha_pattern: regex key -> alpha, in file order (first match wins).
        fan_in_fan_out: the base layer stores its weight as (d_in, d_out) (GPT-2 ``Conv1D``).
        use_dora: the config asks for DoRA.
        modules_to_save: names of modules saved in full.
        raw: the whole config as read, unknown fields included.
    """

    kind: str
    r: int = _DEFAULT_R
    lora_alpha: float = _DEFAULT_ALPHA
    use_rslora: bool = False
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    fan_in_fan_out: bool = False
    use_dora: bool = False
    modules_to_save: tuple[str, ...] = ()
    raw: dict[str, Any] = field(default_factory=dict)

    def rank_for(self, module: str) -> int:
        """The rank PEFT gives ``module`` (``rank_pattern``'s first match, else ``r``)."""
        key = match_pattern(self.rank_pattern, module)
        return self.r if key is None else self.rank_pattern[key]

    def alpha_for(self, module: str) -> float:
        """The alpha PEFT gives ``module`` (``alpha_pattern``'s first match, else ``lora_alpha``)."""
        key = match_pattern(self.alpha_pattern, module)
        return self.lora_alpha if key is None else self.alpha_pattern[key]

    def scale_for(self, module: str) -> float:
        """``alpha / r`` or, with ``use_rslora``, ``alpha / sqrt(r)`` for ``module``."""
        return lora_scale(self.alpha_for(module), self.rank_for(module), self.use_rslora)


#: fields of mlx-lm's ``adapter_config.json``, which has no ``peft_type``: such a config is not PEFT's.
_MLX_FIELDS = ("lora_parameters", "fine_tune_type")


def peft_kind(raw: object) -> str | None:
    """The kind (``"lora"``, ``"nora"``) of a parsed config, from ``peft_type`` (absent: LORA); None if none.

    A config without ``peft_type`` but with mlx-lm's ``lora_parameters`` or ``fine_tune_type`` is mlx-lm's,
    not PEFT's: None.
    """
    if not isinstance(raw, dict):
        return None
    if "peft_type" not in raw and any(name in raw for name in _MLX_FIELDS):
        return None
    peft_type = raw.get("peft_type", "LORA")
    return _KINDS.get(peft_type.upper()) if isinstance(peft_type, str) else None


def read_adapter_config(path: str | os.PathLike[str]) -> AdapterSettings:
    """Read and validate an ``adapter_config.json``.

    Args:
        path: the JSON file.

    Returns:
        The validated settings.

    Raises:
        CheckpointError: the file is unreadable, not a JSON object, names an unsupported ``peft_type``,
            or holds an invalid ``r``, ``lora_alpha``, ``use_rslora``, ``fan_in_fan_out``,
            ``rank_pattern`` or ``alpha_pattern``.
    """
    path = os.fspath(path)
    try:
        raw = read_json(path)
    except OSError as exc:
        raise CheckpointError(path, f"cannot read adapter config: {exc.strerror or exc}") from None
    except ParseError as exc:
        raise CheckpointError(path, f"invalid adapter config: {exc.problem}") from None
    if not isinstance(raw, dict):
        raise CheckpointError(path, f"invalid adapter config: expected a JSON object, got {type_name(raw)}")
    return settings_from_dict(path, raw)


def settings_from_dict(path: str, raw: dict[str, Any], what: str = "adapter config") -> AdapterSettings:
    """Validate a parsed PEFT ``LoraConfig`` dict (an ``adapter_config.json``, or diffusers' header metadata).

    Args:
        path: the file the config came from, for messages.
        raw: the parsed config.
        what: how messages call the config.

    Raises:
        CheckpointError: see :func:`read_adapter_config`.
    """
    peft_type = raw.get("peft_type", "LORA")
    if not isinstance(peft_type, str) or peft_type.upper() not in _KINDS:
        raise CheckpointError(
            path, f"unsupported adapter type {peft_type!r} (supported: {', '.join(sorted(_KINDS))})"
        )

    def bad(name: str, expected: str) -> CheckpointError:
        return CheckpointError(path, f"invalid {what}: {name} must be {expected}, got {_shown(raw[name])}")

    r = raw.get("r", _DEFAULT_R)
    if not _is_positive_int(r):
        raise bad("r", "a positive integer (at most 2**40)")
    alpha = raw.get("lora_alpha", _DEFAULT_ALPHA)
    if not _is_finite_number(alpha):
        raise bad("lora_alpha", "a finite number")
    flags = {}
    for name in ("use_rslora", "fan_in_fan_out", "use_dora"):
        value = raw.get(name)
        if value is None:
            value = False
        if not isinstance(value, bool):
            raise bad(name, "true or false")
        flags[name] = value
    rank_pattern = _read_pattern(path, raw, "rank_pattern", _is_positive_int, "positive integers", what)
    alpha_pattern = _read_pattern(path, raw, "alpha_pattern", _is_finite_number, "finite numbers", what)
    modules_to_save = raw.get("modules_to_save")
    if modules_to_save is None:
        modules_to_save = ()
    elif isinstance(modules_to_save, str):
        modules_to_save = (modules_to_save,)
    elif isinstance(modules_to_save, list) and all(isinstance(m, str) for m in modules_to_save):
        modules_to_save = tuple(modules_to_save)
    else:
        raise bad("modules_to_save", "null, a module name or a list of module names")
    return AdapterSettings(
        kind=_KINDS[peft_type.upper()],
        r=r,
        lora_alpha=float(alpha),
        rank_pattern=rank_pattern,
        alpha_pattern=alpha_pattern,
        modules_to_save=modules_to_save,
        raw=raw,
        **flags,
    )


def _read_pattern(path: str, raw: dict, name: str, valid, expected: str, what: str = "adapter config") -> dict:
    pattern = raw.get(name)
    if pattern is None:
        return {}
    if not isinstance(pattern, dict) or not all(isinstance(k, str) and valid(v) for k, v in pattern.items()):
        raise CheckpointError(
            path, f"invalid {what}: {name} must map module patterns to {expected}, got {_shown(pattern)}"
        )
    for key in pattern:
        problem = _pattern_problem(key)
        if problem is not None:
            raise CheckpointError(path, f"invalid {what}: {name} key {_shown(key)} {problem}")
    return dict(pattern)


#: longest regex key accepted in rank_pattern / alpha_pattern (PEFT's are module names or short regexes).
MAX_PATTERN_CHARS = 1000
#: most unbounded repeats (``*``, ``+``, ``{n,}``) accepted in one key.
MAX_PATTERN_REPEATS = 4


def _pattern_problem(key: str) -> str | None:
    r"""Why a pattern key is refused, or None: not a regex, too long, or prone to catastrophic backtracking.

    PEFT matches every key against every module name with a backtracking engine
    (``re.match(rf"(.*\.)?({key})$", name)``). A repeat inside a repeat, or an alternation inside one
    (``(a+)+``, ``(a|aa)*``), can take exponential time on a crafted module name, so such keys are
    refused before any matching, as are keys with more than :data:`MAX_PATTERN_REPEATS` unbounded repeats.
    """
    if len(key) > MAX_PATTERN_CHARS:
        return f"is longer than {MAX_PATTERN_CHARS} characters"
    try:
        compiled = pattern_regex(key)
    except (re.error, RecursionError, OverflowError, ValueError) as exc:
        return f"is not a regex ({exc})"
    try:
        from re import _parser as sre_parse  # type: ignore[attr-defined]
    except ImportError:  # pragma: no cover - Python 3.10
        import sre_parse  # type: ignore[no-redef]
    repeats = sre_parse.MAX_REPEAT, sre_parse.MIN_REPEAT, getattr(sre_parse, "POSSESSIVE_REPEAT", None)
    unbounded = 0

    def walk(items, inside_repeat: bool) -> str | None:  # noqa: ANN001 - sre_parse's own types
        nonlocal unbounded
        for op, arg in items:
            if op in repeats:
                low, high, body = arg
                if high > 1:
                    if inside_repeat:
                        return "nests a repeat inside a repeat (catastrophic backtracking)"
                    if high == sre_parse.MAXREPEAT:
                        unbounded += 1
                problem = walk(body, inside_repeat or high > 1)
            elif op == sre_parse.BRANCH:
                if inside_repeat:
                    return "repeats an alternation (catastrophic backtracking)"
                problem = next((p for p in (walk(b, inside_repeat) for b in arg[1]) if p), None)
            elif op == sre_parse.SUBPATTERN:
                problem = walk(arg[-1], inside_repeat)
            elif op in (sre_parse.ASSERT, sre_parse.ASSERT_NOT):
                problem = walk(arg[1], inside_repeat)
            else:
                problem = None
            if problem:
                return problem
        return None

    problem = walk(sre_parse.parse(compiled.pattern), False)
    if problem is None and unbounded > MAX_PATTERN_REPEATS + 1:  # + 1: PEFT's own (.*\.)?
        problem = f"has more than {MAX_PATTERN_REPEATS} unbounded repeats"
    return problem


def _is_positive_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 < value <= MAX_RANK


def _shown(value: object, limit: int = 80) -> str:
    """``value`` for a message, JSON-like and cut to ``limit`` characters."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _is_finite_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
