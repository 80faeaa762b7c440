"""Experiment, not used by the library: the expert FFN's first grouped GEMM with bias + GELU in its epilogue, and the
backward's dX GEMM through the second weight with GELU's derivative and the bias-gradient partials in its epilogue,
as Triton kernels, against what SwitchMoE runs now (torch._grouped_mm, then moe_expert_ffn's bias + GELU kernels).

    TRITON_INTERPRET=1 python benchmarks/try_fused_expert_gemm.py --smoke   # CPU: correctness at small odd shapes
    python benchmarks/try_fused_expert_gemm.py                              # CUDA: TARGETS.md's shape, check + time

Why (RESULTS.md, 2026-11-30): the six grouped GEMMs are 1.19x the dense FFN's cuBLAS GEMMs, and the bias + GELU
kernels move 268 MB forward and 403 MB backward per step at 16,384 x 4,096. Fused, the forward writes h + b and
GELU(h + b) (268 MB) instead of writing h, reading it and writing GELU (402 MB); the backward's dX GEMM writes
grad_h = (grad_y @ W2^T) * GELU'(h + b) directly, reading h in its epilogue, instead of writing grad_hidden and
reading it back with h (403 MB -> 268 MB). About 270 MB less traffic per step (~65-90 µs on an H200), if the Triton
GEMM keeps up with CUTLASS's (~576 TFLOP/s here). This script measures that: every variant is checked against a
float32 torch composition first, then timed (common.queued_gpu_us: GPU time, median of 25); then the whole expert FFN's
forward+backward on the fused kernels (the other GEMMs on torch._grouped_mm) is checked against SwitchMoE's current
one (moe_expert_ffn._ExpertFFNEager) and both are timed.

Tile schedule (no host sync): rows are sorted by expert and ``group_ends`` (int32) holds each expert's end row.
An expert with r rows takes cdiv(r, BLOCK_M) row tiles; the grid's first axis has cdiv(rows, BLOCK_M) + num_experts
programs (an upper bound on the tiles), each finds its expert from the cumulative tile counts and returns if it has
none. Every row tile lies inside one expert, so the bias-gradient partial of a tile belongs to one expert.
"""

from __future__ import annotations

import argparse
import os

import torch
import triton
import triton.language as tl

from mamba_r1.ops import moe_expert_ffn
from mamba_r1.ops.moe_dispatch import DispatchPlan, ffn_activation

GELU = tl.constexpr(1)  # moe_expert_ffn._act_fwd/_act_grad code of GELU


@triton.jit
def _tile_of(pid_m, group_ends_ptr, num_experts, BLOCK_M: tl.constexpr, E_PAD: tl.constexpr):
    """(expert, first row, end row of the expert, whether this program has a tile) for row-tile program pid_m."""
    offs_e = tl.arange(0, E_PAD)
    ends = tl.load(group_ends_ptr + offs_e, mask=offs_e < num_experts, other=0)
    starts = tl.load(group_ends_ptr + offs_e - 1, mask=(offs_e > 0) & (offs_e < num_experts), other=0)
    rows_e = tl.where(offs_e < num_experts, ends - starts, 0)
    tiles_e = (rows_e + BLOCK_M - 1) // BLOCK_M
    tiles_end = tl.cumsum(tiles_e, axis=0)
    expert = tl.sum((tiles_end <= pid_m).to(tl.int32), axis=0)
    has_tile = expert < num_experts
    first_tile = tl.sum(tl.where(offs_e == expert, tiles_end - tiles_e, 0), axis=0)
    start = tl.sum(tl.where(offs_e == expert, starts, 0), axis=0)
    end = tl.sum(tl.where(offs_e == expert, ends, 0), axis=0)
    return expert, start + (pid_m - first_tile) * BLOCK_M, end, has_tile


