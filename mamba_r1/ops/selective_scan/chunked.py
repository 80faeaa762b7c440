"""Chunked selective scan in plain PyTorch: the CPU path ("torch" backend), differentiable by autograd.

The sequence is cut into chunks of ``CHUNK_L`` steps. Inside a chunk every step is computed at once, in log space:
with ``S_t = sum_{s<=t} dt_s`` (the cumulative step size from the chunk start) and ``R = S_last``,

    h_t = exp(A S_t) h0 + sum_{s<=t} exp(A (S_t - S_s)) dt_s B_s u_s
        = [exp(A R) h0 + cumsum_s(w_s * dt_s B_s u_s)] / w_t,      w_s = exp(A (R - S_s)).

Every exponent is bounded by ``|A| * R`` (the chunk's total decay), so nothing overflows as long as that stays under
``MAX_LOG_DECAY``; a chunk whose decay is larger is split in halves until it fits (a one-step chunk always fits:
``R - S = 0``). Across chunks the state is carried sequentially.

Memory: without grad at most one chunk's ``(batch, dim, d_state, chunk)`` tensors are alive at a time. With grad each
chunk is checkpointed, so backward keeps only the chunk inputs (O(batch * dim * seqlen)) and the chunk-boundary states,
and recomputes a chunk's ``(..., d_state, chunk)`` intermediates when it needs them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from mamba_r1.ops.selective_scan.ref import compute_dtype

# Steps per chunk. Measured on 2 CPU cores at (2, 256, 1024, 16) float32: 32 to 128 are within noise of each other;
# shorter chunks pay Python overhead per chunk, longer ones split more often under the decay bound.
CHUNK_L = 64
# Largest |A| * (sum of dt over a chunk) kept in one piece: exp(-60) ~ 1e-26 stays a normal float32 (min ~1e-38),
# so the division by w_t never meets an underflowed zero.
MAX_LOG_DECAY = 60.0


def _scan_chunk(
    h0: torch.Tensor,  # (batch, groups, per_group, d_state) float32
    dt: torch.Tensor,  # (batch, groups, per_group, chunk)
    du: torch.Tensor,  # (batch, groups, per_group, chunk)  dt * u
    A: torch.Tensor,  # (groups, per_group, d_state)
    B: torch.Tensor,  # (batch, groups, d_state, chunk)
    C: torch.Tensor,  # (batch, groups, d_state, chunk)
    inplace: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One chunk of the recurrence. Returns y (batch, groups, per_group, chunk) and the last state.

    ``inplace`` (no autograd) reuses the (…, d_state, chunk) buffers instead of allocating one per operation:
    each full-size pass costs about a millisecond at (2, 256, 1024, 16) on two cores, allocation included.
    """
    S = torch.cumsum(dt, dim=-1)  # (batch, groups, per_group, chunk)
    R = S[..., -1:]  # (batch, groups, per_group, 1)
    A_ = A.unsqueeze(-1)  # (groups, per_group, d_state, 1)
    w = torch.exp(A_ * (R - S).unsqueeze(-2))  # (batch, groups, per_group, d_state, chunk), in (0, 1] for A < 0
    carried = (torch.exp(A_ * R.unsqueeze(-2)) * h0.unsqueeze(-1))  # exp(A R) h0, (..., d_state, 1)
    if inplace:
        h = torch.mul(w, du.unsqueeze(-2)).mul_(B.unsqueeze(2))  # w_s dt_s u_s B_s
        h = torch.cumsum(h, dim=-1, out=h).add_(carried).div_(w)
        last = h[..., -1].clone()
        y = h.mul_(C.unsqueeze(2)).sum(dim=-2)  # (batch, groups, per_group, chunk)
        return y, last
    acc = torch.cumsum(w * du.unsqueeze(-2) * B.unsqueeze(2), dim=-1)
    h = (acc + carried) / w  # (batch, groups, per_group, d_state, chunk)
    y = (h * C.unsqueeze(2)).sum(dim=-2)  # (batch, groups, per_group, chunk)
    return y, h[..., -1]


