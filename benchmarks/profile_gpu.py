"""Where the GPU time of a MambaBlock or SwitchMoE training step goes: torch.profiler's per-kernel table.

    python benchmarks/profile_gpu.py block|moe [--rows 25]
Shapes as in TARGETS.md: MambaBlock(1024) at batch 8 x 2048; SwitchMoE 16,384 tokens, 1024 -> 4096, 8 experts; bf16.
"""

from __future__ import annotations

import argparse

import torch
from torch.profiler import ProfilerActivity, profile

from mamba_r1 import MambaBlock, SwitchMoE


def step_fn(what: str):
    dtype, device = torch.bfloat16, "cuda"
    if what == "block":
        module = MambaBlock(1024, d_state=16, device=device, dtype=dtype)
        x = torch.randn(8, 2048, 1024, device=device, dtype=dtype, requires_grad=True)
    else:
        module = SwitchMoE(1024, num_experts=8, expert_dim=4096, capacity_factor=1.25, device=device, dtype=dtype)
        x = torch.randn(16384, 1024, device=device, dtype=dtype, requires_grad=True)
    dy = torch.randn_like(x)

    def step():
        y = module(x)
        torch.autograd.grad(y, [x] + list(module.parameters()), dy)

    return step


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=["block", "moe"])
    p.add_argument("--rows", type=int, default=25)
    a = p.parse_args()
    step = step_fn(a.what)
    for _ in range(3):
        step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            step()
        torch.cuda.synchronize()
    print(f"\n{a.what}: 5 steps")
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=a.rows, max_name_column_width=70))


if __name__ == "__main__":
    main()
