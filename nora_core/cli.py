"""The ``nora`` command: ``nora train``, ``nora pretrain`` and ``nora demo``.

Logs and the progress bar go to stderr, results to stdout. A user error (bad option, missing or
malformed file, a non-finite loss) is one line on stderr and exit code 2.

``nora train`` takes flags or a TOML file (``--config run.toml``) whose keys are the option names
(``steps = 200``, ``method = "nora"``, ``targets = ["q_proj", "v_proj"]``); flags given on the command
line override the file. Relative paths in the file are relative to the file's directory.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import click

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10 uses the backport declared in pyproject.toml
    import tomli as tomllib

__all__ = ["cli", "main", "DEMO_DEFAULTS"]

logger = logging.getLogger("nora_core.cli")


class _UserError(click.ClickException):
    exit_code = 2

    def show(self, file: Any = None) -> None:
        click.echo(f"nora: error: {self.format_message()}", err=True)


def _user_errors() -> tuple[type[BaseException], ...]:
    from nora_core.data import DataFormatError
    from nora_core.trainer import NonFiniteLossError

    return (DataFormatError, NonFiniteLossError, FileNotFoundError)


# ------------------------------------------------------------------------------------- TOML config


def _load_toml(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    """Eager ``--config`` callback: the TOML file becomes the defaults of the other options."""
    if value is None:
        return None
    try:
        with open(value, "rb") as handle:
            data = tomllib.load(handle)
    except OSError as exc:
        raise _UserError(f"{value}: cannot read ({exc.strerror})") from None
    except tomllib.TOMLDecodeError as exc:
        raise _UserError(f"{value}: invalid TOML ({exc})") from None
    known: dict[str, str] = {}  # "model", "model_dir" -> "model_dir"; "r", "rank" -> "rank"
    paths: set[str] = set()  # options whose value is a path: relative ones are relative to the file
    for p in ctx.command.params:
        if p.name and p.name != "config":
            for alias in [p.name, *getattr(p, "opts", [])]:
                known[alias.lstrip("-").replace("-", "_")] = p.name
            if isinstance(p.type, (click.Path, _ExistingPath)):
                paths.add(p.name)
    defaults = {}
    for key, item in data.items():
        name = known.get(key.replace("-", "_"))
        if name is None:
            raise _UserError(f"{value}: unknown key {key!r} (use the option names of `nora train --help`)")
        if isinstance(item, list):
            item = ",".join(str(v) for v in item)
        if name in paths and isinstance(item, str):
            # as `spectra check` configs: a path in the file means the same wherever the command runs
            item = os.path.join(os.path.dirname(value), os.path.expanduser(item))
        defaults[name] = item
    ctx.default_map = {**(ctx.default_map or {}), **defaults}
    ctx.meta["nora.config"] = value
    return value


class _ExistingPath(click.ParamType):
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
        raise _UserError(f"{path}: {problem} ({where})")


def _csv(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


# -------------------------------------------------------------------------------------------- group


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-v", "--verbose", count=True, help="-v: progress messages, -vv: debug.")
def cli(verbose: int) -> None:
    """nora: fine-tune LoRA and NoRA adapters, and track their spectra while training."""
    level = logging.WARNING if verbose == 0 else logging.INFO if verbose == 1 else logging.DEBUG
    logging.basicConfig(level=level, format="nora: %(message)s", stream=sys.stderr)


def _progress_wanted(flag: bool | None) -> bool:
    """``--progress``/``--no-progress`` as given, else a bar only when stderr is a terminal."""
    return sys.stderr.isatty() if flag is None else bool(flag)


def main(argv: list[str] | None = None) -> None:
    """Run the CLI; user errors exit with code 2 and one line on stderr."""
    try:
        cli.main(args=argv, prog_name="nora", standalone_mode=False)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except click.exceptions.NoArgsIsHelpError as exc:  # plain `nora`: the help, as click prints it
        exc.show()
        sys.exit(2)
    except click.ClickException as exc:
        # click's usage errors (missing option, bad value, unknown option) print usage, a hint and the
        # error on four lines; a user error of `nora` is one line
        click.echo(f"nora: error: {_one_line(exc.format_message())}", err=True)
        sys.exit(2)
    except click.exceptions.Abort:
        click.echo("Aborted!", err=True)
        sys.exit(130)
    except _user_errors() as exc:
        click.echo(f"nora: error: {exc}", err=True)
        sys.exit(2)


def _one_line(message: str) -> str:
    return " ".join(line.strip() for line in message.splitlines() if line.strip())


def _run_or_fail(fn: Any, *args: Any, **kwargs: Any) -> Any:
    """Call ``fn``; a ``ValueError`` a user can cause (bad setting) becomes one line, exit 2."""
    try:
        return fn(*args, **kwargs)
    except _user_errors():
        raise
    except (ValueError, TypeError) as exc:
        raise _UserError(str(exc)) from None


# -------------------------------------------------------------------------------------------- train


@cli.command("train")
@click.option("--config", type=click.Path(dir_okay=False), is_eager=True, expose_value=False,
              callback=_load_toml, help="TOML file of option values (flags override it).")
@click.option("--model", "model_dir", type=_ExistingPath(directory=True), required=True,
              help="Base model directory written by `nora pretrain` (config.json + model.safetensors).")
@click.option("--data", type=_ExistingPath(directory=False), required=True, help="Training JSONL.")
@click.option("--eval-data", type=_ExistingPath(directory=False), help="Validation JSONL.")
@click.option("--format", "data_format", type=click.Choice(["auto", "text", "qa", "mathinstruct", "conversations"]),
              default="auto", show_default=True, help="Record format of the JSONL files.")
@click.option("--max-length", type=int, default=256, show_default=True,
              help="Longest sequence in tokens (capped at the model's block size).")
@click.option("--response-only/--full-sequence", default=True, show_default=True,
              help="Compute the loss on the answer only, or on prompt and answer.")
@click.option("--skip-malformed", is_flag=True, help="Skip malformed JSONL lines (counted) instead of failing.")
@click.option("--method", type=click.Choice(["lora", "nora"]), default="nora", show_default=True)
@click.option("--r", "rank", type=int, default=8, show_default=True, help="Adapter rank.")
@click.option("--alpha", type=float, help="Scale numerator (scale = alpha / r); default alpha = r.")
@click.option("--rslora", is_flag=True, help="Scale alpha / sqrt(r).")
@click.option("--activation", type=click.Choice(["silu", "relu", "gelu", "identity"]), default="silu",
              show_default=True, help="NoRA's activation.")
@click.option("--dropout", type=float, help="Adapter dropout (default: LoRA 0.0, NoRA 0.1).")
@click.option("--targets", default="q_proj,v_proj", show_default=True, help="Comma-separated target modules.")
@click.option("--run-dir", type=click.Path(file_okay=False), required=True,
              help="Where checkpoints, metrics.jsonl and the adapter go.")
@click.option("--steps", type=int, default=200, show_default=True)
@click.option("--batch-size", type=int, default=16, show_default=True, help="Global batch (sequences per step).")
@click.option("--grad-accum", type=int, default=1, show_default=True)
@click.option("--lr", type=float, default=1e-3, show_default=True)
@click.option("--warmup", type=int, default=10, show_default=True, help="Linear warmup steps (at most --steps).")
@click.option("--min-lr-ratio", type=float, default=0.1, show_default=True)
@click.option("--weight-decay", type=float, default=0.0, show_default=True)
@click.option("--grad-clip", type=float, default=1.0, show_default=True, help="Max grad norm (0 disables).")
@click.option("--bf16", is_flag=True, help="bf16 autocast.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--device", default="auto", show_default=True)
@click.option("--eval-every", type=int, default=50, show_default=True)
@click.option("--eval-batches", type=int, help="Evaluate on at most this many batches.")
@click.option("--save-every", type=int, default=100, show_default=True, help="Checkpoint interval (0: never).")
@click.option("--keep-last", type=int, default=2, show_default=True)
@click.option("--track-every", type=int, default=25, show_default=True, help="Spectral tracking interval (0: off).")
@click.option("--log-every", type=int, default=10, show_default=True)
@click.option("--resume", is_flag=True, help="Continue from the latest checkpoint in --run-dir.")
@click.option("--progress/--no-progress", default=None, help="Progress bar on stderr (default: only when stderr is a terminal, never in CI logs).")
def train_command(**opts: Any) -> None:
    """Fine-tune LoRA or NoRA adapters on a JSONL dataset."""
    result = _train_from_options(opts)
    _echo_result(result)


def _train_from_options(opts: dict[str, Any]) -> Any:
    from nora_core.config import AdapterConfig
    from nora_core.data import load_dataset
    from nora_core.inject import inject_adapters
    from nora_core.models import GPT
    from nora_core.trainer import TrainConfig, train

    _seed_everything(opts["seed"])  # before the adapters' random A: --seed N must give the same run twice
    model = _run_or_fail(GPT.from_pretrained, opts["model_dir"])
    max_length = min(opts["max_length"], model.config.block_size)
    read = dict(format=opts["data_format"], max_length=max_length, response_only=opts["response_only"],
                skip_malformed=opts["skip_malformed"])
    train_data = _run_or_fail(load_dataset, opts["data"], **read)
    eval_data = _run_or_fail(load_dataset, opts["eval_data"], **read) if opts["eval_data"] else None
    adapter = _run_or_fail(
        AdapterConfig, method=opts["method"], r=opts["rank"], alpha=opts["alpha"], use_rslora=opts["rslora"],
        target_modules=_csv(opts["targets"]), dropout=opts["dropout"], activation=opts["activation"],
        base_model_name_or_path=opts["model_dir"],
    )
    _run_or_fail(inject_adapters, model, adapter)
    config = _run_or_fail(
        TrainConfig, run_dir=opts["run_dir"], steps=opts["steps"], batch_size=opts["batch_size"],
        grad_accum_steps=opts["grad_accum"], lr=opts["lr"], warmup_steps=min(opts["warmup"], opts["steps"]),
        min_lr_ratio=opts["min_lr_ratio"], weight_decay=opts["weight_decay"],
        grad_clip=opts["grad_clip"] or None, bf16=opts["bf16"], seed=opts["seed"], device=opts["device"],
        eval_every=opts["eval_every"], eval_batches=opts["eval_batches"], save_every=opts["save_every"],
        keep_last=opts["keep_last"], track_spectra_every=opts["track_every"], log_every=opts["log_every"],
        resume=opts["resume"], progress=_progress_wanted(opts["progress"]),
    )
    return _run_or_fail(train, model, config, train_data, eval_data)


def _seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's global RNGs (what the model build and ``inject_adapters`` draw from)."""
    import random

    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _echo_result(result: Any) -> None:
    if int(os.environ.get("RANK", "0")) != 0:  # under torchrun only rank 0 reports
        return
    click.echo(f"run_dir: {result.run_dir}")
    loss = "-" if result.train_loss is None else f"{result.train_loss:.4f}"  # None: nothing left to train
    parts = [f"steps: {result.steps}", f"train_loss: {loss}"]
    if result.val_loss is not None:
        parts += [f"val_loss: {result.val_loss:.4f}", f"val_ppl: {result.val_ppl:.3f}"]
    parts.append(f"tokens/s: {result.tokens_per_s:.0f}")
    click.echo("  ".join(parts))


