"""The fused MoE kernels (routing + plan + losses, combine, bias + activation) against the torch composition they
replace: integers exactly equal, floats and gradients within the per-dtype tolerances; opcheck; fullgraph compile."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import mamba_r1.ops.moe_routing as moe_routing
from mamba_r1.modules.moe import SwitchMoE
from mamba_r1.ops.moe_dispatch import combine_tokens, ffn_activation, switch_moe_ref
from mamba_r1.ops.moe_routing import (
    bias_act,
    combine,
    moe_bias_act_bwd_op,
    moe_bias_act_op,
    moe_combine_bwd_op,
    moe_combine_op,
    moe_route_bwd_op,
    moe_route_op,
    route_and_plan,
)
from tests.conftest import DEVICE, GRAD_TOL, TOL, rel_err

DTYPES = [torch.float32, torch.bfloat16]
INTEGER_FIELDS = ("expert_idx", "rank", "keep", "routed", "kept")


@st.composite
def route_cases(draw):
    num_experts = draw(st.integers(1, 16))
    return dict(
        tokens=draw(st.integers(1, 45)),
        num_experts=num_experts,
        top_k=draw(st.integers(1, min(2, num_experts))),
        capacity=draw(st.one_of(st.none(), st.integers(0, 6))),
        capacity_in_tensor=draw(st.booleans()),
        masked=draw(st.booleans()),
        layout=draw(st.sampled_from(moe_routing.LAYOUTS)),
        seed=draw(st.integers(0, 2**16)),
    )


def _route_inputs(case):
    gen = torch.Generator().manual_seed(case["seed"])
    logits = torch.randn(case["tokens"], case["num_experts"], generator=gen) * 2
    valid = torch.rand(case["tokens"], generator=gen) > 0.3 if case["masked"] else None
    capacity = case["capacity"]
    if capacity is not None and case["capacity_in_tensor"]:
        capacity = torch.tensor(capacity, device=DEVICE)
    buffer = case["tokens"] if case["capacity"] is None else max(1, min(case["capacity"], case["tokens"]))
    return logits.to(DEVICE), None if valid is None else valid.to(DEVICE), capacity, buffer


def _route(case, backend, logits=None):
    default_logits, valid, capacity, buffer = _route_inputs(case)
    logits = default_logits if logits is None else logits
    return route_and_plan(logits, case["top_k"], capacity, valid, "position", case["layout"], buffer,
                          load_balance_coef=0.3, z_loss_coef=0.07, backend=backend)


@settings(deadline=None, max_examples=40)
@given(case=route_cases())
def test_route_and_plan_kernels_match_the_torch_composition(case):
    want, got = _route(case, "torch"), _route(case, "triton")
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
    logits, *_ = _route_inputs(case)
    gen = torch.Generator().manual_seed(case["seed"] + 1)
    tokens, num_experts, top_k = case["tokens"], case["num_experts"], case["top_k"]
    cot = [torch.randn(tokens, num_experts, generator=gen), torch.randn(tokens, top_k, generator=gen),
           torch.randn(tokens, top_k, generator=gen), torch.randn(3, generator=gen)]
    cot = [t.to(DEVICE) for t in cot]
    grads = []
    for backend in ("torch", "triton"):
        leaf = logits.clone().requires_grad_()
        out = _route(case, backend, leaf)
        loss = (out.weights * cot[2]).sum() + out.losses.loss
        if use_all:  # every differentiable output, as a user's own loss might use them
            loss = loss + (out.routing.probs * cot[0]).sum() + (out.routing.gates * cot[1]).sum() \
                + cot[3][0] * out.losses.load_balance_loss + cot[3][1] * out.losses.z_loss
        loss.backward()
        grads.append(leaf.grad)
    assert rel_err(grads[1], grads[0]) <= GRAD_TOL[torch.float32]


@pytest.mark.parametrize("dtype", DTYPES)
@settings(deadline=None, max_examples=15)
@given(case=route_cases(), dim=st.integers(1, 19), with_bias=st.booleans())
def test_combine_kernel_matches_combine_tokens(dtype, case, dim, with_bias):
    routed = _route(case, "torch")
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


@pytest.mark.parametrize("dtype", DTYPES)
@settings(deadline=None, max_examples=15)
@given(case=route_cases(), width=st.integers(1, 21), activation=st.sampled_from(moe_routing.BIAS_ACTIVATIONS))
def test_bias_act_matches_torch_composition(dtype, case, width, activation):
    plan = _route(case, "torch").plan
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
    logits, *_ = _route_inputs(case)
    logits[:, 2] = -30.0  # nobody picks expert 2
    plan = route_and_plan(logits, 1, backend="torch").plan
    bias = torch.randn(6, 5, device=DEVICE, requires_grad=True)
    bias_act(torch.randn(13, 5, device=DEVICE), bias, plan, "gelu").sum().backward()
    assert (bias.grad[2] == 0).all() and (bias.grad.abs().sum(-1) > 0).sum() >= 2


@pytest.mark.parametrize("backend", ["grouped_mm", "bmm"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_layer_on_the_kernels_matches_loop_reference(monkeypatch, backend, dtype):
    """SwitchMoE with every kernel the CUDA path takes, forced onto the interpreter: output and gradients."""
    monkeypatch.setattr(moe_routing, "resolve_backend", lambda op, backend, device: "triton")
    monkeypatch.setattr(moe_routing, "resolve_routing_backend", lambda backend, logits, priority: "triton")
    torch.manual_seed(0)
    moe = SwitchMoE(16, num_experts=5, expert_dim=24, capacity_factor=0.8, min_capacity=1, top_k=2,
                    backend=backend, device=DEVICE, dtype=dtype)
    x = torch.randn(2, 19, 16, device=DEVICE).to(dtype).requires_grad_()
    mask = torch.rand(2, 19, device=DEVICE) > 0.25
    out, aux = moe(x, mask=mask, return_aux=True)
    params = [moe.router.weight, moe.experts.w1, moe.experts.b1, moe.experts.w2, moe.experts.b2]
    leaves = [t.detach().double().requires_grad_() for t in [x, *params]]
    ref = switch_moe_ref(leaves[0].reshape(-1, 16), *leaves[1:], top_k=2, capacity_factor=0.8, min_capacity=1,
                         mask=mask.reshape(-1))
    assert rel_err(out.reshape(ref.shape), ref) <= TOL[dtype]
    out.backward(out.detach())
    ref.backward(out.detach().double().reshape(ref.shape))
    for p, leaf in zip([x, *params], leaves):
        assert rel_err(p.grad, leaf.grad) <= GRAD_TOL[dtype]
    assert aux.tokens_per_expert.sum() > 0 and 0 < aux.dropped_fraction < 1


def test_custom_ops_pass_opcheck():
    torch.manual_seed(0)
    torch.set_default_device(DEVICE)
    try:
        _opcheck_all()
    finally:
        torch.set_default_device(None)


def _opcheck_all():
    logits, valid = torch.randn(11, 4), torch.rand(11) > 0.3
    torch.library.opcheck(moe_route_op, (logits.requires_grad_(), valid, 3, None, 2, True, 0, 0.1, 0.01))
    torch.library.opcheck(moe_route_op, (logits, None, -1, torch.tensor(2), 1, False, 3, 0.1, 0.01))
    out = moe_route_op(logits.detach(), valid, 3, None, 2, True, 0, 0.1, 0.01)
    probs, expert_idx, gates, rank, keep, weights, counts, slot_of, token_of_slot, assignment_of_slot, \
        expert_of_slot, group_ends, loss, aux, lse, grad_scale = out
    torch.library.opcheck(moe_route_bwd_op, (probs, lse, expert_idx, keep, valid, grad_scale, torch.randn(11, 4),
                                             None, torch.randn(11, 2), torch.randn(()), None, 0.1, 0.01))

    rows = torch.randn(22, 8, requires_grad=True)
    out_bias = torch.randn(4, 8, requires_grad=True)
    # Without the experts' output bias; with it in the grouped layout (capacity 0: expert_of_slot, group_ends)
    # and in the padded one (capacity 6: row // 6, the index tensors unread).
    for extra in ((None, None, None, 0), (out_bias, expert_of_slot, group_ends, 0), (out_bias, None, None, 6)):
        torch.library.opcheck(moe_combine_op, (rows, weights.requires_grad_(), slot_of, token_of_slot,
                                               assignment_of_slot, True, *extra))
        bwd_extra = (extra[0].detach() if extra[0] is not None else None, *extra[1:])
        torch.library.opcheck(moe_combine_bwd_op, (torch.randn(11, 8), rows.detach(), weights.detach(),
                                                   token_of_slot, assignment_of_slot, True, *bwd_extra))
    h, bias = torch.randn(22, 8, requires_grad=True), torch.randn(4, 8, requires_grad=True)
    for activation in moe_routing.BIAS_ACTIVATIONS:
        # capacity 0: the grouped layout's index tensors; 6: the padded layout (22 rows, the last expert's partly).
        for capacity in (0, 6):
            torch.library.opcheck(moe_bias_act_op, (h, bias, expert_of_slot, group_ends, activation, capacity))
            torch.library.opcheck(moe_bias_act_bwd_op, (torch.randn(22, 8), h.detach(), bias.detach(),
                                                        expert_of_slot, group_ends, activation, capacity))


def test_kernels_compile_with_fullgraph():
    torch.manual_seed(0)
    factory = dict(device=DEVICE, requires_grad=True)
    logits = torch.randn(13, 4, **factory)
    valid = torch.rand(13, device=DEVICE) > 0.2
    w1, b1 = torch.randn(4, 8, 16, **factory), torch.randn(4, 16, **factory)
    x = torch.randn(13, 8, **factory)

    def layer(logits, x, w1, b1):
        routed = route_and_plan(logits, 2, valid.sum(), valid, "position", "grouped", 0, 0.1, 0.01,
                                backend="triton")
        rows = x[routed.plan.token_of_slot] @ w1[0]
        hidden = bias_act(rows, b1, routed.plan, "gelu")
        out = combine(hidden, routed.weights, routed.plan, backend="triton")
        return out.square().sum() + routed.losses.loss

    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    inputs = (logits, x, w1, b1)
    got = torch.autograd.grad(compiled(*inputs), inputs)
    want = torch.autograd.grad(layer(*inputs), inputs)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)


def test_route_and_permute_names_bad_shapes():
    with pytest.raises(ValueError, match=r"router_weight \(num_experts, dim\).*x \(5, 8\), router_weight \(3, 6\)"):
        moe_routing.route_and_permute(torch.randn(5, 8, device=DEVICE), torch.randn(3, 6, device=DEVICE), 1)
    plan = _route(dict(tokens=5, num_experts=3, top_k=1, capacity=None, capacity_in_tensor=False, masked=False,
                       layout="grouped", seed=0), "torch").plan
    with pytest.raises(ValueError, match=r"combine: bias must be \(num_experts, dim\)"):
        combine(torch.randn(5, 8, device=DEVICE), torch.ones(5, 1, device=DEVICE), plan,
                bias=torch.randn(3, 7, device=DEVICE))


def test_triton_backend_refuses_what_it_does_not_cover():
    logits = torch.randn(5, 3, device=DEVICE)
    with pytest.raises(ValueError, match="priority='position'"):
        route_and_plan(logits, 1, priority="gate", backend="triton")
    with pytest.raises(ValueError, match="layout must be one of"):
        route_and_plan(logits, 1, layout="ragged")
    assert route_and_plan(logits, 1, priority="gate").routing.rank.shape == (5, 1)  # auto: the torch path


def test_eager_path_matches_the_custom_ops(monkeypatch):
    """Eagerly the kernels' Python bodies run under plain autograd.Functions (no dispatcher); traced, the custom ops
    with their registered autograd. Both wirings must give the same outputs and gradients, bit for bit, but x's:
    eagerly one kernel forms it (the permutation's gradient plus grad_logits @ router weight, the latter summed over
    the experts in its own order), traced a matmul and autograd's add, so it agrees to float32 rounding."""
    monkeypatch.setattr(moe_routing, "resolve_backend", lambda op, backend, device: "triton")
    monkeypatch.setattr(moe_routing, "resolve_routing_backend", lambda backend, logits, priority: "triton")
    op_calls = []
    route_op = moe_routing.moe_route_op
    monkeypatch.setattr(moe_routing, "moe_route_op", lambda *args: op_calls.append(1) or route_op(*args))
    results = []
    for through_ops in (False, True):
        monkeypatch.setattr(torch.compiler, "is_compiling", lambda: through_ops)
        for backend in ("grouped_mm", "bmm"):
            torch.manual_seed(0)
            moe = SwitchMoE(16, num_experts=5, expert_dim=24, capacity_factor=0.8, min_capacity=1, top_k=2,
                            backend=backend, device=DEVICE)
            x = torch.randn(2, 19, 16, device=DEVICE, requires_grad=True)
            mask = torch.rand(2, 19, device=DEVICE) > 0.25
            out, aux = moe(x, mask=mask, return_aux=True)
            torch.autograd.backward([out, aux.loss], [torch.randn_like(out), None])
            results.append([out.detach(), aux.loss.detach(), x.grad] + [p.grad for p in moe.parameters()])
    assert len(op_calls) == 2  # the traced runs only
    eager, traced = results[:2], results[2:]
    for eager_run, traced_run in zip(eager, traced):
        for i, (got, want) in enumerate(zip(eager_run, traced_run)):
            if i == 2:  # x.grad
                assert rel_err(got, want) <= 1e-6
            else:
                assert torch.equal(got, want)


