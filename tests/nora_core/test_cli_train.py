"""``nora train`` (flags and TOML), user errors, and a miniature ``nora demo``."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from nora_core.arithmetic import ArithmeticTask, arithmetic_splits
from nora_core.cli import main
from nora_core.data import write_jsonl
from nora_core.models import GPT, GPTConfig
from tests.nora_core.test_trainer import single_thread  # noqa: F401 (autouse fixture)


def run(argv: list[str], capsys: pytest.CaptureFixture) -> tuple[int, str, str]:
    try:
        main(argv)
        code = 0
    except SystemExit as exc:
        code = int(exc.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture()
def setup(tmp_path: Path) -> dict[str, Path]:
    GPT(GPTConfig(n_layer=1, n_embd=32, n_head=2, block_size=96)).save_pretrained(tmp_path / "base")
    train_rows, val_rows = arithmetic_splits(16, 8, task=ArithmeticTask(1, 2, 20))
    return {
        "base": tmp_path / "base",
        "train": write_jsonl(tmp_path / "train.jsonl", train_rows),
        "val": write_jsonl(tmp_path / "val.jsonl", val_rows),
        "run": tmp_path / "run",
    }


def test_train_with_flags_writes_adapter_metrics_and_checkpoints(setup: dict, capsys) -> None:
    code, out, err = run(
        ["train", "--model", str(setup["base"]), "--data", str(setup["train"]), "--eval-data", str(setup["val"]),
         "--run-dir", str(setup["run"]), "--steps", "4", "--batch-size", "4", "--eval-every", "2",
         "--save-every", "2", "--track-every", "2", "--r", "2", "--no-progress"],
        capsys,
    )
    assert code == 0, err
    assert f"run_dir: {setup['run']}" in out and "steps: 4" in out and "val_ppl" in out
    config = json.loads((setup["run"] / "adapter" / "adapter_config.json").read_text())
    assert config["r"] == 2 and sorted(config["target_modules"]) == ["q_proj", "v_proj"]
    assert config["base_model_name_or_path"] == str(setup["base"])  # --model as given
    records = [json.loads(line) for line in (setup["run"] / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [2, 4] and all(len(r["spectra"]) == 2 for r in records)
    assert sorted(p.name for p in (setup["run"] / "checkpoints").iterdir()) == ["step-000002", "step-000004"]
    # the same command again refuses to overwrite the run; --resume continues it (nothing left to do)
    again = ["train", "--model", str(setup["base"]), "--data", str(setup["train"]), "--run-dir",
             str(setup["run"]), "--steps", "4", "--batch-size", "4", "--r", "2", "--no-progress"]
    code, _, err = run(again, capsys)
    assert code == 2 and err.startswith("nora: error:") and "pass --resume (resume=True in Python)" in err
    code, out, err = run(again + ["--resume"], capsys)
    assert code == 0 and "steps: 4" in out


def test_train_reads_a_toml_config_and_flags_override_it(setup: dict, tmp_path: Path, capsys) -> None:
    toml = tmp_path / "run.toml"
    toml.write_text(
        f'model = "{setup["base"]}"\ndata = "{setup["train"]}"\nrun-dir = "{setup["run"]}"\n'
        'method = "lora"\nr = 3\nalpha = 6.0\ntargets = ["q_proj"]\nsteps = 5\nbatch_size = 4\n'
        "save_every = 0\ntrack_every = 0\nprogress = false\n"
    )
    code, out, err = run(["train", "--config", str(toml), "--steps", "2"], capsys)
    assert code == 0, err
    assert "steps: 2" in out
    config = json.loads((setup["run"] / "adapter" / "adapter_config.json").read_text())
    assert config["r"] == 3 and config["lora_alpha"] == 6.0 and config["target_modules"] == ["q_proj"]
    assert not (setup["run"] / "checkpoints").exists()

    toml.write_text('stepz = 3\n')
    code, _, err = run(["train", "--config", str(toml)], capsys)
    assert code == 2 and "unknown key 'stepz'" in err


def test_paths_in_a_toml_config_are_relative_to_the_file(setup: dict, tmp_path: Path, monkeypatch, capsys) -> None:
    project = tmp_path / "project"
    (project / "data").mkdir(parents=True)
    setup["base"].rename(project / "base")
    setup["train"].rename(project / "data" / "train.jsonl")
    setup["val"].rename(project / "data" / "val.jsonl")
    toml = project / "run.toml"
    toml.write_text(
        'model = "base"\ndata = "data/train.jsonl"\neval-data = "data/val.jsonl"\nrun-dir = "runs/a"\n'
        "steps = 1\nbatch_size = 4\nsave_every = 0\ntrack_every = 0\nprogress = false\n"
    )
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    code, out, err = run(["train", "--config", "../project/run.toml"], capsys)
    assert code == 0, err
    assert (project / "runs" / "a" / "adapter" / "adapter_model.safetensors").is_file()
    assert not list(elsewhere.iterdir())
    # a flag stays relative to the current directory
    code, _, err = run(["train", "--config", str(toml), "--run-dir", "b"], capsys)
    assert code == 0, err
    assert (elsewhere / "b" / "metrics.jsonl").is_file()
    # a missing path names the file's key and the resolved path
    toml.write_text('model = "nothere"\ndata = "data/train.jsonl"\nrun-dir = "runs/c"\n')
    code, _, err = run(["train", "--config", str(toml)], capsys)
    assert code == 2 and err == f"nora: error: {project / 'nothere'}: no such directory (model in {toml})\n"


def test_user_errors_are_one_line_with_exit_code_2(setup: dict, tmp_path: Path, capsys) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text(setup["train"].read_text() + '{"question": "no answer"}\n')
    base = ["train", "--model", str(setup["base"]), "--data", str(bad), "--steps", "1", "--batch-size", "4",
            "--no-progress"]
    code, _, err = run(base + ["--run-dir", str(tmp_path / "a")], capsys)
    assert code == 2 and err.count("\n") == 1 and f"{bad}:17:" in err
    good = ["train", "--model", str(setup["base"]), "--data", str(setup["train"]), "--steps", "1", "--batch-size", "4",
            "--no-progress"]
    code, _, err = run(good + ["--run-dir", str(tmp_path / "c"), "--r", "0"], capsys)
    assert code == 2 and err.count("\n") == 1 and err.startswith("nora: error: r must be a positive int")
    code, _, err = run(good + ["--run-dir", str(tmp_path / "d"), "--method", "lora", "--activation", "relu"], capsys)
    assert code == 2 and err.count("\n") == 1 and "activation='relu' is NoRA-only" in err


def test_skip_malformed_reports_the_count_once(setup: dict, tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text(setup["train"].read_text() + '{"question": "no answer"}\n')
    # a real process: the CLI's logging setup decides what reaches stderr
    proc = subprocess.run(
        [sys.executable, "-m", "nora_core.cli", "train", "--model", str(setup["base"]), "--data", str(bad),
         "--run-dir", str(tmp_path / "run"), "--steps", "1", "--batch-size", "4", "--save-every", "0",
         "--track-every", "0", "--skip-malformed"],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if "skipped" in line]
    assert lines == [f"nora: {bad}: skipped 1 malformed line(s)"]
    # stderr is a pipe here, not a terminal: no progress bar unless --progress asks for one
    assert "step/s" not in proc.stderr and "\r" not in proc.stderr


def test_usage_errors_and_missing_paths_are_one_line_with_exit_code_2(setup: dict, tmp_path: Path, capsys) -> None:
    model, data, run_dir = str(setup["base"]), str(setup["train"]), str(tmp_path / "run")
    missing = str(tmp_path / "missing")
    cases = [
        (["--model", missing, "--data", data, "--run-dir", run_dir], f"{missing}: no such directory (--model)"),
        (["--model", data, "--data", data, "--run-dir", run_dir], f"{data}: not a directory (--model)"),
        (["--model", model, "--data", missing, "--run-dir", run_dir], f"{missing}: no such file (--data)"),
        (["--model", model, "--data", model, "--run-dir", run_dir], f"{model}: is a directory, not a file (--data)"),
        (["--model", model, "--data", data, "--eval-data", missing, "--run-dir", run_dir],
         f"{missing}: no such file (--eval-data)"),
        (["--config", missing + ".toml"], f"{missing}.toml: cannot read ("),
        (["--model", model, "--data", data, "--run-dir", run_dir, "--steps", "abc"],
         "Invalid value for '--steps': 'abc' is not a valid integer."),
        (["--model", model, "--data", data, "--run-dir", run_dir, "--method", "dora"], "Invalid value for '--method'"),
        (["--data", data, "--run-dir", run_dir], "Missing option '--model'."),
        (["--model", model, "--data", data, "--run-dir", run_dir, "--bogus"], "No such option"),
    ]
    for argv, message in cases:
        code, out, err = run(["train", *argv], capsys)
        assert code == 2 and out == "" and err.count("\n") == 1, (argv, err)
        assert err.startswith(f"nora: error: {message}"), (argv, err)
    assert not (tmp_path / "run").exists()


def _adapter_and_losses(run_dir: Path) -> tuple[dict[str, torch.Tensor], list[float]]:
    weights = load_file(run_dir / "adapter" / "adapter_model.safetensors")
    losses = [json.loads(line)["train_loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return weights, losses


def test_the_same_seed_gives_the_same_run(setup: dict, tmp_path: Path, capsys) -> None:
    def train_run(name: str, seed: int) -> tuple[dict[str, torch.Tensor], list[float]]:
        code, _, err = run(
            ["train", "--model", str(setup["base"]), "--data", str(setup["train"]), "--run-dir", str(tmp_path / name),
             "--steps", "3", "--batch-size", "4", "--log-every", "1", "--save-every", "0", "--track-every", "0",
             "--seed", str(seed), "--no-progress"],
            capsys,
        )
        assert code == 0, err
        return _adapter_and_losses(tmp_path / name)

    (w1, l1), (w2, l2), (w3, l3) = train_run("a", 7), train_run("b", 7), train_run("c", 8)
    assert len(l1) == 3 and l1 == l2
    assert w1.keys() == w2.keys() and all(torch.equal(w1[k], w2[k]) for k in w1)
    assert l3 != l1 and any(not torch.equal(w1[k], w3[k]) for k in w1)


def test_prompts_that_fill_max_length_are_dropped_or_an_error(setup: dict, tmp_path: Path, capsys, caplog) -> None:
    base = ["train", "--model", str(setup["base"]), "--steps", "1", "--batch-size", "2", "--save-every", "0",
            "--track-every", "0", "--no-progress"]
    # every arithmetic prompt is longer than 16 bytes: nothing to learn was a silent loss of 0
    code, out, err = run(base + ["--data", str(setup["train"]), "--max-length", "16", "--run-dir",
                                 str(tmp_path / "a")], capsys)
    assert code == 2 and out == "" and err.count("\n") == 1
    assert err.startswith(f"nora: error: {setup['train']}: no sample has a response token within max_length=16")
    assert not (tmp_path / "a").exists()
    # some short prompts: the long ones are dropped, counted and logged, and training goes on
    mixed = write_jsonl(tmp_path / "mixed.jsonl", [{"question": "1", "answer": "2"}] * 3  # BOS + 20-byte prompt
                        + [{"question": "q" * 30, "answer": "a"}] * 2)
    with caplog.at_level("WARNING", logger="nora_core.data"):
        code, out, err = run(base + ["--data", str(mixed), "--max-length", "24", "--run-dir", str(tmp_path / "b")],
                             capsys)
    assert code == 0, err
    assert "mixed.jsonl: dropped 2 of 5 sample(s)" in caplog.text and "max_length=24" in caplog.text
    assert "3 kept" in caplog.text and "train_loss: 0.0000" not in out


def test_demo_in_miniature_writes_analyses_and_caches_the_base(tmp_path: Path, capsys) -> None:
    argv = ["demo", "--out", str(tmp_path / "demo"), "--pretrain-steps", "2", "--finetune-steps", "2",
            "--ranks", "2", "--no-progress"]
    code, out, err = run(argv, capsys)
    assert code == 0, err
    assert "lora-r2" in out and "nora-r2" in out and "done in" in out and "report: wrote " in out
    for name in ("lora-r2", "nora-r2"):
        analysis = json.loads((tmp_path / "demo" / "runs" / name / "analysis.json").read_text())
        assert len(analysis["layers"]) == 8  # q_proj and v_proj of 4 layers
        assert (tmp_path / "demo" / "runs" / name / "metrics.jsonl").is_file()
    assert (tmp_path / "demo" / "report.html").stat().st_size > 0
    stamp = (tmp_path / "demo" / "base" / "model.safetensors").stat().st_mtime_ns
    first = _adapter_and_losses(tmp_path / "demo" / "runs" / "lora-r2")
    code, _, _ = run(argv + ["--methods", "lora"], capsys)
    assert code == 0 and (tmp_path / "demo" / "base" / "model.safetensors").stat().st_mtime_ns == stamp
    # with the base cached (nothing pretrained first), the run is the same: seeded before the adapters
    again = _adapter_and_losses(tmp_path / "demo" / "runs" / "lora-r2")
    assert again[1] == first[1] and all(torch.equal(again[0][k], first[0][k]) for k in first[0])


def test_the_documented_torchrun_command_with_rank(setup: dict) -> None:
    """docs/training.md's command, run by the real torchrun (2 gloo processes on CPU): --rank reaches
    nora train (torchrun read --r as an ambiguous prefix of its own options); rank 0 alone writes."""
    import os
    import subprocess
    import sys

    torchrun = Path(sys.executable).with_name("torchrun")
    if not torchrun.exists():
        pytest.skip("torchrun is not installed beside this Python")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    command = [
        str(torchrun), "--standalone", "--nproc_per_node", "2", "-m", "nora_core.cli", "train",
        "--model", str(setup["base"]), "--data", str(setup["train"]), "--run-dir", str(setup["run"]),
        "--method", "nora", "--rank", "8", "--steps", "2", "--batch-size", "4", "--save-every", "2",
        "--track-every", "0", "--eval-every", "0", "--device", "cpu", "--no-progress",
    ]
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("run_dir:") == 1 and "steps: 2" in done.stdout  # rank 0 reports once
    config = json.loads((setup["run"] / "adapter" / "adapter_config.json").read_text())
    assert config["r"] == 8 and config["peft_type"] == "NORA"
    assert sorted(p.name for p in (setup["run"] / "checkpoints").iterdir()) == ["step-000002"]
    assert len((setup["run"] / "metrics.jsonl").read_text().splitlines()) == 1
    # --r still works outside torchrun
    code = subprocess.run([sys.executable, "-m", "nora_core.cli", "train", "--help"], capture_output=True,
                          text=True, env=env, timeout=120)
    assert "--rank, --r INTEGER" in code.stdout


def test_a_learning_rate_adamw_cannot_take_is_one_line_and_exit_2(setup: dict, capsys) -> None:
    code, out, err = run(
        ["train", "--model", str(setup["base"]), "--data", str(setup["train"]), "--run-dir", str(setup["run"]),
         "--steps", "2", "--batch-size", "4", "--lr", "1e39", "--no-progress"],
        capsys,
    )
    assert code == 2 and out == "" and err.count("\n") == 1
    assert err.startswith("nora: error: TrainConfig.lr 1e+39 is too large for AdamW on float32 parameters")
    assert not setup["run"].exists()  # refused before anything was written


@pytest.mark.parametrize(
    ("line", "problem"),
    [
        ("progress = 2", "progress must be true or false, got an integer"),
        ('run_dir = "a\\u0000b"', "run_dir holds a NUL character"),
        ("data = 5", "data must be a path (a string), got an integer"),
        ("seed = 1979-05-27T07:32:00Z", "seed must be a string, number, boolean or a list of them, got a datetime"),
        ("batch_size = 100000", "Invalid value for '--batch-size': 100000 is not in the range x<=65536. (options from"),
        ('device = "meta"', "TrainConfig.device must be 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps', got 'meta' (options from"),
        ('run_dir = "' + "a" * 5000 + '"', "File name too long (options from"),
    ],
)
def test_hostile_config_values_are_one_line_naming_the_config(setup: dict, tmp_path: Path, capsys, line, problem) -> None:
    toml = tmp_path / "run.toml"
    base = {"model": f'"{setup["base"]}"', "data": f'"{setup["train"]}"', "run_dir": '"run"', "steps": "1",
            "batch_size": "2"}
    base.pop(line.split(" = ")[0], None)
    toml.write_text("".join(f"{k} = {v}\n" for k, v in base.items()) + line + "\n")
    code, out, err = run(["train", "--config", str(toml), "--no-progress"], capsys)
    assert code == 2 and out == "" and err.count("\n") == 1, err
    assert err.startswith("nora: error: ") and problem in err and str(toml) in err
