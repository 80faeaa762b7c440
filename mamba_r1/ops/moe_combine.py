"""The MoE combine as one Triton kernel forward and one backward: the experts' output rows (plus their output
bias) weighted back into token order, ``combine_tokens`` of moe_dispatch.py (the specification and the torch path).

The forward gathers each token's rows (one program per block of tokens x features); the backward walks each block of
buffer rows once, writing the rows' gradient and the combine weights' (a dot product per row; each assignment owns
at most one row, so there is one writer per value and no atomics) and, with a bias, per-(row block, expert) column
sums that moe_expert_ffn's fixed-order reduction turns into the bias gradient: deterministic.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from mamba_r1.ops.eager_custom_ops import backward_op, eager_function, run_op
from mamba_r1.ops.moe_dispatch import DispatchPlan, combine_tokens
from mamba_r1.ops.moe_expert_ffn import block_experts, reduce_bias_partials, row_expert, store_bias_partials
from mamba_r1.ops.triton_runtime import (
    built_for_interpreter,
    cdiv,
    check_triton_runtime,
    for_kernel,
    next_power_of_2,
    resolve_backend,
    tl,
    triton,
)
from mamba_r1.ops.triton_runtime import jit as _jit

# Combine tiles on GPU: 64 tokens (or slots) x 128 features per program, 4 warps, from benchmarks/tune_moe_kernels.py
# on an H200 (the backward's best; every forward tile is within 3%). Interpreter: 4 x 8.
COMBINE_BLOCK_T_CUDA, COMBINE_BLOCK_D_CUDA, COMBINE_WARPS_CUDA = 64, 128, 4
COMBINE_BLOCK_T_INTERPRET, COMBINE_BLOCK_D_INTERPRET = 4, 8


@_jit
def _combine_fwd_kernel(
    rows_ptr,  # (slots, dim) expert outputs
    weights_ptr,  # (tokens, TOP_K) float32
    slot_of_ptr,  # (tokens, TOP_K) int64
    bias_ptr,  # (num_experts, dim) output bias of the experts (read with HAS_BIAS)
    expert_ptr,  # (slots,) int64 expert of each row (grouped layout with HAS_BIAS)
    out_ptr,  # (tokens, dim) in rows' dtype
    tokens, dim, capacity,  # capacity: rows per expert of the padded layout
    TOP_K: tl.constexpr, HAS_BIAS: tl.constexpr, PADDED: tl.constexpr, BLOCK_T: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """One program per (block of tokens, block of features): out[t] = sum_j round(w[t, j]) * row_j with row_j =
    rows[slot_of[t, j]] (+ bias[its expert], rounded to rows' dtype, as a separate bias kernel would store it),
    each product rounded to rows' dtype and the sum accumulated in float32, as the torch composition does."""
    offs_t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_t = offs_t < tokens
    mask = mask_t[:, None] & (offs_d < dim)[None, :]
    rows_ty = rows_ptr.dtype.element_ty
    acc = tl.zeros((BLOCK_T, BLOCK_D), dtype=tl.float32)
    for j in tl.static_range(TOP_K):
        pair = offs_t.to(tl.int64) * TOP_K + j
        slot = tl.load(slot_of_ptr + pair, mask=mask_t, other=0)
        weight = tl.load(weights_ptr + pair, mask=mask_t, other=0.0).to(rows_ty).to(tl.float32)
        row = tl.load(rows_ptr + slot[:, None] * dim + offs_d[None, :], mask=mask, other=0.0).to(tl.float32)
        if HAS_BIAS:
            expert = row_expert(slot, mask_t, expert_ptr, capacity, PADDED)
            row += tl.load(bias_ptr + expert[:, None] * dim + offs_d[None, :], mask=mask, other=0.0).to(tl.float32)
            row = row.to(rows_ty).to(tl.float32)
        acc += (row * weight[:, None]).to(rows_ty).to(tl.float32)
    tl.store(out_ptr + offs_t.to(tl.int64)[:, None] * dim + offs_d[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=mask)


@_jit
def _combine_bwd_kernel(
    grad_out_ptr,  # (tokens, dim)
    rows_ptr,  # (slots, dim)
    weights_ptr,  # (tokens, TOP_K) float32
    token_of_slot_ptr, assignment_of_slot_ptr,  # (slots,) int64
    bias_ptr, expert_ptr,  # as in the forward (read with HAS_BIAS)
    grad_rows_ptr,  # (slots, dim) in rows' dtype
    grad_weights_ptr,  # (tokens * TOP_K,) float32; entries of assignments without a row are left alone
    partial_ptr,  # (n_slot_blocks + num_experts, dim) float32 bias-gradient partial sums (written with HAS_BIAS)
    slots, dim, assignments, capacity,
    HAS_BIAS: tl.constexpr, PADDED: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """One program per block of slots, walking the features: grad_rows[s] = w[a] * grad_out[t] (0 for a row nobody
    owns) and grad_w[a] = <row s (+ its expert's bias), grad_out[t]>, for the assignment a = t * TOP_K + j that owns
    row s. Each assignment owns at most one row, so every write has one writer: no atomics, deterministic. With
    HAS_BIAS the bias gradient (the sum of grad_rows over each expert's rows) leaves as per-(block, expert) column
    sums at partial row block + expert (moe_expert_ffn.store_bias_partials, as bias + activation's backward)."""
    pid = tl.program_id(0)
    offs_s = pid * BLOCK_S + tl.arange(0, BLOCK_S)
    mask_s = offs_s < slots
    rows_ty = rows_ptr.dtype.element_ty
    assignment = tl.load(assignment_of_slot_ptr + offs_s, mask=mask_s, other=assignments)
    owned = mask_s & (assignment < assignments)
    token = tl.load(token_of_slot_ptr + offs_s, mask=mask_s, other=0)
    weight = tl.load(weights_ptr + assignment, mask=owned, other=0.0).to(rows_ty).to(tl.float32)
    if HAS_BIAS:
        expert = row_expert(offs_s, mask_s, expert_ptr, capacity, PADDED)
        first, last = block_experts(pid * BLOCK_S, tl.minimum(pid * BLOCK_S + BLOCK_S, slots) - 1, expert_ptr,
                                    capacity, PADDED)
    dot = tl.zeros((BLOCK_S,), dtype=tl.float32)
    for d0 in range(0, dim, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        mask_d = offs_d < dim
        mask = mask_s[:, None] & mask_d[None, :]
        grad = tl.load(grad_out_ptr + token[:, None] * dim + offs_d[None, :], mask=mask, other=0.0)
        grad = grad.to(rows_ty).to(tl.float32)
        row = tl.load(rows_ptr + offs_s.to(tl.int64)[:, None] * dim + offs_d[None, :], mask=mask,
                      other=0.0).to(tl.float32)
        if HAS_BIAS:
            row += tl.load(bias_ptr + expert[:, None] * dim + offs_d[None, :], mask=mask, other=0.0).to(tl.float32)
            row = row.to(rows_ty).to(tl.float32)
        dot += tl.sum(row * grad, axis=1)
        grad_rows = (grad * weight[:, None]).to(grad_rows_ptr.dtype.element_ty)
        tl.store(grad_rows_ptr + offs_s.to(tl.int64)[:, None] * dim + offs_d[None, :], grad_rows, mask=mask)
        if HAS_BIAS:
            store_bias_partials(partial_ptr, pid, grad_rows.to(tl.float32), expert, first, last, offs_d, mask_d, dim)
    tl.store(grad_weights_ptr + assignment, dot, mask=owned)


def _combine_blocks(interpreting: bool) -> tuple[int, int, int]:
    if interpreting:
        return COMBINE_BLOCK_T_INTERPRET, COMBINE_BLOCK_D_INTERPRET, 1
    return COMBINE_BLOCK_T_CUDA, COMBINE_BLOCK_D_CUDA, COMBINE_WARPS_CUDA


def _moe_combine(rows: Tensor, weights: Tensor, slot_of: Tensor, token_of_slot: Tensor,
                 assignment_of_slot: Tensor, every_assignment_owns_a_row: bool, bias: Optional[Tensor],
                 expert_of_slot: Optional[Tensor], group_ends: Optional[Tensor], capacity: int) -> Tensor:
    """(slots, dim) rows, (tokens, top_k) weights -> (tokens, dim) in rows' dtype (``combine_tokens``), with the
    experts' (num_experts, dim) output ``bias`` added to each row first when given: a row's expert is
    ``expert_of_slot`` (grouped layout, ``capacity`` 0) or row // ``capacity`` (padded layout)."""
    interpreting = _interpreting()
    check_triton_runtime("combine_tokens", rows.device, interpreting)
    rows_k, bias_k = (for_kernel(t.contiguous() if t is not None else None, interpreting) for t in (rows, bias))
    weights, slot_of = weights.contiguous(), slot_of.contiguous()
    tokens, top_k = slot_of.shape
    dim = rows.shape[-1]
    out = torch.empty(tokens, dim, device=rows.device, dtype=rows_k.dtype)
    if out.numel() > 0:
        block_t, block_d, warps = _combine_blocks(interpreting)
        grid = (cdiv(tokens, block_t), cdiv(dim, block_d))
        _combine_fwd_kernel[grid](rows_k, weights, slot_of, bias_k if bias is not None else rows_k,
                                  expert_of_slot if expert_of_slot is not None else slot_of, out, tokens, dim,
                                  max(capacity, 1), TOP_K=top_k, HAS_BIAS=bias is not None, PADDED=capacity > 0,
                                  BLOCK_T=block_t, BLOCK_D=block_d, num_warps=warps)
    return out if out.dtype == rows.dtype else out.to(rows.dtype)


moe_combine_op = torch.library.custom_op("mamba_r1::moe_combine", mutates_args=())(_moe_combine)


@moe_combine_op.register_fake
def _(rows, weights, slot_of, token_of_slot, assignment_of_slot, every_assignment_owns_a_row, bias, expert_of_slot,
      group_ends, capacity):
    return rows.new_empty(slot_of.shape[0], rows.shape[-1])


def _moe_combine_bwd(grad_out: Tensor, rows: Tensor, weights: Tensor, token_of_slot: Tensor,
                     assignment_of_slot: Tensor, every_assignment_owns_a_row: bool, bias: Optional[Tensor],
                     expert_of_slot: Optional[Tensor], group_ends: Optional[Tensor],
                     capacity: int) -> tuple[Tensor, Tensor, Tensor]:
    """-> grad_rows (slots, dim) in rows' dtype, grad_weights (tokens, top_k) float32 (0 where no row is owned),
    grad_bias like bias (an empty tensor without one)."""
    interpreting = _interpreting()
    check_triton_runtime("combine_tokens", rows.device, interpreting)
    grad_k, rows_k, bias_k = (for_kernel(t.contiguous() if t is not None else None, interpreting)
                              for t in (grad_out, rows, bias))
    weights, token_of_slot, assignment_of_slot = (t.contiguous() for t in (weights, token_of_slot,
                                                                          assignment_of_slot))
    slots, dim = rows.shape
    block_s, block_d, warps = _combine_blocks(interpreting)
    n_blocks = cdiv(slots, block_s)
    grad_rows = torch.empty(slots, dim, device=rows.device, dtype=rows_k.dtype)
    # A dropped assignment of the padded layout has no row, hence no writer: start from zeros there.
    new = torch.empty_like if every_assignment_owns_a_row else torch.zeros_like
    grad_weights = new(weights, dtype=torch.float32)
    has_bias = bias is not None
    num_experts = bias.shape[0] if has_bias else 0
    partial = torch.empty(n_blocks + num_experts if has_bias else 0, dim, device=rows.device, dtype=torch.float32)
    grad_bias = torch.empty(bias.shape if has_bias else (0,), device=rows.device, dtype=torch.float32)
    if grad_rows.numel() > 0:
        _combine_bwd_kernel[(n_blocks,)](
            grad_k, rows_k, weights, token_of_slot, assignment_of_slot, bias_k if has_bias else rows_k,
            expert_of_slot if expert_of_slot is not None else token_of_slot, grad_rows, grad_weights,
            partial if has_bias else grad_weights, slots, dim, weights.numel(), max(capacity, 1),
            HAS_BIAS=has_bias, PADDED=capacity > 0, BLOCK_S=block_s, BLOCK_D=block_d, num_warps=warps,
        )
    if has_bias and grad_rows.numel() == 0:
        grad_bias = torch.zeros_like(bias)
    elif has_bias:
        reduce_bias_partials(partial, group_ends, grad_bias, capacity, block_s,
                             min(block_d, next_power_of_2(max(dim, 1))), warps, interpreting)
        grad_bias = grad_bias.to(bias.dtype)
    return (grad_rows if grad_rows.dtype == rows.dtype else grad_rows.to(rows.dtype)), grad_weights, grad_bias


moe_combine_bwd_op = torch.library.custom_op("mamba_r1::moe_combine_bwd", mutates_args=())(_moe_combine_bwd)


@moe_combine_bwd_op.register_fake
def _(grad_out, rows, weights, token_of_slot, assignment_of_slot, every_assignment_owns_a_row, bias, expert_of_slot,
      group_ends, capacity):
    grad_bias = torch.empty_like(bias) if bias is not None else rows.new_empty(0, dtype=torch.float32)
    return torch.empty_like(rows), torch.empty_like(weights, dtype=torch.float32), grad_bias


def _combine_setup_context(ctx, inputs, output):
    rows, weights, slot_of, token_of_slot, assignment_of_slot, owned, bias, expert_of_slot, group_ends, capacity = \
        inputs
    ctx.save_for_backward(rows, weights, token_of_slot, assignment_of_slot, bias, expert_of_slot, group_ends)
    ctx.owned, ctx.capacity = owned, capacity


def _combine_backward(ctx, grad_out):
    rows, weights, token_of_slot, assignment_of_slot, bias, expert_of_slot, group_ends = ctx.saved_tensors
    grad_rows, grad_weights, grad_bias = backward_op(ctx, moe_combine_bwd_op, _moe_combine_bwd)(
        grad_out, rows, weights, token_of_slot, assignment_of_slot, ctx.owned, bias, expert_of_slot, group_ends,
        ctx.capacity)
    return (grad_rows, grad_weights.to(weights.dtype), None, None, None, None,
            grad_bias if bias is not None else None, None, None, None)


moe_combine_op.register_autograd(_combine_backward, setup_context=_combine_setup_context)
_CombineEager = eager_function("_CombineEager", _moe_combine, _combine_setup_context, _combine_backward)


def _row_experts(plan: DispatchPlan, slots: int, device) -> torch.Tensor:
    """(slots,) int64 expert of each buffer row: the grouped plan's expert_of_slot, row // capacity when padded."""
    if plan.expert_of_slot is not None:
        return plan.expert_of_slot
    return torch.arange(slots, device=device) // max(plan.capacity, 1)


def combine(rows: torch.Tensor, weights: torch.Tensor, plan: DispatchPlan, backend: str = "auto",
            bias: torch.Tensor | None = None) -> torch.Tensor:
    """``combine_tokens`` (moe_dispatch.py, the torch path and the specification) as one kernel forward and one
    backward: (slots, dim) expert outputs, (tokens, top_k) float32 weights -> (tokens, dim). ``bias``
    (num_experts, dim), the experts' output bias, is added to each row first (rounded to rows' dtype, as a bias
    kernel would store it): SwitchMoE adds its experts' second bias here instead of in a pass of its own. ``backend``:
    "torch", "triton" (CUDA, or CPU under TRITON_INTERPRET=1) or "auto" (triton on CUDA tensors, torch otherwise)."""
    name = resolve_backend("combine_tokens", backend, rows.device)
    if bias is not None and (bias.dim() != 2 or bias.shape[1] != rows.shape[-1]):
        raise ValueError(f"combine: bias must be (num_experts, dim) with dim = rows.shape[-1] = {rows.shape[-1]}; "
                         f"got shape {tuple(bias.shape)}")
    if name == "torch" or triton is None or weights.dtype != torch.float32:
        if bias is not None:
            rows = rows + bias[_row_experts(plan, rows.shape[0], rows.device)].to(rows.dtype)
        return combine_tokens(rows, weights, plan)
    # The torch plans may hand over transposed (tokens, top_k) tensors; the kernels read them contiguous.
    return run_op(moe_combine_op, _CombineEager, rows, weights.contiguous(), plan.slot_of.contiguous(),
                  plan.token_of_slot, plan.assignment_of_slot, plan.owns_slot is None, bias,
                  *combine_bias_layout(plan, bias is not None))


def combine_bias_layout(plan: DispatchPlan, has_bias: bool) -> tuple[Tensor | None, Tensor | None, int]:
    """(expert_of_slot, group_ends, capacity), the combine kernels' arguments that locate each row's expert for the
    output bias: the grouped plan's index tensors (capacity 0; None without a bias), or the padded plan's capacity."""
    if plan.capacity is None:
        return (plan.expert_of_slot, plan.group_ends, 0) if has_bias else (None, None, 0)
    return None, None, plan.capacity


def _interpreting() -> bool:
    """Whether this module's kernels run on Triton's CPU interpreter (see built_for_interpreter)."""
    return built_for_interpreter(_combine_fwd_kernel)


__all__ = ["combine", "combine_bias_layout", "moe_combine_bwd_op", "moe_combine_op"]
