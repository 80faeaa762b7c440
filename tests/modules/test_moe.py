"""SwitchMoE against the one-token-at-a-time loop reference, its routing invariants, aux losses and errors."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from mamba_r1.modules.mlp import MLP
from mamba_r1.modules.moe import MoEAux, SwitchMoE
from mamba_r1.ops.moe_dispatch import ACTIVATIONS, PRIORITIES, expert_capacity, route_tokens, switch_moe_ref
from tests.conftest import GRAD_TOL, TOL, rel_err

DTYPES = [torch.float32, torch.bfloat16]


def _param_list(moe):
    return [moe.router.weight, moe.experts.w1, moe.experts.b1, moe.experts.w2, moe.experts.b2]


def _ref_inputs(x, moe):
    """float64 leaves holding the same values as the layer's input and weights (bf16 -> float64 is exact)."""
    leaves = [p.detach().double().requires_grad_() if p is not None else None for p in [x, *_param_list(moe)]]
    return leaves[0], leaves[1:]


@st.composite
def moe_cases(draw, grouped, dtype):
    # bf16 rounds four intermediate results of the layer (~0.4% each): a relative-norm check needs a few elements
    # per tensor to average them, so bf16 draws sizes from 8 up, float32 from 1.
    low = 8 if dtype == torch.bfloat16 else 1
    num_experts = draw(st.integers(1, 6))
    top_k = draw(st.integers(1, min(num_experts, 3)))
    shape = draw(st.one_of(st.tuples(st.integers(low, 37)), st.tuples(st.integers(1, 3), st.integers(low, 13))))
    # torch._grouped_mm needs 16-byte rows; the padded path takes any width.
    dim = 8 * draw(st.integers(1, 2)) if grouped else draw(st.integers(low, 13))
    expert_dim = 8 * draw(st.integers(1, 2)) if grouped else draw(st.integers(low, 13))
    return dict(
        num_experts=num_experts,
        top_k=top_k,
        shape=shape,
        dim=dim,
        expert_dim=expert_dim,
        # From "keeps everything" down to factors that drop most tokens.
        capacity_factor=draw(st.one_of(st.none(), st.floats(0.05, 2.5))),
        min_capacity=draw(st.integers(0, 3)),
        masked=draw(st.booleans()),
        priority=draw(st.sampled_from(PRIORITIES)),
        activation=draw(st.sampled_from(ACTIVATIONS)),
        bias=draw(st.booleans()),
        seed=draw(st.integers(0, 2**16)),
    )


def _check_against_reference(case, dtype, backend):
    torch.manual_seed(case["seed"])
    moe = SwitchMoE(case["dim"], num_experts=case["num_experts"], expert_dim=case["expert_dim"],
                    capacity_factor=case["capacity_factor"], min_capacity=case["min_capacity"], top_k=case["top_k"],
                    activation=case["activation"], bias=case["bias"], priority=case["priority"], backend=backend,
                    dtype=dtype)
    x = torch.randn(*case["shape"], case["dim"]).to(dtype).requires_grad_()
    mask = torch.rand(case["shape"]) > 0.3 if case["masked"] else None
    out = moe(x, mask=mask)
    assert out.shape == x.shape and out.dtype == dtype

    x_ref, (router, w1, b1, w2, b2) = _ref_inputs(x, moe)
    ref = switch_moe_ref(x_ref.reshape(-1, case["dim"]), router, w1, b1, w2, b2, top_k=case["top_k"],
                         capacity_factor=case["capacity_factor"], min_capacity=case["min_capacity"],
                         activation=case["activation"], mask=None if mask is None else mask.reshape(-1),
                         priority=case["priority"])
    assert rel_err(out.reshape(ref.shape), ref) <= TOL[dtype]

    # In bf16 the upstream gradient is the output itself (the loss 0.5 * ||out||^2): a random direction can make the
    # gate gradient <grad, expert(x)> cancel to far below the bf16 rounding of expert(x).
    grad = torch.randn(out.shape).to(dtype) if dtype == torch.float32 else out.detach()
    out.backward(grad)
    if not ref.requires_grad:  # every token padding or dropped: nothing reaches the output
        assert all(p.grad is None or not p.grad.any() for p in [x, *_param_list(moe)] if p is not None)
        return
    ref.backward(grad.double().reshape(ref.shape))
    assert rel_err(x.grad, x_ref.grad) <= GRAD_TOL[dtype]
    for p, p_ref in zip(_param_list(moe), (router, w1, b1, w2, b2)):
        if p is not None:
            assert rel_err(p.grad, p_ref.grad) <= GRAD_TOL[dtype]


