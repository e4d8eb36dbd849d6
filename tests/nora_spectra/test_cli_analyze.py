"""``spectra analyze``: outputs, exit codes, one-line errors for bad input, stderr hygiene, import weight."""

from __future__ import annotations

import csv
import io
import json
import os
import pickle
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from nora_spectra.cli.main import cli, main
from tests.nora_spectra.test_analysis import SHAPES, random_factors, write_peft_dir

SPECTRA = str(Path(sys.executable).with_name("spectra"))


def run(argv: list[str], capsys) -> tuple[int, str, str]:
    """Run ``spectra argv`` in-process the way the console script does; return (exit code, stdout, stderr)."""
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    captured = capsys.readouterr()
    return exit_info.value.code, captured.out, captured.err


@pytest.fixture()
def ck(tmp_path) -> Path:
    return write_peft_dir(tmp_path / "ck", random_factors(np.random.default_rng(0), 8, SHAPES, decay=0.3), r=8, alpha=16)


@pytest.fixture()
def mixed(tmp_path) -> Path:
    factors = random_factors(np.random.default_rng(1), 4, SHAPES)
    a, b = factors["model.layers.0.self_attn.q_proj"]
    factors["model.layers.0.self_attn.q_proj"] = (a, np.zeros_like(b))
    a, b = factors["model.layers.1.mlp.down_proj"]
    a = a.copy()
    a[0, 0] = np.nan
    factors["model.layers.1.mlp.down_proj"] = (a, b)
    return write_peft_dir(tmp_path / "mixed", factors, r=4, alpha=8)


# --------------------------------------------------------------------------- results


def test_table_default_and_effective_rank(ck, capsys):
    code, out, err = run(["analyze", str(ck)], capsys)
    assert code == 0 and err == ""
    assert "model.layers.0.self_attn.q_proj" in out and "stable" in out
    code, out, _ = run(["analyze", str(ck), "--effective-rank"], capsys)
    assert code == 0
    assert "effective_rank" in out and "utilization" in out and "stable" not in out.split("\n\n")[1]


def test_json_one_path_is_one_object(ck, capsys):
    code, out, err = run(["analyze", str(ck), "--format", "json"], capsys)
    assert code == 0 and err == ""
    data = json.loads(out)
    assert list(data)[:6] == ["checkpoint", "adapter", "format", "method", "layers", "summary"]
    assert data["checkpoint"] == str(ck) and len(data["layers"]) == 4


def test_json_several_paths(ck, mixed, capsys):
    code, out, _ = run(["analyze", str(ck), str(mixed), "--format", "json", "-q"], capsys)
    assert code == 0
    data = json.loads(out)
    assert [c["checkpoint"] for c in data["checkpoints"]] == [str(ck), str(mixed)]


def test_csv_and_markdown(ck, capsys):
    code, out, _ = run(["analyze", str(ck), "--format", "csv"], capsys)
    assert code == 0
    rows = list(csv.DictReader(io.StringIO(out)))
    assert len(rows) == 4 and rows[0]["checkpoint"] == str(ck)
    code, out, _ = run(["analyze", str(ck), "--format", "markdown", "--effective-rank"], capsys)
    assert code == 0 and out.startswith("## ")


def test_markdown_honours_by_layer(ck, capsys):
    code, plain, _ = run(["analyze", str(ck), "--format", "markdown"], capsys)
    assert code == 0 and "| layer | layers |" not in plain
    code, out, _ = run(["analyze", str(ck), "--format", "markdown", "--by-layer"], capsys)
    assert code == 0 and "| module type | layers |" in out
    table = out.split("| layer | layers |", 1)[1].split("\n\n", 1)[0]
    assert [line.split("|")[1].strip() for line in table.splitlines()[2:]] == ["0", "1"]
    # JSON and CSV are unchanged by --by-layer
    for fmt in ("json", "csv"):
        _, with_flag, _ = run(["analyze", str(ck), "--format", fmt, "--by-layer"], capsys)
        _, without, _ = run(["analyze", str(ck), "--format", fmt], capsys)
        assert with_flag == without


