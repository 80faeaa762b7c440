"""selective_state_update: T one-token steps reproduce the sequential scan over T tokens; state updated in place;
the fused Triton kernel (under the CPU interpreter without a GPU) matches the torch reference."""

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import mamba_r1.ops.state_update as state_update_module
from mamba_r1.ops import selective_scan_ref, selective_state_update
from mamba_r1.ops.selective_scan.ref import selective_scan_ref_float64
from mamba_r1.ops.state_update import selective_state_update_ref
from tests.conftest import DEVICE, GRAD_TOL, TOL, rel_err


@pytest.fixture(autouse=True, scope="module")
def _tensors_on_test_device():
    """Every tensor these tests create lands on the test device: the GPU when there is one, where backend="triton"
    runs the compiled kernel, else the CPU (and the interpreter)."""
    with torch.device(DEVICE):
        yield


def make_inputs(batch, dim, seqlen, d_state, groups=0, dtype=torch.float32, with_D=True, with_z=True,
                with_bias=True):
    """Scan-layout inputs (seqlen last) in Mamba's ranges; A = -(1..d_state) jittered, softplus(delta) ~ 0.05."""
    bc_shape = (batch, d_state, seqlen) if groups == 0 else (batch, groups, d_state, seqlen)
    return dict(
        u=torch.randn(batch, dim, seqlen, dtype=dtype),
        delta=(0.5 * torch.randn(batch, dim, seqlen) + math.log(math.expm1(0.05))).to(dtype),
        A=-(torch.arange(1, d_state + 1, dtype=torch.float32).repeat(dim, 1) * (0.5 + torch.rand(dim, d_state))),
        B=torch.randn(*bc_shape, dtype=dtype),
        C=torch.randn(*bc_shape, dtype=dtype),
        D=torch.randn(dim) if with_D else None,
        z=torch.randn(batch, dim, seqlen, dtype=dtype) if with_z else None,
        delta_bias=0.1 * torch.randn(dim) if with_bias else None,
        initial_state=torch.randn(batch, dim, d_state),
    )


def run_steps(args, delta_softplus, backend="auto"):
    """Feed the scan-layout inputs one token at a time; returns (out (batch, dim, seqlen), final state)."""
    state = args["initial_state"].clone()
    outs = []
    for t in range(args["u"].shape[-1]):
        outs.append(selective_state_update(
            state, args["u"][..., t], args["delta"][..., t], args["A"], args["B"][..., t], args["C"][..., t],
            D=args["D"], z=None if args["z"] is None else args["z"][..., t], dt_bias=args["delta_bias"],
            dt_softplus=delta_softplus, backend=backend))
    return torch.stack(outs, dim=-1), state


