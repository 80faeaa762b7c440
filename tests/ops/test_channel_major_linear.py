"""channel_major_linear against F.linear over the channel axis: values, gradients, and each gradient's layout."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from mamba_r1.ops.channel_major_linear import channel_major_linear
from tests.conftest import DEVICE, GRAD_TOL, TOL, rel_err


def _reference(weight, x_cm, bias, time_major_out):
    """F.linear on the time-major view, in float64."""
    y = F.linear(x_cm.transpose(1, 2), weight, bias)  # (batch, seqlen, out)
    return y if time_major_out else y.transpose(1, 2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@settings(deadline=None, max_examples=12)
@given(batch=st.integers(1, 3), in_features=st.integers(1, 19), out_features=st.integers(1, 23),
       seqlen=st.integers(1, 17), with_bias=st.booleans(), time_major_in=st.booleans(),
       time_major_out=st.booleans(), seed=st.integers(0, 2**16))
def test_matches_linear_and_keeps_gradient_layouts(dtype, batch, in_features, out_features, seqlen, with_bias,
                                                   time_major_in, time_major_out, seed):
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(out_features, in_features, generator=gen).to(DEVICE, dtype).requires_grad_()
    bias = torch.randn(out_features, generator=gen).to(DEVICE, dtype).requires_grad_() if with_bias else None
    # x as the block sees it: a transposed view of a time-major tensor (in_proj), or channel-major (out_proj).
    shape = (batch, seqlen, in_features) if time_major_in else (batch, in_features, seqlen)
    leaf = torch.randn(shape, generator=gen).to(DEVICE, dtype).requires_grad_()
    x = leaf.transpose(1, 2) if time_major_in else leaf
    out = channel_major_linear(weight, x, bias, time_major_out=time_major_out)
    leaves64 = [t.detach().double().requires_grad_() for t in (weight, leaf)]
    bias64 = bias.detach().double().requires_grad_() if with_bias else None
    x64 = leaves64[1].transpose(1, 2) if time_major_in else leaves64[1]
    want = _reference(leaves64[0], x64, bias64, time_major_out)
    assert out.shape == want.shape and out.dtype == dtype
    assert out.is_contiguous()
    assert rel_err(out, want) <= TOL[dtype]

    grad = torch.randn(want.shape, generator=gen).to(DEVICE)
    inputs, inputs64 = [leaf, weight], leaves64[::-1]
    if with_bias:
        inputs, inputs64 = inputs + [bias], inputs64 + [bias64]
    # autograd.grad hands the gradients over as computed (a leaf's .grad would be re-laid out by AccumulateGrad).
    got = torch.autograd.grad(out, inputs, grad.to(dtype))
    expected = torch.autograd.grad(want, inputs64, grad.double())
    for g, w, t in zip(got, expected, inputs):
        assert g.shape == t.shape and g.dtype == dtype
        assert rel_err(g, w) <= GRAD_TOL[dtype]
    # The input's gradient arrives in the input's layout: nothing downstream copies it transposed.
    assert got[0].is_contiguous()


def test_autocast_casts_once_and_keeps_float32_parameters_gradients():
    torch.manual_seed(0)
    weight = torch.randn(6, 5, device=DEVICE, requires_grad=True)
    bias = torch.randn(6, device=DEVICE, requires_grad=True)
    x = torch.randn(2, 5, 7, device=DEVICE, requires_grad=True)
    with torch.autocast(device_type=torch.device(DEVICE).type, dtype=torch.bfloat16):
        out = channel_major_linear(weight, x, bias)
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()
    assert weight.grad.dtype == torch.float32 and x.grad.dtype == torch.float32 and bias.grad.dtype == torch.float32
    want = torch.ones(2, 6, 7, device=DEVICE)
    expected_bias_grad = want.sum((0, 2))
    torch.testing.assert_close(bias.grad, expected_bias_grad)