def test_output_file_is_written_and_stdout_stays_empty(ck, tmp_path, capsys):
    target = tmp_path / "out" / "result.json"
    target.parent.mkdir()
    code, out, err = run(["analyze", str(ck), "--format", "json", "--output", str(target)], capsys)
    assert code == 0 and out == ""
    assert f"wrote {target}" in err
    assert json.loads(target.read_text())["checkpoint"] == str(ck)
    assert [p.name for p in target.parent.iterdir()] == ["result.json"]  # no temp file left behind
    # one rule for every output: a missing directory is created; a directory as the target is an error
    code, out, err = run(["analyze", str(ck), "--output", str(tmp_path / "new" / "dir" / "x.txt")], capsys)
    assert code == 0 and out == "" and "(format peft, method lora, 4 layers)" in (tmp_path / "new" / "dir" / "x.txt").read_text()
    code, out, err = run(["analyze", str(ck), "--output", str(tmp_path / "new")], capsys)
    assert code == 2 and out == "" and err.count("\n") == 1 and "is a directory" in err


def test_collapse_threshold_option(ck, capsys):
    code, out, _ = run(["analyze", str(ck), "--format", "json", "--collapse-threshold", "1"], capsys)
    data = json.loads(out)
    assert data["collapse_threshold"] == 1.0 and data["summary"]["collapsed"] == 4
    code, out, err = run(["analyze", str(ck), "--collapse-threshold", "2"], capsys)
    assert code == 2 and err.startswith("spectra: error: collapse threshold") and err.count("\n") == 1


def test_adapter_option_selects_sub_directory(ck, tmp_path, capsys):
    factors = random_factors(np.random.default_rng(3), 4, {"model.layers.5.self_attn.v_proj": (16, 16)})
    write_peft_dir(ck / "other", factors, r=4, alpha=4)
    code, out, _ = run(["analyze", str(ck), "--adapter", "other", "--format", "json", "-q"], capsys)
    assert code == 0
    assert [layer["module"] for layer in json.loads(out)["layers"]] == ["model.layers.5.self_attn.v_proj"]


@pytest.fixture()
def multi(tmp_path) -> Path:
    """A directory holding two named adapters and no top-level one (PEFT's layout for extra adapters)."""
    for seed, name in enumerate(("code", "math")):
        factors = random_factors(np.random.default_rng(10 + seed), 4, SHAPES, decay=0.5 * seed)
        write_peft_dir(tmp_path / "multi" / name, factors, r=4, alpha=8)
    return tmp_path / "multi"


def test_chosen_adapter_is_in_every_output(multi, capsys):
    from nora_spectra.analysis import Analysis

    code, out, err = run(["analyze", str(multi)], capsys)
    assert code == 2 and "--adapter NAME (adapter=NAME in Python): code, math" in err
    code, out, _ = run(["analyze", str(multi), "--adapter", "code", "--format", "json"], capsys)
    data = json.loads(out)
    assert code == 0 and data["checkpoint"] == str(multi) and data["adapter"] == "code"
    assert Analysis.from_json(out).adapter == "code" and Analysis.from_json(out).to_dict()["adapter"] == "code"
    _, out, _ = run(["analyze", str(multi), "--adapter", "code"], capsys)
    assert out.startswith(f"{multi} (adapter code)  (format peft")
    _, out, _ = run(["analyze", str(multi), "--adapter", "code", "--format", "markdown"], capsys)
    assert out.startswith(f"## `{multi}` (adapter `code`)")
    _, out, _ = run(["analyze", str(multi), "--adapter", "code", "--format", "csv"], capsys)
    rows = list(csv.DictReader(io.StringIO(out)))
    assert {row["adapter"] for row in rows} == {"code"}


# --------------------------------------------------------------------------- NaN / zero: exit 0 with a warning


def test_nan_and_zero_layers_exit_0_with_warnings(mixed, capsys):
    code, out, err = run(["analyze", str(mixed), "--format", "json"], capsys)
    assert code == 0
    data = json.loads(out)
    statuses = {layer["module"]: layer["status"] for layer in data["layers"]}
    assert statuses["model.layers.0.self_attn.q_proj"] == "zero"
    assert statuses["model.layers.1.mlp.down_proj"] == "non_finite"
    lines = err.splitlines()
    assert len(lines) == 2 and all(line.startswith("spectra: warning: ") for line in lines)
    assert "NaN/Inf" in err and "all-zero" in err


