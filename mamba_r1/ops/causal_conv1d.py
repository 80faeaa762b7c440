"""One decoding step of Mamba's causal depthwise conv1d: the conv part of ``MambaBlock.step``.

Per batch row b and channel d, with ``width`` taps:
    window = concat(conv_state[b, d, :], x[b, d])           (width,): the last width - 1 inputs, then this one
    out    = act(sum_k window[k] * weight[d, k] + bias[d])   act = silu if asked, else the identity
    conv_state[b, d, :] <- window[1:]                        in place, so a decode loop reuses one buffer
Accumulation is float32 whatever the dtypes; the output has x's dtype, the state keeps its own.

Backends as for ``selective_state_update``: "torch" (``causal_conv1d_update_ref``, the specification), "triton"
(one fused kernel: CUDA, or CPU under TRITON_INTERPRET=1; inference only), "auto" (triton on CUDA tensors, torch
otherwise). In PyTorch the step is half a dozen small kernels (cat, casts, multiply, sum, bias, silu, copy); the
fused kernel reads the state once and shifts it in place in the same launch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from loguru import logger

from mamba_r1.ops.selective_scan import _check_float, _check_shape
from mamba_r1.ops.state_update import (
    _jit,
    check_triton_runtime,
    for_kernel,
    needs_autograd,
    resolve_backend,
    tl,
    triton,
)


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
    """True when the kernel was built for Triton's CPU interpreter (TRITON_INTERPRET=1 at import)."""
    return type(_causal_conv1d_update_kernel).__name__ == "InterpretedFunction"


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
    grid = (triton.cdiv(dim, block_d), batch)
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


__all__ = ["causal_conv1d_update", "causal_conv1d_update_ref"]
