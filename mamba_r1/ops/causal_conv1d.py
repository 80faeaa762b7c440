"""Mamba's causal depthwise conv1d: the whole sequence for training and prefill, and one decoding step.

``causal_conv1d`` (training, forward and backward), per batch row b, channel d, time t, with ``width`` taps:
    xpad = concat(initial_state or zeros, x)                 (batch, dim, width - 1 + seqlen)
    out[b, d, t] = act(bias[d] + sum_k weight[d, k] * xpad[b, d, t + k])
so weight[:, -1] multiplies the current step, exactly F.conv1d(x, weight[:, None], bias, padding=width - 1,
groups=dim)[..., :seqlen]. Backends "torch" (``causal_conv1d_ref``, F.conv1d, the specification), "triton" (a fused
forward kernel and a two-kernel backward, wrapped as custom ops with autograd), "auto" (triton on CUDA tensors, torch
otherwise). The kernels read x in place through its strides (a channel slice of in_proj's output, a permuted
buffer), where cuDNN's depthwise conv needs a contiguous copy and spends most of a training step's conv time in
its backward.

``causal_conv1d_update`` (decode), per batch row b and channel d:
    window = concat(conv_state[b, d, :], x[b, d])           (width,): the last width - 1 inputs, then this one
    out    = act(sum_k window[k] * weight[d, k] + bias[d])   act = silu if asked, else the identity
    conv_state[b, d, :] <- window[1:]                        in place, so a decode loop reuses one buffer
Backends as for ``selective_state_update``: "torch" (``causal_conv1d_update_ref``, the specification), "triton"
(one fused kernel: CUDA, or CPU under TRITON_INTERPRET=1; inference only), "auto" (triton on CUDA tensors, torch
otherwise). In PyTorch the step is half a dozen small kernels (cat, casts, multiply, sum, bias, silu, copy); the
fused kernel reads the state once and shifts it in place in the same launch.

Accumulation is float32 whatever the dtypes (``causal_conv1d_ref`` keeps float64 inputs in float64); outputs have
x's dtype, the decode state keeps its own.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from loguru import logger
from torch import Tensor

from mamba_r1.ops.eager_custom_ops import backward_op, eager_function, run_op
from mamba_r1.ops.selective_scan import _check_float, _check_shape
from mamba_r1.ops.triton_runtime import (
    built_for_interpreter,
    cdiv,
    check_triton_runtime,
    for_kernel,
    needs_autograd,
    next_power_of_2,
    resolve_backend,
    tl,
)
from mamba_r1.ops.triton_runtime import jit as _jit


def _check_conv_args(x, conv_state, weight, bias, silu) -> None:
    """Validate causal_conv1d_update's inputs; raise ValueError/TypeError naming the argument, expected and given."""
    _check_float("x", x)
    if x.dim() != 2:
        raise ValueError(f"x must be (batch, dim); got shape {tuple(x.shape)}")
    batch, dim = x.shape
    _check_float("weight", weight)
    if weight.dim() != 2 or weight.shape[0] != dim or weight.shape[1] < 1:
        raise ValueError(f"weight must be (dim, width) with dim={dim} and width >= 1; got shape {tuple(weight.shape)}")
    width = weight.shape[1]
    _check_float("conv_state", conv_state)
    _check_shape("conv_state", conv_state, (batch, dim, width - 1), "(batch, dim, width - 1)")
    if bias is not None:
        _check_float("bias", bias)
        _check_shape("bias", bias, (dim,), "(dim,)")
    if not isinstance(silu, bool):
        raise TypeError(f"silu must be a bool; got {type(silu).__name__}")
    for name, t in (("conv_state", conv_state), ("weight", weight), ("bias", bias)):
        if t is not None and t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}; all inputs must be on one device")


def causal_conv1d_update_ref(
    x: torch.Tensor,  # (batch, dim)
    conv_state: torch.Tensor,  # (batch, dim, width - 1), updated in place
    weight: torch.Tensor,  # (dim, width)
    bias: torch.Tensor | None = None,  # (dim,)
    silu: bool = False,
) -> torch.Tensor:  # (batch, dim) in x's dtype
    """The conv step in plain PyTorch: the specification of the fused kernel. Inputs are trusted (checked by
    ``causal_conv1d_update``)."""
    window = torch.cat([conv_state.float(), x.float()[..., None]], dim=-1)  # (batch, dim, width)
    out = (window * weight.float()).sum(-1)  # (batch, dim)
    if bias is not None:
        out = out + bias.float()
    if silu:
        out = F.silu(out)
    conv_state.copy_(window[..., 1:])
    return out.to(x.dtype)


# ---------------------------------------------------------------------------------------------- Triton kernel

# Channels per program on GPU: one channel per thread of 4 warps; the step is latency-bound (a few loads per
# thread), not yet measured against other sizes. Under the interpreter: 4, so small test shapes cross block edges.
BLOCK_D_CUDA, WARPS_CUDA = 128, 4
BLOCK_D_INTERPRET = 4


