"""MambaBlock: decoding, chunked prefill and padding agree with one parallel forward; init; gradients; bad input."""

import importlib.util
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from mamba_r1.modules.mamba import MambaBlock, MambaState
from tests.conftest import DEVICE, GRAD_TOL, TOL, rel_err

# The hypothesis tests run the PyTorch paths; the fused Triton kernels get one small test at the end (under the CPU
# interpreter they are too slow for more).
BACKENDS = ["ref"] + (["torch"] if importlib.util.find_spec("mamba_r1.ops.selective_scan.chunked") else [])
F32 = TOL[torch.float32]


@pytest.fixture
def on_test_device():
    """Tensors and modules made inside the test land on the GPU when there is one: backend="triton" runs there, or
    under the CPU interpreter without one."""
    with torch.device(DEVICE):
        yield


def make_block(backend, d_model=24, d_state=5, d_conv=4, dtype=torch.float32, **kwargs):
    block = MambaBlock(d_model, d_state=d_state, d_conv=d_conv, scan_backend=backend, dtype=dtype, **kwargs)
    with torch.no_grad():
        # Non-default D and conv bias so a path that dropped either would show.
        block.D.uniform_(0.5, 1.5)
        block.conv1d.bias.uniform_(-0.5, 0.5)
    return block


def states_close(a: MambaState, b: MambaState, tol=F32) -> bool:
    return rel_err(a.conv_state, b.conv_state) <= tol and rel_err(a.ssm_state, b.ssm_state) <= tol


@pytest.mark.parametrize("backend", BACKENDS)
@settings(deadline=None, max_examples=8)
@given(batch=st.integers(1, 3), seqlen=st.sampled_from([1, 2, 3, 7, 13]), d_conv=st.sampled_from([1, 2, 4]),
       d_state=st.sampled_from([1, 4, 16]))
def test_step_matches_parallel_forward(backend, batch, seqlen, d_conv, d_state):
    block = make_block(backend, d_state=d_state, d_conv=d_conv)
    x = torch.randn(batch, seqlen, block.d_model)
    with torch.no_grad():
        y_par, state_par = block(x, state=block.allocate_state(batch))
        state = block.allocate_state(batch)
        y_step = torch.stack([block.step(x[:, t], state)[0] for t in range(seqlen)], dim=1)
    assert rel_err(y_step, y_par) <= F32
    assert states_close(state, state_par)
    assert rel_err(block(x), y_par) <= F32


@pytest.mark.parametrize("backend", BACKENDS)
def test_step_matches_parallel_forward_bf16(backend):
    block = make_block(backend, dtype=torch.bfloat16)
    x = torch.randn(2, 12, block.d_model, dtype=torch.bfloat16)
    with torch.no_grad():
        y_par, state_par = block(x, state=block.allocate_state(2))
        state = block.allocate_state(2)
        y_step = torch.stack([block.step(x[:, t], state)[0] for t in range(12)], dim=1)
    assert y_step.dtype == torch.bfloat16 and state.ssm_state.dtype == torch.float32
    assert rel_err(y_step, y_par) <= TOL[torch.bfloat16]
    assert states_close(state, state_par, TOL[torch.bfloat16])


def test_step_updates_state_in_place():
    block = make_block("ref")
    state = block.allocate_state(2)
    pointers = (state.conv_state.data_ptr(), state.ssm_state.data_ptr())
    with torch.no_grad():
        for _ in range(3):
            _, returned = block.step(torch.randn(2, block.d_model), state)
    assert returned is state
    assert (state.conv_state.data_ptr(), state.ssm_state.data_ptr()) == pointers
    assert state.ssm_state.abs().sum() > 0 and state.conv_state.abs().sum() > 0


