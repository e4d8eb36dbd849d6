"""The console script's process settings: OpenBLAS without a thread pool, freed factor blocks reused (``keep_freed_memory``), forked workers allowed, the heap frozen at exit."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest

_CHURN = """
import resource, sys
import numpy as np
from nora_spectra._allocator import keep_freed_memory
if sys.argv[1] == "on":
    assert keep_freed_memory()
def churn():  # what reading modules does: blocks of 1-1.9 MB of three sizes, two alive at once
    alive = []
    for i in range(60):
        alive.append(np.ones((1 << 17) + (i % 3) * 40960))
        if len(alive) > 2:
            alive.pop(0)
churn()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
churn()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _page_faults(mode: str) -> int:
    out = subprocess.run([sys.executable, "-c", _CHURN, mode], capture_output=True, text=True, check=True)
    return int(out.stdout)


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="the thresholds are glibc's")
def test_freed_blocks_are_reused_without_page_faults() -> None:
    default, kept = _page_faults("off"), _page_faults("on")
    assert default > 200  # glibc's dynamic thresholds return each block and fault the next one in
    assert kept < default / 10


def test_only_the_console_script_sets_the_allocator_and_freezes_the_heap_at_exit() -> None:
    code = ("import gc, os, sys\nos.environ.pop('OPENBLAS_NUM_THREADS', None)\nfrom unittest import mock\nimport nora_spectra._allocator as a\n"
            "with mock.patch.object(a, 'keep_freed_memory') as keep:\n"
            "    import importlib\n    m = importlib.import_module('nora_spectra.cli.main')\n"
            "    sys.argv = ['spectra', '--version']\n"
            "    try:\n        m.{entry}()\n    except SystemExit:\n        pass\n"
            "    import nora_spectra._forked as f\n"
            "    print(keep.call_count, gc.get_freeze_count() > 0, os.environ.get('OPENBLAS_NUM_THREADS'), f._ALLOWED,\n"
            "          gc.get_threshold()[0])\n")
    for entry, expected in (("run", "1 True 1 True 50000"), ("main", "0 False None False 700")):
        out = subprocess.run([sys.executable, "-c", code.format(entry=entry)], capture_output=True, text=True, check=True)
        assert out.stdout.strip().splitlines()[-1] == expected


def test_the_console_script_imports_no_numpy_before_it_sets_openblas_threads() -> None:
    code = "import sys, nora_spectra.cli.main; print('numpy' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
    env = {**os.environ, "OPENBLAS_NUM_THREADS": "3"}  # the user's setting is kept
    code = ("import os, sys\nimport nora_spectra.cli.main as m\nsys.argv = ['spectra', '--version']\n"
            "try:\n    m.run()\nexcept SystemExit:\n    pass\nprint(os.environ['OPENBLAS_NUM_THREADS'])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env)
    assert out.stdout.strip().splitlines()[-1] == "3"
