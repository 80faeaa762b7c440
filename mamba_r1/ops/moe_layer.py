"""SwitchMoE's whole layer on the kernels' path as one op: the router's float32 logits, routing + plan + losses, the
tokens permuted into the expert buffer, the experts' FFN (grouped or batched matmuls around the fused bias +
activation) and the combine with the experts' output bias. Forward one op (``moe_layer_op``), backward one
(``moe_layer_bwd_op``), the same kernels in the same order as route_and_permute -> expert_ffn_fused -> combine.

Why one op: under torch.compile every custom op call goes through the dispatcher and the custom-op wrapper, and the
composition's ops (six custom ops per step plus the aten ops around them) made the compiled layer slower than the
eager one on the lent H200's host (RESULTS.md). Eagerly the bodies run under one plain autograd.Function
(eager_custom_ops.run_op): one backward node for the layer. ``fused_layer_applies`` says when SwitchMoE takes it.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from mamba_r1.ops import moe_combine, moe_expert_ffn, moe_routing
from mamba_r1.ops.eager_custom_ops import backward_op, eager_function, run_op
from mamba_r1.ops.moe_combine import _moe_combine, _moe_combine_bwd, combine_bias_layout
from mamba_r1.ops.moe_dispatch import half_input_logits, logits_backward, logits_forward
from mamba_r1.ops.moe_expert_ffn import (
    BIAS_ACTIVATIONS,
    _bias_layout,
    _ffn_matmul,
    _ffn_matmul_backward,
    _moe_bias_act,
    _moe_bias_act_bwd,
)
from mamba_r1.ops.moe_routing import (
    RouterLosses,
    _capacity_args,
    _moe_route,
    _moe_route_bwd,
    _moe_route_fake,
    _token_grad,
    dispatch_plan,
)

# moe_layer_op's nineteen outputs (custom ops need each one spelled out in the return annotation).
LayerOutputs = tuple[(Tensor,) * 19]


def fused_layer_applies(x: Tensor, router_weight: Tensor, w1: Tensor, b1: Optional[Tensor], w2: Tensor,
                        b2: Optional[Tensor], activation: str, priority: str) -> bool:
    """Whether SwitchMoE can run as moe_layer_op: every stage on its kernels (routing with priority="position",
    bias + activation with an activation of BIAS_ACTIVATIONS and biases, the combine), one dtype for the tokens and
    every weight, and no autocast (the op's fake states its outputs' dtypes; autocast would change its matmuls')."""
    if b1 is None or b2 is None or activation not in BIAS_ACTIVATIONS:
        return False
    if any(t.dtype != x.dtype for t in (router_weight, w1, b1, w2, b2)):
        return False
    if torch.is_autocast_enabled(x.device.type):
        return False
    return (moe_routing._routing_backend("auto", x.device, x.shape[0], priority) == "triton"
            and moe_expert_ffn.resolve_backend("expert_ffn", "auto", x.device) == "triton"
            and moe_combine.resolve_backend("combine_tokens", "auto", x.device) == "triton")


def _moe_layer(
    x: Tensor,  # (tokens, dim)
    router_weight: Tensor,  # (num_experts, dim)
    w1: Tensor,  # (num_experts, dim, width)
    b1: Tensor,  # (num_experts, width)
    w2: Tensor,  # (num_experts, expert_dim, dim)
    b2: Tensor,  # (num_experts, dim)
    valid: Optional[Tensor],  # (tokens,) bool
    capacity: int,  # -1: none, or given as capacity_tensor
    capacity_tensor: Optional[Tensor],  # () int64
    top_k: int,
    grouped: bool,
    buffer_capacity: int,  # rows per expert of the padded layout
    load_balance_coef: float,
    z_loss_coef: float,
    activation: str,
) -> LayerOutputs:
    """-> out (tokens, dim) in x's dtype, loss (), aux (3,) (balance, z, dropped), counts (2, num_experts) (routed,
    kept); then what the backward reads: probs, lse, expert_idx, keep, grad_scale, weights, slot_of, token_of_slot,
    assignment_of_slot, expert_of_slot, group_ends (the routing's), rows (slots, dim) the permuted tokens, h (slots,
    width) the first matmul's output (empty for activation "none"), hidden (slots, width), y (slots, dim)."""
    half = half_input_logits(x, router_weight)
    logits = logits_forward(x, router_weight, half)  # (tokens, num_experts) float32
    route = _moe_route(logits, valid, capacity, capacity_tensor, top_k, grouped, buffer_capacity, load_balance_coef,
                       z_loss_coef)
    probs, expert_idx, _, _, keep, weights, counts, slot_of, token_of_slot, assignment_of_slot, expert_of_slot, \
        group_ends, loss, aux, lse, grad_scale = route
    plan = dispatch_plan(slot_of, keep, token_of_slot, assignment_of_slot, expert_of_slot, group_ends, grouped,
                         buffer_capacity)
    rows = x.index_select(0, token_of_slot)  # (slots, dim)
    bias_experts, bias_ends, bias_capacity = _bias_layout(plan, b1)
    h = _ffn_matmul(rows, w1, plan)  # (slots, width) before the bias
    hidden = _moe_bias_act(h, b1, bias_experts, bias_ends, activation, bias_capacity)  # (slots, width)
    y = _ffn_matmul(hidden, w2, plan)  # (slots, dim), no output bias: the combine adds it
    out = _moe_combine(y, weights, slot_of, token_of_slot, assignment_of_slot, grouped, b2,
                       *combine_bias_layout(plan, True))  # (tokens, dim)
    return (out, loss, aux, counts, probs, lse, expert_idx, keep, grad_scale, weights, slot_of, token_of_slot,
            assignment_of_slot, expert_of_slot, group_ends, rows, h if activation != "none" else h.new_empty(0),
            hidden, y)


moe_layer_op = torch.library.custom_op("mamba_r1::moe_layer", mutates_args=())(_moe_layer)


@moe_layer_op.register_fake
def _(x, router_weight, w1, b1, w2, b2, valid, capacity, capacity_tensor, top_k, grouped, buffer_capacity,
      load_balance_coef, z_loss_coef, activation):
    tokens, dim = x.shape
    logits = x.new_empty(tokens, router_weight.shape[0], dtype=torch.float32)
    route = _moe_route_fake(logits, valid, capacity, capacity_tensor, top_k, grouped, buffer_capacity,
                            load_balance_coef, z_loss_coef)
    probs, expert_idx, _, _, keep, weights, counts, slot_of, token_of_slot, assignment_of_slot, expert_of_slot, \
        group_ends, loss, aux, lse, grad_scale = route
    slots, width = token_of_slot.shape[0], w1.shape[-1]
    hidden = x.new_empty(slots, width)
    return (x.new_empty(tokens, dim), loss, aux, counts, probs, lse, expert_idx, keep, grad_scale, weights, slot_of,
            token_of_slot, assignment_of_slot, expert_of_slot, group_ends, x.new_empty(slots, dim),
            x.new_empty(slots, width) if activation != "none" else x.new_empty(0), hidden, x.new_empty(slots, dim))


def _moe_layer_bwd(
    grad_out: Optional[Tensor],  # (tokens, dim)
    grad_loss: Optional[Tensor],  # ()
    grad_aux: Optional[Tensor],  # (3,)
    x: Tensor, router_weight: Tensor, w1: Tensor, b1: Tensor, w2: Tensor, b2: Tensor, valid: Optional[Tensor],
    probs: Tensor, lse: Tensor, expert_idx: Tensor, keep: Tensor, grad_scale: Tensor, weights: Tensor,
    slot_of: Tensor, token_of_slot: Tensor, assignment_of_slot: Tensor, expert_of_slot: Tensor, group_ends: Tensor,
    rows: Tensor, h: Tensor, hidden: Tensor, y: Tensor,
    grouped: bool, buffer_capacity: int, load_balance_coef: float, z_loss_coef: float, activation: str,
    need_x: bool, need_router: bool, need_w1: bool, need_b1: bool, need_w2: bool, need_b2: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """-> gradients of x, router_weight, w1, b1, w2, b2, each like its input, an empty tensor where its need_* is
    False: the combine's backward, the experts' (two matmul backwards around bias + activation's), the routing's,
    then x's from the rows' and the logits' gradients in one kernel, as the three-node composition computes them,
    skipping what no needed gradient depends on (frozen experts cost no weight-gradient matmuls). With only the
    auxiliary losses backpropagating, the experts' needed gradients are zeros."""
    plan = dispatch_plan(slot_of, keep, token_of_slot, assignment_of_slot, expert_of_slot, group_ends, grouped,
                         buffer_capacity)
    need_hidden = need_x or need_w1 or need_b1
    grad_weights = grad_rows = grad_w1 = grad_b1 = grad_w2 = grad_b2 = None
    if grad_out is not None:
        grad_y, grad_weights, grad_b2 = _moe_combine_bwd(grad_out, y, weights, token_of_slot, assignment_of_slot,
                                                         grouped, b2, *combine_bias_layout(plan, True))
        grad_hidden, grad_w2 = _ffn_matmul_backward(hidden, w2, grad_y, plan, need_hidden, need_w2)
        if need_hidden:
            bias_experts, bias_ends, bias_capacity = _bias_layout(plan, b1)
            grad_h, grad_b1 = _moe_bias_act_bwd(grad_hidden, h if activation != "none" else grad_hidden, b1,
                                                bias_experts, bias_ends, activation, bias_capacity)
            if activation == "none":
                grad_h = grad_hidden
            grad_rows, grad_w1 = _ffn_matmul_backward(rows, w1, grad_h, plan, need_x, need_w1)
    grad_x = grad_router = None
    if need_x or need_router:
        half = half_input_logits(x, router_weight)
        grad_logits = _moe_route_bwd(probs, lse, expert_idx, keep, valid, grad_scale, None, None, grad_weights,
                                     grad_loss, grad_aux, load_balance_coef, z_loss_coef)  # (tokens, num_experts)
        _, grad_router = logits_backward(grad_logits, x, router_weight, half, False, need_router)
        if need_x and grad_rows is not None:
            grad_x = _token_grad(grad_rows, slot_of, plan.owns_slot, grad_logits, router_weight, x.dtype, half)
        elif need_x:
            grad_x, _ = logits_backward(grad_logits, x, router_weight, half, True, False)
    grads = (grad_x, grad_router, grad_w1, grad_b1, grad_w2, grad_b2)
    needs = (need_x, need_router, need_w1, need_b1, need_w2, need_b2)
    return tuple((g if g is not None else torch.zeros_like(t)) if need else t.new_empty(0)
                 for g, need, t in zip(grads, needs, (x, router_weight, w1, b1, w2, b2)))


moe_layer_bwd_op = torch.library.custom_op("mamba_r1::moe_layer_bwd", mutates_args=())(_moe_layer_bwd)


@moe_layer_bwd_op.register_fake
def _(grad_out, grad_loss, grad_aux, x, router_weight, w1, b1, w2, b2, valid, probs, lse, expert_idx, keep,
      grad_scale, weights, slot_of, token_of_slot, assignment_of_slot, expert_of_slot, group_ends, rows, h, hidden, y,
      grouped, buffer_capacity, load_balance_coef, z_loss_coef, activation, *needs):
    return tuple(torch.empty_like(t) if need else t.new_empty(0)
                 for need, t in zip(needs, (x, router_weight, w1, b1, w2, b2)))


def _layer_setup_context(ctx, inputs, output):
    x, router_weight, w1, b1, w2, b2, valid, _, _, _, grouped, buffer_capacity, lb_coef, z_coef, activation = inputs
    # Most outputs are the backward's state, never differentiated: no zero-filled gradients for them.
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(x, router_weight, w1, b1, w2, b2, valid, *output[4:])
    ctx.config = (grouped, buffer_capacity, lb_coef, z_coef, activation)


def _layer_backward(ctx, grad_out, grad_loss, grad_aux, *_):
    needs = tuple(ctx.needs_input_grad[:6])  # x, router_weight, w1, b1, w2, b2
    grads = backward_op(ctx, moe_layer_bwd_op, _moe_layer_bwd)(grad_out, grad_loss, grad_aux, *ctx.saved_tensors,
                                                                *ctx.config, *needs)
    return (*(g if need else None for g, need in zip(grads, needs)), *(None,) * 9)


moe_layer_op.register_autograd(_layer_backward, setup_context=_layer_setup_context)
_MoELayerEager = eager_function("_MoELayerEager", _moe_layer, _layer_setup_context, _layer_backward)


def switch_moe_fused(x: Tensor, router_weight: Tensor, w1: Tensor, b1: Tensor, w2: Tensor, b2: Tensor,
                     valid: Optional[Tensor], capacity, top_k: int, layout: str, buffer_capacity: int,
                     load_balance_coef: float, z_loss_coef: float,
                     activation: str) -> tuple[Tensor, RouterLosses, Tensor]:
    """SwitchMoE's forward on (tokens, dim) tokens as one op (see fused_layer_applies) -> (out (tokens, dim),
    the router's losses, kept assignments per expert (num_experts,) int64)."""
    outputs = run_op(moe_layer_op, _MoELayerEager, x, router_weight, w1, b1, w2, b2, valid,
                     *_capacity_args(capacity), top_k, layout == "grouped", buffer_capacity, float(load_balance_coef),
                     float(z_loss_coef), activation)
    out, loss, aux, counts = outputs[:4]
    return out, RouterLosses(loss, aux[0], aux[1], aux[2]), counts[1]


__all__ = ["fused_layer_applies", "moe_layer_bwd_op", "moe_layer_op", "switch_moe_fused"]
