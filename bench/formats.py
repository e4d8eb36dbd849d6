"""Benchmark: ``spectra analyze`` on every checkpoint format against the PEFT path, same shapes, one run.

Writes, in a temporary directory, one adapter with Llama-2-7B layer shapes (``--layers`` decoder layers x q, k,
v, o 4096x4096, gate/up 4096 -> 11008, down 11008 -> 4096; rank ``--rank``; float32) in every layout the
readers know, from the SAME factors: a PEFT directory (safetensors, and ``.bin`` for the torch path), a bare
safetensors file, kohya, LyCORIS LoCon, diffusers (``transformer.`` keys + ``lora_adapter_metadata``),
mlx-lm (transposed factors + ``adapter_config.json``), torchtune (``.safetensors`` and ``.pt``). Then it runs,
round-robin so that machine drift hits every format alike:

* ``spectra analyze PATH --format json -q`` as a whole process (what a user waits for), and
* ``analyze(PATH)`` in-process (reader + spectra + metrics, without the interpreter start),
* ``detect_format(PATH)`` in-process (the sniff: headers and names only, no tensor; best of 5 x 10 calls),

and prints the median times and their ratios to the PEFT path of the same container (the ``.pt`` torchtune
file and the PEFT ``.bin`` load through ``torch.load``; everything else through our safetensors reader).
The bar is 1.2x. LoHa and LoKr (other maths: Hadamard and Kronecker kinds) are timed on modules of the same
shapes with ``r1 r2`` = rank and printed for information.

Usage::

    .venv/bin/python bench/formats.py [--layers 4] [--rank 16] [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import timeit
from pathlib import Path
from typing import Callable

import numpy as np

__all__ = ["main", "write_formats"]

SHAPES: dict[str, tuple[int, int]] = {
    "self_attn.q_proj": (4096, 4096),
    "self_attn.k_proj": (4096, 4096),
    "self_attn.v_proj": (4096, 4096),
    "self_attn.o_proj": (4096, 4096),
    "mlp.gate_proj": (11008, 4096),
    "mlp.up_proj": (11008, 4096),
    "mlp.down_proj": (4096, 11008),
}
ALPHA = 32.0
SPECTRA = str(Path(sys.executable).with_name("spectra"))


def _factors(layers: int, rank: int, seed: int = 0) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """module -> (A (r, d_in), B (d_out, r)), float32, decaying B columns (a trained-looking spectrum)."""
    rng = np.random.default_rng(seed)
    decay = np.exp(-np.arange(rank) / max(rank / 4, 1.0))
    out = {}
    for layer in range(layers):
        for name, (d_out, d_in) in SHAPES.items():
            a = rng.uniform(-1, 1, (rank, d_in)) / math.sqrt(d_in)
            b = rng.standard_normal((d_out, rank)) * 1e-3 * decay
            out[f"model.layers.{layer}.{name}"] = (a.astype(np.float32), b.astype(np.float32))
    return out


def write_formats(root: Path, layers: int, rank: int) -> dict[str, Path]:
    """Write the same adapter in every layout; returns format label -> path."""
    import torch
    from safetensors.numpy import save_file

    factors = _factors(layers, rank)
    paths: dict[str, Path] = {}
    peft_config = {"peft_type": "LORA", "r": rank, "lora_alpha": ALPHA, "target_modules": sorted({m.rsplit(".", 1)[1] for m in factors})}

    def write_dir(name: str, weights: str, tensors: dict[str, np.ndarray], config: dict | None, metadata=None) -> Path:
        d = root / name
        d.mkdir(parents=True)
        save_file(tensors, str(d / weights), metadata=metadata)
        if config is not None:
            (d / "adapter_config.json").write_text(json.dumps(config))
        return d

    peft = {f"base_model.model.{m}.lora_{x}.weight": t for m, (a, b) in factors.items() for x, t in (("A", a), ("B", b))}
    paths["peft"] = write_dir("peft", "adapter_model.safetensors", peft, peft_config, {"format": "pt"})
    bare = {f"{m}.lora_{x}.weight": t for m, (a, b) in factors.items() for x, t in (("A", a), ("B", b))}
    paths["safetensors"] = write_dir("bare", "bare.safetensors", bare, None) / "bare.safetensors"
    kohya: dict[str, np.ndarray] = {}
    locon: dict[str, np.ndarray] = {}
    for m, (a, b) in factors.items():
        for prefix, target in ((f"lora_unet_{m.replace('.', '_')}", kohya), (f"lycoris_{m.replace('.', '_')}", locon)):
            target.update({f"{prefix}.lora_down.weight": a, f"{prefix}.lora_up.weight": b,
                           f"{prefix}.alpha": np.array(ALPHA, np.float32)})
    paths["kohya"] = write_dir("kohya", "k.safetensors", kohya, None, {"ss_network_dim": str(rank)}) / "k.safetensors"
    paths["lycoris (LoCon)"] = write_dir("locon", "l.safetensors", locon, None) / "l.safetensors"
    diffusers = {f"transformer.{m}.lora_{x}.weight": t for m, (a, b) in factors.items() for x, t in (("A", a), ("B", b))}
    meta = {"format": "pt", "lora_adapter_metadata": json.dumps({"transformer.r": rank, "transformer.lora_alpha": ALPHA})}
    paths["diffusers"] = write_dir("diffusers", "pytorch_lora_weights.safetensors", diffusers, None, meta)
    mlx = {}
    for m, (a, b) in factors.items():
        mlx[f"{m}.lora_a"], mlx[f"{m}.lora_b"] = np.ascontiguousarray(a.T), np.ascontiguousarray(b.T)
    paths["mlx"] = write_dir("mlx", "adapters.safetensors", mlx, {"fine_tune_type": "lora",
                             "lora_parameters": {"rank": rank, "scale": ALPHA / rank, "dropout": 0.0}})
    tune = {f"{m}.lora_{x}.weight": t for m, (a, b) in factors.items() for x, t in (("a", a), ("b", b))}
    paths["torchtune (.safetensors)"] = write_dir("tt", "adapter_0.safetensors", tune, peft_config) / "adapter_0.safetensors"
    torch.save({k: torch.from_numpy(v) for k, v in tune.items()}, root / "tt" / "adapter_model.pt")
    paths["torchtune (.pt)"] = root / "tt" / "adapter_model.pt"
    bin_dir = root / "peft_bin"
    bin_dir.mkdir()
    torch.save({k: torch.from_numpy(v) for k, v in peft.items()}, bin_dir / "adapter_model.bin")
    (bin_dir / "adapter_config.json").write_text(json.dumps(peft_config))
    paths["peft (.bin)"] = bin_dir
    # other maths, same module shapes: LoHa with r1 = r2 = sqrt(rank) (r1 r2 = rank), LoKr with a low-rank W2
    rng = np.random.default_rng(1)
    half = max(int(round(math.sqrt(rank))), 1)
    loha, lokr = {}, {}
    for m, (d_out, d_in) in ((m, SHAPES[m.split(".", 3)[3]]) for m in factors):
        p = f"lycoris_{m.replace('.', '_')}"
        for i in ("1", "2"):
            loha[f"{p}.hada_w{i}_a"] = (rng.standard_normal((d_out, half)) * 0.01).astype(np.float32)
            loha[f"{p}.hada_w{i}_b"] = (rng.standard_normal((half, d_in)) * 0.01).astype(np.float32)
        loha[f"{p}.alpha"] = np.array(float(half), np.float32)
        a1, c1 = 16, 16
        lokr[f"{p}.lokr_w1"] = rng.standard_normal((a1, c1)).astype(np.float32)
        lokr[f"{p}.lokr_w2_a"] = rng.standard_normal((d_out // a1, rank)).astype(np.float32)
        lokr[f"{p}.lokr_w2_b"] = rng.standard_normal((rank, d_in // c1)).astype(np.float32)
        lokr[f"{p}.alpha"] = np.array(float(rank), np.float32)
    paths["lycoris LoHa (r1 r2 = r)"] = write_dir("loha", "h.safetensors", loha, None) / "h.safetensors"
    paths["lycoris LoKr (W2 rank r)"] = write_dir("lokr", "k.safetensors", lokr, None) / "k.safetensors"
    return paths


#: each format's baseline: same container, same reader of bytes
BASELINE = {"torchtune (.pt)": "peft (.bin)", "peft (.bin)": "peft (.bin)"}
INFORMATIONAL = ("lycoris LoHa (r1 r2 = r)", "lycoris LoKr (W2 rank r)")


def _time(fn: Callable[[], object]) -> float:
    """Wall seconds of ``fn()``."""
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _cpu(fn: Callable[[], object]) -> float:
    """CPU seconds (user + system) of ``fn()`` in this process."""
    start = time.process_time()
    fn()
    return time.process_time() - start


def _child(argv: list[str], env: dict[str, str]) -> tuple[float, float]:
    """(wall, CPU user + system) seconds of a child process run to completion."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    wall = _time(lambda: subprocess.run(argv, check=True, env=env, stdout=subprocess.DEVNULL))
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    from nora_spectra.analysis import analyze
    from nora_spectra.io import detect_format, load_checkpoint

    with tempfile.TemporaryDirectory() as tmp:
        paths = write_formats(Path(tmp), args.layers, args.rank)
        for label, path in paths.items():  # warm-up (lazy imports, page cache) and a sanity check
            load_checkpoint(path)
            analyze(path, emit_warnings=False)
        process: dict[str, list[float]] = {label: [] for label in paths}
        process_cpu: dict[str, list[float]] = {label: [] for label in paths}
        inproc: dict[str, list[float]] = {label: [] for label in paths}
        sniff: dict[str, list[float]] = {label: [] for label in paths}
        env = dict(os.environ, PYTHONWARNINGS="ignore")
        labels = list(paths)
        for repeat in range(args.repeats):
            for label in labels[repeat % len(labels):] + labels[: repeat % len(labels)]:  # rotate the order
                path = paths[label]
                wall, cpu = _child([SPECTRA, "analyze", str(path), "--format", "json", "-q"], env)
                process[label].append(wall)
                process_cpu[label].append(cpu)
                inproc[label].append(_cpu(lambda: analyze(path, emit_warnings=False)))
        for label, path in paths.items():  # the sniff costs well under a millisecond: the best of 5 x 10 calls
            sniff[label] = [min(timeit.repeat(lambda: detect_format(path), number=10, repeat=5)) / 10]
        spectra = analyze(paths["peft"], emit_warnings=False)
        load = os.getloadavg()[0]
        print(f"{args.layers} layers x 7 Llama-2-7B modules = {len(spectra)} modules, rank {args.rank}, float32; "
              f"median of {args.repeats} repeats in rotating order; load average {load:.1f} on {os.cpu_count()} CPUs")
        print("ratio = median / median of the PEFT path of the same container (safetensors; .pt vs PEFT .bin)")
        print("process: `spectra analyze PATH --format json -q`, CPU (user+sys) and wall; analyze(): in-process CPU")
        print(f"{'format':26s} {'proc CPU s':>10s} {'ratio':>6s} {'proc wall s':>11s} {'ratio':>6s} "
              f"{'analyze() s':>11s} {'ratio':>6s} {'detect ms':>9s}")
        worst = {"cpu": 0.0, "wall": 0.0}
        for label in paths:
            base = BASELINE.get(label, "peft")
            c, cb = statistics.median(process_cpu[label]), statistics.median(process_cpu[base])
            p, b = statistics.median(process[label]), statistics.median(process[base])
            q, qb = statistics.median(inproc[label]), statistics.median(inproc[base])
            d = statistics.median(sniff[label]) * 1e3
            note = "  (other maths, for information)" if label in INFORMATIONAL else ""
            if label not in INFORMATIONAL:
                worst["cpu"], worst["wall"] = max(worst["cpu"], c / cb), max(worst["wall"], p / b)
            print(f"{label:26s} {c:10.3f} {c / cb:6.2f} {p:11.3f} {p / b:6.2f} {q:11.3f} {q / qb:6.2f} {d:9.2f}{note}")
        print(f"worst ratio among the LoRA layouts: process CPU {worst['cpu']:.2f}, process wall {worst['wall']:.2f} "
              "(bar: 1.20)")


if __name__ == "__main__":
    main()
