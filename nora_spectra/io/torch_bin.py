"""Read a legacy ``adapter_model.bin`` (a torch pickle) without ever running code from it.

The file is loaded only with ``torch.load(..., weights_only=True)``, whose restricted unpickler refuses
any global that is not a tensor type or a plain container, so a pickle that would run code raises instead.
torch is imported here, lazily: the safetensors path never imports it.
"""

from __future__ import annotations

import os
import re
import warnings

import numpy as np

from nora_spectra._torch import INSTALL_HINT
from nora_spectra.errors import CheckpointError
from nora_spectra.io.pickle_scan import (
    declared_storage_problem,
    forbidden_globals,
    pickle_problem,
)
from nora_spectra.io.safetensors_file import DTYPES, TensorInfo

__all__ = ["TorchBinFile"]

# torch dtype name (str(dtype) without "torch.") -> safetensors tag, so both readers speak one language.
_TORCH_TO_TAG = {
    "bool": "BOOL",
    "uint8": "U8",
    "int8": "I8",
    "int16": "I16",
    "int32": "I32",
    "int64": "I64",
    "float8_e4m3fn": "F8_E4M3",
    "float8_e5m2": "F8_E5M2",
    "float16": "F16",
    "bfloat16": "BF16",
    "float32": "F32",
    "float64": "F64",
}
_FLOAT_TAGS = {"F8_E4M3", "F8_E5M2", "F16", "BF16", "F32", "F64"}


class TorchBinFile:
    """A torch-pickled state dict, loaded safely, with the same interface as ``SafetensorsFile``.

    Args:
        path: the ``.bin`` file.

    Raises:
        CheckpointError: torch is not installed, the pickle would run code or is corrupt, or it does not
            hold a flat mapping of names to tensors.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = os.fspath(path)
        self.metadata: dict[str, str] = {}
        forbidden = forbidden_globals(self.path)  # fast refusal, before importing torch (about 1 s)
        if forbidden:
            raise CheckpointError(
                self.path, f"refused to unpickle: it refers to {', '.join(forbidden)}, which could run code"
            )
        problem = pickle_problem(self.path)  # damaged or odd pickles never reach torch.load's error path
        if problem is not None:
            raise CheckpointError(self.path, f"not a readable torch checkpoint: {problem}")
        problem = declared_storage_problem(self.path)  # before torch allocates what the pickle declares
        if problem is not None:
            raise CheckpointError(self.path, f"refused to load: {problem}")
        try:
            import torch
        except ImportError as exc:
            raise CheckpointError(
                self.path, f"reading a .bin checkpoint needs torch (or convert it to safetensors): {INSTALL_HINT}"
            ) from exc
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # e.g. "pickle protocol 4": irrelevant to the user
                state = torch.load(self.path, map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 - torch raises many types for a hostile or broken pickle
            raise CheckpointError(self.path, _refusal(exc)) from exc
        if not isinstance(state, dict):
            raise CheckpointError(self.path, f"expected a state dict, got {type(state).__name__}")
        self._tensors: dict = {}
        self._infos: dict[str, TensorInfo] = {}
        for name, value in state.items():
            if not isinstance(name, str) or not isinstance(value, torch.Tensor):
                raise CheckpointError(
                    self.path, f"expected a mapping of names to tensors, found {name!r}: {type(value).__name__}"
                )
            tag = _TORCH_TO_TAG.get(str(value.dtype).removeprefix("torch."))
            if tag is None:
                raise CheckpointError(self.path, f"tensor {name!r} has unsupported dtype {value.dtype}")
            self._tensors[name] = value
            self._infos[name] = TensorInfo(
                name=name,
                dtype=tag,
                shape=tuple(value.shape),
                start=0,
                nbytes=value.numel() * DTYPES[tag][0],
            )

    def keys(self) -> list[str]:
        """Tensor names in file order."""
        return list(self._infos)

    def __contains__(self, name: object) -> bool:
        return name in self._infos

    def __len__(self) -> int:
        return len(self._infos)

    def info(self, name: str) -> TensorInfo:
        """The :class:`TensorInfo` of tensor ``name`` (offsets are meaningless here)."""
        return self._infos[name]

    def read(self, name: str) -> np.ndarray:
        """Tensor ``name`` as a new float64 array (exact upcast).

        Raises:
            CheckpointError: the tensor is not a float tensor.
        """
        info = self._infos[name]
        if info.dtype not in _FLOAT_TAGS:
            raise CheckpointError(self.path, f"tensor {name!r} has non-float dtype {info.dtype}")
        import torch

        return self._tensors[name].detach().to(dtype=torch.float64).numpy().copy()


def _refusal(exc: Exception) -> str:
    """Our one-line reason for a pickle that ``torch.load(weights_only=True)`` refused.

    torch's message advises retrying with ``weights_only=False``, which would run the file's code, and
    asks to file an issue: keep only its specific reason ("unsupported GLOBAL posix.system",
    "Unsupported operand 149"), never the advice.
    """
    text = str(exc)
    if "Weights only load failed" not in text:
        first = text.strip().splitlines()[0] if text.strip() else type(exc).__name__
        return f"not a readable torch checkpoint ({first})"
    found = re.search(r"unsupported GLOBAL [\w.]+|Unsupported global: GLOBAL [\w.]+|Unsupported operand \d+", text)
    detail = found.group(0) if found else "objects other than tensors"
    return f"refused to unpickle: the file could run code or is not a tensor state dict ({detail})"
