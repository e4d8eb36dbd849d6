"""``nora train`` (flags and TOML), user errors, and a miniature ``nora demo``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

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
    records = [json.loads(line) for line in (setup["run"] / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [2, 4] and all(len(r["spectra"]) == 2 for r in records)
    assert sorted(p.name for p in (setup["run"] / "checkpoints").iterdir()) == ["step-000002", "step-000004"]
    # the same command again refuses to overwrite the run; --resume continues it (nothing left to do)
    again = ["train", "--model", str(setup["base"]), "--data", str(setup["train"]), "--run-dir",
             str(setup["run"]), "--steps", "4", "--batch-size", "4", "--r", "2", "--no-progress"]
    code, _, err = run(again, capsys)
    assert code == 2 and err.startswith("nora: error:") and "resume" in err
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


def test_user_errors_are_one_line_with_exit_code_2(setup: dict, tmp_path: Path, capsys) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text(setup["train"].read_text() + '{"question": "no answer"}\n')
    base = ["train", "--model", str(setup["base"]), "--data", str(bad), "--steps", "1", "--batch-size", "4",
            "--no-progress"]
    code, _, err = run(base + ["--run-dir", str(tmp_path / "a")], capsys)
    assert code == 2 and err.count("\n") == 1 and f"{bad}:17:" in err
    code, _, err = run(base + ["--run-dir", str(tmp_path / "b"), "--skip-malformed"], capsys)
    assert code == 0 and "skipped 1 malformed line" in err
    code, _, err = run(base + ["--run-dir", str(tmp_path / "c"), "--r", "0"], capsys)
    assert code == 2 and err.startswith("nora: error:") and "r" in err


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
    code, _, _ = run(argv + ["--methods", "lora"], capsys)
    assert code == 0 and (tmp_path / "demo" / "base" / "model.safetensors").stat().st_mtime_ns == stamp
