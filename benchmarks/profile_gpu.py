"""Where the GPU time of a MambaBlock or SwitchMoE training step, or of one decoding step, goes: torch.profiler's
per-kernel table.

    python benchmarks/profile_gpu.py block|moe|decode|scan [--rows 25] [--batch 1] [--compile]
Shapes as in TARGETS.md: MambaBlock(1024) at batch 8 x 2048; SwitchMoE 16,384 tokens, 1024 -> 4096, 8 experts;
decode: the 130M pure-Mamba model (768 wide, 24 layers) one token at a time after a 2,048-token prefill; scan: the
Triton selective scan's forward + backward at 8 x 2048 x 2048 x 16 (bench_scan.py's inputs); bf16.
The decode step runs eagerly here: its kernels are the ones a CUDA graph replays, without the launch gaps.
"""

from __future__ import annotations

import argparse

import torch
from torch.profiler import ProfilerActivity, profile

from mamba_r1 import MambaBlock, SwitchMoE, create_mamba_moe


def step_fn(what: str, batch: int, compiled: bool = False):
    dtype, device = torch.bfloat16, "cuda"
    if what == "decode":
        model = create_mamba_moe(dim=768, depth=24, d_state=16, d_conv=4, expand=2, ffn="none", vocab_size=50280,
                                 device=device, dtype=dtype).eval()
        cache = model.allocate_cache(batch)
        with torch.no_grad():
            token = model(torch.randint(0, 50280, (batch, 2048), device=device), cache=cache)[:, -1].argmax(-1)

        @torch.no_grad()
        def decode_step():
            model.step(token, cache)

        return decode_step
    if what == "scan":
        import sys
        from pathlib import Path

        sys.path.insert(0, str(Path(__file__).parent))
        from bench_scan import make_inputs

        from mamba_r1.ops import selective_scan

        args = make_inputs((8, 2048, 2048, 16), dtype, device, requires_grad=True)
        dout = torch.randn(8, 2048, 2048, device=device, dtype=dtype)

        def scan_step():
            out = selective_scan(**args, delta_softplus=True, backend="triton")
            torch.autograd.grad(out, list(args.values()), dout)

        return scan_step
    if what == "block":
        module = MambaBlock(1024, d_state=16, device=device, dtype=dtype)
        x = torch.randn(8, 2048, 1024, device=device, dtype=dtype, requires_grad=True)
    else:
        module = SwitchMoE(1024, num_experts=8, expert_dim=4096, capacity_factor=1.25, device=device, dtype=dtype)
        x = torch.randn(16384, 1024, device=device, dtype=dtype, requires_grad=True)
    dy = torch.randn_like(x)
    run = torch.compile(module, fullgraph=True) if compiled else module

    def step():
        y = run(x)
        torch.autograd.grad(y, [x] + list(module.parameters()), dy)

    return step


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=["block", "moe", "decode", "scan"])
    p.add_argument("--rows", type=int, default=25)
    p.add_argument("--batch", type=int, default=1, help="decode only")
    p.add_argument("--compile", action="store_true", help="block and moe: the module under torch.compile(fullgraph)")
    a = p.parse_args()
    step = step_fn(a.what, a.batch, a.compile)
    for _ in range(3):
        step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            step()
        torch.cuda.synchronize()
    print(f"\n{a.what}{f' batch {a.batch}' if a.what == 'decode' else ''}{' compiled' if a.compile else ''}: 5 steps")
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=a.rows, max_name_column_width=70))


if __name__ == "__main__":
    main()