def test_step_follows_A_log_changes_between_calls():
    """Every A_log update between tokens is seen: in place, through .data (no version bump), by load_state_dict."""
    block = make_block("ref")
    x = torch.randn(2, block.d_model)
    h0 = torch.randn(2, block.d_inner, block.d_state)  # a nonzero state, so A matters to the output

    def one_step(module):
        state = module.allocate_state(2)
        state.ssm_state.copy_(h0)
        with torch.no_grad():
            return module.step(x, state)[0]

    before = one_step(block)
    with torch.no_grad():
        block.A_log.add_(0.5)  # what an optimizer step does
    after = one_step(block)
    twin = make_block("ref")  # never stepped: nothing cached
    twin.load_state_dict(block.state_dict())
    assert rel_err(after, before) > 1e-3
    assert torch.equal(after, one_step(twin))
    block.load_state_dict({**block.state_dict(), "A_log": block.A_log.detach() - 0.5})
    assert rel_err(one_step(block), before) <= F32
    block.A_log.data.add_(0.5)
    assert torch.equal(one_step(block), after)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("d_conv", [1, 4])
def test_chunked_prefill_matches_one_forward(backend, d_conv):
    block = make_block(backend, d_conv=d_conv)
    seqlen = 17
    x = torch.randn(2, seqlen, block.d_model)
    with torch.no_grad():
        y_full, state_full = block(x, state=block.allocate_state(2))
        # Splits shorter than d_conv - 1 make the conv context reach back through more than one call.
        for splits in ([1], [2], [8], [16], [1, 2, 3], [5, 6, 12]):
            state = block.allocate_state(2)
            before = state.ssm_state.clone()
            pieces = []
            for lo, hi in zip([0] + splits, splits + [seqlen]):
                y, new_state = block(x[:, lo:hi], state=state)
                if lo == 0:
                    assert torch.equal(state.ssm_state, before), "forward must not modify the state it was given"
                pieces.append(y)
                state = new_state
            assert rel_err(torch.cat(pieces, dim=1), y_full) <= F32, splits
            assert states_close(state, state_full), splits


@pytest.mark.parametrize("backend", BACKENDS)
@settings(deadline=None, max_examples=6)
@given(seqlen=st.sampled_from([1, 3, 6, 11]), pads=st.lists(st.integers(0, 6), min_size=1, max_size=3))
def test_left_padding_does_not_change_real_outputs(backend, seqlen, pads):
    # bias=True: with bias-free projections a pad's output would be zero by accident (z = in_proj(0) = 0).
    block = make_block(backend, bias=True)
    width = max(pads)
    # Row i holds its own sequence behind pads[i] left pads; pad embeddings are arbitrary garbage.
    rows = [torch.randn(seqlen + width - p, block.d_model) for p in pads]
    x = torch.stack([torch.cat([torch.randn(p, block.d_model) * 100, r]) for p, r in zip(pads, rows)])
    mask = torch.stack([torch.arange(seqlen + width) >= p for p in pads])
    with torch.no_grad():
        y, state = block(x, mask=mask, state=block.allocate_state(len(pads)))
        for i, (p, row) in enumerate(zip(pads, rows)):
            y_alone, state_alone = block(row[None], state=block.allocate_state(1))
            assert rel_err(y[i, p:], y_alone[0]) <= F32
            assert torch.equal(y[i, :p], torch.zeros_like(y[i, :p]))
            assert rel_err(state.conv_state[i], state_alone.conv_state[0]) <= F32
            assert rel_err(state.ssm_state[i], state_alone.ssm_state[0]) <= F32


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("pads", [0, 1, 5])
def test_left_padded_copies_of_one_sequence_agree(backend, pads):
    block = make_block(backend)
    x = torch.randn(1, 9, block.d_model)
    padded = torch.cat([torch.randn(1, pads, block.d_model), x], dim=1)
    mask = (torch.arange(9 + pads) >= pads)[None]
    with torch.no_grad():
        y_ref, state_ref = block(x, state=block.allocate_state(1))
        y, state = block(padded, mask=mask, state=block.allocate_state(1))
    assert rel_err(y[:, pads:], y_ref) <= F32
    assert torch.equal(y[:, :pads], torch.zeros(1, pads, block.d_model))
    assert states_close(state, state_ref)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("pads", [1, 2, 6])
