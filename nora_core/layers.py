"""AdapterLinear: a frozen linear layer plus a low-rank LoRA or NoRA branch.

.. math::

    \\text{LoRA:}\\quad y = W_0 x + b + s\\, B A\\, \\mathrm{Dropout}(x)

    \\text{NoRA:}\\quad y = W_0 x + b + s\\, B\\, \\mathrm{Dropout}(\\mathrm{act}(A x))

with ``A`` (r, d_in), ``B`` (d_out, r), stored as the weights of the bias-free linears ``lora_A`` and
``lora_B`` so that state-dict keys are PEFT's (``<module>.lora_A.weight``).
"""

from __future__ import annotations

import math
import sys

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["AdapterLinear", "is_conv1d", "make_activation"]


def is_conv1d(module: nn.Module) -> bool:
    """True for ``transformers.pytorch_utils.Conv1D`` (GPT-2), whose weight is stored (d_in, d_out).

    transformers is never imported here: a model can only hold its ``Conv1D`` once it is loaded.
    """
    pytorch_utils = sys.modules.get("transformers.pytorch_utils")
    conv1d = getattr(pytorch_utils, "Conv1D", None)
    return conv1d is not None and isinstance(module, conv1d)


def make_activation(name: str) -> nn.Module:
    """The NoRA activation module for ``name`` in ``silu | relu | gelu | identity`` (gelu is exact, erf)."""
    table = {"silu": nn.SiLU, "relu": nn.ReLU, "gelu": nn.GELU, "identity": nn.Identity}
    if name not in table:
        raise ValueError(f"activation must be one of {sorted(table)}, got {name!r}")
    return table[name]()