@pytest.mark.parametrize("dtype", DTYPES)
@settings(deadline=None, max_examples=30)
@given(data=st.data())
def test_padded_bmm_matches_loop_reference(dtype, data):
    _check_against_reference(data.draw(moe_cases(grouped=False, dtype=dtype)), dtype, "bmm")


@pytest.mark.parametrize("dtype", DTYPES)
@settings(deadline=None, max_examples=20)
@given(data=st.data())
def test_grouped_mm_matches_loop_reference(dtype, data):
    _check_against_reference(data.draw(moe_cases(grouped=True, dtype=dtype)), dtype, "grouped_mm")


def _signature_moe(dim, num_experts, **kwargs):
    """Expert e outputs the basis vector e (zero w2, b2 = identity rows), so a token's output spells out which
    experts processed it and with which gate."""
    moe = SwitchMoE(dim, num_experts=num_experts, expert_dim=8, **kwargs)
    with torch.no_grad():
        moe.experts.w2.zero_()
        moe.experts.b2.copy_(torch.eye(num_experts, dim))
    return moe


@pytest.mark.parametrize("backend", ["bmm", "grouped_mm"])
@settings(deadline=None, max_examples=25)
@given(tokens=st.integers(1, 40), num_experts=st.integers(2, 8), top_k=st.integers(1, 3),
       factor=st.one_of(st.none(), st.floats(0.1, 2.0)), masked=st.booleans(), seed=st.integers(0, 999))
def test_kept_tokens_reach_their_top_k_experts_and_no_others(backend, tokens, num_experts, top_k, factor, masked,
                                                            seed):
    top_k = min(top_k, num_experts)
    torch.manual_seed(seed)
    moe = _signature_moe(8, num_experts, top_k=top_k, capacity_factor=factor, min_capacity=1, backend=backend)
    x = torch.randn(tokens, 8)
    mask = torch.rand(tokens) > 0.3 if masked else None
    out, aux = moe(x, mask=mask, return_aux=True)

    probs = torch.softmax(F.linear(x, moe.router.weight), -1)
    top_probs, top_experts = probs.topk(top_k, -1)
    gates = top_probs / top_probs.sum(-1, keepdim=True) if top_k > 1 else top_probs
    served = out[:, :num_experts]  # (tokens, num_experts) gate of each expert that processed the token
    chosen = torch.zeros(tokens, num_experts, dtype=torch.bool).scatter_(1, top_experts, True)
    assert (served[~chosen] == 0).all()  # nowhere else
    kept = served.gather(1, top_experts) != 0
    torch.testing.assert_close(served.gather(1, top_experts)[kept], gates[kept])

    real = tokens if mask is None else int(mask.sum())
    if mask is not None:
        assert (out[~mask] == 0).all()
    capacity = real if factor is None else expert_capacity(real, num_experts, top_k, factor, 1)
    per_expert = (served != 0).sum(0)
    assert torch.equal(per_expert, aux.tokens_per_expert)
    assert (per_expert <= capacity).all()
    if factor is None:
        assert int(kept.sum()) == real * top_k  # no dropping: every real token reached all its experts
    assert abs(aux.dropped_fraction.item() - (real * top_k - int(kept.sum())) / max(real * top_k, 1)) < 1e-6


@pytest.mark.parametrize("backend", ["bmm", "grouped_mm"])
def test_dropped_tokens_output_exactly_zero(backend):
    torch.manual_seed(1)
    moe = SwitchMoE(16, num_experts=4, expert_dim=24, capacity_factor=0.25, min_capacity=1, top_k=2, backend=backend)
    x = torch.randn(3, 20, 16)
    out, aux = moe(x, return_aux=True)
    logits = F.linear(x.reshape(-1, 16), moe.router.weight)
    routing = route_tokens(logits, 2, capacity=expert_capacity(60, 4, 2, 0.25, 1))
    dropped = ~routing.keep.any(-1)
    assert dropped.sum() > 20 and aux.dropped_fraction > 0.5
    assert (out.reshape(-1, 16)[dropped] == 0).all()
    assert (out.reshape(-1, 16)[~dropped] != 0).any(-1).all()