def test_modules_to_save_gives_one_skipped_warning_counting_tensors(tmp_path, capsys):
    from nora_spectra.io.peft_keys import PEFT_PREFIX
    from tests.nora_spectra.io_builders import lora_tensors, peft_dir

    tensors = lora_tensors({"model.layers.0.self_attn.q_proj": (6, 5, 4)})
    tensors[PEFT_PREFIX + "head.weight"] = np.ones((2, 5), np.float32)
    tensors[PEFT_PREFIX + "head.bias"] = np.ones(2, np.float32)
    path = peft_dir(tmp_path / "saved", tensors, r=4, target_modules=["q_proj"], modules_to_save=["head"])
    code, _, err = run(["analyze", str(path), "--effective-rank"], capsys)
    assert code == 0
    lines = [line for line in err.splitlines() if "skipped" in line]
    assert len(lines) == 1, err
    assert "skipped 2 tensors of 1 module" in lines[0] and "head (modules_to_save" in lines[0]


def test_quiet_silences_stderr(mixed, capsys):
    code, out, err = run(["analyze", str(mixed), "-q"], capsys)
    assert code == 0 and err == "" and "non_finite" in out


def test_progress_bar_only_on_a_terminal(ck, capsys, monkeypatch):
    code, _, err = run(["analyze", str(ck)], capsys)
    assert "analysing" not in err
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True, raising=False)
    code, out, err = run(["analyze", str(ck), "--format", "json"], capsys)
    assert code == 0 and "analysing" in err
    json.loads(out)  # the bar never reaches stdout


# --------------------------------------------------------------------------- bad input: exit 2, one line, fast


class _RunsCode:
    """Unpickling this would run a shell command (it must never be unpickled)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _safetensors_bytes(header: dict, data: bytes) -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data


def _bad_inputs(tmp: Path) -> dict[str, Path]:
    """name -> a path that must be refused with exit 2."""
    cases: dict[str, Path] = {"missing path": tmp / "does-not-exist"}
    empty = tmp / "empty"
    empty.mkdir()
    cases["empty directory"] = empty

    good_key = "base_model.model.m.layers.0.q_proj.lora_{}.weight"
    header = {
        good_key.format("A"): {"dtype": "F32", "shape": [2, 4], "data_offsets": [0, 32]},
        good_key.format("B"): {"dtype": "F32", "shape": [4, 2], "data_offsets": [32, 64]},
    }

    def bare(name: str, content: bytes) -> Path:
        path = tmp / f"{name}.safetensors"
        path.write_bytes(content)
        return path

    cases["header length beyond file"] = bare("long", struct.pack("<Q", 10**9) + b"{}")
    cases["header not JSON"] = bare("notjson", struct.pack("<Q", 8) + b"not json" + b"\0" * 64)
    cases["offsets out of range"] = bare(
        "offsets",
        _safetensors_bytes(
            {**header, good_key.format("B"): {"dtype": "F32", "shape": [4, 2], "data_offsets": [32, 6400]}}, b"\0" * 64
        ),
    )
    cases["truncated data"] = bare("truncated", _safetensors_bytes(header, b"\0" * 40))
    cases["lora_A without lora_B"] = bare(
        "unpaired", _safetensors_bytes({good_key.format("A"): header[good_key.format("A")]}, b"\0" * 32)
    )
    cases["mismatched shapes"] = bare(
        "mismatch",
        _safetensors_bytes(
            {good_key.format("A"): header[good_key.format("A")],
             good_key.format("B"): {"dtype": "F32", "shape": [4, 3], "data_offsets": [32, 80]}},
            b"\0" * 80,
        ),
    )
    bad_config = tmp / "badconfig"
    write_peft_dir(bad_config, random_factors(np.random.default_rng(0), 2, {"m.layers.0.q_proj": (4, 4)}), r=2, alpha=2)
    (bad_config / "adapter_config.json").write_text("{ this is not json")
    cases["invalid adapter_config.json"] = bad_config
    return cases


def _pickle_dir(tmp: Path, marker: Path) -> Path:
    directory = tmp / "evil"
    directory.mkdir()
    (directory / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 2}))
    (directory / "adapter_model.bin").write_bytes(pickle.dumps({"x": _RunsCode(marker)}))
    return directory


def test_bad_inputs_exit_2_with_one_line(tmp_path, capsys):
    # Speed is a benchmark matter, not a test one (timings are noisy); what keeps these fast is that
    # nothing on this path imports torch, which the import tests below check.
    for name, path in _bad_inputs(tmp_path).items():
        code, out, err = run(["analyze", str(path)], capsys)
        assert code == 2, name
        assert out == "", name
        assert err.startswith("spectra: error: ") and err.count("\n") == 1, (name, err)
        assert str(path) in err, (name, err)
        assert "Traceback" not in err, name


def test_malicious_pickle_is_refused_and_never_run(tmp_path, capsys):
    marker = tmp_path / "pwned"
    directory = _pickle_dir(tmp_path, marker)
    code, out, err = run(["analyze", str(directory)], capsys)
    assert code == 2 and out == ""
    assert err.startswith("spectra: error: ") and err.count("\n") == 1 and str(directory) in err
    assert "Traceback" not in err
    assert not marker.exists()


def test_bad_inputs_as_real_processes(tmp_path):
    marker = tmp_path / "pwned"
    cases = {"missing": tmp_path / "nope", "pickle": _pickle_dir(tmp_path, marker)}
    cases["not json"] = _bad_inputs(tmp_path)["header not JSON"]
    for name, path in cases.items():
        proc = subprocess.run([SPECTRA, "analyze", str(path)], capture_output=True, text=True, timeout=60)
        assert proc.returncode == 2, (name, proc.stderr)
        assert proc.stdout == ""
        assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr, (name, proc.stderr)
    assert not marker.exists()


def test_unknown_format_is_a_usage_error(ck, capsys):
    code, out, err = run(["analyze", str(ck), "--format", "html"], capsys)
    assert code == 2 and out == "" and "Traceback" not in err


def test_no_path_is_a_usage_error(capsys):
    code, _, err = run(["analyze"], capsys)
    assert code == 2 and "PATH" in err


def test_help_through_clirunner():
    result = CliRunner().invoke(cli, ["analyze", "--help"])
    assert result.exit_code == 0
    for option in ("--effective-rank", "--format", "--output", "--adapter", "--quiet", "--collapse-threshold"):
        assert option in result.output


# --------------------------------------------------------------------------- import weight


_IMPORT_PROBE = r"""
import json, sys
from nora_spectra.cli.main import main
try:
    main(sys.argv[1:])