def test_right_padding_leaves_final_state_of_last_real_token(backend, pads):
    block = make_block(backend)
    x = torch.randn(2, 8, block.d_model)
    padded = torch.cat([x, torch.randn(2, pads, block.d_model)], dim=1)
    mask = (torch.arange(8 + pads) < 8)[None].expand(2, -1)
    with torch.no_grad():
        y_ref, state_ref = block(x, state=block.allocate_state(2))
        y, state = block(padded, mask=mask, state=block.allocate_state(2))
    assert rel_err(y[:, :8], y_ref) <= F32
    assert torch.equal(y[:, 8:], torch.zeros(2, pads, block.d_model))
    assert states_close(state, state_ref)


@pytest.mark.parametrize("backend", BACKENDS)
@settings(deadline=None, max_examples=6)
@given(seqlen=st.sampled_from([2, 5, 10]), batch=st.integers(1, 3), split=st.integers(1, 9))
def test_any_mask_equals_running_the_real_tokens_alone(backend, seqlen, batch, split):
    """Pads anywhere (also between real tokens), with a state carried in from an earlier chunk."""
    block = make_block(backend, bias=True)
    first = torch.randn(batch, split, block.d_model)
    x = torch.randn(batch, seqlen, block.d_model)
    mask = torch.rand(batch, seqlen) < 0.6
    with torch.no_grad():
        _, state0 = block(first, state=block.allocate_state(batch))
        y, state = block(x, mask=mask, state=state0)
        assert torch.equal(y[~mask], torch.zeros_like(y[~mask]))
        for i in range(batch):
            one = MambaState(state0.conv_state[i:i + 1], state0.ssm_state[i:i + 1])
            if mask[i].any():
                y_alone, state_alone = block(x[i:i + 1, mask[i]], state=one)
                assert rel_err(y[i, mask[i]], y_alone[0]) <= F32
            else:
                state_alone = one  # a row of pads only carries its state through unchanged
            assert rel_err(state.conv_state[i], state_alone.conv_state[0]) <= F32
            assert rel_err(state.ssm_state[i], state_alone.ssm_state[0]) <= F32


@pytest.mark.parametrize("backend", BACKENDS)
def test_all_true_mask_matches_no_mask(backend):
    block = make_block(backend)
    x = torch.randn(2, 7, block.d_model)
    with torch.no_grad():
        assert rel_err(block(x, mask=torch.ones(2, 7, dtype=torch.bool)), block(x)) <= F32


def test_nan_in_padding_does_not_reach_outputs_or_gradients():
    block = make_block("ref")
    x = torch.randn(2, 6, block.d_model)
    x[0, :2] = float("nan")
    x[1, 5] = float("inf")
    x.requires_grad_(True)
    mask = torch.isfinite(x.detach()).all(-1)
    y = block(x, mask=mask)
    assert torch.isfinite(y).all()
    y.square().sum().backward()
    assert torch.isfinite(x.grad).all()
    assert all(torch.isfinite(p.grad).all() for p in block.parameters())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("masked", [False, True])
def test_gradient_reaches_every_parameter(backend, masked):
    block = make_block(backend, bias=True)
    x = torch.randn(2, 9, block.d_model, requires_grad=True)
    mask = (torch.arange(9) >= torch.tensor([[0], [3]])) if masked else None
    y, state = block(x, mask=mask, state=block.allocate_state(2))
    (y.square().sum() + state.ssm_state.sum()).backward()
    for name, p in block.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name
    assert torch.isfinite(x.grad).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_left_padding_does_not_change_gradients(backend):
    """Gradients of the real tokens' loss through the masked path equal those of the unpadded sequence."""
    block = make_block(backend)
    x = torch.randn(1, 8, block.d_model)
    grad_out = torch.randn(1, 8, block.d_model)

    def grads(inp, mask, keep):
        block.zero_grad()
        inp = inp.clone().requires_grad_(True)
        y, state = block(inp, mask=mask, state=block.allocate_state(1))
        ((y[:, keep] * grad_out).sum() + state.ssm_state.square().sum()).backward()
        return {name: p.grad.clone() for name, p in block.named_parameters()} | {"x": inp.grad[:, keep]}

    expected = grads(x, None, slice(0, 8))
    padded = torch.cat([torch.randn(1, 3, block.d_model), x], dim=1)
    got = grads(padded, (torch.arange(11) >= 3)[None], slice(3, 11))
    for name in expected:
        assert rel_err(got[name], expected[name]) <= GRAD_TOL[torch.float32], name


