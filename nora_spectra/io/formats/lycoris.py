"""``lycoris``: a LyCORIS file (lycoris-lora): LoHa (``hada_*``), LoKr (``lokr_*``) and LoCon (``lora_down`` /
``lora_up`` / ``lora_mid``) modules, with ``alpha`` and DoRA's ``dora_scale``.

Keys are ``<prefix>.<tensor>`` with a prefix without dots (``lycoris_<path>`` from ``create_lycoris``,
``lora_unet_<path>`` / ``lora_te*_<path>`` when trained through kohya's scripts). The updates are those
``forward()`` adds (not ``get_diff_weight()``, which in lycoris-lora 4.1 multiplies by ``alpha / r`` a second
time), each in its exact factored kind:

* LoHa ``s * (w1_a @ w1_b) * (w2_a @ w2_b)`` (element-wise): a :class:`~nora_spectra.updates.HadamardUpdate`,
  rank at most ``r1 * r2``. Tucker convs (``hada_t1/t2``, ``w_a`` (r, out), ``w_b`` (r, in)): each product is
  ``w_a^T @ M`` with ``M[i, (q, h, w)] = sum_j t[i, j, h, w] w_b[j, q]``, still rank ``r``.
* LoKr ``s * kron(W1, W2)``: a :class:`~nora_spectra.updates.KroneckerUpdate` whose factors are low-rank
  (``*_a @ *_b``; Tucker ``lokr_t2``: ``w2_a^T @ M``) or dense (``lokr_w1``, ``lokr_w2``); never formed.
* LoCon: kohya's layout (:mod:`nora_spectra.io.kohya_modules`).

Scale ``alpha / r`` (``r`` = ``hada_w1_b.shape[0]``; LoKr: ``lokr_w1_a.shape[1]``, else ``lokr_w2_a.shape[1]``,
Tucker ``lokr_t2.shape[0]``); ``alpha`` missing or 0 means ``alpha = r``; a LoKr module with both factors full
has scale 1 whatever its stored alpha (LyCORIS sets ``alpha = r`` then). ``rank`` in the records is the kind's
true maximum rank (LoHa ``min(r1 r2, d_out, d_in)``, LoKr ``rank(W1) * rank(W2)``), so utilization is measured
against what the module can reach. Non-Tucker conv factors are stored flattened, so such a module reads as
``linear`` with ``d_in = c_in*kh*kw`` (the same matrix, the same spectrum).
"""

from __future__ import annotations

import math
from functools import partial
from typing import Mapping

import numpy as np

from nora_spectra._text import name_list, plural
from nora_spectra.errors import CheckpointError
from nora_spectra.io.checkpoint import Checkpoint, ModuleEntry, TensorSource
from nora_spectra.io.factors import (
    alpha_scale,
    check_float,
    check_vector,
    dtype_of,
    group_keys,
    read_scalar,
    read_vector,
    skipped_warning,
)
from nora_spectra.io.kohya_modules import (
    KOHYA_SUFFIXES,
    ModuleNames,
    dora_axis,
    kohya_lora_entry,
)
from nora_spectra.io.peft import is_adapter_weights_file
from nora_spectra.io.peft_keys import natural_key
from nora_spectra.io.registry import Format, Probe
from nora_spectra.io.safetensors_file import TensorInfo
from nora_spectra.io.signatures import LYCORIS_FACTORS, lycoris_keys
from nora_spectra.updates import (
    DenseUpdate,
    HadamardUpdate,
    KroneckerUpdate,
    LowRankUpdate,
)

_SUFFIXES = {**KOHYA_SUFFIXES, **{f".{name}": name for name in sorted(LYCORIS_FACTORS)}}

__all__ = ["FORMAT", "open_lycoris"]


def _sniff(probe: Probe) -> bool:
    if not probe.looks_like_safetensors() or is_adapter_weights_file(probe):
        return False
    header = probe.safetensors()
    return lycoris_keys(header.keys(), header.metadata)


# ---------------------------------------------------------------------------------------------- maths
def _fold(core: np.ndarray, right: np.ndarray) -> np.ndarray:
    """``M[i, (q, h, w)] = sum_j core[i, j, h, w] right[j, q]``, as ``(r, d_in*kh*kw)``."""
    return np.einsum("ij...,jq->iq...", core, right).reshape(core.shape[0], -1)


