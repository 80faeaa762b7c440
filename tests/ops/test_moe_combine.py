"""The combine kernel (with and without the experts' output bias) against combine_tokens in float64."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mamba_r1.ops.moe_combine import combine
from mamba_r1.ops.moe_dispatch import combine_tokens
from tests.conftest import DEVICE, GRAD_TOL, TOL, rel_err
from tests.ops.moe_cases import DTYPES, route, route_cases


@pytest.mark.parametrize("dtype", DTYPES)
@settings(deadline=None, max_examples=15)
@given(case=route_cases(), dim=st.integers(1, 19), with_bias=st.booleans())
def test_combine_kernel_matches_combine_tokens(dtype, case, dim, with_bias):
    routed = route(case, "torch")
    plan = routed.plan
    gen = torch.Generator().manual_seed(case["seed"])
    slots = plan.token_of_slot.numel()
    rows = torch.randn(slots, dim, generator=gen).to(DEVICE, dtype)
    grad = torch.randn(case["tokens"], dim, generator=gen).to(DEVICE, dtype)
    bias = torch.randn(case["num_experts"], dim, generator=gen).to(DEVICE, dtype) if with_bias else None
    # The expert of each buffer row, written out here independently of the library's helper.
    if plan.capacity is None:
        expert_of_row = plan.expert_of_slot
    else:
        expert_of_row = torch.arange(slots, device=DEVICE) // plan.capacity
    results = []

    def composition(rows, weights, bias):
        return combine_tokens(rows + bias[expert_of_row] if bias is not None else rows, weights, plan)

    def kernel(rows, weights, bias):
        return combine(rows, weights, plan, backend="triton", bias=bias)

    for fn, leaf_dtype in ((composition, torch.float64), (kernel, dtype)):
        leaf_rows = rows.to(leaf_dtype).requires_grad_()
        leaf_weights = routed.weights.detach().to(leaf_dtype if leaf_dtype == torch.float64 else torch.float32)
        leaf_weights.requires_grad_()
        leaf_bias = bias.to(leaf_dtype).requires_grad_() if with_bias else None
        out = fn(leaf_rows, leaf_weights, leaf_bias)
        out.backward(grad.to(out.dtype))
        # A dropped assignment's weight gradient is discarded upstream (weights = gates * keep).
        results.append((out, leaf_rows.grad, leaf_weights.grad * routed.routing.keep,
                        leaf_bias.grad if with_bias else None))
    (want, want_rows, want_weights, want_bias), (got, got_rows, got_weights, got_bias) = results
    assert got.dtype == dtype and got_rows.dtype == dtype
    assert rel_err(got, want) <= TOL[dtype]
    assert rel_err(got_rows, want_rows) <= GRAD_TOL[dtype]
    if with_bias:
        assert got_bias.dtype == dtype
        assert rel_err(got_bias, want_bias) <= GRAD_TOL[dtype]
    assert rel_err(got_weights, want_weights) <= GRAD_TOL[dtype]


def test_combine_names_a_bad_bias_shape():
    plan = route(dict(tokens=5, num_experts=3, top_k=1, capacity=None, capacity_in_tensor=False, masked=False,
                       layout="grouped", seed=0), "torch").plan
    with pytest.raises(ValueError, match=r"combine: bias must be \(num_experts, dim\)"):
        combine(torch.randn(5, 8, device=DEVICE), torch.ones(5, 1, device=DEVICE), plan,
                bias=torch.randn(3, 7, device=DEVICE))
