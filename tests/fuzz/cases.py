"""The fuzz classes: each builds one case (mutated inputs + the command that reads them) from a seed.

=====================  ========================================================================
class                  inputs mutated, command
=====================  ========================================================================
safetensors_header     a bare ``.safetensors`` (header structure, length prefix, bytes); analyze
adapter_config         ``adapter_config.json`` of a real PEFT adapter; analyze
peft_weights           the PEFT adapter's ``adapter_model.safetensors``; analyze (weight or probe)
torch_bin              the same adapter as ``adapter_model.bin`` (zip or legacy pickle); analyze
analysis_json          analysis JSON (one object or ``{"checkpoints"}``); compare
baseline               a ``spectra check`` baseline; check --baseline (and --junit)
report                 analysis JSON or a run directory's ``metrics.jsonl``; report -o .html/.md
check_config           a ``spectra check --config`` TOML file; check
pyproject              ``[tool.spectra.check]`` of the ``pyproject.toml`` in the working directory; check
train_config           a ``nora train --config`` TOML file; nora train (one step when valid)
=====================  ========================================================================
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path
from typing import Callable

from tests.fuzz.harness import Case
from tests.fuzz.mutate import dumps, mutate_bytes, mutate_json, mutate_safetensors, mutate_toml
from tests.fuzz.seeds import Seeds

__all__ = ["CLASSES", "make_case"]

WEIGHTS = "adapter_model.safetensors"
CONFIG = "adapter_config.json"


def _analyze_flags(rng: random.Random) -> list[str]:
    flags = ["--format", rng.choice(["json", "json", "table", "csv", "markdown"])]
    if rng.random() < 0.25:
        flags += ["--space", "probe", "--probe-samples", "64"]
    return flags


def _json_case(argv: list[str], inputs: list[Path], **kw) -> Case:
    fmt = argv[argv.index("--format") + 1] if "--format" in argv else None
    return Case("spectra", argv, inputs, json_stdout=fmt == "json", **kw)


def safetensors_header(rng: random.Random, seeds: Seeds, root: Path) -> Case:
    path = root / "bare.safetensors"
    path.write_bytes(mutate_safetensors((seeds.peft_dir / WEIGHTS).read_bytes(), rng))
    return _json_case(["analyze", str(path), *_analyze_flags(rng)], [path], cwd=root)


def adapter_config(rng: random.Random, seeds: Seeds, root: Path) -> Case:
    directory = root / "adapter"
    shutil.copytree(seeds.peft_dir, directory)
    config = directory / CONFIG
    raw = config.read_bytes()
    if rng.random() < 0.2:
        config.write_bytes(mutate_bytes(raw, rng))
    else:
        config.write_text(dumps(mutate_json(json.loads(raw), rng)))
    return _json_case(["analyze", str(directory), *_analyze_flags(rng)], [directory], cwd=root)


def peft_weights(rng: random.Random, seeds: Seeds, root: Path) -> Case:
    source = seeds.nora_dir if rng.random() < 0.3 else seeds.peft_dir
    directory = root / "adapter"
    shutil.copytree(source, directory)
    weights = directory / WEIGHTS
    weights.write_bytes(mutate_safetensors(weights.read_bytes(), rng))
    return _json_case(["analyze", str(directory), *_analyze_flags(rng)], [directory], cwd=root)


def torch_bin(rng: random.Random, seeds: Seeds, root: Path) -> Case:
    directory = root / "adapter"
    directory.mkdir()
    shutil.copy(seeds.peft_dir / CONFIG, directory / CONFIG)
    blob = seeds.bin_zip if rng.random() < 0.5 else seeds.bin_legacy
    (directory / "adapter_model.bin").write_bytes(mutate_bytes(blob, rng))
    return _json_case(["analyze", str(directory), "--format", "json"], [directory], cwd=root)


def _mutated_analysis(rng: random.Random, seeds: Seeds) -> str:
    base = seeds.probe_analysis if rng.random() < 0.2 else seeds.analysis
    data = {"checkpoints": [base, seeds.analysis]} if rng.random() < 0.25 else base
    if rng.random() < 0.15:
        return mutate_bytes(json.dumps(data).encode(), rng).decode("utf-8", "surrogateescape")
    return dumps(mutate_json(data, rng))


def _write_text(path: Path, text: str) -> Path:
    path.write_bytes(text.encode("utf-8", "surrogateescape"))
    return path


def analysis_json(rng: random.Random, seeds: Seeds, root: Path) -> Case:
    good = _write_text(root / "good.json", json.dumps(seeds.analysis))
    bad = _write_text(root / "mutated.json", _mutated_analysis(rng, seeds))
    fmt = rng.choice(["table", "json", "csv", "markdown"])
    paths = [str(good), str(bad)] if rng.random() < 0.5 else [str(bad), str(good)]
    return _json_case(["compare", *paths, "--format", fmt], [good, bad], cwd=root)


def baseline(rng: random.Random, seeds: Seeds, root: Path) -> Case:
    base = _write_text(root / "base.json", _mutated_analysis(rng, seeds))
    out = root / "out" / "junit.xml"
    argv = ["check", str(seeds.peft_dir), "--baseline", str(base), "--format", "json"]
    outputs = []
    if rng.random() < 0.3:
        argv += ["--junit", str(out)]
        outputs = [out]
    case = Case("spectra", argv, [base, seeds.peft_dir], outputs=outputs, json_stdout=True, cwd=root)
    return case


def report(rng: random.Random, seeds: Seeds, root: Path) -> Case:
    out = root / "out" / ("report.html" if rng.random() < 0.8 else "report.md")
    if rng.random() < 0.5:
        bad = _write_text(root / "mutated.json", _mutated_analysis(rng, seeds))
        inputs = [bad]
    else:
        bad = root / "run"
        shutil.copytree(seeds.run_dir, bad)
        metrics = bad / "metrics.jsonl"
        lines = metrics.read_text().splitlines()
        i = rng.randrange(len(lines))
        if rng.random() < 0.3:
            metrics.write_bytes(mutate_bytes(metrics.read_bytes(), rng))
        else:
            lines[i] = dumps(mutate_json(json.loads(lines[i]), rng))
            metrics.write_text("\n".join(lines) + "\n")
        inputs = [bad]
    argv = ["report", str(seeds.nora_dir), str(bad), "-o", str(out)]
    return Case("spectra", argv, [*inputs, seeds.nora_dir], outputs=[out], cwd=root)


def check_config(rng: random.Random, seeds: Seeds, root: Path) -> Case:
    config = root / "check.toml"
    config.write_bytes(mutate_toml(seeds.check_toml, rng))
    argv = ["check", str(seeds.peft_dir), "--config", str(config), "--format", "json"]
    return Case("spectra", argv, [config, seeds.peft_dir], json_stdout=True, cwd=root)


def pyproject(rng: random.Random, seeds: Seeds, root: Path) -> Case:
    project = root / "project"
    project.mkdir()
    path = project / "pyproject.toml"
    path.write_bytes(mutate_toml(seeds.pyproject, rng))
    argv = ["check", str(seeds.peft_dir), "--format", "json"]
    return Case("spectra", argv, [path, seeds.peft_dir], json_stdout=True, cwd=project)


def train_config(rng: random.Random, seeds: Seeds, root: Path) -> Case:
    config = root / "train.toml"
    text = seeds.train_toml.replace("MODEL", str(seeds.base_model)).replace("DATA", str(seeds.train_data))
    config.write_bytes(mutate_toml(text, rng))
    argv = ["train", "--config", str(config), "--steps", "1"]  # a valid config trains one step
    return Case("nora", argv, [config, seeds.base_model, seeds.train_data], cwd=root)


CLASSES: dict[str, Callable[[random.Random, Seeds, Path], Case]] = {
    "safetensors_header": safetensors_header,
    "adapter_config": adapter_config,
    "peft_weights": peft_weights,
    "torch_bin": torch_bin,
    "analysis_json": analysis_json,
    "baseline": baseline,
    "report": report,
    "check_config": check_config,
    "pyproject": pyproject,
    "train_config": train_config,
}


def make_case(name: str, rng: random.Random, seeds: Seeds, root: Path) -> Case:
    """Build case ``name`` in the fresh directory ``root``."""
    root.mkdir(parents=True, exist_ok=True)
    return CLASSES[name](rng, seeds, root)