def _read_loha(source: TensorSource, keys: Mapping[str, str], rank: int) -> HadamardUpdate:
    sides = []
    for i in ("1", "2"):
        w_a, w_b = source.read(keys[f"hada_w{i}_a"]), source.read(keys[f"hada_w{i}_b"])
        if f"hada_t{i}" in keys:  # Tucker: w_a (r, out), w_b (r, c_in)
            sides.append(LowRankUpdate(_fold(source.read(keys[f"hada_t{i}"]), w_b), w_a.T.copy()))
        else:  # w_a (out, r), w_b (r, in)
            sides.append(LowRankUpdate(w_b.reshape(w_b.shape[0], -1), w_a))
    scale = 1.0 if "alpha" not in keys else alpha_scale(read_scalar(source, keys["alpha"]), rank)
    return HadamardUpdate(sides[0], sides[1], scale)


def _read_lokr(source: TensorSource, keys: Mapping[str, str], rank: int | None) -> KroneckerUpdate:
    if "lokr_w1" in keys:
        left: LowRankUpdate | DenseUpdate = DenseUpdate(source.read(keys["lokr_w1"]))
    else:
        left = LowRankUpdate(source.read(keys["lokr_w1_b"]), source.read(keys["lokr_w1_a"]))
    if "lokr_w2" in keys:
        w2 = source.read(keys["lokr_w2"])
        right: LowRankUpdate | DenseUpdate = DenseUpdate(w2.reshape(w2.shape[0], -1))
    elif "lokr_t2" in keys:  # Tucker: w2_a (r, b), w2_b (r, d)
        right = LowRankUpdate(_fold(source.read(keys["lokr_t2"]), source.read(keys["lokr_w2_b"])),
                              source.read(keys["lokr_w2_a"]).T.copy())
    else:  # w2_a (b, r), w2_b (r, d[*k])
        w2_b = source.read(keys["lokr_w2_b"])
        right = LowRankUpdate(w2_b.reshape(w2_b.shape[0], -1), source.read(keys["lokr_w2_a"]))
    scale = 1.0 if rank is None or "alpha" not in keys else alpha_scale(read_scalar(source, keys["alpha"]), rank)
    return KroneckerUpdate(left, right, scale)


# ---------------------------------------------------------------------------------------- validation
class _Shapes:
    """Header shapes of one module's tensors, with the module's name for messages."""

    def __init__(self, path: str, prefix: str, source: TensorSource, keys: Mapping[str, str]) -> None:
        self.path, self.prefix = path, prefix
        self.infos: dict[str, TensorInfo] = {role: source.info(key) for role, key in keys.items()}

    def __getitem__(self, role: str) -> tuple[int, ...]:
        return self.infos[role].shape

    def require(self, *roles: str) -> None:
        missing = [role for role in roles if role not in self.infos]
        if missing:
            present = ", ".join(sorted(info.name[len(self.prefix) + 1 :] for info in self.infos.values()))
            raise CheckpointError(self.path, f"module {self.prefix!r} has {present} but no {', '.join(missing)}")

    def fail(self, roles: tuple[str, ...], rule: str) -> CheckpointError:
        shapes = ", ".join(f"{role} {list(self[role])}" for role in roles if role in self.infos)
        return CheckpointError(self.path, f"module {self.prefix!r}: shapes do not compose, {shapes} ({rule})")


def _loha_entry(path: str, source: TensorSource, prefix: str, keys: Mapping[str, str], module: str) -> ModuleEntry:
    s = _Shapes(path, prefix, source, keys)
    s.require("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")
    roles = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2")
    check_float(path, prefix, [s.infos[r] for r in roles if r in s.infos])
    tucker = ("hada_t1" in keys, "hada_t2" in keys)
    if tucker[0] != tucker[1]:
        raise s.fail(roles, "hada_t1 and hada_t2 come together")
    ranks, dims = [], set()
    for i in ("1", "2"):
        a, b = s[f"hada_w{i}_a"], s[f"hada_w{i}_b"]
        if tucker[0]:  # w_a (r, out), w_b (r, c_in), t (r, r, *k)
            t = s[f"hada_t{i}"]
            ok = len(a) == 2 and len(b) == 2 and len(t) >= 3 and a[0] == b[0] == t[0] == t[1]
            if not ok:
                raise s.fail(roles, "Tucker: w_a (r, out), w_b (r, in), t (r, r, kh, kw)")
            ranks.append(a[0])
            dims.add((a[1], b[1] * math.prod(t[2:])))
        else:  # w_a (out, r), w_b (r, in)
            if len(a) != 2 or len(b) < 2 or a[1] != b[0]:
                raise s.fail(roles, "w_a (out, r), w_b (r, in)")
            ranks.append(a[1])
            dims.add((a[0], math.prod(b[1:])))
    if len(dims) != 1 or 0 in ranks:
        raise s.fail(roles, "both products must have one shape and a positive rank")
    shape = dims.pop()
    layer_type = "conv" if tucker[0] or len(s["hada_w1_b"]) > 2 else "linear"
    return _entry(path, source, prefix, keys, module, s, shape, layer_type, "loha",
                  rank=min(ranks[0] * ranks[1], *shape), alpha_rank=ranks[0],
                  read=partial(_read_loha, source, dict(keys), ranks[0]),
                  notes=("Hadamard product of two rank-r products: rank <= r1*r2, face-splitting factors",)
                  + (("Tucker cores (hada_t1/t2) folded into the factors",) if tucker[0] else ()))


