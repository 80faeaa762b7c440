"""One decoding step of the selective-scan recurrence: the O(1)-per-token path used by generation.

Same math as one time step of ref.py, per channel d and state n:
    dt  = softplus(dt + dt_bias)                     (softplus only if asked)
    h   = exp(dt * A) * h + dt * B * x
    out = (sum_n C * h + D * x) * silu(z)
The state is float32 and is updated in place, so a decode loop reuses one buffer (and can be captured in a CUDA
graph).

Two backends compute it:
  "torch"  ``selective_state_update_ref``: plain PyTorch, the specification, differentiable; about a dozen small
           kernels per call, which is what a GPU decode step used to spend most of its time launching;
  "triton" one fused kernel: reads every input in whatever float dtype it has (so a caller never launches a
           ``.float()`` conversion), keeps the d_state axis of each channel in registers and writes the state back
           in place. Inference only: it has no backward.
  "auto"   triton for CUDA tensors, torch otherwise.
The kernel also runs on CPU under Triton's interpreter (TRITON_INTERPRET=1, read when triton decorates the kernels,
i.e. when this module is first imported), which is how CI tests it; the interpreter has no bfloat16, so there
half-precision inputs are upcast before the launch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange, repeat
from loguru import logger

from mamba_r1.ops.selective_scan import _check_float, _check_shape
from mamba_r1.ops.triton_runtime import (
    BACKENDS,
    built_for_interpreter,
    cdiv,
    check_triton_runtime,
    for_kernel,
    needs_autograd,
    next_power_of_2,
    resolve_backend,
    tl,
    triton,
)
from mamba_r1.ops.triton_runtime import jit as _jit

# The kernel's softplus is the scan's (imported eagerly: the kernel sits beside its reference in this file).
if triton is not None:
    from mamba_r1.ops.selective_scan.triton_fwd import softplus


# ---------------------------------------------------------------------------------------------- argument checks


def _check_update_args(state, x, dt, A, B, C, D, z, dt_bias, dt_weight=None) -> None:
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
    if dt_weight is None:
        _check_shape("dt", dt, (batch, dim), "(batch, dim)")
    else:
        _check_float("dt_weight", dt_weight)
        if dt_weight.dim() != 2 or dt_weight.shape[0] != dim:
            raise ValueError(f"dt_weight must be (dim, dt_rank) with dim={dim}; got shape {tuple(dt_weight.shape)}")
        _check_shape("dt", dt, (batch, dt_weight.shape[1]), "(batch, dt_rank) when dt_weight is given")
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
    named = {"x": x, "dt": dt, "A": A, "B": B, "C": C, "D": D, "z": z, "dt_bias": dt_bias, "dt_weight": dt_weight}
    for name, t in named.items():
        if t is not None and t.device != state.device:
            raise ValueError(f"{name} is on {t.device} but state is on {state.device}; "
                             "all inputs must be on one device")


# ---------------------------------------------------------------------------------------------- torch reference


def _per_channel(BC: torch.Tensor, dim: int) -> torch.Tensor:
    """(batch, d_state) or (batch, groups, d_state) -> float32, broadcastable to (batch, dim, d_state)."""
    if BC.dim() == 2:
        return rearrange(BC.float(), "batch state -> batch 1 state")
    return repeat(BC.float(), "batch groups state -> batch (groups channel) state", channel=dim // BC.shape[1])


def selective_state_update_ref(
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
    A_is_log: bool = False,
    dt_weight: torch.Tensor | None = None,  # (dim, dt_rank): dt is then (batch, dt_rank)
) -> torch.Tensor:  # (batch, dim) in x's dtype
    """The one-token update in plain PyTorch: the specification of the fused kernel. Inputs are trusted (checked
    by ``selective_state_update``). Differentiable in every input but ``state``."""
    dim = state.shape[1]
    A_f = -torch.exp(A.float()) if A_is_log else A.float()  # (dim, d_state)
    x_f = x.float()  # (batch, dim)
    dt_f = dt.float() if dt_weight is None else F.linear(dt.float(), dt_weight.float())  # (batch, dim)
    if dt_bias is not None:
        dt_f = dt_f + dt_bias.float()
    if dt_softplus:
        dt_f = F.softplus(dt_f)
    dt_f = rearrange(dt_f, "batch dim -> batch dim 1")
    B_f = _per_channel(B, dim)  # (batch, dim or 1, d_state)
    C_f = _per_channel(C, dim)

    # Same operation order as ref.py's loop body, so decoding reproduces a prefill to rounding.
    state.mul_(torch.exp(dt_f * A_f)).add_(dt_f * B_f * rearrange(x_f, "batch dim -> batch dim 1"))
    y = (state * C_f).sum(-1)  # (batch, dim)
    if D is not None:
        y = y + D.float() * x_f
    if z is not None:
        y = y * F.silu(z.float())
    return y.to(x.dtype)


# ---------------------------------------------------------------------------------------------- Triton kernel


def _block_sizes(block_n: int, interpreting: bool) -> tuple[int, int]:
    """(BLOCK_D channels per program, num_warps) for a padded d_state of ``block_n``.

    GPU: mamba-ssm's table for its selective_state_update kernel (about 512 float32 state elements per program, so
    the state tile stays in registers); not yet re-measured here. Interpreter: 4 channels, so the small test shapes
    cross block edges.
    """
    if interpreting:
        return 4, 1
    if block_n <= 16:
        return 32, 4
    if block_n <= 32:
        return 16, 4
    if block_n <= 64:
        return 8, 4
    if block_n <= 128:
        return 4, 4
    return 4, 8


@_jit
def _state_update_kernel(
    # inputs (any float dtype; the state is float32 and is also the output of the recurrence)
    state_ptr, x_ptr, dt_ptr, dt_bias_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, dt_weight_ptr,
    # output (batch, dim) in x's dtype
    out_ptr,
    # sizes: B and C may have different group counts, so each has its own channels-per-group
    dim, d_state, dim_per_group_B, dim_per_group_C, dt_rank,
    # strides (any layout: views such as x_proj's split outputs are read in place)
    stride_state_batch, stride_state_dim, stride_state_n,
    stride_x_batch, stride_x_dim,
    stride_dt_batch, stride_dt_dim,
    stride_A_dim, stride_A_n,
    stride_B_batch, stride_B_group, stride_B_n,
    stride_C_batch, stride_C_group, stride_C_n,
    stride_z_batch, stride_z_dim,
    stride_out_batch, stride_out_dim,
    stride_dt_weight_dim, stride_dt_weight_rank,
    HAS_DT_BIAS: tl.constexpr, HAS_D: tl.constexpr, HAS_Z: tl.constexpr, DT_SOFTPLUS: tl.constexpr,
    A_IS_LOG: tl.constexpr, HAS_DT_WEIGHT: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    """One program per (block of BLOCK_D channels, batch row); the (BLOCK_D, BLOCK_N) state tile lives in
    registers between its load and its store."""
    pid_d = tl.program_id(0)
    pid_batch = tl.program_id(1).to(tl.int64)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)  # channels of this block
    offs_n = tl.arange(0, BLOCK_N)  # states, padded to a power of two
    mask_d = offs_d < dim
    mask_dn = mask_d[:, None] & (offs_n < d_state)[None, :]

    # Per-channel vectors (BLOCK_D,): this batch row of x, dt, z; the parameters D, dt_bias.
    x = tl.load(x_ptr + pid_batch * stride_x_batch + offs_d * stride_x_dim, mask=mask_d, other=0.0).to(tl.float32)
    if HAS_DT_WEIGHT:
        # The block's dt_proj, fused: dt = dt_low @ dt_weight.T with dt_low (dt_rank,) this row's input, read whole,
        # and a (BLOCK_D, BLOCK_R) tile of the weight (a launch and a (batch, dim) round trip fewer per token).
        offs_r = tl.arange(0, BLOCK_R)
        mask_r = offs_r < dt_rank
        dt_low = tl.load(dt_ptr + pid_batch * stride_dt_batch + offs_r * stride_dt_dim, mask=mask_r, other=0.0)
        w = tl.load(dt_weight_ptr + offs_d[:, None] * stride_dt_weight_dim + offs_r[None, :] * stride_dt_weight_rank,
                    mask=mask_d[:, None] & mask_r[None, :], other=0.0)
        dt = tl.sum(w.to(tl.float32) * dt_low.to(tl.float32)[None, :], axis=1)  # (BLOCK_D,)
    else:
        dt = tl.load(dt_ptr + pid_batch * stride_dt_batch + offs_d * stride_dt_dim, mask=mask_d, other=0.0)
        dt = dt.to(tl.float32)
    if HAS_DT_BIAS:
        dt += tl.load(dt_bias_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    if DT_SOFTPLUS:
        dt = softplus(dt)

    # (BLOCK_D, BLOCK_N) tiles: the state rows and A rows of these channels; B and C rows of each channel's group
    # (a block may straddle groups, so the group is looked up per channel; the rows repeat and hit the cache).
    state_ptrs = (state_ptr + pid_batch * stride_state_batch + offs_d[:, None] * stride_state_dim
                  + offs_n[None, :] * stride_state_n)
    h = tl.load(state_ptrs, mask=mask_dn, other=0.0)
    A = tl.load(A_ptr + offs_d[:, None] * stride_A_dim + offs_n[None, :] * stride_A_n, mask=mask_dn, other=0.0)
    A = A.to(tl.float32)
    if A_IS_LOG:
        A = -tl.exp(A)
    group_B = offs_d // dim_per_group_B
    B = tl.load(B_ptr + pid_batch * stride_B_batch + group_B[:, None] * stride_B_group + offs_n[None, :] * stride_B_n,
                mask=mask_dn, other=0.0).to(tl.float32)
    group_C = offs_d // dim_per_group_C
    C = tl.load(C_ptr + pid_batch * stride_C_batch + group_C[:, None] * stride_C_group + offs_n[None, :] * stride_C_n,
                mask=mask_dn, other=0.0).to(tl.float32)

    # Same operation order as the reference: h * exp(dt * A) + (dt * B) * x.
    h = h * tl.exp(dt[:, None] * A) + dt[:, None] * B * x[:, None]
    tl.store(state_ptrs, h, mask=mask_dn)

    y = tl.sum(h * C, axis=1)  # (BLOCK_D,)
    if HAS_D:
        y += tl.load(D_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32) * x
    if HAS_Z:
        z = tl.load(z_ptr + pid_batch * stride_z_batch + offs_d * stride_z_dim, mask=mask_d, other=0.0)
        z = z.to(tl.float32)
        y *= z * tl.sigmoid(z)
    tl.store(out_ptr + pid_batch * stride_out_batch + offs_d * stride_out_dim, y.to(out_ptr.dtype.element_ty),
             mask=mask_d)


def _interpreting() -> bool:
    """Whether this module's kernels run on Triton's CPU interpreter (see built_for_interpreter)."""
    return built_for_interpreter(_state_update_kernel)


def _as_groups(BC: torch.Tensor) -> torch.Tensor:
    """(batch, d_state) -> (batch, 1, d_state) view; 3-D passes through."""
    return BC.unsqueeze(1) if BC.dim() == 2 else BC


def _state_update_triton(
    state: torch.Tensor,  # (batch, dim, d_state), float32, updated in place
    x: torch.Tensor,  # (batch, dim)
    dt: torch.Tensor,  # (batch, dim)
    A: torch.Tensor,  # (dim, d_state)
    B: torch.Tensor,  # (batch, d_state) or (batch, groups, d_state)
    C: torch.Tensor,  # (batch, d_state) or (batch, groups, d_state)
    D: torch.Tensor | None,  # (dim,)
    z: torch.Tensor | None,  # (batch, dim)
    dt_bias: torch.Tensor | None,  # (dim,)
    dt_softplus: bool,
    A_is_log: bool,
    dt_weight: torch.Tensor | None,  # (dim, dt_rank)
) -> torch.Tensor:  # (batch, dim) in x's dtype
    """Launch the fused kernel: one launch, no allocation but the output, no host sync (CUDA-graph capturable)."""
    interpreting = _interpreting()
    check_triton_runtime("selective_state_update", state.device, interpreting)
    x_k, dt_k, A_k, B_k, C_k, D_k, z_k, bias_k, w_k = (for_kernel(t, interpreting)
                                                       for t in (x, dt, A, B, C, D, z, dt_bias, dt_weight))
    B_k, C_k = _as_groups(B_k), _as_groups(C_k)  # (batch, groups, d_state)
    batch, dim, d_state = state.shape
    out = torch.empty(batch, dim, device=state.device, dtype=x_k.dtype)  # (batch, dim)
    block_n = next_power_of_2(d_state)
    block_d, num_warps = _block_sizes(block_n, interpreting)
    # Absent optional inputs are never read (their HAS_* flag is False): x stands in for the pointer.
    D_arg, z_arg, bias_arg, w_arg = (t if t is not None else x_k for t in (D_k, z_k, bias_k, w_k))
    dt_rank = dt_weight.shape[1] if dt_weight is not None else 1
    grid = (cdiv(dim, block_d), batch)
    _state_update_kernel[grid](
        state, x_k, dt_k, bias_arg, A_k, B_k, C_k, D_arg, z_arg, w_arg,
        out,
        dim, d_state, dim // B_k.shape[1], dim // C_k.shape[1], dt_rank,
        state.stride(0), state.stride(1), state.stride(2),
        x_k.stride(0), x_k.stride(1),
        dt_k.stride(0), dt_k.stride(1),
        A_k.stride(0), A_k.stride(1),
        B_k.stride(0), B_k.stride(1), B_k.stride(2),
        C_k.stride(0), C_k.stride(1), C_k.stride(2),
        z_arg.stride(0), z_arg.stride(1),
        out.stride(0), out.stride(1),
        w_arg.stride(0), w_arg.stride(1),
        HAS_DT_BIAS=dt_bias is not None, HAS_D=D is not None, HAS_Z=z is not None, DT_SOFTPLUS=bool(dt_softplus),
        A_IS_LOG=bool(A_is_log), HAS_DT_WEIGHT=dt_weight is not None, BLOCK_D=block_d, BLOCK_N=block_n,
        BLOCK_R=next_power_of_2(dt_rank),
        num_warps=num_warps,
    )
    return out if out.dtype == x.dtype else out.to(x.dtype)


# ---------------------------------------------------------------------------------------------- public function


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
    backend: str = "auto",
    *,
    A_is_log: bool = False,
    dt_weight: torch.Tensor | None = None,  # (dim, dt_rank)
) -> torch.Tensor:
    """Advance ``state`` by one token in place and return that token's output (batch, dim) in x's dtype.

    Running it over tokens t = 0..T-1 gives the same outputs and final state as ``selective_scan`` over those T
    tokens with ``initial_state=state`` (the layouts differ only by the missing seqlen axis).
    Every input but ``state`` may have any float dtype and any strides; the computation is float32.
    ``A_is_log=True``: ``A`` holds log(-A) (a Mamba block's ``A_log``) and the decay uses -exp(A), computed as it is
    read, so a decode step needs no kernel of its own for it and nothing derived from the parameter is kept.
    ``dt_weight`` (dim, dt_rank): ``dt`` is then the low-rank (batch, dt_rank) input and the step size is
    ``dt @ dt_weight.T`` (a Mamba block's dt_proj without its bias, which goes in ``dt_bias``), computed in the kernel.

    ``backend``: "torch" (plain PyTorch), "triton" (one fused kernel; CUDA, or CPU under TRITON_INTERPRET=1) or
    "auto" (triton on CUDA tensors, torch otherwise). The kernel has no backward, so when grad mode is on and an
    input requires grad the call takes the torch path whatever the backend: one step stays differentiable in every
    input but ``state``. Backpropagating through a chain of steps is not supported: a step overwrites the state an
    earlier step saved for backward, and autograd raises an in-place error. Train with ``selective_scan``.
    """
    _check_update_args(state, x, dt, A, B, C, D, z, dt_bias, dt_weight)
    name = resolve_backend("selective_state_update", backend, state.device)
    if name == "triton" and needs_autograd(x, dt, A, B, C, D, z, dt_bias, dt_weight):
        logger.debug("selective_state_update: an input requires grad, taking the differentiable torch path")
        name = "torch"
    if name == "torch":
        return selective_state_update_ref(state, x, dt, A, B, C, D=D, z=z, dt_bias=dt_bias, dt_softplus=dt_softplus,
                                          A_is_log=A_is_log, dt_weight=dt_weight)
    return _state_update_triton(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus, A_is_log, dt_weight)


__all__ = ["selective_state_update", "selective_state_update_ref", "BACKENDS"]