def _groups_for(dim, pick):
    divisors = [g for g in (1, 2, 3, 4) if dim % g == 0]
    return 0 if pick == 0 else divisors[pick % len(divisors)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@settings(deadline=None, max_examples=25)
@given(
    batch=st.integers(1, 3),
    dim=st.sampled_from([1, 3, 6, 12]),
    seqlen=st.sampled_from([1, 2, 7, 13]),
    d_state=st.sampled_from([1, 4, 5, 16]),
    group_pick=st.integers(0, 3),
    with_D=st.booleans(),
    with_z=st.booleans(),
    with_bias=st.booleans(),
    softplus=st.booleans(),
)
def test_steps_match_sequential_scan(dtype, batch, dim, seqlen, d_state, group_pick, with_D, with_z, with_bias,
                                     softplus):
    args = make_inputs(batch, dim, seqlen, d_state, _groups_for(dim, group_pick), dtype, with_D, with_z, with_bias)
    if not softplus:
        args["delta"] = args["delta"].float().exp().to(dtype)  # positive step sizes without the softplus
    out, state = run_steps(args, softplus)
    ref_out, ref_state = selective_scan_ref(**args, delta_softplus=softplus, return_last_state=True)
    out64, state64 = selective_scan_ref_float64(**args, delta_softplus=softplus, return_last_state=True)
    assert out.dtype == dtype and state.dtype == torch.float32
    # Same arithmetic as the reference's loop body: the float32 state agrees to float32 rounding in every dtype.
    assert rel_err(out, ref_out) <= TOL[dtype]
    assert rel_err(state, ref_state) <= TOL[torch.float32]
    assert rel_err(out, out64) <= TOL[dtype]
    assert rel_err(state, state64) <= TOL[torch.float32]


def test_bf16_outputs_equal_reference_rounding():
    args = make_inputs(2, 8, 9, 16, groups=2, dtype=torch.bfloat16)
    out, _ = run_steps(args, True)
    ref_out = selective_scan_ref(**args, delta_softplus=True)
    # Both round the same float32 value to bf16; allow one-ulp disagreements from float32 reassociation only.
    assert rel_err(out, ref_out) <= TOL[torch.bfloat16]
    assert (out == ref_out).float().mean() > 0.95


def test_state_is_updated_in_place():
    args = make_inputs(2, 4, 1, 8)
    state = args["initial_state"].clone()
    ptr = state.data_ptr()
    before = state.clone()
    selective_state_update(state, args["u"][..., 0], args["delta"][..., 0], args["A"], args["B"][..., 0],
                           args["C"][..., 0], dt_softplus=True)
    assert state.data_ptr() == ptr
    assert not torch.equal(state, before)
    _, expected = selective_scan_ref(**{**args, "D": None, "z": None, "delta_bias": None, "initial_state": before},
                                     delta_softplus=True, return_last_state=True)
    assert rel_err(state, expected) <= TOL[torch.float32]


def test_zero_dt_leaves_state_unchanged():
    args = make_inputs(2, 6, 1, 4)
    state = args["initial_state"].clone()
    selective_state_update(state, args["u"][..., 0], torch.zeros(2, 6), args["A"], args["B"][..., 0],
                           args["C"][..., 0])
    assert torch.equal(state, args["initial_state"])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("groups", [0, 3])
def test_one_step_gradients_match_sequential_scan(dtype, groups):
    # One step only: each step overwrites the state that the previous step's backward saved (see the op's docstring).
    args = make_inputs(3, 6, 1, 4, groups=groups, dtype=dtype)
    leaves = {k: t.requires_grad_(True) for k, t in args.items() if k != "initial_state"}
    grad_out = torch.randn(3, 6, 1)

    out, _ = run_steps(args, True)
    (out.float() * grad_out).sum().backward()
    got = {k: t.grad.clone() for k, t in leaves.items()}
    ref64 = {k: (None if t is None else t.detach().double().requires_grad_(k != "initial_state"))
             for k, t in args.items()}
    (selective_scan_ref(**ref64, delta_softplus=True) * grad_out.double()).sum().backward()
    for name, t in leaves.items():
        assert rel_err(got[name], ref64[name].grad) <= GRAD_TOL[dtype], name


def _valid_step_args():
    batch, dim, d_state = 2, 6, 4
    return dict(state=torch.zeros(batch, dim, d_state), x=torch.randn(batch, dim), dt=torch.rand(batch, dim),
                A=-torch.ones(dim, d_state), B=torch.randn(batch, d_state), C=torch.randn(batch, d_state),
                D=torch.ones(dim), z=torch.randn(batch, dim), dt_bias=torch.zeros(dim))


@pytest.mark.parametrize("name, bad, error, words", [
    ("state", torch.zeros(2, 6, 4, dtype=torch.bfloat16), TypeError, "float32"),
    ("state", torch.zeros(2, 6), ValueError, "(batch, dim, d_state)"),
    ("x", torch.randn(2, 5), ValueError, "(batch, dim)"),
    ("x", torch.ones(2, 6, dtype=torch.int64), TypeError, "int64"),
    ("dt", torch.randn(3, 6), ValueError, "(batch, dim)"),
    ("A", torch.randn(6, 5), ValueError, "(dim, d_state)"),
    ("B", torch.randn(2, 4, 4), ValueError, "groups"),
    ("B", torch.randn(2, 5), ValueError, "(batch, d_state)"),
    ("C", torch.randn(2, 2, 4, 1), ValueError, "(batch, groups, d_state)"),
    ("D", torch.randn(5), ValueError, "(dim,)"),
    ("dt_bias", torch.randn(6, 1), ValueError, "(dim,)"),
    ("z", torch.randn(2, 7), ValueError, "(batch, dim)"),
    ("x", torch.randn(2, 6, device="meta"), ValueError, "device"),
])
def test_bad_inputs_raise_naming_the_argument(name, bad, error, words):
    args = _valid_step_args()
    args[name] = bad
    with pytest.raises(error) as info:
        selective_state_update(**args)
    assert name in str(info.value) and words in str(info.value)


# ---------------------------------------------------------------- the fused Triton kernel against the torch reference


def make_step_inputs(batch, dim, d_state, groups_B=0, groups_C=0, dtype=torch.float32, param_dtype=torch.float32,
                     with_D=True, with_z=True, with_bias=True):
    """One token's inputs; groups 0 = (batch, d_state) B/C. Parameters (A, D, dt_bias) in their own dtype."""
    def bc(groups):
        shape = (batch, d_state) if groups == 0 else (batch, groups, d_state)
        return torch.randn(*shape, dtype=dtype)

    return dict(
        state=torch.randn(batch, dim, d_state),
        x=torch.randn(batch, dim, dtype=dtype),
        dt=(0.5 * torch.randn(batch, dim) + math.log(math.expm1(0.05))).to(dtype),
        A=(-(torch.arange(1, d_state + 1).repeat(dim, 1) * (0.5 + torch.rand(dim, d_state)))).to(param_dtype),
        B=bc(groups_B),
        C=bc(groups_C),
        D=torch.randn(dim, dtype=param_dtype) if with_D else None,
        z=torch.randn(batch, dim, dtype=dtype) if with_z else None,
        dt_bias=(0.1 * torch.randn(dim)).to(param_dtype) if with_bias else None,
    )


def both_backends(args, dt_softplus):
    """Run the torch reference and the Triton kernel on copies of one state: ((out, state) ref, (out, state) triton)."""
    results = []
    for backend in ("torch", "triton"):
        state = args["state"].clone()
        out = selective_state_update(**{**args, "state": state}, dt_softplus=dt_softplus, backend=backend)
        results.append((out, state))
    return results


@pytest.mark.parametrize("dtype, param_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.float32),
                                                (torch.bfloat16, torch.bfloat16), (torch.float16, torch.float32)])