@pytest.mark.parametrize("layout", moe_routing.LAYOUTS)
@pytest.mark.parametrize("activation", moe_routing.BIAS_ACTIVATIONS)
def test_expert_ffn_node_matches_its_composition(monkeypatch, layout, activation):
    """Eagerly the expert FFN (matmul, bias + activation, matmul) is one autograd node; traced, three ops. Same
    kernels in the same order: outputs and every gradient equal bit for bit, and the eager graph has one node."""
    monkeypatch.setattr(moe_routing, "resolve_backend", lambda op, backend, device: "triton")
    case = dict(tokens=23, num_experts=4, top_k=2, capacity=5, capacity_in_tensor=False, masked=True,
                layout=layout, seed=3)
    plan = _route(case, "torch").plan
    gen = torch.Generator().manual_seed(1)
    slots = plan.token_of_slot.numel()
    leaves = [torch.randn(*shape, generator=gen).to(DEVICE) for shape in
              ((slots, 8), (4, 8, 12), (4, 12), (4, 12, 8), (4, 8))]  # rows, w1, b1, w2, b2
    grad = torch.randn(slots, 8, generator=gen).to(DEVICE)
    results = []
    for compiling in (False, True):
        monkeypatch.setattr(torch.compiler, "is_compiling", lambda: compiling)
        inputs = [t.clone().requires_grad_() for t in leaves]
        rows, w1, b1, w2, b2 = inputs
        out = moe_routing.expert_ffn_fused(rows, plan, w1, b1, w2, b2, activation)
        names, stack = set(), [out.grad_fn]
        while stack:
            node = stack.pop()
            if node is not None:
                names.add(node.name())
                stack.extend(next_node for next_node, _ in node.next_functions)
        out.backward(grad)
        results.append((names, [out.detach()] + [t.grad for t in inputs]))
    (eager_names, eager), (traced_names, traced) = results
    assert "_ExpertFFNEagerBackward" in eager_names and "_ExpertFFNEagerBackward" not in traced_names
    assert not any("GroupedMatmul" in n or "Bmm" in n for n in eager_names)
    for got, want in zip(eager, traced):
        assert torch.equal(got, want)


