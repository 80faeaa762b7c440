"""Sweep the tile sizes of SwitchMoE's elementwise kernels (mamba_r1/ops/moe_expert_ffn.py, moe_combine.py,
moe_routing.py) at the layer's shapes and print each configuration's time and memory throughput: the data behind
BIAS_BLOCKS_CUDA, COMBINE_*_CUDA and TOKEN_GRAD_BLOCKS_CUDA.

    python benchmarks/tune_moe_kernels.py [--tokens 16384] [--dim 1024] [--expert-dim 4096] [--experts 8]
                                          [--kernels bias_act,combine,token_grad]   (CUDA)

bias_act: act(h + b1[expert]) with GELU on (tokens, expert_dim), forward and backward (h's and the bias's gradients).
combine: the experts' rows (+ b2[expert]) weighted back into tokens on (tokens, dim), forward and backward (the rows',
the weights' and the bias's gradients). token_grad: x's gradient in the router node, the permutation's plus
grad_logits @ router weight, on (tokens, dim) (one direction). Rows are sorted by expert as a balanced router sorts
them (top-1). Every configuration is checked against the torch composition (float32) first, then timed
(common.queued_gpu_us: the median of 25 calls enqueued behind a GPU sleep, L2 flushed before each, so the host's
launch cost is not in the figure; the table's tile is also timed through do_bench for comparison). Bytes: the bf16
(tokens, width) tensors each direction reads and writes; GB/s against the H200's ~4.8 TB/s.
"""

from __future__ import annotations

import argparse
import itertools

import torch
import triton.testing
from common import add_moe_shape_args, device_name, queued_gpu_us, write_json

from mamba_r1.ops import moe_combine, moe_expert_ffn, moe_routing
from mamba_r1.ops.moe_dispatch import combine_tokens, ffn_activation
from mamba_r1.ops.moe_routing import route_and_plan

CONFIGS = list(itertools.product((16, 32, 64, 128), (64, 128, 256), (4, 8)))  # (rows, features, num_warps)
KERNELS = ("bias_act", "combine", "token_grad")


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30)).item()


def bench_us(fn):
    return queued_gpu_us(fn)


def bias_act_case(a):
    """-> (set the tile, [(direction, call, MB moved)], check() -> max rel error)."""
    plan = routed_plan(a).plan
    h = torch.randn(a.tokens, a.expert_dim, device="cuda", dtype=torch.bfloat16)
    bias = torch.randn(a.experts, a.expert_dim, device="cuda", dtype=torch.bfloat16)
    grad = torch.randn_like(h)
    h32, b32 = h.float().requires_grad_(), bias.float().requires_grad_()
    ref = ffn_activation(h32 + b32[plan.expert_of_slot], "gelu")
    ref.backward(grad.float())
    args = (h, bias, plan.expert_of_slot, plan.group_ends, "gelu", 0)

    def check():
        out = moe_expert_ffn._moe_bias_act(*args)
        grad_h, grad_b = moe_expert_ffn._moe_bias_act_bwd(grad, *args)
        return max(rel(out, ref), rel(grad_h, h32.grad), rel(grad_b, b32.grad))

    def set_tile(block):
        moe_expert_ffn._bias_blocks = lambda interpreting: block

    mb = h.numel() * 2 / 1e6
    return set_tile, [("forward", lambda: moe_expert_ffn._moe_bias_act(*args), 2 * mb),
                      ("backward", lambda: moe_expert_ffn._moe_bias_act_bwd(grad, *args), 3 * mb)], check


def routed_plan(a):
    torch.manual_seed(0)
    logits = torch.randn(a.tokens, a.experts, device="cuda")
    return route_and_plan(logits, 1, None, None, "position", "grouped", 0, 0.01, 0.001, backend="torch")


