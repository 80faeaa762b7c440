"""The MoE dispatch ops against plain loops and plain indexing: routing queue, plans, permute/combine, expert FFN."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mamba_r1.ops.moe_dispatch import (
    ACTIVATIONS,
    PRIORITIES,
    combine_tokens,
    expert_capacity,
    expert_ffn,
    ffn_activation,
    float32_logits,
    load_balancing_loss,
    permute_tokens,
    plan_grouped,
    plan_padded,
    resolve_dispatch_backend,
    route_tokens,
    router_z_loss,
)
from tests.conftest import DEVICE, GRAD_TOL, TOL, rel_err

DTYPES = [torch.float32, torch.bfloat16]


def _queue_loop(expert_idx, valid, capacity, order):
    """Rank and keep of every assignment, one at a time: first choices in `order`, then second choices, ..."""
    tokens, top_k = expert_idx.shape
    rank = [[-1] * top_k for _ in range(tokens)]
    load = {}
    for j in range(top_k):
        for t in order:
            if valid[t]:
                e = int(expert_idx[t, j])
                rank[t][j] = load.get(e, 0)
                load[e] = rank[t][j] + 1
    keep = [[r >= 0 and (capacity is None or r < capacity) for r in row] for row in rank]
    return torch.tensor(rank).view(tokens, top_k), torch.tensor(keep).view(tokens, top_k)


@st.composite
def routing_cases(draw):
    num_experts = draw(st.integers(1, 7))
    top_k = draw(st.integers(1, min(num_experts, 3)))
    tokens = draw(st.integers(1, 41))
    capacity = draw(st.one_of(st.none(), st.integers(0, 12)))
    masked = draw(st.booleans())
    priority = draw(st.sampled_from(PRIORITIES))
    seed = draw(st.integers(0, 2**16))
    return num_experts, top_k, tokens, capacity, masked, priority, seed


def _routing(num_experts, top_k, tokens, capacity, masked, priority, seed, tensor_capacity=False):
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(tokens, num_experts, generator=gen) * 2
    valid = torch.rand(tokens, generator=gen) > 0.3 if masked else None
    cap = torch.tensor(capacity) if (tensor_capacity and capacity is not None) else capacity
    return logits, valid, route_tokens(logits, top_k, cap, valid, priority)


@settings(deadline=None, max_examples=60)
@given(routing_cases(), st.booleans())
def test_route_tokens_matches_sequential_queue(case, tensor_capacity):
    num_experts, top_k, tokens, capacity, masked, priority, seed = case
    logits, valid, routing = _routing(*case, tensor_capacity=tensor_capacity)
    probs = torch.softmax(logits, -1)
    assert torch.equal(routing.expert_idx[:, 0], probs.argmax(-1))
    assert torch.equal(routing.probs.gather(1, routing.expert_idx), probs.topk(top_k, -1).values)
    if top_k > 1:
        torch.testing.assert_close(routing.gates.sum(-1), torch.ones(tokens))
    else:
        assert torch.equal(routing.gates[:, 0], probs.max(-1).values)
    order = list(range(tokens))
    if priority == "gate":
        order.sort(key=lambda t: (-float(probs[t].max()), t))
    valid_list = [True] * tokens if valid is None else valid.tolist()
    rank, keep = _queue_loop(routing.expert_idx, valid_list, capacity, order)
    assert torch.equal(routing.rank, rank)
    assert torch.equal(routing.keep, keep)


@settings(deadline=None, max_examples=40)
@given(routing_cases())
def test_kept_count_never_exceeds_capacity(case):
    num_experts, top_k, tokens, capacity, masked, priority, seed = case
    _, valid, routing = _routing(*case)
    counts = torch.bincount(routing.expert_idx[routing.keep], minlength=num_experts)
    routed = torch.bincount(routing.expert_idx[routing.rank >= 0], minlength=num_experts)
    limit = routed if capacity is None else routed.clamp(max=capacity)
    assert torch.equal(counts, limit)
    assert torch.equal(routing.kept, counts) and torch.equal(routing.routed, routed)
    if valid is not None:
        assert not routing.keep[~valid].any()


@settings(deadline=None, max_examples=60)
@given(n=st.integers(0, 10**6), num_experts=st.integers(1, 128), top_k=st.integers(1, 4),
       factor=st.floats(1e-3, 8.0), min_capacity=st.integers(0, 16))
def test_expert_capacity_device_count_matches_python_count(n, num_experts, top_k, factor, min_capacity):
    as_int = expert_capacity(n, num_experts, top_k, factor, min_capacity)
    as_tensor = expert_capacity(torch.tensor(n), num_experts, top_k, factor, min_capacity)
    assert as_int == int(as_tensor)
    assert as_int >= min_capacity and as_int >= factor * n * top_k / num_experts
    assert as_int == max(min_capacity, math.ceil(factor * n * top_k / num_experts))


@settings(deadline=None, max_examples=50)
@given(routing_cases())
def test_grouped_plan_puts_each_assignment_in_its_expert_segment(case):
    num_experts, top_k, tokens, capacity, masked, priority, seed = case
    _, valid, routing = _routing(*case)
    plan = plan_grouped(routing.expert_idx, num_experts, valid)
    slots = tokens * top_k
    assert torch.equal(plan.slot_of.flatten().sort().values, torch.arange(slots))  # a permutation
    assert torch.equal(plan.assignment_of_slot[plan.slot_of.flatten()], torch.arange(slots))
    assert torch.equal(plan.token_of_slot[plan.slot_of], torch.arange(tokens)[:, None].expand(tokens, top_k))
    experts = routing.expert_idx if valid is None else torch.where(valid[:, None], routing.expert_idx, num_experts - 1)
    counts = torch.bincount(experts.flatten(), minlength=num_experts)
    assert torch.equal(plan.group_ends.long(), counts.cumsum(0))
    starts = counts.cumsum(0) - counts
    slot, expert = plan.slot_of.flatten(), experts.flatten()  # padding rides with the last expert
    assert ((slot >= starts[expert]) & (slot < starts[expert] + counts[expert])).all()
    assert torch.equal(plan.expert_of_slot, torch.repeat_interleave(torch.arange(num_experts), counts))


@settings(deadline=None, max_examples=50)
@given(routing_cases())
def test_padded_plan_gives_each_kept_assignment_its_own_row(case):
    num_experts, top_k, tokens, capacity, masked, priority, seed = case
    _, _, routing = _routing(*case)
    buffer = tokens if capacity is None else max(1, min(capacity, tokens))
    plan = plan_padded(routing.expert_idx, routing.keep, routing.rank, num_experts, buffer)
    keep = routing.keep
    slot = plan.slot_of[keep]
    assert torch.equal(slot // buffer, routing.expert_idx[keep])
    assert slot.unique().numel() == slot.numel()
    flat = (torch.arange(tokens)[:, None] * top_k + torch.arange(top_k))[keep]
    assert torch.equal(plan.assignment_of_slot[slot], flat)
    owned = torch.zeros(num_experts * buffer, dtype=torch.bool)
    owned[slot] = True
    assert (plan.assignment_of_slot[~owned] == tokens * top_k).all()
    assert torch.equal(plan.owns_slot, keep)


def _plans(case):
    num_experts, top_k, tokens, capacity, masked, priority, seed = case
    _, valid, routing = _routing(*case)
    buffer = tokens if capacity is None else max(1, min(capacity, tokens))
    return routing, [plan_grouped(routing.expert_idx, num_experts, valid),
                     plan_padded(routing.expert_idx, routing.keep, routing.rank, num_experts, buffer)]


@pytest.mark.parametrize("dtype", DTYPES)
@settings(deadline=None, max_examples=25)
@given(case=routing_cases(), dim=st.integers(1, 11))
def test_permute_and_combine_match_plain_indexing(dtype, case, dim):
    routing, plans = _plans(case)
    tokens, top_k = routing.expert_idx.shape
    gen = torch.Generator().manual_seed(case[-1])
    x = torch.randn(tokens, dim, generator=gen).to(dtype)
    weights = routing.gates * routing.keep
    for plan in plans:
        rows_fn = torch.randn(plan.token_of_slot.numel(), dim, generator=gen).to(dtype)
        x_fast = x.clone().requires_grad_()
        w_fast = weights.clone().requires_grad_()
        rows_in = rows_fn.clone().requires_grad_()
        permuted = permute_tokens(x_fast, plan)
        combined = combine_tokens(rows_in, w_fast, plan)

        # Reference: float64 autograd through plain indexing; only owned rows pass gradient back to x.
        x_ref = x.double().requires_grad_()
        w_ref = weights.double().requires_grad_()
        rows_ref = rows_fn.double().requires_grad_()
        owner = plan.assignment_of_slot < tokens * top_k
        permuted_ref = torch.where(owner[:, None], x_ref[plan.token_of_slot], x_ref[plan.token_of_slot].detach())
        combined_ref = sum(w_ref[:, j, None] * rows_ref[plan.slot_of[:, j]] for j in range(top_k))

        assert torch.equal(permuted, x[plan.token_of_slot])
        assert rel_err(combined, combined_ref) <= TOL[dtype]
        grad_p = torch.randn(permuted.shape, generator=gen).to(dtype)
        grad_c = torch.randn(combined.shape, generator=gen).to(dtype)
        torch.autograd.backward([permuted, combined], [grad_p, grad_c])
        torch.autograd.backward([permuted_ref, combined_ref], [grad_p.double(), grad_c.double()])
        assert rel_err(x_fast.grad, x_ref.grad) <= GRAD_TOL[dtype]
        assert rel_err(rows_in.grad, rows_ref.grad) <= GRAD_TOL[dtype]
        assert rel_err(w_fast.grad * routing.keep, w_ref.grad * routing.keep) <= GRAD_TOL[dtype]


def _expert_ffn_loop(rows, plan, expert_of_slot, row_used, w1, b1, w2, b2, activation):
    """Each used row through its expert, one expert at a time, float64."""
    out = torch.zeros(rows.shape[0], w2.shape[-1], dtype=torch.float64)
    for e in range(w1.shape[0]):
        sel = (expert_of_slot == e) & row_used
        h = rows[sel] @ w1[e]
        if b1 is not None:
            h = h + b1[e]
        y = ffn_activation(h, activation) @ w2[e]
        out[sel] = y + (b2[e] if b2 is not None else 0)
    return out


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ["grouped", "padded"])
@settings(deadline=None, max_examples=15)
@given(case=routing_cases(), widths=st.tuples(st.integers(1, 3), st.integers(1, 3)),
       activation=st.sampled_from(ACTIVATIONS), bias=st.booleans())
def test_expert_ffn_matches_per_expert_loop(dtype, layout, case, widths, activation, bias):
    routing, plans = _plans(case)
    plan = plans[0] if layout == "grouped" else plans[1]
    num_experts = case[0]
    tokens, top_k = routing.expert_idx.shape
    # torch._grouped_mm wants 16-byte rows: widths in multiples of 8 cover both dtypes.
    dim, hidden = 8 * widths[0], 8 * widths[1]
    width = 2 * hidden if activation == "swiglu" else hidden
    gen = torch.Generator().manual_seed(case[-1])
    params = [torch.randn(num_experts, dim, width, generator=gen) / dim**0.5,
              torch.randn(num_experts, width, generator=gen) if bias else None,
              torch.randn(num_experts, hidden, dim, generator=gen) / hidden**0.5,
              torch.randn(num_experts, dim, generator=gen) if bias else None]
    params = [p.to(dtype).requires_grad_() if p is not None else None for p in params]
    rows = torch.randn(plan.token_of_slot.numel(), dim, generator=gen).to(dtype).requires_grad_()
    out = expert_ffn(rows, plan, *params, activation)

    if layout == "grouped":
        used = routing.keep.flatten()[plan.assignment_of_slot]
        expert_of_slot = plan.expert_of_slot
    else:
        used = plan.assignment_of_slot < tokens * top_k
        expert_of_slot = torch.arange(rows.shape[0]) // plan.capacity
    ref_params = [p.detach().double().requires_grad_() if p is not None else None for p in params]
    rows_ref = rows.detach().double().requires_grad_()
    ref = _expert_ffn_loop(rows_ref, plan, expert_of_slot, used, *ref_params, activation)
    assert torch.isfinite(out).all()
    assert rel_err(out[used], ref[used]) <= TOL[dtype]

    grad = torch.randn(out.shape, generator=gen).to(dtype) * used[:, None]  # unused rows are discarded upstream
    out.backward(grad)
    ref.backward(grad.double())
    assert rel_err(rows.grad[used], rows_ref.grad[used]) <= GRAD_TOL[dtype]
    for p, p_ref in zip(params, ref_params):
        if p is not None:
            assert rel_err(p.grad, p_ref.grad) <= GRAD_TOL[dtype]


@pytest.mark.parametrize("num_experts,top_k", [(1, 1), (4, 1), (6, 2), (8, 3)])
def test_load_balancing_loss_is_one_for_uniform_router(num_experts, top_k):
    logits = torch.zeros(37, num_experts)
    routing = route_tokens(logits, top_k)
    loss = load_balancing_loss(routing.probs, routing.routed)
    assert abs(loss.item() - 1.0) < 1e-6


def test_load_balancing_loss_exceeds_one_when_skewed_and_ignores_padding():
    logits = torch.randn(64, 4)
    logits[:, 0] += 3.0  # most tokens prefer expert 0
    routing = route_tokens(logits, 1)
    assert load_balancing_loss(routing.probs, routing.routed).item() > 1.5
    # Padding tokens that all pick expert 0 do not count: with them masked the real tokens are uniform.
    real = torch.zeros(8, 4)
    padded = torch.cat([real, logits])
    valid = torch.arange(72) < 8
    routing = route_tokens(padded, 1, valid=valid)
    assert abs(load_balancing_loss(routing.probs, routing.routed, valid).item() - 1.0) < 1e-6


@settings(deadline=None, max_examples=20)
@given(tokens=st.integers(1, 30), num_experts=st.integers(1, 6), masked=st.booleans(), seed=st.integers(0, 999))
def test_router_z_loss_is_mean_squared_logsumexp_of_real_tokens(tokens, num_experts, masked, seed):
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(tokens, num_experts, generator=gen, dtype=torch.float64)
    valid = torch.rand(tokens, generator=gen) > 0.4 if masked else torch.ones(tokens, dtype=torch.bool)
    expected = [math.log(sum(math.exp(v) for v in row)) ** 2 for row, ok in zip(logits.tolist(), valid) if ok]
    expected = sum(expected) / max(len(expected), 1)
    assert abs(router_z_loss(logits, valid if masked else None).item() - expected) < 1e-5 * max(1.0, expected)


def test_backend_resolution_and_errors():
    x = torch.randn(4, 12)
    w1, w2 = torch.randn(2, 12, 20), torch.randn(2, 20, 12)
    assert resolve_dispatch_backend("auto", x, w1, w2) == "bmm"  # CPU: no sync-free grouped kernel
    with pytest.raises(ValueError, match="backend must be one of"):
        resolve_dispatch_backend("cutlass", x, w1, w2)
    with pytest.raises(ValueError, match="multiples of 4"):
        resolve_dispatch_backend("grouped_mm", torch.randn(4, 6), torch.randn(2, 6, 20), torch.randn(2, 20, 6))


def test_auto_takes_bmm_only_where_it_computes_no_more_rows(monkeypatch):
    """Where grouped_mm runs (Hopper, bf16), "auto" takes the padded bmm only while its buffer holds no more rows
    than the assignments (capacity_factor <= 1), grouped_mm otherwise."""
    import mamba_r1.ops.moe_dispatch as dispatch

    monkeypatch.setattr(dispatch, "grouped_mm_supported", lambda *args: True)
    x, w1, w2 = torch.randn(4, 12), torch.randn(2, 12, 20), torch.randn(2, 20, 12)
    assert resolve_dispatch_backend("auto", x, w1, w2, padded_rows=1000, assignments=1000) == "bmm"
    assert resolve_dispatch_backend("auto", x, w1, w2, padded_rows=1001, assignments=1000) == "grouped_mm"
    assert resolve_dispatch_backend("auto", x, w1, w2) == "grouped_mm"
    assert resolve_dispatch_backend("bmm", x, w1, w2, padded_rows=8000, assignments=1000) == "bmm"


def test_routing_and_plans_trace_into_one_graph():
    """The whole routing + plan path traces into one graph: no .item(), no data-dependent shapes."""
    def route_and_plan(logits, valid):
        capacity = expert_capacity(valid.sum(), 4, 2, 1.0, 1)
        routing = route_tokens(logits, 2, capacity, valid, "gate")
        plan = plan_grouped(routing.expert_idx, 4, valid)
        return plan.slot_of, plan.group_ends, plan_padded(routing.expert_idx, routing.keep, routing.rank, 4, 9).slot_of

    logits, valid = torch.randn(17, 4), torch.rand(17) > 0.2
    compiled = torch.compile(route_and_plan, fullgraph=True, backend="aot_eager")
    for got, want in zip(compiled(logits, valid), route_and_plan(logits, valid)):
        assert torch.equal(got, want)



@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_float32_logits_match_the_upcast_matmul(dtype):
    """Router logits in float32 whatever the input dtype: on CUDA half inputs take one matmul with float32 output
    (no float32 copy of x); it must equal the float32 matmul of the upcast inputs up to summation order, and its
    gradients the upcast path's up to rounding the logits' gradient to x's dtype."""
    torch.manual_seed(0)
    x = torch.randn(300, 72, device=DEVICE).to(dtype).requires_grad_()
    weight = torch.randn(7, 72, device=DEVICE).to(dtype).requires_grad_()
    got = float32_logits(x, weight)
    assert got.dtype == torch.float32
    x64, w64 = (t.detach().double().requires_grad_() for t in (x, weight))
    want = x64 @ w64.t()
    assert rel_err(got, want) <= 1e-6
    grad = torch.randn(got.shape, device=DEVICE)
    got.backward(grad)
    want.backward(grad.double())
    assert x.grad.dtype == dtype and weight.grad.dtype == dtype
    for g, w in ((x.grad, x64.grad), (weight.grad, w64.grad)):
        assert rel_err(g, w) <= GRAD_TOL[dtype]