def _lokr_entry(path: str, source: TensorSource, prefix: str, keys: Mapping[str, str], module: str) -> ModuleEntry:
    s = _Shapes(path, prefix, source, keys)
    roles = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")
    check_float(path, prefix, [s.infos[r] for r in roles if r in s.infos])
    if "lokr_w1" not in keys:
        s.require("lokr_w1_a", "lokr_w1_b")
    if "lokr_w2" not in keys:
        s.require("lokr_w2_a", "lokr_w2_b")
    if "lokr_t2" in keys and "lokr_w2" in keys:
        raise s.fail(roles, "lokr_t2 needs lokr_w2_a / lokr_w2_b, not lokr_w2")
    # W1 (a, c)
    if "lokr_w1" in keys:
        w1 = s["lokr_w1"]
        if len(w1) != 2:
            raise s.fail(roles, "lokr_w1 is 2-D")
        (a, c), bound1, r1 = w1, min(w1), None
    else:
        w1a, w1b = s["lokr_w1_a"], s["lokr_w1_b"]
        if len(w1a) != 2 or len(w1b) != 2 or w1a[1] != w1b[0]:
            raise s.fail(roles, "lokr_w1_a (a, r), lokr_w1_b (r, c)")
        (a, c), r1 = (w1a[0], w1b[1]), w1a[1]
        bound1 = min(r1, a, c)
    # W2 (b, d_total)
    if "lokr_w2" in keys:
        w2 = s["lokr_w2"]
        if len(w2) < 2:
            raise s.fail(roles, "lokr_w2 is 2-D (or N-D for conv)")
        b, d, r2, conv = w2[0], math.prod(w2[1:]), None, len(w2) > 2
        bound2 = min(b, d)
    elif "lokr_t2" in keys:  # w2_a (r, b), w2_b (r, d), t2 (r, r, *k)
        w2a, w2b, t2 = s["lokr_w2_a"], s["lokr_w2_b"], s["lokr_t2"]
        if len(w2a) != 2 or len(w2b) != 2 or len(t2) < 3 or not (w2a[0] == w2b[0] == t2[0] == t2[1]):
            raise s.fail(roles, "Tucker: lokr_w2_a (r, b), lokr_w2_b (r, d), lokr_t2 (r, r, kh, kw)")
        b, d, r2, conv = w2a[1], w2b[1] * math.prod(t2[2:]), t2[0], True
        bound2 = min(r2, b, d)
    else:  # w2_a (b, r), w2_b (r, d[, *k])
        w2a, w2b = s["lokr_w2_a"], s["lokr_w2_b"]
        if len(w2a) != 2 or len(w2b) < 2 or w2a[1] != w2b[0]:
            raise s.fail(roles, "lokr_w2_a (b, r), lokr_w2_b (r, d)")
        b, d, r2, conv = w2a[0], math.prod(w2b[1:]), w2a[1], len(w2b) > 2
        bound2 = min(r2, b, d)
    if 0 in (a, b, c, d, bound1, bound2):
        raise s.fail(roles, "every dimension and rank must be positive")
    both_full = "lokr_w1" in keys and "lokr_w2" in keys
    alpha_rank = None if both_full else (r1 if r1 is not None else r2)
    notes = ["Kronecker product: singular values are all products sigma_i(W1) sigma_j(W2)"]
    if both_full:
        notes.append("both Kronecker factors full: scale 1 (LyCORIS ignores alpha then)")
    if "lokr_t2" in keys:
        notes.append("Tucker core (lokr_t2) folded into W2's factors")
    return _entry(path, source, prefix, keys, module, s, (a * b, c * d), "conv" if conv else "linear", "lokr",
                  rank=bound1 * bound2, alpha_rank=alpha_rank,
                  read=partial(_read_lokr, source, dict(keys), alpha_rank), notes=tuple(notes))


