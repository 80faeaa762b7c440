"""A few SwitchMoE training steps at TARGETS.md's shape, for Nsight Compute (the ncu_moe stage of run_gpu.sh):
    ncu --clock-control none --kernel-name regex:"bias_act|combine|token_grad" --launch-skip 10 --launch-count 5 \\
        --section SpeedOfLight --section MemoryWorkloadAnalysis python benchmarks/ncu_moe.py
Checks the layer against the per-expert loop first, as every benchmark here does.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_moe import expert_loop, rel_err  # noqa: E402

from mamba_r1.modules.moe import SwitchMoE  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=16384)
    p.add_argument("--steps", type=int, default=4)
    a = p.parse_args()
    torch.manual_seed(0)
    factory = dict(device="cuda", dtype=torch.bfloat16)
    moe = SwitchMoE(1024, num_experts=8, expert_dim=4096, capacity_factor=1.25, **factory)
    x = torch.randn(a.tokens, 1024, **factory)
    with torch.no_grad():
        print(f"layer vs per-expert loop: relative error {rel_err(moe(x[:512]), expert_loop(moe, x[:512])):.1e}")
    x.requires_grad_()
    dy = torch.randn_like(x)
    for _ in range(a.steps):
        out, aux = moe(x, return_aux=True)
        torch.autograd.backward([out, aux.loss], [dy, None])
    torch.cuda.synchronize()
    print("done", a.tokens)


if __name__ == "__main__":
    main()
