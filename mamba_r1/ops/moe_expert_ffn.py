"""The experts' FFN on the dispatch buffer with its bias adds and activation fused into Triton kernels:
``bias_act`` (act(h + bias[expert of each row]), forward one kernel, backward one plus a fixed-order reduction of
per-(row block, expert) bias-gradient partials, deterministic) and ``expert_ffn_fused`` (two grouped matmuls around
it, one autograd node eagerly). ``expert_ffn`` of moe_dispatch.py is the specification and the torch path. GELU's erf
is Abramowitz & Stegun 7.1.26 (``_gauss_cdf``; libdevice's made the kernels compute-bound, RESULTS.md).
"""

from __future__ import annotations

import torch
from torch import Tensor

from mamba_r1.ops import eager_custom_ops
from mamba_r1.ops.eager_custom_ops import backward_op, eager_function, run_op
from mamba_r1.ops.moe_dispatch import DispatchPlan, expert_ffn
from mamba_r1.ops.moe_grouped_gemm import grouped_gemm, grouped_matmul
from mamba_r1.ops.triton_runtime import (
    built_for_interpreter,
    cdiv,
    check_triton_runtime,
    for_kernel,
    resolve_backend,
    tl,
    triton,
)
from mamba_r1.ops.triton_runtime import jit as _jit

# Activations the fused bias kernels compute ("none": a plain bias add); swiglu takes the torch path.
BIAS_ACTIVATIONS = ("gelu", "silu", "none")
# Tiles on GPU (rows, features, warps), forward and backward alike: the best of a sweep of 32-128 rows x 64-256
# features x 4 or 8 warps at SwitchMoE's TARGETS.md shape (benchmarks/tune_moe_kernels.py, H200, 2026-11-30). With
# libdevice's erf the GELU kernels were compute-bound (~2.5 TB/s) and the old 64 x 128 x 4 tile took 121.5 µs forward
# and 254.5 backward on 16384 x 4096; with _gauss_cdf's erf and this tile 83.6 and 140.5 (3.2 and 2.9 TB/s).
BIAS_BLOCKS_CUDA = (32, 128, 4)
BIAS_BLOCK_R_INTERPRET, BIAS_BLOCK_W_INTERPRET = 4, 8
_ACT_CODE = {"none": 0, "gelu": 1, "silu": 2}


@_jit
def _gauss_cdf(x):
    """Phi(x), the standard normal CDF = (1 + erf(x / sqrt 2)) / 2, and exp(-x^2 / 2), in float32. erf by
    Abramowitz & Stegun 7.1.26 (absolute error <= 1.5e-7, below float32's rounding of x Phi(x) for |x| >~ 1; and
    exactly what GELU's derivative needs: its exponential is the normal density's). libdevice's erf costs ~30
    instructions per element, enough to make the GELU kernels compute-bound at ~2.5 TB/s on an H200; this costs ~12
    (one reciprocal, one exp2)."""
    # t = 1 / (1 + p z) with z = |x| / sqrt 2; the polynomial's coefficients a_i / 2, so that it gives Phi(-|x|).
    t = tl.math.fdiv(tl.full(x.shape, 1.0, tl.float32), 1.0 + 0.23164189825822543 * tl.abs(x), ieee_rounding=False)
    poly = t * (0.127414796 + t * (-0.142248368 + t * (0.7107068705 + t * (-0.7265760135 + t * 0.5307027145))))
    e = tl.exp2(x * (x * -0.7213475204444817))  # exp(-x^2 / 2) = exp(-z^2)
    tail = poly * e  # Phi(-|x|), with no cancellation in the tail
    return tl.where(x >= 0.0, 1.0 - tail, tail), e


@_jit
def _act_fwd(x, ACT: tl.constexpr):
    """ACT 1: GELU, nn.GELU's default (erf) form, to float32 accuracy (_gauss_cdf); 2: SiLU; 0: the identity."""
    y = x
    if ACT == 1:
        cdf, _ = _gauss_cdf(x)
        y = x * cdf
    if ACT == 2:
        y = x * tl.sigmoid(x)
    return y