@triton.jit
def _tile_product(rows_ptr, w_base, offs_m, offs_n, mask_m, mask_n, K, stride_wk, stride_wn,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """(BLOCK_M, BLOCK_N) float32 tile of rows (.., K) @ W, W[k, n] at w_base + k * stride_wk + n * stride_wn."""
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        a = tl.load(rows_ptr + offs_m.to(tl.int64)[:, None] * K + offs_k[None, :],
                    mask=mask_m[:, None] & (offs_k < K)[None, :], other=0.0)
        b = tl.load(w_base + offs_k[:, None] * stride_wk + offs_n[None, :] * stride_wn,
                    mask=(offs_k < K)[:, None] & mask_n[None, :], other=0.0)
        acc = tl.dot(a, b, acc)
    return acc


@triton.jit
def _fwd_kernel(x_ptr, w_ptr, bias_ptr, group_ends_ptr, pre_ptr, out_ptr, K, N, num_experts,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, E_PAD: tl.constexpr):
    """pre = x @ w[e] + b[e] (rounded to x's dtype), out = GELU(pre), for one (row tile, column tile)."""
    expert, row0, end, has_tile = _tile_of(tl.program_id(0), group_ends_ptr, num_experts, BLOCK_M, E_PAD)
    if has_tile:
        offs_m = row0 + tl.arange(0, BLOCK_M)
        offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_m, mask_n = offs_m < end, offs_n < N
        acc = _tile_product(x_ptr, w_ptr + expert.to(tl.int64) * K * N, offs_m, offs_n, mask_m, mask_n, K, N, 1,
                            BLOCK_M, BLOCK_N, BLOCK_K)
        acc += tl.load(bias_ptr + expert * N + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
        pre = acc.to(pre_ptr.dtype.element_ty)
        tile = offs_m.to(tl.int64)[:, None] * N + offs_n[None, :]
        mask = mask_m[:, None] & mask_n[None, :]
        tl.store(pre_ptr + tile, pre, mask=mask)
        tl.store(out_ptr + tile, moe_expert_ffn._act_fwd(pre.to(tl.float32), GELU).to(out_ptr.dtype.element_ty),
                 mask=mask)


@triton.jit
def _dx_kernel(grad_y_ptr, w_ptr, pre_ptr, group_ends_ptr, grad_h_ptr, partial_ptr, K, N, num_experts,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, E_PAD: tl.constexpr):
    """grad_h = (grad_y @ w[e]^T) * GELU'(pre) for one (row tile, column tile), w[e] (N, K) read transposed (the
    second weight, (expert_dim, dim)); the tile's column sums of grad_h (its expert's bias-gradient partial) at
    partial[pid_m]."""
    pid_m = tl.program_id(0)
    expert, row0, end, has_tile = _tile_of(pid_m, group_ends_ptr, num_experts, BLOCK_M, E_PAD)
    if has_tile:
        offs_m = row0 + tl.arange(0, BLOCK_M)
        offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_m, mask_n = offs_m < end, offs_n < N
        # w[e] is (N, K): W^T[k, n] = w[e, n, k].
        acc = _tile_product(grad_y_ptr, w_ptr + expert.to(tl.int64) * N * K, offs_m, offs_n, mask_m, mask_n, K, 1, K,
                            BLOCK_M, BLOCK_N, BLOCK_K)
        tile = offs_m.to(tl.int64)[:, None] * N + offs_n[None, :]
        mask = mask_m[:, None] & mask_n[None, :]
        pre = tl.load(pre_ptr + tile, mask=mask, other=0.0).to(tl.float32)
        # Rounded to the dtype as the composition's grad_hidden is, then times GELU'(pre).
        grad_h = acc.to(grad_h_ptr.dtype.element_ty).to(tl.float32) * moe_expert_ffn._act_grad(pre, GELU)
        grad_h = tl.where(mask, grad_h, 0.0)
        tl.store(grad_h_ptr + tile, grad_h.to(grad_h_ptr.dtype.element_ty), mask=mask)
        tl.store(partial_ptr + pid_m.to(tl.int64) * N + offs_n, tl.sum(grad_h, axis=0), mask=mask_n)


def fused_forward(x, w, bias, group_ends, blocks):
    """(rows, K) x, (E, K, N) w, (E, N) bias -> (pre, GELU(pre)), both (rows, N) in x's dtype."""
    block_m, block_n, block_k, warps, stages = blocks
    rows, k = x.shape
    num_experts, _, n = w.shape
    pre, out = (torch.empty(rows, n, device=x.device, dtype=x.dtype) for _ in range(2))
    grid = (triton.cdiv(rows, block_m) + num_experts, triton.cdiv(n, block_n))
    _fwd_kernel[grid](x, w, bias, group_ends, pre, out, k, n, num_experts, BLOCK_M=block_m, BLOCK_N=block_n,
                      BLOCK_K=block_k, E_PAD=max(2, triton.next_power_of_2(num_experts)), num_warps=warps,
                      num_stages=stages)
    return pre, out


def fused_dx(grad_y, w2, pre, group_ends, blocks):
    """(rows, K) grad_y, (E, N, K) w2, (rows, N) pre -> grad_h (rows, N), bias-gradient partials (tiles, N) float32,
    zero for the grid's tiles past the last expert's (fused_ffn_step sums them per expert with index_add; the library
    would sum them in a fixed order, as moe_expert_ffn.reduce_bias_partials does)."""
    block_m, block_n, block_k, warps, stages = blocks
    rows, k = grad_y.shape
    num_experts, n, _ = w2.shape
    grad_h = torch.empty(rows, n, device=grad_y.device, dtype=grad_y.dtype)
    tiles = triton.cdiv(rows, block_m) + num_experts
    partial = torch.zeros(tiles, n, device=grad_y.device, dtype=torch.float32)
    _dx_kernel[(tiles, triton.cdiv(n, block_n))](grad_y, w2, pre, group_ends, grad_h, partial, k, n, num_experts,
                                                 BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
                                                 E_PAD=max(2, triton.next_power_of_2(num_experts)), num_warps=warps,
                                                 num_stages=stages)
    return grad_h, partial


def fused_ffn_step(rows, w1, b1, w2, group_ends, grad_y, blocks):
    """The whole expert FFN (no output bias) forward and backward on the fused kernels, the rest on
    torch._grouped_mm: y = GELU(rows @ w1[e] + b1[e]) @ w2[e], then the gradients of rows, w1, b1, w2 for grad_y."""
    pre, hidden = fused_forward(rows, w1, b1, group_ends, blocks)  # (slots, expert_dim) each
    y = torch._grouped_mm(hidden, w2, offs=group_ends)  # (slots, dim)
    grad_h, partial = fused_dx(grad_y, w2, pre, group_ends, blocks)  # (slots, expert_dim), (tiles, expert_dim)
    grad_w2 = torch._grouped_mm(hidden.t(), grad_y, offs=group_ends)
    grad_rows = torch._grouped_mm(grad_h, w1.transpose(-2, -1), offs=group_ends)
    grad_w1 = torch._grouped_mm(rows.t(), grad_h, offs=group_ends)
    # Each tile's partial belongs to one expert: its expert from the cumulative tile counts, then a segment sum.
    starts = torch.cat([group_ends.new_zeros(1), group_ends[:-1]])
    tiles_end = torch.cumsum((group_ends - starts + blocks[0] - 1) // blocks[0], 0)
    tile_expert = torch.searchsorted(tiles_end, torch.arange(partial.shape[0], device=rows.device, dtype=torch.int32),
                                     right=True).clamp_max(w1.shape[0] - 1)
    grad_b1 = torch.zeros(b1.shape, device=rows.device, dtype=torch.float32).index_add_(0, tile_expert, partial)
    return y, grad_rows, grad_w1, grad_b1.to(b1.dtype), grad_w2


def current_ffn_step(rows, w1, b1, w2, plan, grad_y):
    """The same step as SwitchMoE runs it now (moe_expert_ffn._ExpertFFNEager: grouped_mm + bias/GELU kernels)."""
    leaves = [t.detach().requires_grad_() for t in (rows, w1, b1, w2)]
    y = moe_expert_ffn._ExpertFFNEager.apply(*leaves, plan, "gelu")
    y.backward(grad_y)
    return (y.detach(), *(t.grad for t in leaves))


def inputs(rows_per_expert, k, n, dtype, device, seed=0):
    gen = torch.Generator().manual_seed(seed)
    rows = sum(rows_per_expert)
    num_experts = len(rows_per_expert)
    x = (torch.randn(rows, k, generator=gen) / k**0.5).to(device, dtype)
    w1 = torch.randn(num_experts, k, n, generator=gen).to(device, dtype)
    b1 = torch.randn(num_experts, n, generator=gen).to(device, dtype)
    w2 = (torch.randn(num_experts, n, k, generator=gen) / n**0.5).to(device, dtype)
    grad_y = torch.randn(rows, k, generator=gen).to(device, dtype)
    group_ends = torch.tensor(rows_per_expert, device=device).cumsum(0).to(torch.int32)
    expert_of_row = torch.repeat_interleave(torch.arange(num_experts, device=device),
                                            torch.tensor(rows_per_expert, device=device))
    return x, w1, b1, w2, grad_y, group_ends, expert_of_row


def reference(x, w1, b1, w2, grad_y, rows_per_expert):
    """float32, expert by expert: pre = x @ w1[e] + b1[e], GELU(pre), grad_h = (grad_y @ w2[e]^T) * GELU'(pre),
    the bias gradient (the column sums of grad_h over each expert's rows)."""
    pres, outs, grads, grad_b = [], [], [], []
    for e, (xe, ge) in enumerate(zip(x.float().split(rows_per_expert), grad_y.float().split(rows_per_expert))):
        pre = (xe @ w1[e].float() + b1[e].float()).requires_grad_()
        out = ffn_activation(pre, "gelu")
        out.backward(ge @ w2[e].float().t())
        pres.append(pre.detach())
        outs.append(out.detach())
        grads.append(pre.grad)
        grad_b.append(pre.grad.sum(0))
    return torch.cat(pres), torch.cat(outs), torch.cat(grads), torch.stack(grad_b)


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30)).item()


def check(rows_per_expert, k, n, dtype, device, blocks, tol):
    x, w1, b1, w2, grad_y, group_ends, _ = inputs(rows_per_expert, k, n, dtype, device)
    want_pre, want_out, want_grad_h, want_grad_b = reference(x, w1, b1, w2, grad_y, rows_per_expert)
    pre, out = fused_forward(x, w1, b1, group_ends, blocks)
    grad_h, partial = fused_dx(grad_y, w2, pre, group_ends, blocks)
    # The partials of each expert's tiles: tiles are laid out expert by expert, cdiv(rows_e, BLOCK_M) each.
    tiles = [-(-r // blocks[0]) for r in rows_per_expert]
    grad_b = torch.stack([part.sum(0) for part in partial[:sum(tiles)].split(tiles)])
    errors = {"pre": rel(pre, want_pre), "gelu": rel(out, want_out), "grad_h": rel(grad_h, want_grad_h),
              "grad_b": rel(grad_b, want_grad_b)}
    return within(errors, tol, f"fused kernels at {rows_per_expert} x {k} -> {n}, {dtype}, blocks {blocks}")


def within(errors: dict[str, float], tol: float, what: str) -> dict[str, float]:
    """errors when every one is within tol (NaN is not), else exit naming what disagreed with the reference."""
    bad = {name: err for name, err in errors.items() if not err <= tol}
    if bad:
        raise SystemExit(f"{what} disagree with the float32 reference: {bad}")
    return errors


def smoke():
    """Odd shapes under the interpreter, float32 (it has no bf16): an empty expert, partial tiles, K and N not
    multiples of the blocks."""
    blocks = (16, 16, 16, 1, 1)
    for rows_per_expert, k, n in (([5, 0, 19, 1], 24, 40), ([33], 16, 17), ([2, 7, 0], 40, 33)):
        errors = check(rows_per_expert, k, n, torch.float32, "cpu", blocks, 1e-5)
        print(f"{rows_per_expert} x {k} -> {n}: " + ", ".join(f"{key} {v:.1e}" for key, v in errors.items()))
    # The whole step against the current one (torch._grouped_mm on CPU wants widths in multiples of 16 bytes).
    rows_per_expert, k, n = [5, 0, 19, 1], 24, 40
    x, w1, b1, w2, grad_y, group_ends, expert_of_row = inputs(rows_per_expert, k, n, torch.float32, "cpu")
    plan = DispatchPlan(slot_of=None, owns_slot=None, token_of_slot=None, assignment_of_slot=None,
                        group_ends=group_ends, expert_of_slot=expert_of_row, capacity=None)
    errors = [rel(g, w) for g, w in zip(fused_ffn_step(x, w1, b1, w2, group_ends, grad_y, blocks),
                                        current_ffn_step(x, w1, b1, w2, plan, grad_y))]
    if max(errors) > 1e-5:
        raise SystemExit(f"fused expert FFN step disagrees with the current one: {errors}")
    print("whole expert FFN step (y, grad rows, w1, b1, w2) vs the current one: "
          + ", ".join(f"{e:.1e}" for e in errors))


def balanced_case(a):
    """(rows per expert, dtype, device, FLOPs of one product) of the benchmarks: the layer's shape, balanced."""
    return [a.tokens // a.experts] * a.experts, torch.bfloat16, "cuda", 2 * a.tokens * a.dim * a.expert_dim


def bench(a):
    from common import queued_gpu_us

    rows_per_expert, dtype, device, flops = balanced_case(a)
    x, w1, b1, w2, grad_y, group_ends, expert_of_row = inputs(rows_per_expert, a.dim, a.expert_dim, dtype, device)
    expert_of_row = expert_of_row.to(torch.int64)

    def ms(fn):  # the calls enqueued behind a GPU sleep: the host's launch cost stays out of the figure
        return queued_gpu_us(fn) / 1e3

    def now_forward():
        h = torch._grouped_mm(x, w1, offs=group_ends)
        return moe_expert_ffn._moe_bias_act(h, b1, expert_of_row, group_ends, "gelu", 0)

    pre_now = torch._grouped_mm(x, w1, offs=group_ends)

    def now_dx():
        grad_hidden = torch._grouped_mm(grad_y, w2.transpose(-2, -1), offs=group_ends)
        return moe_expert_ffn._moe_bias_act_bwd(grad_hidden, pre_now, b1, expert_of_row, group_ends, "gelu", 0)

    base_f, base_b = ms(now_forward), ms(now_dx)
    print(f"{torch.cuda.get_device_name()}, {a.tokens} rows, {a.dim} -> {a.expert_dim}, {a.experts} experts, bf16")
    print(f"now: grouped_mm + bias/GELU kernels: forward {1e3 * base_f:.1f} µs, dX + GELU' + bias gradient "
          f"{1e3 * base_b:.1f} µs")
    print("| BLOCK_M | BLOCK_N | BLOCK_K | warps | stages | forward µs | TFLOP/s | vs now | dX µs | TFLOP/s | vs now |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    plan = DispatchPlan(slot_of=None, owns_slot=None, token_of_slot=None, assignment_of_slot=None,
                        group_ends=group_ends, expert_of_slot=expert_of_row, capacity=None)
    base_step = ms(lambda: current_ffn_step(x, w1, b1, w2, plan, grad_y))
    want_step = current_ffn_step(x, w1, b1, w2, plan, grad_y)
    print(f"now: the whole expert FFN (six grouped GEMMs, bias/GELU kernels) forward+backward {1e3 * base_step:.1f} µs")
    steps = {}
    for blocks in ((128, 128, 64, 8, 3), (128, 256, 64, 8, 3), (128, 128, 64, 4, 4), (64, 128, 64, 4, 4),
                   (128, 128, 32, 4, 4), (256, 128, 64, 8, 3)):
        try:
            check(rows_per_expert, a.dim, a.expert_dim, dtype, device, blocks, 2e-2)
        except Exception as err:  # an out-of-resources tile: report it and go on
            print(f"| {' | '.join(map(str, blocks))} | failed: {str(err).splitlines()[0][:80]} |")
            continue
        f = ms(lambda: fused_forward(x, w1, b1, group_ends, blocks))
        pre, _ = fused_forward(x, w1, b1, group_ends, blocks)
        b = ms(lambda: fused_dx(grad_y, w2, pre, group_ends, blocks))
        print(f"| {' | '.join(map(str, blocks))} | {1e3 * f:.1f} | {flops / f / 1e9:.0f} | {f / base_f:.2f}x | "
              f"{1e3 * b:.1f} | {flops / b / 1e9:.0f} | {b / base_b:.2f}x |")
        got_step = fused_ffn_step(x, w1, b1, w2, group_ends, grad_y, blocks)
        errors = [rel(g, w) for g, w in zip(got_step, want_step)]
        if max(errors) > 2e-2:
            raise SystemExit(f"fused expert FFN step disagrees with the current one at {blocks}: {errors}")
        steps[blocks] = ms(lambda: fused_ffn_step(x, w1, b1, w2, group_ends, grad_y, blocks))
    print("\nthe whole expert FFN forward+backward on the fused kernels (checked against the current step first):")
    for blocks, t in steps.items():
        print(f"  {blocks}: {1e3 * t:.1f} µs ({1e3 * (t - base_step):+.1f} µs vs now)")


def parser(doc: str) -> argparse.ArgumentParser:
    """The experiments' shared arguments: --smoke and the layer's shape (TARGETS.md's by default)."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="correctness at small shapes (CPU: TRITON_INTERPRET=1)")
    p.add_argument("--tokens", type=int, default=16384)
    p.add_argument("--dim", type=int, default=1024)
    p.add_argument("--expert-dim", type=int, default=4096)
    p.add_argument("--experts", type=int, default=8)
    return p


def check_smoke_runtime() -> None:
    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        raise SystemExit("--smoke on CPU needs TRITON_INTERPRET=1 set before the run")


def main():
    a = parser(__doc__).parse_args()
    if a.smoke:
        check_smoke_runtime()
        smoke()
    else:
        bench(a)


if __name__ == "__main__":
    main()