def combine_case(a):
    routed = routed_plan(a)
    plan, weights = routed.plan, routed.weights.contiguous()
    rows = torch.randn(plan.token_of_slot.numel(), a.dim, device="cuda", dtype=torch.bfloat16)
    bias = torch.randn(a.experts, a.dim, device="cuda", dtype=torch.bfloat16)
    grad = torch.randn(a.tokens, a.dim, device="cuda", dtype=torch.bfloat16)
    leaves = [t.float().requires_grad_() for t in (rows, weights, bias)]
    ref = combine_tokens(leaves[0] + leaves[2][plan.expert_of_slot], leaves[1], plan)
    ref.backward(grad.float())
    args = (rows, weights, plan.slot_of.contiguous(), plan.token_of_slot, plan.assignment_of_slot, True, bias,
            plan.expert_of_slot, plan.group_ends, 0)
    bwd_args = (grad, rows, weights, plan.token_of_slot, plan.assignment_of_slot, True, bias, plan.expert_of_slot,
                plan.group_ends, 0)

    def check():
        out = moe_combine._moe_combine(*args)
        grad_rows, grad_weights, grad_bias = moe_combine._moe_combine_bwd(*bwd_args)
        return max(rel(out, ref), rel(grad_rows, leaves[0].grad), rel(grad_weights, leaves[1].grad),
                   rel(grad_bias, leaves[2].grad))

    def set_tile(block):
        moe_combine._combine_blocks = lambda interpreting: block

    mb = rows.numel() * 2 / 1e6
    return set_tile, [("forward", lambda: moe_combine._moe_combine(*args), 2 * mb),
                      ("backward", lambda: moe_combine._moe_combine_bwd(*bwd_args), 3 * mb)], check


def token_grad_case(a):
    plan = routed_plan(a).plan
    grad_rows = torch.randn(plan.token_of_slot.numel(), a.dim, device="cuda", dtype=torch.bfloat16)
    grad_logits = torch.randn(a.tokens, a.experts, device="cuda")
    weight = torch.randn(a.experts, a.dim, device="cuda", dtype=torch.bfloat16)
    ref = grad_rows.float()[plan.slot_of[:, 0]] + grad_logits.to(torch.bfloat16).float() @ weight.float()

    def run():
        return moe_routing._token_grad(grad_rows, plan.slot_of, None, grad_logits, weight, torch.bfloat16, True)

    def set_tile(block):
        moe_routing.TOKEN_GRAD_BLOCKS_CUDA = block

    return set_tile, [("backward", run, 2 * grad_rows.numel() * 2 / 1e6)], lambda: rel(run(), ref)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_moe_shape_args(p)
    p.add_argument("--kernels", default=",".join(KERNELS))
    p.add_argument("--out", default="tune_moe_kernels.json")
    a = p.parse_args()
    tables = {"bias_act": moe_expert_ffn._bias_blocks(False), "combine": moe_combine._combine_blocks(False),
              "token_grad": moe_routing.TOKEN_GRAD_BLOCKS_CUDA}
    print(f"{device_name('cuda')}, torch {torch.__version__}; current tiles (rows, features, warps) {tables}")
    report = {"device": device_name("cuda"), "config": vars(a), "current": tables, "rows": []}
    cases = {"bias_act": bias_act_case, "combine": combine_case, "token_grad": token_grad_case}
    for kernel in a.kernels.split(","):
        set_tile, directions, check = cases[kernel](a)
        print(f"\n{kernel}: " + ", ".join(f"{d} moves {mb:.0f} MB" for d, _, mb in directions)
              + "; every configuration within 1e-2 of the torch composition before it is timed")
        print("| rows | features | warps | " + " | ".join(f"{d} µs | GB/s" for d, _, _ in directions) + " |")
        print("| --- | --- | --- | " + " | ".join("--- | ---" for _ in directions) + " |")
        for block in CONFIGS:
            set_tile(block)
            err = check()
            if err > 1e-2:
                raise SystemExit(f"{kernel} {block}: disagrees with torch, rel error {err:.2e}")
            times = {d: bench_us(fn) for d, fn, _ in directions}
            report["rows"].append({"kernel": kernel, "block": block, "err": err, **{f"{d}_us": t for d, t in
                                                                                     times.items()}})
            mark = " (table)" if tuple(block) == tuple(tables[kernel]) else ""
            print(f"| {block[0]} | {block[1]} | {block[2]}{mark} | "
                  + " | ".join(f"{times[d]:.1f} | {mb / times[d] * 1e3:.0f}" for d, _, mb in directions) + " |")
        set_tile(tables[kernel])
        # The same table tile through do_bench (one call enqueued at a time): where it reads higher, the host's
        # launches, not the kernels, set do_bench's figure.
        direct = {d: 1e3 * triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")
                  for d, fn, _ in directions}
        report["rows"].append({"kernel": kernel, "block": tables[kernel], "timing": "do_bench",
                               **{f"{d}_us": t for d, t in direct.items()}})
        print("table tile through do_bench: " + ", ".join(f"{d} {t:.1f} µs" for d, t in direct.items()))
    write_json(a.out, report)


if __name__ == "__main__":
    main()