@_jit
def _causal_conv1d_update_kernel(
    x_ptr, conv_state_ptr, weight_ptr, bias_ptr,  # inputs (any float dtype); conv_state is also written
    out_ptr,  # (batch, dim) in x's dtype
    dim,
    stride_x_batch, stride_x_dim,
    stride_state_batch, stride_state_dim, stride_state_k,
    stride_weight_dim, stride_weight_k,
    stride_out_batch, stride_out_dim,
    HAS_BIAS: tl.constexpr, SILU: tl.constexpr, WIDTH: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """One program per (block of BLOCK_D channels, batch row); walks the WIDTH taps as (BLOCK_D,) columns.

    The shift is done while reading: column k of the state is stored at k - 1 right after it is loaded. Each
    element is read and written by the same thread (every column has the one 1-D layout), and a column's slot is
    overwritten only in the tap after it was read, so no read sees a shifted value.
    """
    pid_d = tl.program_id(0)
    pid_batch = tl.program_id(1).to(tl.int64)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_d = offs_d < dim
    # (BLOCK_D,) pointers to tap 0 of this row's state and of the weight rows of these channels.
    state_rows = conv_state_ptr + pid_batch * stride_state_batch + offs_d * stride_state_dim
    weight_rows = weight_ptr + offs_d * stride_weight_dim

    acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
    for k in tl.static_range(WIDTH - 1):
        column = tl.load(state_rows + k * stride_state_k, mask=mask_d, other=0.0)
        tap = tl.load(weight_rows + k * stride_weight_k, mask=mask_d, other=0.0).to(tl.float32)
        acc += column.to(tl.float32) * tap
        if k > 0:
            tl.store(state_rows + (k - 1) * stride_state_k, column, mask=mask_d)
    x = tl.load(x_ptr + pid_batch * stride_x_batch + offs_d * stride_x_dim, mask=mask_d, other=0.0)
    tap = tl.load(weight_rows + (WIDTH - 1) * stride_weight_k, mask=mask_d, other=0.0).to(tl.float32)
    acc += x.to(tl.float32) * tap
    if WIDTH > 1:
        tl.store(state_rows + (WIDTH - 2) * stride_state_k, x.to(conv_state_ptr.dtype.element_ty), mask=mask_d)

    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    if SILU:
        acc = acc * tl.sigmoid(acc)
    tl.store(out_ptr + pid_batch * stride_out_batch + offs_d * stride_out_dim, acc.to(out_ptr.dtype.element_ty),
             mask=mask_d)


def _interpreting() -> bool:
    """Whether this module's kernels run on Triton's CPU interpreter (see built_for_interpreter)."""
    return built_for_interpreter(_causal_conv1d_update_kernel)


def _causal_conv1d_update_triton(
    x: torch.Tensor,  # (batch, dim)
    conv_state: torch.Tensor,  # (batch, dim, width - 1), updated in place
    weight: torch.Tensor,  # (dim, width)
    bias: torch.Tensor | None,  # (dim,)
    silu: bool,
) -> torch.Tensor:  # (batch, dim) in x's dtype
    """Launch the fused kernel: one launch, no allocation but the output, no host sync (CUDA-graph capturable)."""
    interpreting = _interpreting()
    check_triton_runtime("causal_conv1d_update", x.device, interpreting)
    x_k, weight_k, bias_k = (for_kernel(t, interpreting) for t in (x, weight, bias))
    # The interpreter cannot write bfloat16 either: update a float32 copy of a half state, then copy it back.
    state_k = for_kernel(conv_state, interpreting)
    batch, dim = x.shape
    width = weight.shape[1]
    out = torch.empty(batch, dim, device=x.device, dtype=x_k.dtype)  # (batch, dim)
    # width == 1 has an empty state that the kernel never touches: x stands in for its pointer (and bias's).
    state_arg = state_k if width > 1 else x_k
    bias_arg = bias_k if bias_k is not None else x_k
    block_d = BLOCK_D_INTERPRET if interpreting else BLOCK_D_CUDA
    grid = (cdiv(dim, block_d), batch)
    _causal_conv1d_update_kernel[grid](
        x_k, state_arg, weight_k, bias_arg,
        out,
        dim,
        x_k.stride(0), x_k.stride(1),
        state_arg.stride(0), state_arg.stride(1), state_arg.stride(-1),
        weight_k.stride(0), weight_k.stride(1),
        out.stride(0), out.stride(1),
        HAS_BIAS=bias is not None, SILU=silu, WIDTH=width, BLOCK_D=block_d,
        num_warps=1 if interpreting else WARPS_CUDA,
    )
    if state_k is not conv_state:
        conv_state.copy_(state_k)
    return out if out.dtype == x.dtype else out.to(x.dtype)


def causal_conv1d_update(
    x: torch.Tensor,  # (batch, dim)
    conv_state: torch.Tensor,  # (batch, dim, width - 1), updated in place
    weight: torch.Tensor,  # (dim, width)
    bias: torch.Tensor | None = None,  # (dim,)
    silu: bool = False,
    backend: str = "auto",
) -> torch.Tensor:  # (batch, dim) in x's dtype
    """One token of a causal depthwise conv1d: returns act(conv(window) + bias) and shifts x into ``conv_state``.

    Calling it on tokens t = 0..T-1 with a zero state gives ``F.conv1d`` over the left-zero-padded sequence (with
    ``weight`` the (dim, width) view ``conv.weight[:, 0, :]`` of a depthwise ``nn.Conv1d``). Inputs may have any
    float dtype and any strides; accumulation is float32.

    ``backend``: "torch", "triton" (CUDA, or CPU under TRITON_INTERPRET=1) or "auto" (triton on CUDA tensors,
    torch otherwise). The kernel has no backward: when grad mode is on and an input requires grad, the call takes
    the differentiable torch path whatever the backend.
    """
    _check_conv_args(x, conv_state, weight, bias, silu)
    name = resolve_backend("causal_conv1d_update", backend, x.device)
    if name == "triton" and needs_autograd(x, conv_state, weight, bias):
        logger.debug("causal_conv1d_update: an input requires grad, taking the differentiable torch path")
        name = "torch"
    if name == "torch":
        return causal_conv1d_update_ref(x, conv_state, weight, bias, silu)
    return _causal_conv1d_update_triton(x, conv_state, weight, bias, silu)


# ================================================================================ whole sequence (training, prefill)

# Largest width the Triton kernels accept: each unrolls one shifted load per tap (Mamba uses 4), tested up to here.
MAX_TRITON_WIDTH = 8


def _check_seq_args(x, weight, bias, silu, initial_state) -> None:
    """Validate causal_conv1d's inputs; raise ValueError/TypeError naming the argument, expected and given."""
    _check_float("x", x)
    if x.dim() != 3:
        raise ValueError(f"x must be (batch, dim, seqlen); got shape {tuple(x.shape)}")
    batch, dim, seqlen = x.shape
    if seqlen == 0:
        raise ValueError(f"x must have seqlen >= 1; got shape {tuple(x.shape)}")
    _check_float("weight", weight)
    nn_layout = weight.dim() == 3 and weight.shape[1] == 1
    if not (weight.dim() == 2 or nn_layout) or weight.shape[0] != dim or weight.shape[-1] < 1:
        raise ValueError(f"weight must be (dim, width) or nn.Conv1d's (dim, 1, width) with dim={dim} and width >= 1; "
                         f"got shape {tuple(weight.shape)}")
    width = weight.shape[-1]
    if bias is not None:
        _check_float("bias", bias)
        _check_shape("bias", bias, (dim,), "(dim,)")
    if not isinstance(silu, bool):
        raise TypeError(f"silu must be a bool; got {type(silu).__name__}")
    if initial_state is not None:
        _check_float("initial_state", initial_state)
        _check_shape("initial_state", initial_state, (batch, dim, width - 1), "(batch, dim, width - 1)")
    for name, t in (("weight", weight), ("bias", bias), ("initial_state", initial_state)):
        if t is not None and t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}; all inputs must be on one device")


