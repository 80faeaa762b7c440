"""add_rms_norm: the fused residual add + RMSNorm kernel against its reference and float64; where it steps aside."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import mamba_r1.ops.rms_norm as rms_norm_module
from mamba_r1.ops.rms_norm import add_rms_norm, add_rms_norm_ref
from tests.conftest import DEVICE, TOL, rel_err


@pytest.fixture(autouse=True)
def _on_test_device():
    with torch.device(DEVICE):
        yield


def norm_float64(h, weight, eps):
    h = h.double()
    return h / torch.sqrt(h.pow(2).mean(-1, keepdim=True) + eps) * weight.double()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@settings(deadline=None, max_examples=12)
@given(rows=st.integers(1, 5), dim=st.sampled_from([1, 7, 64, 100, 768]), with_delta=st.booleans(),
       strided=st.booleans(), eps=st.sampled_from([1e-5, 1e-2]))
def test_triton_matches_reference_and_float64(dtype, rows, dim, with_delta, strided, eps):
    base = torch.randn(rows, 2 * dim, dtype=dtype)
    residual = base[:, :dim] if strided else base[:, :dim].contiguous()  # rows apart by 2 * dim when strided
    delta = torch.randn(rows, dim, dtype=dtype) if with_delta else None
    weight = torch.randn(dim, dtype=dtype)
    normed, new_residual = add_rms_norm(residual, delta, weight, eps, backend="triton")
    want_normed, want_residual = add_rms_norm_ref(residual, delta, weight, eps)
    assert normed.dtype == dtype and new_residual.dtype == dtype
    # The new residual is one rounding of an exact float32 sum: equal to the reference's.
    assert torch.equal(new_residual, want_residual)
    assert rel_err(normed, want_normed) <= TOL[dtype]
    assert rel_err(normed, norm_float64(want_residual, weight, eps)) <= TOL[dtype]


def test_without_delta_the_residual_passes_through():
    residual, weight = torch.randn(3, 10), torch.randn(10)
    _, new_residual = add_rms_norm(residual, None, weight, backend="triton")
    assert new_residual is residual


@pytest.mark.parametrize("case", ["autograd", "autocast", "torch backend", "non-contiguous rows"])
def test_falls_back_to_the_reference(monkeypatch, case):
    residual, delta = torch.randn(2, 12), torch.randn(2, 12)
    weight = torch.randn(12, requires_grad=case == "autograd")
    if case == "non-contiguous rows":
        residual = torch.randn(12, 2).t()

    def boom(*args):
        raise AssertionError("the Triton kernel ran")

    monkeypatch.setattr(rms_norm_module, "_add_rms_norm_triton", boom)
    backend = "torch" if case == "torch backend" else "triton"
    with torch.autocast(residual.device.type, dtype=torch.bfloat16, enabled=case == "autocast"):
        got = add_rms_norm(residual, delta, weight, 1e-5, backend)
        want = add_rms_norm_ref(residual, delta, weight, 1e-5)
    assert all(torch.equal(g, w) for g, w in zip(got, want))


def test_bad_arguments_name_what_was_expected():
    with pytest.raises(ValueError, match=r"residual must be a floating-point \(rows, dim\) tensor"):
        add_rms_norm(torch.randn(2, 3, 4), None, torch.randn(4))
    with pytest.raises(ValueError, match=r"delta must be shaped like residual \(2, 4\); got \(2, 3\)"):
        add_rms_norm(torch.randn(2, 4), torch.randn(2, 3), torch.randn(4))
    with pytest.raises(ValueError, match=r"weight must be \(dim,\) = \(4,\); got \(3,\)"):
        add_rms_norm(torch.randn(2, 4), None, torch.randn(3))
