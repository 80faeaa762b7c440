"""Helpers shared by the benchmark scripts: timing (CUDA events via triton's do_bench, or wall-clock medians on CPU),
JSON output and an optional plot."""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).parent / "results"


def median_ms(fn, device: str, reps: int = 10) -> float:
    """Median time of fn() in milliseconds: triton.testing.do_bench (CUDA events) on GPU, perf_counter on CPU."""
    if device == "cuda":
        import triton.testing

        return triton.testing.do_bench(fn, warmup=25, rep=max(100, 10 * reps), return_mode="median")
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


QUEUE_SLEEP_CYCLES = 400_000_000  # ~0.2 s at H100/H200 clocks: longer than the host needs to enqueue the calls


def queued_gpu_us(fn, reps: int = 25, flush_mb: int = 256) -> float:
    """Median GPU time of fn() in µs with the host out of the picture: every call (each after an L2 flush, like
    do_bench's) is enqueued while the GPU sleeps, and CUDA events around each call time only its kernels. do_bench
    enqueues one call at a time, so a call whose launches take longer on the host than its kernels on the GPU (a
    few small launches on a slow host) is timed at its host cost instead. fn runs once untimed first (compilation)."""
    flush = torch.empty(flush_mb * 2**20, dtype=torch.int8, device="cuda")
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
    fn()
    torch.cuda.synchronize()
    torch.cuda._sleep(QUEUE_SLEEP_CYCLES)
    for start, end in events:
        flush.zero_()
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize()
    return 1e3 * statistics.median(start.elapsed_time(end) for start, end in events)


def stub_kernel_launches(*modules) -> None:
    """Replace every ``_..._kernel`` Triton kernel of these modules by a launch that does nothing (host-overhead
    measurements: the Python, dispatch and autograd around kernels, without running them)."""

    class NoLaunch:
        def __getitem__(self, grid):
            return lambda *args, **kwargs: None

    for module in modules:
        for name in dir(module):
            if name.startswith("_") and name.endswith("_kernel"):
                setattr(module, name, NoLaunch())


def best_host_us(fn, reps: int = 7, calls: int = 100) -> float:
    """Best of ``reps`` wall-clock means over ``calls`` calls of fn(), in microseconds (after 20 warm-up calls)."""
    for _ in range(20):
        fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        times.append((time.perf_counter() - t0) / calls * 1e6)
    return min(times)


def add_moe_shape_args(parser) -> None:
    """--tokens, --dim, --expert-dim, --experts, defaulting to TARGETS.md's SwitchMoE shape."""
    parser.add_argument("--tokens", type=int, default=16384)
    parser.add_argument("--dim", type=int, default=1024)
    parser.add_argument("--expert-dim", type=int, default=4096)
    parser.add_argument("--experts", type=int, default=8)


def device_name(device: str) -> str:
    return torch.cuda.get_device_name() if device == "cuda" else f"CPU ({torch.get_num_threads()} threads)"


def write_json(name: str | Path, payload: dict) -> Path:
    """Write payload to benchmarks/results/<name>, or to <name> itself when it is a path with a folder."""
    path = Path(name) if Path(name).parent != Path(".") else RESULTS / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=1))
    print(f"wrote {path}")
    return path


def plot(name: str, series: dict[str, tuple[list, list]], xlabel: str, ylabel: str, title: str, logx=False):
    """Save a PNG when matplotlib is installed (it is not a dependency of the library)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot")
        return None
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, (xs, ys) in series.items():
        ax.plot(xs, ys, marker="o", label=label)
    if logx:
        ax.set_xscale("log", base=2)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / name
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")
    return path