class AdapterLinear(nn.Module):
    """Wraps ``base_layer`` (``nn.Linear`` or transformers' ``Conv1D``) with a LoRA or NoRA branch.

    Args:
        base_layer: the layer to adapt; it is kept (not copied) as ``self.base_layer``.
        r: rank of the branch.
        scaling: the scale ``s`` (``alpha / r`` or ``alpha / sqrt(r)``, see ``AdapterConfig.scale_for``).
        method: ``"lora"`` or ``"nora"``.
        dropout: LoRA: probability of dropout on the input ``x``; NoRA: on the hidden ``act(A x)``.
            ``nn.Identity`` is used when 0.
        activation: NoRA's activation (``silu``, ``relu``, ``gelu``, ``identity``); ignored by LoRA.
        init: ``"default"`` (the method's), ``"kaiming_uniform"`` or ``"kaiming_normal"``.

    Attributes:
        lora_A: ``nn.Linear(d_in, r, bias=False)``, weight (r, d_in).
        lora_B: ``nn.Linear(r, d_out, bias=False)``, weight (d_out, r), zero at init.
        lora_dropout: input dropout (LoRA) or ``nn.Identity`` (NoRA).
        hidden_dropout: hidden dropout (NoRA) or ``nn.Identity`` (LoRA).
        fan_in_fan_out: True when the base weight is stored (d_in, d_out) (``Conv1D``).
    """

    def __init__(
        self,
        base_layer: nn.Module,
        r: int,
        scaling: float,
        *,
        method: str = "lora",
        dropout: float = 0.0,
        activation: str = "silu",
        init: str = "default",
    ) -> None:
        super().__init__()
        if method not in ("lora", "nora"):
            raise ValueError(f"method must be 'lora' or 'nora', got {method!r}")
        self.fan_in_fan_out = is_conv1d(base_layer)
        if not (isinstance(base_layer, nn.Linear) or self.fan_in_fan_out):
            raise TypeError(f"AdapterLinear wraps nn.Linear or transformers Conv1D, got {type(base_layer).__name__}")
        weight = base_layer.weight
        d_out, d_in = (weight.shape[1], weight.shape[0]) if self.fan_in_fan_out else weight.shape
        self.base_layer = base_layer
        self.in_features, self.out_features = int(d_in), int(d_out)
        self.method = method
        self.r = int(r)
        self.scaling = float(scaling)
        self.activation_name = activation if method == "nora" else "identity"
        factory = {"device": weight.device, "dtype": weight.dtype}
        self.lora_A = nn.Linear(self.in_features, self.r, bias=False, **factory)
        self.lora_B = nn.Linear(self.r, self.out_features, bias=False, **factory)
        drop = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.lora_dropout = drop if method == "lora" else nn.Identity()
        self.hidden_dropout = drop if method == "nora" else nn.Identity()
        self.activation = make_activation(self.activation_name)
        self.reset_adapter_parameters(init)

    @staticmethod
    def adapter_params() -> tuple[str, ...]:
        """Local names of the trainable adapter parameters; freezing and saving derive from this."""
        return ("lora_A.weight", "lora_B.weight")

    @torch.no_grad()
    def reset_adapter_parameters(self, init: str = "default") -> None:
        """Initialise A and zero B.

        LoRA's default follows PEFT / microsoft/LoRA ``loralib/layers.py`` (``kaiming_uniform_(a=sqrt(5))``,
        the ``nn.Linear`` default); NoRA's follows the paper's reference code
        (``kaiming_normal_(nonlinearity="relu")``, fan-in). B is zero, so a fresh adapter is a no-op.
        """
        if init == "default":
            init = "kaiming_uniform" if self.method == "lora" else "kaiming_normal"
        if init == "kaiming_uniform":
            nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        elif init == "kaiming_normal":
            nn.init.kaiming_normal_(self.lora_A.weight, nonlinearity="relu")
        else:
            raise ValueError(f"init must be 'default', 'kaiming_uniform' or 'kaiming_normal', got {init!r}")
        nn.init.zeros_(self.lora_B.weight)

    def adapter_hidden(self, x: torch.Tensor) -> torch.Tensor:
        """The r-dimensional hidden of the branch, before the hidden dropout.

        Args:
            x: input, shape ``(..., d_in)``.

        Returns:
            ``h`` of shape ``(..., r)``: LoRA ``A Dropout(x)``, NoRA ``act(A x)``.
        """
        if x.dtype != self.lora_A.weight.dtype:
            x = x.to(self.lora_A.weight.dtype)
        return self.activation(F.linear(self.lora_dropout(x), self.lora_A.weight))

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """``base_layer(x) + scaling * lora_B(hidden_dropout(adapter_hidden(x)))``.

        Args:
            x: input, shape ``(..., d_in)``.

        Returns:
            Output of shape ``(..., d_out)`` in the base layer's output dtype.
        """
        result = self.base_layer(x, *args, **kwargs)
        h = self.hidden_dropout(self.adapter_hidden(x))
        weight_b = self.lora_B.weight
        if h.dtype != result.dtype:
            delta = F.linear(h, weight_b).to(result.dtype)
            return torch.add(result, delta, alpha=self.scaling)
        # One GEMM does result + s * h B^T (BLAS alpha/beta): no temporary delta, no extra kernels.
        result_2d = result.reshape(-1, self.out_features)  # (tokens, d_out)
        out = torch.addmm(result_2d, h.reshape(-1, self.r), weight_b.t(), alpha=self.scaling)
        return out.view(result.shape)

    @torch.no_grad()
    def delta_weight(self, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """The LoRA update ``s B A`` in the base weight's layout ((d_in, d_out) for Conv1D), in ``dtype``.

        Raises:
            ValueError: for NoRA, whose branch is non-linear and has no weight-space update.
        """
        if self.method != "lora":
            raise ValueError("a NoRA branch is non-linear (B act(A x)) and has no weight-space update")
        delta = self.scaling * (self.lora_B.weight.to(dtype) @ self.lora_A.weight.to(dtype))
        return delta.T if self.fan_in_fan_out else delta

    def extra_repr(self) -> str:
        act = f", activation={self.activation_name}" if self.method == "nora" else ""
        return f"method={self.method}, r={self.r}, scaling={self.scaling:g}{act}, fan_in_fan_out={self.fan_in_fan_out}"