def test_priority_decides_which_token_overflows():
    torch.manual_seed(0)
    moe = _signature_moe(8, 2, capacity_factor=0.01, min_capacity=1)  # capacity 1 per expert
    with torch.no_grad():
        moe.router.weight.zero_()
        moe.router.weight[0, 0] = 1.0  # logit of expert 0 = x[0]: every token with x[0] > 0 wants expert 0
    x = torch.zeros(5, 8)
    x[:, 0] = torch.tensor([0.5, 3.0, 0.2, 2.0, 0.1])
    by_position = moe(x)[:, 0] != 0
    moe.priority = "gate"
    by_confidence = moe(x)[:, 0] != 0
    assert by_position.tolist() == [True, False, False, False, False]
    assert by_confidence.tolist() == [False, True, False, False, False]


@pytest.mark.parametrize("backend", ["bmm", "grouped_mm"])
def test_masked_tokens_change_nobody_when_capacity_does_not_bind(backend):
    torch.manual_seed(2)
    moe = SwitchMoE(16, num_experts=4, expert_dim=24, capacity_factor=None, top_k=2, backend=backend)
    x = torch.randn(2, 11, 16)
    mask = torch.rand(2, 11) > 0.4
    out = moe(x, mask=mask)
    x_changed = torch.where(mask[..., None], x, 100 * torch.randn_like(x))
    out_changed = moe(x_changed, mask=mask)
    assert torch.equal(out[mask], out_changed[mask])
    assert (out[~mask] == 0).all() and (out_changed[~mask] == 0).all()
    torch.testing.assert_close(out[mask], moe(x[mask]), rtol=1e-5, atol=1e-6)


def test_padding_takes_no_capacity():
    """Capacity counts real tokens: padding neither fills experts nor raises the limit."""
    torch.manual_seed(3)
    moe = SwitchMoE(8, num_experts=2, expert_dim=8, capacity_factor=1.0, min_capacity=1)
    x = torch.randn(1, 24, 8)
    mask = torch.zeros(1, 24, dtype=torch.bool)
    mask[0, 16:] = True  # 8 real tokens at the end
    _, aux = moe(x, mask=mask, return_aux=True)
    _, aux_real = moe(x[:, 16:], return_aux=True)
    assert torch.equal(aux.tokens_per_expert, aux_real.tokens_per_expert)
    assert aux.tokens_per_expert.max() <= 4
    torch.testing.assert_close(aux.load_balance_loss, aux_real.load_balance_loss)
    torch.testing.assert_close(aux.z_loss, aux_real.z_loss)


def test_balancing_loss_is_one_for_uniform_routing_and_above_one_otherwise():
    torch.manual_seed(4)
    moe = SwitchMoE(16, num_experts=8, expert_dim=16)
    x = torch.randn(4, 32, 16)
    with torch.no_grad():
        moe.router.weight.zero_()
    _, aux = moe(x, return_aux=True)
    assert abs(aux.load_balance_loss.item() - 1.0) < 1e-6
    with torch.no_grad():
        moe.router.weight[0, 0] = 3.0  # every token leans to expert 0
    _, aux = moe(x.abs() + 0.5, return_aux=True)
    assert aux.load_balance_loss.item() > 1.5


def test_aux_loss_combines_coefficients_and_backpropagates():
    torch.manual_seed(5)
    moe = SwitchMoE(16, num_experts=4, expert_dim=16, load_balance_coef=0.3, z_loss_coef=0.07)
    x = torch.randn(30, 16)
    _, aux = moe(x, return_aux=True)
    torch.testing.assert_close(aux.loss, 0.3 * aux.load_balance_loss + 0.07 * aux.z_loss)
    logits = F.linear(x, moe.router.weight)
    torch.testing.assert_close(aux.z_loss, torch.logsumexp(logits, -1).square().mean())
    aux.loss.backward()
    assert moe.router.weight.grad.abs().sum() > 0
    assert moe.experts.w1.grad is None  # the aux loss concerns the router only