# ----------------------------------------------------------------------------------------- pretrain


def pretrain_base(
    out: Path, *, steps: int, batch_size: int, block_size: int, n_layer: int, n_embd: int, n_head: int,
    lr: float, corpus_bytes: int, seed: int, progress: bool,
) -> Any:
    """Pretrain a small GPT on the standard-library docstring corpus and save it to ``out``.

    Returns:
        The :class:`~nora_core.trainer.TrainResult`.
    """
    import torch

    from nora_core.corpus import stdlib_docstrings
    from nora_core.data import ByteTokenizer, TokenDataset
    from nora_core.models import GPT, GPTConfig
    from nora_core.trainer import TrainConfig, train

    tok = ByteTokenizer()
    text = stdlib_docstrings(max_bytes=corpus_bytes)
    data = TokenDataset.from_token_stream(tok.encode(text), block_size)
    torch.manual_seed(seed)
    model = GPT(GPTConfig(vocab_size=tok.vocab_size, block_size=block_size, n_layer=n_layer, n_embd=n_embd,
                          n_head=n_head))
    config = TrainConfig(steps=steps, batch_size=batch_size, lr=lr, warmup_steps=min(20, steps),
                         weight_decay=0.1, betas=(0.9, 0.95), seed=seed, progress=progress, log_every=50)
    logger.info("pretraining a %.2fM-parameter GPT on %d bytes of stdlib docstrings (%d blocks)",
                model.num_parameters() / 1e6, len(text.encode()), len(data))
    result = train(model, config, data)
    model.save_pretrained(out)
    return result