except SystemExit as exc:
    code = exc.code
heavy = sorted(m for m in ("torch", "pandas", "matplotlib", "tqdm", "nora_core.layers") if m in sys.modules)
print(json.dumps({"code": code, "heavy": heavy}), file=sys.stderr)
"""


@pytest.mark.parametrize("args", [["--help"], ["analyze", "--help"], ["analyze", "{ck}", "--format", "json", "-q"],
                                  ["analyze", "{ck}", "-q"]])
def test_help_and_analysis_paths_import_neither_torch_nor_pandas(ck, args):
    argv = [a.format(ck=ck) for a in args]
    proc = subprocess.run([sys.executable, "-c", _IMPORT_PROBE, *argv], capture_output=True, text=True, timeout=60)
    report = json.loads(proc.stderr.strip().splitlines()[-1])
    assert report == {"code": 0, "heavy": []}, proc.stderr


def test_real_process_json_round_trip(ck):
    proc = subprocess.run([SPECTRA, "analyze", str(ck), "--format", "json"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and proc.stderr == ""
    assert len(json.loads(proc.stdout)["layers"]) == 4


def test_verbose_logs_debug_messages_to_stderr_only(tmp_path):
    good = tmp_path / "good"
    good.mkdir()
    import numpy as np
    from safetensors.numpy import save_file

    rng = np.random.default_rng(0)
    save_file(
        {
            "base_model.model.m.q_proj.lora_A.weight": rng.standard_normal((2, 6)).astype(np.float32),
            "base_model.model.m.q_proj.lora_B.weight": rng.standard_normal((5, 2)).astype(np.float32),
        },
        str(good / "adapter_model.safetensors"),
    )
    (good / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 2}))
    proc = subprocess.run([SPECTRA, "-v", "analyze", str(good), "--format", "json"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["layers"][0]["module"] == "m.q_proj"
    assert f"spectra: {good}: format peft, method lora, 1 adapter modules" in proc.stderr
    assert "1 spectra in" in proc.stderr


@pytest.mark.parametrize(
    "argv, message",
    [
        (["analyze"], "Missing argument 'PATH...'"),
        (["analyze", "{ck}", "--format", "foo"], "Invalid value for '--format'"),
        (["analyze", "{ck}", "--space", "activation", "--model", "{missing}", "--data", "{missing}"], "does not exist"),
        (["nosuch"], "No such command 'nosuch'"),
    ],
)
def test_usage_errors_are_one_line_too(ck, tmp_path, capsys, argv, message):
    code, out, err = run([a.format(ck=ck, missing=tmp_path / "missing") for a in argv], capsys)
    assert code == 2 and out == ""
    assert err.startswith("spectra: error: ") and err.count("\n") == 1 and message in err, err
    assert "--help" in err
