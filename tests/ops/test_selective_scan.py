"""selective_scan: the sequential reference against float64, the chunked backend against the reference, bad input.

The Triton backend has its own file (test_selective_scan_triton.py): it runs under the slow CPU interpreter.
"""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mamba_r1.ops import selective_scan, selective_scan_ref
from mamba_r1.ops.selective_scan.chunked import selective_scan_chunked
from mamba_r1.ops.selective_scan.ref import selective_scan_ref_float64
from tests.conftest import GRAD_TOL, TOL, rel_err


def make_inputs(batch, dim, seqlen, d_state, groups=0, dtype=torch.float32, with_D=True, with_z=True,
                with_bias=True, with_state=False, requires_grad=False, dt_mean=0.05):
    """Random inputs in Mamba's ranges: A = -(1..d_state) jittered, dt from softplus around the paper's init."""
    bc_shape = (batch, d_state, seqlen) if groups == 0 else (batch, groups, d_state, seqlen)
    args = dict(
        u=torch.randn(batch, dim, seqlen, dtype=dtype),
        delta=(0.5 * torch.randn(batch, dim, seqlen) + math.log(math.expm1(dt_mean))).to(dtype),  # softplus ~ dt_mean
        A=-(torch.arange(1, d_state + 1, dtype=torch.float32).repeat(dim, 1) * (0.5 + torch.rand(dim, d_state))),
        B=torch.randn(*bc_shape, dtype=dtype),
        C=torch.randn(*bc_shape, dtype=dtype),
        D=torch.randn(dim) if with_D else None,
        z=torch.randn(batch, dim, seqlen, dtype=dtype) if with_z else None,
        delta_bias=0.1 * torch.randn(dim) if with_bias else None,
        initial_state=torch.randn(batch, dim, d_state) if with_state else None,
    )
    if requires_grad:
        for t in args.values():
            if t is not None:
                t.requires_grad_(True)
    return args


def grads_of(fn, args, grad_out, **kwargs):
    """Run fn, backprop grad_out (and a random projection of the last state), return the gradients by name."""
    for t in args.values():
        if t is not None:
            t.grad = None
    out, last = fn(**args, **kwargs, return_last_state=True)
    loss = (out.float() * grad_out).sum() + (last.float() * torch.linspace(-1, 1, last.numel()).view_as(last)).sum()
    loss.backward()
    return {k: t.grad.clone() for k, t in args.items() if t is not None}


def float64_copy(args):
    return {k: (None if t is None else t.detach().double().requires_grad_(True)) for k, t in args.items()}


shapes = st.tuples(
    st.integers(1, 3),  # batch
    st.sampled_from([1, 3, 8, 12]),  # dim
    st.sampled_from([1, 2, 7, 31, 64, 97, 130]),  # seqlen: 1, primes, one past a chunk, not multiples of CHUNK_L
    st.sampled_from([1, 4, 16, 33]),  # d_state
)


def _groups_for(dim, pick):
    divisors = [g for g in (1, 2, 3, 4) if dim % g == 0]
    return 0 if pick == 0 else divisors[pick % len(divisors)]


@pytest.mark.parametrize("seqlen", [1, 5, 40])
def test_ref_matches_float64_reference(seqlen):
    args = make_inputs(2, 6, seqlen, 8, groups=2, with_state=True)
    out, last = selective_scan_ref(**args, delta_softplus=True, return_last_state=True)
    out64, last64 = selective_scan_ref_float64(**args, delta_softplus=True, return_last_state=True)
    assert out.dtype == torch.float32 and last.dtype == torch.float32
    assert rel_err(out, out64) <= TOL[torch.float32]
    assert rel_err(last, last64) <= TOL[torch.float32]


def test_ref_matches_closed_form_for_constant_inputs():
    # One channel, one state: h_t = a h_{t-1} + b with a = exp(dt*A), b = dt*B*u has a geometric closed form.
    dt, A_val, B_val, u_val, T = 0.3, -0.7, 1.5, 2.0, 9
    u = torch.full((1, 1, T), u_val, dtype=torch.float64)
    delta = torch.full((1, 1, T), dt, dtype=torch.float64)
    A = torch.tensor([[A_val]], dtype=torch.float64)
    B = torch.full((1, 1, T), B_val, dtype=torch.float64)
    C = torch.ones(1, 1, T, dtype=torch.float64)
    out = selective_scan_ref(u, delta, A, B, C)
    a, b = math.exp(dt * A_val), dt * B_val * u_val
    expected = torch.tensor([b * (1 - a ** (t + 1)) / (1 - a) for t in range(T)], dtype=torch.float64)
    torch.testing.assert_close(out.flatten(), expected)


