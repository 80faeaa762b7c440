"""The fused routing kernels (softmax, top-k, capacity, plan, losses; and x's gradient in route_and_permute's node)
against the torch composition they replace: integers exactly equal, floats and gradients within the per-dtype
tolerances."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import mamba_r1.ops.moe_routing as moe_routing
from mamba_r1.ops.moe_routing import route_and_plan
from tests.conftest import DEVICE, GRAD_TOL, TOL, rel_err
from tests.ops.moe_cases import DTYPES, route, route_cases, route_inputs

INTEGER_FIELDS = ("expert_idx", "rank", "keep", "routed", "kept")


@settings(deadline=None, max_examples=40)
@given(case=route_cases())
def test_route_and_plan_kernels_match_the_torch_composition(case):
    want, got = route(case, "torch"), route(case, "triton")
    for name in INTEGER_FIELDS:
        assert torch.equal(getattr(got.routing, name), getattr(want.routing, name)), name
    for name in ("probs", "gates"):
        assert rel_err(getattr(got.routing, name), getattr(want.routing, name)) <= TOL[torch.float32], name
    assert rel_err(got.weights, want.weights) <= TOL[torch.float32]
    for name, value in want.plan._asdict().items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(getattr(got.plan, name), value), name
        else:
            assert getattr(got.plan, name) == value, name
    for got_loss, want_loss in zip(got.losses, want.losses):
        assert rel_err(got_loss, want_loss) <= TOL[torch.float32]


@settings(deadline=None, max_examples=20)
@given(case=route_cases(), use_all=st.booleans())
def test_route_and_plan_gradient_matches_the_torch_composition(case, use_all):
    logits, *_ = route_inputs(case)
    gen = torch.Generator().manual_seed(case["seed"] + 1)
    tokens, num_experts, top_k = case["tokens"], case["num_experts"], case["top_k"]
    cot = [torch.randn(tokens, num_experts, generator=gen), torch.randn(tokens, top_k, generator=gen),
           torch.randn(tokens, top_k, generator=gen), torch.randn(3, generator=gen)]
    cot = [t.to(DEVICE) for t in cot]
    grads = []
    for backend in ("torch", "triton"):
        leaf = logits.clone().requires_grad_()
        out = route(case, backend, leaf)
        loss = (out.weights * cot[2]).sum() + out.losses.loss
        if use_all:  # every differentiable output, as a user's own loss might use them
            loss = loss + (out.routing.probs * cot[0]).sum() + (out.routing.gates * cot[1]).sum() \
                + cot[3][0] * out.losses.load_balance_loss + cot[3][1] * out.losses.z_loss
        loss.backward()
        grads.append(leaf.grad)
    assert rel_err(grads[1], grads[0]) <= GRAD_TOL[torch.float32]


def test_route_and_permute_names_bad_shapes():
    with pytest.raises(ValueError, match=r"router_weight \(num_experts, dim\).*x \(5, 8\), router_weight \(3, 6\)"):
        moe_routing.route_and_permute(torch.randn(5, 8, device=DEVICE), torch.randn(3, 6, device=DEVICE), 1)


def test_triton_backend_refuses_what_it_does_not_cover():
    logits = torch.randn(5, 3, device=DEVICE)
    with pytest.raises(ValueError, match="priority='position'"):
        route_and_plan(logits, 1, priority="gate", backend="triton")
    with pytest.raises(ValueError, match="layout must be one of"):
        route_and_plan(logits, 1, layout="ragged")
    assert route_and_plan(logits, 1, priority="gate").routing.rank.shape == (5, 1)  # auto: the torch path


@pytest.mark.parametrize("dtype", DTYPES)
@settings(deadline=None, max_examples=15)
@given(case=route_cases(), dim=st.integers(1, 19), half=st.booleans())
def test_token_gradient_kernel_matches_the_composition(dtype, case, dim, half):
    """x's gradient in one kernel: the permutation's (each assignment's row, zero where it owns none, summed over
    the choices) plus the router's (grad_logits @ weight, grad_logits rounded to x's dtype first when ``half``, as
    the composition does), against the same sum in float64. The error is measured against the terms' magnitudes,
    not the sum's: the kernel rounds each part to x's dtype before adding them, and where they cancel (an H200 run
    found 1.52 - 1.38 at dim 1) a bf16 rounding of a part is several per cent of the sum."""
    plan = route(case, "torch").plan
    gen = torch.Generator().manual_seed(case["seed"])
    grad_rows = torch.randn(plan.token_of_slot.numel(), dim, generator=gen).to(DEVICE, dtype)
    grad_logits = torch.randn(case["tokens"], case["num_experts"], generator=gen).to(DEVICE)
    weight = torch.randn(case["num_experts"], dim, generator=gen).to(DEVICE, dtype)
    got = moe_routing._token_grad(grad_rows, plan.slot_of, plan.owns_slot, grad_logits, weight, dtype, half)
    picked = grad_rows.double()[plan.slot_of]  # (tokens, top_k, dim)
    if plan.owns_slot is not None:
        picked = torch.where(plan.owns_slot[..., None], picked, 0)
    g = grad_logits.to(dtype).double() if half else grad_logits.double()
    want = picked.sum(1) + g @ weight.double()
    scale = picked.abs().sum(1) + g.abs() @ weight.double().abs()  # (tokens, dim) magnitude of the terms
    assert got.dtype == dtype and got.shape == want.shape
    assert ((got.double() - want).norm() / scale.norm().clamp_min(1e-30)).item() <= TOL[dtype]