def causal_conv1d_ref(
    x: torch.Tensor,  # (batch, dim, seqlen)
    weight: torch.Tensor,  # (dim, width) or (dim, 1, width)
    bias: torch.Tensor | None = None,  # (dim,)
    silu: bool = False,
    initial_state: torch.Tensor | None = None,  # (batch, dim, width - 1)
) -> torch.Tensor:  # (batch, dim, seqlen) in x's dtype
    """The causal depthwise conv1d in plain PyTorch (F.conv1d in float32, or float64 for float64 x): the specification
    of the fused kernels, differentiable by autograd in every input. Inputs are trusted (checked by
    ``causal_conv1d``)."""
    dim, width = weight.shape[0], weight.shape[-1]
    compute = torch.float64 if x.dtype == torch.float64 else torch.float32
    if initial_state is None:
        xpad = F.pad(x.to(compute), (width - 1, 0))  # (batch, dim, width - 1 + seqlen)
    else:
        xpad = torch.cat([initial_state.to(compute), x.to(compute)], dim=-1)
    out = F.conv1d(xpad, weight.reshape(dim, 1, width).to(compute), None if bias is None else bias.to(compute),
                   groups=dim)  # (batch, dim, seqlen)
    if silu:
        out = F.silu(out)
    return out.to(x.dtype)


# ---------------------------------------------------------------------------------------------- Triton kernels

