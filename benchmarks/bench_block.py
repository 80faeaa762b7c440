"""MambaBlock forward+backward throughput (tokens/s); mamba-ssm's Mamba beside it when importable.

GPU (TARGETS.md: MambaBlock(1024), bf16, batch 8 x 2048; mamba-ssm 4.40 ms = 3.72 M tokens/s):
    python benchmarks/bench_block.py --device cuda
CPU:
    python benchmarks/bench_block.py
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import device_name, median_ms, queued_gpu_us, write_json  # noqa: E402

from mamba_r1 import MambaBlock  # noqa: E402

MAMBA_SSM_H100_MS = 4.40  # TARGETS.md, batch 8 x 2048, d_model 1024


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def check_against_torch_scan(block, device, dtype):
    """The block as benchmarked vs the same weights on the chunked PyTorch scan, on a small fresh input."""
    x = torch.randn(2, 300, block.d_model, device=device, dtype=dtype, requires_grad=True)
    dy = torch.randn_like(x)
    params = [x] + list(block.parameters())
    results = []
    for backend in (block.scan_backend, "torch"):
        saved, block.scan_backend = block.scan_backend, backend
        y = block(x)
        results.append([y] + list(torch.autograd.grad(y, params, dy)))
        block.scan_backend = saved
    return max(rel_err(a, b) for a, b in zip(*results))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--d-model", type=int, default=None)
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--seqlen", type=int, default=None)
    p.add_argument("--backends", default=None, help="scan backends, comma-separated")
    p.add_argument("--scan-blocks", default=None,
                   help="chunk_l,fwd_block_d,fwd_warps,bwd_block_d,bwd_warps,carry,atomic"
                        "[,n_stages,unroll_n,bwd_n_stages]: try a Triton scan configuration")
    a = p.parse_args()
    if a.scan_blocks:
        from mamba_r1.ops.selective_scan import triton_fwd

        v = [int(x) for x in a.scan_blocks.split(",")]
        triton_fwd.BLOCK_SIZE_OVERRIDE = triton_fwd.BlockSizes(*v[:5], bool(v[5]), bool(v[6]), *v[7:])
        print("scan blocks:", triton_fwd.BLOCK_SIZE_OVERRIDE)
    cuda = a.device == "cuda"
    d_model = a.d_model or (1024 if cuda else 256)
    batch, seqlen = a.batch or (8 if cuda else 2), a.seqlen or (2048 if cuda else 512)
    dtype = torch.bfloat16 if cuda else torch.float32
    backends = (a.backends or ("triton" if cuda else "torch")).split(",")
    rows = []
    x = torch.randn(batch, seqlen, d_model, device=a.device, dtype=dtype, requires_grad=True)
    dy = torch.randn_like(x)
    candidates = [(f"mamba_r1 ({b})", MambaBlock(d_model, d_state=16, d_conv=4, expand=2, scan_backend=b,
                                                 device=a.device, dtype=dtype)) for b in backends]
    try:
        from mamba_ssm import Mamba

        candidates.append(("mamba-ssm Mamba", Mamba(d_model, d_state=16, d_conv=4, expand=2).to(a.device, dtype)))
    except ImportError:
        pass
    for name, block in candidates:
        err = check_against_torch_scan(block, a.device, dtype) if "mamba_r1" in name else float("nan")
        print(f"{name}: output and gradients vs the same block on the torch scan: max relative error {err:.1e}")

        def fwd_bwd(block=block):
            y = block(x)
            torch.autograd.grad(y, [x] + list(block.parameters()), dy)

        with torch.no_grad():
            t_fwd = median_ms(lambda: block(x), a.device)
        t = median_ms(fwd_bwd, a.device)
        # The same step with the host out of the picture (calls queued behind a GPU sleep): do_bench's time above
        # includes the host whenever launching the step's ~40 kernels takes longer than running them, and the lent
        # hosts differ from call to call.
        gpu_ms = queued_gpu_us(fwd_bwd) / 1e3 if a.device == "cuda" else float("nan")
        rows.append(dict(name=name, fwd_ms=t_fwd, fwd_bwd_ms=t, mtok_s=batch * seqlen / t / 1e3, check_err=err,
                         fwd_bwd_gpu_ms=gpu_ms))
    print(f"\nMambaBlock({d_model}), {dtype}, batch {batch} x seqlen {seqlen}, {device_name(a.device)}")
    print(f"{'implementation':24s} {'fwd ms':>8s} {'fwd+bwd ms':>11s} {'M tok/s':>8s} {'f+b GPU ms (host out)':>22s}")
    for r in rows:
        print(f"{r['name']:24s} {r['fwd_ms']:8.2f} {r['fwd_bwd_ms']:11.2f} {r['mtok_s']:8.2f} "
              f"{r['fwd_bwd_gpu_ms']:22.2f}")
    if cuda:
        print(f"{'mamba-ssm (TARGETS.md)':24s} {'':8s} {MAMBA_SSM_H100_MS:11.2f} "
              f"{batch * seqlen / MAMBA_SSM_H100_MS / 1e3:8.2f}")
    write_json(f"block_{a.device}.json", dict(device=device_name(a.device), d_model=d_model, batch=batch,
                                              seqlen=seqlen, dtype=str(dtype), rows=rows))


if __name__ == "__main__":
    main()