@cli.command("pretrain")
@click.option("--out", type=click.Path(file_okay=False), required=True, help="Directory for the base model.")
@click.option("--steps", type=int, default=400, show_default=True)
@click.option("--batch-size", type=int, default=16, show_default=True)
@click.option("--block-size", type=int, default=128, show_default=True)
@click.option("--n-layer", type=int, default=4, show_default=True)
@click.option("--n-embd", type=int, default=128, show_default=True)
@click.option("--n-head", type=int, default=4, show_default=True)
@click.option("--lr", type=float, default=2e-3, show_default=True)
@click.option("--corpus-bytes", type=int, default=1_000_000, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--progress/--no-progress", default=None, help="Progress bar on stderr (default: only when stderr is a terminal, never in CI logs).")
def pretrain_command(out: str, **opts: Any) -> None:
    """Pretrain the small built-in GPT on Python's own docstrings (offline)."""
    opts["progress"] = _progress_wanted(opts["progress"])
    result = _run_or_fail(pretrain_base, Path(out), **opts)
    click.echo(f"base model: {out}")
    click.echo(f"steps: {result.steps}  train_loss: {result.train_loss:.4f}  tokens/s: {result.tokens_per_s:.0f}")


# --------------------------------------------------------------------------------------------- demo

#: Settings of ``nora demo``, sized to finish within 3 minutes on 2 CPU cores (see docs/training.md).
DEMO_DEFAULTS: dict[str, Any] = {
    "base": {"steps": 250, "batch_size": 16, "block_size": 128, "n_layer": 4, "n_embd": 128, "n_head": 4,
             "lr": 2e-3, "corpus_bytes": 1_000_000, "seed": 0},
    "n_train": 2000,
    "n_val": 128,
    "finetune_steps": 100,
    "batch_size": 16,
    "lr": 5e-3,
    "track_every": 20,
}


def _base_is_cached(base: Path, settings: dict[str, Any]) -> bool:
    marker = base / "pretrain.json"
    return marker.is_file() and (base / "model.safetensors").is_file() and json.loads(
        marker.read_text(encoding="utf-8")
    ) == settings


def _spectra_report_hook(out: Path, run_dirs: list[Path]) -> str:
    """HOOK(spectra report): render the demo's HTML report with ``spectra report`` (nora_spectra.cli).

    ``spectra report RUN_DIR...`` reads each run's ``metrics.jsonl`` (loss curves, effective-rank
    trajectories) and final adapter. It belongs to nora_spectra; if it is missing or fails, the demo
    still succeeds and says which command to run.

    Returns:
        ``"wrote PATH"``, or the command line to run by hand.
    """
    target = out / "report.html"
    labels = ",".join(d.name for d in run_dirs)
    args = ["report", *(str(d) for d in run_dirs), "--labels", labels, "-o", str(target), "--quiet"]
    try:
        from nora_spectra.cli.main import cli as spectra_cli

        spectra_cli.main(args=args, prog_name="spectra", standalone_mode=False)
        return f"wrote {target}"
    except Exception as exc:  # noqa: BLE001 - the report is optional; the runs are already written
        logger.warning("spectra report failed (%s); run it by hand", exc)
        return "spectra " + " ".join(args[:-1])


@cli.command("demo")
@click.option("--out", type=click.Path(file_okay=False), default="nora-demo", show_default=True,
              help="Folder for the base model (cached), data, runs and analyses.")
@click.option("--methods", default="lora,nora", show_default=True)
@click.option("--ranks", default="4,16", show_default=True)
@click.option("--pretrain-steps", type=int, default=DEMO_DEFAULTS["base"]["steps"], show_default=True)
@click.option("--finetune-steps", type=int, default=DEMO_DEFAULTS["finetune_steps"], show_default=True)
@click.option("--threads", type=int, default=1, show_default=True,
              help="torch CPU threads (0: torch's default). One thread keeps the small model fast even on a "
                   "machine busy with other work, where competing OpenMP threads slow it down many times.")
@click.option("--progress/--no-progress", default=None, help="Progress bar on stderr (default: only when stderr is a terminal, never in CI logs).")
def demo_command(
    out: str, methods: str, ranks: str, pretrain_steps: int, finetune_steps: int, threads: int, progress: bool
) -> None:
    """Pretrain a small GPT (cached), fine-tune LoRA and NoRA at two ranks on arithmetic, analyse spectra."""
    started = time.perf_counter()
    if threads:
        import torch

        torch.set_num_threads(threads)
    root = Path(out)
    summary = _run_or_fail(
        run_demo, root, methods=_csv(methods), ranks=[int(r) for r in _csv(ranks)],
        pretrain_steps=pretrain_steps, finetune_steps=finetune_steps, progress=_progress_wanted(progress),
    )
    click.echo(f"{'run':<10} {'val_loss':>9} {'val_ppl':>8} {'erank':>7} {'util':>6}  analysis")
    for row in summary:
        if "report_command" in row:
            continue
        erank = "-" if row["effective_rank"] is None else f"{row['effective_rank']:.2f}"
        util = "-" if row["utilization"] is None else f"{row['utilization']:.2f}"
        click.echo(f"{row['run']:<10} {row['val_loss']:>9.4f} {row['val_ppl']:>8.3f} {erank:>7} {util:>6}  "
                   f"{row['analysis'] or '-'}")
    click.echo(f"done in {time.perf_counter() - started:.1f} s; runs in {root / 'runs'}")
    click.echo(f"report: {summary[-1]['report_command']}")  # "wrote PATH" or the command to run


def run_demo(
    root: Path, *, methods: list[str], ranks: list[int], pretrain_steps: int, finetune_steps: int,
    progress: bool = False,
) -> list[dict[str, Any]]:
    """The body of ``nora demo``.

    Returns:
        One row per run: ``run``, ``val_loss``, ``val_ppl``, ``effective_rank`` and ``utilization``
        (means over modules at the last tracked step) and ``analysis`` (path of the JSON, or None);
        then a last row ``{"report_command": ...}`` from the report hook.
    """
    from nora_core.arithmetic import arithmetic_splits
    from nora_core.config import AdapterConfig
    from nora_core.data import TokenDataset, parse_record, write_jsonl
    from nora_core.inject import inject_adapters
    from nora_core.models import GPT
    from nora_core.trainer import TrainConfig, train

    if not methods or not ranks or any(r < 1 for r in ranks):
        raise ValueError("--methods and --ranks need at least one method and positive ranks")
    base_settings = {**DEMO_DEFAULTS["base"], "steps": pretrain_steps}
    base = root / "base"
    if _base_is_cached(base, base_settings):
        logger.info("using the cached base model in %s", base)
    else:
        t0 = time.perf_counter()
        pretrain_base(base, progress=progress, **base_settings)
        (base / "pretrain.json").write_text(json.dumps(base_settings, indent=2) + "\n", encoding="utf-8")
        logger.info("pretrained the base in %.1f s", time.perf_counter() - t0)

    train_rows, val_rows = arithmetic_splits(DEMO_DEFAULTS["n_train"], DEMO_DEFAULTS["n_val"], seed=0)
    write_jsonl(_mkdir(root / "data") / "train.jsonl", train_rows)
    write_jsonl(root / "data" / "val.jsonl", val_rows)
    block = json.loads((base / "config.json").read_text())["block_size"]

    def dataset(rows: list[dict]) -> TokenDataset:
        return TokenDataset.from_samples([parse_record(r) for r in rows], max_length=block, response_only=True)

    train_data, val_data = dataset(train_rows), dataset(val_rows)
    seed = 0
    summary = []
    run_dirs = []
    for method in methods:
        for r in ranks:
            name = f"{method}-r{r}"
            run_dir = root / "runs" / name
            if run_dir.exists():
                shutil.rmtree(run_dir)
            _seed_everything(seed)  # each run's A init depends on its seed only, not on what ran before
            model = GPT.from_pretrained(base)
            inject_adapters(model, AdapterConfig(method=method, r=r, alpha=2 * r, target_modules=["q_proj", "v_proj"],
                                                 base_model_name_or_path=str(base)))
            config = TrainConfig(
                run_dir=str(run_dir), steps=finetune_steps, batch_size=DEMO_DEFAULTS["batch_size"],
                lr=DEMO_DEFAULTS["lr"], warmup_steps=min(10, finetune_steps),
                eval_every=max(1, finetune_steps // 2), track_spectra_every=DEMO_DEFAULTS["track_every"],
                log_every=10, seed=seed, progress=progress,
            )
            logger.info("fine-tuning %s", name)
            result = train(model, config, train_data, val_data)
            spectra = next((h["spectra"] for h in reversed(result.history) if "spectra" in h), [])
            eranks = [s["effective_rank"] for s in spectra if s["effective_rank"] is not None]
            utils = [s["utilization"] for s in spectra if s["utilization"] is not None]
            summary.append({
                "run": name, "val_loss": result.val_loss, "val_ppl": result.val_ppl,
                "effective_rank": sum(eranks) / len(eranks) if eranks else None,
                "utilization": sum(utils) / len(utils) if utils else None,
                "analysis": _write_analysis(run_dir),
            })
            run_dirs.append(run_dir)
    summary.append({"report_command": _spectra_report_hook(root, run_dirs)})
    return summary


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def _write_analysis(run_dir: Path) -> str | None:
    """``spectra analyze`` JSON of the run's final adapter, as ``run_dir/analysis.json``."""
    try:
        from nora_spectra import analyze
    except ImportError:  # nora_spectra.analysis not installed in this checkout
        logger.warning("nora_spectra.analyze is unavailable; no analysis JSON for %s", run_dir)
        return None
    from nora_core.atomic import atomic_write_text

    analysis = analyze(run_dir / "adapter", emit_warnings=False)
    path = run_dir / "analysis.json"
    atomic_write_text(path, analysis.to_json() + "\n")
    return os.fspath(path)


if __name__ == "__main__":  # pragma: no cover
    main()
