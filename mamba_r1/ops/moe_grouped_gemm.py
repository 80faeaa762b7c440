"""The experts' row-grouped matmul as a persistent Triton kernel with TMA operand loads: ``grouped_gemm(x, w,
group_ends)`` computes, for rows sorted by expert, ``x[rows of e] @ w[e]``, what ``torch._grouped_mm(x, w,
offs=group_ends)`` computes (its specification and its fallback), for the four products of the expert FFN whose rows
are grouped: the two forward projections and the two input gradients (``w`` may be the transposed view of a
contiguous (E, N, K) weight). The weight gradients (groups along K) stay on torch._grouped_mm, which the kernel did
not beat there.

Why (benchmarks/try_tma_expert_gemm.py --gemms, H200, 2026-11-30, RESULTS.md): at SwitchMoE's TARGETS.md shape the
kernel ties or beats torch._grouped_mm (CUTLASS, one fixed 128 x 256 tile) on all four products with balanced
experts (187-214 µs against 194-215), and with uneven ones (0.6-1.25x the mean) it keeps its time where
grouped_mm's K = 4096 products slow from 194 to 235 µs.

Schedule (no host sync): every expert with r rows takes cdiv(r, BLOCK_M) row tiles starting at its first row, so a
row tile belongs to one expert; the last one also covers the next expert's first rows, which it computes with the
wrong weight and does not store (the stores are masked to the expert's rows). There are at most
cdiv(rows, BLOCK_M) + E row tiles; one program per SM walks the (row tile, column tile) grid, column tiles fastest.
Operand loads go through tensor descriptors: x (rows, K); w viewed (E * K, N), or (E * N, K) when transposed. A
load whose K (or N) range runs past its expert's rows of the view reads the next expert's: those products meet x's
zero-filled columns past K, or land in output columns past N that are not stored, so K and N need not be multiples
of the blocks (TMA wants 16-byte row strides: K and N multiples of 8 in half precision).
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

from mamba_r1.ops.eager_custom_ops import backward_op, eager_function, run_op
from mamba_r1.ops.triton_runtime import HALF_DTYPES, built_for_interpreter, cdiv, next_power_of_2, tl, triton
from mamba_r1.ops.triton_runtime import jit as _jit

# In-kernel tensor descriptors (tl.make_tensor_descriptor) came with triton 3.3; older ones use torch._grouped_mm.
HAS_DESCRIPTORS = tl is not None and hasattr(tl, "make_tensor_descriptor")
try:  # where triton keeps the allocator it calls for a kernel's scratch (3.3 to 3.9 at least)
    from triton.runtime import _allocation as _ALLOCATION

    if not (hasattr(_ALLOCATION, "_allocator") and hasattr(_ALLOCATION, "NullAllocator")):
        _ALLOCATION = None
except ImportError:  # pragma: no cover - only with an old or absent triton
    _ALLOCATION = None

# (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages) on Hopper for N >= 256, and for narrower outputs. The best of seven tiles
# (128-256 rows x 64-256 columns x 64-128 deep, 4 or 8 warps, 3-5 stages) on every one of the four products at
# SwitchMoE's TARGETS.md shape (try_tma_expert_gemm.py --gemms, H200, 2026-11-30): 128 x 256 x 64 with 8 warps and 4
# stages (3 stages within 1%); 128 x 128 tiles were 15-30% slower.
GEMM_BLOCKS_CUDA = (128, 256, 64, 8, 4)
GEMM_BLOCKS_CUDA_NARROW = (128, 128, 64, 8, 4)
GEMM_BLOCKS_INTERPRET = (16, 32, 16, 1, 1)
# Programs of the persistent grid under the interpreter (no SMs to count): a few, so each walks several tiles.
INTERPRET_PROGRAMS = 3


@_jit
def _row_tile(pid_m, group_ends_ptr, num_experts, BLOCK_M: tl.constexpr, E_PAD: tl.constexpr):
    """(expert, first row, expert's end row) of row tile pid_m, tiles laid out expert by expert, and the number of
    row tiles in all. group_ends[e] is expert e's end row (int32, non-decreasing)."""
    offs_e = tl.arange(0, E_PAD)
    ends = tl.load(group_ends_ptr + offs_e, mask=offs_e < num_experts, other=0)
    starts = tl.load(group_ends_ptr + offs_e - 1, mask=(offs_e > 0) & (offs_e < num_experts), other=0)
    tiles_e = tl.where(offs_e < num_experts, (ends - starts + BLOCK_M - 1) // BLOCK_M, 0)
    tiles_end = tl.cumsum(tiles_e, axis=0)
    expert = tl.sum((tiles_end <= pid_m).to(tl.int32), axis=0)
    is_expert = offs_e == expert
    first_tile = tl.sum(tl.where(is_expert, tiles_end - tiles_e, 0), axis=0)
    start = tl.sum(tl.where(is_expert, starts, 0), axis=0)
    end = tl.sum(tl.where(is_expert, ends, 0), axis=0)
    return expert, start + (pid_m - first_tile) * BLOCK_M, end, tl.sum(tiles_e, axis=0)


@_jit
def _grouped_gemm_kernel(x_ptr, w_ptr, group_ends_ptr, out_ptr, rows, K, N, num_experts, NUM_PROGRAMS,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, E_PAD: tl.constexpr,
                         W_TRANSPOSED: tl.constexpr):
    """out (rows, N) = x (rows, K) @ w[e] for each expert's rows; w[e] (K, N) at rows e * K of w's (E * K, N) view,
    or, W_TRANSPOSED, (N, K) at rows e * N of its (E * N, K) view, read transposed. Program p takes tiles p,
    p + NUM_PROGRAMS, ... of the (row tile, column tile) grid. The tensor descriptors are made here, once per
    program (host-made ones cost the launch ~60 µs of host time on the lent H200's host, against ~25 for plain
    arguments: try_tma_expert_gemm.py --host)."""
    x_desc = tl.make_tensor_descriptor(x_ptr, shape=[rows, K], strides=[K, 1], block_shape=[BLOCK_M, BLOCK_K])
    if W_TRANSPOSED:
        w_desc = tl.make_tensor_descriptor(w_ptr, shape=[num_experts * N, K], strides=[K, 1],
                                           block_shape=[BLOCK_N, BLOCK_K])
    else:
        w_desc = tl.make_tensor_descriptor(w_ptr, shape=[num_experts * K, N], strides=[N, 1],
                                           block_shape=[BLOCK_K, BLOCK_N])
    n_tiles = tl.cdiv(N, BLOCK_N)
    _, _, _, row_tiles = _row_tile(0, group_ends_ptr, num_experts, BLOCK_M, E_PAD)
    for tile in tl.range(tl.program_id(0), row_tiles * n_tiles, NUM_PROGRAMS, flatten=True):
        n0 = (tile % n_tiles) * BLOCK_N
        expert, row0, end, _ = _row_tile(tile // n_tiles, group_ends_ptr, num_experts, BLOCK_M, E_PAD)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            a = x_desc.load([row0, k0])  # (BLOCK_M, BLOCK_K) of x, zeros past K and past the last row
            if W_TRANSPOSED:
                acc = tl.dot(a, w_desc.load([expert * N + n0, k0]).T, acc)  # w[e] rows n0.., (BLOCK_N, BLOCK_K)
            else:
                acc = tl.dot(a, w_desc.load([expert * K + k0, n0]), acc)  # w[e] rows k0.., (BLOCK_K, BLOCK_N)
        offs_m = row0 + tl.arange(0, BLOCK_M)
        offs_n = n0 + tl.arange(0, BLOCK_N)
        mask = (offs_m < end)[:, None] & (offs_n < N)[None, :]
        tl.store(out_ptr + offs_m.to(tl.int64)[:, None] * N + offs_n[None, :], acc.to(out_ptr.dtype.element_ty),
                 mask=mask)


def _scratch(size: int, alignment: int, stream) -> Tensor:
    """Global memory Triton asks for at a launch (the in-kernel tensor descriptors, 128 bytes each per program)."""
    return torch.empty(size, dtype=torch.int8, device="cuda")


def _ensure_allocator() -> None:
    """Give Triton an allocator for the descriptors' scratch unless one is set. Triton keeps it in a context
    variable, per thread: the autograd engine's device thread starts without one, so every launch checks (a triton
    whose allocator lives elsewhere gets ours at every launch)."""
    if _ALLOCATION is None or isinstance(_ALLOCATION._allocator.get(), _ALLOCATION.NullAllocator):
        triton.set_allocator(_scratch)


@functools.cache
def _sm_count_if_hopper(device_index: int | None) -> int:
    """The GPU's SM count if it is a Hopper (sm90: the kernel's tiles were tuned there), else 0. Cached: a launch
    costs the host enough already (two property look-ups were a few µs of each call)."""
    props = torch.cuda.get_device_properties(torch.cuda.current_device() if device_index is None else device_index)
    return props.multi_processor_count if props.major == 9 else 0


def _kernel_layout(x: Tensor, w: Tensor) -> tuple[Tensor, bool] | None:
    """(contiguous weight, whether the kernel reads it transposed) when the kernel runs for x (rows, K) and w
    (E, K, N), None when torch._grouped_mm does: see grouped_gemm_applies. The weight is w itself when contiguous,
    the (E, N, K) tensor under it when w is that tensor's transposed view."""
    if not HAS_DESCRIPTORS or x.dim() != 2 or w.dim() != 3 or x.dtype != w.dtype:
        return None
    if x.shape[1] == 0 or w.shape[0] == 0:
        return None
    if x.device.type == "cuda":
        if x.dtype not in HALF_DTYPES or _sm_count_if_hopper(x.device.index) == 0:
            return None
    elif not (x.device.type == "cpu" and x.dtype == torch.float32 and built_for_interpreter(_grouped_gemm_kernel)):
        return None
    if not x.is_contiguous():
        return None
    if w.is_contiguous():
        w_base, transposed = w, False
    elif w.transpose(-2, -1).is_contiguous():
        w_base, transposed = w.transpose(-2, -1), True
    else:
        return None
    row_bytes = (x.shape[1] * x.element_size(), w.shape[2] * w.element_size())
    if any(b % 16 for b in row_bytes) or x.data_ptr() % 16 or w.data_ptr() % 16:
        return None
    return w_base, transposed


def grouped_gemm_applies(x: Tensor, w: Tensor) -> bool:
    """Whether ``grouped_gemm`` runs the kernel for x (rows, K) and w (E, K, N): on a Hopper GPU (sm90) in float16 or
    bfloat16, or on CPU under Triton's interpreter in float32 (the tests' way); x contiguous, w contiguous or the
    transposed view of a contiguous weight, both 16-byte aligned with rows of 16-byte multiples (TMA's rules)."""
    return _kernel_layout(x, w) is not None


def _blocks(x: Tensor, n: int) -> tuple[int, int, int, int, int]:
    if x.device.type != "cuda":
        return GEMM_BLOCKS_INTERPRET
    return GEMM_BLOCKS_CUDA if n >= 256 else GEMM_BLOCKS_CUDA_NARROW


def grouped_gemm(x: Tensor, w: Tensor, group_ends: Tensor) -> Tensor:
    """x (rows, K) with its rows in contiguous per-expert segments ending at ``group_ends`` ((E,) int32), w (E, K, N)
    -> (rows, N) in x's dtype: each segment times its expert's weight, float32 accumulation. The Triton kernel where
    ``grouped_gemm_applies``, torch._grouped_mm (the same result up to rounding) otherwise. Rows past the last
    segment's end are left unwritten, as torch._grouped_mm leaves them. Not differentiable (``grouped_matmul`` is):
    moe_expert_ffn's and moe_layer's own backwards call it for their input gradients."""
    layout = _kernel_layout(x, w)
    if layout is None:
        return torch._grouped_mm(x, w, offs=group_ends)
    w_base, transposed = layout
    rows, k = x.shape
    num_experts, _, n = w.shape
    block_m, block_n, block_k, warps, stages = _blocks(x, n)
    out = torch.empty(rows, n, device=x.device, dtype=x.dtype)
    if rows == 0 or n == 0:
        return out
    tiles = (cdiv(rows, block_m) + num_experts) * cdiv(n, block_n)  # an upper bound on the real tiles
    sms = _sm_count_if_hopper(x.device.index) if x.is_cuda else INTERPRET_PROGRAMS
    programs = min(tiles, sms)
    if x.is_cuda:
        _ensure_allocator()
    _grouped_gemm_kernel[(programs,)](
        x, w_base, group_ends, out, rows, k, n, num_experts, programs, BLOCK_M=block_m, BLOCK_N=block_n,
        BLOCK_K=block_k, E_PAD=max(2, next_power_of_2(num_experts)), W_TRANSPOSED=transposed, num_warps=warps,
        num_stages=stages)
    return out


moe_grouped_gemm_op = torch.library.custom_op("mamba_r1::moe_grouped_gemm", mutates_args=())(grouped_gemm)


@moe_grouped_gemm_op.register_fake
def _(x, w, group_ends):
    return x.new_empty(x.shape[0], w.shape[-1])


def _grouped_gemm_bwd(grad: Tensor, x: Tensor, w: Tensor, group_ends: Tensor, need_x: bool,
                      need_w: bool) -> tuple[Tensor, Tensor]:
    """grad (rows, N) -> x's gradient (rows, K) through the kernel (grad @ w[e]^T, the weight read transposed) and
    w's (E, K, N), grouped along the rows, on torch._grouped_mm; each an empty tensor when not needed."""
    grad = grad.contiguous()
    grad_x = grouped_gemm(grad, w.transpose(-2, -1), group_ends) if need_x else x.new_empty(0)
    grad_w = torch._grouped_mm(x.t(), grad, offs=group_ends) if need_w else w.new_empty(0)
    return grad_x, grad_w


moe_grouped_gemm_bwd_op = torch.library.custom_op("mamba_r1::moe_grouped_gemm_bwd", mutates_args=())(_grouped_gemm_bwd)


@moe_grouped_gemm_bwd_op.register_fake
def _(grad, x, w, group_ends, need_x, need_w):
    return (x.new_empty(x.shape) if need_x else x.new_empty(0),
            w.new_empty(w.shape) if need_w else w.new_empty(0))


def _grouped_gemm_setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _grouped_gemm_backward(ctx, grad):
    x, w, group_ends = ctx.saved_tensors
    need_x, need_w = ctx.needs_input_grad[:2]
    grad_x, grad_w = backward_op(ctx, moe_grouped_gemm_bwd_op, _grouped_gemm_bwd)(grad, x, w, group_ends, need_x,
                                                                                  need_w)
    return grad_x if need_x else None, grad_w if need_w else None, None


moe_grouped_gemm_op.register_autograd(_grouped_gemm_backward, setup_context=_grouped_gemm_setup_context)
_GroupedGemmEager = eager_function("_GroupedGemmEager", grouped_gemm, _grouped_gemm_setup_context,
                                   _grouped_gemm_backward)


def grouped_matmul(x: Tensor, w: Tensor, group_ends: Tensor) -> Tensor:
    """``grouped_gemm`` with autograd (x's and w's gradients, as moe_dispatch.grouped_matmul gives them), a custom op
    under torch.compile: (rows, K) x in per-expert segments ending at ``group_ends``, (E, K, N) w -> (rows, N)."""
    return run_op(moe_grouped_gemm_op, _GroupedGemmEager, x, w, group_ends)


__all__ = ["GEMM_BLOCKS_CUDA", "grouped_gemm", "grouped_gemm_applies", "grouped_matmul", "moe_grouped_gemm_bwd_op",
           "moe_grouped_gemm_op"]
