"""SwitchMoE on the fused kernels' path (routing, combine, expert FFN; forced onto Triton's interpreter on CPU):
the layer against the loop reference, the eager autograd.Functions against the custom ops bit for bit, opcheck of
every op, a fullgraph compile, and the three-node eager backward."""

import pytest
import torch

import mamba_r1.ops.moe_routing as moe_routing
from mamba_r1.modules.moe import SwitchMoE
from mamba_r1.ops import eager_custom_ops
from mamba_r1.ops.moe_combine import combine, moe_combine_bwd_op, moe_combine_op
from mamba_r1.ops.moe_dispatch import switch_moe_ref
from mamba_r1.ops.moe_expert_ffn import BIAS_ACTIVATIONS, bias_act, moe_bias_act_bwd_op, moe_bias_act_op
from mamba_r1.ops.moe_routing import moe_route_bwd_op, moe_route_op, route_and_plan
from tests.conftest import DEVICE, GRAD_TOL, TOL, rel_err
from tests.ops.moe_cases import DTYPES, force_triton


@pytest.mark.parametrize("backend", ["grouped_mm", "bmm"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_layer_on_the_kernels_matches_loop_reference(monkeypatch, backend, dtype):
    """SwitchMoE with every kernel the CUDA path takes, forced onto the interpreter: output and gradients."""
    force_triton(monkeypatch)
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
    for activation in BIAS_ACTIVATIONS:
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


def test_eager_path_matches_the_custom_ops(monkeypatch):
    """Eagerly the kernels' Python bodies run under plain autograd.Functions (no dispatcher); traced, the custom ops
    with their registered autograd. Both wirings must give the same outputs and gradients, bit for bit, but x's:
    eagerly one kernel forms it (the permutation's gradient plus grad_logits @ router weight, the latter summed over
    the experts in its own order), traced a matmul and autograd's add, so it agrees to float32 rounding."""
    force_triton(monkeypatch)
    op_calls = []
    route_op = moe_routing.moe_route_op
    monkeypatch.setattr(moe_routing, "moe_route_op", lambda *args: op_calls.append(1) or route_op(*args))
    results = []
    for through_ops in (False, True):
        monkeypatch.setattr(eager_custom_ops, "tracing", lambda: through_ops)
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
    force_triton(monkeypatch, routing=False)
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
