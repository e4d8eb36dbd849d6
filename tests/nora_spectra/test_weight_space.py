"""The weight space's pool: results identical to one thread, in module order, errors at their turn.

The spectra themselves are tested against dense float64 SVDs in ``test_spectrum.py`` and
``test_analysis.py``; here the point is that measuring modules on several threads changes nothing
but the time: the same bits, the same order, the same progress calls, the same errors.
"""

from __future__ import annotations

import dataclasses
import json
import threading
import time
import warnings
from pathlib import Path

import numpy as np
import pytest

import nora_spectra.spaces.weight as weight
from nora_spectra.analysis import analyze
from nora_spectra.errors import CheckpointError
from nora_spectra.io import load_checkpoint
from tests.nora_spectra.golden_fixtures import write_safetensors

PREFIX = "base_model.model."


def many_modules(directory: Path, layers: int = 12) -> Path:
    """A PEFT directory with ``3 * layers`` modules of several shapes and dtypes, some ill-conditioned."""
    rng = np.random.default_rng(11)
    tensors = {}
    for layer in range(layers):
        for name, (d_out, d_in), tag in (("q_proj", (48, 40), "BF16"), ("up_proj", (96, 40), "F32"), ("down_proj", (40, 96), "F16")):
            a = rng.standard_normal((8, d_in)) / np.sqrt(d_in)
            b = rng.standard_normal((d_out, 8)) * 1e-2
            if layer % 3 == 1:
                a = a * np.geomspace(1, 1e-12, 8)[:, None]  # a collapsed layer
            if layer % 4 == 2:
                b[:, 3] = 0.0
            key = f"{PREFIX}model.layers.{layer}.{name}"
            tensors[f"{key}.lora_A.weight"] = (tag, a.astype(np.float32))
            tensors[f"{key}.lora_B.weight"] = (tag, b.astype(np.float32))
    directory.mkdir(parents=True)
    write_safetensors(directory / "adapter_model.safetensors", tensors, {"format": "pt"})
    config = {"peft_type": "LORA", "r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "up_proj", "down_proj"]}
    (directory / "adapter_config.json").write_text(json.dumps(config))
    return directory


def test_threads_give_the_same_bits_in_the_same_order(tmp_path, monkeypatch):
    ck = many_modules(tmp_path / "ck")
    monkeypatch.setattr(weight, "worker_count", lambda modules: 1)
    serial = analyze(ck, emit_warnings=False)
    monkeypatch.setattr(weight, "worker_count", lambda modules: 4)
    pooled = analyze(ck, emit_warnings=False)
    assert [r["module"] for r in pooled.records] == load_checkpoint(ck).modules
    assert pooled.to_json() == serial.to_json()  # every digit of every singular value and metric


def test_progress_is_reported_per_module_in_order_from_the_calling_thread(tmp_path, monkeypatch):
    ck = many_modules(tmp_path / "ck", layers=5)
    monkeypatch.setattr(weight, "worker_count", lambda modules: 3)
    calls = []
    result = analyze(ck, emit_warnings=False, progress=lambda *call: calls.append((*call, threading.get_ident())))
    assert [c[:3] for c in calls] == [(i, 15, rec["module"]) for i, rec in enumerate(result.records, start=1)]
    assert {c[3] for c in calls} == {threading.get_ident()}


def test_blas_is_single_threaded_while_measuring(tmp_path, monkeypatch):
    threadpoolctl = pytest.importorskip("threadpoolctl")
    ck = many_modules(tmp_path / "ck", layers=2)
    monkeypatch.setattr(weight, "worker_count", lambda modules: 2)
    seen = []

    def report(done, total, module):
        seen.extend(info["num_threads"] for info in threadpoolctl.threadpool_info() if info["user_api"] == "blas")

    analyze(ck, emit_warnings=False, progress=report)
    assert seen and set(seen) == {1}


def test_a_read_error_surfaces_at_its_module_after_the_ones_before(tmp_path, monkeypatch):
    ck = many_modules(tmp_path / "ck", layers=6)
    checkpoint = load_checkpoint(ck)
    weights = tmp_path / "ck" / "adapter_model.safetensors"
    # the file shrinks after its header was validated: the last modules can no longer be read
    with open(weights, "r+b") as handle:
        handle.truncate(weights.stat().st_size - 100)
    monkeypatch.setattr(weight, "worker_count", lambda modules: 3)
    run = weight.prepare(checkpoint)
    done = []
    with pytest.raises(CheckpointError, match="truncated|changed size|cannot read"):
        for layer in run.layers(None):
            done.append(layer.identity["module"])
    assert done == checkpoint.modules[: len(done)]
    assert 0 < len(done) < len(checkpoint.modules)


def test_ordered_map_keeps_order_bounds_the_window_and_cancels_on_error():
    started = []
    lock = threading.Lock()

    def work(i):
        with lock:
            started.append(i)
        time.sleep(0.002 * (5 - i % 5))  # later items finish first
        if i == 6:
            raise ValueError("item 6")
        return i * i

    results = []
    with pytest.raises(ValueError, match="item 6"):
        for value in weight.ordered_map(work, range(100), workers=3):
            results.append(value)
    assert results == [i * i for i in range(6)]
    assert max(started) <= 6 + 3  # never more than `workers` places ahead of the item being yielded


def test_ordered_map_stops_when_the_consumer_stops():
    started = []

    def work(i):
        started.append(i)
        return i

    generator = weight.ordered_map(work, range(1000), workers=2)
    assert [next(generator) for _ in range(3)] == [0, 1, 2]
    generator.close()
    assert len(started) <= 3 + 2


def test_a_look_alike_checkpoint_is_measured_one_module_at_a_time(tmp_path):
    # any object with iter_layers() (not a Checkpoint) is read serially, in its own order
    checkpoint = load_checkpoint(many_modules(tmp_path / "ck", layers=2))

    class LookAlike:
        path = checkpoint.path
        format = "test"
        method = "lora"

        def __len__(self):
            return len(checkpoint)

        def iter_layers(self):
            return reversed(list(checkpoint.iter_layers()))

    result = analyze(LookAlike(), emit_warnings=False)
    assert [r["module"] for r in result.records] == checkpoint.modules[::-1]


def test_ordered_map_under_random_timing_errors_and_early_stops():
    import random

    rng = random.Random(0)
    for _ in range(60):
        n = rng.randint(0, 30)
        workers = rng.randint(1, 4)
        bad = rng.choice([None, *range(n)]) if n else None
        stop_at = rng.choice([None, rng.randint(1, n)]) if n else None
        live, most = [0], [0]
        lock = threading.Lock()

        def work(i, bad=bad):
            with lock:
                live[0] += 1
                most[0] = max(most[0], live[0])
            time.sleep(rng.random() * 0.0005)
            with lock:
                live[0] -= 1
            if i == bad:
                raise KeyError(i)
            return i

        got = []
        generator = weight.ordered_map(work, range(n), workers)
        try:
            for value in generator:
                got.append(value)
                if len(got) == stop_at:
                    generator.close()
        except KeyError as exc:
            assert exc.args[0] == bad
        want = list(range(n))[: bad if bad is not None else n][:stop_at]
        assert got == want
        assert most[0] <= workers  # the caller is one of the workers
        assert not [t for t in threading.enumerate() if t.name.startswith("spectra-")]  # helpers joined


def test_worker_count_is_bounded():
    assert weight.worker_count(1) == 1
    assert 1 <= weight.worker_count(1000) <= weight.MAX_WORKERS


def test_a_failure_while_finishing_a_batch_surfaces_at_its_module(tmp_path, monkeypatch):
    # module 7's B has two equal columns: its core takes the Householder route, which reads its
    # factors again; that read fails (the file was replaced): the modules before it come first
    ck = many_modules(tmp_path / "ck", layers=4)
    checkpoint = load_checkpoint(ck)
    target = checkpoint.modules[7]
    original = weight._factors_of

    def factors_of(entry):
        if entry.module == target:
            raise CheckpointError(str(ck), "cannot read tensor: the file was replaced")
        return original(entry)

    monkeypatch.setattr(weight, "_factors_of", factors_of)
    monkeypatch.setattr(weight, "worker_count", lambda modules: 2)
    entries = []  # the entries are frozen: the target's read is replaced
    for entry in checkpoint.entries:
        if entry.module == target:
            read = entry.read

            def duplicated(read=read):
                update = read()
                update.B[:, 1] = update.B[:, 0]
                return update

            entry = dataclasses.replace(entry, read=duplicated)
        entries.append(entry)
    checkpoint.entries[:] = entries
    done = []
    with pytest.raises(CheckpointError, match="the file was replaced"):
        for layer in weight.prepare(checkpoint).layers(None):
            done.append(layer.identity["module"])
    assert done == checkpoint.modules[:7]


def test_a_spectrum_that_overflows_is_non_finite_not_a_crash(tmp_path):
    tensors = {f"{PREFIX}model.layers.0.q_proj.lora_A.weight": ("F32", np.full((2, 8), 10.0, np.float32)),
               f"{PREFIX}model.layers.0.q_proj.lora_B.weight": ("F32", np.full((8, 2), 10.0, np.float32))}
    (tmp_path / "ck").mkdir()
    write_safetensors(tmp_path / "ck" / "adapter_model.safetensors", tensors, {"format": "pt"})
    config = {"peft_type": "LORA", "r": 2, "lora_alpha": 1e308, "target_modules": ["q_proj"]}
    (tmp_path / "ck" / "adapter_config.json").write_text(json.dumps(config))
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # no numpy overflow warning on stderr either
        result = analyze(tmp_path / "ck", emit_warnings=False)  # sigma = 800 * 5e307 overflows
    assert result.records[0]["status"] == "non_finite" and result.records[0]["singular_values"] is None