def _entry(path: str, source: TensorSource, prefix: str, keys: Mapping[str, str], module: str, s: _Shapes,
           shape: tuple[int, int], layer_type: str, kind: str, *, rank: int, alpha_rank: int | None, read,
           notes: tuple[str, ...]) -> ModuleEntry:
    if "alpha" in keys:
        check_vector(path, prefix, s.infos["alpha"], 1, "alpha is one number")
    elif alpha_rank is not None:
        notes += ("no alpha: alpha = r, scale 1",)
    read_magnitude = None
    if "dora" in keys:
        axis = dora_axis(path, prefix, s.infos["dora"], shape[0], shape[1])
        if axis == "output":  # the true update (--base) normalises rows; per-column magnitudes stay a proxy
            read_magnitude = partial(read_vector, source, keys["dora"])
        notes += (f"DoRA magnitude (dora_scale) per {axis} {'row' if axis == 'output' else 'column'}; "
                  "spectrum of the direction update only",)
    factors = [info for role, info in s.infos.items() if role not in ("alpha", "dora")]
    return ModuleEntry(module=module, key=prefix, kind=kind, rank=rank, shape=shape, layer_type=layer_type,
                       dtype=dtype_of(factors), read=read, dora="dora" in keys, notes=notes,
                       read_magnitude=read_magnitude)


def open_lycoris(probe: Probe, adapter: str | None) -> Checkpoint:
    """Validate a LyCORIS safetensors file from its header and describe every LoHa, LoKr and LoCon module.

    Raises:
        CheckpointError: no supported module, a module missing one of its factors, factors whose shapes do not
            compose, a module mixing LoHa and LoKr tensors, a non-float factor, a bad ``alpha`` or ``dora_scale``.
    """
    if adapter is not None:
        raise CheckpointError(probe.path, "--adapter NAME (adapter=NAME) applies to PEFT adapter directories only")
    source = probe.safetensors()
    path = source.path
    groups, others = group_keys(path, source.keys(), _SUFFIXES)
    skipped: list[tuple[str, str]] = []
    modules: dict[str, dict[str, str]] = {}
    for prefix, keys in groups.items():
        if "." in prefix:
            raise CheckpointError(path, f"unknown layout: LyCORIS module names have no dots, found {prefix!r}")
        if set(keys) <= {"alpha", "dora"}:  # alpha of a module of an algorithm we do not read (GLoRA, OFT, ...)
            skipped.extend((key, "no LoHa / LoKr / LoCon factors beside it (another LyCORIS algorithm?)")
                           for key in keys.values())
            continue
        modules[prefix] = dict(keys)
    for name in others:
        if name.partition(".")[0] not in modules:
            skipped.append((name, "not a LoHa / LoKr / LoCon tensor (another LyCORIS algorithm, or a full tensor)"))
        else:
            raise CheckpointError(path, f"module {name.partition('.')[0]!r} has an unknown tensor {name!r}")
    if not modules:
        sample = ", ".join(source.keys()[:3]) or "no tensors"
        raise CheckpointError(path, f"no LoHa, LoKr or LoCon modules (found {sample})")
    prefixes = sorted(modules, key=natural_key)
    names = ModuleNames(prefixes)
    entries = []
    for prefix in prefixes:
        keys = modules[prefix]
        loha, lokr = any(r.startswith("hada_") for r in keys), any(r.startswith("lokr_") for r in keys)
        if loha and lokr:
            raise CheckpointError(path, f"module {prefix!r} mixes LoHa (hada_*) and LoKr (lokr_*) tensors")
        if (loha or lokr) and any(r in keys for r in ("down", "up", "mid")):
            raise CheckpointError(path, f"module {prefix!r} mixes LoCon (lora_down/lora_up) and LoHa/LoKr tensors")
        build = _loha_entry if loha else _lokr_entry if lokr else kohya_lora_entry
        entries.append(build(path, source, prefix, keys, names[prefix]))
    warnings = []
    no_alpha = [e.key for e in entries if any(n.startswith("no alpha") or n.startswith("no .alpha") for n in e.notes)]
    if no_alpha:
        warnings.append(f"{plural(len(no_alpha), 'module')} without alpha ({name_list(no_alpha, 3)}): alpha = r, scale 1 "
                        "(LyCORIS' rule)")
    if names.kept:
        warnings.append(f"{plural(len(names.kept), 'module name')} kept as stored (no unambiguous dotted path): "
                        + name_list(names.kept, 3))
    if any(entry.dora for entry in entries):
        warnings.append("DoRA layers: spectra are of the direction update only (dora_scale not included)")
    if skipped:
        warnings.append(skipped_warning(skipped, "LoHa, LoKr or LoCon factors"))
    kinds = {entry.kind for entry in entries}
    return Checkpoint(
        path=probe.path,
        format="lycoris",
        method=kinds.pop() if len(kinds) == 1 else "mixed",
        config=None,
        warnings=warnings,
        skipped=skipped,
        weights_path=path,
        metadata=dict(source.metadata),
        entries=entries,
    )


FORMAT = Format(
    name="lycoris",
    summary="LyCORIS .safetensors: LoHa (hada_*), LoKr (lokr_*) and LoCon modules, alpha, dora_scale",
    sniff=_sniff,
    open=open_lycoris,
)
