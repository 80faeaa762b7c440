"""Mixture-of-Experts dispatch: route tokens, permute them into expert order, run all experts at once, un-permute.

The pipeline (every step a pure function on tensors, no parameter owned here):

    route_tokens     softmax over the router logits, top-k, each assignment's place in its expert's queue, capacity
    plan_grouped     where each (token, choice) assignment sits in the expert buffer: contiguous segments per expert
    plan_padded        ... or fixed-size rows per expert, (num_experts, capacity) for a batched matmul
    permute_tokens   gather the token rows into the buffer
    expert_ffn       all experts in one grouped matmul (torch._grouped_mm) or one padded bmm per projection
    combine_tokens   gather each token's expert outputs back and add them up, weighted by the gates

``switch_moe_ref`` beside it is the specification: a Python loop over tokens that routes one token at a time.
On CUDA the layer runs fused Triton versions of routing + plan + losses (moe_routing.py), combine (moe_combine.py)
and the bias adds and activation (moe_expert_ffn.py); the functions here are their specification and the CPU path.

Nothing on this path reads a tensor's value on the host (no ``.item()``, no boolean indexing), so a forward
never waits for the device and traces under ``torch.compile`` without graph breaks. The price is buffers sized
from shapes rather than from data: the grouped layout always holds tokens * top_k rows, the padded one
num_experts * capacity rows, where capacity is computed from the total token count and the real-token count only
decides which assignments are kept.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F

ACTIVATIONS = ("gelu", "silu", "swiglu")
PRIORITIES = ("position", "gate")
DISPATCH_BACKENDS = ("auto", "grouped_mm", "bmm")


# ----------------------------------------------------------------------------------------------- activations


def check_activation(activation: str) -> None:
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}; got {activation!r}")


def projection_width(hidden_dim: int, activation: str) -> int:
    """Width of the first projection: swiglu holds the gate and the up halves side by side, [gate | up]."""
    return 2 * hidden_dim if activation == "swiglu" else hidden_dim


def ffn_activation(h: torch.Tensor, activation: str) -> torch.Tensor:
    """(..., projection_width) -> (..., hidden_dim). gelu is the exact (erf) GELU, as nn.GELU's default."""
    if activation == "gelu":
        return F.gelu(h)
    if activation == "silu":
        return F.silu(h)
    gate, up = h.chunk(2, dim=-1)
    return F.silu(gate) * up


# ----------------------------------------------------------------------------------------------- routing


def half_input_logits(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether the router's float32 logits come from one half-input matmul with float32 output (CUDA, x and weight
    both bf16 or both fp16, torch.mm with out_dtype) rather than from float32 copies of both."""
    return (x.is_cuda and x.dtype in (torch.bfloat16, torch.float16) and weight.dtype == x.dtype
            and hasattr(torch.ops.aten.mm, "dtype"))


def logits_forward(x: torch.Tensor, weight: torch.Tensor, half: bool) -> torch.Tensor:
    """(tokens, dim), (num_experts, dim) -> (tokens, num_experts) float32 logits, no autocast; ``half`` from
    half_input_logits. The products of two bf16 (or fp16) numbers are exact in float32, so the half path is the
    float32 matmul of the upcast inputs up to summation order, without float32 copies of x."""
    with torch.autocast(device_type=x.device.type, enabled=False):
        if half:
            return torch.mm(x, weight.t(), out_dtype=torch.float32)
        return F.linear(x.float(), weight.float())


def logits_backward(grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, half: bool, need_x: bool,
                    need_weight: bool) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Gradients of logits_forward for x and weight from the logits' (tokens, num_experts) float32 gradient. Half:
    the gradient is rounded to x's dtype first (the weight and input gradients are rounded to it anyway) and the
    matmuls accumulate in float32. Float32: the matmuls autograd's linear backward runs, cast back."""
    if half:
        grad = grad.to(x.dtype)
        grad_x = torch.mm(grad, weight) if need_x else None
        grad_weight = torch.mm(grad.t(), x) if need_weight else None
    else:
        grad_x = grad.mm(weight.float()).to(x.dtype) if need_x else None
        grad_weight = grad.t().mm(x.float()).to(weight.dtype) if need_weight else None
    return grad_x, grad_weight


