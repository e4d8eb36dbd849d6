"""What the ``nora`` commands share: one-line user errors, TOML configs, path options, seeding."""

from __future__ import annotations

import os
import sys
from typing import Any

import click

from nora_core.parsing import ParseError, read_toml, type_name

__all__ = [
    "BoundedInt",
    "ExistingPath",
    "UserError",
    "csv_list",
    "load_toml",
    "one_line",
    "progress_wanted",
    "run_or_fail",
    "seed_everything",
    "user_errors",
    "with_config",
]


class UserError(click.ClickException):
    exit_code = 2

    def show(self, file: Any = None) -> None:
        click.echo(f"nora: error: {self.format_message()}", err=True)


def user_errors() -> tuple[type[BaseException], ...]:
    from nora_core.data import DataFormatError
    from nora_core.trainer import NonFiniteLossError

    return (DataFormatError, NonFiniteLossError, FileNotFoundError)


def load_toml(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    """Eager ``--config`` callback: the TOML file becomes the defaults of the other options."""
    if value is None:
        return None
    try:
        data = read_toml(value)
    except OSError as exc:
        raise UserError(f"{value}: cannot read ({exc.strerror or exc})") from None
    except ParseError as exc:
        raise UserError(str(exc)) from None
    known: dict[str, str] = {}  # "model", "model_dir" -> "model_dir"; "r", "rank" -> "rank"
    paths: set[str] = set()  # options whose value is a path: relative ones are relative to the file
    flags: set[str] = set()  # boolean options: the file must say true or false
    for p in ctx.command.params:
        if p.name and p.name != "config":
            for alias in [p.name, *getattr(p, "opts", [])]:
                known[alias.lstrip("-").replace("-", "_")] = p.name
            if isinstance(p.type, (click.Path, ExistingPath)):
                paths.add(p.name)
            if isinstance(p.type, click.types.BoolParamType):
                flags.add(p.name)
    defaults = {}
    for key, item in data.items():
        name = known.get(key.replace("-", "_"))
        if name is None:
            raise UserError(f"{value}: unknown key {key!r} (use the option names of `nora train --help`)")
        scalar = (str, int, float, bool)
        if not (isinstance(item, scalar) or (isinstance(item, list) and all(isinstance(v, scalar) for v in item))):
            raise UserError(
                f"{value}: {key} must be a string, number, boolean or a list of them, got {type_name(item)}"
            )
        if isinstance(item, list):
            item = ",".join(str(v) for v in item)
        if name in paths and not isinstance(item, str):
            raise UserError(f"{value}: {key} must be a path (a string), got {type_name(item)}")
        if name in flags and not isinstance(item, bool):
            raise UserError(f"{value}: {key} must be true or false, got {type_name(item)}")
        if "\0" in str(item):
            raise UserError(f"{value}: {key} holds a NUL character")
        if name in paths:
            # as `spectra check` configs: a path in the file means the same wherever the command runs
            item = os.path.join(os.path.dirname(value), os.path.expanduser(item))
        defaults[name] = item
    ctx.default_map = {**(ctx.default_map or {}), **defaults}
    ctx.meta["nora.config"] = value
    return value


class BoundedInt(click.IntRange):
    """An integer option with bounds; a non-integer reads "'abc' is not a valid integer." as with ``int``."""

    name = "integer"


class ExistingPath(click.ParamType):
    """An existing file or directory; otherwise the one-line user error ``PATH: problem (--option)``."""

    name = "path"

    def __init__(self, *, directory: bool) -> None:
        self.directory = directory

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> str:
        path = os.fspath(value)
        kind = "directory" if self.directory else "file"
        if not os.path.exists(path):
            problem = f"no such {kind}"
        elif self.directory and not os.path.isdir(path):
            problem = "not a directory"
        elif not self.directory and os.path.isdir(path):
            problem = "is a directory, not a file"
        else:
            return path
        option = (getattr(param, "opts", None) or ["path"])[0]
        where = option
        if ctx is not None and param is not None and param.name:
            if ctx.get_parameter_source(param.name) is click.core.ParameterSource.DEFAULT_MAP:
                where = f"{option.lstrip('-')} in {ctx.meta.get('nora.config', 'the config')}"
        raise UserError(f"{path}: {problem} ({where})")


def csv_list(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


def progress_wanted(flag: bool | None) -> bool:
    """``--progress``/``--no-progress`` as given, else a bar only when stderr is a terminal."""
    return sys.stderr.isatty() if flag is None else bool(flag)


def one_line(message: str) -> str:
    return " ".join(line.strip() for line in message.splitlines() if line.strip())


def run_or_fail(fn: Any, *args: Any, **kwargs: Any) -> Any:
    """Call ``fn``; a ``ValueError`` a user can cause (bad setting) becomes one line, exit 2."""
    from nora_core.data import DataFormatError

    try:
        return fn(*args, **kwargs)
    except (DataFormatError, FileNotFoundError) as exc:  # name the config the path came from, if any
        raise UserError(with_config(str(exc), click.get_current_context(silent=True))) from None
    except OSError as exc:  # e.g. a run directory whose name is too long, or not writable
        where = f"{exc.filename}: " if exc.filename else ""
        raise UserError(with_config(f"{where}{exc.strerror or exc}", click.get_current_context(silent=True))) from None
    except user_errors():
        raise
    except (ValueError, TypeError) as exc:
        raise UserError(with_config(str(exc), click.get_current_context(silent=True))) from None


def with_config(message: str, ctx: click.Context | None) -> str:
    """``message``, followed by `` (options from FILE)`` when a ``--config`` file gave option values,
    so that an error about a value names the file it came from."""
    while ctx is not None:
        config = ctx.meta.get("nora.config")
        if config is not None:
            return message if config in message else f"{message} (options from {config})"
        ctx = ctx.parent
    return message


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's global RNGs (what the model build and ``inject_adapters`` draw from)."""
    import random

    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
