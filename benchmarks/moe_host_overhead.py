"""The host side of a SwitchMoE training step on the CPU: its Python and dispatch cost with the Triton kernels stubbed
out, through the eager path (plain autograd.Functions), through the custom ops (what torch.compile traces) and
under torch.compile itself (aot_eager).

    TRITON_INTERPRET=1 OMP_NUM_THREADS=1 python benchmarks/moe_host_overhead.py

On the lent GPU host the layer was host-bound (benchmarks/moe_breakdown.py); this measures the part of that cost
that is this library's Python, on any machine, without a GPU. The kernels' launchers are replaced by no-ops and
torch.empty by torch.zeros (the stubbed routing kernel would otherwise leave garbage indices), so the timings are
the Python, the dispatcher and autograd around kernels that do nothing, plus the CPU aten ops (index_select, bmm on
a tiny shape: 256 tokens, 64 -> 128, 8 experts). Prints forward and forward+backward per step (best of 7 x 100
steps) per backend and path, and the median host time of each backward autograd node.
"""

from __future__ import annotations

import os
import statistics
import sys
import time
from pathlib import Path

import torch

if os.environ.get("TRITON_INTERPRET") != "1":
    raise SystemExit("set TRITON_INTERPRET=1 before running (the kernels' modules are imported for the interpreter)")

import mamba_r1.ops.moe_combine as moe_combine  # noqa: E402
import mamba_r1.ops.moe_expert_ffn as moe_expert_ffn  # noqa: E402
import mamba_r1.ops.moe_routing as moe_routing  # noqa: E402
from mamba_r1.modules.moe import SwitchMoE  # noqa: E402
from mamba_r1.ops import eager_custom_ops  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from common import best_host_us, stub_kernel_launches  # noqa: E402


def stub_kernels() -> None:
    stub_kernel_launches(moe_routing, moe_combine, moe_expert_ffn)
    for module in (moe_routing, moe_combine, moe_expert_ffn):
        module._interpreting = lambda: True
        module.resolve_backend = lambda op, backend, device: "triton"
    moe_routing.resolve_routing_backend = lambda backend, logits, priority: "triton"
    empty, zeros = torch.empty, torch.zeros
    inside = [False]

    def empty_as_zeros(*args, **kwargs):
        # Under torch.compile's fake tensors zeros decomposes into torch.empty: that inner call gets the real one.
        if inside[0]:
            return empty(*args, **kwargs)
        inside[0] = True
        try:
            return zeros(*args, **kwargs)
        finally:
            inside[0] = False

    torch.empty = empty_as_zeros


def backward_nodes_us(step_outputs, runs: int = 50) -> dict[str, float]:
    """Median host µs of each backward node (pre-hook to post-hook), by node name."""
    samples: dict[str, list[float]] = {}
    for _ in range(runs):
        roots, grads = step_outputs()
        seen, stack, starts, handles = set(), [r.grad_fn for r in roots], {}, []
        while stack:
            node = stack.pop()
            if node is None or node in seen:
                continue
            seen.add(node)
            handles.append(node.register_prehook(lambda g, node=node: starts.__setitem__(node, time.perf_counter())))
            handles.append(node.register_hook(lambda i, o, node=node: samples.setdefault(node.name(), []).append(
                1e6 * (time.perf_counter() - starts[node]))))
            stack.extend(n for n, _ in node.next_functions)
        torch.autograd.backward(roots, grads)
        # The parameters' AccumulateGrad nodes outlive the graph: hooks left on them would run at every later step.
        for handle in handles:
            handle.remove()
    return {name: statistics.median(ts) for name, ts in samples.items()}


def main() -> None:
    stub_kernels()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; host µs per training step, kernels stubbed")
    print("| backend | path | forward | forward+backward |")
    print("| --- | --- | --- | --- |")
    nodes = {}
    tracing = eager_custom_ops.tracing
    for backend in ("grouped_mm", "bmm"):
        torch.manual_seed(0)
        moe = SwitchMoE(64, num_experts=8, expert_dim=128, capacity_factor=1.25, backend=backend)
        x = torch.randn(256, 64, requires_grad=True)
        grad = torch.randn(256, 64)

        def steps(layer):
            """(forward under no_grad, forward + backward) of `layer`: the module or its compiled form."""
            def forward():
                with torch.no_grad():
                    layer(x, return_aux=True)

            def step():
                out, aux = layer(x, return_aux=True)
                torch.autograd.backward([out, aux.loss], [grad, None])
            return forward, step

        forward, step = steps(moe)

        def step_outputs():
            out, aux = moe(x, return_aux=True)
            return [out, aux.loss], [grad, None]

        for path in ("custom ops", "eager Functions"):
            # "custom ops": the layer op (or the staged custom ops) called through the dispatcher with their
            # registered autograd, as torch.compile's graph calls them. "eager Functions": the layer's eager path,
            # the ops' bodies under a plain autograd.Function.
            ops = path == "custom ops"
            eager_custom_ops.tracing = (lambda: True) if ops else tracing
            print(f"| {backend} | {path} | {best_host_us(forward):.0f} | {best_host_us(step):.0f} |", flush=True)
            nodes[(backend, path)] = backward_nodes_us(step_outputs)
        eager_custom_ops.tracing = tracing
        # torch.compile(fullgraph) with aot_eager: dynamo's guards and AOT autograd's runtime wrappers around the same
        # custom ops, without inductor's code generation (which needs a compiler for the CPU glue).
        compiled_forward, compiled_step = steps(torch.compile(moe, fullgraph=True, backend="aot_eager"))
        print(f"| {backend} | torch.compile (aot_eager) | {best_host_us(compiled_forward):.0f} | "
              f"{best_host_us(compiled_step):.0f} |", flush=True)
    eager_custom_ops.tracing = tracing
    print("\nbackward, median host µs per autograd node")
    for (backend, path), times in nodes.items():
        print(f"  {backend}, {path}: " + ", ".join(f"{name.replace('GeneratedBackwardFor_mamba_r1_', '')} {us:.0f}"
                                                 for name, us in sorted(times.items())))


if __name__ == "__main__":
    main()
