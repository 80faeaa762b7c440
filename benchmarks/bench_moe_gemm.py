"""The six matmuls of a SwitchMoE training step, each as the dense FFN runs it and as torch._grouped_mm runs it, in
both storage layouts of the expert weights: how much of the layer's distance from the dense FFN is the GEMMs.

    python benchmarks/bench_moe_gemm.py [--tokens 16384] [--dim 1024] [--expert-dim 4096] [--experts 8]   (CUDA)

Rows are split among the experts as a balanced random router would split them (a multinomial draw, sorted by
expert). "in,out" is the layer's storage today, w1 (experts, dim, expert_dim): the forward multiplies row-major B;
"out,in" stores each expert's weight as nn.Linear does, (experts, expert_dim, dim), and passes transposed views.
Every grouped product is checked against a per-expert loop of torch.mm first (float32 accumulation on both sides,
so they agree to bf16 rounding); then each is timed (median of triton.testing.do_bench) and its TFLOP/s printed.
"""

from __future__ import annotations

import argparse

import torch
import triton.testing
from common import add_moe_shape_args, device_name, write_json


def balanced_ends(tokens: int, experts: int, device) -> torch.Tensor:
    """(experts,) int32 end row of each expert's segment, as a uniform random router would give."""
    counts = torch.bincount(torch.randint(0, experts, (tokens,)), minlength=experts)
    return torch.cumsum(counts, 0).to(torch.int32).to(device)


def loop_reference(a, b, ends, ragged_k: bool) -> torch.Tensor:
    """The grouped product one expert at a time: a (rows, k) @ b[e] (k, n) per row segment, or with ragged_k
    a (m, rows) @ b (rows, n) per segment of the shared dimension -> (experts, m, n)."""
    starts = torch.cat([ends.new_zeros(1), ends[:-1]]).tolist()
    outs = []
    for e, (s, t) in enumerate(zip(starts, ends.tolist())):
        outs.append(a[:, s:t].float() @ b[s:t].float() if ragged_k else a[s:t].float() @ b[e].float())
    return torch.stack(outs) if ragged_k else torch.cat(outs)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_moe_shape_args(p)
    p.add_argument("--out", default="moe_gemm.json")
    a = p.parse_args()
    dev, bf16 = "cuda", torch.bfloat16
    torch.manual_seed(0)
    T, D, H, E = a.tokens, a.dim, a.expert_dim, a.experts
    ends = balanced_ends(T, E, dev)

    def rand(*shape):
        return torch.randn(*shape, device=dev, dtype=bf16)

    x, h, gy, gh = rand(T, D), rand(T, H), rand(T, D), rand(T, H)  # rows, hidden, and their gradients
    w1_dense, w2_dense = rand(H, D), rand(D, H)  # nn.Linear storage (out, in)
    w1_io, w2_io = rand(E, D, H), rand(E, H, D)  # the layer's storage (in, out)
    w1_oi, w2_oi = w1_io.transpose(1, 2).contiguous(), w2_io.transpose(1, 2).contiguous()  # (out, in)

    def gmm(a_, b_):
        return torch._grouped_mm(a_, b_, offs=ends)

    # (name, dense call, {layout: (grouped call, reference call)}); the reference is the loop over experts.
    cases = [
        ("fwd h = x W1", lambda: x @ w1_dense.t(), {
            "in,out": (lambda: gmm(x, w1_io), lambda: loop_reference(x, w1_io, ends, False)),
            "out,in": (lambda: gmm(x, w1_oi.transpose(1, 2)), lambda: loop_reference(x, w1_io, ends, False))}),
        ("fwd y = h W2", lambda: h @ w2_dense.t(), {
            "in,out": (lambda: gmm(h, w2_io), lambda: loop_reference(h, w2_io, ends, False)),
            "out,in": (lambda: gmm(h, w2_oi.transpose(1, 2)), lambda: loop_reference(h, w2_io, ends, False))}),
        ("bwd dh = dy W2^T", lambda: gy @ w2_dense, {
            "in,out": (lambda: gmm(gy, w2_io.transpose(1, 2)), lambda: loop_reference(gy, w2_oi, ends, False)),
            "out,in": (lambda: gmm(gy, w2_oi), lambda: loop_reference(gy, w2_oi, ends, False))}),
        ("bwd dx = dh W1^T", lambda: gh @ w1_dense, {
            "in,out": (lambda: gmm(gh, w1_io.transpose(1, 2)), lambda: loop_reference(gh, w1_oi, ends, False)),
            "out,in": (lambda: gmm(gh, w1_oi), lambda: loop_reference(gh, w1_oi, ends, False))}),
        ("bwd dW2 = h^T dy", lambda: gy.t() @ h, {
            "in,out": (lambda: gmm(h.t(), gy), lambda: loop_reference(h.t(), gy, ends, True)),
            "out,in": (lambda: gmm(gy.t(), h), lambda: loop_reference(gy.t(), h, ends, True))}),
        ("bwd dW1 = x^T dh", lambda: gh.t() @ x, {
            "in,out": (lambda: gmm(x.t(), gh), lambda: loop_reference(x.t(), gh, ends, True)),
            "out,in": (lambda: gmm(gh.t(), x), lambda: loop_reference(gh.t(), x, ends, True))}),
    ]
    flops = 2 * T * D * H
    report = {"device": device_name(dev), "torch": torch.__version__, "config": vars(a),
              "rows_per_expert": torch.diff(ends, prepend=ends.new_zeros(1)).tolist(), "rows": []}
    for name, _, variants in cases:
        for layout, (fn, ref) in variants.items():
            expected = ref()
            err = ((fn().float() - expected).norm() / expected.norm()).item()
            if err > 1e-2:
                raise SystemExit(f"{name} ({layout}): grouped_mm disagrees with the per-expert loop, rel err {err:.2e}")
    print(f"{report['device']}, torch {torch.__version__}, {T} rows, {D} <-> {H}, {E} experts, bf16; "
          f"rows per expert {report['rows_per_expert']}; all grouped products within 1e-2 of the per-expert loop")
    print("\n| matmul | dense µs | grouped in,out µs | grouped out,in µs | dense TFLOP/s | in,out | out,in |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    totals = {"dense": 0.0, "in,out": 0.0, "out,in": 0.0}
    for name, dense_fn, variants in cases:
        times = {"dense": 1e3 * triton.testing.do_bench(dense_fn, warmup=25, rep=200, return_mode="median")}
        for layout, (fn, _) in variants.items():
            times[layout] = 1e3 * triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median")
        for k in totals:
            totals[k] += times[k]
        report["rows"].append({"matmul": name, **{f"{k}_us": v for k, v in times.items()}})
        tf = {k: flops / (v * 1e-6) / 1e12 for k, v in times.items()}
        print(f"| {name} | {times['dense']:.1f} | {times['in,out']:.1f} | {times['out,in']:.1f} | "
              f"{tf['dense']:.0f} | {tf['in,out']:.0f} | {tf['out,in']:.0f} |")
    print(f"| all six | {totals['dense']:.1f} | {totals['in,out']:.1f} | {totals['out,in']:.1f} | | | |")
    report["totals_us"] = totals
    write_json(a.out, report)


if __name__ == "__main__":
    main()