@settings(deadline=None, max_examples=25)
@given(shape=shapes, group_pick=st.integers(0, 3), flags=st.tuples(*[st.booleans()] * 5), seed=st.integers(0, 2**31))
def test_chunked_matches_reference_float32(shape, group_pick, flags, seed):
    torch.manual_seed(seed)
    batch, dim, seqlen, d_state = shape
    with_D, with_z, with_bias, with_state, softplus = flags
    args = make_inputs(batch, dim, seqlen, d_state, groups=_groups_for(dim, group_pick), with_D=with_D,
                       with_z=with_z, with_bias=with_bias, with_state=with_state)
    if not softplus:  # the recurrence is only meaningful for dt > 0: hand it positive steps directly
        args["delta"] = torch.nn.functional.softplus(args["delta"])
        if with_bias:
            args["delta_bias"] = args["delta_bias"].abs()
    out, last = selective_scan(**args, delta_softplus=softplus, return_last_state=True, backend="torch")
    ref, ref_last = selective_scan_ref_float64(**args, delta_softplus=softplus, return_last_state=True)
    assert out.shape == (batch, dim, seqlen) and out.dtype == torch.float32
    assert last.shape == (batch, dim, d_state) and last.dtype == torch.float32
    assert rel_err(out, ref) <= TOL[torch.float32]
    assert rel_err(last, ref_last) <= TOL[torch.float32]


@settings(deadline=None, max_examples=10)
@given(shape=shapes, group_pick=st.integers(0, 3), seed=st.integers(0, 2**31))
def test_chunked_matches_reference_bf16(shape, group_pick, seed):
    torch.manual_seed(seed)
    batch, dim, seqlen, d_state = shape
    args = make_inputs(batch, dim, seqlen, d_state, groups=_groups_for(dim, group_pick), dtype=torch.bfloat16)
    out = selective_scan(**args, delta_softplus=True, backend="torch")
    ref = selective_scan_ref_float64(**args, delta_softplus=True)
    assert out.dtype == torch.bfloat16
    assert rel_err(out, ref) <= TOL[torch.bfloat16]


@settings(deadline=None, max_examples=12)
@given(shape=shapes, group_pick=st.integers(0, 3), dtype=st.sampled_from([torch.float32, torch.bfloat16]),
       seed=st.integers(0, 2**31))
def test_chunked_gradients_match_reference(shape, group_pick, dtype, seed):
    torch.manual_seed(seed)
    batch, dim, seqlen, d_state = shape
    args = make_inputs(batch, dim, seqlen, d_state, groups=_groups_for(dim, group_pick), dtype=dtype,
                       with_state=True, requires_grad=True)
    grad_out = torch.randn(batch, dim, seqlen)
    got = grads_of(selective_scan_chunked, args, grad_out, delta_softplus=True)
    want = grads_of(selective_scan_ref, float64_copy(args), grad_out.double(), delta_softplus=True)
    for name in want:
        assert got[name].dtype == args[name].dtype, name
        if name == "delta_bias":
            # A sum over batch and time of delta's gradient (exactly: dt = delta + bias[:, None]); its rounding error
            # scales with the terms' magnitudes, and where they cancel (bf16, one channel, 6 terms: 2.2% of the
            # sum, found by hypothesis) the sum's own norm understates it.
            scale = max(want[name].norm().item(), want["delta"].abs().sum(dim=(0, 2)).norm().item())
            err = (got[name].double() - want[name]).norm().item() / scale
        else:
            err = rel_err(got[name], want[name])
        assert err <= GRAD_TOL[dtype], name


def test_chunked_is_stable_when_decay_is_steep():
    # dt around 20 with |A| up to 32: a chunk's total log-decay is in the thousands; the chunk splitter must keep it
    # finite and exact.
    args = make_inputs(2, 4, 150, 32, with_state=True, dt_mean=20.0)
    out, last = selective_scan(**args, delta_softplus=True, return_last_state=True, backend="torch")
    ref, ref_last = selective_scan_ref_float64(**args, delta_softplus=True, return_last_state=True)
    assert torch.isfinite(out).all()
    assert rel_err(out, ref) <= TOL[torch.float32]
    assert rel_err(last, ref_last) <= TOL[torch.float32]