def test_router_receives_gradient_through_the_gates():
    torch.manual_seed(6)
    moe = SwitchMoE(16, num_experts=4, expert_dim=16)
    moe(torch.randn(2, 9, 16)).square().sum().backward()
    grad = moe.router.weight.grad
    assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0


def test_eval_is_deterministic_and_jitter_only_trains():
    torch.manual_seed(7)
    moe = SwitchMoE(16, num_experts=4, expert_dim=16, jitter_noise=0.5, capacity_factor=1.0,
                    eval_capacity_factor=1.0)
    x = torch.randn(40, 16)
    train_a, train_b = moe(x), moe(x)
    assert not torch.equal(train_a, train_b)  # jitter moves the router input in training
    moe.eval()
    assert torch.equal(moe(x), moe(x))
    moe.jitter_noise = 0.0
    moe.train()
    torch.testing.assert_close(moe(x), moe.eval()(x))  # equal capacity factors: train == eval without jitter


def test_eval_uses_eval_capacity_factor():
    torch.manual_seed(8)
    moe = SwitchMoE(8, num_experts=2, expert_dim=8, capacity_factor=0.5, eval_capacity_factor=None, min_capacity=1)
    x = torch.randn(64, 8)
    assert moe(x, return_aux=True)[1].dropped_fraction > 0.4
    assert moe.eval()(x, return_aux=True)[1].dropped_fraction == 0


