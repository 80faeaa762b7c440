"""Bias + activation kernels and the fused expert FFN against the torch composition: float64 references, the GELU's
float32 accuracy, and the eager node against its traced composition bit for bit."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import mamba_r1.ops.moe_expert_ffn as moe_expert_ffn
from mamba_r1.ops import eager_custom_ops
from mamba_r1.ops.moe_dispatch import ffn_activation
from mamba_r1.ops.moe_expert_ffn import bias_act
from mamba_r1.ops.moe_routing import LAYOUTS, route_and_plan
from tests.conftest import DEVICE, GRAD_TOL, TOL, autograd_node_names, rel_err
from tests.ops.moe_cases import DTYPES, force_triton, route, route_cases, route_inputs


@pytest.mark.parametrize("dtype", DTYPES)
@settings(deadline=None, max_examples=15)
@given(case=route_cases(), width=st.integers(1, 21), activation=st.sampled_from(moe_expert_ffn.BIAS_ACTIVATIONS))
def test_bias_act_matches_torch_composition(dtype, case, width, activation):
    plan = route(case, "torch").plan
    slots = plan.token_of_slot.numel()
    # The grouped layout lists each row's expert; in the padded one expert e owns rows e * capacity onwards.
    expert_of_row = plan.expert_of_slot if plan.capacity is None \
        else torch.arange(slots, device=DEVICE) // plan.capacity
    gen = torch.Generator().manual_seed(case["seed"])
    h = torch.randn(slots, width, generator=gen).to(DEVICE, dtype)
    bias = torch.randn(case["num_experts"], width, generator=gen).to(DEVICE, dtype)
    grad = torch.randn(h.shape, generator=gen).to(DEVICE, dtype)

    def composition(h, bias):
        pre = h + bias[expert_of_row]
        return pre if activation == "none" else ffn_activation(pre, activation)

    results = []
    for fn, leaf_dtype in ((composition, torch.float64), (lambda h, b: bias_act(h, b, plan, activation), dtype)):
        leaves = [t.to(leaf_dtype).requires_grad_() for t in (h, bias)]
        out = fn(*leaves)
        out.backward(grad.to(out.dtype))
        results.append((out, *(leaf.grad for leaf in leaves)))
    (want, *want_grads), (got, *got_grads) = results
    assert got.dtype == dtype and all(g.dtype == dtype for g in got_grads)
    assert rel_err(got, want) <= TOL[dtype]
    for g, w in zip(got_grads, want_grads):
        assert rel_err(g, w) <= GRAD_TOL[dtype]


def test_bias_gradient_is_zero_for_an_expert_without_rows():
    torch.manual_seed(0)
    case = dict(tokens=13, num_experts=6, top_k=1, capacity=None, capacity_in_tensor=False, masked=False,
                layout="grouped", seed=3)
    logits, *_ = route_inputs(case)
    logits[:, 2] = -30.0  # nobody picks expert 2
    plan = route_and_plan(logits, 1, backend="torch").plan
    bias = torch.randn(6, 5, device=DEVICE, requires_grad=True)
    bias_act(torch.randn(13, 5, device=DEVICE), bias, plan, "gelu").sum().backward()
    assert (bias.grad[2] == 0).all() and (bias.grad.abs().sum(-1) > 0).sum() >= 2


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("activation", moe_expert_ffn.BIAS_ACTIVATIONS)
def test_expert_ffn_node_matches_its_composition(monkeypatch, layout, activation):
    """Eagerly the expert FFN (matmul, bias + activation, matmul) is one autograd node; traced, three ops. Same
    kernels in the same order: outputs and every gradient equal bit for bit, and the eager graph has one node."""
    force_triton(monkeypatch, routing=False)
    case = dict(tokens=23, num_experts=4, top_k=2, capacity=5, capacity_in_tensor=False, masked=True,
                layout=layout, seed=3)
    plan = route(case, "torch").plan
    gen = torch.Generator().manual_seed(1)
    slots = plan.token_of_slot.numel()
    leaves = [torch.randn(*shape, generator=gen).to(DEVICE) for shape in
              ((slots, 8), (4, 8, 12), (4, 12), (4, 12, 8), (4, 8))]  # rows, w1, b1, w2, b2
    grad = torch.randn(slots, 8, generator=gen).to(DEVICE)
    results = []
    for compiling in (False, True):
        monkeypatch.setattr(eager_custom_ops, "tracing", lambda: compiling)
        inputs = [t.clone().requires_grad_() for t in leaves]
        rows, w1, b1, w2, b2 = inputs
        out = moe_expert_ffn.expert_ffn_fused(rows, plan, w1, b1, w2, b2, activation)
        names = autograd_node_names(out)
        out.backward(grad)
        results.append((names, [out.detach()] + [t.grad for t in inputs]))
    (eager_names, eager), (traced_names, traced) = results
    assert "_ExpertFFNEagerBackward" in eager_names and "_ExpertFFNEagerBackward" not in traced_names
    assert not any("GroupedMatmul" in n or "Bmm" in n for n in eager_names)
    for got, want in zip(eager, traced):
        assert torch.equal(got, want)


def test_gelu_kernel_is_float32_accurate():
    """The bias kernels' GELU (erf by Abramowitz & Stegun, _gauss_cdf) and its derivative against float64's exact
    GELU, in float32 over [-12, 12]: within 1e-6 absolute, about torch's own float32 GELU (1.1e-6)."""
    x = torch.linspace(-12, 12, 4001, device=DEVICE)
    plan = route(dict(tokens=1, num_experts=1, top_k=1, capacity=None, capacity_in_tensor=False, masked=False,
                       layout="grouped", seed=0), "torch").plan
    h = x[None, :].clone().requires_grad_()  # one row of 4001 features, bias 0
    out = bias_act(h, torch.zeros(1, x.numel(), device=DEVICE), plan, "gelu")
    out.sum().backward()
    xd = x.double().requires_grad_()
    ref = torch.nn.functional.gelu(xd)
    ref.sum().backward()
    assert (out.detach()[0].double() - ref.detach()).abs().max() <= 1e-6
    assert (h.grad[0].double() - xd.grad).abs().max() <= 1e-6