def _node_names(root) -> set:
    names, stack, seen = set(), [root.grad_fn], set()
    while stack:
        node = stack.pop()
        if node is not None and node not in seen:
            seen.add(node)
            names.add(node.name())
            stack.extend(next_node for next_node, _ in node.next_functions)
    return names


@pytest.mark.parametrize("backend", ["grouped_mm", "bmm"])
def test_layer_backward_is_three_nodes_eagerly(monkeypatch, backend):
    """On the kernels' path the layer's backward runs router + routing + permutation, the expert FFN and the combine
    as one autograd node each (the host pays per node); the composition's nodes are gone. Jitter on the router's
    input takes the composition (the router no longer reads the tokens themselves)."""
    monkeypatch.setattr(moe_routing, "resolve_backend", lambda op, backend, device: "triton")
    torch.manual_seed(0)
    moe = SwitchMoE(16, num_experts=4, expert_dim=24, top_k=2, backend=backend, device=DEVICE)
    x = torch.randn(2, 9, 16, device=DEVICE, requires_grad=True)
    out, aux = moe(x, return_aux=True)
    names = _node_names(out) | _node_names(aux.loss)
    assert {"_RouteAndPermuteEagerBackward", "_ExpertFFNEagerBackward", "_CombineEagerBackward"} <= names
    assert not names & {"_Float32LogitsBackward", "_PermuteTokensBackward", "_RouteEagerBackward",
                        "_BiasActEagerBackward", "_GroupedMatmulBackward", "BmmBackward0"}
    jittered = SwitchMoE(16, num_experts=4, expert_dim=24, jitter_noise=0.1, backend=backend, device=DEVICE).train()
    names = _node_names(jittered(x))
    assert "_RouteAndPermuteEagerBackward" not in names and "_RouteEagerBackward" in names