@_jit
def _act_grad(x, ACT: tl.constexpr):
    """d act / dx for ACT 1 (GELU: Phi(x) + x phi(x)) or 2 (SiLU)."""
    if ACT == 1:
        cdf, e = _gauss_cdf(x)
        dy = cdf + x * e * 0.3989422804014327
    else:
        sig = tl.sigmoid(x)
        dy = sig * (1.0 + x * (1.0 - sig))
    return dy


@_jit
def row_expert(rows, mask, expert_ptr, capacity, PADDED: tl.constexpr):
    """The expert of each buffer row: row // capacity in the padded layout, expert_of_slot in the grouped one; -1
    where masked."""
    if PADDED:
        expert = tl.where(mask, rows // capacity, -1)
    else:
        expert = tl.load(expert_ptr + rows, mask=mask, other=-1)
    return expert


@_jit
def block_experts(first_row, last_row, expert_ptr, capacity, PADDED: tl.constexpr):
    """(first, last): the experts of a block's first and last row (rows are sorted by expert in both layouts, so the
    block holds rows of exactly the experts first..last)."""
    if PADDED:
        return first_row // capacity, last_row // capacity
    else:
        return tl.load(expert_ptr + first_row), tl.load(expert_ptr + last_row)


@_jit
def store_bias_partials(partial_ptr, block, values, expert, first, last, offs_w, mask_w, width):
    """For each expert e in first..last, the column sums of the block's float32 ``values`` (BLOCK, BLOCK_W) over e's
    rows (``expert``), stored at partial row block + e: the layout reduce_bias_partials sums. Along the sorted rows
    (block, expert) pairs form a staircase, so block + e is unique to each pair: every partial has one writer."""
    for e in range(first, last + 1):
        column = tl.sum(tl.where((expert == e)[:, None], values, 0.0), axis=0)
        tl.store(partial_ptr + (block + e) * width + offs_w, column, mask=mask_w)


@_jit
def _bias_act_fwd_kernel(
    h_ptr,  # (rows, width) contiguous, matmul output
    bias_ptr,  # (num_experts, width)
    expert_ptr,  # (rows,) int64 expert of each row (grouped layout; not read with PADDED)
    out_ptr,  # (rows, width) in h's dtype
    n_rows, width, capacity,  # capacity: rows per expert of the padded layout
    ACT: tl.constexpr, PADDED: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_W: tl.constexpr,
):
    """One program per (block of rows, block of features): out = act(h + bias[expert of the row]), in float32."""
    offs_r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_w = tl.program_id(1) * BLOCK_W + tl.arange(0, BLOCK_W)
    mask_r = offs_r < n_rows
    mask = mask_r[:, None] & (offs_w < width)[None, :]
    expert = row_expert(offs_r, mask_r, expert_ptr, capacity, PADDED)
    tile = offs_r.to(tl.int64)[:, None] * width + offs_w[None, :]
    pre = tl.load(h_ptr + tile, mask=mask, other=0.0).to(tl.float32) \
        + tl.load(bias_ptr + expert[:, None] * width + offs_w[None, :], mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + tile, _act_fwd(pre, ACT).to(out_ptr.dtype.element_ty), mask=mask)


@_jit
def _bias_act_bwd_kernel(
    grad_ptr,  # (rows, width) gradient of the output
    h_ptr, bias_ptr, expert_ptr,  # the forward's inputs
    grad_h_ptr,  # (rows, width) in h's dtype (not written for ACT == 0: it is grad itself)
    partial_ptr,  # (n_row_blocks + num_experts, width) float32: bias-gradient partial sums
    n_rows, width, capacity,  # capacity: rows per expert of the padded layout
    ACT: tl.constexpr, PADDED: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_W: tl.constexpr,
):
    """One program per (block of rows, block of features): grad_h = grad * act'(h + bias[e]); and, for each expert
    e with rows in this block, the block's column sums of grad_h over e's rows at partial row (block + e)
    (store_bias_partials), which reduce_bias_partials sums in a fixed order."""
    pid_r = tl.program_id(0)
    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_w = tl.program_id(1) * BLOCK_W + tl.arange(0, BLOCK_W)
    mask_r = offs_r < n_rows
    mask_w = offs_w < width
    mask = mask_r[:, None] & mask_w[None, :]
    expert = row_expert(offs_r, mask_r, expert_ptr, capacity, PADDED)
    tile = offs_r.to(tl.int64)[:, None] * width + offs_w[None, :]
    grad = tl.load(grad_ptr + tile, mask=mask, other=0.0).to(tl.float32)
    if ACT != 0:
        pre = tl.load(h_ptr + tile, mask=mask, other=0.0).to(tl.float32) \
            + tl.load(bias_ptr + expert[:, None] * width + offs_w[None, :], mask=mask, other=0.0).to(tl.float32)
        grad = grad * _act_grad(pre, ACT)
        tl.store(grad_h_ptr + tile, grad.to(grad_h_ptr.dtype.element_ty), mask=mask)
    first, last = block_experts(pid_r * BLOCK_R, tl.minimum(pid_r * BLOCK_R + BLOCK_R, n_rows) - 1, expert_ptr,
                                capacity, PADDED)
    store_bias_partials(partial_ptr, pid_r, grad, expert, first, last, offs_w, mask_w, width)


@_jit
def _bias_grad_kernel(
    partial_ptr,  # (n_row_blocks + num_experts, width) float32
    group_ends_ptr,  # (num_experts,) int32 end row of each expert (grouped layout; not read with PADDED)
    grad_bias_ptr,  # (num_experts, width) in the bias's dtype
    width, capacity,  # capacity: rows per expert of the padded layout
    PADDED: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_W: tl.constexpr, PARTS: tl.constexpr,
):
    """One program per (expert, block of features): the sum of the partials of the row blocks the expert's rows
    span, PARTS partials per step (a fixed order: deterministic); 0 for an expert without rows. One partial per
    step left each program waiting on one load at a time (10.7 µs for the 16384 x 4096 layer's bias on an H200)."""
    e = tl.program_id(0)
    offs_w = tl.program_id(1) * BLOCK_W + tl.arange(0, BLOCK_W)
    mask_w = offs_w < width
    if PADDED:
        start = e * capacity
        end = start + capacity
    else:
        end = tl.load(group_ends_ptr + e)
        start = tl.load(group_ends_ptr + e - 1, mask=e > 0, other=0)
    acc = tl.zeros((BLOCK_W,), dtype=tl.float32)
    stop = tl.where(end > start, (end - 1) // BLOCK_R + 1, start // BLOCK_R)  # no rows: no partial to read
    for b0 in range(start // BLOCK_R, stop, PARTS):
        offs_b = b0 + tl.arange(0, PARTS)
        parts = tl.load(partial_ptr + (offs_b + e)[:, None] * width + offs_w[None, :],
                        mask=(offs_b < stop)[:, None] & mask_w[None, :], other=0.0)
        acc += tl.sum(parts, axis=0)
    tl.store(grad_bias_ptr + e * width + offs_w, acc.to(grad_bias_ptr.dtype.element_ty), mask=mask_w)


def reduce_bias_partials(partial: Tensor, group_ends: Tensor | None, out: Tensor, capacity: int, block_r: int,
                         block_w: int, warps: int, interpreting: bool) -> None:
    """out (num_experts, width) = each expert's sum of the (n_row_blocks + num_experts, width) float32 partials that
    a backward kernel with BLOCK_R = ``block_r`` rows per program wrote (row block b's column sums for expert e at
    row b + e), in a fixed order. The experts' rows: ``group_ends`` (grouped layout, ``capacity`` 0) or ``capacity``
    rows each (padded). Used by bias + activation's backward and by combine's (the experts' output bias)."""
    num_experts, width = out.shape
    parts = 2 if interpreting else 16  # 2: the tests' small experts span several steps
    _bias_grad_kernel[(num_experts, cdiv(width, block_w))](
        partial, group_ends if group_ends is not None else partial, out, width, max(capacity, 1), PADDED=capacity > 0,
        BLOCK_R=block_r, BLOCK_W=block_w, PARTS=parts, num_warps=warps)


def _bias_blocks(interpreting: bool) -> tuple[int, int, int]:
    """(rows, features, num_warps) of the bias kernels' tiles."""
    if interpreting:
        return BIAS_BLOCK_R_INTERPRET, BIAS_BLOCK_W_INTERPRET, 1
    return BIAS_BLOCKS_CUDA


def _moe_bias_act(h: Tensor, bias: Tensor, expert_of_slot: Tensor, group_ends: Tensor, activation: str,
                  capacity: int) -> Tensor:
    """(rows, width) h, (num_experts, width) bias -> act(h + bias[expert_of_slot]) (rows, width) in h's dtype.
    ``capacity`` > 0: the padded layout, row r belongs to expert r // capacity (expert_of_slot, group_ends unread)."""
    interpreting = _interpreting()
    check_triton_runtime("bias_act", h.device, interpreting)
    h_k, bias_k = (for_kernel(t.contiguous(), interpreting) for t in (h, bias))
    n_rows, width = h.shape
    out = torch.empty(n_rows, width, device=h.device, dtype=h_k.dtype)
    if out.numel() > 0:
        block_r, block_w, warps = _bias_blocks(interpreting)
        grid = (cdiv(n_rows, block_r), cdiv(width, block_w))
        _bias_act_fwd_kernel[grid](h_k, bias_k, expert_of_slot.contiguous(), out, n_rows, width, max(capacity, 1),
                                   ACT=_ACT_CODE[activation], PADDED=capacity > 0, BLOCK_R=block_r, BLOCK_W=block_w,
                                   num_warps=warps)
    return out if out.dtype == h.dtype else out.to(h.dtype)


moe_bias_act_op = torch.library.custom_op("mamba_r1::moe_bias_act", mutates_args=())(_moe_bias_act)


@moe_bias_act_op.register_fake
def _(h, bias, expert_of_slot, group_ends, activation, capacity):
    return torch.empty_like(h, memory_format=torch.contiguous_format)


def _moe_bias_act_bwd(grad: Tensor, h: Tensor, bias: Tensor, expert_of_slot: Tensor, group_ends: Tensor,
                      activation: str, capacity: int) -> tuple[Tensor, Tensor]:
    """-> grad_h (rows, width) in h's dtype (empty for activation "none": grad_h is grad), grad_bias like bias."""
    interpreting = _interpreting()
    check_triton_runtime("bias_act", h.device, interpreting)
    grad_k, h_k, bias_k = (for_kernel(t.contiguous(), interpreting) for t in (grad, h, bias))
    n_rows, width = h.shape
    num_experts = bias.shape[0]
    block_r, block_w, warps = _bias_blocks(interpreting)
    n_blocks = cdiv(n_rows, block_r)
    act = _ACT_CODE[activation]
    grad_h = torch.empty(n_rows if act else 0, width, device=h.device, dtype=h_k.dtype)
    partial = torch.empty(n_blocks + num_experts, width, device=h.device, dtype=torch.float32)
    grad_bias = torch.empty(bias.shape, device=h.device, dtype=bias_k.dtype)
    if n_rows > 0:
        _bias_act_bwd_kernel[(n_blocks, cdiv(width, block_w))](
            grad_k, h_k, bias_k, expert_of_slot.contiguous(), grad_h if act else grad_k, partial, n_rows, width,
            max(capacity, 1), ACT=act, PADDED=capacity > 0, BLOCK_R=block_r, BLOCK_W=block_w, num_warps=warps)
    reduce_bias_partials(partial, group_ends, grad_bias, capacity, block_r, block_w, warps, interpreting)
    return grad_h.to(h.dtype), grad_bias.to(bias.dtype)


moe_bias_act_bwd_op = torch.library.custom_op("mamba_r1::moe_bias_act_bwd", mutates_args=())(_moe_bias_act_bwd)


@moe_bias_act_bwd_op.register_fake
def _(grad, h, bias, expert_of_slot, group_ends, activation, capacity):
    rows = h.shape[0] if activation != "none" else 0
    return h.new_empty(rows, h.shape[1]), torch.empty_like(bias)


def _bias_act_setup_context(ctx, inputs, output):
    h, bias, expert_of_slot, group_ends, activation, capacity = inputs
    # A plain bias add's backward never reads h: do not keep it alive.
    ctx.save_for_backward(h if activation != "none" else None, bias, expert_of_slot, group_ends)
    ctx.activation, ctx.capacity = activation, capacity


def _bias_act_backward(ctx, grad):
    h, bias, expert_of_slot, group_ends = ctx.saved_tensors
    if h is None:
        h = grad  # only its shape is used
    grad_h, grad_bias = backward_op(ctx, moe_bias_act_bwd_op, _moe_bias_act_bwd)(
        grad, h, bias, expert_of_slot, group_ends, ctx.activation, ctx.capacity)
    return (grad if ctx.activation == "none" else grad_h), grad_bias, None, None, None, None


moe_bias_act_op.register_autograd(_bias_act_backward, setup_context=_bias_act_setup_context)
_BiasActEager = eager_function("_BiasActEager", _moe_bias_act, _bias_act_setup_context, _bias_act_backward)


def bias_act(h: torch.Tensor, bias: torch.Tensor, plan: DispatchPlan, activation: str) -> torch.Tensor:
    """act(h + bias[expert of each row]) over the buffer's rows, activation one of BIAS_ACTIVATIONS, as one kernel
    forward and two backward (the bias gradient is a deterministic per-expert segment sum). A row's expert is
    ``plan.expert_of_slot`` in the grouped layout, row // ``plan.capacity`` in the padded one. The torch composition
    it replaces: ``ffn_activation(h + bias[expert of each row])``."""
    if plan.capacity is not None:
        # The padded layout needs no index tensors: the bias stands in for the two unread ones.
        return run_op(moe_bias_act_op, _BiasActEager, h, bias, bias, bias, activation, plan.capacity)
    return run_op(moe_bias_act_op, _BiasActEager, h, bias, plan.expert_of_slot, plan.group_ends, activation, 0)


def _ffn_matmul(x: Tensor, w: Tensor, plan: DispatchPlan) -> Tensor:
    """(slots, in) buffer rows @ each row's expert's (in, out) weight -> (slots, out): the grouped GEMM kernel (or
    torch._grouped_mm where it does not apply) over the grouped plan's segments, or a bmm over the padded plan's
    (num_experts, capacity) blocks."""
    if plan.group_ends is not None:
        return grouped_gemm(x, w, plan.group_ends)
    num_experts = w.shape[0]
    return torch.bmm(x.view(num_experts, plan.capacity, x.shape[-1]), w).view(-1, w.shape[-1])


def _ffn_matmul_backward(x: Tensor, w: Tensor, grad: Tensor, plan: DispatchPlan, need_x: bool, need_w: bool):
    """Gradients of _ffn_matmul for x (slots, in) and w (num_experts, in, out) from grad (slots, out), as
    _GroupedMatmul's backward and autograd's bmm backward compute them (x's through the grouped GEMM kernel where it
    applies; the weight's, grouped along the rows, on torch._grouped_mm)."""
    grad_x = grad_w = None
    if plan.group_ends is not None:
        if need_x:
            grad_x = grouped_gemm(grad, w.transpose(-2, -1), plan.group_ends)
        if need_w:
            grad_w = torch._grouped_mm(x.t(), grad, offs=plan.group_ends)
        return grad_x, grad_w
    num_experts, capacity = w.shape[0], plan.capacity
    grad_3d = grad.view(num_experts, capacity, grad.shape[-1])
    if need_x:
        grad_x = torch.bmm(grad_3d, w.transpose(1, 2)).view(-1, w.shape[1])
    if need_w:
        grad_w = torch.bmm(x.view(num_experts, capacity, x.shape[-1]).transpose(1, 2), grad_3d)
    return grad_x, grad_w


def _bias_layout(plan: DispatchPlan, bias: Tensor) -> tuple[Tensor, Tensor, int]:
    """(expert_of_slot, group_ends, capacity) as the bias kernels take them: the index tensors for the grouped
    layout (capacity 0); for the padded one its capacity, with the bias standing in for the unread index tensors."""
    if plan.group_ends is not None:
        return plan.expert_of_slot, plan.group_ends, 0
    return bias, bias, plan.capacity


class _ExpertFFNEager(torch.autograd.Function):
    """act(rows @ w1 + b1) @ w2 over the buffer (no output bias) as one autograd node: the same kernels, in the same
    order, as the composition grouped_matmul / bmm -> bias_act -> grouped_matmul / bmm, and the same saved
    tensors, but one node in the backward instead of three. Each node costs the autograd engine's device thread host
    time (2-4.6x its body on the lent H200's host, benchmarks/moe_breakdown.py) and the eager layer is host-bound."""

    @staticmethod
    def forward(ctx, rows, w1, b1, w2, plan, activation):
        expert_of_slot, group_ends, capacity = _bias_layout(plan, b1)
        h = _ffn_matmul(rows, w1, plan)  # (slots, expert_dim) before the bias
        hidden = _moe_bias_act(h, b1, expert_of_slot, group_ends, activation, capacity)  # (slots, expert_dim)
        ctx.save_for_backward(rows, w1, h if activation != "none" else None, b1, hidden, w2)
        ctx.plan, ctx.activation = plan, activation
        return _ffn_matmul(hidden, w2, plan)  # (slots, dim)

    @staticmethod
    def backward(ctx, grad_y):
        rows, w1, h, b1, hidden, w2 = ctx.saved_tensors
        plan, activation = ctx.plan, ctx.activation
        need_rows, need_w1, need_b1, need_w2 = ctx.needs_input_grad[:4]
        need_hidden = need_rows or need_w1 or need_b1
        grad_hidden, grad_w2 = _ffn_matmul_backward(hidden, w2, grad_y.contiguous(), plan, need_hidden, need_w2)
        grad_rows = grad_w1 = grad_b1 = None
        if need_hidden:
            expert_of_slot, group_ends, capacity = _bias_layout(plan, b1)
            grad_h, grad_b1 = _moe_bias_act_bwd(grad_hidden, h if h is not None else grad_hidden, b1, expert_of_slot,
                                                group_ends, activation, capacity)
            if activation == "none":
                grad_h = grad_hidden
            grad_rows, grad_w1 = _ffn_matmul_backward(rows, w1, grad_h, plan, need_rows, need_w1)
        return grad_rows, grad_w1, grad_b1 if need_b1 else None, grad_w2, None, None


def _expert_ffn_composed(rows, plan: DispatchPlan, w1, b1, w2, activation: str):
    """_ExpertFFNEager as a composition of three differentiable ops (what torch.compile traces)."""
    if plan.group_ends is not None:
        h = bias_act(grouped_matmul(rows, w1, plan.group_ends), b1, plan, activation)  # (slots, expert_dim)
        return grouped_matmul(h, w2, plan.group_ends)  # (slots, dim)
    num_experts, capacity = w1.shape[0], plan.capacity
    h = torch.bmm(rows.view(num_experts, capacity, rows.shape[-1]), w1)  # (num_experts, capacity, expert_dim)
    h = bias_act(h.view(-1, h.shape[-1]), b1, plan, activation)  # (slots, expert_dim)
    return torch.bmm(h.view(num_experts, capacity, h.shape[-1]), w2).view(-1, w2.shape[-1])  # (slots, dim)


def expert_ffn_fused(rows, plan: DispatchPlan, w1, b1, w2, b2, activation: str, backend: str = "auto"):
    """``expert_ffn`` with the bias adds and activation fused into kernels (CUDA, or CPU under TRITON_INTERPRET=1
    with backend="triton"), for both layouts; every other case (swiglu, no first bias) is ``expert_ffn`` itself.
    ``b2`` None leaves the output bias out (SwitchMoE adds it in ``combine``). Eagerly the two matmuls and the
    bias + activation are one autograd node (_ExpertFFNEager); under torch.compile three ops. In the padded layout
    this replaces baddbmm, whose broadcast bias cuBLAS first copies into the whole output."""
    name = resolve_backend("expert_ffn", backend, rows.device)
    if name == "torch" or triton is None or activation not in BIAS_ACTIVATIONS or b1 is None:
        return expert_ffn(rows, plan, w1, b1, w2, b2, activation)
    if eager_custom_ops.tracing():
        y = _expert_ffn_composed(rows, plan, w1, b1, w2, activation)
    else:
        y = _ExpertFFNEager.apply(rows, w1, b1, w2, plan, activation)
    return bias_act(y, b2, plan, "none") if b2 is not None else y  # (slots, dim)


def _interpreting() -> bool:
    """Whether this module's kernels run on Triton's CPU interpreter (see built_for_interpreter)."""
    return built_for_interpreter(_bias_act_fwd_kernel)


__all__ = ["BIAS_ACTIVATIONS", "bias_act", "expert_ffn_fused", "moe_bias_act_bwd_op", "moe_bias_act_op",
           "reduce_bias_partials"]
