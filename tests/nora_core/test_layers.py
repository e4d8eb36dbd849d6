"""AdapterLinear against hand-written float64 formulas, init, dropout placement and dtypes."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from nora_core.layers import AdapterLinear

ACTS = {
    "silu": lambda t: t / (1 + torch.exp(-t)),
    "relu": lambda t: torch.clamp(t, min=0),
    "gelu": lambda t: 0.5 * t * (1 + torch.erf(t / math.sqrt(2))),
    "identity": lambda t: t,
}


def _layer(method: str, *, d_in: int = 12, d_out: int = 7, r: int = 3, scaling: float = 1.7, **kw) -> AdapterLinear:
    base = nn.Linear(d_in, d_out, dtype=torch.float64)
    layer = AdapterLinear(base, r, scaling, method=method, **kw)
    with torch.no_grad():
        layer.lora_B.weight.normal_()
    return layer


def test_lora_matches_formula_float64() -> None:
    layer = _layer("lora")
    x = torch.randn(2, 4, 12, dtype=torch.float64)
    W, b = layer.base_layer.weight, layer.base_layer.bias
    A, B = layer.lora_A.weight, layer.lora_B.weight
    expected = x @ W.T + b + 1.7 * (x @ A.T) @ B.T
    torch.testing.assert_close(layer(x), expected, rtol=1e-12, atol=1e-12)
    assert layer(x).shape == (2, 4, 7) and layer.adapter_hidden(x).shape == (2, 4, 3)


@pytest.mark.parametrize("activation", sorted(ACTS))
def test_nora_matches_formula_float64(activation: str) -> None:
    layer = _layer("nora", activation=activation, dropout=0.3).eval()
    x = torch.randn(9, 12, dtype=torch.float64)
    W, b = layer.base_layer.weight, layer.base_layer.bias
    A, B = layer.lora_A.weight, layer.lora_B.weight
    hidden = ACTS[activation](x @ A.T)
    torch.testing.assert_close(layer.adapter_hidden(x), hidden, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(layer(x), x @ W.T + b + 1.7 * hidden @ B.T, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("method", ["lora", "nora"])
def test_fresh_adapter_is_a_no_op(method: str) -> None:
    base = nn.Linear(12, 7)
    layer = AdapterLinear(base, 4, 2.0, method=method)
    x = torch.randn(3, 12)
    assert torch.equal(layer.lora_B.weight, torch.zeros(7, 4))
    assert torch.equal(layer(x), base(x))


def test_init_follows_the_method() -> None:
    d_in = 4096
    lora = AdapterLinear(nn.Linear(d_in, 8), 64, 1.0, method="lora")
    # kaiming_uniform(a=sqrt(5)): U(-1/sqrt(fan_in), 1/sqrt(fan_in)), std 1/sqrt(3 fan_in)
    A = lora.lora_A.weight
    assert A.abs().max() <= 1 / math.sqrt(d_in) and A.std().item() == pytest.approx(1 / math.sqrt(3 * d_in), rel=0.02)
    nora = AdapterLinear(nn.Linear(d_in, 8), 64, 1.0, method="nora")
    # kaiming_normal(relu): N(0, 2 / fan_in)
    assert nora.lora_A.weight.std().item() == pytest.approx(math.sqrt(2 / d_in), rel=0.02)
    forced = AdapterLinear(nn.Linear(d_in, 8), 64, 1.0, method="nora", init="kaiming_uniform")
    assert forced.lora_A.weight.abs().max() <= 1 / math.sqrt(d_in)


def test_dropout_modules() -> None:
    lora = AdapterLinear(nn.Linear(4, 4), 2, 1.0, method="lora", dropout=0.2)
    nora = AdapterLinear(nn.Linear(4, 4), 2, 1.0, method="nora", dropout=0.2)
    plain = AdapterLinear(nn.Linear(4, 4), 2, 1.0, method="lora")
    assert isinstance(lora.lora_dropout, nn.Dropout) and isinstance(lora.hidden_dropout, nn.Identity)
    assert isinstance(nora.hidden_dropout, nn.Dropout) and isinstance(nora.lora_dropout, nn.Identity)
    assert isinstance(plain.lora_dropout, nn.Identity)


def _capture(module: nn.Module) -> dict:
    seen: dict = {}
    module.register_forward_hook(lambda _m, inp, out: seen.update(inp=inp[0].detach(), out=out.detach()))
    return seen


def test_nora_dropout_acts_on_the_hidden_in_training_only() -> None:
    p = 0.5
    layer = _layer("nora", d_in=16, d_out=8, r=32, dropout=p, activation="silu")
    x = torch.randn(6, 16, dtype=torch.float64)
    W, b, A, B = layer.base_layer.weight, layer.base_layer.bias, layer.lora_A.weight, layer.lora_B.weight
    hidden = ACTS["silu"](x @ A.T)

    layer.eval()
    assert torch.equal(layer(x), layer(x))
    torch.testing.assert_close(layer(x), x @ W.T + b + 1.7 * hidden @ B.T)

    layer.train()
    seen = _capture(layer.hidden_dropout)
    y1 = layer(x)
    torch.testing.assert_close(seen["inp"], hidden)  # the dropout sees act(A x): x itself is not dropped
    kept = seen["out"] != 0
    assert 0 < kept.float().mean() < 1
    torch.testing.assert_close(seen["out"], torch.where(kept, hidden / (1 - p), torch.zeros_like(hidden)))
    torch.testing.assert_close(y1, x @ W.T + b + 1.7 * seen["out"] @ B.T)
    assert not torch.equal(y1, layer(x))  # a fresh mask each call


def test_lora_dropout_acts_on_the_input() -> None:
    p = 0.5
    layer = _layer("lora", dropout=p).train()
    x = torch.randn(5, 12, dtype=torch.float64)
    seen = _capture(layer.lora_dropout)
    y = layer(x)
    W, b, A, B = layer.base_layer.weight, layer.base_layer.bias, layer.lora_A.weight, layer.lora_B.weight
    dropped = seen["out"]
    assert torch.equal(seen["inp"], x) and (dropped == 0).any()
    torch.testing.assert_close(y, x @ W.T + b + 1.7 * (dropped @ A.T) @ B.T)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("method", ["lora", "nora"])
def test_low_precision_base(dtype: torch.dtype, method: str) -> None:
    base = nn.Linear(32, 16, dtype=dtype)
    layer = AdapterLinear(base, 4, 0.5, method=method)
    assert layer.lora_A.weight.dtype == dtype and layer.lora_B.weight.dtype == dtype
    x = torch.randn(3, 32, dtype=dtype)
    assert torch.equal(layer(x), base(x))
    with torch.no_grad():
        layer.lora_B.weight.normal_()
    y = layer(x)
    assert y.dtype == dtype
    x64, A, B = x.double(), layer.lora_A.weight.double(), layer.lora_B.weight.double()
    h = x64 @ A.T if method == "lora" else ACTS["silu"](x64 @ A.T)
    expected = x64 @ base.weight.double().T + base.bias.double() + 0.5 * h @ B.T
    tol = 0.05 if dtype == torch.bfloat16 else 0.01
    torch.testing.assert_close(y.double(), expected, rtol=tol, atol=tol)


def test_conv1d_fan_in_fan_out() -> None:
    pytorch_utils = pytest.importorskip("transformers.pytorch_utils")
    conv = pytorch_utils.Conv1D(7, 12)  # nf=d_out, nx=d_in; weight (d_in, d_out)
    conv.double()
    layer = AdapterLinear(conv, 3, 2.0, method="lora")
    assert layer.fan_in_fan_out and layer.lora_A.weight.shape == (3, 12) and layer.lora_B.weight.shape == (7, 3)
    with torch.no_grad():
        layer.lora_B.weight.normal_()
    x = torch.randn(2, 5, 12, dtype=torch.float64)
    A, B = layer.lora_A.weight, layer.lora_B.weight
    torch.testing.assert_close(layer(x), x @ conv.weight + conv.bias + 2.0 * (x @ A.T) @ B.T)
    torch.testing.assert_close(layer.delta_weight(), (2.0 * B @ A).T)


def test_rejects_other_layers() -> None:
    with pytest.raises(TypeError, match="Embedding"):
        AdapterLinear(nn.Embedding(4, 4), 2, 1.0)
    with pytest.raises(ValueError, match="method"):
        AdapterLinear(nn.Linear(4, 4), 2, 1.0, method="dora")
