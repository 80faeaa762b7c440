"""The selective scan as a plain sequential recurrence: the specification every other backend is tested against.

Per channel d and state n (DESIGN.md):
    dt_t = softplus(delta_t + delta_bias)            (softplus only if asked)
    h_t  = exp(dt_t * A) * h_{t-1} + dt_t * B_t * u_t
    y_t  = sum_n C_t * h_t + D * u_t
    out  = y * silu(z)
State and accumulation are float32 (float64 if the inputs are float64); the output has the input's dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import repeat


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64 (for reference checks); everything else accumulates in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def expand_groups(BC: torch.Tensor, dim: int) -> torch.Tensor:
    """(batch, d_state, seqlen) or (batch, groups, d_state, seqlen) -> (batch, dim, d_state, seqlen), one row per channel."""
    if BC.dim() == 3:
        return repeat(BC, "batch state seqlen -> batch dim state seqlen", dim=dim)
    return repeat(BC, "batch groups state seqlen -> batch (groups per_group) state seqlen", per_group=dim // BC.shape[1])


def selective_scan_ref(
    u: torch.Tensor,  # (batch, dim, seqlen)
    delta: torch.Tensor,  # (batch, dim, seqlen)
    A: torch.Tensor,  # (dim, d_state)
    B: torch.Tensor,  # (batch, d_state, seqlen) or (batch, groups, d_state, seqlen)
    C: torch.Tensor,  # (batch, d_state, seqlen) or (batch, groups, d_state, seqlen)
    D: torch.Tensor | None = None,  # (dim,)
    z: torch.Tensor | None = None,  # (batch, dim, seqlen)
    delta_bias: torch.Tensor | None = None,  # (dim,)
    delta_softplus: bool = False,
    initial_state: torch.Tensor | None = None,  # (batch, dim, d_state)
    return_last_state: bool = False,
):
    """Sequential reference. Returns out (batch, dim, seqlen), and last state (batch, dim, d_state) if asked."""
    out_dtype = u.dtype
    acc = compute_dtype(u.dtype)
    batch, dim, seqlen = u.shape
    d_state = A.shape[1]

    u_f, delta_f, A_f = u.to(acc), delta.to(acc), A.to(acc)
    if delta_bias is not None:
        delta_f = delta_f + delta_bias.to(acc)[:, None]
    if delta_softplus:
        delta_f = F.softplus(delta_f)
    B_f = expand_groups(B, dim).to(acc)  # (batch, dim, d_state, seqlen)
    C_f = expand_groups(C, dim).to(acc)

    if initial_state is None:
        h = u.new_zeros(batch, dim, d_state, dtype=acc)
    else:
        h = initial_state.to(acc)
    ys = []
    for t in range(seqlen):
        dt = delta_f[:, :, t, None]  # (batch, dim, 1)
        h = torch.exp(dt * A_f) * h + dt * B_f[:, :, :, t] * u_f[:, :, t, None]
        ys.append((h * C_f[:, :, :, t]).sum(-1))  # (batch, dim)
    y = torch.stack(ys, dim=-1) if ys else u_f.new_zeros(batch, dim, 0)  # (batch, dim, seqlen)

    if D is not None:
        y = y + D.to(acc)[:, None] * u_f
    if z is not None:
        y = y * F.silu(z.to(acc))
    out = y.to(out_dtype)
    if return_last_state:
        return out, h
    return out


def selective_scan_ref_float64(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                               initial_state=None, return_last_state=False):
    """The reference run entirely in float64 on upcast inputs: the yardstick for float32 and bf16 error checks."""
    def up(t):
        return None if t is None else t.double()

    return selective_scan_ref(up(u), up(delta), up(A), up(B), up(C), up(D), up(z), up(delta_bias), delta_softplus,
                              up(initial_state), return_last_state)


__all__ = ["selective_scan_ref", "selective_scan_ref_float64", "expand_groups", "compute_dtype"]