def test_router_runs_in_float32_under_autocast():
    torch.manual_seed(9)
    moe = SwitchMoE(16, num_experts=4, expert_dim=16)
    x = torch.randn(12, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, aux = moe(x, return_aux=True)
    assert out.dtype == torch.bfloat16
    expected = torch.logsumexp(F.linear(x, moe.router.weight), -1).square().mean()
    assert aux.z_loss.dtype == torch.float32
    torch.testing.assert_close(aux.z_loss, expected, rtol=1e-6, atol=0)


def test_one_expert_without_dropping_is_the_dense_mlp():
    torch.manual_seed(10)
    for activation in ACTIVATIONS:
        mlp = MLP(12, 20, activation=activation)
        moe = SwitchMoE(12, num_experts=1, expert_dim=20, capacity_factor=None, activation=activation)
        with torch.no_grad():
            moe.experts.w1[0].copy_(mlp.fc1.weight.t())
            moe.experts.b1[0].copy_(mlp.fc1.bias)
            moe.experts.w2[0].copy_(mlp.fc2.weight.t())
            moe.experts.b2[0].copy_(mlp.fc2.bias)
        x = torch.randn(3, 7, 12)
        torch.testing.assert_close(moe(x), mlp(x))


@pytest.mark.parametrize("backend,dtype", [("bmm", torch.float32), ("grouped_mm", torch.bfloat16)])
def test_compiles_without_graph_breaks(backend, dtype):
    torch.manual_seed(11)
    moe = SwitchMoE(16, num_experts=4, expert_dim=24, top_k=2, capacity_factor=1.0, backend=backend, dtype=dtype)
    compiled = torch.compile(moe, fullgraph=True, backend="aot_eager")
    x = torch.randn(2, 13, 16, dtype=dtype, requires_grad=True)
    mask = torch.rand(2, 13) > 0.3
    grads = []
    for fn in (moe, compiled):
        out, aux = fn(x, mask=mask, return_aux=True)
        (out.float().square().sum() + aux.loss).backward()
        grads.append((out.detach(), x.grad.clone(), moe.experts.w1.grad.clone(), moe.router.weight.grad.clone()))
        x.grad = None
        moe.zero_grad()
    for eager, traced in zip(*grads):
        torch.testing.assert_close(traced, eager)


def test_aux_stack_sums_losses_and_keeps_per_layer_stats():
    torch.manual_seed(12)
    layers = [SwitchMoE(8, num_experts=4, expert_dim=8) for _ in range(3)]
    x = torch.randn(20, 8)
    auxes = [layer(x, return_aux=True)[1] for layer in layers]
    total = MoEAux.stack(auxes)
    torch.testing.assert_close(total.loss, sum(a.loss for a in auxes))
    torch.testing.assert_close(MoEAux.stack(auxes, reduction="mean").z_loss, sum(a.z_loss for a in auxes) / 3)
    assert total.tokens_per_expert.shape == (3, 4) and total.dropped_fraction.shape == (3,)
    assert torch.equal(total.tokens_per_expert[1], auxes[1].tokens_per_expert)
    with pytest.raises(ValueError, match="reduction"):
        MoEAux.stack(auxes, reduction="max")
    with pytest.raises(ValueError, match="at least one"):
        MoEAux.stack([])


def test_empty_batch_gives_empty_output():
    moe = SwitchMoE(8, num_experts=4, expert_dim=8)
    out, aux = moe(torch.randn(0, 5, 8), return_aux=True)
    assert out.shape == (0, 5, 8)
    assert aux.tokens_per_expert.sum() == 0 and aux.dropped_fraction == 0


@pytest.mark.parametrize("kwargs,match", [
    (dict(num_experts=0), "num_experts must be an integer >= 1; got 0"),
    (dict(num_experts=4, top_k=5), "top_k must be <= num_experts=4; got top_k=5"),
    (dict(top_k=0), "top_k must be an integer >= 1; got 0"),
    (dict(capacity_factor=0.0), "capacity_factor must be a finite number > 0.*got 0.0"),
    (dict(capacity_factor=-1.0), "capacity_factor must be .*got -1.0"),
    (dict(eval_capacity_factor=0), "eval_capacity_factor must be .*got 0"),
    (dict(min_capacity=-1), "min_capacity must be an integer >= 0; got -1"),
    (dict(jitter_noise=1.5), r"jitter_noise must be in \[0, 1\); got 1.5"),
    (dict(activation="relu"), "activation must be one of .*got 'relu'"),
    (dict(priority="random"), "priority must be one of .*got 'random'"),
    (dict(backend="cuda"), "backend must be one of .*got 'cuda'"),
    (dict(expert_dim=0), "expert_dim must be an integer >= 1; got 0"),
])
def test_bad_configuration_raises(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SwitchMoE(8, **kwargs)


def test_bad_input_raises():
    moe = SwitchMoE(8, num_experts=4, expert_dim=8)
    expected = r"x must be \(batch, seqlen, dim\) or \(tokens, dim\) with dim=8; got shape \(2, 3, 7\)"
    with pytest.raises(ValueError, match=expected):
        moe(torch.randn(2, 3, 7))
    with pytest.raises(ValueError, match=r"got shape \(8,\)"):
        moe(torch.randn(8))
    with pytest.raises(TypeError, match="x must be a floating-point tensor; got dtype torch.int64"):
        moe(torch.ones(2, 8, dtype=torch.int64))
    with pytest.raises(TypeError, match="mask must be a bool tensor.*got dtype torch.float32"):
        moe(torch.randn(2, 3, 8), mask=torch.ones(2, 3))
    with pytest.raises(ValueError, match=r"mask must have x's shape without dim, \(2, 3\); got \(3, 2\)"):
        moe(torch.randn(2, 3, 8), mask=torch.ones(3, 2, dtype=torch.bool))
    with pytest.raises(ValueError, match="grouped_mm.*multiples of 4"):
        SwitchMoE(6, num_experts=2, expert_dim=8, backend="grouped_mm")(torch.randn(3, 6))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("backend", ["grouped_mm", "bmm"])
def test_training_step_can_be_captured_in_a_cuda_graph(backend):
    """No host sync and shape-sized buffers: make_graphed_callables captures forward and backward, and a replay on
    new inputs gives the eager layer's output and gradients."""
    torch.manual_seed(0)
    moe = SwitchMoE(64, num_experts=4, expert_dim=128, backend=backend, device="cuda", dtype=torch.bfloat16)

    class WithLoss(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.moe = moe

        def forward(self, x):
            out, aux = self.moe(x, return_aux=True)
            return out, aux.loss

    x = torch.randn(96, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    graphed = torch.cuda.make_graphed_callables(WithLoss(), (x,))
    x_new = torch.randn_like(x).requires_grad_()
    results = []
    for fn in (graphed, WithLoss()):
        moe.zero_grad(set_to_none=True)
        x_new.grad = None
        out, loss = fn(x_new)
        torch.autograd.backward([out, loss], [out.detach().clone(), None])
        results.append((out.detach().clone(), x_new.grad.clone(), moe.experts.w1.grad.clone()))
    for got, want in zip(*results):
        torch.testing.assert_close(got, want)
