"""SwitchMoE on the fused kernels' path (routing, combine, expert FFN; forced onto Triton's interpreter on CPU):
the layer against the loop reference, the one-op layer (moe_layer.py) against the staged ops and its eager
autograd.Function against the custom op bit for bit, opcheck of every op, fullgraph compiles, and the one-node eager
backward."""

import pytest
import torch

import mamba_r1.modules.moe as moe_module
import mamba_r1.ops.moe_expert_ffn as moe_expert_ffn
import mamba_r1.ops.moe_layer as moe_layer
from mamba_r1.modules.moe import SwitchMoE
from mamba_r1.ops import eager_custom_ops
from mamba_r1.ops.moe_combine import combine, moe_combine_bwd_op, moe_combine_op
from mamba_r1.ops.moe_dispatch import switch_moe_ref
from mamba_r1.ops.moe_expert_ffn import BIAS_ACTIVATIONS, bias_act, moe_bias_act_bwd_op, moe_bias_act_op
from mamba_r1.ops.moe_routing import moe_route_bwd_op, moe_route_op, route_and_plan
from tests.conftest import DEVICE, GRAD_TOL, TOL, autograd_node_names, rel_err
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
    """Eagerly the layer op's Python body runs under a plain autograd.Function (no dispatcher); traced, the custom
    op with its registered autograd. Both wirings run the same kernels in the same order: outputs and every gradient
    equal bit for bit, in both layouts."""
    force_triton(monkeypatch)
    op_calls = []
    layer_op = moe_layer.moe_layer_op
    monkeypatch.setattr(moe_layer, "moe_layer_op", lambda *args: op_calls.append(1) or layer_op(*args))
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
        for got, want in zip(eager_run, traced_run):
            assert torch.equal(got, want)


def _layer_case(backend, dtype=torch.float32, top_k=2, masked=True, activation="gelu", capacity_factor=0.8):
    torch.manual_seed(0)
    moe = SwitchMoE(16, num_experts=5, expert_dim=24, capacity_factor=capacity_factor, min_capacity=1, top_k=top_k,
                    activation=activation, backend=backend, device=DEVICE, dtype=dtype)
    x = torch.randn(2, 19, 16, device=DEVICE).to(dtype).requires_grad_()
    mask = torch.rand(2, 19, device=DEVICE) > 0.25 if masked else None
    return moe, x, mask


@pytest.mark.parametrize("backend", ["grouped_mm", "bmm"])
@pytest.mark.parametrize("activation", ["gelu", "silu"])
@pytest.mark.parametrize("masked", [True, False])
@pytest.mark.parametrize("capacity_factor", [0.8, None])
def test_layer_op_matches_the_staged_path(monkeypatch, backend, activation, masked, capacity_factor):
    """The one-op layer against the three staged ops it replaces (route_and_permute -> expert_ffn_fused -> combine,
    what SwitchMoE runs when fused_layer_applies says no): the same kernels in the same order, so the output, the
    auxiliary report and every gradient are equal bit for bit; with dropping and without (capacity_factor None)."""
    force_triton(monkeypatch)
    results = []
    for fused in (True, False):
        if not fused:
            monkeypatch.setattr(moe_module, "fused_layer_applies", lambda *args, **kwargs: False)
        moe, x, mask = _layer_case(backend, masked=masked, activation=activation, capacity_factor=capacity_factor)
        out, aux = moe(x, mask=mask, return_aux=True)
        assert ("_MoELayerEagerBackward" in autograd_node_names(out)) == fused
        torch.autograd.backward([out, aux.loss], [torch.randn_like(out), None])
        results.append([out.detach(), aux.loss.detach(), aux.load_balance_loss.detach(), aux.z_loss.detach(),
                        aux.tokens_per_expert, aux.dropped_fraction, x.grad] + [p.grad for p in moe.parameters()])
    for got, want in zip(*results):
        assert torch.equal(got, want)


