"""causal_conv1d (training): the fused Triton forward and backward match the float64 reference on every input
layout, the custom ops pass opcheck and compile with fullgraph=True. causal_conv1d_update (decode): T one-token
steps reproduce a causal depthwise conv1d over T tokens; the state shifts in place; the fused kernel matches the
torch reference. Without a GPU the kernels run under Triton's CPU interpreter, with blocks of 2 channels x 4 time
steps (4 x 2 in the backward's second pass), so these small shapes cross block edges."""

import importlib
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from mamba_r1.ops import causal_conv1d, causal_conv1d_ref, causal_conv1d_update
from mamba_r1.ops.causal_conv1d import MAX_TRITON_WIDTH, causal_conv1d_update_ref
from tests.conftest import DEVICE, GRAD_TOL, TOL, autograd_node_names, rel_err

# `import mamba_r1.ops.causal_conv1d as m` would bind the function that mamba_r1.ops re-exports under that name.
conv_module = importlib.import_module("mamba_r1.ops.causal_conv1d")

BACKENDS = ["torch", "triton"]


@pytest.fixture(autouse=True, scope="module")
def _tensors_on_test_device():
    """Every tensor these tests create lands on the test device: the GPU when there is one, where backend="triton"
    runs the compiled kernels, else the CPU (and the interpreter)."""
    with torch.device(DEVICE):
        yield


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


def test_eager_calls_skip_the_dispatcher_with_the_same_results(monkeypatch):
    """Eagerly the triton conv runs its custom ops' bodies under a plain autograd.Function; traced, the custom ops.
    Same kernels: output and every gradient equal bit for bit, and only the eager graph has the plain node."""
    from mamba_r1.ops import eager_custom_ops

    gen = torch.Generator().manual_seed(0)
    # device="cpu": the GPU suite makes CUDA the default device, and a CPU generator cannot draw there.
    leaves = [torch.randn(*shape, generator=gen, device="cpu").to(DEVICE)
              for shape in ((2, 6, 13), (6, 4), (6,), (2, 6, 3))]
    cotangent = torch.randn(2, 6, 13, generator=gen, device="cpu").to(DEVICE)
    results = []
    for traced in (False, True):
        monkeypatch.setattr(eager_custom_ops, "tracing", lambda: traced)
        x, weight, bias, init = [t.clone().requires_grad_() for t in leaves]
        out = causal_conv1d(x, weight, bias, silu=True, initial_state=init, backend="triton")
        names = autograd_node_names(out)
        grads = torch.autograd.grad((out * cotangent).sum(), [x, weight, bias, init])
        results.append((names, [out.detach(), *grads]))
    (eager_names, eager), (traced_names, traced) = results
    assert "_CausalConv1dEagerBackward" in eager_names
    assert "_CausalConv1dEagerBackward" not in traced_names
    for got, want in zip(eager, traced):
        assert torch.equal(got, want)


@pytest.mark.skipif(DEVICE != "cpu", reason="checks the CPU path without the interpreter")
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


# ================================================================================ causal_conv1d: whole sequence

LAYOUTS = ("contiguous", "channel_slice", "permuted_batch", "time_major")


def strided_x(batch, dim, seqlen, layout, dtype):
    """(base, x): a leaf tensor ``base`` and x (batch, dim, seqlen) a view of it in the given memory layout."""
    if layout == "contiguous":
        base = torch.randn(batch, dim, seqlen, dtype=dtype)
        return base, base
    if layout == "channel_slice":  # the block's x_in: one chunk of in_proj's (batch, 2 * dim, seqlen) output
        base = torch.randn(batch, 2 * dim + 1, seqlen, dtype=dtype)
        return base, base[:, 1:dim + 1]
    if layout == "permuted_batch":  # mamba-ssm's (dim, batch, seqlen) buffer: batch stride < dim stride
        base = torch.randn(2 * dim, batch, seqlen, dtype=dtype)
        return base, base.permute(1, 0, 2)[:, dim:]
    base = torch.randn(batch, seqlen, dim, dtype=dtype)  # time_major: time stride dim, still no copy
    return base, base.transpose(1, 2)


def seq_inputs(batch, dim, seqlen, width, layout="contiguous", dtype=torch.float32, param_dtype=torch.float32,
               with_bias=True, with_initial_state=True):
    """Leaves requiring grad (x's base, weight, bias, initial_state) and x, a view of the base."""
    base, x = strided_x(batch, dim, seqlen, layout, dtype)
    leaves = dict(
        base=base,
        weight=torch.randn(dim, width, dtype=param_dtype) / width ** 0.5,
        bias=torch.randn(dim, dtype=param_dtype) if with_bias else None,
        initial_state=torch.randn(batch, dim, width - 1, dtype=dtype) if with_initial_state else None,
    )
    for t in leaves.values():
        if t is not None:
            t.requires_grad_(True)
    return leaves, x


