"""Peak training memory vs sequence length at a fixed token budget per step (batch x seqlen constant).

Linear-memory training means the peak stays flat as seqlen grows with batch shrinking. TARGETS.md anchor: 4 stacked
mamba-ssm Mamba(1024) blocks, bf16, fwd+bwd: 3,821 MiB at 16 x 2,048 and 3,872 MiB at 1 x 32,768 (1.01x).
    python benchmarks/bench_memory.py --device cuda
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).parent))
from common import device_name, plot, write_json  # noqa: E402

from mamba_r1 import MambaBlock, create_mamba_moe  # noqa: E402


def mamba_stack(dim, device, dtype):
    return nn.Sequential(*[MambaBlock(dim, d_state=16, device=device, dtype=dtype) for _ in range(4)])


def peak_mib(model, x_fn) -> float:
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    out = model(x_fn())
    out = out[0] if isinstance(out, tuple) else out
    out.float().square().mean().backward()
    torch.cuda.synchronize()
    model.zero_grad(set_to_none=True)
    return torch.cuda.max_memory_allocated() / 2**20


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda")
    p.add_argument("--tokens", type=int, default=32768)
    p.add_argument("--seqlens", default="1024,2048,4096,8192,16384,32768")
    a = p.parse_args()
    if a.device != "cuda" or not torch.cuda.is_available():
        sys.exit("bench_memory needs a CUDA device (peak memory comes from torch.cuda.max_memory_allocated)")
    dtype = torch.bfloat16
    seqlens = [int(s) for s in a.seqlens.split(",")]
    models = {
        "4 x MambaBlock(1024)": (mamba_stack(1024, a.device, dtype), 1024, False),
        "create_mamba_moe(dim=512, depth=4)": (create_mamba_moe(dim=512, depth=4, d_state=64, num_experts=8,
                                                                expert_dim=2048, device=a.device, dtype=dtype),
                                               512, True),
    }
    rows, series = [], {}
    for name, (model, dim, _) in models.items():
        xs, ys = [], []
        for seqlen in seqlens:
            batch = max(1, a.tokens // seqlen)
            mib = peak_mib(model, lambda: torch.randn(batch, seqlen, dim, device=a.device, dtype=dtype,
                                                      requires_grad=True))
            rows.append(dict(model=name, batch=batch, seqlen=seqlen, peak_mib=mib))
            xs.append(seqlen)
            ys.append(mib)
        slope = (ys[-1] - ys[0]) / (xs[-1] - xs[0]) * 1024  # MiB per 1k extra seqlen at a fixed token budget
        series[name] = (xs, ys)
        base = ys[seqlens.index(2048)] if 2048 in seqlens else ys[0]
        rows.append(dict(model=name, summary=True, ratio_longest_vs_2048=ys[-1] / base, slope_mib_per_1k=slope))
    print(f"\npeak training memory (fwd+bwd), bf16, {a.tokens} tokens per step, {device_name(a.device)}")
    print(f"{'model':38s} {'batch x seqlen':>16s} {'peak MiB':>10s}")
    for r in rows:
        if r.get("summary"):
            print(f"{r['model']:38s} {'longest / 2048':>16s} {r['ratio_longest_vs_2048']:10.3f}  "
                  f"(slope {r['slope_mib_per_1k']:+.1f} MiB per 1k seqlen)")
        else:
            print(f"{r['model']:38s} {str(r['batch']) + ' x ' + str(r['seqlen']):>16s} {r['peak_mib']:10.0f}")
    write_json("memory_cuda.json", dict(device=device_name(a.device), tokens=a.tokens, rows=rows))
    plot("memory_cuda.png", series, "seqlen (batch = tokens / seqlen)", "peak MiB", "training memory vs seqlen",
         logx=True)


if __name__ == "__main__":
    main()