@pytest.mark.skipif("torch" not in BACKENDS, reason="chunked scan backend not written yet")
def test_torch_backend_matches_ref_forward_and_gradients():
    torch_block = make_block("torch")
    ref_block = make_block("ref")
    ref_block.load_state_dict(torch_block.state_dict())
    x = torch.randn(2, 70, torch_block.d_model)
    grad_out = torch.randn_like(x)
    outs = []
    for block in (torch_block, ref_block):
        y = block(x)
        (y * grad_out).sum().backward()
        outs.append((y, {name: p.grad for name, p in block.named_parameters()}))
    (y_t, g_t), (y_r, g_r) = outs
    assert rel_err(y_t, y_r) <= F32
    for name in g_r:
        assert rel_err(g_t[name], g_r[name]) <= GRAD_TOL[torch.float32], name


def test_init_follows_the_mamba_paper():
    d_model, d_state, dt_min, dt_max = 40, 7, 0.002, 0.05
    block = MambaBlock(d_model, d_state=d_state, dt_min=dt_min, dt_max=dt_max)
    assert block.d_inner == 80 and block.dt_rank == math.ceil(40 / 16) == 3
    assert block.A_log.dtype == torch.float32 and block.A_log.shape == (80, d_state)
    assert torch.allclose(-torch.exp(block.A_log), -torch.arange(1, d_state + 1.0).expand(80, -1))
    assert torch.equal(block.D, torch.ones(80))
    assert block.A_log._no_weight_decay and block.D._no_weight_decay
    dt = F.softplus(block.dt_proj.bias)
    assert dt.min() >= dt_min * (1 - 1e-5) and dt.max() <= dt_max * (1 + 1e-5)
    assert dt.std() > 0  # drawn, not constant
    bound = block.dt_rank ** -0.5
    assert block.dt_proj.weight.abs().max() <= bound and block.dt_proj.weight.abs().max() > bound / 2
    assert block.dt_proj.bias._no_reinit
    names = {name for name, _ in block.named_parameters()}
    assert names == {"in_proj.weight", "conv1d.weight", "conv1d.bias", "x_proj.weight", "dt_proj.weight",
                     "dt_proj.bias", "A_log", "D", "out_proj.weight"}
    assert block.in_proj.weight.shape == (160, 40) and block.x_proj.weight.shape == (3 + 2 * d_state, 80)


def test_init_constant_dt_weight_floor_and_dtype():
    block = MambaBlock(16, dt_rank=4, dt_init="constant", dt_scale=2.0, dt_min=1e-6, dt_max=1e-5,
                       dt_init_floor=1e-3, dtype=torch.bfloat16)
    assert torch.equal(block.dt_proj.weight.float(), torch.full((32, 4), 2.0 * 4 ** -0.5))
    # Every draw in [1e-6, 1e-5] is below the floor, so every dt starts at the floor.
    assert torch.allclose(F.softplus(block.dt_proj.bias.float()), torch.full((32,), 1e-3), rtol=1e-2)
    assert block.in_proj.weight.dtype == torch.bfloat16
    assert block.A_log.dtype == torch.float32 and block.D.dtype == torch.float32
    assert block.allocate_state(3).conv_state.dtype == torch.bfloat16
    assert block.allocate_state(3).ssm_state.dtype == torch.float32


