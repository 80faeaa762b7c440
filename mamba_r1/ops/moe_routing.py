"""Fused MoE routing: softmax, top-k, the capacity queue, the dispatch plan and the auxiliary losses in two Triton
launches forward and one backward, where the PyTorch composition in moe_dispatch.py takes ~60 small kernels.

``route_and_plan`` is the public function. Its torch backend *is* the specification, the composition
``route_tokens`` + ``plan_grouped`` / ``plan_padded`` + ``load_balancing_loss`` + ``router_z_loss``; the triton
backend computes the same integers (ranks, keep, plan: exactly equal) and the same floats up to rounding:

    kernel 1, one program per block of tokens: softmax in float32, top-k by repeated argmax (ties to the lower
              expert), gates; per block: how many real tokens made each (choice, expert) pick, the sum of their
              probabilities and of logsumexp^2, and the real-token count;
    kernel 2, one program per block of tokens: from the per-block counts of the blocks before it, each assignment's
              place in its expert's queue (choice-major, then position: ``priority="position"``), keep, the combine
              weights, and the plan (for the grouped layout a counting sort by expert, stable in the flat
              assignment order, which is what ``plan_grouped``'s stable sort gives); program 0 also writes the
              per-expert counts, the group ends and the losses (deterministic: fixed-order sums of the partials);
    backward, one program per block of tokens: the gradient of the router logits from the gates, the combine
              weights, the probabilities and the losses, through the softmax in one pass.

Nothing reads a tensor on the host; buffers are sized from shapes. ``priority="gate"`` (a global sort by router
confidence) has no kernel: it takes the torch path, as does an empty batch.

``route_and_permute`` adds the router's logits before and the token permutation after, as one autograd node
eagerly (x's two gradients formed by one more kernel, ``_token_grad_kernel``). The layer's other kernels: combine
(moe_combine.py), bias + activation and the expert FFN (moe_expert_ffn.py). Every kernel is a torch custom op with a
fake and registered autograd (torch.compile, export, opcheck); eagerly the public functions run the same Python
bodies under plain autograd.Functions (eager_custom_ops.py). Staged, SwitchMoE's backward is three autograd nodes,
route_and_permute's, expert_ffn_fused's and combine's (under torch.compile the compositions of the custom ops); on
the kernels' path SwitchMoE runs them all as one op instead (moe_layer.py), the same bodies in the same order.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
from loguru import logger
from torch import Tensor

from mamba_r1.ops import eager_custom_ops
from mamba_r1.ops.eager_custom_ops import backward_op, eager_function, run_op
from mamba_r1.ops.moe_dispatch import (
    DispatchPlan,
    Routing,
    float32_logits,
    half_input_logits,
    load_balancing_loss,
    logits_backward,
    logits_forward,
    permute_tokens,
    permuted_rows_grad,
    plan_grouped,
    plan_padded,
    route_tokens,
    router_z_loss,
)
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

LAYOUTS = ("grouped", "padded")


class RouterLosses(NamedTuple):
    """The auxiliary losses of one routing, all 0-d float32. ``loss`` and the two losses backpropagate."""

    loss: torch.Tensor  # load_balance_coef * load_balance_loss + z_loss_coef * z_loss
    load_balance_loss: torch.Tensor  # num_experts * sum_i f_i * P_i
    z_loss: torch.Tensor  # mean(logsumexp(logits)^2) over real tokens
    dropped_fraction: torch.Tensor  # share of real-token assignments past capacity


class RoutedTokens(NamedTuple):
    routing: Routing
    plan: DispatchPlan
    weights: torch.Tensor  # (tokens, top_k) float32 combine weights: gates * keep
    losses: RouterLosses | None  # None when the torch backend was not asked for them


# ---------------------------------------------------------------------------------------------- reference


def route_and_plan_ref(logits, top_k, capacity, valid, priority, layout, buffer_capacity, load_balance_coef,
                       z_loss_coef, losses=True) -> RoutedTokens:
    """The plain-PyTorch composition the kernels are tested against (and the CPU path)."""
    routing = route_tokens(logits, top_k, capacity, valid, priority)
    num_experts = logits.shape[-1]
    if layout == "grouped":
        plan = plan_grouped(routing.expert_idx, num_experts, valid)
    else:
        plan = plan_padded(routing.expert_idx, routing.keep, routing.rank, num_experts, buffer_capacity)
    weights = routing.gates * routing.keep
    if not losses:
        return RoutedTokens(routing, plan, weights, None)
    return RoutedTokens(routing, plan, weights,
                        router_losses_ref(logits, routing, valid, load_balance_coef, z_loss_coef))


def router_losses_ref(logits, routing: Routing, valid, load_balance_coef, z_loss_coef) -> RouterLosses:
    balance = load_balancing_loss(routing.probs, routing.routed, valid)
    z_loss = router_z_loss(logits, valid)
    routed = routing.routed.sum()
    dropped = (routed - routing.kept.sum()).float() / routed.clamp(min=1)
    loss = load_balance_coef * balance + z_loss_coef * z_loss
    return RouterLosses(loss, balance, z_loss, dropped)


# ---------------------------------------------------------------------------------------------- Triton kernels

# Tokens per program on GPU: a (BLOCK_T, E_PAD) float32 tile of at most 8K elements (32 per thread at 8 warps), up
# to 1024 tokens: 16 programs at 16,384 tokens. The routing kernels are latency-bound; not tuned against other
# sizes. Under the interpreter: 8, so small test shapes cross block edges.
ROUTE_TILE_CUDA, ROUTE_BLOCK_T_MAX_CUDA, ROUTE_WARPS_CUDA = 8192, 1024, 8
ROUTE_BLOCK_T_INTERPRET = 8
# Blocks of per-block counts summed per step by the plan kernel.
ROUTE_BLOCK_B = 16
# Slots per step when the padded plan marks the rows nobody owns.
ROUTE_BLOCK_S = 256


@_jit
def _route_fwd_kernel(
    logits_ptr,  # (tokens, num_experts) float32, any strides
    valid_ptr,  # (tokens,) bool
    probs_ptr,  # (tokens, num_experts) float32 out
    lse_ptr,  # (tokens,) float32 out: logsumexp of the logits
    expert_idx_ptr,  # (tokens, TOP_K) int64 out
    gates_ptr,  # (tokens, TOP_K) float32 out
    hist_ptr,  # (n_blocks, K_PAD, E_PAD) int32 out: real tokens whose choice j is expert e, per block
    nvalid_ptr,  # (n_blocks,) int32 out: real tokens per block
    psum_ptr,  # (n_blocks, E_PAD) float32 out: sum of the real tokens' probabilities per block
    lse_sq_ptr,  # (n_blocks,) float32 out: sum of the real tokens' logsumexp^2 per block
    tokens, num_experts,
    stride_logits_t, stride_logits_e,
    HAS_VALID: tl.constexpr, TOP_K: tl.constexpr, K_PAD: tl.constexpr, E_PAD: tl.constexpr,
    BLOCK_T: tl.constexpr,
):
    """One program per block of BLOCK_T tokens; a (BLOCK_T, E_PAD) tile of logits in registers."""
    pid = tl.program_id(0)
    offs_t = pid * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_e = tl.arange(0, E_PAD)
    offs_k = tl.arange(0, K_PAD)
    mask_t = offs_t < tokens
    mask_e = offs_e < num_experts
    rows = offs_t.to(tl.int64)
    logits = tl.load(logits_ptr + rows[:, None] * stride_logits_t + offs_e[None, :] * stride_logits_e,
                     mask=mask_t[:, None] & mask_e[None, :], other=0.0)
    logits = tl.where(mask_e[None, :], logits, float("-inf"))
    row_max = tl.max(logits, axis=1)
    ex = tl.exp(logits - row_max[:, None])
    denom = tl.sum(ex, axis=1)
    probs = ex / denom[:, None]
    lse = row_max + tl.log(denom)
    tile_mask = mask_t[:, None] & mask_e[None, :]
    tl.store(probs_ptr + rows[:, None] * num_experts + offs_e[None, :], probs, mask=tile_mask)
    tl.store(lse_ptr + rows, lse, mask=mask_t)
    if HAS_VALID:
        valid = tl.load(valid_ptr + offs_t, mask=mask_t, other=0) != 0
    else:
        valid = mask_t

    # Top-k by repeated argmax; a picked expert drops to -1 and padding experts sit at -2, below any probability.
    remaining = tl.where(mask_e[None, :], probs, -2.0)
    choice = tl.zeros((BLOCK_T, K_PAD), dtype=tl.int32)
    top = tl.zeros((BLOCK_T, K_PAD), dtype=tl.float32)
    hist = tl.zeros((K_PAD, E_PAD), dtype=tl.int32)
    for j in tl.static_range(TOP_K):
        idx = tl.argmax(remaining, axis=1, tie_break_left=True)  # (BLOCK_T,)
        best = tl.max(remaining, axis=1)
        hit = offs_e[None, :] == idx[:, None]  # (BLOCK_T, E_PAD)
        remaining = tl.where(hit, -1.0, remaining)
        choice = tl.where(offs_k[None, :] == j, idx[:, None], choice)
        top = tl.where(offs_k[None, :] == j, best[:, None], top)
        arrivals = tl.sum((hit & valid[:, None]).to(tl.int32), axis=0)  # (E_PAD,)
        hist = tl.where(offs_k[:, None] == j, arrivals[None, :], hist)
    if TOP_K > 1:
        gates = top / tl.sum(top, axis=1)[:, None]  # renormalised over the choices (the padding columns hold 0)
    else:
        gates = top
    pair_mask = mask_t[:, None] & (offs_k[None, :] < TOP_K)
    tl.store(expert_idx_ptr + rows[:, None] * TOP_K + offs_k[None, :], choice.to(tl.int64), mask=pair_mask)
    tl.store(gates_ptr + rows[:, None] * TOP_K + offs_k[None, :], gates, mask=pair_mask)

    # Per-block partials, summed in a fixed order by the plan kernel.
    tl.store(hist_ptr + pid * (K_PAD * E_PAD) + offs_k[:, None] * E_PAD + offs_e[None, :], hist)
    tl.store(nvalid_ptr + pid, tl.sum(valid.to(tl.int32), axis=0))
    tl.store(psum_ptr + pid * E_PAD + offs_e, tl.sum(tl.where(valid[:, None], probs, 0.0), axis=0))
    tl.store(lse_sq_ptr + pid, tl.sum(tl.where(valid, lse * lse, 0.0), axis=0))


@_jit
def _route_plan_kernel(
    valid_ptr, expert_idx_ptr, gates_ptr,  # kernel 1's inputs and outputs
    hist_ptr, nvalid_ptr, psum_ptr, lse_sq_ptr,  # kernel 1's per-block partials
    capacity_ptr,  # () int64 capacity when CAPACITY_IN_TENSOR
    rank_ptr, keep_ptr, weights_ptr,  # (tokens, TOP_K) int64, bool, float32 out
    slot_of_ptr,  # (tokens, TOP_K) int64 out
    token_of_slot_ptr, assignment_of_slot_ptr,  # (slots,) int64 out
    expert_of_slot_ptr,  # (slots,) int64 out (grouped)
    counts_ptr,  # (2, num_experts) int64 out: routed, kept
    group_ends_ptr,  # (num_experts,) int32 out (grouped)
    loss_ptr,  # () float32 out: load_balance_coef * load balance loss + z_loss_coef * z loss
    aux_ptr,  # (3,) float32 out: load balance loss, z loss, dropped fraction
    grad_scale_ptr,  # (num_experts + 1,) float32 out: d balance / d probs per expert, 1 / real-token count
    tokens, num_experts, n_blocks, capacity, buffer_capacity, slots_per_program,
    load_balance_coef, z_loss_coef,
    HAS_VALID: tl.constexpr, HAS_CAPACITY: tl.constexpr, CAPACITY_IN_TENSOR: tl.constexpr,
    GROUPED: tl.constexpr, TOP_K: tl.constexpr, K_PAD: tl.constexpr, E_PAD: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_S: tl.constexpr,
):
    """One program per block of BLOCK_T tokens (the blocks of kernel 1). The queue is choice-major: (j, e)'s
    arrivals before this block are all blocks' choices j' < j plus the earlier blocks' choice j."""
    pid = tl.program_id(0)
    offs_b = tl.arange(0, BLOCK_B)
    offs_k = tl.arange(0, K_PAD)
    offs_e = tl.arange(0, E_PAD)
    last_expert = offs_e == num_experts - 1

    # Sums of the per-block counts: over all blocks and over the blocks before this one, (K_PAD, E_PAD) each.
    total = tl.zeros((K_PAD, E_PAD), dtype=tl.int32)
    before = tl.zeros((K_PAD, E_PAD), dtype=tl.int32)
    pad_total = tl.sum(tl.zeros((BLOCK_B,), dtype=tl.int32), axis=0)
    pad_before = pad_total
    for b0 in range(0, n_blocks, BLOCK_B):
        blocks = b0 + offs_b
        in_range = blocks < n_blocks
        tile = tl.load(hist_ptr + blocks[:, None, None] * (K_PAD * E_PAD) + offs_k[None, :, None] * E_PAD
                       + offs_e[None, None, :], mask=in_range[:, None, None], other=0)  # (BLOCK_B, K_PAD, E_PAD)
        total += tl.sum(tile, axis=0)
        before += tl.sum(tl.where((blocks < pid)[:, None, None], tile, 0), axis=0)
        if HAS_VALID:
            # Padding rides with the last expert in the grouped plan: TOP_K rows per padding token.
            size = tl.minimum(tokens - blocks * BLOCK_T, BLOCK_T)
            pad = tl.where(in_range, size - tl.load(nvalid_ptr + blocks, mask=in_range, other=0), 0)
            pad_total += tl.sum(pad, axis=0)
            pad_before += tl.sum(tl.where(blocks < pid, pad, 0), axis=0)
    routed = tl.sum(total, axis=0)  # (E_PAD,)
    queue_base = tl.cumsum(total, axis=0) - total + before  # (K_PAD, E_PAD) arrivals queued before this block
    if HAS_CAPACITY:
        if CAPACITY_IN_TENSOR:
            cap = tl.load(capacity_ptr).to(tl.int32)
        else:
            cap = capacity
        kept = tl.minimum(routed, cap)
    else:
        kept = routed
    plan_total = routed + tl.where(last_expert, TOP_K * pad_total, 0)  # (E_PAD,) rows of each expert
    plan_base = tl.cumsum(plan_total, axis=0) - plan_total + tl.sum(before, axis=0) \
        + tl.where(last_expert, TOP_K * pad_before, 0)  # first row of this block's assignments, per expert

    offs_t = pid * BLOCK_T + tl.arange(0, BLOCK_T)
    mask_t = offs_t < tokens
    rows = offs_t.to(tl.int64)
    if HAS_VALID:
        valid = tl.load(valid_ptr + offs_t, mask=mask_t, other=0) != 0
    else:
        valid = mask_t
    pair_mask = mask_t[:, None] & (offs_k[None, :] < TOP_K)
    pair = rows[:, None] * TOP_K + offs_k[None, :]  # (BLOCK_T, K_PAD) flat assignment index
    choice = tl.load(expert_idx_ptr + pair, mask=pair_mask, other=0).to(tl.int32)
    gates = tl.load(gates_ptr + pair, mask=pair_mask, other=0.0)

    # The grouped plan's order within an expert is the flat assignment order token * TOP_K + j: rows of the
    # tokens before, from this block's exclusive running count of (token, expert) rows.
    rows_per_expert = tl.zeros((BLOCK_T, E_PAD), dtype=tl.int32)
    for j in tl.static_range(TOP_K):
        idx = tl.sum(tl.where(offs_k[None, :] == j, choice, 0), axis=1)  # (BLOCK_T,)
        target = tl.where(valid, idx, num_experts - 1)
        rows_per_expert += (offs_e[None, :] == target[:, None]).to(tl.int32)
    rows_before = tl.cumsum(rows_per_expert, axis=0) - rows_per_expert

    for j in tl.static_range(TOP_K):
        idx = tl.sum(tl.where(offs_k[None, :] == j, choice, 0), axis=1)  # (BLOCK_T,)
        gate = tl.sum(tl.where(offs_k[None, :] == j, gates, 0.0), axis=1)
        hit = offs_e[None, :] == idx[:, None]  # (BLOCK_T, E_PAD)
        arrivals = (hit & valid[:, None]).to(tl.int32)
        local = tl.sum(tl.where(hit, tl.cumsum(arrivals, axis=0) - arrivals, 0), axis=1)
        base_j = tl.sum(tl.where(offs_k[:, None] == j, queue_base, 0), axis=0)  # (E_PAD,)
        rank = tl.where(valid, tl.sum(tl.where(hit, base_j[None, :], 0), axis=1) + local, -1)
        if HAS_CAPACITY:
            keep = valid & (rank < cap)
        else:
            keep = valid
        out = rows * TOP_K + j
        tl.store(rank_ptr + out, rank.to(tl.int64), mask=mask_t)
        tl.store(keep_ptr + out, keep, mask=mask_t)
        tl.store(weights_ptr + out, tl.where(keep, gate, 0.0), mask=mask_t)
        if GROUPED:
            target = tl.where(valid, idx, num_experts - 1)
            hit_t = offs_e[None, :] == target[:, None]
            # A padding token's TOP_K rows all go to the last expert, in choice order.
            slot = tl.sum(tl.where(hit_t, plan_base[None, :] + rows_before, 0), axis=1) + tl.where(valid, 0, j)
            slot = slot.to(tl.int64)
            tl.store(slot_of_ptr + out, slot, mask=mask_t)
            tl.store(token_of_slot_ptr + slot, rows, mask=mask_t)
            tl.store(assignment_of_slot_ptr + slot, out, mask=mask_t)
            tl.store(expert_of_slot_ptr + slot, target.to(tl.int64), mask=mask_t)
        else:
            slot = tl.where(keep, idx.to(tl.int64) * buffer_capacity + rank, 0)
            tl.store(slot_of_ptr + out, slot, mask=mask_t)
            tl.store(token_of_slot_ptr + slot, rows, mask=mask_t & keep)
            tl.store(assignment_of_slot_ptr + slot, out, mask=mask_t & keep)

    if not GROUPED:
        # Rows e * buffer_capacity + r with r >= kept[e] carry nobody: the sentinel assignment, the last token.
        for s0 in range(pid * slots_per_program, (pid + 1) * slots_per_program, BLOCK_S):
            offs_s = s0 + tl.arange(0, BLOCK_S)
            in_buffer = (offs_s < (pid + 1) * slots_per_program) & (offs_s < num_experts * buffer_capacity)
            expert = offs_s // buffer_capacity
            kept_e = tl.sum(tl.where(offs_e[None, :] == expert[:, None], kept[None, :], 0), axis=1)
            unowned = in_buffer & (offs_s - expert * buffer_capacity >= kept_e)
            sentinel = tl.zeros((BLOCK_S,), dtype=tl.int64) + tokens * TOP_K
            tl.store(assignment_of_slot_ptr + offs_s, sentinel, mask=unowned)
            tl.store(token_of_slot_ptr + offs_s, sentinel * 0 + (tokens - 1), mask=unowned)

    if pid == 0:
        mask_e = offs_e < num_experts
        tl.store(counts_ptr + offs_e, routed.to(tl.int64), mask=mask_e)
        tl.store(counts_ptr + num_experts + offs_e, kept.to(tl.int64), mask=mask_e)
        if GROUPED:
            tl.store(group_ends_ptr + offs_e, tl.cumsum(plan_total, axis=0), mask=mask_e)
        prob_sum = tl.zeros((E_PAD,), dtype=tl.float32)
        lse_sq = tl.sum(tl.zeros((BLOCK_B,), dtype=tl.float32), axis=0)
        n_real = pad_total * 0
        for b0 in range(0, n_blocks, BLOCK_B):
            blocks = b0 + offs_b
            in_range = blocks < n_blocks
            prob_sum += tl.sum(tl.load(psum_ptr + blocks[:, None] * E_PAD + offs_e[None, :],
                                       mask=in_range[:, None], other=0.0), axis=0)
            lse_sq += tl.sum(tl.load(lse_sq_ptr + blocks, mask=in_range, other=0.0), axis=0)
            n_real += tl.sum(tl.load(nvalid_ptr + blocks, mask=in_range, other=0), axis=0)
        # Means over real tokens, 0 when there are none (the reference's clamp(min=1)).
        inv_n = 1.0 / tl.maximum(n_real, 1).to(tl.float32)
        routed_all = tl.sum(routed, axis=0)
        fraction = routed.to(tl.float32) / tl.maximum(routed_all, 1).to(tl.float32)
        balance = num_experts * tl.sum(fraction * prob_sum * inv_n, axis=0)
        z_loss = lse_sq * inv_n
        dropped = (routed_all - tl.sum(kept, axis=0)).to(tl.float32) / tl.maximum(routed_all, 1).to(tl.float32)
        tl.store(loss_ptr, load_balance_coef * balance + z_loss_coef * z_loss)
        tl.store(aux_ptr + 0, balance)
        tl.store(aux_ptr + 1, z_loss)
        tl.store(aux_ptr + 2, dropped)
        tl.store(grad_scale_ptr + offs_e, num_experts * fraction * inv_n, mask=mask_e)
        tl.store(grad_scale_ptr + num_experts, inv_n)


