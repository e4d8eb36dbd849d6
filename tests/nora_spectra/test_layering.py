"""The layering holds: import contracts, lazy renderers, torch-free analysis, results that pickle as data."""

from __future__ import annotations

import json
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from nora_spectra.analysis import analyze
from nora_spectra.result import Analysis
from tests.nora_spectra.io_builders import lora_tensors, peft_dir

ROOT = Path(__file__).resolve().parents[2]

#: A meta-path finder that makes ``import torch`` fail, as on a machine without torch.
_BLOCK_TORCH = """
import sys
class _NoTorch:
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ModuleNotFoundError("No module named 'torch'", name="torch")
sys.meta_path.insert(0, _NoTorch())
"""


def _python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)


@pytest.fixture
def checkpoint(tmp_path: Path) -> Path:
    shapes = {f"model.layers.{i}.self_attn.q_proj": (12, 10, 4) for i in range(3)}
    return peft_dir(tmp_path / "ck", lora_tensors(shapes), r=4, lora_alpha=8)


def test_import_contracts_hold() -> None:
    lint = shutil.which("lint-imports") or str(Path(sys.executable).with_name("lint-imports"))
    if not Path(lint).exists():
        pytest.skip("import-linter is not installed (pip install -e '.[dev]')")
    out = subprocess.run([lint], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stdout[-3000:]
    assert "Contracts: 2 kept, 0 broken." in out.stdout


def test_results_do_not_import_renderers_plots_pandas_or_torch_at_import_time() -> None:
    code = (
        "import sys\n"
        "import nora_spectra.analysis, nora_spectra.comparison, nora_spectra.gates, nora_spectra.result\n"
        "import nora_spectra.resize, nora_spectra.suggest, nora_spectra.overlap\n"
        "heavy = [m for m in sys.modules if m.split('.')[0] in ('torch', 'pandas', 'matplotlib')\n"
        "         or m.startswith(('nora_spectra.render', 'nora_spectra.plots'))]\n"
        "print(sorted(heavy))\n"
    )
    out = _python(code)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_weight_space_analysis_works_without_torch(checkpoint: Path) -> None:
    code = _BLOCK_TORCH + (
        "import json, sys\n"
        "from nora_spectra.analysis import analyze\n"
        f"a = analyze({str(checkpoint)!r}, emit_warnings=False)\n"
        "print(json.dumps([len(a.records), 'torch' in sys.modules]))\n"
    )
    out = _python(code)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == [3, False]


def test_resize_and_overlap_work_without_torch(checkpoint: Path, tmp_path: Path) -> None:
    code = _BLOCK_TORCH + (
        "import json, sys\n"
        "from nora_spectra import overlap, resize\n"
        f"r = resize({str(checkpoint)!r}, {str(tmp_path / 'small')!r}, rank=2)\n"
        f"o = overlap({str(checkpoint)!r}, {str(tmp_path / 'small')!r})\n"
        "print(json.dumps([r.summary['rank_after'], round(o.summary['mean_left_overlap'], 6), 'torch' in sys.modules]))\n"
    )
    out = _python(code)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == [6, 1.0, False]


@pytest.mark.parametrize(
    "argv, feature",
    [
        (["analyze", "{ck}", "--space", "activation", "--model", "{ck}", "--data", "{data}"], "--space activation"),
        (["demo", "--output-dir", "{tmp}/demo"], "spectra demo"),
    ],
)
def test_torch_only_features_say_so_in_one_line(checkpoint: Path, tmp_path: Path, argv: list[str], feature: str) -> None:
    data = tmp_path / "d.jsonl"
    data.write_text('{"text": "x"}\n')
    args = [a.format(ck=checkpoint, data=data, tmp=tmp_path) for a in argv]
    code = _BLOCK_TORCH + f"import sys\nsys.argv = ['spectra'] + {args!r}\nfrom nora_spectra.cli.main import main\nmain()\n"
    out = _python(code)
    lines = out.stderr.strip().splitlines()
    assert out.returncode == 2 and len(lines) == 1, out.stderr
    assert f"{feature} needs torch" in lines[0] and "nora-spectra[torch]" in lines[0]


def test_the_nora_command_without_torch_is_one_line(tmp_path: Path) -> None:
    code = _BLOCK_TORCH + (
        "import sys\nsys.argv = ['nora', 'pretrain', '--out', %r, '--steps', '1']\n"
        "from nora_core.cli import main\nmain()\n" % str(tmp_path / "base")
    )
    out = _python(code)
    lines = out.stderr.strip().splitlines()
    assert out.returncode == 2 and len(lines) == 1 and "nora needs torch" in lines[0], out.stderr


def test_analysis_pickles_as_plain_data(checkpoint: Path) -> None:
    result = analyze(checkpoint, emit_warnings=False)
    blob = pickle.dumps(result)
    back = pickle.loads(blob)
    assert isinstance(back, Analysis) and back.to_dict() == result.to_dict()
    assert len(blob) < len(result.to_json())  # no reader, file handle or model rides along
    assert np.array_equal(back.layers["effective_rank"], result.layers["effective_rank"])
