"""small_batch_linear (Triton) against F.linear (cuBLAS) at a decode step's shapes: the 130M model's projections
(768 wide, expand 2, d_state 16) and its head, bf16, at 1 / 4 / 16 rows. Each configuration is checked against a
float64 product first, then timed with `triton.testing.do_bench` (L2 flushed between runs, as a decode step finds
each layer's weights in HBM). `--sweep` also tries other block sizes.
    python benchmarks/bench_decode_linear.py [--sweep]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
from common import device_name, write_json  # noqa: E402

import mamba_r1.ops.decode_linear as decode_linear  # noqa: E402

SHAPES = {"in_proj": (768, 3072), "x_proj": (1536, 80), "out_proj": (1536, 768), "lm_head": (768, 50280)}
SWEEP = [(16, 256, 4, 3), (32, 256, 4, 3), (16, 128, 4, 3), (16, 512, 4, 2), (8, 256, 4, 3), (64, 128, 4, 3)]


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sweep", action="store_true")
    p.add_argument("--rows", default="1,4,16")
    a = p.parse_args()
    import triton.testing

    torch.manual_seed(0)
    configs = [None] + (SWEEP if a.sweep else [])
    default = (decode_linear.BLOCK_N_CUDA, decode_linear.BLOCK_K_CUDA, decode_linear.WARPS_CUDA,
               decode_linear.STAGES_CUDA)
    rows_out = []
    print(f"small_batch_linear vs F.linear, bf16, {device_name('cuda')}; us (do_bench median, L2 flushed)")
    for name, (k, n) in SHAPES.items():
        weight = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) / k ** 0.5
        for rows in (int(r) for r in a.rows.split(",")):
            x = torch.randn(rows, k, device="cuda", dtype=torch.bfloat16)
            want = F.linear(x.double(), weight.double())
            cublas = triton.testing.do_bench(lambda: F.linear(x, weight), return_mode="median") * 1e3
            line = f"{name:9s} {k:5d} -> {n:5d} rows {rows:3d} | F.linear {cublas:7.2f}"
            row = dict(layer=name, k=k, n=n, rows=rows, f_linear_us=cublas, triton={})
            for cfg in configs:
                (decode_linear.BLOCK_N_CUDA, decode_linear.BLOCK_K_CUDA, decode_linear.WARPS_CUDA,
                 decode_linear.STAGES_CUDA) = cfg or default
                got = decode_linear.small_batch_linear(x, weight, backend="triton")
                err = ((got.double() - want).norm() / want.norm()).item()
                if not err <= 1e-2:
                    line += f" | {cfg or 'table'}: error {err:.1e}, not timed"
                    continue
                us = triton.testing.do_bench(lambda: decode_linear.small_batch_linear(x, weight, backend="triton"),
                                             return_mode="median") * 1e3
                row["triton"][str(cfg or "table")] = us
                line += f" | {cfg or 'table'} {us:7.2f} ({n * k * 2 / us / 1e3:5.0f} GB/s)"
            (decode_linear.BLOCK_N_CUDA, decode_linear.BLOCK_K_CUDA, decode_linear.WARPS_CUDA,
             decode_linear.STAGES_CUDA) = default
            print(line, flush=True)
            rows_out.append(row)
    write_json("decode_linear_cuda.json", dict(device=device_name("cuda"), rows=rows_out))


if __name__ == "__main__":
    main()