@_jit
def _route_bwd_kernel(
    probs_ptr, lse_ptr, expert_idx_ptr, keep_ptr, valid_ptr, grad_scale_ptr,  # saved by the forward
    grad_probs_ptr, grad_gates_ptr, grad_weights_ptr, grad_loss_ptr, grad_aux_ptr,  # incoming (each optional)
    grad_logits_ptr,  # (tokens, num_experts) float32 out
    tokens, num_experts, load_balance_coef, z_loss_coef,
    HAS_VALID: tl.constexpr, HAS_GRAD_PROBS: tl.constexpr, HAS_GRAD_GATES: tl.constexpr,
    HAS_GRAD_WEIGHTS: tl.constexpr, HAS_GRAD_LOSS: tl.constexpr, HAS_GRAD_AUX: tl.constexpr,
    TOP_K: tl.constexpr, K_PAD: tl.constexpr, E_PAD: tl.constexpr, BLOCK_T: tl.constexpr,
):
    """One program per block of tokens. g = dL/dprobs collects every path (probabilities, gates, weights = gates *
    keep, the balance loss); then dlogits = p * (g - <g, p>) + dz/dlse * p, the softmax's and logsumexp's Jacobians."""
    pid = tl.program_id(0)
    offs_t = pid * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_e = tl.arange(0, E_PAD)
    offs_k = tl.arange(0, K_PAD)
    mask_t = offs_t < tokens
    mask_e = offs_e < num_experts
    rows = offs_t.to(tl.int64)
    tile = rows[:, None] * num_experts + offs_e[None, :]
    tile_mask = mask_t[:, None] & mask_e[None, :]
    probs = tl.load(probs_ptr + tile, mask=tile_mask, other=0.0)
    if HAS_VALID:
        valid = tl.load(valid_ptr + offs_t, mask=mask_t, other=0) != 0
    else:
        valid = mask_t
    if HAS_GRAD_PROBS:
        g = tl.load(grad_probs_ptr + tile, mask=tile_mask, other=0.0)
    else:
        g = tl.zeros((BLOCK_T, E_PAD), dtype=tl.float32)

    pair = rows[:, None] * TOP_K + offs_k[None, :]
    pair_mask = mask_t[:, None] & (offs_k[None, :] < TOP_K)
    choice = tl.load(expert_idx_ptr + pair, mask=pair_mask, other=0).to(tl.int32)
    grad_gate = tl.zeros((BLOCK_T, K_PAD), dtype=tl.float32)
    if HAS_GRAD_GATES:
        grad_gate += tl.load(grad_gates_ptr + pair, mask=pair_mask, other=0.0)
    if HAS_GRAD_WEIGHTS:
        keep = tl.load(keep_ptr + pair, mask=pair_mask, other=0) != 0
        grad_gate += tl.where(keep, tl.load(grad_weights_ptr + pair, mask=pair_mask, other=0.0), 0.0)
    if TOP_K == 1:
        idx = tl.sum(tl.where(offs_k[None, :] == 0, choice, 0), axis=1)
        grad_0 = tl.sum(tl.where(offs_k[None, :] == 0, grad_gate, 0.0), axis=1)
        g += tl.where(offs_e[None, :] == idx[:, None], grad_0[:, None], 0.0)
    else:
        # gates_j = p_j / S over the chosen p: dgates_j / dp_m = (delta_jm - gates_j) / S.
        top = tl.zeros((BLOCK_T, K_PAD), dtype=tl.float32)
        for j in tl.static_range(TOP_K):
            idx = tl.sum(tl.where(offs_k[None, :] == j, choice, 0), axis=1)
            p_j = tl.sum(tl.where(offs_e[None, :] == idx[:, None], probs, 0.0), axis=1)
            top = tl.where(offs_k[None, :] == j, p_j[:, None], top)
        chosen_sum = tl.where(mask_t, tl.sum(top, axis=1), 1.0)  # rows past the end hold zeros
        through = tl.sum(grad_gate * top, axis=1) / chosen_sum  # sum_j grad_gate_j * gates_j
        for j in tl.static_range(TOP_K):
            idx = tl.sum(tl.where(offs_k[None, :] == j, choice, 0), axis=1)
            grad_j = tl.sum(tl.where(offs_k[None, :] == j, grad_gate, 0.0), axis=1)
            g += tl.where(offs_e[None, :] == idx[:, None], ((grad_j - through) / chosen_sum)[:, None], 0.0)

    dlse = tl.zeros((BLOCK_T,), dtype=tl.float32)
    if HAS_GRAD_LOSS or HAS_GRAD_AUX:
        grad_balance = 0.0
        grad_z = 0.0
        if HAS_GRAD_LOSS:
            grad_loss = tl.load(grad_loss_ptr)
            grad_balance += load_balance_coef * grad_loss
            grad_z += z_loss_coef * grad_loss
        if HAS_GRAD_AUX:
            grad_balance += tl.load(grad_aux_ptr + 0)
            grad_z += tl.load(grad_aux_ptr + 1)
        scale = tl.load(grad_scale_ptr + offs_e, mask=mask_e, other=0.0)
        g += tl.where(valid[:, None], grad_balance * scale[None, :], 0.0)
        lse = tl.load(lse_ptr + rows, mask=mask_t, other=0.0)
        dlse = tl.where(valid, grad_z * 2.0 * lse * tl.load(grad_scale_ptr + num_experts), 0.0)
    grad = probs * (g - tl.sum(g * probs, axis=1)[:, None] + dlse[:, None])
    tl.store(grad_logits_ptr + tile, grad, mask=tile_mask)