def test_layer_op_with_only_the_auxiliary_loss_backpropagating(monkeypatch):
    """With only aux.loss differentiated the layer op's backward skips the combine and experts (their weights get
    zero gradients) and the router's and x's gradients are those of the staged path."""
    force_triton(monkeypatch)
    results = []
    for fused in (True, False):
        if not fused:
            monkeypatch.setattr(moe_module, "fused_layer_applies", lambda *args, **kwargs: False)
        moe, x, mask = _layer_case("grouped_mm")
        _, aux = moe(x, mask=mask, return_aux=True)
        aux.loss.backward()
        results.append((x.grad, moe.router.weight.grad, moe.experts.w1.grad))
    (x_fused, router_fused, w1_fused), (x_staged, router_staged, w1_staged) = results
    assert torch.equal(x_fused, x_staged) and torch.equal(router_fused, router_staged)
    assert w1_staged is None and torch.count_nonzero(w1_fused) == 0
    assert torch.count_nonzero(router_fused) > 0


@pytest.mark.parametrize("backend", ["grouped_mm", "bmm"])
def test_layer_op_computes_only_the_gradients_asked_for(monkeypatch, backend):
    """Frozen experts and tokens without a gradient (a router-only fine-tune): the layer op's backward leaves them
    out (no weight-gradient matmul at all) and the router's gradient equals the staged path's; with only x asking,
    x's gradient equals the staged path's and the backward runs the two input-gradient matmuls only."""
    force_triton(monkeypatch)
    fused_applies, use_fused = moe_module.fused_layer_applies, [True]
    monkeypatch.setattr(moe_module, "fused_layer_applies", lambda *args: use_fused[0] and fused_applies(*args))
    calls, depth = [], [0]

    def counting(original):  # one count per product: grouped_gemm's own fallback to torch._grouped_mm is not another
        def call(*args, **kwargs):
            calls.extend([1] if depth[0] == 0 else [])
            depth[0] += 1
            try:
                return original(*args, **kwargs)
            finally:
                depth[0] -= 1
        return call

    for owner, name in ((torch, "_grouped_mm"), (torch, "bmm"), (moe_expert_ffn, "grouped_gemm")):
        monkeypatch.setattr(owner, name, counting(getattr(owner, name)))
    for trainable, backward_matmuls in ((("router.weight",), 0), (("x",), 2)):
        results = []
        for fused in (True, False):
            use_fused[0] = fused
            moe, x, mask = _layer_case(backend)
            x.requires_grad_("x" in trainable)
            for name, p in moe.named_parameters():
                p.requires_grad_(name in trainable)
            out, aux = moe(x, mask=mask, return_aux=True)
            assert ("_MoELayerEagerBackward" in autograd_node_names(out)) == fused
            calls.clear()
            torch.autograd.backward([out, aux.loss], [torch.randn_like(out), None])
            results.append((x.grad, {name: p.grad for name, p in moe.named_parameters()}, len(calls)))
        (x_fused, fused_grads, fused_matmuls), (x_staged, staged_grads, _) = results
        for name, grad in fused_grads.items():
            if name in trainable:
                assert torch.equal(grad, staged_grads[name])
            else:
                assert grad is None and staged_grads[name] is None
        assert (x_fused is None) == ("x" not in trainable)
        if "x" in trainable:
            assert torch.equal(x_fused, x_staged)
        assert fused_matmuls == backward_matmuls


def test_layer_op_falls_back_to_the_stages(monkeypatch):
    """Mixed dtypes, autocast, jitter on the router's input or swiglu experts: the staged path (the layer op's fake
    states its outputs' dtypes, the jittered router reads another tensor than the tokens, and swiglu has no fused
    bias kernel)."""
    force_triton(monkeypatch)
    moe, x, _ = _layer_case("grouped_mm")
    assert "_MoELayerEagerBackward" in autograd_node_names(moe(x))
    with torch.autocast(device_type=torch.device(DEVICE).type, dtype=torch.bfloat16):
        assert "_MoELayerEagerBackward" not in autograd_node_names(moe(x))
    moe.router.to(torch.float64)
    assert "_MoELayerEagerBackward" not in autograd_node_names(moe(x))
    jittered = SwitchMoE(16, num_experts=5, expert_dim=24, jitter_noise=0.1, device=DEVICE).train()
    assert "_MoELayerEagerBackward" not in autograd_node_names(jittered(x))
    swiglu = SwitchMoE(16, num_experts=5, expert_dim=24, activation="swiglu", device=DEVICE)
    assert "_MoELayerEagerBackward" not in autograd_node_names(swiglu(x))