# (channels, time steps) per program and warps of each kernel. Time is the contiguous axis, so BLOCK_L carries the
# coalescing. Forward measured with `benchmarks/bench_conv.py --sweep` on an H200 (2026-11-30; 8 x 2048 x 2048, width
# 4, bf16 x a channel slice of a wider tensor), fwd ms: (8, 128, 4) 0.122, (4, 256, 4) 0.062, (16, 128, 4) 0.061,
# (4, 512, 4) 0.127, (8, 256, 8) 0.097, (2, 512, 4) 0.105, (2, 1024, 8) 0.069, (1, 1024, 4) 0.058; cuDNN's F.conv1d +
# F.silu 0.516 (1.370 fwd+bwd). Hence (4, 256, 4).
FWD_BLOCK_D_CUDA, FWD_BLOCK_L_CUDA, FWD_WARPS_CUDA = 4, 256, 4
# The backward is two stencils shaped like the forward. Pass 1 ("dpre") reads dout and x once, recomputes the
# pre-activation once, writes dpre = dout * act'(pre) and each program's dweight / dbias partials; pass 2 ("dx") reads
# dpre back as WIDTH shifted tiles and writes dx and d initial_state. The single-pass kernel they replace recomputed
# dpre at each of the WIDTH taps (WIDTH^2 loads and FMAs per element): about 0.62 ms of a 0.685 ms fwd+bwd at its
# best tile (2, 512, 4), some 10x the time of its bytes. Both passes start at the forward's tile, untimed. Compiled for
# sm_90 without running (bf16 x and weight, bias, silu): at width 4 pass 1 holds 80 registers per thread (127 with an
# initial state; the forward 64), pass 2 63; at width 8 with an initial state 249 and 142. No spills.
BWD_DPRE_BLOCK_D_CUDA, BWD_DPRE_BLOCK_L_CUDA, BWD_DPRE_WARPS_CUDA = 4, 256, 4
BWD_DX_BLOCK_D_CUDA, BWD_DX_BLOCK_L_CUDA, BWD_DX_WARPS_CUDA = 4, 256, 4
# dpre between the passes: float32 (True), or x's dtype (False: for bf16 x, 4 of the backward's 14 bytes per element
# saved, at one more rounding of dpre on its way to dx; dweight and dbias always sum the float32 dpre).
BWD_DPRE_FLOAT32 = True
# Under the interpreter: tiny blocks, so the small test shapes cross channel and time block edges. Pass 2 gets other
# blocks than pass 1, with time blocks shorter than a wide kernel's reach, so its shifted reads of dpre cross the
# edges of several pass-1 blocks.
BLOCK_D_SEQ_INTERPRET, BLOCK_L_SEQ_INTERPRET = 2, 4
BWD_DX_BLOCK_D_INTERPRET, BWD_DX_BLOCK_L_INTERPRET = 4, 2


@_jit
def _load_xpad(
    x_rows, init_rows,  # (BLOCK_D,) pointers to time 0 of x's rows / column 0 of initial_state's rows
    mask_d, offs_t,  # (BLOCK_D,) valid channels; (T,) times, any in [-2 * (WIDTH - 1), seqlen + WIDTH)
    seqlen, stride_x_time, stride_init_k,
    HAS_INITIAL_STATE: tl.constexpr, WIDTH: tl.constexpr,
):
    """(BLOCK_D, T) float32 tile of xpad at times offs_t, where time -j is initial_state[..., WIDTH - 1 - j]
    (or zero), and times before -(WIDTH - 1) or past the sequence are zero."""
    in_x = (offs_t >= 0) & (offs_t < seqlen)
    vals = tl.load(x_rows[:, None] + offs_t[None, :] * stride_x_time, mask=mask_d[:, None] & in_x[None, :],
                   other=0.0).to(tl.float32)
    if HAS_INITIAL_STATE:
        in_init = (offs_t < 0) & (offs_t >= 1 - WIDTH)
        vals += tl.load(init_rows[:, None] + (offs_t + WIDTH - 1)[None, :] * stride_init_k,
                        mask=mask_d[:, None] & in_init[None, :], other=0.0).to(tl.float32)
    return vals


@_jit
def _pre_activation(
    x_rows, init_rows, weight_rows, bias_ptr,  # (BLOCK_D,) row pointers; bias_ptr: the bias vector
    offs_d, mask_d, offs_t,  # channels (BLOCK_D,), times (T,)
    seqlen, stride_x_time, stride_init_k, stride_weight_k,
    HAS_BIAS: tl.constexpr, HAS_INITIAL_STATE: tl.constexpr, WIDTH: tl.constexpr,
):
    """(BLOCK_D, T) float32 tile of bias + sum_k weight[:, k] * xpad[t + k], t = offs_t: WIDTH shifted loads of
    the same window, all but the first hitting the cache."""
    acc = tl.zeros((offs_d.shape[0], offs_t.shape[0]), dtype=tl.float32)
    for k in tl.static_range(WIDTH):
        tap = tl.load(weight_rows + k * stride_weight_k, mask=mask_d, other=0.0).to(tl.float32)  # (BLOCK_D,)
        # xpad[t + k] is input time t + k - (WIDTH - 1).
        acc += tap[:, None] * _load_xpad(x_rows, init_rows, mask_d, offs_t + (k - (WIDTH - 1)), seqlen,
                                         stride_x_time, stride_init_k, HAS_INITIAL_STATE, WIDTH)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)[:, None]
    return acc


