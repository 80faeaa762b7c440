"""Sweep the Triton scan's block sizes (chunk length, channels per program, warps, pipelining and unrolling of the
GPU and print the best forward and backward configuration per shape: the data behind BLOCK_SIZE_TABLE.

Every configuration is first checked against the float64 reference (forward and all gradients, bf16 inputs) on a
small odd shape; a configuration that fails the check is reported and never timed. Forward and backward are timed
separately (the backward alone, from the forward's checkpoints of the same chunk length), median of
`triton.testing.do_bench`.
    python benchmarks/tune_scan.py [--shapes "8,2048,2048,16;..."] [--budget-s 300] [--out results/tune_scan.json]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_scan import MAMBA_SSM_H100, make_inputs, rel_err  # noqa: E402
from common import device_name, write_json  # noqa: E402

from mamba_r1.ops import selective_scan  # noqa: E402
from mamba_r1.ops.selective_scan import triton_bwd, triton_fwd  # noqa: E402
from mamba_r1.ops.selective_scan.ref import selective_scan_ref_float64  # noqa: E402

SHAPES = [(8, 2048, 2048, 16), (1, 2048, 65536, 16), (8, 1024, 2048, 64)]
# (chunk_l, block_d, num_warps, n_stages, unroll_n); the chunk carry goes through memory and dB/dC are atomic.
# Sweeps on an H200 (2026-11-30, benchmarks/RESULTS.md): the first (chunk 16-2048 x 1-128 channels x 1-8 warps, carry
# in registers or memory, per-program dB/dC partials) and the second (one channel per program, atomics) found chunk
# 512 x one channel x one warp best; the third found pipelining the state loop (stages 2) worth 3-6% on two shapes and
# -3% on the third, unrolling it 20-60% slower; the fourth: stages 2 5-17% faster in the backward, several channels
# in one warp slower in both kernels. Next: stages and chunk around the table's row with exp2 decays.
# A sixth sweep (after the carries were folded into the scans' inputs): shorter chunks, which need far fewer registers
# in the backward (sm_90, kernel_resources.py: 255 at 512 steps, 183-210 at 256, 96-137 at 128), so more warps fit.
# H200, 2026-11-30 (fourth session), ms at the three SHAPES: forward 512 0.492 / 2.214 / 0.937, 256 0.573 / 4.236 /
# 1.043, 128 0.703 / 5.200 / 1.295 (stages 3: 0.894 / 3.916 / 1.724); backward 512 stages 3 2.441 / 9.840 / 4.246,
# 256 3.182 / 19.10 / 6.127 (stages 3: 2.566 / 10.08 / 4.580), 128 3.029 / 12.30 / 5.416 (stages 3: 2.891 / 14.65 /
# 5.375). The per-chunk work (checkpoint and carry loads, the dA read-modify-write, the barrier) outweighs the
# occupancy: 512 stays.
# A seventh and eighth (2026-11-30, sixth session; H200, triton 3.6, ms at the three SHAPES): "paired" reads bf16 B
# and C as int32 pairs (sm_90 forward state loop 274 -> 258 instructions): forward 0.495 / 2.240 / 0.933 -> 0.467 /
# 2.207 / 0.926, backward 2.496 / 10.06 / 4.330 -> 2.476 / 9.891 / 4.318. Adding dB / dC by inline-PTX vector
# reductions in the values' own layout (121 instructions fewer per state) made the backward 1.6x slower (4.041 /
# 13.00 / 6.620): each warp's reduction then covers 32-byte strided halves of twice the sectors, where
# tl.atomic_add's own layout writes 512 contiguous bytes. Removed. "flip" runs the adjoint as a forward scan over
# flipped tiles (lane_asm.flip_time: triton 3.6 builds reverse scans from five butterflies per register; backward
# 1009 -> 811 instructions per state): backward 2.477 / 9.863 / 4.271 -> 2.186 / 8.103 / 3.432 with paired (call 4).
# "edge" stores each chunk's edge column from its register (no shared-memory conversion, no barrier per state), call
# 5: forward 0.499 / 2.288 / 0.945 (none) -> 0.471 / 2.260 / 0.939 (paired) -> 0.440 / 2.100 / 0.893 (paired+edge);
# backward 2.442 / 9.845 / 4.252 (none) -> 2.099 / 8.009 / 3.414 (paired+flip) -> 2.065 / 7.916 / 3.359 (+edge);
# stages 2 instead of 3 with all three: 2.185 / 8.599 / 3.636. Chunk 256 with paired+flip (call 4): backward 2.150 /
# 8.007 / 3.543, but the forward at 256 is 0.570 ms: the two must share the chunk, so 512 stays.
# (chunk_l, block_d, num_warps, n_stages, unroll_n, switches)
# A ninth and tenth (2026-11-30, seventh session; H200, triton 3.6, ms at the three SHAPES): the dB / dC atomics
# through a swizzled shared-memory copy of each row with coalesced red.v4 (73 instructions fewer per state): backward
# 1.999 / 7.355 / 3.225 -> 2.078 / 7.378 / 3.253, removed. "scan", the forward's affine scan by inline PTX
# (lane_asm.scan_time): forward 0.426 / 2.006 / 0.810 -> 0.418 / 1.888 / 0.779; its fix-up variant 0.426 / 1.904 /
# 0.794; the same scans in the backward 2.071 / 7.359 / 3.219 -> 2.107 / 7.533 / 3.317 (fix-up 2.087 / 7.481 /
# 3.279), so the backward keeps tl.associative_scan.
# An eleventh to thirteenth (eighth session; medians of three rounds, --rounds, since the lent GPU drifts by several
# percent within a call): "joint" (recompute and adjoint in one scan) 1.985 / 7.385 / 3.227 -> 1.960 / 7.245 / 3.198;
# "binner" + "copies4" (the dB / dC atomics spread over batch elements and four buffers) 2.027 / 7.328 / 3.234 ->
# 1.682 / 7.004 / 2.839 (benchmarks/RESULTS.md, "eighth session"). Two or four states per forward iteration lost.
FWD = [(512, 1, 1, 1, 1, "paired+edge"), (512, 1, 1, 1, 1, "paired+edge+scan")]
# Configurations that spill (benchmarks/kernel_resources.py compiles them here, no GPU needed) are left out.
BWD = [(512, 1, 1, 3, 1, "paired+flip+edge+joint"), (512, 1, 1, 3, 1, "paired+flip+edge+joint+binner+copies4")]


# Backward register caps (maxnreg) tried at the table's backward row with --maxnreg: 255 registers allow 8 warps per
# SM; 168 allow 12 with ~50 spill instructions per state (kernel_resources.py), 128 allow 16 with ~150. Measured on
# an H200 (2026-11-30, the three SHAPES): none 2.437 / 9.849 / 4.255 ms, 168 2.690 / 13.67 / 4.898, 200 2.788 /
# 10.99 / 4.887, 232 2.449 / 9.807 / 4.269: the spills cost more than the occupancy gains; the table sets no cap.


def use(chunk_l, fwd=None, bwd=None, stages=1, unroll=1, maxnreg=None, switches=""):
    """Set the configuration; the kernel not being swept gets one channel per program and one warp. ``switches``:
    "paired", "flip", "edge", "scan", "joint", "binner", "copiesK" (joined by +): BlockSizes.paired_bc, flip_adjoint,
    edge_asm, scan_asm, joint_scan, batch_inner, bc_copies=K."""
    fwd = fwd or (1, 1)
    bwd = bwd or (1, 1)
    on = set(switches.split("+"))
    copies = max([int(token[len("copies"):]) for token in on if token.startswith("copies")] or [1])
    triton_fwd.BLOCK_SIZE_OVERRIDE = triton_fwd.BlockSizes(chunk_l, fwd[0], fwd[1], bwd[0], bwd[1],
                                                           carry_in_memory=True, atomic_bc=True, n_stages=stages,
                                                           unroll_n=unroll, bwd_n_stages=stages, bwd_maxnreg=maxnreg,
                                                           paired_bc="paired" in on,
                                                           flip_adjoint="flip" in on,
                                                           edge_asm="edge" in on,
                                                           scan_asm="scan" in on,
                                                           joint_scan="joint" in on,
                                                           batch_inner="binner" in on,
                                                           bc_copies=copies)


class Checker:
    """Float64 reference forward and gradients on a small odd shape, computed once per d_state."""

    def __init__(self, device):
        self.device, self.cache = device, {}

    def errors(self, d_state):
        if d_state not in self.cache:
            torch.manual_seed(0)
            # seqlen 1040: two whole chunks of 512 and a partial one, and a multiple of 16 (the vector reductions)
            args = make_inputs((2, 96, 1040, d_state), torch.bfloat16, self.device, requires_grad=True)
            g = torch.randn(2, 96, 1040, device=self.device)
            ref_args = {k: t.detach().double().requires_grad_(True) for k, t in args.items()}
            ref = selective_scan_ref_float64(**ref_args, delta_softplus=True)
            (ref * g.double()).sum().backward()
            self.cache[d_state] = (args, g, ref, {k: t.grad for k, t in ref_args.items()})
        args, g, ref, ref_grads = self.cache[d_state]
        out = selective_scan(**args, delta_softplus=True, backend="triton")
        grads = torch.autograd.grad((out.float() * g).sum(), list(args.values()))
        return rel_err(out, ref), max(rel_err(gr, ref_grads[k]) for gr, k in zip(grads, args))


def time_fwd(shape):
    args = make_inputs(shape, torch.bfloat16, "cuda")
    import triton.testing

    with torch.no_grad():
        return triton.testing.do_bench(lambda: selective_scan(**args, delta_softplus=True, backend="triton"),
                                       warmup=25, rep=100, return_mode="median")


def time_bwd(shape):
    """The backward kernel alone (plus its partial-sum reductions), from real checkpoints."""
    import triton.testing

    args = make_inputs(shape, torch.bfloat16, "cuda")
    u, delta, z = args["u"], args["delta"], args["z"]
    B, C = args["B"][:, None], args["C"][:, None]
    out = torch.empty_like(u)
    _, ckpt = triton_fwd.selective_scan_fwd_launch(u, delta, args["A"], B, C, args["D"], z, args["delta_bias"],
                                                   None, True, out)
    dout = torch.randn_like(u)
    du, ddelta, dz = torch.empty_like(u), torch.empty_like(delta), torch.empty_like(z)

    def bwd():
        triton_bwd.selective_scan_bwd_launch(dout, None, u, delta, args["A"], B, C, args["D"], z, args["delta_bias"],
                                             ckpt, True, False, du, ddelta, dz)

    return triton.testing.do_bench(bwd, warmup=25, rep=100, return_mode="median")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", default=None, help="batch,dim,seqlen,d_state[;...]")
    p.add_argument("--budget-s", type=float, default=300.0, help="stop starting new configurations after this")
    p.add_argument("--which", default="fwd,bwd")
    p.add_argument("--out", default="tune_scan.json")
    p.add_argument("--rounds", type=int, default=1,
                   help="run the whole list this many times in turn and report each configuration's median over the "
                        "rounds (the lent GPU's speed drifts by several percent within a call: compare in rounds)")
    p.add_argument("--maxnreg", default=None,
                   help="comma-separated backward register caps to try at the table's backward row (0 = none), "
                        "instead of the FWD / BWD lists")
    a = p.parse_args()
    shapes = [tuple(int(v) for v in s.split(",")) for s in a.shapes.split(";")] if a.shapes else SHAPES
    checker, rows, start = Checker("cuda"), [], time.perf_counter()
    print(f"tune_scan on {device_name('cuda')}, torch {torch.__version__}", flush=True)
    if a.maxnreg:
        table = triton_fwd.BLOCK_SIZE_TABLE["cuda"]
        switches = "+".join(name for name, on in (("paired", table.paired_bc), ("flip", table.flip_adjoint),
                                                  ("edge", table.edge_asm), ("joint", table.joint_scan),
                                                  ("binner", table.batch_inner),
                                                  (f"copies{table.bc_copies}", table.bc_copies > 1)) if on)
        row_cfg = (table.chunk_l, table.bwd_block_d, table.bwd_warps, table.bwd_n_stages, table.unroll_n, switches)
        plan = [("bwd", row_cfg, int(m) or None) for m in a.maxnreg.split(",")]
    else:
        plan = [("fwd", c, None) for c in FWD] if "fwd" in a.which else []
        plan += [("bwd", c, None) for c in BWD] if "bwd" in a.which else []
    for rnd, (kind, (chunk_l, block_d, warps, stages, unroll, switches), maxnreg) in (
            (r, entry) for r in range(a.rounds) for entry in plan):
        if time.perf_counter() - start > a.budget_s:
            print(f"budget spent: skipped the rest from {kind} {chunk_l, block_d, warps, stages, unroll, switches}")
            break
        if kind.startswith("fwd"):
            use(chunk_l, fwd=(block_d, warps), stages=stages, unroll=unroll, switches=switches)
        else:
            use(chunk_l, bwd=(block_d, warps), stages=stages, unroll=unroll, maxnreg=maxnreg, switches=switches)
        row = dict(kind=kind, chunk_l=chunk_l, block_d=block_d, warps=warps, n_stages=stages, unroll_n=unroll,
                   maxnreg=maxnreg, switches=switches, round=rnd)
        try:
            errs = [checker.errors(n) for n in sorted({s[3] for s in shapes})]
            row["fwd_err"], row["grad_err"] = max(e[0] for e in errs), max(e[1] for e in errs)
            if row["fwd_err"] > 1e-2 or row["grad_err"] > 1e-2:
                row["error"] = "wrong result"
            else:
                for shape in shapes:
                    row[str(shape)] = (time_fwd if kind.startswith("fwd") else time_bwd)(shape)
        except Exception as err:  # out of resources (shared memory, registers) for big tiles
            row["error"] = f"{type(err).__name__}: {str(err)[:120]}"
        rows.append(row)
        times = " ".join(f"{row.get(str(s), float('nan')):8.3f}" for s in shapes)
        print(f"{rnd} {kind} chunk {chunk_l:5d} block_d {block_d:4d} warps {warps} stages {stages} unroll {unroll} "
              f"maxnreg {maxnreg or '-'} {switches or '-':13s} | "
              f"{times} | "
              f"err {row.get('fwd_err', float('nan')):.1e}/{row.get('grad_err', float('nan')):.1e} "
              f"{row.get('error', '')}", flush=True)
        torch.cuda.empty_cache()
    triton_fwd.BLOCK_SIZE_OVERRIDE = None
    if a.rounds > 1:
        print(f"\nmedian over {a.rounds} rounds (ms):")
        keys = ("kind", "chunk_l", "block_d", "warps", "n_stages", "unroll_n", "maxnreg", "switches")
        for config in dict.fromkeys(tuple(r[k] for k in keys) for r in rows):
            mine = [r for r in rows if tuple(r[k] for k in keys) == config]
            medians = [statistics.median(r[str(s)] for r in mine if str(s) in r) if all(str(s) in r for r in mine)
                       else float("nan") for s in shapes]
            print(f"  {' '.join(str(v) for v in config):55s} | " + " ".join(f"{m:8.3f}" for m in medians))
    print("\nbest per shape (ms; mamba-ssm H100 fwd / fwd+bwd from TARGETS.md):")
    for shape in shapes:
        for kind in ("fwd", "bwd"):
            timed = [r for r in rows if r["kind"] == kind and str(shape) in r]
            if timed:
                best = min(timed, key=lambda r: r[str(shape)])
                print(f"  {kind} {shape}: {best[str(shape)]:.3f} ms at chunk {best['chunk_l']}, block_d "
                      f"{best['block_d']}, warps {best['warps']}, stages {best['n_stages']}, unroll "
                      f"{best['unroll_n']}, {best['switches'] or 'no switches'}   "
                      f"(anchor {MAMBA_SSM_H100.get(shape)})")
    write_json(a.out, dict(device=device_name("cuda"), torch=torch.__version__, rows=rows))


if __name__ == "__main__":
    main()