def _interpreting() -> bool:
    """Whether this module's kernels run on Triton's CPU interpreter (see built_for_interpreter)."""
    return built_for_interpreter(_route_fwd_kernel)


def _pow2(n: int) -> int:
    return max(2, next_power_of_2(n))


def _route_launch_params(tokens: int, num_experts: int, interpreting: bool) -> tuple[int, int, int]:
    """(BLOCK_T, number of blocks, num_warps)."""
    if interpreting:
        block_t, warps = ROUTE_BLOCK_T_INTERPRET, 1
    else:
        block_t = min(ROUTE_BLOCK_T_MAX_CUDA, max(16, ROUTE_TILE_CUDA // _pow2(num_experts)))
        warps = ROUTE_WARPS_CUDA
    return block_t, cdiv(tokens, block_t), warps


# ---------------------------------------------------------------------------------------------- custom ops


def _slots(tokens: int, num_experts: int, top_k: int, grouped: bool, buffer_capacity: int) -> int:
    return tokens * top_k if grouped else num_experts * buffer_capacity


def _moe_route(
    logits: Tensor,  # (tokens, num_experts) float32
    valid: Optional[Tensor],  # (tokens,) bool
    capacity: int,  # -1: none, or given as capacity_tensor
    capacity_tensor: Optional[Tensor],  # () int64
    top_k: int,
    grouped: bool,
    buffer_capacity: int,  # rows per expert of the padded layout
    load_balance_coef: float,
    z_loss_coef: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor,
           Tensor, Tensor, Tensor]:
    """-> probs, expert_idx, gates, rank, keep, weights, counts (routed; kept), slot_of, token_of_slot,
    assignment_of_slot, expert_of_slot, group_ends, loss, aux (balance, z, dropped), lse, grad_scale. The last two
    are for the backward; expert_of_slot and group_ends are empty for the padded layout."""
    interpreting = _interpreting()
    check_triton_runtime("route_and_plan", logits.device, interpreting)
    tokens, num_experts = logits.shape
    device = logits.device
    k_pad, e_pad = _pow2(top_k), _pow2(num_experts)
    block_t, n_blocks, warps = _route_launch_params(tokens, num_experts, interpreting)
    slots = _slots(tokens, num_experts, top_k, grouped, buffer_capacity)

    def empty(*shape, dtype=torch.int64):
        return torch.empty(shape, device=device, dtype=dtype)

    probs, lse = empty(tokens, num_experts, dtype=torch.float32), empty(tokens, dtype=torch.float32)
    expert_idx, gates = empty(tokens, top_k), empty(tokens, top_k, dtype=torch.float32)
    hist, nvalid = empty(n_blocks, k_pad, e_pad, dtype=torch.int32), empty(n_blocks, dtype=torch.int32)
    psum, lse_sq = empty(n_blocks, e_pad, dtype=torch.float32), empty(n_blocks, dtype=torch.float32)
    rank, keep = empty(tokens, top_k), empty(tokens, top_k, dtype=torch.bool)
    weights, slot_of = empty(tokens, top_k, dtype=torch.float32), empty(tokens, top_k)
    token_of_slot, assignment_of_slot = empty(slots), empty(slots)
    expert_of_slot = empty(slots if grouped else 0)
    group_ends = empty(num_experts if grouped else 0, dtype=torch.int32)
    counts, loss, aux = empty(2, num_experts), empty(dtype=torch.float32), empty(3, dtype=torch.float32)
    grad_scale = empty(num_experts + 1, dtype=torch.float32)
    valid_arg = valid if valid is not None else logits
    _route_fwd_kernel[(n_blocks,)](
        logits, valid_arg, probs, lse, expert_idx, gates, hist, nvalid, psum, lse_sq,
        tokens, num_experts, logits.stride(0), logits.stride(1),
        HAS_VALID=valid is not None, TOP_K=top_k, K_PAD=k_pad, E_PAD=e_pad, BLOCK_T=block_t, num_warps=warps,
    )
    slots_per_program = cdiv(slots, n_blocks)
    _route_plan_kernel[(n_blocks,)](
        valid_arg, expert_idx, gates, hist, nvalid, psum, lse_sq,
        capacity_tensor if capacity_tensor is not None else counts,
        rank, keep, weights, slot_of, token_of_slot, assignment_of_slot,
        expert_of_slot if grouped else token_of_slot, counts, group_ends if grouped else nvalid, loss, aux,
        grad_scale,
        tokens, num_experts, n_blocks, max(capacity, 0), max(buffer_capacity, 1), slots_per_program,
        load_balance_coef, z_loss_coef,
        HAS_VALID=valid is not None, HAS_CAPACITY=capacity >= 0 or capacity_tensor is not None,
        CAPACITY_IN_TENSOR=capacity_tensor is not None, GROUPED=grouped, TOP_K=top_k, K_PAD=k_pad, E_PAD=e_pad,
        BLOCK_T=block_t, BLOCK_B=ROUTE_BLOCK_B, BLOCK_S=ROUTE_BLOCK_S, num_warps=warps,
    )
    return (probs, expert_idx, gates, rank, keep, weights, counts, slot_of, token_of_slot, assignment_of_slot,
            expert_of_slot, group_ends, loss, aux, lse, grad_scale)


moe_route_op = torch.library.custom_op("mamba_r1::moe_route", mutates_args=())(_moe_route)


@moe_route_op.register_fake
def _moe_route_fake(logits, valid, capacity, capacity_tensor, top_k, grouped, buffer_capacity, load_balance_coef,
                    z_loss_coef):
    tokens, num_experts = logits.shape
    slots = _slots(tokens, num_experts, top_k, grouped, buffer_capacity)

    def empty(*shape, dtype=torch.int64):
        return logits.new_empty(shape, dtype=dtype)

    pair = (tokens, top_k)
    return (empty(tokens, num_experts, dtype=torch.float32), empty(*pair), empty(*pair, dtype=torch.float32),
            empty(*pair), empty(*pair, dtype=torch.bool), empty(*pair, dtype=torch.float32), empty(2, num_experts),
            empty(*pair), empty(slots), empty(slots), empty(slots if grouped else 0),
            empty(num_experts if grouped else 0, dtype=torch.int32), empty(dtype=torch.float32),
            empty(3, dtype=torch.float32),
            empty(tokens, dtype=torch.float32), empty(num_experts + 1, dtype=torch.float32))


def _moe_route_bwd(
    probs: Tensor, lse: Tensor, expert_idx: Tensor, keep: Tensor, valid: Optional[Tensor], grad_scale: Tensor,
    grad_probs: Optional[Tensor], grad_gates: Optional[Tensor], grad_weights: Optional[Tensor],
    grad_loss: Optional[Tensor], grad_aux: Optional[Tensor], load_balance_coef: float, z_loss_coef: float,
) -> Tensor:
    """d loss / d logits (tokens, num_experts) float32 from the gradients of probs, gates, weights, loss, aux."""
    interpreting = _interpreting()
    check_triton_runtime("route_and_plan", probs.device, interpreting)
    tokens, num_experts = probs.shape
    top_k = expert_idx.shape[1]
    block_t, n_blocks, warps = _route_launch_params(tokens, num_experts, interpreting)
    grad_logits = torch.empty_like(probs)

    def arg(t):  # absent gradients are never read (their HAS_* flag is False): probs stands in for the pointer
        return probs if t is None else t.contiguous()

    _route_bwd_kernel[(n_blocks,)](
        probs, lse, expert_idx, keep, valid if valid is not None else probs, grad_scale,
        arg(grad_probs), arg(grad_gates), arg(grad_weights), arg(grad_loss), arg(grad_aux),
        grad_logits, tokens, num_experts, load_balance_coef, z_loss_coef,
        HAS_VALID=valid is not None, HAS_GRAD_PROBS=grad_probs is not None, HAS_GRAD_GATES=grad_gates is not None,
        HAS_GRAD_WEIGHTS=grad_weights is not None, HAS_GRAD_LOSS=grad_loss is not None,
        HAS_GRAD_AUX=grad_aux is not None,
        TOP_K=top_k, K_PAD=_pow2(top_k), E_PAD=_pow2(num_experts), BLOCK_T=block_t, num_warps=warps,
    )
    return grad_logits


moe_route_bwd_op = torch.library.custom_op("mamba_r1::moe_route_bwd", mutates_args=())(_moe_route_bwd)


@moe_route_bwd_op.register_fake
def _(probs, lse, expert_idx, keep, valid, grad_scale, grad_probs, grad_gates, grad_weights, grad_loss, grad_aux,
      load_balance_coef, z_loss_coef):
    return torch.empty_like(probs)


def _route_setup_context(ctx, inputs, output):
    logits, valid, capacity, capacity_tensor, top_k, grouped, buffer_capacity, lb_coef, z_coef = inputs
    probs, expert_idx, gates, rank, keep, weights, *_, lse, grad_scale = output
    # Outputs nobody differentiates (most of them) get no zero-filled gradient: one fill kernel each saved.
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(probs, lse, expert_idx, keep, valid, grad_scale)
    ctx.coefs = (lb_coef, z_coef)


def _route_backward(ctx, grad_probs, grad_idx, grad_gates, grad_rank, grad_keep, grad_weights, *grads):
    probs, lse, expert_idx, keep, valid, grad_scale = ctx.saved_tensors
    grad_loss, grad_aux = grads[-4], grads[-3]
    grad_logits = backward_op(ctx, moe_route_bwd_op, _moe_route_bwd)(
        probs, lse, expert_idx, keep, valid, grad_scale, grad_probs, grad_gates, grad_weights, grad_loss, grad_aux,
        *ctx.coefs)
    return grad_logits, None, None, None, None, None, None, None, None


moe_route_op.register_autograd(_route_backward, setup_context=_route_setup_context)
_RouteEager = eager_function("_RouteEager", _moe_route, _route_setup_context, _route_backward)


# ---------------------------------------------------------------------------------------------- public function


def resolve_routing_backend(backend: str, logits: torch.Tensor, priority: str) -> str:
    """"auto" -> "triton" on CUDA for priority="position" and a non-empty batch, "torch" otherwise."""
    return _routing_backend(backend, logits.device, logits.shape[0], priority)


def _routing_backend(backend: str, device: torch.device, tokens: int, priority: str) -> str:
    name = resolve_backend("route_and_plan", backend, device)
    if name == "triton" and (priority != "position" or tokens == 0):
        if backend == "triton":
            raise ValueError(f"route_and_plan(backend='triton') supports priority='position' and at least one "
                             f"token; got priority={priority!r}, {tokens} tokens. Use backend='torch'.")
        return "torch"
    if name == "triton" and triton is None:
        logger.debug("route_and_plan: triton is not installed, taking the torch path")
        return "torch"
    return name


def route_and_plan(
    logits: torch.Tensor,  # (tokens, num_experts) float32
    top_k: int,
    capacity=None,  # int, 0-d int64 tensor, or None for no dropping
    valid: torch.Tensor | None = None,  # (tokens,) bool, False = padding
    priority: str = "position",
    layout: str = "grouped",
    buffer_capacity: int = 0,  # rows per expert of the padded layout (a Python int)
    load_balance_coef: float = 0.0,
    z_loss_coef: float = 0.0,
    losses: bool = True,  # the torch backend computes the losses only when asked; the kernels always do
    backend: str = "auto",
) -> RoutedTokens:
    """Route (``route_tokens``), plan (``plan_grouped`` for ``layout="grouped"``, ``plan_padded`` with
    ``buffer_capacity`` rows per expert for ``"padded"``), the combine weights gates * keep and the auxiliary
    losses, in one call. ``backend``: "torch" (the composition, the specification), "triton" (CUDA, or CPU under
    TRITON_INTERPRET=1; priority="position"), "auto" (triton on CUDA where it applies, torch otherwise)."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}; got {layout!r}")
    name = resolve_routing_backend(backend, logits, priority)
    if name == "torch":
        return route_and_plan_ref(logits, top_k, capacity, valid, priority, layout, buffer_capacity,
                                  load_balance_coef, z_loss_coef, losses)
    grouped = layout == "grouped"
    outputs = run_op(moe_route_op, _RouteEager, logits.float(), valid, *_capacity_args(capacity), top_k, grouped,
                   buffer_capacity, float(load_balance_coef), float(z_loss_coef))
    return _routed_tokens(outputs, grouped, buffer_capacity)


def _capacity_args(capacity) -> tuple[int, Tensor | None]:
    """The route op's (capacity, capacity_tensor) arguments from an int, a 0-d tensor or None (no dropping: -1)."""
    if isinstance(capacity, torch.Tensor):
        return -1, capacity
    return (-1 if capacity is None else int(capacity)), None


def dispatch_plan(slot_of: Tensor, keep: Tensor, token_of_slot: Tensor, assignment_of_slot: Tensor,
                  expert_of_slot: Tensor, group_ends: Tensor, grouped: bool, buffer_capacity: int) -> DispatchPlan:
    """The DispatchPlan of the route op's outputs (see _moe_route): the grouped layout's index tensors, or the
    padded one's capacity and ownership mask."""
    return DispatchPlan(
        slot_of=slot_of,
        owns_slot=None if grouped else keep,
        token_of_slot=token_of_slot,
        assignment_of_slot=assignment_of_slot,
        group_ends=group_ends if grouped else None,
        expert_of_slot=expert_of_slot if grouped else None,
        capacity=None if grouped else buffer_capacity,
    )


def _routed_tokens(outputs, grouped: bool, buffer_capacity: int) -> RoutedTokens:
    """RoutedTokens from the route op's outputs (see _moe_route)."""
    (probs, expert_idx, gates, rank, keep, weights, counts, slot_of, token_of_slot, assignment_of_slot,
     expert_of_slot, group_ends, loss, aux, _, _) = outputs
    routing = Routing(probs, expert_idx, gates, rank, keep, counts[0], counts[1])
    plan = dispatch_plan(slot_of, keep, token_of_slot, assignment_of_slot, expert_of_slot, group_ends, grouped,
                         buffer_capacity)
    return RoutedTokens(routing, plan, weights, RouterLosses(loss, aux[0], aux[1], aux[2]))


@_jit
def _token_grad_kernel(
    grad_rows_ptr,  # (slots, dim) gradient of the permuted rows
    slot_of_ptr,  # (tokens, TOP_K) int64
    keep_ptr,  # (tokens, TOP_K) bool: whether the assignment owns its row (read with OWNS)
    grad_logits_ptr,  # (tokens, num_experts) float32
    weight_ptr,  # (num_experts, dim) router weight
    grad_x_ptr,  # (tokens, dim) in x's dtype
    tokens, dim,
    NUM_EXPERTS: tl.constexpr, TOP_K: tl.constexpr, OWNS: tl.constexpr, HALF: tl.constexpr, BLOCK_T: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """One program per (block of tokens, block of features): x's whole gradient, the permutation's (each
    assignment's row of grad_rows, zero where it owns none, summed over the choices, rounded to x's dtype) plus the
    router's (grad_logits @ weight, with grad_logits rounded to x's dtype first when HALF, accumulated in float32
    and rounded to x's dtype), added in float32 and rounded once: the sum autograd forms from permute_tokens' and
    float32_logits' gradients, in one pass instead of a gather, a select, a matmul and an add."""
    offs_t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_t = offs_t < tokens
    mask_d = offs_d < dim
    mask = mask_t[:, None] & mask_d[None, :]
    x_ty = grad_x_ptr.dtype.element_ty
    picked = tl.zeros((BLOCK_T, BLOCK_D), dtype=tl.float32)
    for j in tl.static_range(TOP_K):
        pair = offs_t.to(tl.int64) * TOP_K + j
        slot = tl.load(slot_of_ptr + pair, mask=mask_t, other=0)
        owned = mask_t
        if OWNS:
            owned = owned & (tl.load(keep_ptr + pair, mask=mask_t, other=0) != 0)
        picked += tl.load(grad_rows_ptr + slot[:, None] * dim + offs_d[None, :], mask=owned[:, None] & mask_d[None, :],
                          other=0.0).to(tl.float32)
    picked = picked.to(x_ty).to(tl.float32)
    router = tl.zeros((BLOCK_T, BLOCK_D), dtype=tl.float32)
    for e in tl.static_range(NUM_EXPERTS):  # unrolled: the loads of every expert can be in flight at once
        g = tl.load(grad_logits_ptr + offs_t.to(tl.int64) * NUM_EXPERTS + e, mask=mask_t, other=0.0)
        if HALF:
            g = g.to(x_ty).to(tl.float32)
        w = tl.load(weight_ptr + e * dim + offs_d, mask=mask_d, other=0.0).to(tl.float32)
        router += g[:, None] * w[None, :]
    total = picked + router.to(x_ty).to(tl.float32)
    tl.store(grad_x_ptr + offs_t.to(tl.int64)[:, None] * dim + offs_d[None, :], total.to(x_ty), mask=mask)


# Tiles of _token_grad_kernel on GPU (tokens, features, warps), from benchmarks/tune_moe_kernels.py on an H200 at the
# layer's 16384 x 1024 (RESULTS.md, 2026-11-30, fifth session). Interpreter: 4 x 8.
TOKEN_GRAD_BLOCKS_CUDA = (64, 64, 4)


def _token_grad(grad_rows: Tensor, slot_of: Tensor, keep: Tensor | None, grad_logits: Tensor, weight: Tensor,
                x_dtype: torch.dtype, half: bool) -> Tensor:
    """(tokens, dim) gradient of x from the rows' gradient (slots, dim) and the logits' (tokens, num_experts)."""
    interpreting = _interpreting()
    tokens, top_k = slot_of.shape
    dim = grad_rows.shape[-1]
    grad_rows_k, weight_k = (for_kernel(t.contiguous(), interpreting) for t in (grad_rows, weight))
    out_dtype = torch.float32 if interpreting and x_dtype in (torch.bfloat16, torch.float16) else x_dtype
    grad_x = torch.empty(tokens, dim, device=grad_rows.device, dtype=out_dtype)
    if grad_x.numel() > 0:
        block_t, block_d, warps = (4, 8, 1) if interpreting else TOKEN_GRAD_BLOCKS_CUDA
        grid = (cdiv(tokens, block_t), cdiv(dim, block_d))
        keep_arg = keep.contiguous() if keep is not None else slot_of  # the plans may hand over transposed ones
        _token_grad_kernel[grid](grad_rows_k, slot_of.contiguous(), keep_arg,
                                 grad_logits.contiguous(), weight_k, grad_x, tokens, dim,
                                 NUM_EXPERTS=weight.shape[0], TOP_K=top_k, OWNS=keep is not None, HALF=half,
                                 BLOCK_T=block_t, BLOCK_D=block_d, num_warps=warps)
    return grad_x.to(x_dtype)


class _RouteAndPermuteEager(torch.autograd.Function):
    """The router's float32 logits, routing + plan + losses, and the tokens permuted into the buffer, as one autograd
    node: the same kernels and matmuls, in the same order, as float32_logits -> route_and_plan -> permute_tokens (three
    nodes). x's gradient, the permutation's plus the router's, comes from one kernel (_token_grad_kernel) where the
    composition runs a gather, a select, a matmul and autograd's add: equal up to the order of the router's sum over
    experts. Eagerly each node costs the autograd engine's device thread host time, and the layer is host-bound
    there."""

    @staticmethod
    def forward(ctx, x, weight, valid, capacity, capacity_tensor, top_k, grouped, buffer_capacity, lb_coef, z_coef):
        half = half_input_logits(x, weight)
        logits = logits_forward(x, weight, half)  # (tokens, num_experts) float32
        outputs = _moe_route(logits, valid, capacity, capacity_tensor, top_k, grouped, buffer_capacity, lb_coef,
                             z_coef)
        probs, expert_idx, gates, rank, keep, weights, counts, slot_of, token_of_slot, *_, lse, grad_scale = outputs
        rows = x.index_select(0, token_of_slot)  # (slots, dim)
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(x, weight, probs, lse, expert_idx, keep, valid, grad_scale, slot_of)
        ctx.half, ctx.grouped, ctx.coefs = half, grouped, (lb_coef, z_coef)
        return (rows, *outputs)

    @staticmethod
    def backward(ctx, grad_rows, grad_probs, grad_idx, grad_gates, grad_rank, grad_keep, grad_weights, *grads):
        x, weight, probs, lse, expert_idx, keep, valid, grad_scale, slot_of = ctx.saved_tensors
        owns_slot = None if ctx.grouped else keep
        router_grads = (grad_probs, grad_gates, grad_weights, grads[-4], grads[-3])  # ..., loss, aux
        need_x, need_weight = ctx.needs_input_grad[:2]
        grad_logits = grad_x = grad_weight = None
        if any(g is not None for g in router_grads):
            grad_logits = _moe_route_bwd(probs, lse, expert_idx, keep, valid, grad_scale, *router_grads, *ctx.coefs)
            _, grad_weight = logits_backward(grad_logits, x, weight, ctx.half, False, need_weight)
        if need_x and grad_rows is not None and grad_logits is not None:
            # Both gradients of x: one kernel instead of the composition's gather, select, matmul and add.
            grad_x = _token_grad(grad_rows, slot_of, owns_slot, grad_logits, weight, x.dtype, ctx.half)
        elif need_x and grad_rows is not None:
            grad_x = permuted_rows_grad(grad_rows, slot_of, owns_slot)
        elif need_x and grad_logits is not None:
            grad_x, _ = logits_backward(grad_logits, x, weight, ctx.half, True, False)
        return grad_x, grad_weight, None, None, None, None, None, None, None, None


def route_and_permute(
    x: torch.Tensor,  # (tokens, dim)
    router_weight: torch.Tensor,  # (num_experts, dim)
    top_k: int,
    capacity=None,
    valid: torch.Tensor | None = None,
    priority: str = "position",
    layout: str = "grouped",
    buffer_capacity: int = 0,
    load_balance_coef: float = 0.0,
    z_loss_coef: float = 0.0,
    losses: bool = True,
    backend: str = "auto",
    router_input: torch.Tensor | None = None,
) -> tuple[RoutedTokens, torch.Tensor]:
    """The router's float32 logits of ``router_input`` (x itself by default; SwitchMoE passes its jittered copy),
    ``route_and_plan`` on them, and x's rows in the plan's buffer order -> (routed, rows (slots, dim)). Eagerly on
    the kernels' path one autograd node (_RouteAndPermuteEager), otherwise float32_logits, route_and_plan and
    permute_tokens; both give the same values and gradients (x's up to the rounding of a sum's order)."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}; got {layout!r}")
    if x.dim() != 2 or router_weight.dim() != 2 or router_weight.shape[1] != x.shape[1]:
        raise ValueError(f"route_and_permute: x must be (tokens, dim) and router_weight (num_experts, dim); got x "
                         f"{tuple(x.shape)}, router_weight {tuple(router_weight.shape)}")
    fused = (router_input is None and not eager_custom_ops.tracing()
             and _routing_backend(backend, x.device, x.shape[0], priority) == "triton")
    if not fused:
        logits = float32_logits(x if router_input is None else router_input, router_weight)
        routed = route_and_plan(logits, top_k, capacity, valid, priority, layout, buffer_capacity, load_balance_coef,
                                z_loss_coef, losses, backend)
        return routed, permute_tokens(x, routed.plan)
    grouped = layout == "grouped"
    rows, *outputs = _RouteAndPermuteEager.apply(x, router_weight, valid, *_capacity_args(capacity), top_k, grouped,
                                                 buffer_capacity, float(load_balance_coef), float(z_loss_coef))
    return _routed_tokens(outputs, grouped, buffer_capacity), rows


__all__ = ["LAYOUTS", "RoutedTokens", "RouterLosses", "dispatch_plan", "moe_route_bwd_op", "moe_route_op",
           "resolve_routing_backend", "route_and_permute", "route_and_plan", "route_and_plan_ref", "router_losses_ref"]
