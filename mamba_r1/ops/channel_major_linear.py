"""``F.linear`` over the channel axis of a (batch, channels, seqlen) tensor, with gradients in their inputs' layouts.

The Mamba block keeps its conv and scan operands channel-major (time stride 1) while the residual stream is
time-major (batch, seqlen, d_model). ``channel_major_linear`` is the projection between the two: one batched GEMM with
the weight broadcast (batch stride 0), cuBLAS reading transposed operands, so no transposed copy is made forward.

Its backward keeps that promise: each input's gradient comes out in the input's own layout. Autograd's generic bmm
backward would hand the scan the gradient of out_proj's input time-major, which the scan (time stride 1) must copy
transposed (0.21 ms of a 4.6 ms MambaBlock(1024) training step at batch 8 x 2048 on an H200, profile_gpu.py block),
and would hand the residual stream in_proj's input gradient channel-major.
"""

from __future__ import annotations

import torch


def _batched_matmul_out(a: torch.Tensor, b: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """a @ b, (batch, m, k) @ (batch, k, n), returned with the strides of ``like`` (batch, m, n): computed as
    (b^T a^T)^T when ``like`` is stored transposed (its dim 1 has stride 1), so the result needs no copy."""
    if like.stride(1) == 1 and like.stride(2) != 1:
        return torch.bmm(b.transpose(1, 2), a.transpose(1, 2)).transpose(1, 2)
    return torch.bmm(a, b)


class _ChannelMajorLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, weight, x, bias, time_major_out: bool):
        # weight (out, in), x (batch, in, seqlen) any strides, bias (out,) or None
        ctx.save_for_backward(weight, x)
        ctx.has_bias, ctx.time_major_out = bias is not None, time_major_out
        batch = x.shape[0]
        if time_major_out:
            out = torch.bmm(x.transpose(1, 2), weight.t().expand(batch, -1, -1))  # (batch, seqlen, out)
            return out if bias is None else out + bias
        out = torch.bmm(weight.expand(batch, -1, -1), x)  # (batch, out, seqlen)
        return out if bias is None else out + bias[:, None]

    @staticmethod
    def backward(ctx, grad):
        weight, x = ctx.saved_tensors
        # grad_cm: (batch, out, seqlen), a view whatever the output's layout.
        grad_cm = grad.transpose(1, 2) if ctx.time_major_out else grad
        batch = x.shape[0]
        grad_weight = grad_x = grad_bias = None
        if ctx.needs_input_grad[1]:
            # (batch, in, seqlen) = W^T @ grad, laid out as x is (channel-major, or time-major seen through a
            # transposed view).
            grad_x = _batched_matmul_out(weight.t().expand(batch, -1, -1), grad_cm, x)
        if ctx.needs_input_grad[0]:
            # Per row (out, seqlen) @ (seqlen, in), summed over rows in float32 by the reduction.
            grad_weight = torch.bmm(grad_cm, x.transpose(1, 2)).sum(0)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_bias = grad_cm.sum((0, 2))
        return grad_weight, grad_x, grad_bias, None


def channel_major_linear(
    weight: torch.Tensor,  # (out_features, in_features)
    x: torch.Tensor,  # (batch, in_features, seqlen), any strides
    bias: torch.Tensor | None = None,  # (out_features,)
    time_major_out: bool = False,
) -> torch.Tensor:
    """``F.linear`` over the channel axis of a (batch, channels, seqlen) tensor: one batched GEMM with the weight
    broadcast (batch stride 0). Returns (batch, out_features, seqlen) contiguous, so the conv and the scan get operands
    with time stride 1, or with ``time_major_out`` (batch, seqlen, out_features) contiguous, for the residual stream.
    No transposed copy is made on the way in or out, forward or backward: cuBLAS reads transposed operands, and x's
    gradient has x's layout."""
    if torch.is_autocast_enabled(x.device.type):
        # Cast before broadcasting: autocast would otherwise materialise a converted copy per batch row. The bias too,
        # as F.linear under autocast does (a float32 bias would promote the output back to float32).
        dtype = torch.get_autocast_dtype(x.device.type)
        weight = weight.to(dtype)
        bias = None if bias is None else bias.to(dtype)
        x = x.to(dtype)
        with torch.autocast(device_type=x.device.type, enabled=False):
            return _ChannelMajorLinear.apply(weight, x, bias, time_major_out)
    return _ChannelMajorLinear.apply(weight, x, bias, time_major_out)