@_jit
def _causal_conv1d_fwd_kernel(
    x_ptr, weight_ptr, bias_ptr, init_ptr,  # inputs, any float dtype and strides
    out_ptr,  # (batch, dim, seqlen) contiguous, in x's dtype
    dim, seqlen,
    stride_x_batch, stride_x_dim, stride_x_time,
    stride_weight_dim, stride_weight_k,
    stride_init_batch, stride_init_dim, stride_init_k,
    stride_out_batch, stride_out_dim,
    HAS_BIAS: tl.constexpr, HAS_INITIAL_STATE: tl.constexpr, SILU: tl.constexpr, WIDTH: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_L: tl.constexpr,
):
    """One program per (block of BLOCK_L time steps, block of BLOCK_D channels, batch row): out's (BLOCK_D, BLOCK_L)
    tile from the (BLOCK_D, BLOCK_L + WIDTH - 1) input window read as WIDTH shifted tiles."""
    pid_l = tl.program_id(0)
    pid_d = tl.program_id(1)
    pid_batch = tl.program_id(2).to(tl.int64)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    offs_l = pid_l * BLOCK_L + tl.arange(0, BLOCK_L)
    mask_d = offs_d < dim
    rows = offs_d.to(tl.int64)  # a permuted x's channel stride can be batch * seqlen: keep row offsets in int64
    # (BLOCK_D,) pointers: time 0 of this batch row's channels in x, column 0 of their initial state, tap 0 of
    # their weights.
    x_rows = x_ptr + pid_batch * stride_x_batch + rows * stride_x_dim
    init_rows = init_ptr + pid_batch * stride_init_batch + rows * stride_init_dim
    weight_rows = weight_ptr + rows * stride_weight_dim

    out = _pre_activation(x_rows, init_rows, weight_rows, bias_ptr, offs_d, mask_d, offs_l, seqlen, stride_x_time,
                          stride_init_k, stride_weight_k, HAS_BIAS, HAS_INITIAL_STATE, WIDTH)
    if SILU:
        out = out * tl.sigmoid(out)
    out_ptrs = out_ptr + pid_batch * stride_out_batch + rows[:, None] * stride_out_dim + offs_l[None, :]
    tl.store(out_ptrs, out.to(out_ptr.dtype.element_ty), mask=mask_d[:, None] & (offs_l < seqlen)[None, :])


@_jit
def _causal_conv1d_bwd_dpre_kernel(
    dout_ptr, x_ptr, weight_ptr, bias_ptr, init_ptr,  # inputs, any float dtype and strides
    dpre_ptr,  # (batch, dim, seqlen) contiguous, float32 or x's dtype
    dweight_part_ptr,  # (batch * n_blocks_l, dim, WIDTH) float32: this program's sum over its times
    dbias_part_ptr,  # (batch * n_blocks_l, dim) float32
    dim, seqlen, n_blocks_l,
    stride_dout_batch, stride_dout_dim, stride_dout_time,
    stride_x_batch, stride_x_dim, stride_x_time,
    stride_weight_dim, stride_weight_k,
    stride_init_batch, stride_init_dim, stride_init_k,
    HAS_BIAS: tl.constexpr, HAS_INITIAL_STATE: tl.constexpr, SILU: tl.constexpr, WIDTH: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_W: tl.constexpr,
):
    """Backward pass 1. One program per (block of BLOCK_L time steps, block of BLOCK_D channels, batch row), as the
    forward: dpre = dout * act'(pre) on its tile, and its partial sums dweight[k] = sum_t dpre[t] * xpad[t + k],
    dbias = sum_t dpre[t]. xpad's times before 0 are initial_state's columns, so dweight sees them too."""
    pid_l = tl.program_id(0)
    pid_d = tl.program_id(1)
    pid_batch = tl.program_id(2).to(tl.int64)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    offs_l = pid_l * BLOCK_L + tl.arange(0, BLOCK_L)
    offs_w = tl.arange(0, BLOCK_W)
    mask_d = offs_d < dim
    rows = offs_d.to(tl.int64)
    # (BLOCK_D,) pointers to time 0 (column 0, tap 0) of these channels' rows in each input.
    dout_rows = dout_ptr + pid_batch * stride_dout_batch + rows * stride_dout_dim
    x_rows = x_ptr + pid_batch * stride_x_batch + rows * stride_x_dim
    init_rows = init_ptr + pid_batch * stride_init_batch + rows * stride_init_dim
    weight_rows = weight_ptr + rows * stride_weight_dim

    in_seq = offs_l < seqlen
    dpre = tl.load(dout_rows[:, None] + offs_l[None, :] * stride_dout_time, mask=mask_d[:, None] & in_seq[None, :],
                   other=0.0).to(tl.float32)  # zero past the sequence: adds nothing to the sums below
    if SILU:
        pre = _pre_activation(x_rows, init_rows, weight_rows, bias_ptr, offs_d, mask_d, offs_l, seqlen,
                              stride_x_time, stride_init_k, stride_weight_k, HAS_BIAS, HAS_INITIAL_STATE, WIDTH)
        sig = tl.sigmoid(pre)
        dpre = dpre * sig * (1.0 + pre * (1.0 - sig))  # d/dp [p * sigmoid(p)]

    # Column k of dweight's (BLOCK_D, BLOCK_W) tile is tap k's sum; stored once, after every load of x.
    dweight = tl.zeros((BLOCK_D, BLOCK_W), dtype=tl.float32)
    for k in tl.static_range(WIDTH):
        xk = _load_xpad(x_rows, init_rows, mask_d, offs_l + (k - (WIDTH - 1)), seqlen, stride_x_time, stride_init_k,
                        HAS_INITIAL_STATE, WIDTH)
        dweight = tl.where(offs_w[None, :] == k, tl.sum(dpre * xk, axis=1)[:, None], dweight)
    part = pid_batch * n_blocks_l + pid_l
    tl.store(dweight_part_ptr + (part * dim + rows[:, None]) * WIDTH + offs_w[None, :], dweight,
             mask=mask_d[:, None] & (offs_w < WIDTH)[None, :])
    if HAS_BIAS:
        tl.store(dbias_part_ptr + part * dim + rows, tl.sum(dpre, axis=1), mask=mask_d)
    dpre_ptrs = dpre_ptr + (pid_batch * dim + rows[:, None]) * seqlen + offs_l[None, :]
    tl.store(dpre_ptrs, dpre.to(dpre_ptr.dtype.element_ty), mask=mask_d[:, None] & in_seq[None, :])


