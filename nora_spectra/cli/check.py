"""``spectra check PATH...``: the CI gate. Exit 0 when every gate passes, 1 when one fails, 2 on a user error.

Thresholds come from ``[tool.spectra.check]`` in the nearest ``pyproject.toml``, then ``--config``,
then the flags here (see :mod:`nora_spectra.check_config` and ``docs/ci.md``).
"""

from __future__ import annotations

import os
import sys

import click

from nora_spectra.errors import UsageError

__all__ = ["command"]


def _github_default() -> bool:
    return os.environ.get("GITHUB_ACTIONS", "").lower() == "true"


@click.command("check")
@click.argument("paths", nargs=-1, required=True, metavar="PATH...")
@click.option(
    "--min-utilization", type=float, help="Fail a module whose utilization (effective rank / r) is below X, in [0, 1]."
)
@click.option("--min-effective-rank", type=float, help="Fail a module whose effective rank is below X.")
@click.option(
    "--max-collapsed-fraction",
    type=float,
    help="Fail a checkpoint whose share of collapsed or all-zero modules is above X.",
)
@click.option(
    "--baseline", metavar="FILE", help="Baseline JSON (from `spectra analyze --format json` or --update-baseline)."
)
@click.option(
    "--max-drop", type=float, help="Largest allowed relative drop of --metric from the baseline [default: 0.05]."
)
@click.option("--metric", metavar="NAME", help="Metric the baseline gate compares [default: effective_rank].")
@click.option("--update-baseline", is_flag=True, help="Rewrite the baseline with the current analysis and exit 0.")
@click.option("--config", "config_file", metavar="FILE", help="TOML config (top-level keys or [tool.spectra.check]).")
@click.option(
    "--format", "fmt", type=click.Choice(["text", "json"]), default="text", show_default=True, help="Output on stdout."
)
@click.option("--junit", metavar="FILE", help="Also write a JUnit XML report to FILE.")
@click.option(
    "--github/--no-github", default=None, help="Emit GitHub Actions annotations [default: on when GITHUB_ACTIONS=true]."
)
@click.option("--adapter", type=str, default=None, metavar="NAME", help="Adapter sub-directory to load.")
@click.option("-q", "--quiet", is_flag=True, help="Print only failures (nothing when every gate passes).")
def command(
    paths: tuple[str, ...],
    min_utilization: float | None,
    min_effective_rank: float | None,
    max_collapsed_fraction: float | None,
    baseline: str | None,
    max_drop: float | None,
    metric: str | None,
    update_baseline: bool,
    config_file: str | None,
    fmt: str,
    junit: str | None,
    github: bool | None,
    adapter: str | None,
    quiet: bool,
) -> None:
    """Fail CI when adapter rank utilization drops below limits or regresses from a baseline.

    Exit codes: 0 every gate passed, 1 a gate failed, 2 usage or input error.
    """
    from nora_spectra.baseline import load_baseline, write_baseline
    from nora_spectra.check_config import resolve_settings
    from nora_spectra.gates import analyze_paths, evaluate
    from nora_spectra.outputs import write_output
    from nora_spectra.render import check_report

    flags = {
        "min_utilization": min_utilization,
        "min_effective_rank": min_effective_rank,
        "max_collapsed_fraction": max_collapsed_fraction,
        "baseline": baseline,
        "max_drop": max_drop,
        "metric": metric,
        "adapter": adapter,
    }
    settings = resolve_settings(flags, config=config_file)

    if update_baseline:
        if settings.baseline is None:
            raise UsageError("--update-baseline needs a baseline path (--baseline FILE or 'baseline' in the config)")
        analyses = analyze_paths(paths, settings)
        write_baseline(settings.baseline, analyses)
        modules = sum(len(a) for a in analyses)
        if not quiet:
            message = f"wrote baseline {settings.baseline} ({len(analyses)} checkpoint(s), {modules} modules)"
            click.echo(f"spectra: {message}", err=True)
        return

    if not settings.has_gates:
        from nora_spectra.check_config import find_pyproject

        read = [os.fspath(p) for p in (find_pyproject(), config_file) if p is not None]
        where = f" (read {', '.join(read)})" if read else ""
        raise UsageError(
            f"no gate configured{where}: pass --min-utilization, --min-effective-rank, --max-collapsed-fraction "
            "or --baseline, or set them in [tool.spectra.check]"
        )
    baselines = load_baseline(settings.baseline) if settings.baseline is not None else None
    result = evaluate(analyze_paths(paths, settings), settings, baselines)

    if fmt == "json":
        click.echo(check_report.render_json(result), nl=False)
    else:
        click.echo(check_report.render_text(result, quiet=quiet), nl=False)
    if junit is not None:
        write_output(junit, check_report.render_junit(result), "JUnit report")
    if github if github is not None else _github_default():
        # Annotations go with the text on stdout; beside JSON they go to stderr to keep stdout parseable.
        click.echo(check_report.render_github(result), nl=False, err=fmt == "json")
    if not result.passed:
        sys.exit(1)  # a gate failed
