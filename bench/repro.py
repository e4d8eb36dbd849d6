"""What makes a bench study reproducible: pinned threads, every seed set, raw records kept and checked.

Used by ``bench/rank_scaling.py`` and ``bench/encoder_rank_scaling.py``; ``bench/results_page.py``
turns their committed records into ``docs/results.md``.

* :func:`pin_threads` runs every BLAS and torch thread pool on one thread. Call it before numpy or
  torch do any work (the scripts call it before importing them): the OpenBLAS/MKL/OpenMP pools read
  their size from the environment when they load. With one thread the order of every floating-point
  reduction is fixed, so the same command on the same machine type gives the same bits whatever else
  runs on the machine (only slower).
* :func:`seed_everything` seeds ``random``, numpy and torch; each run also passes its seed to the
  trainer (data order and dropout) and re-seeds torch right before the adapter is initialised.
* :class:`RunLog` appends one JSON record per finished run to ``OUT/runs.jsonl`` (resumable: a run
  already logged is skipped when the sweep is restarted; several processes may share it, each running a
  disjoint subset such as ``--seeds 1``, since every run is single-threaded) and :func:`write_records`
  writes the study's committed file: ``{"study", "meta", "runs": [record, ...]}``.
* :func:`check_run` compares a rerun against its committed record at the precision the results page
  prints (:data:`PRECISION`); :func:`sha256_file` fingerprints a base model.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import random
import sys
from pathlib import Path
from typing import Any, Iterable, Mapping

__all__ = [
    "PRECISION",
    "THREAD_VARIABLES",
    "RunLog",
    "check_run",
    "fmt",
    "machine_info",
    "pin_threads",
    "read_records",
    "seed_everything",
    "sha256_file",
    "write_records",
]

#: environment variables that size the thread pools of OpenMP, MKL, OpenBLAS, BLIS, numexpr, Accelerate.
THREAD_VARIABLES = (
    "OMP_NUM_THREADS",
    "MKL_NUM_THREADS",
    "OPENBLAS_NUM_THREADS",
    "BLIS_NUM_THREADS",
    "NUMEXPR_NUM_THREADS",
    "VECLIB_MAXIMUM_THREADS",
)

#: decimals the results page prints for each metric; a rerun must reproduce a run to these.
PRECISION: dict[str, int] = {
    "val_loss": 4,
    "val_ppl": 3,
    "answer_ppl": 3,
    "train_loss": 4,
    "weight_erank": 2,
    "weight_utilization": 3,
    "activation_erank": 2,
    "activation_utilization": 3,
    "activation_energy_rank_90": 2,
    "activation_tokens": 0,
    "val_top1": 4,
}


def pin_threads() -> None:
    """One thread for every BLAS/OpenMP pool and for torch (intra- and inter-op).

    Sets :data:`THREAD_VARIABLES` to ``"1"`` (effective for libraries loaded afterwards), then imports
    torch and calls ``torch.set_num_threads(1)`` and ``torch.set_num_interop_threads(1)``.
    """
    for name in THREAD_VARIABLES:
        os.environ[name] = "1"
    import torch

    torch.set_num_threads(1)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:  # already set, or parallel work has started: the pool then keeps its size
        pass


def seed_everything(seed: int) -> None:
    """Seed ``random``, numpy and torch (CPU) with ``seed``."""
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def machine_info() -> dict[str, Any]:
    """What the numbers depend on besides the code: CPU, Python, torch, numpy, transformers, threads."""
    import numpy as np
    import torch

    info: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "machine": platform.machine(),
        "cpu": _cpu_model(),
        "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
    }
    transformers = sys.modules.get("transformers")
    if transformers is not None:
        info["transformers"] = transformers.__version__
    return info


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def sha256_file(path: str | os.PathLike[str]) -> str:
    """Hex SHA-256 of a file (a base model's weights)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def fmt(metric: str, value: Any) -> str:
    """``value`` as the results page prints ``metric`` (:data:`PRECISION` decimals; ``-`` for None)."""
    if value is None:
        return "-"
    return f"{float(value):.{PRECISION.get(metric, 4)}f}"


def run_key(record: Mapping[str, Any], keys: Iterable[str]) -> tuple:
    """The identity of a run: its values of ``keys`` (e.g. method, rank, seed)."""
    return tuple(record[k] for k in keys)


class RunLog:
    """``OUT/runs.jsonl``: one record per finished run, appended (and flushed) as each run ends.

    Args:
        path: the JSONL file.
        settings: the sweep's settings; a log written under other settings is refused (start a new OUT).
        keys: the fields that identify a run.
    """

    def __init__(self, path: Path, settings: Mapping[str, Any], keys: tuple[str, ...]) -> None:
        self.path, self.keys = path, keys
        self.records: list[dict[str, Any]] = []
        header = {"settings": json.loads(json.dumps(settings))}
        if path.is_file():
            lines = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
            if not lines or lines[0] != header:
                raise SystemExit(f"{path}: written by a sweep with other settings; use another --out")
            self.records = lines[1:]
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(header) + "\n")

    def done(self, *key: Any) -> dict[str, Any] | None:
        """The logged record of run ``key``, or None. The file is read again first: several processes
        may share one log, each running its own subset (``--seeds 1``, ``--methods lora``), appending one
        line per run."""
        lines = [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]
        self.records = lines[1:]
        for record in self.records:
            if run_key(record, self.keys) == key:
                return record
        return None

    def add(self, record: dict[str, Any]) -> None:
        with self.path.open("a") as handle:
            handle.write(json.dumps(record) + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        self.records.append(record)


def write_records(path: Path, study: str, meta: Mapping[str, Any], runs: list[dict[str, Any]]) -> None:
    """Write the study's raw results: ``{"study": study, "meta": meta, "runs": runs}`` (sorted keys, indented)."""
    text = json.dumps({"study": study, "meta": meta, "runs": runs}, indent=1, sort_keys=True) + "\n"
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def read_records(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a file written by :func:`write_records`."""
    data = json.loads(Path(path).read_text())
    if not isinstance(data, dict) or not {"study", "meta", "runs"} <= set(data):
        raise SystemExit(f"{path}: not a study results file (needs study, meta, runs)")
    return data


def check_run(committed: Mapping[str, Any], rerun: Mapping[str, Any]) -> list[str]:
    """Metrics whose rerun value prints differently from the committed one (empty: reproduced).

    Every metric of :data:`PRECISION` present in ``committed`` is compared as printed by :func:`fmt`.
    """
    problems = []
    for metric in PRECISION:
        if metric in committed:
            want, got = fmt(metric, committed[metric]), fmt(metric, rerun.get(metric))
            if want != got:
                problems.append(f"{metric}: committed {want}, rerun {got}")
    return problems
