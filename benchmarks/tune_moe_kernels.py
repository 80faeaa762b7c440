"""Sweep the tile sizes of SwitchMoE's fused bias + activation kernels (mamba_r1/ops/moe_routing.py) at the layer's
shapes and print each configuration's time and memory throughput: the data behind BIAS_BLOCKS_CUDA.

    python benchmarks/tune_moe_kernels.py [--tokens 16384] [--dim 1024] [--expert-dim 4096] [--experts 8]   (CUDA)

Two calls per training step and direction: act(h + b1[expert]) on (tokens, expert_dim) with GELU, and the plain bias
add on (tokens, dim). Rows are sorted by expert as a balanced router sorts them. Every configuration is checked
against the torch composition (float32) first, forward output and both gradients; then timed (median of
triton.testing.do_bench). Bytes moved: forward reads h and writes the output, backward reads the gradient and h and
writes h's gradient (the plain add's backward only reads the gradient); GB/s against the H200's ~4.8 TB/s.
"""

from __future__ import annotations

import argparse
import itertools

import torch
import triton.testing
from common import add_moe_shape_args, device_name, write_json

from mamba_r1.ops import moe_routing
from mamba_r1.ops.moe_dispatch import ffn_activation

CONFIGS = list(itertools.product((32, 64, 128), (64, 128, 256), (4, 8)))  # (block_r, block_w, num_warps)


def case(tokens, width, experts, activation):
    torch.manual_seed(0)
    counts = torch.bincount(torch.randint(0, experts, (tokens,)), minlength=experts)
    expert_of_slot = torch.repeat_interleave(torch.arange(experts), counts).cuda()
    group_ends = torch.cumsum(counts, 0).to(torch.int32).cuda()
    h = torch.randn(tokens, width, device="cuda", dtype=torch.bfloat16)
    bias = torch.randn(experts, width, device="cuda", dtype=torch.bfloat16)
    grad = torch.randn_like(h)
    h32, b32 = h.float().requires_grad_(), bias.float().requires_grad_()
    ref = ffn_activation(h32 + b32[expert_of_slot], activation) if activation != "none" else h32 + b32[expert_of_slot]
    ref.backward(grad.float())
    return dict(h=h, bias=bias, grad=grad, expert_of_slot=expert_of_slot, group_ends=group_ends,
                activation=activation, ref=(ref.detach(), h32.grad, b32.grad))


def rel(a, b):
    return ((a.float() - b).norm() / b.norm().clamp_min(1e-30)).item()


def run_config(c, block):
    moe_routing._bias_blocks = lambda interpreting: block
    args = (c["h"], c["bias"], c["expert_of_slot"], c["group_ends"], c["activation"], 0)
    out = moe_routing._moe_bias_act(*args)
    grad_h, grad_b = moe_routing._moe_bias_act_bwd(c["grad"], *args)
    if c["activation"] == "none":
        grad_h = c["grad"]
    errors = [rel(out, c["ref"][0]), rel(grad_h, c["ref"][1]), rel(grad_b, c["ref"][2])]
    if max(errors) > 1e-2:
        raise SystemExit(f"bias_act {c['activation']} {block}: disagrees with torch, rel errors {errors}")
    fwd = triton.testing.do_bench(lambda: moe_routing._moe_bias_act(*args), warmup=25, rep=100, return_mode="median")
    bwd = triton.testing.do_bench(lambda: moe_routing._moe_bias_act_bwd(c["grad"], *args), warmup=25, rep=100,
                                  return_mode="median")
    return 1e3 * fwd, 1e3 * bwd


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_moe_shape_args(p)
    p.add_argument("--out", default="tune_moe_kernels.json")
    a = p.parse_args()
    table = {"table": moe_routing._bias_blocks(False)}
    print(f"{device_name('cuda')}, torch {torch.__version__}; current tile (block_r, block_w, warps) {table['table']}")
    report = {"device": device_name("cuda"), "config": vars(a), "current": table, "rows": []}
    for width, activation in ((a.expert_dim, "gelu"), (a.dim, "none")):
        c = case(a.tokens, width, a.experts, activation)
        elem = a.tokens * width * 2  # bytes of one bf16 (tokens, width) tensor
        bytes_fwd, bytes_bwd = 2 * elem, (3 if activation != "none" else 1) * elem
        print(f"\n{activation} on ({a.tokens}, {width}): forward moves {bytes_fwd / 1e6:.0f} MB, backward "
              f"{bytes_bwd / 1e6:.0f} MB (+ float32 bias partials); all configurations within 1e-2 of torch")
        print("| block_r | block_w | warps | forward µs | GB/s | backward µs | GB/s |")
        print("| --- | --- | --- | --- | --- | --- | --- |")
        for block in CONFIGS:
            fwd, bwd = run_config(c, block)
            report["rows"].append({"activation": activation, "width": width, "block": block, "fwd_us": fwd,
                                   "bwd_us": bwd})
            mark = "".join(f" ({k})" for k, v in table.items() if tuple(block) == tuple(v))
            print(f"| {block[0]} | {block[1]} | {block[2]}{mark} | {fwd:.1f} | {bytes_fwd / fwd / 1e3:.0f} | "
                  f"{bwd:.1f} | {bytes_bwd / bwd / 1e3:.0f} |")
    write_json(a.out, report)


if __name__ == "__main__":
    main()
