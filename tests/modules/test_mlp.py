"""The dense MLP against its formula written out in float64: gelu, silu and swiglu's [gate | up] layout."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mamba_r1.modules.mlp import MLP
from mamba_r1.ops.moe_dispatch import ACTIVATIONS
from tests.conftest import GRAD_TOL, TOL, rel_err


def _mlp_formula(x, w1, b1, w2, b2, activation):
    """float64, the activations from their definitions rather than from torch.nn.functional."""
    h = x @ w1.t() + (b1 if b1 is not None else 0)
    if activation == "gelu":
        a = 0.5 * h * (1 + torch.erf(h / math.sqrt(2)))
    elif activation == "silu":
        a = h / (1 + torch.exp(-h))
    else:
        hidden = h.shape[-1] // 2
        gate, up = h[..., :hidden], h[..., hidden:]
        a = gate / (1 + torch.exp(-gate)) * up
    return a @ w2.t() + (b2 if b2 is not None else 0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@settings(deadline=None, max_examples=25)
@given(data=st.data(), activation=st.sampled_from(ACTIVATIONS), bias=st.booleans(), seed=st.integers(0, 2**16))
def test_matches_formula(dtype, data, activation, bias, seed):
    # bf16 rounds three intermediate results: draw enough elements for a relative-norm check to average them.
    low = 8 if dtype == torch.bfloat16 else 1
    shape = data.draw(st.one_of(st.tuples(st.integers(low, 23)), st.tuples(st.integers(1, 3), st.integers(low, 11))))
    dim, hidden = data.draw(st.integers(low, 19)), data.draw(st.integers(low, 29))
    torch.manual_seed(seed)
    mlp = MLP(dim, hidden, activation=activation, bias=bias, dtype=dtype)
    x = torch.randn(*shape, dim).to(dtype).requires_grad_()
    out = mlp(x)
    assert out.shape == x.shape and out.dtype == dtype

    params = [mlp.fc1.weight, mlp.fc1.bias, mlp.fc2.weight, mlp.fc2.bias]
    leaves = [p.detach().double().requires_grad_() if p is not None else None for p in [x, *params]]
    ref = _mlp_formula(*leaves, activation)
    assert rel_err(out, ref) <= TOL[dtype]
    grad = torch.randn(out.shape).to(dtype)
    out.backward(grad)
    ref.backward(grad.double())
    for p, leaf in zip([x, *params], leaves):
        if p is not None:
            assert rel_err(p.grad, leaf.grad) <= GRAD_TOL[dtype]


def test_swiglu_first_projection_holds_gate_then_up():
    mlp = MLP(2, 3, activation="swiglu", bias=False)
    assert mlp.fc1.weight.shape == (6, 2) and mlp.fc2.weight.shape == (2, 3)
    with torch.no_grad():
        mlp.fc1.weight.zero_()
        mlp.fc1.weight[0, 0] = 1.0  # gate feature 0 reads x[0]
        mlp.fc1.weight[3, 1] = 1.0  # up feature 0 reads x[1]
        mlp.fc2.weight.zero_()
        mlp.fc2.weight[0, 0] = 1.0
    x = torch.tensor([[2.0, 5.0]])
    expected = torch.nn.functional.silu(torch.tensor(2.0)) * 5.0
    torch.testing.assert_close(mlp(x)[0, 0], expected)


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="activation must be one of .*got 'relu'"):
        MLP(4, 8, activation="relu")
    with pytest.raises(ValueError, match="dim and hidden_dim must be >= 1; got dim=0"):
        MLP(0, 8)
    mlp = MLP(4, 8)
    with pytest.raises(ValueError, match=r"x must be \(\.\.\., dim\) with dim=4; got shape \(2, 5\)"):
        mlp(torch.randn(2, 5))
    with pytest.raises(TypeError, match="x must be a floating-point tensor; got dtype torch.int64"):
        mlp(torch.ones(2, 4, dtype=torch.int64))
