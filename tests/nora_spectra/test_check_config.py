"""``spectra check`` settings: pyproject discovery, --config files, precedence and validation errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from nora_spectra.check_config import (
    CheckSettings,
    Override,
    find_pyproject,
    load_config_file,
    load_pyproject,
    resolve_settings,
)
from nora_spectra.errors import UsageError

PYPROJECT = """\
[project]
name = "demo"

[tool.spectra.check]
min_utilization = 0.1
min_effective_rank = 1.5
baseline = "ci/base.json"

[[tool.spectra.check.overrides]]
pattern = "*.v_proj"
min_utilization = 0.05
"""

STANDALONE = """\
min_utilization = 0.2
max_drop = 0.1

[[overrides]]
pattern = "*.q_proj"
skip = true
"""


@pytest.fixture()
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A project with a pyproject.toml; the cwd is a sub-directory two levels down."""
    (tmp_path / "pyproject.toml").write_text(PYPROJECT)
    cwd = tmp_path / "src" / "deep"
    cwd.mkdir(parents=True)
    monkeypatch.chdir(cwd)
    return tmp_path


def test_pyproject_is_found_walking_up(project: Path) -> None:
    assert find_pyproject() == project / "pyproject.toml"
    values = load_pyproject(project / "pyproject.toml")
    assert values["min_utilization"] == 0.1
    assert values["baseline"] == str(project / "ci" / "base.json")  # relative to the file
    assert values["overrides"] == (Override("*.v_proj", min_utilization=0.05),)


def test_pyproject_without_table_gives_nothing(tmp_path: Path) -> None:
    (tmp_path / "pyproject.toml").write_text('[project]\nname = "x"\n')
    assert load_pyproject(tmp_path / "pyproject.toml") == {}
    assert resolve_settings(cwd=tmp_path) == CheckSettings()


def test_standalone_and_tool_table_config_files(tmp_path: Path) -> None:
    standalone = tmp_path / "spectra.toml"
    standalone.write_text(STANDALONE)
    assert load_config_file(standalone) == {
        "min_utilization": 0.2,
        "max_drop": 0.1,
        "overrides": (Override("*.q_proj", skip=True),),
    }
    other = tmp_path / "other.toml"
    other.write_text(PYPROJECT)
    assert load_config_file(other)["min_effective_rank"] == 1.5


def test_precedence_flag_over_config_over_pyproject_over_defaults(project: Path, tmp_path: Path) -> None:
    config = tmp_path / "spectra.toml"
    config.write_text(STANDALONE)
    defaults = resolve_settings(use_pyproject=False)
    assert (defaults.min_utilization, defaults.max_drop, defaults.metric) == (None, 0.05, "effective_rank")
    only_pyproject = resolve_settings()
    assert (only_pyproject.min_utilization, only_pyproject.max_drop) == (0.1, 0.05)
    with_config = resolve_settings(config=config)
    assert (with_config.min_utilization, with_config.max_drop) == (0.2, 0.1)
    assert with_config.min_effective_rank == 1.5  # keys the config does not set come from pyproject
    assert with_config.overrides == (Override("*.q_proj", skip=True),)  # the config's list replaces pyproject's
    with_flag = resolve_settings({"min_utilization": 0.3, "max_drop": None}, config=config)
    assert (with_flag.min_utilization, with_flag.max_drop) == (0.3, 0.1)  # None means "flag not given"


def test_override_lookup_is_first_glob_match() -> None:
    settings = CheckSettings(overrides=(Override("*.v_proj", min_utilization=0.1), Override("*", skip=True)))
    assert settings.override_for("model.layers.0.self_attn.v_proj").min_utilization == 0.1
    assert settings.override_for("model.layers.0.self_attn.q_proj").skip
    assert CheckSettings().override_for("x") is None


@pytest.mark.parametrize(
    "text, match",
    [
        ("[tool.spectra.check]\nmin_utilisation = 0.5\n", r"unknown key tool\.spectra\.check\.'min_utilisation'"),
        ("[tool.spectra.check]\nmin_utilization = 1.5\n", r"tool\.spectra\.check\.min_utilization must be a number in \[0, 1\]"),
        ("[tool.spectra.check]\nmin_utilization = \"high\"\n", r"min_utilization must be a number"),
        ("[tool.spectra.check]\nmetric = \"loss\"\n", r"metric must be one of"),
        ("[tool.spectra.check]\nfail_on_new = 1\n", r"fail_on_new must be true or false"),
        ("[tool.spectra.check]\noverrides = 3\n", r"overrides must be an array of tables"),
        ("[[tool.spectra.check.overrides]]\nmin_utilization = 0.1\n", r"overrides\[0\]: pattern must be"),
        ("[[tool.spectra.check.overrides]]\npattern = \"*\"\nmax_collapsed_fraction = 0.1\n", r"checkpoint-wide"),
        ("[[tool.spectra.check.overrides]]\npattern = \"*\"\nmax_drop = 2\n", r"overrides\[0\]: max_drop must be"),
        ("[tool.spectra.check\n", r"not valid TOML"),
    ],
)
def test_bad_pyproject_names_file_and_key(tmp_path: Path, text: str, match: str) -> None:
    path = tmp_path / "pyproject.toml"
    path.write_text(text)
    with pytest.raises(UsageError, match=match) as info:
        resolve_settings(cwd=tmp_path)
    assert str(info.value).startswith(f"{path}: ")
    assert "\n" not in str(info.value)


def test_bad_config_file_errors(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="config file not found"):
        load_config_file(tmp_path / "missing.toml")
    path = tmp_path / "c.toml"
    path.write_text("max_drop = -1\n")
    with pytest.raises(UsageError, match=rf"^{path}: max_drop must be a number in \[0, 1\]"):
        load_config_file(path)
    path.write_text("[tool.spectra]\nx = 1\n")
    with pytest.raises(UsageError, match=r"no \[tool.spectra.check\] table"):
        load_config_file(path)


def test_bad_flag_names_the_option(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match=r"^--min-effective-rank: min_effective_rank must be a finite number >= 0"):
        resolve_settings({"min_effective_rank": -1.0}, use_pyproject=False)


def test_has_gates() -> None:
    assert not CheckSettings().has_gates
    assert not CheckSettings(overrides=(Override("*", skip=True),)).has_gates
    assert CheckSettings(baseline="b.json").has_gates
    assert CheckSettings(overrides=(Override("*", min_effective_rank=1.0),)).has_gates
