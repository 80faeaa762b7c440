"""A few forward+backward calls of the Triton scan at one shape, for Nsight Compute (the ncu stage of run_gpu.sh):
    ncu --clock-control none --kernel-name regex:selective_scan --launch-skip 2 --launch-count 2 \\
        --section SpeedOfLight --section Occupancy --section WarpStateStats python benchmarks/ncu_scan.py
Checks the output against the float64 reference first, as every benchmark here does.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_scan import make_inputs, rel_err  # noqa: E402

from mamba_r1.ops import selective_scan  # noqa: E402
from mamba_r1.ops.selective_scan.ref import selective_scan_ref_float64  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="8,2048,2048,16", help="batch,dim,seqlen,d_state")
    p.add_argument("--calls", type=int, default=3)
    a = p.parse_args()
    shape = tuple(int(v) for v in a.shape.split(","))
    torch.manual_seed(0)
    small = make_inputs((1, 64, 700, shape[3]), torch.bfloat16, "cuda")
    got = selective_scan(**small, delta_softplus=True, backend="triton")
    want = selective_scan_ref_float64(**{k: t.double() for k, t in small.items()}, delta_softplus=True)
    print(f"check at (1, 64, 700, {shape[3]}): relative error {rel_err(got, want):.1e}")
    args = make_inputs(shape, torch.bfloat16, "cuda", requires_grad=True)
    dout = torch.randn(shape[:3], device="cuda", dtype=torch.bfloat16)
    for _ in range(a.calls):
        out = selective_scan(**args, delta_softplus=True, backend="triton")
        torch.autograd.grad(out, list(args.values()), dout)
    torch.cuda.synchronize()
    print("done", shape)


if __name__ == "__main__":
    main()