def test_bf16_forward_is_finite_on_a_longer_sequence():
    backend = "torch" if "torch" in BACKENDS else "ref"
    block = make_block(backend, d_model=32, d_state=16, dtype=torch.bfloat16)
    x = torch.randn(2, 300, 32, dtype=torch.bfloat16)
    mask = torch.arange(300)[None] >= torch.tensor([[0], [37]])
    with torch.no_grad():
        y, state = block(x, mask=mask, state=block.allocate_state(2))
    assert y.dtype == torch.bfloat16 and torch.isfinite(y).all() and y.abs().sum() > 0
    assert torch.isfinite(state.ssm_state).all()


@pytest.mark.parametrize("call, error, words", [
    (lambda b: b(torch.randn(2, 16)), ValueError, "x must be (batch, seqlen, d_model)"),
    (lambda b: b(torch.randn(2, 3, 15)), ValueError, "d_model=16"),
    (lambda b: b(torch.randn(2, 0, 16)), ValueError, "seqlen >= 1"),
    (lambda b: b(torch.ones(2, 3, 16, dtype=torch.int64)), TypeError, "x must be"),
    (lambda b: b(torch.randn(2, 3, 16), mask=torch.ones(2, 3)), TypeError, "mask must be a bool"),
    (lambda b: b(torch.randn(2, 3, 16), mask=torch.ones(2, 4, dtype=torch.bool)), ValueError,
     "mask must be (batch, seqlen)"),
    (lambda b: b(torch.randn(2, 3, 16), state=(1, 2)), TypeError, "state must be a MambaState"),
    (lambda b: b(torch.randn(2, 3, 16), state=b.allocate_state(3)), ValueError, "state.conv_state"),
    (lambda b: b(torch.randn(2, 3, 16), state=MambaState(torch.zeros(2, 32, 3), torch.zeros(2, 32, 5))),
     ValueError, "state.ssm_state must be (batch, d_inner, d_state)"),
    (lambda b: b(torch.randn(2, 3, 16), state=MambaState(torch.zeros(2, 32, 3), torch.zeros(2, 32, 4).bfloat16())),
     TypeError, "state.ssm_state must be float32"),
    (lambda b: b.step(torch.randn(2, 1, 16), b.allocate_state(2)), ValueError, "x_t must be (batch, d_model)"),
    (lambda b: b.step(torch.randn(2, 16), b.allocate_state(1)), ValueError, "state.conv_state"),
    (lambda b: b.allocate_state(0), ValueError, "batch_size"),
])
def test_bad_inputs_raise_naming_the_argument(call, error, words):
    block = make_block("ref", d_model=16, d_state=4)
    with pytest.raises(error) as info:
        call(block)
    assert words in str(info.value)


@pytest.mark.parametrize("kwargs, words", [
    (dict(d_model=0), "d_model"), (dict(d_state=0), "d_state"), (dict(d_conv=0), "d_conv"),
    (dict(expand=0), "expand"), (dict(dt_rank=0), "dt_rank"), (dict(dt_min=0.2, dt_max=0.1), "dt_min"),
    (dict(dt_init="normal"), "dt_init"), (dict(scan_backend="cuda"), "scan_backend"),
])
def test_bad_constructor_arguments_raise(kwargs, words):
    with pytest.raises(ValueError, match=words):
        MambaBlock(**{"d_model": 16, **kwargs})


# ---------------------------------------------------------------- selective=False: the time-invariant ablation


def _spy_scan_args(monkeypatch, block, x, step=False):
    """(dt after bias, B, C) that the block hands to the scan (or, with step=True, to the one-token update)."""
    import mamba_r1.modules.mamba as mamba_module

    name = "selective_state_update" if step else "selective_scan"
    real, seen = getattr(mamba_module, name), {}

    def spy(*args, **kwargs):
        # selective_scan(u, delta, A, B, C, ...); selective_state_update(state, x, dt, A, B, C, ...)
        dt, _, B, C = args[2:6] if step else args[1:5]
        if step and kwargs.get("dt_weight") is not None:  # the step hands dt_proj's input and weight over
            dt = F.linear(dt.float(), kwargs["dt_weight"].float())
        bias = kwargs["dt_bias"] if step else kwargs["delta_bias"][:, None]
        seen.update(dt=F.softplus(dt.float() + bias), B=B, C=C)
        return real(*args, **kwargs)

    monkeypatch.setattr(mamba_module, name, spy)
    with torch.no_grad():
        if step:
            block.step(x, block.allocate_state(x.shape[0]))
        else:
            block(x)
    monkeypatch.setattr(mamba_module, name, real)
    return seen


