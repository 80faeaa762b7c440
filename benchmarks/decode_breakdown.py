"""Where batch-1 generation time goes: generate() at 1 / 2 / 32 / 128 new tokens after a 2,048-token prompt (the
slope is the per-token cost, the intercept the fixed cost), the prefill alone, the cache allocation, the graph lookup
and state load, and the captured step's replay. The 130M pure-Mamba model of bench_decode.py, bf16, CUDA graph.
Checks first that the graphed steps' logits match a full forward (bench_decode.py's check).
    python benchmarks/decode_breakdown.py
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_decode import VOCAB, build, check_steps  # noqa: E402

from mamba_r1.generation import _graphed_step  # noqa: E402


def timed(fn) -> float:
    """ms of one call, synchronised on both sides."""
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) * 1e3


@torch.no_grad()
def main():
    model = build("mamba", 768, "cuda", torch.bfloat16).eval()
    prompt = torch.randint(0, VOCAB, (1, 2048), device="cuda")
    err = check_steps(model, "cuda", cuda_graph=True)
    print(f"graphed decode vs full forward: relative error {err:.1e}")
    if not err <= 5e-2:
        sys.exit("the graphed decode does not match the full forward: not timing it")
    for n in (1, 2, 32, 128, 128):
        ms = timed(lambda: model.generate(prompt, max_new_tokens=n, temperature=0, cuda_graph=True))
        print(f"generate new={n}: {ms:.1f} ms", flush=True)
    cache = model.allocate_cache(1, max_seqlen=2200)
    print(f"prefill {timed(lambda: model(prompt, cache=cache, num_last_tokens=1)):.1f} ms")
    print(f"allocate_cache {timed(lambda: model.allocate_cache(1, max_seqlen=2200)):.2f} ms")
    step = None

    def lookup():
        nonlocal step
        step = _graphed_step(model, cache)

    print(f"_graphed_step lookup + load {timed(lookup):.2f} ms")
    token = torch.zeros(1, dtype=torch.long, device="cuda")

    def replay_and_argmax():
        nonlocal token
        for _ in range(100):
            token = step(token, cache).argmax(-1)

    print(f"replay + argmax {timed(replay_and_argmax) / 100:.3f} ms each")
    print(f"bare replay {timed(lambda: [step.graph.replay() for _ in range(100)]) / 100:.3f} ms each")


if __name__ == "__main__":
    main()
