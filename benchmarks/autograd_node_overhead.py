"""What one Python autograd node costs the host in a CUDA backward, apart from the work in it.

    python benchmarks/autograd_node_overhead.py [--device cuda]

Times (GPU asleep, so nothing waits for it) the backward of a chain of N plain autograd.Functions, each launching
K small kernels in its backward, against one Function launching N * K, and the same N * K launches called directly.
On CUDA the engine runs a backward on its own device thread: the difference between the rows is what a node (and
the hand-off to that thread) costs, which decides whether fusing a layer's nodes into one pays on a slow host.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


class Launches(torch.autograd.Function):
    """Identity forward; backward launches `k` small elementwise kernels (x * 1.0, chained) before passing the
    gradient on."""

    @staticmethod
    def forward(ctx, x, k):
        ctx.k = k
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        for _ in range(ctx.k):
            grad = grad * 1.0
        return grad, None


def backward_us(x: torch.Tensor, nodes: int, k: int, runs: int) -> float:
    """Median host µs of one backward through `nodes` chained Launches nodes of `k` kernels each."""
    times = []
    for _ in range(runs):
        y = x
        for _ in range(nodes):
            y = Launches.apply(y, k)
        if x.is_cuda:
            torch.cuda.synchronize()
            torch.cuda._sleep(50_000_000)
        t0 = time.perf_counter()
        y.backward(torch.ones_like(y))
        times.append(1e6 * (time.perf_counter() - t0))
        if x.is_cuda:
            torch.cuda.synchronize()
    return statistics.median(times)


def direct_us(x: torch.Tensor, launches: int, runs: int) -> float:
    times = []
    for _ in range(runs):
        if x.is_cuda:
            torch.cuda.synchronize()
            torch.cuda._sleep(50_000_000)
        t0 = time.perf_counter()
        g = x
        for _ in range(launches):
            g = g * 1.0
        times.append(1e6 * (time.perf_counter() - t0))
    if x.is_cuda:
        torch.cuda.synchronize()
    return statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--runs", type=int, default=25)
    a = p.parse_args()
    x = torch.randn(64, device=a.device, requires_grad=True)
    for nodes, k in ((1, 0), (1, 1), (3, 0), (3, 10), (1, 30), (10, 3)):
        backward_us(x, nodes, k, 3)  # warm-up
    print(f"device {torch.cuda.get_device_name() if x.is_cuda else 'cpu'}, torch {torch.__version__}; host µs, "
          f"median of {a.runs}")
    print("| backward | µs |")
    print("| --- | --- |")
    for nodes, k in ((1, 0), (3, 0), (10, 0), (1, 30), (3, 10), (10, 3)):
        print(f"| {nodes} node(s) x {k} kernels | {backward_us(x, nodes, k, a.runs):.0f} |")
    print(f"| 30 kernels called directly | {direct_us(x, 30, a.runs):.0f} |")


if __name__ == "__main__":
    main()