@pytest.mark.parametrize("dtype", DTYPES)
@settings(deadline=None, max_examples=15)
@given(case=route_cases(), dim=st.integers(1, 19), half=st.booleans())
def test_token_gradient_kernel_matches_the_composition(dtype, case, dim, half):
    """x's gradient in one kernel: the permutation's (each assignment's row, zero where it owns none, summed over
    the choices) plus the router's (grad_logits @ weight, grad_logits rounded to x's dtype first when ``half``, as
    the composition does), against the same sum in float64. The error is measured against the terms' magnitudes,
    not the sum's: the kernel rounds each part to x's dtype before adding them, and where they cancel (an H200 run
    found 1.52 - 1.38 at dim 1) a bf16 rounding of a part is several per cent of the sum."""
    plan = _route(case, "torch").plan
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


def test_gelu_kernel_is_float32_accurate():
    """The bias kernels' GELU (erf by Abramowitz & Stegun, _gauss_cdf) and its derivative against float64's exact
    GELU, in float32 over [-12, 12]: within 1e-6 absolute, about torch's own float32 GELU (1.1e-6)."""
    x = torch.linspace(-12, 12, 4001, device=DEVICE)
    plan = _route(dict(tokens=1, num_experts=1, top_k=1, capacity=None, capacity_in_tensor=False, masked=False,
                       layout="grouped", seed=0), "torch").plan
    h = x[None, :].clone().requires_grad_()  # one row of 4001 features, bias 0
    out = bias_act(h, torch.zeros(1, x.numel(), device=DEVICE), plan, "gelu")
    out.sum().backward()
    xd = x.double().requires_grad_()
    ref = torch.nn.functional.gelu(xd)
    ref.sum().backward()
    assert (out.detach()[0].double() - ref.detach()).abs().max() <= 1e-6
    assert (h.grad[0].double() - xd.grad).abs().max() <= 1e-6
