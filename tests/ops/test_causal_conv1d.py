"""causal_conv1d_update: T one-token steps reproduce a causal depthwise conv1d over T tokens; the state shifts in
place; the fused Triton kernel (under the CPU interpreter without a GPU) matches the torch reference."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import mamba_r1.ops.causal_conv1d as conv_module
from mamba_r1.ops import causal_conv1d_update
from mamba_r1.ops.causal_conv1d import causal_conv1d_update_ref
from tests.conftest import TOL, rel_err

BACKENDS = ["torch", "triton"]


def make_inputs(batch, dim, width, dtype=torch.float32, param_dtype=torch.float32, with_bias=True):
    """x (batch, dim), conv_state (batch, dim, width - 1) in the activation dtype; weight, bias in param_dtype."""
    return dict(
        x=torch.randn(batch, dim, dtype=dtype),
        conv_state=torch.randn(batch, dim, width - 1, dtype=dtype),
        weight=torch.randn(dim, width, dtype=param_dtype),
        bias=torch.randn(dim, dtype=param_dtype) if with_bias else None,
    )


def conv1d_float64(x_seq, weight, bias, silu):
    """x_seq (batch, dim, seqlen) -> (batch, dim, seqlen): F.conv1d over the left-zero-padded sequence, in float64."""
    dim, width = weight.shape
    padded = F.pad(x_seq.double(), (width - 1, 0))
    out = F.conv1d(padded, weight.double()[:, None, :], None if bias is None else bias.double(), groups=dim)
    return F.silu(out) if silu else out


@pytest.mark.parametrize("dtype, param_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.float32),
                                                (torch.bfloat16, torch.bfloat16), (torch.float16, torch.float32)])
@settings(deadline=None, max_examples=20)
@given(
    batch=st.integers(1, 3),
    dim=st.sampled_from([1, 3, 5, 8, 13]),
    width=st.integers(1, 5),
    with_bias=st.booleans(),
    silu=st.booleans(),
)
def test_triton_matches_torch_reference(dtype, param_dtype, batch, dim, width, with_bias, silu):
    args = make_inputs(batch, dim, width, dtype, param_dtype, with_bias)
    results = []
    for backend in BACKENDS:
        state = args["conv_state"].clone()
        out = causal_conv1d_update(**{**args, "conv_state": state}, silu=silu, backend=backend)
        results.append((out, state))
    (ref_out, ref_state), (out, state) = results
    assert out.dtype == dtype and out.shape == (batch, dim)
    assert rel_err(out, ref_out) <= TOL[dtype]
    # The state only moves values (and stores x in the state's dtype): bit-equal.
    assert torch.equal(state, ref_state)
    assert torch.equal(state[..., -1:], args["x"][..., None]) or width == 1


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("width", [1, 2, 4])
@pytest.mark.parametrize("silu", [False, True])
def test_steps_match_causal_conv1d_over_the_sequence(backend, dtype, width, silu):
    batch, dim, seqlen = 2, 7, 6
    x_seq = torch.randn(batch, dim, seqlen, dtype=dtype)
    weight, bias = torch.randn(dim, width), torch.randn(dim)
    state = torch.zeros(batch, dim, width - 1, dtype=dtype)
    outs = [causal_conv1d_update(x_seq[..., t], state, weight, bias, silu=silu, backend=backend)
            for t in range(seqlen)]
    expected = conv1d_float64(x_seq, weight, bias, silu)
    assert rel_err(torch.stack(outs, dim=-1), expected) <= TOL[dtype]
    # The state holds the last width - 1 inputs, exactly.
    assert torch.equal(state, x_seq[..., seqlen - (width - 1):])


@pytest.mark.parametrize("backend", BACKENDS)
def test_state_is_shifted_in_place_through_a_strided_view(backend):
    """The block's layouts: x a chunk of in_proj's output, weight conv.weight[:, 0, :], the state a view."""
    batch, dim, width = 3, 9, 4
    x, _ = torch.randn(batch, 2 * dim).chunk(2, dim=-1)  # (batch, dim), row stride 2 * dim
    conv = torch.nn.Conv1d(dim, dim, kernel_size=width, groups=dim)
    buffer = torch.randn(batch, dim, 2 * (width - 1))
    before = buffer.clone()
    state = buffer[..., ::2]  # (batch, dim, width - 1), last stride 2
    ptr = state.data_ptr()
    with torch.no_grad():
        out = causal_conv1d_update(x, state, conv.weight[:, 0, :], conv.bias, silu=True, backend=backend)
    window = torch.cat([before[..., ::2], x[..., None]], dim=-1)  # (batch, dim, width)
    expected = F.silu((window.double() * conv.weight[:, 0, :].double()).sum(-1) + conv.bias.double())
    assert rel_err(out, expected) <= TOL[torch.float32]
    assert state.data_ptr() == ptr
    assert torch.equal(buffer[..., ::2], window[..., 1:])  # the base buffer holds the shifted state
    assert torch.equal(buffer[..., 1::2], before[..., 1::2])  # and nothing between its elements changed


def test_reference_is_what_the_kernel_is_tested_against():
    """The reference itself, on numbers worked by hand: width 3, state [1, 2], x 3, weight [1, 10, 100], bias 0.5."""
    state = torch.tensor([[[1.0, 2.0]]])
    out = causal_conv1d_update_ref(torch.tensor([[3.0]]), state, torch.tensor([[1.0, 10.0, 100.0]]),
                                   torch.tensor([0.5]))
    assert out.item() == 1 + 20 + 300 + 0.5
    assert state.tolist() == [[[2.0, 3.0]]]


def test_triton_backend_takes_the_torch_path_when_grad_is_needed(monkeypatch):
    """The kernel has no backward: with grad mode on and an input requiring grad, the differentiable path runs."""
    def no_kernel(*args, **kwargs):
        raise AssertionError("the Triton kernel ran")

    args = make_inputs(2, 5, 4)
    args["weight"].requires_grad_(True)
    expected = causal_conv1d_update(**{**args, "conv_state": args["conv_state"].clone()}, backend="torch")
    monkeypatch.setattr(conv_module, "_causal_conv1d_update_triton", no_kernel)
    out = causal_conv1d_update(**{**args, "conv_state": args["conv_state"].clone()}, backend="triton")
    assert out.requires_grad and torch.equal(out, expected)
    out.sum().backward()
    assert args["weight"].grad is not None
    with torch.no_grad(), pytest.raises(AssertionError, match="Triton kernel ran"):
        causal_conv1d_update(**args, backend="triton")
    causal_conv1d_update(**args, backend="auto")  # CPU tensors: auto is torch


def test_triton_on_cpu_without_the_interpreter_says_what_to_do(monkeypatch):
    monkeypatch.setattr(conv_module, "_interpreting", lambda: False)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        causal_conv1d_update(**make_inputs(2, 5, 4), backend="triton")


def _valid_args():
    return dict(x=torch.randn(2, 6), conv_state=torch.zeros(2, 6, 3), weight=torch.randn(6, 4), bias=torch.zeros(6))


@pytest.mark.parametrize("name, bad, error, words", [
    ("x", torch.randn(2, 6, 1), ValueError, "(batch, dim)"),
    ("x", torch.ones(2, 6, dtype=torch.int64), TypeError, "int64"),
    ("weight", torch.randn(5, 4), ValueError, "(dim, width)"),
    ("weight", torch.randn(6, 1, 4), ValueError, "(dim, width)"),
    ("weight", torch.randn(6, 0), ValueError, "width >= 1"),
    ("conv_state", torch.zeros(2, 6, 4), ValueError, "(batch, dim, width - 1)"),
    ("conv_state", torch.zeros(3, 6, 3), ValueError, "(2, 6, 3)"),
    ("conv_state", torch.zeros(2, 6, 3, dtype=torch.int32), TypeError, "int32"),
    ("bias", torch.zeros(5), ValueError, "(dim,)"),
    ("silu", 1, TypeError, "bool"),
    ("backend", "cuda", ValueError, "backend must be one of"),
    ("conv_state", torch.zeros(2, 6, 3, device="meta"), ValueError, "device"),
])
def test_bad_inputs_raise_naming_the_argument(name, bad, error, words):
    args = _valid_args()
    args[name] = bad
    with pytest.raises(error) as info:
        causal_conv1d_update(**args)
    assert name in str(info.value) and words in str(info.value)