@_jit
def _causal_conv1d_bwd_dx_kernel(
    dpre_ptr,  # (batch, dim, seqlen) contiguous: pass 1's output
    weight_ptr,  # (dim, WIDTH), any float dtype and strides
    dx_ptr,  # (batch, dim, seqlen) contiguous, x's kernel dtype
    dinit_ptr,  # (batch, dim, WIDTH - 1) contiguous float32
    dim, seqlen,
    stride_weight_dim, stride_weight_k,
    HAS_INITIAL_STATE: tl.constexpr, WIDTH: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_W: tl.constexpr,
):
    """Backward pass 2, the transposed conv: dx[t] = sum_s weight[WIDTH - 1 - s] * dpre[t + s] (an input reaches the
    outputs of the next WIDTH steps; dpre is zero past the sequence). One program per (block of BLOCK_L time steps,
    block of BLOCK_D channels, batch row), reading dpre as WIDTH shifted tiles that reach WIDTH - 1 steps into the
    next time block (pass 1 has finished all of dpre). The first time block also writes d initial_state[j], dx at
    time j - (WIDTH - 1)."""
    pid_l = tl.program_id(0)
    pid_d = tl.program_id(1)
    pid_batch = tl.program_id(2).to(tl.int64)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    offs_l = pid_l * BLOCK_L + tl.arange(0, BLOCK_L)
    mask_d = offs_d < dim
    rows = offs_d.to(tl.int64)
    # (BLOCK_D, 1) offsets of time 0 of these channels' rows in dpre and dx (one layout); (BLOCK_D,) tap-0 pointers.
    row_starts = (pid_batch * dim + rows[:, None]) * seqlen
    weight_rows = weight_ptr + rows * stride_weight_dim

    dx = tl.zeros((BLOCK_D, BLOCK_L), dtype=tl.float32)
    for s in tl.static_range(WIDTH):
        tap = tl.load(weight_rows + (WIDTH - 1 - s) * stride_weight_k, mask=mask_d, other=0.0).to(tl.float32)
        offs_t = offs_l + s
        dpre = tl.load(dpre_ptr + row_starts + offs_t[None, :], mask=mask_d[:, None] & (offs_t < seqlen)[None, :],
                       other=0.0).to(tl.float32)
        dx += tap[:, None] * dpre
    tl.store(dx_ptr + row_starts + offs_l[None, :], dx.to(dx_ptr.dtype.element_ty),
             mask=mask_d[:, None] & (offs_l < seqlen)[None, :])

    if HAS_INITIAL_STATE:
        if pid_l == 0:
            offs_j = tl.arange(0, BLOCK_W)  # columns of initial_state; valid where offs_j < WIDTH - 1
            dinit = tl.zeros((BLOCK_D, BLOCK_W), dtype=tl.float32)
            # New names, not tap / offs_t / dpre: a name assigned under a runtime `if` must keep its type and shape.
            for s in tl.static_range(1, WIDTH):
                tap_j = tl.load(weight_rows + (WIDTH - 1 - s) * stride_weight_k, mask=mask_d, other=0.0)
                times_j = offs_j + (s - (WIDTH - 1))  # the time column j's input reaches with tap WIDTH - 1 - s
                dpre_j = tl.load(dpre_ptr + row_starts + times_j[None, :],
                                 mask=mask_d[:, None] & ((times_j >= 0) & (times_j < seqlen))[None, :], other=0.0)
                dinit += tap_j.to(tl.float32)[:, None] * dpre_j.to(tl.float32)
            dinit_ptrs = dinit_ptr + (pid_batch * dim + rows[:, None]) * (WIDTH - 1) + offs_j[None, :]
            tl.store(dinit_ptrs, dinit, mask=mask_d[:, None] & (offs_j < WIDTH - 1)[None, :])


# ---------------------------------------------------------------------------------------------- launchers


def _seq_blocks(kernel: str, interpreting: bool) -> tuple[int, int, int]:
    """(BLOCK_D, BLOCK_L, num_warps) of kernel "fwd", "bwd_dpre" (backward pass 1) or "bwd_dx" (pass 2)."""
    if interpreting:
        if kernel == "bwd_dx":
            return BWD_DX_BLOCK_D_INTERPRET, BWD_DX_BLOCK_L_INTERPRET, 1
        return BLOCK_D_SEQ_INTERPRET, BLOCK_L_SEQ_INTERPRET, 1
    if kernel == "bwd_dpre":
        return BWD_DPRE_BLOCK_D_CUDA, BWD_DPRE_BLOCK_L_CUDA, BWD_DPRE_WARPS_CUDA
    if kernel == "bwd_dx":
        return BWD_DX_BLOCK_D_CUDA, BWD_DX_BLOCK_L_CUDA, BWD_DX_WARPS_CUDA
    return FWD_BLOCK_D_CUDA, FWD_BLOCK_L_CUDA, FWD_WARPS_CUDA