@pytest.mark.parametrize("step", [False, True])
def test_non_selective_dt_B_C_do_not_depend_on_the_input(monkeypatch, step):
    shape = (2, 24) if step else (2, 9, 24)
    x1, x2 = torch.randn(shape), 3 * torch.randn(shape)
    lti = make_block("ref", selective=False)
    a, b = _spy_scan_args(monkeypatch, lti, x1, step), _spy_scan_args(monkeypatch, lti, x2, step)
    params = {"dt": F.softplus(lti.dt_bias), "B": lti.B, "C": lti.C}
    for name in ("dt", "B", "C"):
        assert torch.equal(a[name], b[name]), name
        # The same in every row and at every position: the learned value per channel (dt) or per state (B, C).
        first = a[name][:1] if step else a[name][:1, :, :1]
        assert torch.equal(a[name], first.expand_as(a[name])), name
        assert torch.allclose(first.flatten(), params[name].detach()), name
    # The control: the same spy sees the selective block's dt, B, C change with the input.
    sel = make_block("ref")
    a, b = _spy_scan_args(monkeypatch, sel, x1, step), _spy_scan_args(monkeypatch, sel, x2, step)
    assert all(not torch.allclose(a[name], b[name]) for name in ("dt", "B", "C"))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@settings(deadline=None, max_examples=4)
@given(batch=st.integers(1, 3), seqlen=st.sampled_from([1, 2, 7, 13]), d_conv=st.sampled_from([1, 4]))
def test_non_selective_step_matches_parallel_forward(backend, dtype, batch, seqlen, d_conv):
    block = make_block(backend, d_state=4, d_conv=d_conv, dtype=dtype, selective=False)
    x = torch.randn(batch, seqlen, block.d_model, dtype=dtype)
    with torch.no_grad():
        y_par, state_par = block(x, state=block.allocate_state(batch))
        state = block.allocate_state(batch)
        y_step = torch.stack([block.step(x[:, t], state)[0] for t in range(seqlen)], dim=1)
    assert rel_err(y_step, y_par) <= TOL[dtype]
    assert states_close(state, state_par, TOL[dtype])


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_selective_masking_and_gradients(backend):
    """Left padding stays invisible, and every parameter of the ablation (dt_bias, B, C included) is trained."""
    block = make_block(backend, selective=False)
    x = torch.randn(1, 8, block.d_model)
    padded = torch.cat([torch.randn(1, 3, block.d_model), x], dim=1).requires_grad_(True)
    mask = (torch.arange(11) >= 3)[None]
    y_pad = block(padded, mask=mask)
    assert rel_err(y_pad[:, 3:], block(x)) <= F32
    y_pad.square().sum().backward()
    names = {name for name, _ in block.named_parameters()}
    assert names == {"in_proj.weight", "conv1d.weight", "conv1d.bias", "dt_bias", "B", "C", "A_log", "D",
                     "out_proj.weight"}
    for name, p in block.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name
    dt = F.softplus(block.dt_bias)
    assert dt.min() >= 0.001 * (1 - 1e-5) and dt.max() <= 0.1 * (1 + 1e-5) and dt.std() > 0


@pytest.mark.skipif("torch" not in BACKENDS, reason="chunked scan backend not written yet")
def test_non_selective_torch_backend_matches_ref_forward_and_gradients():
    torch_block = make_block("torch", selective=False)
    ref_block = make_block("ref", selective=False)
    ref_block.load_state_dict(torch_block.state_dict())
    x = torch.randn(2, 70, torch_block.d_model)
    grad_out = torch.randn_like(x)
    outs = []
    for block in (torch_block, ref_block):
        y = block(x)
        (y * grad_out).sum().backward()
        outs.append((y, {name: p.grad for name, p in block.named_parameters()}))
    (y_t, g_t), (y_r, g_r) = outs
    assert rel_err(y_t, y_r) <= F32
    for name in g_r:
        assert rel_err(g_t[name], g_r[name]) <= GRAD_TOL[torch.float32], name