def conv_and_grads(leaves, x_of_base, silu, backend, dout=None, float64=False):
    """(out, dout, {name: gradient}) of causal_conv1d; float64=True runs the reference on float64 copies."""
    leaves = {k: v for k, v in leaves.items() if v is not None}
    if float64:
        leaves = {k: v.detach().double().requires_grad_(True) for k, v in leaves.items()}
    x = x_of_base(leaves["base"])
    if float64:
        out = causal_conv1d_ref(x, leaves["weight"], leaves.get("bias"), silu, leaves.get("initial_state"))
    else:
        out = causal_conv1d(x, leaves["weight"], leaves.get("bias"), silu, leaves.get("initial_state"),
                            backend=backend)
    if dout is None:
        dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, list(leaves.values()), dout.to(out.dtype))
    return out, dout, dict(zip(leaves, grads))


def view_of(layout, dim):
    """base -> x for the layouts of ``strided_x``."""
    return {
        "contiguous": lambda b: b,
        "channel_slice": lambda b: b[:, 1:dim + 1],
        "permuted_batch": lambda b: b.permute(1, 0, 2)[:, dim:],
        "time_major": lambda b: b.transpose(1, 2),
    }[layout]


@pytest.mark.parametrize("dtype, param_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.float32)])
@settings(deadline=None, max_examples=15)
@given(
    batch=st.integers(1, 3),
    dim=st.sampled_from([1, 3, 5]),
    seqlen=st.sampled_from([1, 2, 3, 5, 8, 11, 13]),
    width=st.integers(1, MAX_TRITON_WIDTH),
    layout=st.sampled_from(LAYOUTS),
    with_bias=st.booleans(),
    with_initial_state=st.booleans(),
    silu=st.booleans(),
)
def test_triton_matches_float64_reference_forward_and_gradients(dtype, param_dtype, batch, dim, seqlen, width, layout,
                                                                with_bias, with_initial_state, silu):
    leaves, _ = seq_inputs(batch, dim, seqlen, width, layout, dtype, param_dtype, with_bias, with_initial_state)
    x_of_base = view_of(layout, dim)
    out, dout, grads = conv_and_grads(leaves, x_of_base, silu, "triton")
    want, _, want_grads = conv_and_grads(leaves, x_of_base, silu, None, dout=dout, float64=True)
    assert out.dtype == dtype and out.shape == (batch, dim, seqlen) and out.is_contiguous()
    assert rel_err(out, want) <= TOL[dtype]
    for name, grad in grads.items():
        assert grad.dtype == leaves[name].dtype and grad.shape == leaves[name].shape, name
        # The weight and bias gradients are float32 sums of exact products of the rounded inputs.
        tol = GRAD_TOL[dtype] if name in ("base", "initial_state") else GRAD_TOL[param_dtype]
        assert rel_err(grad, want_grads[name]) <= tol, name


@pytest.mark.parametrize("width", [1, 2, 4, MAX_TRITON_WIDTH])
@pytest.mark.parametrize("t0", [0, 4, 10])
def test_gradients_of_one_output_are_its_taps_and_window(width, t0):
    """dout one-hot at (batch row 1, channel 2, time t0), no silu: the gradient of xpad = concat(initial_state, x) is
    weight[2] placed at t0..t0 + width - 1 and zero elsewhere, dweight[2] is the window xpad[t0..t0 + width - 1],
    dbias[2] is 1, and every other channel's gradient is 0. Exactly: each is one product with 1.0 plus zeros. A
    backward reading dpre at a shifted time puts the taps at the wrong places."""
    batch, dim, seqlen = 2, 5, 11  # time blocks of 4 (backward pass 1) and 2 (pass 2) under the interpreter
    leaves, _ = seq_inputs(batch, dim, seqlen, width, "channel_slice")
    dout = torch.zeros(batch, dim, seqlen)
    dout[1, 2, t0] = 1.0
    _, _, grads = conv_and_grads(leaves, view_of("channel_slice", dim), False, "triton", dout=dout)
    weight = leaves["weight"].detach()
    xpad = torch.cat([leaves["initial_state"], leaves["base"][:, 1:dim + 1]], dim=-1).detach()
    dxpad = torch.zeros(batch, dim, width - 1 + seqlen)
    dxpad[1, 2, t0:t0 + width] = weight[2]
    dweight, dbias = torch.zeros(dim, width), torch.zeros(dim)
    dweight[2] = xpad[1, 2, t0:t0 + width]
    dbias[2] = 1.0
    assert torch.equal(grads["base"][:, 1:dim + 1], dxpad[..., width - 1:])
    assert torch.equal(grads["initial_state"], dxpad[..., :width - 1])
    assert torch.equal(grads["weight"], dweight) and torch.equal(grads["bias"], dbias)


@pytest.mark.parametrize("dpre_float32", [True, False])
def test_backward_with_dpre_in_either_dtype_matches_the_reference(monkeypatch, dpre_float32):
    """BWD_DPRE_FLOAT32 picks the dtype of dpre between the two backward passes: float32 or x's (bf16 here on a GPU;
    the interpreter upcasts bf16, so on CPU both runs are float32)."""
    monkeypatch.setattr(conv_module, "BWD_DPRE_FLOAT32", dpre_float32)
    leaves, _ = seq_inputs(2, 3, 13, 4, "channel_slice", torch.bfloat16)
    _, dout, grads = conv_and_grads(leaves, view_of("channel_slice", 3), True, "triton")
    _, _, want_grads = conv_and_grads(leaves, view_of("channel_slice", 3), True, None, dout=dout, float64=True)
    for name, grad in grads.items():
        tol = GRAD_TOL[torch.bfloat16] if name in ("base", "initial_state") else GRAD_TOL[torch.float32]
        assert rel_err(grad, want_grads[name]) <= tol, name


@pytest.mark.parametrize("backend", BACKENDS)
def test_half_precision_parameters_get_gradients_in_their_dtype(backend):
    leaves, _ = seq_inputs(2, 3, 9, 4, "channel_slice", torch.bfloat16, torch.bfloat16)
    out, dout, grads = conv_and_grads(leaves, view_of("channel_slice", 3), True, backend)
    want, _, want_grads = conv_and_grads(leaves, view_of("channel_slice", 3), True, None, dout=dout, float64=True)
    assert rel_err(out, want) <= TOL[torch.bfloat16]
    for name, grad in grads.items():
        assert grad.dtype == torch.bfloat16 and rel_err(grad, want_grads[name]) <= GRAD_TOL[torch.bfloat16], name


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("width", [1, 4])
def test_matches_nn_conv1d_and_its_weight_layout(backend, width):
    """The definition: F.conv1d with padding width - 1, cut to seqlen; weight may be nn.Conv1d's (dim, 1, width)."""
    batch, dim, seqlen = 2, 5, 7
    conv = torch.nn.Conv1d(dim, dim, kernel_size=width, groups=dim, padding=width - 1)
    x = torch.randn(batch, dim, seqlen, requires_grad=True)
    out = causal_conv1d(x, conv.weight, conv.bias, silu=True, backend=backend)
    want = F.silu(conv(x)[..., :seqlen])
    assert rel_err(out, want) <= TOL[torch.float32]
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, [x, conv.weight, conv.bias], dout)
    want_grads = torch.autograd.grad(want, [x, conv.weight, conv.bias], dout)
    for grad, want_grad in zip(grads, want_grads):
        assert grad.shape == want_grad.shape and rel_err(grad, want_grad) <= GRAD_TOL[torch.float32]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("width", [2, 4])