def _causal_conv1d_fwd_triton(x, weight, bias, initial_state, silu: bool) -> Tensor:
    """Launch the forward kernel; returns out (batch, dim, seqlen) contiguous in x's dtype."""
    interpreting = _interpreting()
    check_triton_runtime("causal_conv1d", x.device, interpreting)
    x_k, weight_k, bias_k, init_k = (for_kernel(t, interpreting) for t in (x, weight, bias, initial_state))
    batch, dim, seqlen = x.shape
    width = weight.shape[1]
    out = torch.empty(batch, dim, seqlen, device=x.device, dtype=x_k.dtype)  # (batch, dim, seqlen)
    if out.numel() == 0:
        return out.to(x.dtype)
    # Absent optional inputs are never read (their HAS_* flag is False): x stands in for the pointer, strides 0.
    init_arg = init_k if init_k is not None and width > 1 else x_k
    init_strides = init_arg.stride() if init_arg is not x_k else (0, 0, 0)
    block_d, block_l, num_warps = _seq_blocks("fwd", interpreting)
    grid = (cdiv(seqlen, block_l), cdiv(dim, block_d), batch)
    _causal_conv1d_fwd_kernel[grid](
        x_k, weight_k, bias_k if bias_k is not None else x_k, init_arg,
        out,
        dim, seqlen,
        x_k.stride(0), x_k.stride(1), x_k.stride(2),
        weight_k.stride(0), weight_k.stride(1),
        *init_strides,
        out.stride(0), out.stride(1),
        HAS_BIAS=bias is not None, HAS_INITIAL_STATE=init_arg is not x_k, SILU=silu, WIDTH=width,
        BLOCK_D=block_d, BLOCK_L=block_l,
        num_warps=num_warps,
    )
    return out.to(x.dtype)


def _causal_conv1d_bwd_triton(dout, x, weight, bias, initial_state, silu: bool):
    """Launch the two backward passes; returns float32-accumulated (dx in x's kernel dtype, dweight (dim, width)
    float32, dbias (dim,) float32 or None, dinit (batch, dim, width - 1) float32 or None)."""
    interpreting = _interpreting()
    check_triton_runtime("causal_conv1d", x.device, interpreting)
    dout_k, x_k, weight_k, bias_k, init_k = (for_kernel(t, interpreting)
                                             for t in (dout, x, weight, bias, initial_state))
    batch, dim, seqlen = x.shape
    width = weight.shape[1]
    has_init = initial_state is not None and width > 1
    block_d, block_l, num_warps = _seq_blocks("bwd_dpre", interpreting)
    n_blocks_l = cdiv(seqlen, block_l)
    dpre_dtype = torch.float32 if BWD_DPRE_FLOAT32 else x_k.dtype
    dpre = torch.empty(batch, dim, seqlen, device=x.device, dtype=dpre_dtype)  # (batch, dim, seqlen)
    dx = torch.empty(batch, dim, seqlen, device=x.device, dtype=x_k.dtype)  # (batch, dim, seqlen)
    # Every element of these is written by the kernels (no memset): one partial row per (batch row, pass-1 time block).
    dweight_part = torch.empty(batch * n_blocks_l, dim, width, device=x.device, dtype=torch.float32)
    dbias_part = torch.empty(batch * n_blocks_l, dim if bias is not None else 0, device=x.device,
                             dtype=torch.float32)
    dinit = None if initial_state is None else torch.empty(initial_state.shape, device=x.device, dtype=torch.float32)
    if x.numel() > 0:
        init_arg = init_k if has_init else x_k
        init_strides = init_arg.stride() if has_init else (0, 0, 0)
        _causal_conv1d_bwd_dpre_kernel[(n_blocks_l, cdiv(dim, block_d), batch)](
            dout_k, x_k, weight_k, bias_k if bias_k is not None else x_k, init_arg,
            dpre, dweight_part, dbias_part,
            dim, seqlen, n_blocks_l,
            dout_k.stride(0), dout_k.stride(1), dout_k.stride(2),
            x_k.stride(0), x_k.stride(1), x_k.stride(2),
            weight_k.stride(0), weight_k.stride(1),
            *init_strides,
            HAS_BIAS=bias is not None, HAS_INITIAL_STATE=has_init, SILU=silu, WIDTH=width,
            BLOCK_D=block_d, BLOCK_L=block_l, BLOCK_W=next_power_of_2(width),
            num_warps=num_warps,
        )
        block_d, block_l, num_warps = _seq_blocks("bwd_dx", interpreting)
        _causal_conv1d_bwd_dx_kernel[(cdiv(seqlen, block_l), cdiv(dim, block_d), batch)](
            dpre, weight_k, dx, dinit if has_init else dpre,
            dim, seqlen,
            weight_k.stride(0), weight_k.stride(1),
            HAS_INITIAL_STATE=has_init, WIDTH=width,
            BLOCK_D=block_d, BLOCK_L=block_l, BLOCK_W=next_power_of_2(max(width - 1, 1)),
            num_warps=num_warps,
        )
    dbias = dbias_part.sum(0) if bias is not None else None
    return dx, dweight_part.sum(0), dbias, dinit


# ---------------------------------------------------------------------------------------------- custom ops


