"""`spectra scan --engine ray`: a local Ray cluster (2 CPUs) gives the same tables as the local engine.

Ray is an optional extra (``pip install -e ".[dev,ray]"``); without it this test is skipped, and
``tests/nora_spectra/test_scan.py::test_ray_missing_is_one_line`` checks the message a user gets.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from nora_spectra import load_scan
from nora_spectra.scan import scan
from tests.nora_spectra.scan_tree import build_tree
from tests.nora_spectra.test_scan import _comparable

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("ray") is None,
    reason="Ray is not installed (an optional extra: pip install -e '.[dev,ray]' to test --engine ray)",
)


def test_ray_engine_gives_the_tables_of_the_local_engine(tmp_path: Path) -> None:
    root = tmp_path / "tree"
    root.mkdir()
    expected = build_tree(root)
    local = scan([root], output=tmp_path / "local", workers=2)
    ray = scan([root], output=tmp_path / "ray", engine="ray", workers=2, part_size=5)
    assert (ray.adapters, ray.ok, ray.errors, ray.layers) == (local.adapters, local.ok, local.errors, local.layers)
    assert ray.adapters == len(expected)
    local_adapters, local_layers = load_scan(tmp_path / "local")
    ray_adapters, ray_layers = load_scan(tmp_path / "ray")
    assert _comparable(ray_adapters) == _comparable(local_adapters)
    assert _comparable(ray_layers) == _comparable(local_layers)
    # resuming with the other engine finds nothing left to do
    assert scan([root], output=tmp_path / "ray", workers=2, resume=True).analysed == 0