def test_layer_ops_pass_opcheck():
    torch.manual_seed(0)
    torch.set_default_device(DEVICE)
    try:
        x, router = torch.randn(11, 8, requires_grad=True), torch.randn(4, 8, requires_grad=True)
        w1, b1 = torch.randn(4, 8, 12, requires_grad=True), torch.randn(4, 12, requires_grad=True)
        w2, b2 = torch.randn(4, 12, 8, requires_grad=True), torch.randn(4, 8, requires_grad=True)
        valid = torch.rand(11) > 0.3
        # grouped top-2 with a mask and an int capacity; padded top-1 with the capacity in a tensor (6 rows each).
        for args in ((valid, 3, None, 2, True, 0), (None, -1, torch.tensor(2), 1, False, 6)):
            for activation in ("gelu", "none"):
                inputs = (x, router, w1, b1, w2, b2, *args, 0.1, 0.01, activation)
                torch.library.opcheck(moe_layer.moe_layer_op, inputs)
                outputs = moe_layer.moe_layer_op(*[t.detach() if isinstance(t, torch.Tensor) else t for t in inputs])
                saved = [t.detach() for t in (x, router, w1, b1, w2, b2)]
                for needs in ((True,) * 6, (True, False, False, True, False, True)):
                    torch.library.opcheck(moe_layer.moe_layer_bwd_op, (
                        torch.randn(11, 8), torch.randn(()), None, *saved, args[0], *outputs[4:], args[4], args[5],
                        0.1, 0.01, activation, *needs))
    finally:
        torch.set_default_device(None)


@pytest.mark.parametrize("backend", ["grouped_mm", "bmm"])
def test_layer_compiles_with_fullgraph(monkeypatch, backend):
    """torch.compile(fullgraph=True) traces SwitchMoE as the layer op and its backward op (aot_eager: the ops' own
    bodies run): the same output and gradients as eagerly, bit for bit."""
    force_triton(monkeypatch)
    results = []
    for compiled in (False, True):
        moe, x, mask = _layer_case(backend)
        run = torch.compile(moe, fullgraph=True, backend="aot_eager") if compiled else moe
        out, aux = run(x, mask=mask, return_aux=True)
        torch.autograd.backward([out, aux.loss], [torch.ones_like(out), None])
        results.append([out.detach(), aux.loss.detach(), x.grad] + [p.grad for p in moe.parameters()])
    for got, want in zip(*results):
        assert torch.equal(got, want)


@pytest.mark.parametrize("backend", ["grouped_mm", "bmm"])
def test_layer_backward_is_one_node_eagerly(monkeypatch, backend):
    """On the kernels' path the layer's backward is one autograd node (the layer op's: combine, experts, routing and
    x's gradient in one body); neither the staged nodes nor the composition's are left. Jitter on the router's
    input takes the composition (the router no longer reads the tokens themselves)."""
    force_triton(monkeypatch, routing=False)
    torch.manual_seed(0)
    moe = SwitchMoE(16, num_experts=4, expert_dim=24, top_k=2, backend=backend, device=DEVICE)
    x = torch.randn(2, 9, 16, device=DEVICE, requires_grad=True)
    out, aux = moe(x, return_aux=True)
    names = autograd_node_names(out) | autograd_node_names(aux.loss)
    assert "_MoELayerEagerBackward" in names
    assert not names & {"_RouteAndPermuteEagerBackward", "_ExpertFFNEagerBackward", "_CombineEagerBackward",
                        "_Float32LogitsBackward", "_PermuteTokensBackward", "_RouteEagerBackward",
                        "_BiasActEagerBackward", "_GroupedMatmulBackward", "BmmBackward0"}
    jittered = SwitchMoE(16, num_experts=4, expert_dim=24, jitter_noise=0.1, backend=backend, device=DEVICE).train()
    names = autograd_node_names(jittered(x))
    assert "_RouteAndPermuteEagerBackward" not in names and "_RouteEagerBackward" in names
