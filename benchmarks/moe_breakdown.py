"""Where a SwitchMoE training step's time goes, stage by stage: GPU time and host (Python + launch) time.

    python benchmarks/moe_breakdown.py [--backend auto|bmm|grouped_mm] (CUDA; TARGETS.md's shape)

For each stage (router logits, routing + plan, permute, experts, combine, whole forward, whole forward+backward)
and for the dense FFN it enqueues N calls behind a GPU sleep, so the host never waits for the GPU: the host time is
what Python and the launches cost per call, the GPU time (CUDA events around the N calls, which run back to back
once the sleep ends) what the kernels cost. A stage whose host time exceeds its GPU time is launch-bound: in a
loop like bench_moe.py's the GPU idles for the difference. The layer is checked against the per-expert loop first.
Then the host time of each autograd node of the backward, the median of several backwards. (A cProfile cannot see
it: on CUDA the autograd engine runs the backward's Python on its own device thread.)
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from bench_moe import expert_loop, rel_err

from mamba_r1.modules.mlp import MLP
from mamba_r1.modules.moe import SwitchMoE
from mamba_r1.ops import moe_combine, moe_expert_ffn
from mamba_r1.ops.moe_combine import combine
from mamba_r1.ops.moe_dispatch import float32_logits, permute_tokens, resolve_dispatch_backend
from mamba_r1.ops.moe_routing import route_and_plan

CALLS = 20
BACKWARD_RUNS = 7
SLEEP_CYCLES = 400_000_000  # ~0.2 s at H100/H200 clocks: longer than the host needs to enqueue CALLS calls


def host_and_gpu_us(fn) -> tuple[float, float]:
    """(host µs, GPU µs) per call of fn, the calls enqueued while the GPU sleeps."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda._sleep(SLEEP_CYCLES)
    start.record()
    t0 = time.perf_counter()
    for _ in range(CALLS):
        fn()
    host = time.perf_counter() - t0
    end.record()
    torch.cuda.synchronize()
    return 1e6 * host / CALLS, 1e3 * start.elapsed_time(end) / CALLS


def backward_nodes_host_us(step_outputs) -> list[tuple[str, float]]:
    """Host time of each autograd node of one backward (GPU asleep, so no node waits for it): the time from the
    node's pre-hook to its post-hook, in the order the engine ran them."""
    roots, grads = step_outputs()
    seen, stack, nodes = set(), [r.grad_fn for r in roots], []
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        nodes.append(node)
        stack.extend(next_node for next_node, _ in node.next_functions)
    starts, times, handles = {}, [], []
    for node in nodes:
        handles.append(node.register_prehook(lambda grads, node=node: starts.__setitem__(node, time.perf_counter())))
        handles.append(node.register_hook(lambda inputs, outputs, node=node: times.append(
            (node.name(), 1e6 * (time.perf_counter() - starts[node])))))
    torch.cuda.synchronize()
    torch.cuda._sleep(SLEEP_CYCLES)
    torch.autograd.backward(roots, grads)
    torch.cuda.synchronize()
    # The parameters' AccumulateGrad nodes outlive the graph: hooks left on them would run at every later step.
    for handle in handles:
        handle.remove()
    return times


