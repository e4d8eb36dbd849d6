"""``spectra scan`` throughput: adapters per second on 1 and 2 local workers and on Ray, against a plain loop.

1,000 generated adapters (by default): PEFT LoRA directories, NoRA directories and bare ``.safetensors``
files in turn; r drawn from 4..128 (powers of two), hidden sizes from 768..4096, dtypes bf16 / fp16 / fp32,
modules per adapter chosen so an adapter weighs about 2 MiB (2 to 96 modules), about 2 GB in all. They are
generated once into ``--data`` and reused while the generation settings match (``bench.json`` there).

Measured, one after the other in one run (the files are in the page cache after the first pass):

* ``loop``: ``analyze(path, emit_warnings=False)`` over every adapter in one process (a subprocess, so
  its peak memory is its own): the baseline, run first and again last (its drift shows the noise);
* ``local x1`` and ``local x2``: ``scan(..., workers=N)``, the whole command (discovery, content keys,
  Parquet parts and final tables included);
* ``ray x2``: ``scan(..., engine="ray", workers=2)`` on a new local Ray cluster (start-up included), when
  Ray is installed and ``--no-ray`` is not given;
* a control, first and last: the speed-up two pure-Python busy loops get over one on this machine at
  that moment (on a machine shared with other sessions it is the ceiling of any 2-worker speed-up).

Printed: seconds, adapters per second, the per-adapter overhead against the loop, wall-clock
(``N * seconds_N / seconds_loop - 1``; goal < 10 % at 2 workers) and in CPU time (driver thread plus
reaped worker processes against the loop's ``process_time``: what the overhead is when other jobs
share the cores and wall-clock ratios are noise),
the speed-up from 1 to 2 local workers (goal >= 1.7x), how busy each worker was (CPU time over CPU
time plus time spent waiting for its next adapter, from ``/proc/PID/schedstat``: time waiting for a CPU
taken by other jobs is not counted, so this shows whether the engine starves its workers even when the
machine is shared), the peak RSS of each worker process (sampled
VmHWM of every descendant process) and the load average around each measurement. Results also go to
``--out`` as JSON.

Run::

    nice -n 5 .venv/bin/python bench/scan.py                       # about 5 minutes on 2 cores
    .venv/bin/python bench/scan.py --adapters 60 --no-ray          # a quick look
"""

from __future__ import annotations

import argparse
import json
import os
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

GENERATOR_VERSION = 1
RANKS = (4, 8, 16, 32, 64, 128)
HIDDEN = (768, 1024, 2048, 3072, 4096)
DTYPES = ("BF16", "F16", "F32")
TARGET_BYTES = 2 * 1024 * 1024
TYPES = ("q_proj", "k_proj", "v_proj", "o_proj")


def _tensor_bytes(values: np.ndarray, dtype: str) -> bytes:
    if dtype == "F32":
        return values.astype("<f4").tobytes()
    if dtype == "F16":
        return values.astype("<f2").tobytes()
    as_f32 = values.astype("<f4").view("<u4")  # bf16: the upper half of float32, rounded to nearest even
    rounded = (as_f32 + 0x7FFF + ((as_f32 >> 16) & 1)) >> 16
    return rounded.astype("<u2").tobytes()


def _write_safetensors(path: Path, tensors: dict[str, tuple[str, tuple[int, ...], bytes]]) -> int:
    header, offset, blobs = {}, 0, []
    for name, (dtype, shape, data) in tensors.items():
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + len(data)]}
        offset += len(data)
        blobs.append(data)
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as handle:
        handle.write(struct.pack("<Q", len(text)) + text)
        for blob in blobs:
            handle.write(blob)
    return 8 + len(text) + offset


