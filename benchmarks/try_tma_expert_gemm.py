"""Experiment, not used by the library: try_fused_expert_gemm.py's fused expert GEMMs with their operands loaded by
TMA (host tensor descriptors), one tile per program or persistent (one program per SM walking the tiles), against
what SwitchMoE runs now (torch._grouped_mm, then moe_expert_ffn's bias + GELU kernels).

    TRITON_INTERPRET=1 python benchmarks/try_tma_expert_gemm.py --smoke   # CPU: correctness at small odd shapes
    python benchmarks/try_tma_expert_gemm.py                              # CUDA: TARGETS.md's shape, check + time

Why (RESULTS.md, sixth session): the pointer-load Triton grouped GEMM reached 377 TFLOP/s against grouped_mm's
~600, so fusing bias + GELU into its epilogue lost 221 µs per step; TMA descriptors were the lever left untried.
Every variant is checked against the float32 reference first, then timed (common.queued_gpu_us, GPU time). The
"GEMM only" rows store the product alone (no bias, no activation): the Triton GEMM's own speed against grouped_mm's.

Operands: x (rows, K) is one descriptor; the weights are viewed 2-D, w1 (E, K, N) as (E * K, N) and w2 (E, N, K) as
(E * N, K). A tile whose K (or N) range runs past the expert's own rows of the view reads the next expert's: those
products meet x's (or grad_y's) zero-filled columns past K, or land in output columns past N that are not stored,
so no tile needs K or N to be a multiple of its block. The epilogue stores through pointers, masked to the tile's
expert's rows (the last row tile of an expert also covers the next expert's first rows, which that expert stores).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor
from try_fused_expert_gemm import _tile_of, balanced_case, check_smoke_runtime, inputs, parser, reference, rel, within

from mamba_r1.ops import moe_expert_ffn

GELU = tl.constexpr(1)  # moe_expert_ffn._act_fwd/_act_grad code of GELU


@triton.jit
def _real_row_tiles(group_ends_ptr, num_experts, BLOCK_M: tl.constexpr, E_PAD: tl.constexpr):
    """The number of row tiles the experts have: sum over experts of cdiv(rows_e, BLOCK_M)."""
    offs_e = tl.arange(0, E_PAD)
    ends = tl.load(group_ends_ptr + offs_e, mask=offs_e < num_experts, other=0)
    starts = tl.load(group_ends_ptr + offs_e - 1, mask=(offs_e > 0) & (offs_e < num_experts), other=0)
    rows_e = tl.where(offs_e < num_experts, ends - starts, 0)
    return tl.sum((rows_e + BLOCK_M - 1) // BLOCK_M, axis=0)


@triton.jit
def _tile_product(tile, n_tiles, a_desc, w_desc, group_ends_ptr, num_experts, K, N, BLOCK_M: tl.constexpr,
                  BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, E_PAD: tl.constexpr, W_TRANSPOSED: tl.constexpr):
    """Tile `tile` of the (row tile, column tile) grid, column tiles fastest: (row tile, expert, its columns, their
    mask, the (rows, N) offsets of the tile, the mask of its expert's rows and columns, a @ w[e] over the tile in
    float32). w[e] (K, N) at rows e * K of w's (E * K, N) view, or, W_TRANSPOSED, (N, K) at rows e * N of its
    (E * N, K) view, read transposed."""
    pid_m = tile // n_tiles
    n0 = (tile % n_tiles) * BLOCK_N
    expert, row0, end, _ = _tile_of(pid_m, group_ends_ptr, num_experts, BLOCK_M, E_PAD)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        a = a_desc.load([row0, k0])  # (BLOCK_M, BLOCK_K), zero past K and past the last row
        if W_TRANSPOSED:
            acc = tl.dot(a, w_desc.load([expert * N + n0, k0]).T, acc)  # (BLOCK_N, BLOCK_K) read transposed
        else:
            acc = tl.dot(a, w_desc.load([expert * K + k0, n0]), acc)  # (BLOCK_K, BLOCK_N)
    offs_m = row0 + tl.arange(0, BLOCK_M)
    offs_n = n0 + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    mask = (offs_m < end)[:, None] & mask_n[None, :]
    return pid_m, expert, offs_n, mask_n, offs_m.to(tl.int64)[:, None] * N + offs_n[None, :], mask, acc


@triton.jit
def _fwd_kernel(x_desc, w_desc, bias_ptr, group_ends_ptr, pre_ptr, out_ptr, K, N, num_experts, NUM_PROGRAMS,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, E_PAD: tl.constexpr,
                EPILOGUE: tl.constexpr):
    """EPILOGUE 1: pre = x @ w[e] + b[e] (x's dtype), out = GELU(pre); 0: pre = x @ w[e] only. Program p takes tiles
    p, p + NUM_PROGRAMS, ... of the (row tile, column tile) grid, column tiles fastest."""
    n_tiles = tl.cdiv(N, BLOCK_N)
    num_tiles = _real_row_tiles(group_ends_ptr, num_experts, BLOCK_M, E_PAD) * n_tiles
    for tile in tl.range(tl.program_id(0), num_tiles, NUM_PROGRAMS, flatten=True):
        _, expert, offs_n, mask_n, tile_offs, mask, acc = _tile_product(
            tile, n_tiles, x_desc, w_desc, group_ends_ptr, num_experts, K, N, BLOCK_M, BLOCK_N, BLOCK_K, E_PAD, False)
        if EPILOGUE == 1:
            acc += tl.load(bias_ptr + expert * N + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
            pre = acc.to(pre_ptr.dtype.element_ty)
            tl.store(pre_ptr + tile_offs, pre, mask=mask)
            tl.store(out_ptr + tile_offs,
                     moe_expert_ffn._act_fwd(pre.to(tl.float32), GELU).to(out_ptr.dtype.element_ty), mask=mask)
        else:
            tl.store(pre_ptr + tile_offs, acc.to(pre_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _dx_kernel(grad_y_desc, w_desc, pre_ptr, group_ends_ptr, grad_h_ptr, partial_ptr, K, N, num_experts,
               NUM_PROGRAMS, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
               E_PAD: tl.constexpr):
    """grad_h = (grad_y @ w[e]^T) * GELU'(pre), w[e] (N, K) (the second weight); the tile's column sums of grad_h at
    partial[row tile]. Tiles as in _fwd_kernel."""
    n_tiles = tl.cdiv(N, BLOCK_N)
    num_tiles = _real_row_tiles(group_ends_ptr, num_experts, BLOCK_M, E_PAD) * n_tiles
    for tile in tl.range(tl.program_id(0), num_tiles, NUM_PROGRAMS, flatten=True):
        pid_m, _, offs_n, mask_n, tile_offs, mask, acc = _tile_product(
            tile, n_tiles, grad_y_desc, w_desc, group_ends_ptr, num_experts, K, N, BLOCK_M, BLOCK_N, BLOCK_K, E_PAD,
            True)
        pre = tl.load(pre_ptr + tile_offs, mask=mask, other=0.0).to(tl.float32)
        # Rounded to the dtype as the composition's grad_hidden is, then times GELU'(pre).
        grad_h = acc.to(grad_h_ptr.dtype.element_ty).to(tl.float32) * moe_expert_ffn._act_grad(pre, GELU)
        grad_h = tl.where(mask, grad_h, 0.0)
        tl.store(grad_h_ptr + tile_offs, grad_h.to(grad_h_ptr.dtype.element_ty), mask=mask)
        tl.store(partial_ptr + pid_m.to(tl.int64) * N + offs_n, tl.sum(grad_h, axis=0), mask=mask_n)


@triton.jit
def _gemm_kernel(a_desc, w_desc, group_ends_ptr, out_ptr, K, N, num_experts, NUM_PROGRAMS,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, E_PAD: tl.constexpr,
                 W_TRANSPOSED: tl.constexpr):
    """out = a @ w[e] for each expert's rows, w[e] (K, N) (w viewed (E * K, N)) or, W_TRANSPOSED, (N, K) read
    transposed (w viewed (E * N, K)). Tiles as in _fwd_kernel; the plain grouped GEMM, no epilogue."""
    n_tiles = tl.cdiv(N, BLOCK_N)
    num_tiles = _real_row_tiles(group_ends_ptr, num_experts, BLOCK_M, E_PAD) * n_tiles
    for tile in tl.range(tl.program_id(0), num_tiles, NUM_PROGRAMS, flatten=True):
        _, _, _, _, tile_offs, mask, acc = _tile_product(tile, n_tiles, a_desc, w_desc, group_ends_ptr, num_experts,
                                                         K, N, BLOCK_M, BLOCK_N, BLOCK_K, E_PAD, W_TRANSPOSED)
        tl.store(out_ptr + tile_offs, acc.to(out_ptr.dtype.element_ty), mask=mask)


def descriptor_gemm(a, w, group_ends, blocks, w_transposed=False, persistent=True):
    """(rows, K) a, rows sorted by expert, (E, K, N) w (or (E, N, K) read transposed) -> (rows, N) in a's dtype."""
    block_m, block_n, block_k, warps, stages = blocks
    rows, k = a.shape
    num_experts = w.shape[0]
    n = w.shape[1] if w_transposed else w.shape[2]
    out = torch.empty(rows, n, device=a.device, dtype=a.dtype)
    programs = _programs(rows, n, num_experts, block_m, block_n, persistent)
    w2d = w.reshape(-1, w.shape[2])
    _gemm_kernel[(programs,)](
        TensorDescriptor.from_tensor(a, [block_m, block_k]),
        TensorDescriptor.from_tensor(w2d, [block_n, block_k] if w_transposed else [block_k, block_n]),
        group_ends, out, k, n, num_experts, programs, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
        E_PAD=max(2, triton.next_power_of_2(num_experts)), W_TRANSPOSED=w_transposed, num_warps=warps,
        num_stages=stages)
    return out


@triton.jit
def _wgrad_kernel(a_desc, b_desc, group_ends_ptr, out_ptr, M, N, num_experts, NUM_PROGRAMS,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """out[e] = a[rows of e]^T @ b[rows of e], a (rows, M), b (rows, N), out (E, M, N) float32 accumulation in out's
    dtype: the weight gradients (K-grouped). Whole BLOCK_K row steps unmasked, the expert's last partial step with
    the rows past its end zeroed (the next expert's rows)."""
    m_tiles = tl.cdiv(M, BLOCK_M)
    n_tiles = tl.cdiv(N, BLOCK_N)
    for tile in tl.range(tl.program_id(0), num_experts * m_tiles * n_tiles, NUM_PROGRAMS):
        expert = tile // (m_tiles * n_tiles)
        m0 = (tile % (m_tiles * n_tiles)) // n_tiles * BLOCK_M
        n0 = tile % n_tiles * BLOCK_N
        start = tl.load(group_ends_ptr + expert - 1, mask=expert > 0, other=0)
        end = tl.load(group_ends_ptr + expert)
        whole_end = start + (end - start) // BLOCK_K * BLOCK_K
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(start, whole_end, BLOCK_K):
            acc = tl.dot(a_desc.load([k0, m0]).T, b_desc.load([k0, n0]), acc)
        if whole_end < end:
            keep = (whole_end + tl.arange(0, BLOCK_K) < end)[:, None]
            a = tl.where(keep, a_desc.load([whole_end, m0]), 0.0)
            acc = tl.dot(a.T, b_desc.load([whole_end, n0]), acc)
        offs_m = m0 + tl.arange(0, BLOCK_M)
        offs_n = n0 + tl.arange(0, BLOCK_N)
        tl.store(out_ptr + expert.to(tl.int64) * M * N + offs_m[:, None] * N + offs_n[None, :],
                 acc.to(out_ptr.dtype.element_ty), mask=(offs_m < M)[:, None] & (offs_n < N)[None, :])


def wgrad_gemm(a, b, group_ends, blocks):
    """(rows, M) a, (rows, N) b, rows sorted by expert -> (E, M, N): each expert's a^T @ b (grouped_mm(a.t(), b))."""
    block_m, block_n, block_k, warps, stages = blocks
    rows, m = a.shape
    n = b.shape[1]
    num_experts = group_ends.shape[0]
    out = torch.empty(num_experts, m, n, device=a.device, dtype=a.dtype)
    tiles = num_experts * triton.cdiv(m, block_m) * triton.cdiv(n, block_n)
    programs = min(tiles, torch.cuda.get_device_properties(0).multi_processor_count if torch.cuda.is_available()
                   else 3)
    _wgrad_kernel[(programs,)](
        TensorDescriptor.from_tensor(a, [block_k, block_m]), TensorDescriptor.from_tensor(b, [block_k, block_n]),
        group_ends, out, m, n, num_experts, programs, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
        num_warps=warps, num_stages=stages)
    return out


def _programs(rows, n, num_experts, block_m, block_n, persistent):
    """Grid size: one program per SM (persistent) or one per tile of the upper bound on the tile count."""
    tiles = (triton.cdiv(rows, block_m) + num_experts) * triton.cdiv(n, block_n)
    if not persistent:
        return tiles
    # Without a GPU (the interpreter), three programs: each walks several tiles.
    return min(tiles, torch.cuda.get_device_properties(0).multi_processor_count if torch.cuda.is_available() else 3)


def fused_forward(x, w, bias, group_ends, blocks, persistent=False, epilogue=1):
    """(rows, K) x, (E, K, N) w, (E, N) bias -> (pre, GELU(pre)), both (rows, N) in x's dtype (epilogue 0: the
    product alone, GELU not computed)."""
    block_m, block_n, block_k, warps, stages = blocks
    rows, k = x.shape
    num_experts, _, n = w.shape
    pre, out = (torch.empty(rows, n, device=x.device, dtype=x.dtype) for _ in range(2))
    programs = _programs(rows, n, num_experts, block_m, block_n, persistent)
    _fwd_kernel[(programs,)](
        TensorDescriptor.from_tensor(x, [block_m, block_k]),
        TensorDescriptor.from_tensor(w.reshape(num_experts * k, n), [block_k, block_n]),
        bias, group_ends, pre, out, k, n, num_experts, programs, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
        E_PAD=max(2, triton.next_power_of_2(num_experts)), EPILOGUE=epilogue, num_warps=warps, num_stages=stages)
    return pre, out


def fused_dx(grad_y, w2, pre, group_ends, blocks, persistent=False):
    """(rows, K) grad_y, (E, N, K) w2, (rows, N) pre -> grad_h (rows, N), bias-gradient partials (tiles, N) float32
    (row tiles laid out expert by expert)."""
    block_m, block_n, block_k, warps, stages = blocks
    rows, k = grad_y.shape
    num_experts, n, _ = w2.shape
    grad_h = torch.empty(rows, n, device=grad_y.device, dtype=grad_y.dtype)
    partial = torch.zeros(triton.cdiv(rows, block_m) + num_experts, n, device=grad_y.device, dtype=torch.float32)
    programs = _programs(rows, n, num_experts, block_m, block_n, persistent)
    _dx_kernel[(programs,)](
        TensorDescriptor.from_tensor(grad_y, [block_m, block_k]),
        TensorDescriptor.from_tensor(w2.reshape(num_experts * n, k), [block_n, block_k]),
        pre, group_ends, grad_h, partial, k, n, num_experts, programs, BLOCK_M=block_m, BLOCK_N=block_n,
        BLOCK_K=block_k, E_PAD=max(2, triton.next_power_of_2(num_experts)), num_warps=warps, num_stages=stages)
    return grad_h, partial


def check(rows_per_expert, k, n, dtype, device, blocks, persistent, tol):
    x, w1, b1, w2, grad_y, group_ends, _ = inputs(rows_per_expert, k, n, dtype, device)
    want_pre, want_out, want_grad_h, want_grad_b = reference(x, w1, b1, w2, grad_y, rows_per_expert)
    pre, out = fused_forward(x, w1, b1, group_ends, blocks, persistent)
    grad_h, partial = fused_dx(grad_y, w2, pre, group_ends, blocks, persistent)
    plain, _ = fused_forward(x, w1, b1, group_ends, blocks, persistent, epilogue=0)
    tiles = [-(-r // blocks[0]) for r in rows_per_expert]
    grad_b = torch.stack([part.sum(0) for part in partial[:sum(tiles)].split(tiles)])
    want_plain = want_pre - torch.repeat_interleave(b1.float(), torch.tensor(rows_per_expert, device=device), dim=0)
    errors = {"pre": rel(pre, want_pre), "gelu": rel(out, want_out), "grad_h": rel(grad_h, want_grad_h),
              "grad_b": rel(grad_b, want_grad_b), "gemm only": rel(plain, want_plain)}
    return within(errors, tol, f"TMA kernels at {rows_per_expert} x {k} -> {n}, {dtype}, blocks {blocks}, "
                               f"persistent {persistent}")


def smoke():
    """Odd shapes under the interpreter, float32 (it has no bf16): an empty expert, partial tiles, K and N not
    multiples of the blocks (TMA wants rows of 16-byte multiples, so K and N are multiples of 4 floats)."""
    for persistent in (False, True):
        for rows_per_expert, k, n in (([5, 0, 19, 1], 24, 40), ([33], 16, 20), ([2, 7, 0], 40, 36)):
            errors = check(rows_per_expert, k, n, torch.float32, "cpu", (16, 16, 16, 1, 1), persistent, 1e-5)
            print(f"persistent {persistent}, {rows_per_expert} x {k} -> {n}: "
                  + ", ".join(f"{key} {v:.1e}" for key, v in errors.items()))
            x, w1, _, w2, grad_y, group_ends, _ = inputs(rows_per_expert, k, n, torch.float32, "cpu")
            for a, w, transposed in ((x, w1, False), (grad_y, w2, True)):
                want = torch.cat([ae @ (we.t() if transposed else we)
                                  for ae, we in zip(a.split(rows_per_expert), w)])
                got = descriptor_gemm(a, w, group_ends, (16, 16, 16, 1, 1), transposed, persistent)
                if not rel(got, want) <= 1e-5:
                    raise SystemExit(f"descriptor_gemm (transposed {transposed}) disagrees: {rel(got, want):.1e}")
            if persistent:  # the weight gradient's kernel is always persistent
                want = torch.stack([ae.t() @ be for ae, be in zip(x.split(rows_per_expert),
                                                                  grad_y.split(rows_per_expert))])
                got = wgrad_gemm(x, grad_y, group_ends, (16, 16, 16, 1, 1))
                if not rel(got, want) <= 1e-5:
                    raise SystemExit(f"wgrad_gemm disagrees: {rel(got, want):.1e}")


def bench(a):
    from common import queued_gpu_us

    rows_per_expert, dtype, device, flops = balanced_case(a)
    x, w1, b1, w2, grad_y, group_ends, expert_of_row = inputs(rows_per_expert, a.dim, a.expert_dim, dtype, device)
    expert_of_row = expert_of_row.to(torch.int64)

    def us(fn):
        return queued_gpu_us(fn)

    gemm_now = us(lambda: torch._grouped_mm(x, w1, offs=group_ends))
    pre_now = torch._grouped_mm(x, w1, offs=group_ends)
    w2t = w2.transpose(-2, -1)
    dx_gemm_now = us(lambda: torch._grouped_mm(grad_y, w2t, offs=group_ends))
    fwd_now = us(lambda: moe_expert_ffn._moe_bias_act(torch._grouped_mm(x, w1, offs=group_ends), b1, expert_of_row,
                                                       group_ends, "gelu", 0))
    dx_now = us(lambda: moe_expert_ffn._moe_bias_act_bwd(torch._grouped_mm(grad_y, w2t, offs=group_ends), pre_now,
                                                          b1, expert_of_row, group_ends, "gelu", 0))
    dense_w = w1[0].t().contiguous()  # (N, K): cuBLAS's one big GEMM over all rows, for scale
    dense_now = us(lambda: torch.nn.functional.linear(x, dense_w))
    print(f"{torch.cuda.get_device_name()}, {a.tokens} rows, {a.dim} -> {a.expert_dim}, {a.experts} experts, bf16, "
          f"triton {triton.__version__}")
    print(f"now: grouped_mm x @ w1 {gemm_now:.1f} µs ({flops / gemm_now / 1e6:.0f} TFLOP/s; cuBLAS dense "
          f"{dense_now:.1f}, {flops / dense_now / 1e6:.0f}); + bias/GELU kernel {fwd_now:.1f}; grouped_mm dX "
          f"{dx_gemm_now:.1f} ({flops / dx_gemm_now / 1e6:.0f}); + GELU' and bias gradient {dx_now:.1f}")
    print("| BLOCK_M × N × K, warps, stages | persistent | GEMM only µs (TFLOP/s) | fused fwd µs | vs now | "
          "fused dX µs | vs now |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    configs = [(128, 256, 64, 8, 3), (128, 256, 64, 8, 4), (128, 128, 64, 8, 4), (128, 128, 64, 4, 4),
               (128, 128, 128, 8, 3), (64, 256, 64, 4, 4), (256, 128, 64, 8, 3)]
    for persistent in (False, True):
        for blocks in configs:
            name = f"{blocks[0]} × {blocks[1]} × {blocks[2]}, {blocks[3]}, {blocks[4]}"
            try:
                check(rows_per_expert, a.dim, a.expert_dim, dtype, device, blocks, persistent, 2e-2)
            except Exception as err:  # an out-of-resources tile: report it and go on
                print(f"| {name} | {persistent} | failed: {str(err).splitlines()[0][:100]} |")
                continue
            g = us(lambda: fused_forward(x, w1, b1, group_ends, blocks, persistent, epilogue=0))
            f = us(lambda: fused_forward(x, w1, b1, group_ends, blocks, persistent))
            pre, _ = fused_forward(x, w1, b1, group_ends, blocks, persistent)
            b = us(lambda: fused_dx(grad_y, w2, pre, group_ends, blocks, persistent))
            print(f"| {name} | {persistent} | {g:.1f} ({flops / g / 1e6:.0f}) | {f:.1f} | {f / fwd_now:.2f}x | "
                  f"{b:.1f} | {b / dx_now:.2f}x |")


def bench_gemms(a):
    """The expert FFN's six products, grouped_mm against the persistent TMA kernels' tiles: the best tile of the
    balanced routing is then timed again on an uneven one (same rows, experts 0.6-1.25x the mean)."""
    from common import queued_gpu_us

    def setup(rows_per_expert):
        x, w1, _, w2, grad_y, group_ends, _ = inputs(rows_per_expert, a.dim, a.expert_dim, torch.bfloat16, "cuda")
        hidden = torch.randn(a.tokens, a.expert_dim, device="cuda", dtype=torch.bfloat16)
        # name: (ours, grouped_mm's): the four row-grouped products, then the two weight gradients (K-grouped)
        return {
            "fwd x @ w1 (K 1024, N 4096)": (lambda b: descriptor_gemm(x, w1, group_ends, b),
                                            lambda: torch._grouped_mm(x, w1, offs=group_ends)),
            "fwd h @ w2 (K 4096, N 1024)": (lambda b: descriptor_gemm(hidden, w2, group_ends, b),
                                            lambda: torch._grouped_mm(hidden, w2, offs=group_ends)),
            "dX grad_y @ w2^T (K 1024, N 4096)": (
                lambda b: descriptor_gemm(grad_y, w2, group_ends, b, w_transposed=True),
                lambda: torch._grouped_mm(grad_y, w2.transpose(-2, -1), offs=group_ends)),
            "dX grad_h @ w1^T (K 4096, N 1024)": (
                lambda b: descriptor_gemm(hidden, w1, group_ends, b, w_transposed=True),
                lambda: torch._grouped_mm(hidden, w1.transpose(-2, -1), offs=group_ends)),
            "dW1 x^T @ grad_h (M 1024, N 4096)": (lambda b: wgrad_gemm(x, hidden, group_ends, b),
                                                  lambda: torch._grouped_mm(x.t(), hidden, offs=group_ends)),
            "dW2 h^T @ grad_y (M 4096, N 1024)": (lambda b: wgrad_gemm(hidden, grad_y, group_ends, b),
                                                  lambda: torch._grouped_mm(hidden.t(), grad_y, offs=group_ends)),
        }

    def timed(ours, theirs, blocks):
        err = rel(ours(blocks), theirs())
        if not err <= 1e-2:
            raise RuntimeError(f"disagrees with grouped_mm: {err:.1e}")
        return queued_gpu_us(lambda: ours(blocks))

    mean = a.tokens // a.experts
    uneven = [int(mean * f) for f in (1.25, 0.6, 1.1, 0.9, 1.2, 0.8, 1.05)]
    uneven.append(a.tokens - sum(uneven))
    balanced_cases, uneven_cases = setup([mean] * a.experts), setup(uneven)
    flops = 2 * a.tokens * a.dim * a.expert_dim
    configs = [(128, 256, 64, 8, 3), (128, 256, 64, 8, 4), (128, 128, 64, 8, 4), (128, 128, 128, 8, 3),
               (128, 128, 64, 4, 5), (256, 128, 64, 8, 3), (128, 64, 128, 4, 4)]
    print(f"\nrows per expert: balanced {mean}; uneven {uneven}")
    print("| product | grouped_mm µs (TFLOP/s) | best TMA tile | µs (TFLOP/s) | vs grouped_mm | uneven: grouped_mm, "
          "TMA µs | all tiles µs |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    total = {"grouped_mm": 0.0, "tma": 0.0}
    for name, (ours, theirs) in balanced_cases.items():
        base = queued_gpu_us(theirs)
        times = {}
        for blocks in configs:
            try:
                times[blocks] = timed(ours, theirs, blocks)
            except Exception as err:  # an out-of-resources tile: report it and go on
                times[blocks] = f"failed ({str(err).splitlines()[0][:60]})"
        ok = {b: t for b, t in times.items() if isinstance(t, float)}
        best = min(ok, key=ok.get)
        u_ours, u_theirs = uneven_cases[name]
        u_base, u_best = queued_gpu_us(u_theirs), timed(u_ours, u_theirs, best)
        total["grouped_mm"] += base
        total["tma"] += min(ok[best], base)
        cells = "; ".join(f"{b[0]}×{b[1]}×{b[2]}/{b[3]}/{b[4]}: " + (f"{t:.1f}" if isinstance(t, float) else t)
                          for b, t in times.items())
        print(f"| {name} | {base:.1f} ({flops / base / 1e6:.0f}) | {best} | {ok[best]:.1f} "
              f"({flops / ok[best] / 1e6:.0f}) | {ok[best] / base:.3f}x | {u_base:.1f}, {u_best:.1f} | {cells} |")
    print(f"six products: grouped_mm {total['grouped_mm']:.1f} µs; the faster of the two per product "
          f"{total['tma']:.1f} µs")


def bench_host(calls: int = 300):
    """Host µs per call of the library's grouped_gemm (one Triton launch; host-made tensor descriptors until the
    tenth session's call 7, made in the kernel since) against torch._grouped_mm, at a shape small enough for the host
    to dominate: calls enqueued back to back, best of 5."""
    import time

    from mamba_r1.ops.moe_grouped_gemm import grouped_gemm, grouped_gemm_applies

    rows_per_expert = [64] * 8
    x, w1, _, w2, _, group_ends, _ = inputs(rows_per_expert, 128, 256, torch.bfloat16, "cuda")
    assert grouped_gemm_applies(x, w1)
    cases = {"grouped_gemm (Triton, TMA)": lambda: grouped_gemm(x, w1, group_ends),
             "grouped_gemm, weight transposed": lambda: grouped_gemm(x, w2.transpose(-2, -1), group_ends),
             "torch._grouped_mm": lambda: torch._grouped_mm(x, w1, offs=group_ends)}
    for name, fn in cases.items():
        best = float("inf")
        for _ in range(5):
            fn()
            torch.cuda.synchronize()
            start = time.perf_counter()
            for _ in range(calls):
                fn()
            best = min(best, (time.perf_counter() - start) / calls * 1e6)
            torch.cuda.synchronize()
        print(f"host µs per call, {name}: {best:.1f}")


def main():
    p = parser(__doc__)
    p.add_argument("--gemms", action="store_true", help="the plain grouped GEMMs only, against grouped_mm")
    p.add_argument("--host", action="store_true", help="host cost per call: the library's grouped_gemm vs grouped_mm")
    a = p.parse_args()
    if a.smoke:
        check_smoke_runtime()
        smoke()
    elif a.gemms:
        bench_gemms(a)
    elif a.host:
        bench_host()
    else:
        bench(a)


if __name__ == "__main__":
    main()
