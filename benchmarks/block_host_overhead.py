"""The host side of a MambaBlock training step on the CPU: its Python and dispatch cost with the Triton kernels
stubbed out, through the eager path (plain autograd.Functions) and through the custom ops (what torch.compile
traces).

    TRITON_INTERPRET=1 OMP_NUM_THREADS=1 python benchmarks/block_host_overhead.py

On slow lent GPU hosts the block's eager step was host-bound (benchmarks/RESULTS.md: 5.07 ms per step against 3.59 ms
of GPU time); this measures the part of that cost that is this library's Python, on any machine, without a GPU. The
scan's and conv's kernels are replaced by no-ops, so the timings are the Python, the dispatcher and autograd around
kernels that do nothing, plus the CPU aten ops (the projections' bmm on a tiny shape: MambaBlock(64), batch 2 x 64).
Prints the forward + backward step's host time (best of 7 x 100 steps) per path.
"""

from __future__ import annotations

import importlib
import os
import sys
from pathlib import Path

import torch

if os.environ.get("TRITON_INTERPRET") != "1":
    raise SystemExit("set TRITON_INTERPRET=1 before running (the kernels' modules are imported for the interpreter)")

from mamba_r1 import MambaBlock  # noqa: E402
from mamba_r1.ops import eager_custom_ops  # noqa: E402
from mamba_r1.ops.selective_scan import triton_bwd, triton_fwd  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from common import best_host_us, stub_kernel_launches  # noqa: E402

conv = importlib.import_module("mamba_r1.ops.causal_conv1d")  # the package re-exports a function of that name


def stub_kernels() -> None:
    stub_kernel_launches(conv, triton_fwd, triton_bwd)
    conv._interpreting = lambda: True
    triton_fwd.interpreting = lambda: True


def main():
    stub_kernels()
    torch.manual_seed(0)
    block = MambaBlock(64, d_state=16, scan_backend="triton")
    x = torch.randn(2, 64, 64, requires_grad=True)
    dy = torch.randn_like(x)
    leaves = [x] + list(block.parameters())

    def step():
        torch.autograd.grad(block(x), leaves, dy)

    print("MambaBlock(64), batch 2 x 64, CPU, kernels stubbed: host time of one forward + backward step")
    for path, traced in (("eager (plain autograd.Functions)", False), ("through the custom ops", True)):
        eager_custom_ops.tracing = lambda traced=traced: traced
        print(f"  {path:34s} {best_host_us(step):8.1f} us")


if __name__ == "__main__":
    main()