def test_chunked_bf16_long_sequence_is_finite():
    args = make_inputs(1, 8, 4096, 16, dtype=torch.bfloat16)
    out = selective_scan(**args, delta_softplus=True, backend="torch")
    assert torch.isfinite(out).all()
    assert rel_err(out, selective_scan_ref_float64(**args, delta_softplus=True)) <= TOL[torch.bfloat16]


def test_chunked_backward_saves_no_per_step_states():
    # With grad, only O(batch*dim*seqlen) tensors may be kept for backward: nothing with a d_state * seqlen factor.
    batch, dim, seqlen, d_state = 1, 4, 512, 16
    args = make_inputs(batch, dim, seqlen, d_state, requires_grad=True)
    largest = []

    def pack(t):
        largest.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = selective_scan(**args, delta_softplus=True, backend="torch")
    assert max(largest) < batch * dim * seqlen * 4  # a (batch, dim, seqlen, d_state) tensor would be 16x this
    out.sum().backward()
    assert args["A"].grad is not None and torch.isfinite(args["A"].grad).all()


def test_auto_backend_uses_torch_on_cpu():
    args = make_inputs(1, 4, 20, 4)
    torch.testing.assert_close(selective_scan(**args, delta_softplus=True, backend="auto"),
                               selective_scan(**args, delta_softplus=True, backend="torch"))


# --- bad input: one test per case, each error names the argument ---------------------------------------------------

def _good():
    return make_inputs(2, 6, 10, 4, groups=0, with_state=True)


@pytest.mark.parametrize("name, bad, match", [
    ("u", torch.randn(2, 6), r"u must be \(batch, dim, seqlen\)"),
    ("u", torch.randn(2, 6, 0), r"u must have seqlen >= 1"),
    ("delta", torch.randn(2, 6, 11), r"delta must be \(batch, dim, seqlen\)"),
    ("A", torch.randn(5, 4), r"A must be \(dim, d_state\) with dim=6"),
    ("A", torch.randn(6), r"A must be \(dim, d_state\)"),
    ("B", torch.randn(2, 3, 10), r"B must be \(batch, d_state, seqlen\)"),
    ("B", torch.randn(2, 4), r"B must be \(batch, d_state, seqlen\) or \(batch, groups, d_state, seqlen\)"),
    ("C", torch.randn(3, 4, 10), r"C must be \(batch, d_state, seqlen\)"),
    ("B", torch.randn(2, 4, 4, 10), r"B has 4 groups, which must divide dim=6"),
    ("C", torch.randn(2, 2, 4, 9), r"C must be \(batch, groups, d_state, seqlen\)"),
    ("D", torch.randn(5), r"D must be \(dim,\)"),
    ("delta_bias", torch.randn(6, 1), r"delta_bias must be \(dim,\)"),
    ("z", torch.randn(2, 6, 9), r"z must be \(batch, dim, seqlen\)"),
    ("initial_state", torch.randn(2, 6, 5), r"initial_state must be \(batch, dim, d_state\)"),
])
def test_bad_shape_raises_value_error_naming_argument(name, bad, match):
    args = _good()
    args[name] = bad
    with pytest.raises(ValueError, match=match):
        selective_scan(**args)


@pytest.mark.parametrize("name", ["u", "delta", "A", "B", "C", "D", "z", "delta_bias", "initial_state"])
def test_integer_dtype_raises_type_error_naming_argument(name):
    args = _good()
    args[name] = args[name].to(torch.int32)
    with pytest.raises(TypeError, match=rf"{name} must be a real floating-point tensor .* got dtype torch.int32"):
        selective_scan(**args)


def test_complex_A_raises_type_error():
    args = _good()
    args["A"] = args["A"].to(torch.complex64)
    with pytest.raises(TypeError, match=r"A must be a real floating-point tensor"):
        selective_scan(**args)


def test_non_tensor_raises_type_error():
    args = _good()
    args["B"] = args["B"].tolist()
    with pytest.raises(TypeError, match=r"B must be a torch.Tensor; got list"):
        selective_scan(**args)


def test_tensors_on_different_devices_raise():
    args = _good()
    args["D"] = args["D"].to("meta")
    with pytest.raises(ValueError, match=r"D is on meta but u is on cpu"):
        selective_scan(**args)


def test_unknown_backend_raises():
    with pytest.raises(ValueError, match=r"backend must be one of .* got 'cuda'"):
        selective_scan(**_good(), backend="cuda")