def _causal_conv1d_fwd(
    x: Tensor,  # (batch, dim, seqlen), any strides
    weight: Tensor,  # (dim, width)
    bias: Optional[Tensor],  # (dim,)
    initial_state: Optional[Tensor],  # (batch, dim, width - 1)
    silu: bool,
) -> Tensor:  # (batch, dim, seqlen) contiguous, x's dtype
    """The fused forward kernel; arguments already checked by ``causal_conv1d``."""
    return _causal_conv1d_fwd_triton(x, weight, bias, initial_state, silu)


causal_conv1d_fwd_op = torch.library.custom_op("mamba_r1::causal_conv1d_fwd", mutates_args=())(_causal_conv1d_fwd)


@causal_conv1d_fwd_op.register_fake
def _(x, weight, bias, initial_state, silu):
    return x.new_empty(x.shape)  # contiguous, x's dtype


def _causal_conv1d_bwd(
    dout: Tensor,  # (batch, dim, seqlen), any strides
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    initial_state: Optional[Tensor],
    silu: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Gradients of (x, weight, bias, initial_state), each shaped and typed like its input (dx contiguous); an
    absent optional input gets an empty placeholder (custom ops cannot return None)."""
    dx, dweight, dbias, dinit = _causal_conv1d_bwd_triton(dout, x, weight, bias, initial_state, silu)

    def like(grad: Optional[Tensor], t: Optional[Tensor]) -> Tensor:
        return x.new_empty(0) if t is None else grad.to(t.dtype)

    return dx.to(x.dtype), like(dweight, weight), like(dbias, bias), like(dinit, initial_state)


causal_conv1d_bwd_op = torch.library.custom_op("mamba_r1::causal_conv1d_bwd", mutates_args=())(_causal_conv1d_bwd)


@causal_conv1d_bwd_op.register_fake
def _(dout, x, weight, bias, initial_state, silu):
    def like(t):
        return x.new_empty(0) if t is None else t.new_empty(t.shape)

    return like(x), like(weight), like(bias), like(initial_state)


def _setup_context(ctx, inputs, output):
    x, weight, bias, initial_state, silu = inputs
    ctx.save_for_backward(x, weight, bias, initial_state)
    ctx.silu = silu


def _backward(ctx, dout):
    x, weight, bias, initial_state = ctx.saved_tensors
    dx, dweight, dbias, dinit = backward_op(ctx, causal_conv1d_bwd_op, _causal_conv1d_bwd)(
        dout, x, weight, bias, initial_state, ctx.silu)
    return (dx, dweight, dbias if bias is not None else None, dinit if initial_state is not None else None, None)


causal_conv1d_fwd_op.register_autograd(_backward, setup_context=_setup_context)
_CausalConv1dEager = eager_function("_CausalConv1dEager", _causal_conv1d_fwd, _setup_context, _backward)


# ---------------------------------------------------------------------------------------------- public function


def causal_conv1d(
    x: torch.Tensor,  # (batch, dim, seqlen), any strides
    weight: torch.Tensor,  # (dim, width) or nn.Conv1d's (dim, 1, width)
    bias: torch.Tensor | None = None,  # (dim,)
    silu: bool = False,
    initial_state: torch.Tensor | None = None,  # (batch, dim, width - 1): the inputs before x[..., 0]
    backend: str = "auto",
) -> torch.Tensor:  # (batch, dim, seqlen) contiguous, in x's dtype
    """Causal depthwise conv1d over the sequence, then SiLU if ``silu``: ``F.conv1d(x, weight, bias,
    padding=width - 1, groups=dim)[..., :seqlen]``, with the left padding taken from ``initial_state`` when given.

    Differentiable in x, weight, bias and initial_state on every backend. Inputs may have any float dtype and
    strides; the triton backend reads x in place (no contiguous copy) and accumulates in float32, including the
    weight and bias gradients (deterministic: per-program partial sums added by torch).

    ``backend``: "torch" (``causal_conv1d_ref``), "triton" (fused forward and backward kernels; CUDA, or CPU under
    TRITON_INTERPRET=1; width <= MAX_TRITON_WIDTH; opaque to torch.compile, which calls the custom ops; eagerly
    their bodies run under a plain autograd.Function, without the dispatcher's host cost) or "auto"
    (triton on CUDA tensors, torch otherwise and for widths above MAX_TRITON_WIDTH).
    """
    _check_seq_args(x, weight, bias, silu, initial_state)
    name = resolve_backend("causal_conv1d", backend, x.device)
    width = weight.shape[-1]
    if name == "triton" and width > MAX_TRITON_WIDTH:
        if backend == "triton":
            raise ValueError(f"causal_conv1d(backend='triton') supports width <= {MAX_TRITON_WIDTH}; got weight of "
                             f"shape {tuple(weight.shape)}. Use backend='torch'.")
        logger.debug("causal_conv1d: width {} > {}, taking the torch path", width, MAX_TRITON_WIDTH)
        name = "torch"
    if name == "torch":
        return causal_conv1d_ref(x, weight, bias, silu, initial_state)
    if weight.dim() == 3:
        weight = weight[:, 0, :]  # nn.Conv1d's (dim, 1, width) -> (dim, width) view; its gradient flows back
    return run_op(causal_conv1d_fwd_op, _CausalConv1dEager, x, weight, bias, initial_state, silu)


__all__ = ["causal_conv1d", "causal_conv1d_ref", "causal_conv1d_update", "causal_conv1d_update_ref",
           "MAX_TRITON_WIDTH"]
