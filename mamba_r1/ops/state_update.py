"""One decoding step of the selective-scan recurrence: the O(1)-per-token path used by generation.

Same math as one time step of ref.py, per channel d and state n:
    dt  = softplus(dt + dt_bias)                     (softplus only if asked)
    h   = exp(dt * A) * h + dt * B * x
    out = (sum_n C * h + D * x) * silu(z)
The state is float32 and is updated in place, so a decode loop reuses one buffer (and can be captured in a CUDA
graph); the work is O(batch * dim * d_state), small enough that plain PyTorch is the right tool.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange, repeat

from mamba_r1.ops.selective_scan import _check_float, _check_shape


def _check_update_args(state, x, dt, A, B, C, D, z, dt_bias) -> None:
    """Validate selective_state_update's inputs; raise ValueError/TypeError naming the argument, expected and given."""
    if not isinstance(state, torch.Tensor):
        raise TypeError(f"state must be a torch.Tensor; got {type(state).__name__}")
    if state.dtype != torch.float32:
        raise TypeError(f"state must be float32 (it accumulates the recurrence); got dtype {state.dtype}")
    if state.dim() != 3:
        raise ValueError(f"state must be (batch, dim, d_state); got shape {tuple(state.shape)}")
    batch, dim, d_state = state.shape
    _check_float("x", x)
    _check_shape("x", x, (batch, dim), "(batch, dim)")
    _check_float("dt", dt)
    _check_shape("dt", dt, (batch, dim), "(batch, dim)")
    _check_float("A", A)
    _check_shape("A", A, (dim, d_state), "(dim, d_state)")
    for name, BC in (("B", B), ("C", C)):
        _check_float(name, BC)
        if BC.dim() == 2:
            _check_shape(name, BC, (batch, d_state), "(batch, d_state)")
        elif BC.dim() == 3:
            groups = BC.shape[1]
            if groups < 1 or dim % groups != 0:
                raise ValueError(f"{name} has {groups} groups, which must divide dim={dim}; "
                                 f"got shape {tuple(BC.shape)}")
            _check_shape(name, BC, (batch, groups, d_state), "(batch, groups, d_state)")
        else:
            raise ValueError(f"{name} must be (batch, d_state) or (batch, groups, d_state) with batch={batch}, "
                             f"d_state={d_state}; got shape {tuple(BC.shape)}")
    for name, t in (("D", D), ("dt_bias", dt_bias)):
        if t is not None:
            _check_float(name, t)
            _check_shape(name, t, (dim,), "(dim,)")
    if z is not None:
        _check_float("z", z)
        _check_shape("z", z, (batch, dim), "(batch, dim)")
    named = {"x": x, "dt": dt, "A": A, "B": B, "C": C, "D": D, "z": z, "dt_bias": dt_bias}
    for name, t in named.items():
        if t is not None and t.device != state.device:
            raise ValueError(f"{name} is on {t.device} but state is on {state.device}; "
                             "all inputs must be on one device")


def _per_channel(BC: torch.Tensor, dim: int) -> torch.Tensor:
    """(batch, d_state) or (batch, groups, d_state) -> float32, broadcastable to (batch, dim, d_state)."""
    if BC.dim() == 2:
        return rearrange(BC.float(), "batch state -> batch 1 state")
    return repeat(BC.float(), "batch groups state -> batch (groups channel) state", channel=dim // BC.shape[1])


def selective_state_update(
    state: torch.Tensor,  # (batch, dim, d_state), float32, updated in place
    x: torch.Tensor,  # (batch, dim)
    dt: torch.Tensor,  # (batch, dim)
    A: torch.Tensor,  # (dim, d_state)
    B: torch.Tensor,  # (batch, d_state) or (batch, groups, d_state)
    C: torch.Tensor,  # (batch, d_state) or (batch, groups, d_state)
    D: torch.Tensor | None = None,  # (dim,)
    z: torch.Tensor | None = None,  # (batch, dim)
    dt_bias: torch.Tensor | None = None,  # (dim,)
    dt_softplus: bool = False,
) -> torch.Tensor:
    """Advance ``state`` by one token in place and return that token's output (batch, dim) in x's dtype.

    Running it over tokens t = 0..T-1 gives the same outputs and final state as ``selective_scan`` over those T
    tokens with ``initial_state=state`` (the layouts differ only by the missing seqlen axis).
    One step is differentiable in every input but ``state``. Backpropagating through a chain of steps is not
    supported: a step overwrites the state an earlier step saved for backward, and autograd raises an in-place error.
    Train with ``selective_scan``.
    """
    _check_update_args(state, x, dt, A, B, C, D, z, dt_bias)
    dim = state.shape[1]
    x_f = x.float()  # (batch, dim)
    dt_f = dt.float()  # (batch, dim)
    if dt_bias is not None:
        dt_f = dt_f + dt_bias.float()
    if dt_softplus:
        dt_f = F.softplus(dt_f)
    dt_f = rearrange(dt_f, "batch dim -> batch dim 1")
    B_f = _per_channel(B, dim)  # (batch, dim or 1, d_state)
    C_f = _per_channel(C, dim)

    # Same operation order as ref.py's loop body, so decoding reproduces a prefill to rounding.
    state.mul_(torch.exp(dt_f * A.float())).add_(dt_f * B_f * rearrange(x_f, "batch dim -> batch dim 1"))
    y = (state * C_f).sum(-1)  # (batch, dim)
    if D is not None:
        y = y + D.float() * x_f
    if z is not None:
        y = y * F.silu(z.float())
    return y.to(x.dtype)


__all__ = ["selective_state_update"]