def test_initial_state_continues_a_split_sequence(backend, width):
    """Conv over x[:, :, :cut] then over the rest with initial_state = its last width - 1 inputs == conv over all."""
    batch, dim, seqlen, cut = 2, 3, 10, 6
    x, weight, bias = torch.randn(batch, dim, seqlen), torch.randn(dim, width), torch.randn(dim)
    whole = causal_conv1d(x, weight, bias, silu=True, backend=backend)
    head = causal_conv1d(x[..., :cut], weight, bias, silu=True, backend=backend)
    tail = causal_conv1d(x[..., cut:], weight, bias, silu=True, initial_state=x[..., cut - (width - 1):cut],
                         backend=backend)
    assert rel_err(torch.cat([head, tail], dim=-1), whole) <= TOL[torch.float32]


def test_custom_ops_pass_opcheck():
    leaves, x = seq_inputs(2, 3, 9, 4, "channel_slice")
    torch.library.opcheck(conv_module.causal_conv1d_fwd_op,
                          (x, leaves["weight"], leaves["bias"], leaves["initial_state"], True))
    torch.library.opcheck(conv_module.causal_conv1d_fwd_op, (x, leaves["weight"], None, None, False))
    # The backward op is not itself differentiable (no double backward): check it on plain tensors.
    plain = [t.detach() for t in (x, leaves["weight"], leaves["bias"], leaves["initial_state"])]
    dout = torch.randn(2, 3, 9).transpose(1, 2).contiguous().transpose(1, 2)  # a non-contiguous cotangent
    torch.library.opcheck(conv_module.causal_conv1d_bwd_op, (dout, *plain, True))


