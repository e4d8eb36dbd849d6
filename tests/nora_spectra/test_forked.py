"""``forked_map``: results in order, failures at their item's turn, dead children replaced, none left behind."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from typing import Iterable, Iterator

import numpy as np
import pytest

from nora_spectra import _forked
from nora_spectra._forked import forked_map
from tests.nora_spectra.io_builders import lora_tensors, peft_dir

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="forked_map forks on Linux only")


def _squares(items: Iterable[int]) -> Iterator[tuple[int, int, int]]:
    for item in items:
        time.sleep(0.002)
        yield item, item * item, os.getpid()


def _children() -> set[int]:
    """This process's child processes (alive or zombie), from /proc."""
    pids: set[int] = set()
    for task in os.listdir("/proc/self/task"):
        with open(f"/proc/self/task/{task}/children") as handle:
            pids.update(int(pid) for pid in handle.read().split())
    return pids


@pytest.fixture(autouse=True)
def no_children_left_behind() -> Iterator[None]:
    before = _children()
    yield
    assert _children() <= before


@pytest.mark.parametrize("processes", [1, 2, 3])
def test_results_in_item_order_from_every_process(processes: int) -> None:
    items = list(range(17))
    out = list(forked_map(_squares, items, processes))
    assert [(item, square) for item, square, _ in out] == [(i, i * i) for i in items]
    pids = {pid for *_, pid in out}
    assert os.getpid() in pids and len(pids) >= min(processes, 2)  # children delivered some of it


def test_fewer_items_than_processes() -> None:
    assert [square for _, square, _ in forked_map(_squares, [3], 4)] == [9]
    assert list(forked_map(_squares, [], 2)) == []


def _fails_at_seven(items: Iterable[int]) -> Iterator[int]:
    for item in items:
        if item == 7:
            raise ValueError(f"item {item} failed in {'the parent' if os.getpid() == PARENT else 'a child'}")
        yield item


PARENT = os.getpid()


def test_a_failure_is_raised_in_the_parent_at_its_turn() -> None:
    done = []
    with pytest.raises(ValueError, match="item 7 failed in the parent"):  # 7 is in the child's chunk (6..11)
        for item in forked_map(_fails_at_seven, list(range(12)), 2):
            done.append(item)
    assert done == list(range(7))


def _child_dies_at_five(items: Iterable[int]) -> Iterator[int]:
    for item in items:
        if item == 5 and os.getpid() != PARENT:
            os.kill(os.getpid(), signal.SIGKILL)
        yield item


def test_a_killed_child_is_replaced_by_the_parent() -> None:
    assert list(forked_map(_child_dies_at_five, list(range(11)), 2)) == list(range(11))


def _child_stalls(items: Iterable[int]) -> Iterator[tuple[int, int]]:
    for item in items:
        if os.getpid() != PARENT:
            time.sleep(5)  # a child that does not get the CPU
        yield item, os.getpid()


def test_a_stalled_childs_chunk_is_taken_back() -> None:
    started = time.monotonic()
    out = list(forked_map(_child_stalls, list(range(20)), 2))
    assert [item for item, _ in out] == list(range(20))
    assert {pid for _, pid in out} == {PARENT}  # every item measured here, from the end of the chunk
    assert time.monotonic() - started < 4


def _fails_in_the_taken_back_item(items: Iterable[int]) -> Iterator[int]:
    for item in items:
        if os.getpid() != PARENT:
            time.sleep(5)
        if item == 15:
            raise ValueError("item 15")
        yield item


def test_a_failure_in_an_item_taken_back_is_raised_at_its_turn() -> None:
    done = []
    with pytest.raises(ValueError, match="item 15"):
        for item in forked_map(_fails_in_the_taken_back_item, list(range(20)), 2):
            done.append(item)
    assert done == list(range(15))


def _slow(items: Iterable[int]) -> Iterator[int]:
    for item in items:
        time.sleep(0.01)
        yield item


def test_stopping_early_kills_and_reaps_the_children() -> None:
    results = forked_map(_slow, list(range(200)), 3)
    assert [next(results) for _ in range(4)] == [0, 1, 2, 3]
    results.close()


def test_an_analysis_with_forked_processes_is_the_same_analysis(tmp_path) -> None:
    shapes = {f"model.layers.{i}.self_attn.{name}": (24, 20, 4) for i in range(6) for name in ("q_proj", "v_proj")}
    tensors = lora_tensors(shapes, seed=3)
    tensors["base_model.model.model.layers.2.self_attn.v_proj.lora_B.weight"][:] = np.nan  # one non-finite module
    ck = peft_dir(tmp_path / "ck", tensors, r=4, lora_alpha=8)
    code = (  # a fresh interpreter: no torch loaded, as in the console script
        "import sys\nimport nora_spectra._forked as f\nimport nora_spectra.spaces.weight as w\n"
        "from nora_spectra.analysis import analyze\nfrom nora_spectra.render import render\n"
        "f._ALLOWED = sys.argv[2] == 'fork'\nw.worker_count = lambda modules: 3\n"
        "assert f.forking_allowed() == f._ALLOWED\n"
        "sys.stdout.write(render(analyze(sys.argv[1], emit_warnings=False), 'json'))\n"
    )
    outputs = [
        subprocess.run([sys.executable, "-c", code, str(ck), mode], capture_output=True, text=True, check=True).stdout
        for mode in ("threads", "fork")
    ]
    assert outputs[0] == outputs[1] and '"non_finite"' in outputs[0]


def test_not_allowed_unless_the_process_owner_says_so_or_with_torch_loaded(monkeypatch) -> None:
    monkeypatch.setattr(_forked, "_ALLOWED", False)
    assert not _forked.forking_allowed()
    monkeypatch.setattr(_forked, "_ALLOWED", True)
    monkeypatch.setitem(sys.modules, "torch", object())
    assert not _forked.forking_allowed()


def test_where_fork_fails_this_process_measures_everything(monkeypatch) -> None:
    def no_fork() -> int:
        raise OSError(11, "Resource temporarily unavailable")

    monkeypatch.setattr(os, "fork", no_fork)
    out = list(forked_map(_squares, list(range(9)), 3))
    assert [item for item, _, _ in out] == list(range(9)) and {pid for *_, pid in out} == {os.getpid()}


def test_children_die_with_a_parent_killed_without_cleanup() -> None:
    # a parent killed by SIGTERM runs no finally: its children must not go on holding its stdout
    code = (
        "import os, sys, time\n"
        "from nora_spectra._forked import forked_map\n"
        "def slow(items):\n"
        "    for item in items:\n"
        "        time.sleep(30)\n"
        "        yield item\n"
        "print('started', flush=True)\n"
        "list(forked_map(slow, list(range(4)), 2))\n"
    )
    parent = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE)
    assert parent.stdout.readline().strip() == b"started"
    time.sleep(0.5)  # the child is forked and sleeping
    parent.terminate()
    parent.wait()
    started = time.monotonic()
    assert parent.stdout.read() == b""  # every holder of the pipe is gone
    assert time.monotonic() - started < 5