def test_selective_must_be_a_bool():
    with pytest.raises(ValueError, match="selective must be a bool"):
        MambaBlock(16, selective="no")


@pytest.mark.usefixtures("on_test_device")
@pytest.mark.parametrize("d_conv", [4, 10])  # 10: wider than the fused conv unrolls, so the block falls back
def test_triton_backend_matches_torch_backend_forward_gradients_and_steps(d_conv):
    """The block on its fused kernels (scan, conv + SiLU, decode step; the interpreter without a GPU) against the
    same weights on the PyTorch paths: forward, every gradient, a continued forward and decode steps."""
    torch.manual_seed(0)
    fused = make_block("triton", d_model=8, d_state=3, d_conv=d_conv)
    plain = make_block("torch", d_model=8, d_state=3, d_conv=d_conv)
    plain.load_state_dict(fused.state_dict())
    x = torch.randn(2, 11, 8, requires_grad=True)
    outs, grads = [], []
    for block in (fused, plain):
        y, state = block(x, state=block.allocate_state(2))
        params = [x] + list(block.parameters())
        grads.append(torch.autograd.grad(y.square().sum(), params))
        with torch.no_grad():
            y_more, state = block(torch.ones(2, 3, 8), state=state)  # continues from the carried state
            y_step, state = block.step(torch.ones(2, 8), state)
        outs.append((y, y_more, y_step, state.ssm_state, state.conv_state))
    for got, want in zip(outs[0], outs[1]):
        assert rel_err(got, want) <= F32
    for got, want in zip(*grads):
        assert rel_err(got, want) <= GRAD_TOL[torch.float32]


@pytest.mark.parametrize("backend", BACKENDS)
def test_autocast_bf16_matches_float32_and_trains_float32_weights(backend):
    """Under autocast the projections run in bf16 on float32 weights (cast once, not per batch row)."""
    block = make_block(backend, bias=True)
    x = torch.randn(3, 9, block.d_model)
    want = block(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = block(x)
    assert got.dtype == torch.bfloat16
    assert rel_err(got, want) <= TOL[torch.bfloat16]
    got.float().sum().backward()
    assert block.in_proj.weight.grad.dtype == torch.float32 and block.in_proj.weight.grad.abs().sum() > 0


def test_step_compiles_with_fullgraph():
    """A decode step (PyTorch path) compiles as one graph."""
    block = make_block("torch")
    x = torch.randn(2, block.d_model)
    compiled = torch.compile(block.step, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        eager_state, compiled_state = block.allocate_state(2), block.allocate_state(2)
        for _ in range(3):
            want, _ = block.step(x, eager_state)
            got, _ = compiled(x, compiled_state)
    assert torch.equal(got, want)
    assert torch.equal(compiled_state.ssm_state, eager_state.ssm_state)


@pytest.mark.usefixtures("on_test_device")
def test_block_on_fused_kernels_compiles_with_fullgraph():
    """Forward and backward of the block on the Triton custom ops (scan, conv + SiLU) trace as one graph."""
    block = make_block("triton", d_model=8, d_state=3)
    x = torch.randn(2, 9, 8, requires_grad=True)
    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    got, want = compiled(x), block(x)
    assert torch.equal(got, want)
    grad, want_grad = torch.autograd.grad(got.sum(), x)[0], torch.autograd.grad(want.sum(), x)[0]
    # Not bitwise: the traced backward may hand the projections' matmuls equal tensors in other layouts (their
    # summation order follows), and on CUDA the scan sums dB / dC with float32 atomics, in no fixed order.
    assert rel_err(grad, want_grad) <= (1e-6 if DEVICE == "cpu" else F32)