def _chunk_bounds(dt: torch.Tensor, A: torch.Tensor, chunk_len: int) -> list[tuple[int, int]]:
    """Chunk boundaries along seqlen such that every chunk's log-decay |A| * sum(dt) stays under MAX_LOG_DECAY.

    dt: (batch, groups, per_group, seqlen); A: (groups, per_group, d_state). One host sync for the whole sequence (free on CPU); chunks that are too
    steep (rare: huge dt or |A|) are halved until they fit.
    """
    seqlen = dt.shape[-1]
    a_max = A.abs().amax(dim=-1)  # (groups, per_group)
    # |dt| bounds every exponent A (S_t - S_s) also when dt has either sign (no softplus) or A is positive.
    cum = F.pad(torch.cumsum(dt.abs(), dim=-1), (1, 0))  # (batch, groups, per_group, seqlen + 1)
    starts = list(range(0, seqlen, chunk_len))
    ends = [min(s + chunk_len, seqlen) for s in starts]
    idx_s = torch.tensor(starts, device=dt.device)
    idx_e = torch.tensor(ends, device=dt.device)
    steep = ((cum[..., idx_e] - cum[..., idx_s]) * a_max.unsqueeze(-1)).flatten(0, -2).amax(dim=0)  # (n_chunks,)
    bounds: list[tuple[int, int]] = []
    todo = [(s, e, v) for s, e, v in zip(starts, ends, steep.tolist())]
    while todo:
        s, e, v = todo.pop(0)
        if v <= MAX_LOG_DECAY or e - s == 1:
            bounds.append((s, e))
            continue
        mid = (s + e) // 2
        halves = []
        for lo, hi in ((s, mid), (mid, e)):
            halves.append((lo, hi, ((cum[..., hi] - cum[..., lo]) * a_max).max().item()))
        todo[:0] = halves
    return bounds


def selective_scan_chunked(
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
    chunk_len: int = CHUNK_L,
):
    """Chunked scan; same arguments and results as ``selective_scan_ref`` (inputs already validated)."""
    out_dtype = u.dtype
    acc = compute_dtype(u.dtype)
    batch, dim, seqlen = u.shape
    d_state = A.shape[1]
    if B.dim() == 3:
        B = B.unsqueeze(1)
    if C.dim() == 3:
        C = C.unsqueeze(1)
    groups = B.shape[1]
    per_group = dim // groups

    u_f = u.to(acc)
    dt = delta.to(acc)
    if delta_bias is not None:
        dt = dt + delta_bias.to(acc)[:, None]
    if delta_softplus:
        dt = F.softplus(dt)
    grouped = (batch, groups, per_group, seqlen)
    dt_g = dt.view(grouped)
    du_g = (dt * u_f).view(grouped)
    A_g = A.to(acc).view(groups, per_group, d_state)
    B_f, C_f = B.to(acc), C.to(acc)  # (batch, groups, d_state, seqlen)

    if initial_state is None:
        h = u.new_zeros(batch, groups, per_group, d_state, dtype=acc)
    else:
        h = initial_state.to(acc).view(batch, groups, per_group, d_state)

    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (u, delta, A, B, C, D, z, delta_bias, initial_state))
    with torch.no_grad():
        bounds = _chunk_bounds(dt_g, A_g, chunk_len)
    ys = []
    for s, e in bounds:
        args = (h, dt_g[..., s:e], du_g[..., s:e], A_g, B_f[..., s:e], C_f[..., s:e])
        if needs_grad:
            y_c, h = checkpoint(_scan_chunk, *args, use_reentrant=False)
        else:
            y_c, h = _scan_chunk(*args, inplace=True)
        ys.append(y_c)
    y = torch.cat(ys, dim=-1).reshape(batch, dim, seqlen)

    if D is not None:
        y = y + D.to(acc)[:, None] * u_f
    if z is not None:
        y = y * F.silu(z.to(acc))
    out = y.to(out_dtype)
    if return_last_state:
        return out, h.reshape(batch, dim, d_state).clone()  # detach from the last chunk's buffer
    return out


__all__ = ["selective_scan_chunked", "CHUNK_L", "MAX_LOG_DECAY"]