class _Float32Logits(torch.autograd.Function):
    """logits_forward's half path with its backward (logits_backward); the float32 path is plain autograd."""

    @staticmethod
    def forward(ctx, x, weight):
        ctx.save_for_backward(x, weight)
        return logits_forward(x, weight, half=True)

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        return logits_backward(grad, x, weight, True, *ctx.needs_input_grad[:2])


def float32_logits(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """(tokens, dim) inputs, (num_experts, dim) router weight -> (tokens, num_experts) float32 logits, whatever the
    autocast dtype: Switch's selective precision (a bf16 softmax over near-equal logits decides routing by rounding
    noise). On CUDA with x and weight both bf16 or fp16, one matmul with float32 output (torch.mm's out_dtype);
    elsewhere the float32 matmul of the upcast inputs."""
    if half_input_logits(x, weight):
        return _Float32Logits.apply(x, weight)
    return logits_forward(x, weight, half=False)


def expert_capacity(num_tokens, num_experts: int, top_k: int, capacity_factor: float, min_capacity: int):
    """``max(min_capacity, ceil(capacity_factor * num_tokens * top_k / num_experts))``.

    ``num_tokens`` is a Python int or a 0-d integer tensor (the count of real tokens, kept on the device so no
    host sync is needed); the result has the same kind. Both evaluate the same float64 expression in the same
    order, so the loop reference and the layer agree on every capacity.
    """
    if isinstance(num_tokens, torch.Tensor):
        raw = torch.ceil(num_tokens.to(torch.float64) * capacity_factor * top_k / num_experts)
        return raw.clamp(min=min_capacity).to(torch.int64)
    return max(min_capacity, math.ceil(capacity_factor * num_tokens * top_k / num_experts))


class Routing(NamedTuple):
    probs: torch.Tensor  # (tokens, num_experts) float32 softmax of the router logits
    expert_idx: torch.Tensor  # (tokens, top_k) int64, the chosen experts, most probable first
    gates: torch.Tensor  # (tokens, top_k) float32 gate of each choice, renormalised over the choices when top_k > 1
    rank: torch.Tensor  # (tokens, top_k) int64 place in the chosen expert's queue; -1 for padding tokens
    keep: torch.Tensor  # (tokens, top_k) bool: routed (not padding) and within the expert's capacity
    routed: torch.Tensor  # (num_experts,) int64 real-token assignments that chose each expert
    kept: torch.Tensor  # (num_experts,) int64 of those, the ones within capacity


def route_tokens(
    logits: torch.Tensor,  # (tokens, num_experts)
    top_k: int,
    capacity=None,  # int, 0-d int64 tensor, or None for no dropping
    valid: torch.Tensor | None = None,  # (tokens,) bool, False = padding: not routed, takes no capacity
    priority: str = "position",
) -> Routing:
    """Softmax in float32, top-k, and the deterministic queue that decides which assignments overflow.

    Queue order: every token's first choice before any token's second choice (GShard's convention, so a
    second choice never pushes out someone's first); within one choice, tokens in order of position in the
    batch (``priority="position"``) or of router confidence, the top-1 probability, highest first and ties by
    position (``priority="gate"``, V-MoE's batch prioritised routing).
    """
    tokens, num_experts = logits.shape
    probs = torch.softmax(logits.float(), dim=-1)  # (tokens, num_experts)
    top_probs, expert_idx = probs.topk(top_k, dim=-1)  # (tokens, top_k), sorted best first
    # With one choice the raw probability is the gate, so the router learns through it (Switch); renormalising
    # would make every gate 1.
    gates = top_probs / top_probs.sum(-1, keepdim=True) if top_k > 1 else top_probs

    order = None
    if priority == "gate":
        order = torch.argsort(top_probs[:, 0], descending=True, stable=True)  # (tokens,)
    queued_experts = expert_idx if order is None else expert_idx.index_select(0, order)
    queued_valid = valid if (order is None or valid is None) else valid.index_select(0, order)
    rank, routed = _queue_rank(queued_experts, queued_valid, num_experts)  # rank in queue order
    if order is not None:
        rank = torch.empty_like(rank).index_copy_(0, order, rank)

    keep = rank >= 0
    kept = routed
    if capacity is not None:
        keep = keep & (rank < capacity)
        kept = routed.clamp(max=capacity)  # an expert keeps its first `capacity` arrivals
    return Routing(probs, expert_idx, gates, rank, keep, routed, kept)


def _queue_rank(expert_idx: torch.Tensor, valid: torch.Tensor | None, num_experts: int):
    """(tokens, top_k) experts in queue order -> (tokens, top_k) how many assignments queued for the same expert
    before this one, -1 for padding; and (num_experts,) how many queued in all. A running count per expert over
    the choice-major sequence."""
    tokens, top_k = expert_idx.shape
    queue = expert_idx.t().reshape(-1)  # (top_k * tokens,): all first choices, then all second choices
    experts = torch.arange(num_experts, device=expert_idx.device)
    # (num_experts, queue) so the running count scans the innermost dimension: CUDA scans an outer dimension one
    # thread per column, milliseconds for a long queue.
    arrivals = queue[None, :] == experts[:, None]
    if valid is not None:
        arrivals = arrivals & valid.repeat(top_k)[None, :]
    queued = arrivals.cumsum(-1)  # (num_experts, queue) int64
    rank = queued.gather(0, queue[None, :]).view(top_k, tokens) - 1
    if valid is not None:
        rank = torch.where(valid[None, :], rank, -1)
    routed = queued[:, -1] if queue.numel() else queued.new_zeros(num_experts)
    return rank.t(), routed


# ----------------------------------------------------------------------------------------------- auxiliary losses


def _real_token_mean(values: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
    """Mean over the first dimension of the real tokens only; 0 when there are none."""
    if valid is None:
        return values.mean(0)
    weights = valid.to(values.dtype).view(-1, *([1] * (values.dim() - 1)))
    return (values * weights).sum(0) / weights.sum().clamp(min=1.0)


def load_balancing_loss(
    probs: torch.Tensor,  # (tokens, num_experts) float32
    routed: torch.Tensor,  # (num_experts,) assignments that chose each expert (Routing.routed)
    valid: torch.Tensor | None = None,  # (tokens,) bool
) -> torch.Tensor:
    """Switch Transformer's ``num_experts * sum_i f_i * P_i`` over real tokens: f_i the fraction of assignments
    routed to expert i (before capacity, counting all top_k choices), P_i the mean router probability. Exactly 1
    when the router is uniform; differentiable through P only."""
    fraction = routed / routed.sum().clamp(min=1)  # (num_experts,)
    return probs.shape[-1] * (fraction * _real_token_mean(probs, valid)).sum()


def router_z_loss(logits: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """ST-MoE's ``mean(logsumexp(logits)^2)`` over real tokens; keeps the router logits small."""
    return _real_token_mean(torch.logsumexp(logits.float(), dim=-1).square(), valid)


# ----------------------------------------------------------------------------------------------- dispatch plans


class DispatchPlan(NamedTuple):
    """Where each (token, choice) assignment sits in the expert buffer, and the way back.

    ``assignment_of_slot`` holds the flat index token * top_k + choice of the assignment a row carries, or
    tokens * top_k for a row that carries none; ``owns_slot`` is None when every assignment has a row of its own.
    """

    slot_of: torch.Tensor  # (tokens, top_k) int64 buffer row of each assignment
    owns_slot: torch.Tensor | None  # (tokens, top_k) bool, whether that row really holds this assignment
    token_of_slot: torch.Tensor  # (slots,) int64 token whose values fill the row
    assignment_of_slot: torch.Tensor  # (slots,) int64
    group_ends: torch.Tensor | None  # (num_experts,) int32 end row of each expert's segment (grouped layout)
    expert_of_slot: torch.Tensor | None  # (slots,) int64 (grouped layout)
    capacity: int | None  # rows per expert (padded layout)


def plan_grouped(expert_idx: torch.Tensor, num_experts: int, valid: torch.Tensor | None = None) -> DispatchPlan:
    """Contiguous layout for a grouped matmul: every assignment of expert 0, of expert 1, ... (one stable sort by
    expert). The buffer has tokens * top_k rows, a size known without looking at the data.

    Dropped assignments keep their rows in their expert's segment and padding ones (``valid`` False) go to the
    last expert's, whatever the router said about them: torch._grouped_mm leaves rows past the last offset
    uninitialised, and a NaN there would leak into the weight gradients through 0 * NaN. They cost what the dense
    FFN costs anyway; their weight in ``combine_tokens`` is 0, so their outputs are discarded and their gradients
    are exactly zero. Capacity on this path decides outputs, not work.
    """
    tokens, top_k = expert_idx.shape
    slots = tokens * top_k
    if valid is not None:
        # Padding values must not move real tokens around the buffer.
        expert_idx = torch.where(valid[:, None], expert_idx, num_experts - 1)
    expert_of_slot, assignment_of_slot = torch.sort(expert_idx.flatten(), stable=True)  # (slots,) each
    assignment = torch.arange(slots, device=expert_idx.device)
    slot_of = torch.empty_like(assignment).scatter_(0, assignment_of_slot, assignment).view(tokens, top_k)
    boundaries = torch.arange(1, num_experts + 1, device=expert_idx.device)
    group_ends = torch.searchsorted(expert_of_slot, boundaries, out_int32=True)  # (num_experts,) rows below e + 1
    return DispatchPlan(
        slot_of=slot_of,
        owns_slot=None,
        token_of_slot=assignment_of_slot // top_k,
        assignment_of_slot=assignment_of_slot,
        group_ends=group_ends,
        expert_of_slot=expert_of_slot,
        capacity=None,
    )


def plan_padded(expert_idx: torch.Tensor, keep: torch.Tensor, rank: torch.Tensor, num_experts: int,
                capacity: int) -> DispatchPlan:
    """Fixed layout for a batched matmul: expert e owns rows e * capacity .. (e + 1) * capacity - 1; kept
    assignment at row e * capacity + rank. ``capacity`` (a Python int) must be at least every kept rank + 1, and
    at least 1 when there are tokens (dropped assignments point at row 0 with weight 0).
    Rows nobody owns are filled from the last token (finite values, results discarded, zero gradient)."""
    tokens, top_k = expert_idx.shape
    slots = num_experts * capacity
    flat = torch.arange(tokens * top_k, device=expert_idx.device)  # (tokens * top_k,)
    slot_of = torch.where(keep, expert_idx * capacity + rank, 0)  # (tokens, top_k)
    # Assignments without a row are scattered past the buffer, each to a place of its own (deterministic).
    target = torch.where(keep.flatten(), slot_of.flatten(), slots + flat)
    owner = flat.new_full((slots + tokens * top_k,), tokens * top_k).scatter_(0, target, flat)
    assignment_of_slot = owner[:slots]
    return DispatchPlan(
        slot_of=slot_of,
        owns_slot=keep,
        token_of_slot=(assignment_of_slot // top_k).clamp(max=max(tokens - 1, 0)),
        assignment_of_slot=assignment_of_slot,
        group_ends=None,
        expert_of_slot=None,
        capacity=capacity,
    )


# ----------------------------------------------------------------------------------------------- permute / combine


class _PermuteTokens(torch.autograd.Function):
    """rows = x[token_of_slot]. Its gradient is a gather too (each assignment owns one row), never an atomic
    scatter-add: deterministic, and fast for bf16."""

    @staticmethod
    def forward(ctx, x, token_of_slot, slot_of, owns_slot):
        ctx.save_for_backward(slot_of, owns_slot)
        return x.index_select(0, token_of_slot)

    @staticmethod
    def backward(ctx, grad_rows):
        slot_of, owns_slot = ctx.saved_tensors
        return permuted_rows_grad(grad_rows, slot_of, owns_slot), None, None, None


def permuted_rows_grad(grad_rows: torch.Tensor, slot_of: torch.Tensor, owns_slot: torch.Tensor | None) -> torch.Tensor:
    """(slots, dim) gradient of the permuted rows -> (tokens, dim) gradient of the tokens: each assignment's row
    (zero where it owns none), summed over the choices; a gather, never an atomic scatter-add."""
    tokens, top_k = slot_of.shape
    picked = grad_rows.index_select(0, slot_of.flatten()).view(tokens, top_k, grad_rows.shape[-1])
    if owns_slot is not None:
        picked = torch.where(owns_slot[..., None], picked, 0)
    return picked[:, 0] if top_k == 1 else picked.sum(1)  # a bf16 sum accumulates in float32


def permute_tokens(x: torch.Tensor, plan: DispatchPlan) -> torch.Tensor:
    """(tokens, dim) -> (slots, dim): the token rows in buffer order."""
    return _PermuteTokens.apply(x, plan.token_of_slot, plan.slot_of, plan.owns_slot)


class _CombineTokens(torch.autograd.Function):
    """out[t] = sum_j weights[t, j] * rows[slot_of[t, j]]: one gather, one in-place scale, and a sum for top_k > 1."""

    @staticmethod
    def forward(ctx, rows, weights, slot_of, token_of_slot, assignment_of_slot):
        tokens, top_k = slot_of.shape
        picked = rows.index_select(0, slot_of.flatten()).view(tokens, top_k, rows.shape[-1])  # (tokens, top_k, dim)
        # The gate is rounded to rows' dtype: a mixed-dtype broadcast product runs several times slower on CUDA.
        picked.mul_(weights.to(rows.dtype)[..., None])
        ctx.save_for_backward(rows, weights, slot_of, token_of_slot, assignment_of_slot)
        return picked[:, 0] if top_k == 1 else picked.sum(1)  # a bf16 sum accumulates in float32

    @staticmethod
    def backward(ctx, grad_out):
        rows, weights, slot_of, token_of_slot, assignment_of_slot = ctx.saved_tensors
        tokens, top_k = slot_of.shape
        grad_out = grad_out.to(rows.dtype)
        grad_rows = grad_weights = None
        if ctx.needs_input_grad[0]:
            # A row's gradient is its owner's weight times its token's output gradient; rows without an owner
            # read the appended zero weight.
            slot_weight = torch.cat([weights.flatten(), weights.new_zeros(1)])[assignment_of_slot]  # (slots,)
            grad_rows = grad_out.index_select(0, token_of_slot).mul_(slot_weight.to(rows.dtype)[:, None])
        if ctx.needs_input_grad[1]:
            picked = rows.index_select(0, slot_of.flatten()).view(tokens, top_k, rows.shape[-1])
            grad_weights = torch.bmm(picked, grad_out[:, :, None]).view(tokens, top_k).to(weights.dtype)
        return grad_rows, grad_weights, None, None, None


def combine_tokens(rows: torch.Tensor, weights: torch.Tensor, plan: DispatchPlan) -> torch.Tensor:
    """(slots, dim) expert outputs, (tokens, top_k) weights -> (tokens, dim). Assignments that must not count
    (dropped, padding) need weight 0: their rows hold finite values from somebody else or from nobody."""
    return _CombineTokens.apply(rows, weights, plan.slot_of, plan.token_of_slot, plan.assignment_of_slot)


# ----------------------------------------------------------------------------------------------- grouped matmul


class _GroupedMatmul(torch.autograd.Function):
    """torch._grouped_mm over contiguous row segments, with a backward that hands it contiguous gradients (its
    built-in derivative rejects the zero-stride gradient of a ``.sum()``)."""

    @staticmethod
    def forward(ctx, rows, weight, group_ends):
        ctx.save_for_backward(rows, weight, group_ends)
        return torch._grouped_mm(rows, weight, offs=group_ends)

    @staticmethod
    def backward(ctx, grad_out):
        rows, weight, group_ends = ctx.saved_tensors
        grad_out = grad_out.contiguous()
        grad_rows = grad_weight = None
        if ctx.needs_input_grad[0]:
            grad_rows = torch._grouped_mm(grad_out, weight.transpose(-2, -1), offs=group_ends)
        if ctx.needs_input_grad[1]:
            grad_weight = torch._grouped_mm(rows.t(), grad_out, offs=group_ends)  # (num_experts, in, out)
        return grad_rows, grad_weight, None


def grouped_matmul(rows: torch.Tensor, weight: torch.Tensor, group_ends: torch.Tensor) -> torch.Tensor:
    """(slots, in) rows in contiguous per-expert segments ending at ``group_ends`` (int32), (num_experts, in, out)
    weights -> (slots, out): torch._grouped_mm with a backward that takes any gradient layout."""
    return _GroupedMatmul.apply(rows, weight, group_ends)


def grouped_mm_supported(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor) -> bool:
    """Whether ``backend="auto"`` takes the grouped path: CUDA Hopper (sm90) with bf16 rows and weights, widths
    in multiples of 16 bytes. Elsewhere torch._grouped_mm is absent, or a host-looping fallback, or (sm100 on
    torch 2.10) unreliable."""
    if not hasattr(torch, "_grouped_mm") or x.device.type != "cuda":
        return False
    if not (x.dtype == w1.dtype == w2.dtype == torch.bfloat16):
        return False
    if torch.cuda.get_device_capability(x.device)[0] != 9:
        return False
    return all(width % 8 == 0 for width in (*w1.shape[1:], w2.shape[-1]))


# "auto" takes the padded bmm layout on Hopper only while its buffer holds at most this many times the assignments,
# i.e. where it does no more matmul work than the grouped layout (capacity_factor <= 1: dropped assignments are not
# computed). Measured at capacity factor 1.25 (16,384 tokens, 1024 -> 4096, 8 experts, bf16, H200, 2026-11-30,
# benchmarks/moe_breakdown.py and bench_moe.py), with the fused bias/activation kernels on both layouts: GPU time per
# training step 2.04 ms grouped against 2.14 ms bmm; captured in CUDA graphs 1.82 against 2.06 ms later the same
# day (bench_moe.py, after the GELU and output-bias changes). Before those kernels (bmm through baddbmm) the rule
# was 1.25, from wall-clock runs where the host's launch overhead decided.
AUTO_BMM_MAX_PADDING = 1.0


def resolve_dispatch_backend(backend: str, x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor,
                             padded_rows: int | None = None, assignments: int | None = None) -> str:
    """The backend to run: ``backend`` itself, checked, or for "auto" bmm unless grouped_mm is supported here and the
    padded layout would hold more than AUTO_BMM_MAX_PADDING times the ``assignments`` (tokens * top_k) in its
    ``padded_rows`` (num_experts * capacity; both None: grouped_mm wherever supported)."""
    if backend not in DISPATCH_BACKENDS:
        raise ValueError(f"backend must be one of {DISPATCH_BACKENDS}; got {backend!r}")
    if backend == "auto":
        if not grouped_mm_supported(x, w1, w2):
            return "bmm"
        if padded_rows is not None and assignments and padded_rows <= AUTO_BMM_MAX_PADDING * assignments:
            return "bmm"
        return "grouped_mm"
    if backend == "grouped_mm":
        if not hasattr(torch, "_grouped_mm"):
            raise ValueError(f"backend='grouped_mm' needs torch._grouped_mm (torch >= 2.8); torch {torch.__version__} "
                             "has none: use backend='bmm' or 'auto'")
        alignment = 16 // x.element_size()
        widths = (*w1.shape[1:], w2.shape[-1])
        if any(width % alignment for width in widths):
            raise ValueError(f"backend='grouped_mm' needs dim and expert widths that are multiples of {alignment} for "
                             f"{x.dtype} (16-byte rows); got widths {widths}: use backend='bmm' or 'auto'")
    return backend


def expert_ffn(
    rows: torch.Tensor,  # (slots, dim)
    plan: DispatchPlan,
    w1: torch.Tensor,  # (num_experts, dim, projection_width)
    b1: torch.Tensor | None,  # (num_experts, projection_width)
    w2: torch.Tensor,  # (num_experts, hidden_dim, dim)
    b2: torch.Tensor | None,  # (num_experts, dim)
    activation: str,
) -> torch.Tensor:
    """Every expert's FFN on its rows of the buffer at once -> (slots, dim). The plan's layout picks the kernel:
    grouped (``plan.group_ends``) runs torch._grouped_mm, padded (``plan.capacity``) a batched matmul."""
    if plan.group_ends is not None:
        # A bias add as a matmul with the rows' one-hot expert matrix: one pass over h forward, and a bias gradient
        # that is a matmul too instead of a scatter-add over every row.
        one_hot = F.one_hot(plan.expert_of_slot, w1.shape[0]).to(rows.dtype)  # (slots, num_experts)
        h = _GroupedMatmul.apply(rows, w1, plan.group_ends)  # (slots, projection_width)
        if b1 is not None:
            h = torch.addmm(h, one_hot, b1.to(h.dtype))
        y = _GroupedMatmul.apply(ffn_activation(h, activation), w2, plan.group_ends)  # (slots, dim)
        if b2 is not None:
            y = torch.addmm(y, one_hot, b2.to(y.dtype))
        return y
    num_experts = w1.shape[0]
    per_expert = rows.view(num_experts, plan.capacity, rows.shape[-1])  # (num_experts, capacity, dim)
    h = _batched_linear(per_expert, w1, b1)  # (num_experts, capacity, projection_width)
    y = _batched_linear(ffn_activation(h, activation), w2, b2)  # (num_experts, capacity, dim)
    return y.view(-1, y.shape[-1])


def _batched_linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    """(num_experts, rows, in) @ (num_experts, in, out) [+ (num_experts, out)] -> (num_experts, rows, out)."""
    if b is None:
        return torch.bmm(x, w)
    return torch.baddbmm(b[:, None, :], x, w)


# ----------------------------------------------------------------------------------------------- reference


def switch_moe_ref(
    x: torch.Tensor,  # (tokens, dim)
    router_weight: torch.Tensor,  # (num_experts, dim)
    w1: torch.Tensor,  # (num_experts, dim, projection_width)
    b1: torch.Tensor | None,  # (num_experts, projection_width)
    w2: torch.Tensor,  # (num_experts, hidden_dim, dim)
    b2: torch.Tensor | None,  # (num_experts, dim)
    *,
    top_k: int = 1,
    capacity_factor: float | None = 1.25,
    min_capacity: int = 4,
    activation: str = "gelu",
    mask: torch.Tensor | None = None,  # (tokens,) bool
    priority: str = "position",
) -> torch.Tensor:
    """The MoE layer one token at a time: the specification the fast path is tested against.

    Router logits and softmax in float32 (as the layer); then for each queue position (first choices of all
    tokens in priority order, then second choices, ...) the token's next-best expert takes it if it has room;
    each token's output is the sum over its kept choices of gate * expert(x), computed in float64.
    Returns (tokens, dim) float64.
    """
    tokens = x.shape[0]
    num_experts = router_weight.shape[0]
    probs = torch.softmax(F.linear(x.float(), router_weight.float()), dim=-1)  # (tokens, num_experts)
    valid = [True] * tokens if mask is None else [bool(v) for v in mask.tolist()]
    num_real = tokens if mask is None else sum(valid)
    capacity = None
    if capacity_factor is not None:
        capacity = expert_capacity(num_real, num_experts, top_k, capacity_factor, min_capacity)

    choices = []
    for t in range(tokens):
        p = probs[t].clone()
        chosen = []
        for _ in range(top_k):
            e = int(torch.argmax(p))
            chosen.append(e)
            p[e] = -1.0
        choices.append(chosen)

    order = list(range(tokens))
    if priority == "gate":
        top_prob = probs.detach().max(-1).values.tolist()
        order.sort(key=lambda t: (-top_prob[t], t))
    load = [0] * num_experts
    kept = [[False] * top_k for _ in range(tokens)]
    for j in range(top_k):
        for t in order:
            if not valid[t]:
                continue
            e = choices[t][j]
            if capacity is None or load[e] < capacity:
                kept[t][j] = True
                load[e] += 1

    out = []
    for t in range(tokens):
        chosen_probs = torch.stack([probs[t, e] for e in choices[t]]).double()
        gates = chosen_probs / chosen_probs.sum() if top_k > 1 else chosen_probs
        y = x.new_zeros(x.shape[1], dtype=torch.float64)
        for j, e in enumerate(choices[t]):
            if kept[t][j]:
                y = y + gates[j] * _expert_ref(x[t].double(), e, w1, b1, w2, b2, activation)
        out.append(y)
    return torch.stack(out) if out else x.new_zeros(0, x.shape[1], dtype=torch.float64)


def _expert_ref(x_t, e, w1, b1, w2, b2, activation):
    """One token (dim,) through expert e in float64."""
    h = x_t @ w1[e].double()
    if b1 is not None:
        h = h + b1[e].double()
    y = ffn_activation(h, activation) @ w2[e].double()
    if b2 is not None:
        y = y + b2[e].double()
    return y


__all__ = [
    "ACTIVATIONS",
    "PRIORITIES",
    "DISPATCH_BACKENDS",
    "check_activation",
    "projection_width",
    "ffn_activation",
    "float32_logits",
    "half_input_logits",
    "logits_forward",
    "logits_backward",
    "expert_capacity",
    "Routing",
    "route_tokens",
    "load_balancing_loss",
    "router_z_loss",
    "DispatchPlan",
    "plan_grouped",
    "plan_padded",
    "permute_tokens",
    "permuted_rows_grad",
    "combine_tokens",
    "grouped_matmul",
    "grouped_mm_supported",
    "resolve_dispatch_backend",
    "expert_ffn",
    "switch_moe_ref",
]