def triton_launch_us() -> dict[str, float]:
    """Host µs of one launch of a trivial Triton kernel with few and with many arguments (GPU asleep)."""
    import triton
    import triton.language as tl

    @triton.jit
    def few(x_ptr, n, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        tl.store(x_ptr + offs, 1.0, mask=offs < n)

    @triton.jit
    def many(x_ptr, a1, a2, a3, a4, a5, a6, a7, a8, a9, a10, a11, a12, a13, a14, a15, a16, a17, a18, a19, n,
             F1: tl.constexpr, F2: tl.constexpr, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        tl.store(x_ptr + offs, 1.0, mask=offs < n)

    x = torch.empty(1024, device="cuda")
    ptrs = [torch.empty(16, device="cuda") for _ in range(10)]
    return {
        "triton kernel, 2 args": host_and_gpu_us(lambda: few[(4,)](x, 1024, BLOCK=256))[0],
        "triton kernel, 20 args (10 tensors)": host_and_gpu_us(
            lambda: many[(4,)](x, *ptrs, *range(1, 10), 1024, F1=True, F2=False, BLOCK=256))[0],
        "torch.empty": host_and_gpu_us(lambda: torch.empty(16, device="cuda"))[0],
        "aten add (16 elements)": host_and_gpu_us(lambda: x[:16] + 1)[0],
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backend", default="auto", choices=["auto", "bmm", "grouped_mm"])
    p.add_argument("--tokens", type=int, default=16384)
    a = p.parse_args()
    factory = dict(device="cuda", dtype=torch.bfloat16)
    torch.manual_seed(0)
    moe = SwitchMoE(1024, num_experts=8, expert_dim=4096, capacity_factor=1.25, backend=a.backend, **factory)
    dense = MLP(1024, 4096, **factory)
    x = torch.randn(a.tokens, 1024, **factory)
    grad = torch.randn_like(x)
    x_grad = x.clone().requires_grad_()

    with torch.no_grad():
        err = rel_err(moe(x), expert_loop(moe, x))
    if err > 1e-2:
        raise SystemExit(f"layer disagrees with the per-expert loop: rel err {err:.2e}")

    capacity, buffer_capacity = moe._capacity(a.tokens, None)
    backend = resolve_dispatch_backend(moe.backend, x, moe.experts.w1, moe.experts.w2,
                                       padded_rows=moe.num_experts * buffer_capacity, assignments=a.tokens)
    layout = "grouped" if backend == "grouped_mm" else "padded"
    with torch.no_grad():
        logits = float32_logits(x, moe.router.weight)
        routed = route_and_plan(logits, 1, capacity, None, "position", layout=layout,
                                buffer_capacity=buffer_capacity, load_balance_coef=moe.load_balance_coef,
                                z_loss_coef=moe.z_loss_coef)
        rows_in = permute_tokens(x, routed.plan)
        rows_out = moe.experts(rows_in, routed.plan, output_bias=False)  # as the layer runs them

    def no_grad(fn):
        def run():
            with torch.no_grad():
                fn()
        return run

    def moe_step():
        out, aux = moe(x_grad, return_aux=True)
        torch.autograd.backward([out, aux.loss], [grad, None])

    def dense_step():
        dense(x_grad).backward(grad)

    stages = [
        ("router logits (float32)", no_grad(lambda: float32_logits(x, moe.router.weight))),
        ("routing + plan + losses", no_grad(lambda: route_and_plan(
            logits, 1, capacity, None, "position", layout=layout, buffer_capacity=buffer_capacity,
            load_balance_coef=moe.load_balance_coef, z_loss_coef=moe.z_loss_coef))),
        ("permute tokens", no_grad(lambda: permute_tokens(x, routed.plan))),
        ("experts (2 matmuls, bias, act)", no_grad(lambda: moe.experts(rows_in, routed.plan, output_bias=False))),
        ("combine (+ output bias)", no_grad(lambda: combine(rows_out, routed.weights, routed.plan,
                                                            bias=moe.experts.b2))),
        ("whole forward", no_grad(lambda: moe(x, return_aux=True))),
        ("whole forward+backward", moe_step),
        ("dense FFN forward", no_grad(lambda: dense(x))),
        ("dense FFN forward+backward", dense_step),
    ]
    print(f"SwitchMoE {a.tokens} tokens, 1024 -> 4096, 8 experts, capacity 1.25, bf16, backend {backend}, "
          f"{torch.cuda.get_device_name()}; layer vs loop {err:.1e}")
    print("| stage | host µs | GPU µs | launch-bound |")
    print("| --- | --- | --- | --- |")
    for name, fn in stages:
        host, gpu = host_and_gpu_us(fn)
        print(f"| {name} | {host:.0f} | {gpu:.0f} | {'yes' if host > gpu else 'no'} |")
        for param in [x_grad, *moe.parameters(), *dense.parameters()]:
            param.grad = None

    def step_outputs():
        out, aux = moe(x_grad, return_aux=True)
        return [out, aux.loss], [grad, None]

    for _ in range(2):
        backward_nodes_host_us(step_outputs)  # warm-up (the hooks are per graph: each call builds a new one)
    # One backward is one sample per node (a garbage-collector pass lands on some node): the median of several.
    runs = [backward_nodes_host_us(step_outputs) for _ in range(BACKWARD_RUNS)]
    times = [(run_nodes[0][0], statistics.median(run[i][1] for run in runs))
             for i, run_nodes in enumerate(zip(*runs))]
    print(f"\nbackward, host µs per autograd node, median of {BACKWARD_RUNS} backwards "
          f"(total {sum(t for _, t in times):.0f}):")
    for name, us in times:
        print(f"  {name:60s} {us:7.0f}")
    # The same backward bodies called directly from the main thread (GPU asleep): against the node times above, what
    # the autograd engine's device thread adds to each.
    plan, ex = routed.plan, moe.experts
    h = torch.randn(rows_out.shape[0], ex.w1.shape[-1], **factory)
    direct = {
        "combine backward body (+ output bias)": lambda: moe_combine._moe_combine_bwd(
            grad, rows_out, routed.weights, plan.token_of_slot, plan.assignment_of_slot, True, ex.b2,
            plan.expert_of_slot, plan.group_ends, 0),
        "combine backward body (no bias)": lambda: moe_combine._moe_combine_bwd(
            grad, rows_out, routed.weights, plan.token_of_slot, plan.assignment_of_slot, True, None, None, None, 0),
        "bias + GELU backward body": lambda: moe_expert_ffn._moe_bias_act_bwd(
            h, h, ex.b1, plan.expert_of_slot, plan.group_ends, "gelu", 0),
        "two torch.mm (router logits' backward)": lambda: (torch.mm(logits.to(x.dtype), moe.router.weight),
                                                           torch.mm(logits.to(x.dtype).t(), x)),
    }
    if plan.group_ends is not None:
        # The first projection's backward: input and weight gradients from the hidden gradient (h stands in).
        direct["two torch._grouped_mm (a projection's backward)"] = lambda: (
            torch._grouped_mm(h, ex.w1.transpose(-2, -1), offs=plan.group_ends),
            torch._grouped_mm(rows_in.t(), h, offs=plan.group_ends))
    print("\nthe same work called directly from the main thread, host µs per call:")
    with torch.no_grad():
        for name, fn in direct.items():
            print(f"  {name:60s} {host_and_gpu_us(fn)[0]:7.0f}")
    print("\nhost µs per launch:")
    for name, us in triton_launch_us().items():
        print(f"  {name:40s} {us:6.1f}")


if __name__ == "__main__":
    main()