@settings(deadline=None, max_examples=20)
@given(
    batch=st.integers(1, 3),
    dim=st.sampled_from([1, 5, 6, 12, 15]),
    d_state=st.sampled_from([1, 3, 4, 16, 17]),
    group_pick_B=st.integers(0, 3),
    group_pick_C=st.integers(0, 3),
    with_D=st.booleans(),
    with_z=st.booleans(),
    with_bias=st.booleans(),
    softplus=st.booleans(),
)
def test_triton_matches_torch_reference(dtype, param_dtype, batch, dim, d_state, group_pick_B, group_pick_C, with_D,
                                        with_z, with_bias, softplus):
    args = make_step_inputs(batch, dim, d_state, _groups_for(dim, group_pick_B), _groups_for(dim, group_pick_C),
                            dtype, param_dtype, with_D, with_z, with_bias)
    if not softplus:
        args["dt"] = args["dt"].float().exp().to(dtype)  # positive step sizes without the softplus
    (ref_out, ref_state), (out, state) = both_backends(args, softplus)
    assert out.dtype == dtype and out.shape == (batch, dim)
    # The float32 state sees the same operations in both: float32 rounding only. A half output rounds the same
    # float32 value, give or take one ulp where the float32 values straddle a rounding boundary.
    assert rel_err(state, ref_state) <= TOL[torch.float32]
    assert rel_err(out, ref_out) <= TOL[dtype]


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("param_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("dim, d_state", [(5, 3), (12, 16)])
def test_A_is_log_equals_passing_minus_exp_of_it(backend, param_dtype, dim, d_state):
    """A_is_log=True with A_log gives what A = -exp(A_log), computed in float32, gives (a Mamba block's decode)."""
    args = make_step_inputs(2, dim, d_state, 0, 0, torch.bfloat16, param_dtype)
    A_log = torch.log(-args["A"].float()).to(param_dtype)
    want_state = args["state"].clone()
    want = selective_state_update(**{**args, "state": want_state, "A": -torch.exp(A_log.float())}, dt_softplus=True,
                                  backend=backend)
    state = args["state"].clone()
    got = selective_state_update(**{**args, "state": state, "A": A_log}, dt_softplus=True, backend=backend,
                                 A_is_log=True)
    assert rel_err(state, want_state) <= TOL[torch.float32]
    assert rel_err(got, want) <= TOL[torch.bfloat16]
    assert rel_err(state, args["state"]) > 1e-3  # the step did move the state


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("dim, dt_rank", [(5, 1), (12, 3), (40, 48)])
def test_dt_weight_equals_projecting_dt_first(backend, dtype, dim, dt_rank):
    """dt_weight (a block's dt_proj) applied inside the step == F.linear in float32 first, then the step."""
    args = make_step_inputs(3, dim, 4, 0, 2 if dim % 2 == 0 else 0, dtype)
    dt_low = torch.randn(3, dt_rank, dtype=dtype)
    dt_weight = (torch.randn(dim, dt_rank) / dt_rank ** 0.5).to(dtype)
    want_state = args["state"].clone()
    want = selective_state_update(**{**args, "state": want_state, "dt": F.linear(dt_low.float(), dt_weight.float())},
                                  dt_softplus=True, backend=backend)
    state = args["state"].clone()
    got = selective_state_update(**{**args, "state": state, "dt": dt_low}, dt_softplus=True, backend=backend,
                                 dt_weight=dt_weight)
    assert rel_err(state, want_state) <= TOL[torch.float32]
    assert rel_err(got, want) <= TOL[dtype]
    assert rel_err(state, args["state"]) > 1e-3


def test_dt_weight_shapes_are_checked():
    args = make_step_inputs(2, 6, 4)
    with pytest.raises(ValueError, match=r"dt_weight must be \(dim, dt_rank\) with dim=6"):
        selective_state_update(**args, dt_weight=torch.randn(5, 3))
    with pytest.raises(ValueError, match=r"dt must be \(batch, dt_rank\) when dt_weight is given"):
        selective_state_update(**args, dt_weight=torch.randn(6, 3))  # dt is still (batch, dim)


@settings(deadline=None, max_examples=6)
@given(seqlen=st.sampled_from([1, 2, 7]), d_state=st.sampled_from([4, 16]), softplus=st.booleans())
def test_triton_steps_match_sequential_scan(seqlen, d_state, softplus):
    args = make_inputs(2, 6, seqlen, d_state, groups=3)
    if not softplus:
        args["delta"] = args["delta"].exp()
    out, state = run_steps(args, softplus, backend="triton")
    out64, state64 = selective_scan_ref_float64(**args, delta_softplus=softplus, return_last_state=True)
    assert rel_err(out, out64) <= TOL[torch.float32]
    assert rel_err(state, state64) <= TOL[torch.float32]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_triton_reads_strided_views_and_updates_a_strided_state_in_place(dtype):
    """The block's own layouts: B, C, x, z are views into projection outputs, the state a view into a bigger buffer."""
    batch, dim, d_state, dt_rank = 3, 10, 5, 2
    x_dbl = torch.randn(batch, dt_rank + 2 * d_state, dtype=dtype)  # x_proj's output
    _, B, C = x_dbl.split([dt_rank, d_state, d_state], dim=-1)  # (batch, d_state) views, row stride 12
    x, z = torch.randn(batch, 2 * dim, dtype=dtype).chunk(2, dim=-1)  # (batch, dim) views, row stride 20
    args = dict(x=x, dt=torch.rand(batch, dim, dtype=dtype) - 1.0, A=-torch.rand(d_state, dim).t(), B=B, C=C,
                D=torch.randn(dim), z=z, dt_bias=torch.randn(dim))
    buffers = [torch.randn(batch, dim, 2 * d_state) for _ in range(2)]
    buffers[1].copy_(buffers[0])
    ref_state, state = (buf[..., 1::2] for buf in buffers)  # (batch, dim, d_state), state stride 2
    ref_out = selective_state_update(ref_state, **args, dt_softplus=True, backend="torch")
    out = selective_state_update(state, **args, dt_softplus=True, backend="triton")
    assert out.dtype == dtype
    assert rel_err(out, ref_out) <= TOL[torch.bfloat16 if dtype == torch.bfloat16 else torch.float32]
    assert rel_err(buffers[1], buffers[0]) <= TOL[torch.float32]  # the view's base holds the new state
    assert torch.equal(buffers[1][..., 0::2], buffers[0][..., 0::2])  # and nothing between its elements changed


def test_triton_state_is_updated_in_place():
    args = make_step_inputs(2, 7, 3)
    state = args["state"].clone()
    ptr, before = state.data_ptr(), state.clone()
    selective_state_update(**{**args, "state": state}, dt_softplus=True, backend="triton")
    assert state.data_ptr() == ptr and not torch.equal(state, before)
    expected = before.clone()
    selective_state_update_ref(**{**args, "state": expected}, dt_softplus=True)
    assert rel_err(state, expected) <= TOL[torch.float32]


def test_triton_backend_takes_the_torch_path_when_grad_is_needed(monkeypatch):
    """The kernel has no backward: with grad mode on and an input requiring grad, the differentiable path runs."""
    def no_kernel(*args, **kwargs):
        raise AssertionError("the Triton kernel ran")

    args = make_step_inputs(2, 6, 4)
    args["dt_bias"].requires_grad_(True)
    expected = selective_state_update(**{**args, "state": args["state"].clone()}, dt_softplus=True, backend="torch")
    monkeypatch.setattr(state_update_module, "_state_update_triton", no_kernel)
    out = selective_state_update(**{**args, "state": args["state"].clone()}, dt_softplus=True, backend="triton")
    assert out.requires_grad and torch.equal(out, expected)
    out.sum().backward()
    assert args["dt_bias"].grad is not None
    with torch.no_grad(), pytest.raises(AssertionError, match="Triton kernel ran"):
        selective_state_update(**args, dt_softplus=True, backend="triton")


@pytest.mark.skipif(DEVICE != "cpu", reason="checks the CPU dispatch")
def test_auto_backend_runs_torch_on_cpu(monkeypatch):
    def no_kernel(*args, **kwargs):
        raise AssertionError("the Triton kernel ran")

    monkeypatch.setattr(state_update_module, "_state_update_triton", no_kernel)
    selective_state_update(**make_step_inputs(2, 6, 4))


def test_bad_backend_raises_naming_the_choices():
    with pytest.raises(ValueError, match="backend must be one of"):
        selective_state_update(**_valid_step_args(), backend="cuda")


@pytest.mark.skipif(DEVICE != "cpu", reason="checks the CPU path without the interpreter")
def test_triton_on_cpu_without_the_interpreter_says_what_to_do(monkeypatch):
    monkeypatch.setattr(state_update_module, "_interpreting", lambda: False)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        selective_state_update(**_valid_step_args(), backend="triton")
