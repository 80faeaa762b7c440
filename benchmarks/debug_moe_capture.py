"""Why does capturing a SwitchMoE training step in a CUDA graph fail now and then? Capture it repeatedly and report.

    python benchmarks/debug_moe_capture.py [--repeat 5] [--mode global|thread_local|relaxed] [--tokens 16384]

In bench_moe.py (H200, 2026-11-30) one of the two dispatch backends failed capture in each of two runs, a different
one each time, with "operation would make the legacy stream depend on a capturing blocking stream", while the
small-shape capture test passed for both. Here each attempt builds a fresh layer, warms a whole training step up on a
side stream, then captures forward and backward into one graph (torch.cuda.graph, the chosen capture_error_mode) and
replays it once against the eager step. A failure prints its traceback; "thread_local" and "relaxed" show whether
the offending call comes from another thread (the autograd engine's) or is an unsafe call at all.

Answer (H200, 2026-11-30, fourth session): here all 12 captures succeeded (3 per backend and mode); the failures were
bench_moe.py's own: its reference output kept an autograd graph holding the auto backend's parameters'
AccumulateGrad nodes (default stream) alive during the capture. Fixed there; this script stays as the check.
"""

from __future__ import annotations

import argparse
import traceback

import torch

from mamba_r1.modules.moe import SwitchMoE


def attempt(backend: str, tokens: int, mode: str) -> str:
    torch.manual_seed(0)
    moe = SwitchMoE(1024, num_experts=8, expert_dim=4096, capacity_factor=1.25, backend=backend, device="cuda",
                    dtype=torch.bfloat16)
    x = torch.randn(tokens, 1024, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    grad = torch.randn_like(x)

    def step():
        out, aux = moe(x, return_aux=True)
        torch.autograd.backward([out, aux.loss], [grad, None])
        return out

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            step()
    torch.cuda.current_stream().wait_stream(side)
    want = x.grad.clone() / 3
    for p in [x, *moe.parameters()]:
        p.grad = None  # allocated inside the graph's pool during capture
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph, capture_error_mode=mode):
            out = step()
    except Exception:  # noqa: BLE001 - report whatever the capture raised
        return "FAILED\n" + traceback.format_exc()
    graph.replay()
    torch.cuda.synchronize()
    err = ((x.grad.float() - want.float()).norm() / want.float().norm()).item()
    return f"ok (replayed input gradient vs eager: rel err {err:.1e}; output finite: {bool(out.isfinite().all())})"


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--mode", default="global", choices=["global", "thread_local", "relaxed"])
    p.add_argument("--tokens", type=int, default=16384)
    a = p.parse_args()
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, capture_error_mode={a.mode}, "
          f"{a.tokens} tokens")
    for backend in ("bmm", "grouped_mm"):
        for i in range(a.repeat):
            print(f"{backend} attempt {i}: {attempt(backend, a.tokens, a.mode)}", flush=True)


if __name__ == "__main__":
    main()
