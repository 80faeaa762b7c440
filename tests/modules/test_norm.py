"""RMSNorm against its float64 formula, forward and gradients, float32 and bf16; bad input."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mamba_r1.modules.norm import RMSNorm
from tests.conftest import GRAD_TOL, TOL, rel_err

# The CUDA path is a different kernel call (half inputs go in as they are): the GPU runs both.
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def rms_norm_float64(x, weight, eps):
    x, weight = x.double(), weight.double()
    return x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@settings(deadline=None, max_examples=20)
@given(
    lead=st.lists(st.integers(1, 5), min_size=0, max_size=3),
    # Not dim=1: there y = w * x / sqrt(x^2 + eps) is flat in x and its tiny gradient is all cancellation error.
    dim=st.sampled_from([2, 3, 7, 31, 64, 97]),
    eps=st.sampled_from([1e-5, 1e-6, 1e-2]),
    scale=st.sampled_from([1e-3, 1.0, 300.0]),
)
def test_matches_float64_formula_forward_and_grad(device, dtype, lead, dim, eps, scale):
    norm = RMSNorm(dim, eps=eps, dtype=dtype, device=device)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(dim))
    x = (scale * torch.randn(*lead, dim)).to(device, dtype).requires_grad_(True)
    # A cotangent representable in y's dtype: autograd rounds it to bf16 before the norm's backward sees it, and at
    # dim 2 the gradient (orthogonal to x) can be a small difference of the cotangent's parts, so an unrounded one
    # in the reference failed about one draw in 70 at 2e-2 (worst 0.4% once rounded alike, 3,000 draws).
    grad_out = torch.randn(*lead, dim).to(device, dtype).float()

    y = norm(x)
    assert y.dtype == dtype and y.shape == x.shape
    (y.float() * grad_out).sum().backward()

    x64 = x.detach().double().requires_grad_(True)
    w64 = norm.weight.detach().double().requires_grad_(True)
    y64 = rms_norm_float64(x64, w64, eps)
    (y64 * grad_out.double()).sum().backward()
    assert rel_err(y, y64) <= TOL[dtype]
    assert rel_err(x.grad, x64.grad) <= GRAD_TOL[dtype]
    assert rel_err(norm.weight.grad, w64.grad) <= GRAD_TOL[dtype]


def test_unit_weight_gives_unit_rms():
    x = 5 * torch.randn(4, 33)
    y = RMSNorm(33, eps=1e-12)(x)
    assert torch.allclose(y.pow(2).mean(-1), torch.ones(4), rtol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
def test_bf16_large_inputs_stay_accurate(device):
    # A mean of squares over 4096 bf16 values would lose most of its bits without float32 accumulation.
    x = (100 * torch.randn(3, 4096)).to(device, torch.bfloat16)
    y = RMSNorm(4096, dtype=torch.bfloat16, device=device)(x)
    assert rel_err(y, rms_norm_float64(x, torch.ones(4096, device=device), 1e-5)) <= TOL[torch.bfloat16]


@pytest.mark.parametrize("bad, error, words", [
    (torch.randn(2, 5), ValueError, "dim=8"),
    (torch.tensor(1.0), ValueError, "(..., dim)"),
    (torch.ones(2, 8, dtype=torch.int32), TypeError, "int32"),
])
def test_bad_inputs_raise_naming_the_argument(bad, error, words):
    with pytest.raises(error) as info:
        RMSNorm(8)(bad)
    assert "x must be" in str(info.value) and words in str(info.value)


@pytest.mark.parametrize("kwargs, words", [(dict(dim=0), "dim"), (dict(dim=4, eps=0.0), "eps")])
def test_bad_constructor_arguments_raise(kwargs, words):
    with pytest.raises(ValueError, match=words):
        RMSNorm(**kwargs)
