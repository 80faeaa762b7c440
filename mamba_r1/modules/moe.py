"""Switch-style Mixture-of-Experts feed-forward layer: a float32 router, capacity-limited top-k dispatch, experts
held as stacked weights and run together by the dispatch ops (mamba_r1/ops/moe_dispatch.py)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn as nn

from mamba_r1.ops.moe_combine import combine
from mamba_r1.ops.moe_dispatch import (
    DISPATCH_BACKENDS,
    PRIORITIES,
    DispatchPlan,
    check_activation,
    expert_capacity,
    projection_width,
    resolve_dispatch_backend,
)
from mamba_r1.ops.moe_expert_ffn import expert_ffn_fused
from mamba_r1.ops.moe_layer import fused_layer_applies, switch_moe_fused
from mamba_r1.ops.moe_routing import route_and_permute


@dataclass
class MoEAux:
    """What a SwitchMoE forward reports besides its output. Add ``loss`` to the training loss."""

    loss: torch.Tensor  # () load_balance_coef * load_balance_loss + z_loss_coef * z_loss; backpropagates
    load_balance_loss: torch.Tensor  # () num_experts * sum_i f_i * P_i; 1 for a uniform router
    z_loss: torch.Tensor  # () mean(logsumexp(logits)^2)
    tokens_per_expert: torch.Tensor  # (num_experts,) int64 kept assignments; (layers, num_experts) once stacked
    dropped_fraction: torch.Tensor  # () float32 share of real-token assignments dropped; (layers,) once stacked

    @classmethod
    def stack(cls, auxes: Sequence[MoEAux], reduction: str = "sum") -> MoEAux:
        """Combine the reports of several layers: the three losses summed (``reduction="sum"``, what a model adds to
        its loss) or averaged (``"mean"``); the statistics stacked per layer along a new first dimension."""
        if reduction not in ("sum", "mean"):
            raise ValueError(f"reduction must be 'sum' or 'mean'; got {reduction!r}")
        if len(auxes) == 0:
            raise ValueError("auxes must hold at least one MoEAux; got an empty sequence")
        shapes = {tuple(aux.tokens_per_expert.shape) for aux in auxes}
        if len(shapes) != 1:
            raise ValueError("auxes must all have the same tokens_per_expert shape to be stacked; "
                             f"got {sorted(shapes)}")

        def reduce(name: str) -> torch.Tensor:
            values = torch.stack([getattr(aux, name) for aux in auxes])
            return values.sum(0) if reduction == "sum" else values.mean(0)

        return cls(
            loss=reduce("loss"),
            load_balance_loss=reduce("load_balance_loss"),
            z_loss=reduce("z_loss"),
            tokens_per_expert=torch.stack([aux.tokens_per_expert for aux in auxes]),
            dropped_fraction=torch.stack([aux.dropped_fraction for aux in auxes]),
        )


class SwitchExperts(nn.Module):
    """``num_experts`` FFNs as stacked weights, so one grouped or batched matmul runs them all.

    ``w1 (num_experts, dim, width)``, ``b1 (num_experts, width)``, ``w2 (num_experts, expert_dim, dim)``,
    ``b2 (num_experts, dim)``, where width is ``expert_dim``, or ``2 * expert_dim`` for swiglu with the gate and
    up halves side by side ``[gate | up]`` as in ``MLP.fc1``. Weights are stored input-major (``x @ w1[e]``),
    the layout torch._grouped_mm takes without a transpose.
    """

    def __init__(self, num_experts: int, dim: int, expert_dim: int, activation: str = "gelu", bias: bool = True,
                 device=None, dtype=None):
        super().__init__()
        self.num_experts, self.dim, self.expert_dim, self.activation = num_experts, dim, expert_dim, activation
        factory = dict(device=device, dtype=dtype)
        width = projection_width(expert_dim, activation)
        self.w1 = nn.Parameter(torch.empty(num_experts, dim, width, **factory))
        self.w2 = nn.Parameter(torch.empty(num_experts, expert_dim, dim, **factory))
        self.b1 = nn.Parameter(torch.empty(num_experts, width, **factory)) if bias else None
        self.b2 = nn.Parameter(torch.empty(num_experts, dim, **factory)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # nn.Linear's default, per expert: uniform in +-1/sqrt(fan_in) for weights and biases alike.
        for weight, bias, fan_in in ((self.w1, self.b1, self.dim), (self.w2, self.b2, self.expert_dim)):
            bound = 1.0 / math.sqrt(fan_in)
            nn.init.uniform_(weight, -bound, bound)
            if bias is not None:
                nn.init.uniform_(bias, -bound, bound)

    def forward(self, rows: torch.Tensor, plan: DispatchPlan, output_bias: bool = True) -> torch.Tensor:
        """rows: (slots, dim) tokens in the plan's buffer order -> (slots, dim) each row through its expert;
        ``output_bias=False`` leaves b2 out (SwitchMoE adds it while combining, saving a pass over the rows)."""
        # On CUDA: bias adds and activation fused into kernels; expert_ffn everywhere else.
        return expert_ffn_fused(rows, plan, self.w1, self.b1, self.w2, self.b2 if output_bias else None,
                                self.activation)

    def extra_repr(self) -> str:
        return (f"num_experts={self.num_experts}, dim={self.dim}, expert_dim={self.expert_dim}, "
                f"activation={self.activation!r}, bias={self.b1 is not None}")


class SwitchMoE(nn.Module):
    """Switch Transformer MoE FFN (top-1; top-k works too), for ``(batch, seqlen, dim)`` or ``(tokens, dim)``.

    Router: ``nn.Linear(dim, num_experts, bias=False)`` run in float32 whatever the autocast dtype, with optional
    multiplicative jitter on its input in training. Each token goes to its top-k experts, each expert takes at most
    ``max(min_capacity, ceil(capacity_factor * tokens * top_k / num_experts))`` assignments, counting real tokens
    only (``eval_capacity_factor`` in eval mode; ``None`` = no dropping). Which assignments overflow is decided
    by a deterministic queue: first choices before second ones, then position in the batch
    (``priority="position"``) or router confidence (``"gate"``). A kept assignment contributes
    gate * expert(x); a token with none kept outputs exactly zero (the residual carries it); padding tokens
    (``mask=False``) are not routed, take no capacity, output zero and are left out of the losses.

    ``backend``: ``"grouped_mm"`` sorts the assignments into contiguous per-expert segments and runs
    torch._grouped_mm over all of them (the dense FFN's work; dropped ones are computed and discarded);
    ``"bmm"`` lays them out (num_experts, capacity) and runs a batched matmul, whose buffer is the capacity
    computed from all tokens (padding included), or every token when capacity_factor is None (num_experts / top_k
    times the dense work); ``"auto"`` picks grouped_mm on Hopper GPUs in bf16 unless the padded buffer holds no more
    rows than the assignments (capacity_factor <= 1), and bmm everywhere else. On CUDA both run the bias adds and
    the activation in fused kernels, and the whole layer (router to combine) is one op with one backward
    (mamba_r1/ops/moe_layer.py; not with jitter, swiglu, mixed dtypes or autocast, which take the same kernels
    stage by stage). A training step never syncs with the host and sizes its buffers from shapes,
    so it can be captured whole in a CUDA graph (``torch.cuda.make_graphed_callables``; tested for grouped_mm and,
    at small sizes, bmm), which removes the per-launch host overhead that bounds it eagerly on slow hosts.
    """

    def __init__(
        self,
        dim: int,
        num_experts: int = 8,
        expert_dim: int = 2048,
        capacity_factor: float | None = 1.25,
        eval_capacity_factor: float | None = 2.0,
        min_capacity: int = 4,
        top_k: int = 1,
        jitter_noise: float = 0.0,
        load_balance_coef: float = 1e-2,
        z_loss_coef: float = 1e-3,
        activation: str = "gelu",
        bias: bool = True,
        priority: str = "position",
        backend: str = "auto",
        device=None,
        dtype=None,
    ):
        super().__init__()
        _check_config(dim, num_experts, expert_dim, capacity_factor, eval_capacity_factor, min_capacity, top_k,
                      jitter_noise, load_balance_coef, z_loss_coef, activation, priority, backend)
        self.dim, self.num_experts, self.expert_dim, self.top_k = dim, num_experts, expert_dim, top_k
        self.capacity_factor, self.eval_capacity_factor = capacity_factor, eval_capacity_factor
        self.min_capacity, self.jitter_noise = min_capacity, jitter_noise
        self.priority, self.backend = priority, backend
        self.load_balance_coef, self.z_loss_coef = load_balance_coef, z_loss_coef
        self.router = nn.Linear(dim, num_experts, bias=False, device=device, dtype=dtype)
        self.experts = SwitchExperts(num_experts, dim, expert_dim, activation, bias, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None, return_aux: bool = False):
        """x: (batch, seqlen, dim) or (tokens, dim); mask: x.shape[:-1] bool, True = real token.

        Returns the output, shaped like x, or ``(output, MoEAux)`` when ``return_aux=True``.
        """
        self._check_input(x, mask)
        tokens = x.reshape(-1, self.dim)  # (tokens, dim)
        valid = None if mask is None else mask.reshape(-1)  # (tokens,)
        capacity, buffer_capacity = self._capacity(tokens.shape[0], valid)
        backend = resolve_dispatch_backend(self.backend, tokens, self.experts.w1, self.experts.w2,
                                           padded_rows=self.num_experts * buffer_capacity,
                                           assignments=tokens.shape[0] * self.top_k)
        layout = "grouped" if backend == "grouped_mm" else "padded"
        router_input = self._jittered(tokens)
        ex = self.experts
        if router_input is None and fused_layer_applies(tokens, self.router.weight, ex.w1, ex.b1, ex.w2, ex.b2,
                                                        ex.activation, self.priority):
            # On CUDA: the whole layer as one op (mamba_r1/ops/moe_layer.py), the same kernels as the stages below.
            out, losses, kept = switch_moe_fused(tokens, self.router.weight, ex.w1, ex.b1, ex.w2, ex.b2, valid,
                                                 capacity, self.top_k, layout, buffer_capacity, self.load_balance_coef,
                                                 self.z_loss_coef, ex.activation)  # (tokens, dim)
        else:
            # Router logits (float32), routing, plan and losses (two fused kernels on CUDA with priority="position",
            # the torch composition elsewhere), and the tokens in the plan's buffer order (slots, dim).
            routed, rows = route_and_permute(tokens, self.router.weight, self.top_k, capacity, valid, self.priority,
                                             layout=layout, buffer_capacity=buffer_capacity,
                                             load_balance_coef=self.load_balance_coef, z_loss_coef=self.z_loss_coef,
                                             losses=return_aux, router_input=router_input)
            # The experts' output bias is added by combine (one kernel on CUDA, forward and backward).
            rows = self.experts(rows, routed.plan, output_bias=False)  # (slots, dim)
            out = combine(rows, routed.weights, routed.plan, bias=ex.b2)  # (tokens, dim)
            losses, kept = routed.losses, routed.routing.kept
        out = out.view(x.shape)
        if not return_aux:
            return out
        return out, MoEAux(
            loss=losses.loss,
            load_balance_loss=losses.load_balance_loss,
            z_loss=losses.z_loss,
            tokens_per_expert=kept,
            dropped_fraction=losses.dropped_fraction,
        )

    def _jittered(self, tokens: torch.Tensor) -> torch.Tensor | None:
        """The router's input with multiplicative jitter (training with jitter_noise > 0), in float32; None
        otherwise (the router reads the tokens themselves). The router runs in float32 either way (float32_logits):
        Switch's selective precision, since a bf16 softmax over near-equal logits decides routing by rounding
        noise."""
        if self.training and self.jitter_noise > 0:
            router_in = tokens.float()
            return router_in * torch.empty_like(router_in).uniform_(1.0 - self.jitter_noise, 1.0 + self.jitter_noise)
        return None

    def _capacity(self, num_tokens: int, valid: torch.Tensor | None):
        """-> (capacity compared against each assignment's rank, rows per expert of the padded buffer).

        The first counts real tokens, a device tensor when there is a mask (no host sync); the second must be a
        Python int and comes from the total token count, an upper bound of the first, clipped to num_tokens
        because top-k choices are distinct so no expert gets more than one assignment per token."""
        factor = self.capacity_factor if self.training else self.eval_capacity_factor
        if factor is None:
            return None, num_tokens
        args = (self.num_experts, self.top_k, factor, self.min_capacity)
        from_all_tokens = expert_capacity(num_tokens, *args)
        capacity = from_all_tokens if valid is None else expert_capacity(valid.sum(), *args)
        return capacity, min(from_all_tokens, num_tokens)

    def _check_input(self, x: torch.Tensor, mask: torch.Tensor | None) -> None:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x must be a torch.Tensor; got {type(x).__name__}")
        if not x.is_floating_point():
            raise TypeError(f"x must be a floating-point tensor; got dtype {x.dtype}")
        if x.dim() not in (2, 3) or x.shape[-1] != self.dim:
            raise ValueError(f"x must be (batch, seqlen, dim) or (tokens, dim) with dim={self.dim}; "
                             f"got shape {tuple(x.shape)}")
        if mask is None:
            return
        if not isinstance(mask, torch.Tensor):
            raise TypeError(f"mask must be a torch.Tensor; got {type(mask).__name__}")
        if mask.dtype != torch.bool:
            raise TypeError(f"mask must be a bool tensor (True = real token); got dtype {mask.dtype}")
        if tuple(mask.shape) != tuple(x.shape[:-1]):
            raise ValueError(f"mask must have x's shape without dim, {tuple(x.shape[:-1])}; "
                             f"got {tuple(mask.shape)}")
        if mask.device != x.device:
            raise ValueError(f"mask is on {mask.device} but x is on {x.device}; they must be on one device")

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, num_experts={self.num_experts}, top_k={self.top_k}, "
                f"capacity_factor={self.capacity_factor}, eval_capacity_factor={self.eval_capacity_factor}, "
                f"min_capacity={self.min_capacity}, priority={self.priority!r}, backend={self.backend!r}")


def _check_config(dim, num_experts, expert_dim, capacity_factor, eval_capacity_factor, min_capacity, top_k,
                  jitter_noise, load_balance_coef, z_loss_coef, activation, priority, backend) -> None:
    for name, value in (("dim", dim), ("num_experts", num_experts), ("expert_dim", expert_dim), ("top_k", top_k)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an integer >= 1; got {value!r}")
    if top_k > num_experts:
        raise ValueError(f"top_k must be <= num_experts={num_experts}; got top_k={top_k}")
    for name, value in (("capacity_factor", capacity_factor), ("eval_capacity_factor", eval_capacity_factor)):
        if value is not None and not (isinstance(value, (int, float)) and value > 0 and math.isfinite(value)):
            raise ValueError(f"{name} must be a finite number > 0, or None for no dropping; got {value!r}")
    if not isinstance(min_capacity, int) or min_capacity < 0:
        raise ValueError(f"min_capacity must be an integer >= 0; got {min_capacity!r}")
    if not 0.0 <= jitter_noise < 1.0:
        raise ValueError(f"jitter_noise must be in [0, 1); got {jitter_noise!r}")
    for name, value in (("load_balance_coef", load_balance_coef), ("z_loss_coef", z_loss_coef)):
        if not value >= 0:
            raise ValueError(f"{name} must be >= 0; got {value!r}")
    check_activation(activation)
    if priority not in PRIORITIES:
        raise ValueError(f"priority must be one of {PRIORITIES}; got {priority!r}")
    if backend not in DISPATCH_BACKENDS:
        raise ValueError(f"backend must be one of {DISPATCH_BACKENDS}; got {backend!r}")