def test_compiles_with_fullgraph():
    leaves, _ = seq_inputs(2, 3, 10, 4, "channel_slice", dtype=torch.bfloat16)
    conv = torch.nn.Conv1d(3, 3, kernel_size=4, groups=3)
    inputs = [leaves["base"], conv.weight, conv.bias, leaves["initial_state"]]

    def block_conv(base, weight, bias, initial_state):
        x_in = base[:, 1:4]  # (batch, dim, seqlen) view, as MambaBlock's chunk of in_proj's output
        return causal_conv1d(x_in, weight, bias, silu=True, initial_state=initial_state, backend="triton").sum()

    compiled = torch.compile(block_conv, fullgraph=True, backend="aot_eager")
    got = torch.autograd.grad(compiled(*inputs), inputs)
    want = torch.autograd.grad(block_conv(*inputs), inputs)
    for g, w in zip(got, want):
        assert torch.equal(g, w)


@pytest.mark.skipif(DEVICE != "cpu", reason="checks the CPU dispatch")
def test_auto_backend_on_cpu_runs_the_reference(monkeypatch):
    def no_kernel(*args, **kwargs):
        raise AssertionError("the Triton kernel ran")

    monkeypatch.setattr(conv_module, "_causal_conv1d_fwd_triton", no_kernel)
    x, weight = torch.randn(1, 2, 5), torch.randn(2, 4)
    assert torch.equal(causal_conv1d(x, weight), causal_conv1d_ref(x, weight))
    with pytest.raises(AssertionError, match="Triton kernel ran"):
        causal_conv1d(x, weight, backend="triton")


@pytest.mark.skipif(DEVICE != "cpu", reason="checks the CPU path without the interpreter")
def test_triton_sequence_conv_on_cpu_without_the_interpreter_says_what_to_do(monkeypatch):
    monkeypatch.setattr(conv_module, "_interpreting", lambda: False)
    with pytest.raises(RuntimeError, match="causal_conv1d.*TRITON_INTERPRET=1"):
        causal_conv1d(torch.randn(1, 2, 5), torch.randn(2, 4), backend="triton")


def _valid_seq_args():
    return dict(x=torch.randn(2, 6, 5), weight=torch.randn(6, 4), bias=torch.zeros(6),
                initial_state=torch.zeros(2, 6, 3))


@pytest.mark.parametrize("name, bad, error, words", [
    ("x", torch.randn(2, 6), ValueError, "(batch, dim, seqlen)"),
    ("x", torch.randn(2, 6, 0), ValueError, "seqlen >= 1"),
    ("x", torch.ones(2, 6, 5, dtype=torch.int64), TypeError, "int64"),
    ("weight", torch.randn(5, 4), ValueError, "(dim, width)"),
    ("weight", torch.randn(6, 2, 4), ValueError, "(dim, 1, width)"),
    ("weight", torch.randn(6, 0), ValueError, "width >= 1"),
    ("weight", [[1.0]], TypeError, "torch.Tensor"),
    ("bias", torch.zeros(6, 1), ValueError, "(dim,)"),
    ("bias", torch.zeros(6, dtype=torch.int32), TypeError, "int32"),
    ("initial_state", torch.zeros(2, 6, 4), ValueError, "(batch, dim, width - 1)"),
    ("initial_state", torch.zeros(1, 6, 3), ValueError, "(2, 6, 3)"),
    ("silu", "yes", TypeError, "bool"),
    ("backend", "cudnn", ValueError, "backend must be one of"),
    ("initial_state", torch.zeros(2, 6, 3, device="meta"), ValueError, "device"),
])
def test_sequence_conv_bad_inputs_raise_naming_the_argument(name, bad, error, words):
    args = _valid_seq_args()
    args[name] = bad
    with pytest.raises(error) as info:
        causal_conv1d(**args)
    assert name in str(info.value) and words in str(info.value)


def test_triton_refuses_widths_it_does_not_unroll():
    x, weight = torch.randn(1, 2, 5), torch.randn(2, MAX_TRITON_WIDTH + 1)
    with pytest.raises(ValueError, match=f"width <= {MAX_TRITON_WIDTH}.*backend='torch'"):
        causal_conv1d(x, weight, backend="triton")
    assert causal_conv1d(x, weight, backend="auto").shape == x.shape


def test_without_triton_the_torch_path_works_and_triton_says_what_to_do():
    script = (
        "import sys; sys.modules['triton'] = None\n"  # makes `import triton` raise ImportError
        "import torch\n"
        "from mamba_r1.ops import causal_conv1d\n"
        "x, weight = torch.randn(1, 2, 3), torch.randn(2, 4)\n"
        "assert causal_conv1d(x, weight).shape == x.shape\n"
        "try:\n"
        "    causal_conv1d(x, weight, backend='triton')\n"
        "except ImportError as err:\n"
        "    assert \"backend='torch'\" in str(err), err\n"
        "    print('ok')\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                            cwd=Path(__file__).resolve().parents[2])
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr
