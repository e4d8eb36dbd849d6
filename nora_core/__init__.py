"""nora_core: LoRA and NoRA adapters for any PyTorch model, PEFT-compatible checkpoints, a trainer.

Public names are imported lazily (PEP 562), so ``import nora_core`` itself is cheap.
"""

from nora_core._lazy import lazy_getattr

_EXPORTS = {
    # adapters (config.py, layers.py, inject.py, checkpoint.py, merge.py)
    "AdapterConfig": "config",
    "AdapterLinear": "layers",
    "inject_adapters": "inject",
    "unload": "inject",
    "adapter_state_dict": "checkpoint",
    "save_adapter": "checkpoint",
    "load_adapter": "checkpoint",
    "merge_adapters": "merge",
    # training (trainer.py)
    "TrainConfig": "trainer",
    "TrainResult": "trainer",
    "train": "trainer",
}

__all__ = sorted(_EXPORTS)
__getattr__ = lazy_getattr(__name__, _EXPORTS)


def __dir__() -> list[str]:
    return __all__