def generate(data: Path, n: int, seed: int = 0) -> dict:
    """Write ``n`` adapters under ``data/adapters`` (skipped when ``bench.json`` says they are there)."""
    settings = {"version": GENERATOR_VERSION, "adapters": n, "seed": seed}
    meta_file = data / "bench.json"
    if meta_file.is_file():
        meta = json.loads(meta_file.read_text())
        if meta.get("settings") == settings:
            return meta
    rng = np.random.default_rng(seed)
    root = data / "adapters"
    total, kinds = 0, {"peft": 0, "nora": 0, "safetensors": 0}
    started = time.perf_counter()
    for i in range(n):
        r, d, dtype = int(rng.choice(RANKS)), int(rng.choice(HIDDEN)), str(rng.choice(DTYPES))
        itemsize = 4 if dtype == "F32" else 2
        per_module = r * 2 * d * itemsize
        modules = int(np.clip(round(TARGET_BYTES / per_module), 2, 96))
        kind = ("peft", "nora", "safetensors")[i % 3]
        prefix = "" if kind == "safetensors" else "base_model.model."
        tensors = {}
        for m in range(modules):
            name = f"{prefix}model.layers.{m // len(TYPES)}.self_attn.{TYPES[m % len(TYPES)]}"
            decay = np.exp(-np.arange(r) / max(1.0, r * rng.uniform(0.05, 0.5)))  # a spread of utilizations
            a = rng.standard_normal((r, d)) * (decay[:, None] / np.sqrt(d))
            b = rng.standard_normal((d, r)) * 0.02
            tensors[f"{name}.lora_A.weight"] = (dtype, (r, d), _tensor_bytes(a, dtype))
            tensors[f"{name}.lora_B.weight"] = (dtype, (d, r), _tensor_bytes(b, dtype))
        if kind == "safetensors":
            path = root / f"bare{i:04d}.safetensors"
            path.parent.mkdir(parents=True, exist_ok=True)
            total += _write_safetensors(path, tensors)
        else:
            path = root / f"{kind}{i:04d}"
            path.mkdir(parents=True, exist_ok=True)
            config = {"peft_type": "NORA" if kind == "nora" else "LORA", "r": r, "lora_alpha": 2 * r,
                      "target_modules": list(TYPES), "base_model_name_or_path": f"bench/base-{d}"}
            (path / "adapter_config.json").write_text(json.dumps(config))
            total += _write_safetensors(path / "adapter_model.safetensors", tensors)
        kinds[kind] += 1
    meta = {"settings": settings, "bytes": total, "kinds": kinds, "generated_in_s": time.perf_counter() - started}
    meta_file.write_text(json.dumps(meta, indent=2))
    return meta


class PeakSampler:
    """Samples VmHWM (peak RSS) of every descendant process, by pid, every ``interval`` seconds."""

    def __init__(self, interval: float = 0.2) -> None:
        self.interval, self.peaks, self.names, self.times = interval, {}, {}, {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> "PeakSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def _children(self) -> dict[int, int]:
        parents = {}
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                try:
                    with open(f"/proc/{entry}/stat") as handle:
                        parents[int(entry)] = int(handle.read().rsplit(")", 1)[1].split()[1])
                except (OSError, IndexError, ValueError):
                    continue
        mine, frontier = set(), {os.getpid()}
        while frontier:
            frontier = {pid for pid, parent in parents.items() if parent in frontier and pid not in mine}
            mine |= frontier
        return {pid: parents[pid] for pid in mine}

    def _run(self) -> None:
        while not self._stop.is_set():
            for pid in self._children():
                try:
                    with open(f"/proc/{pid}/status") as handle:
                        status = dict(line.split(":", 1) for line in handle if ":" in line)
                    with open(f"/proc/{pid}/cmdline", "rb") as handle:
                        cmd = handle.read().replace(b"\0", b" ").decode(errors="replace").strip()
                    with open(f"/proc/{pid}/schedstat") as handle:
                        cpu_ns, wait_ns = (int(x) for x in handle.read().split()[:2])
                    with open(f"/proc/{pid}/stat") as handle:
                        start = int(handle.read().rsplit(")", 1)[1].split()[19]) / os.sysconf("SC_CLK_TCK")
                    with open("/proc/uptime") as handle:
                        now = float(handle.read().split()[0])
                except (OSError, ValueError, IndexError):
                    continue
                # lifetime = on a CPU + waiting for a CPU + waiting for work (its next adapter)
                self.times[pid] = (cpu_ns / 1e9, wait_ns / 1e9, now - start)
                hwm = int(status.get("VmHWM", "0 kB").split()[0]) / 1024
                self.peaks[pid] = max(self.peaks.get(pid, 0.0), hwm)
                self.names[pid] = cmd or status.get("Name", "").strip()
            self._stop.wait(self.interval)

    def workers(self, marker: str) -> list[float]:
        return sorted((mb for pid, mb in self.peaks.items() if marker in self.names.get(pid, "")), reverse=True)

    def busy(self, marker: str) -> list[float]:
        """Per worker: CPU time / (CPU time + time waiting for work); waiting for a CPU is not counted."""
        shares = []
        for pid, (cpu, wait, life) in self.times.items():
            if marker in self.names.get(pid, "") and cpu > 0.5:
                shares.append(cpu / max(cpu, life - wait))
        return sorted(shares)


def _load() -> float:
    return os.getloadavg()[0]


LOOP = """
import json, sys, time
from pathlib import Path
from nora_spectra.scan.discover import discover
from nora_spectra.analysis import analyze
paths = [f.path for f in discover([sys.argv[1]])]
analyze(paths[0], emit_warnings=False)  # imports paid before the clock starts, as a scan worker does
started, cpu = time.perf_counter(), time.process_time()
for path in paths:
    analyze(path, emit_warnings=False)
seconds, cpu = time.perf_counter() - started, time.process_time() - cpu
# VmHWM, not ru_maxrss: on Linux a child's ru_maxrss starts from its parent's at fork
peak = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:"))
print(json.dumps({"seconds": seconds, "cpu_seconds": cpu, "adapters": len(paths), "peak_mb": peak / 1024}))
"""


SPIN = "n = int(__import__('sys').argv[1])\nwhile n:\n    n -= 1\n"


def measure_control(n: int = 20_000_000) -> float:
    """The speed-up this machine gives two CPU-bound processes over one right now (pure Python loops).

    On a shared machine (and with the kernel's autogroup, which gives each session one share) this is
    the ceiling any 2-worker engine can reach at the moment: the scan's speed-up is read against it.
    """
    started = time.perf_counter()
    subprocess.run([sys.executable, "-c", SPIN, str(2 * n)], check=True)
    serial = time.perf_counter() - started
    started = time.perf_counter()
    procs = [subprocess.Popen([sys.executable, "-c", SPIN, str(n)]) for _ in range(2)]
    for proc in procs:
        proc.wait()
    return serial / (time.perf_counter() - started)


def measure_loop(root: Path) -> dict:
    env = dict(os.environ, OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1",
               PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    before = _load()
    out = subprocess.run([sys.executable, "-c", LOOP, str(root)], capture_output=True, text=True, env=env, check=True)
    result = json.loads(out.stdout)
    result.update(load_before=before, load_after=_load())
    return result


def measure_scan(root: Path, out: Path, **options) -> dict:
    from nora_spectra.scan import scan

    import resource

    before = _load()
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    with PeakSampler() as sampler:
        started, driver = time.perf_counter(), time.thread_time()  # the main thread: not the sampler's
        summary = scan([root], output=out, overwrite=True, **options)
        seconds, driver = time.perf_counter() - started, time.thread_time() - driver
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    workers_cpu = (after.ru_utime - children.ru_utime) + (after.ru_stime - children.ru_stime)
    marker = "ray::" if options.get("engine") == "ray" else "nora_spectra.scan.worker"
    peaks = sampler.workers(marker)
    return {
        "seconds": seconds,
        "cpu_seconds": driver + workers_cpu,
        "driver_cpu_seconds": driver,
        "analysis_seconds": summary.seconds,
        "adapters": summary.adapters,
        "errors": summary.errors,
        "worker_peak_mb": peaks[: max(2, options.get("workers") or 2)],
        "worker_busy": sampler.busy(marker),
        "driver_peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "load_before": before,
        "load_after": _load(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--adapters", type=int, default=1000)
    parser.add_argument("--data", type=Path, default=Path(tempfile.gettempdir()) / "nora-spectra-scan-bench")
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    parser.add_argument("--no-ray", action="store_true", help="skip the Ray measurement")
    args = parser.parse_args()

    data = args.data / f"n{args.adapters}"
    data.mkdir(parents=True, exist_ok=True)
    meta = generate(data, args.adapters)
    root = data / "adapters"
    print(f"{args.adapters} adapters ({meta['kinds']}), {meta['bytes'] / 1e9:.2f} GB in {root}")
    print(f"load average before: {os.getloadavg()}")

    controls = [measure_control()]
    results = {"loop": measure_loop(root)}
    with tempfile.TemporaryDirectory() as tmp:
        results["local x1"] = measure_scan(root, Path(tmp) / "x1", workers=1)
        results["local x2"] = measure_scan(root, Path(tmp) / "x2", workers=2)
        ray_found = __import__("importlib.util").util.find_spec("ray") is not None
        if not args.no_ray and ray_found:
            results["ray x2"] = measure_scan(root, Path(tmp) / "ray", engine="ray", workers=2)
    results["loop (again)"] = measure_loop(root)
    controls.append(measure_control())

    baseline = (results["loop"]["seconds"] + results["loop (again)"]["seconds"]) / 2
    cpu_baseline = (results["loop"]["cpu_seconds"] + results["loop (again)"]["cpu_seconds"]) / 2
    n = args.adapters
    print(f"\n{'run':<14}{'seconds':>9}{'adapters/s':>12}{'overhead':>10}{'CPU s':>8}{'CPU overhead':>14}"
          f"{'worker peak MB':>18}{'load 1m':>14}")
    for name, r in results.items():
        workers = 2 if "x2" in name else 1
        overhead = workers * r["seconds"] / baseline - 1
        cpu_overhead = r["cpu_seconds"] / cpu_baseline - 1
        peaks = ", ".join(f"{p:.0f}" for p in r.get("worker_peak_mb", [])) or f"{r.get('peak_mb', 0):.0f}"
        print(f"{name:<14}{r['seconds']:>9.1f}{n / r['seconds']:>12.1f}{overhead:>+10.1%}{r['cpu_seconds']:>8.1f}"
              f"{cpu_overhead:>+14.1%}{peaks:>18}{r['load_before']:>7.2f}->{r['load_after']:.2f}")
    speedup = results["local x1"]["seconds"] / results["local x2"]["seconds"]
    control = sum(controls) / len(controls)
    print(f"\nloop drift: {results['loop (again)']['seconds'] / results['loop']['seconds'] - 1:+.1%} (noise)")
    print(f"speed-up 1 -> 2 local workers: {speedup:.2f}x (goal >= 1.7x); what the machine gave two busy "
          f"processes meanwhile: {' and '.join(f'{c:.2f}x' for c in controls)} (control)")
    print(f"overhead at 2 local workers: {2 * results['local x2']['seconds'] / baseline - 1:+.1%} wall-clock, "
          f"{results['local x2']['cpu_seconds'] / cpu_baseline - 1:+.1%} CPU time (goal < 10 %)")
    for name in ("local x1", "local x2", "ray x2"):
        if name in results:
            busy = ", ".join(f"{b:.1%}" for b in results[name]["worker_busy"])
            print(f"{name}: workers busy (CPU / (CPU + waiting for work)): {busy}")
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"meta": meta, "results": results, "speedup": speedup, "control": control},
                                       indent=2))


if __name__ == "__main__":
    main()
