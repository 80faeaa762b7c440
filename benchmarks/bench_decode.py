"""Decoding: time per token vs position (O(1) check) and generation throughput at batch 1 / 64.

Models (random weights, bf16 on GPU): a pure-Mamba stack the size of mamba-ssm's MambaLMHeadModel 130M (d_model 768,
24 layers, no FFN), the same with Switch MoE FFNs, and an attention-only model with a KV cache (768, 12 layers,
SDPA, dense MLP), all built from this library. TARGETS.md: mamba-ssm 130M with CUDA graphs 1,176 tok/s (batch 1),
32,788 tok/s (batch 64); transformers Llama 162M 94 / 4,260 tok/s.
    python benchmarks/bench_decode.py --device cuda
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import device_name, plot, write_json  # noqa: E402

from mamba_r1 import create_mamba_moe  # noqa: E402

VOCAB = 50280


def build(kind, dim, device, dtype):
    common = dict(dim=dim, d_conv=4, expand=2, vocab_size=VOCAB, device=device, dtype=dtype, eval_capacity_factor=None)
    if kind == "mamba":
        return create_mamba_moe(depth=24, d_state=16, ffn="none", **common)
    if kind == "mamba-moe":
        return create_mamba_moe(depth=24, d_state=16, ffn="moe", num_experts=8, expert_dim=2 * dim, **common)
    return create_mamba_moe(depth=12, d_state=16, ffn="dense", expert_dim=4 * dim, attn_every=1,
                            num_heads=max(1, dim // 64), **common)


def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


@torch.no_grad()
def check_steps(model, device, cuda_graph=False, prompt=48, steps=16) -> float:
    """Relative error of decoded logits against one full forward over the same tokens: prefill ``prompt`` tokens,
    then ``steps`` single-token steps (eager, or replayed from a CUDA graph)."""
    from mamba_r1.generation import _graphed_step

    generator = torch.Generator(device=device).manual_seed(1)
    tokens = torch.randint(0, VOCAB, (2, prompt + steps), device=device, generator=generator)
    full = model(tokens)[:, prompt:].float()  # (2, steps, vocab)
    cache = model.allocate_cache(2, max_seqlen=prompt + steps + 8)
    model(tokens[:, :prompt], cache=cache)
    step = _graphed_step(model, cache) if cuda_graph else model.step
    got = torch.stack([step(tokens[:, prompt + t], cache).float().clone() for t in range(steps)], dim=1)
    return ((got - full).norm() / full.norm()).item()


@torch.no_grad()
def per_token_ms(model, position, device, steps=32, cuda_graph=False):
    """Prefill `position` tokens into a cache, then time `steps` decode steps alone; returns ms per token."""
    from mamba_r1.generation import _graphed_step

    prompt = torch.randint(0, VOCAB, (1, position), device=device)
    cache = model.allocate_cache(1, max_seqlen=position + steps + 8)
    logits = model(prompt, cache=cache)[:, -1]
    step = _graphed_step(model, cache) if cuda_graph else model.step
    token = logits.argmax(-1)
    for _ in range(3):  # warm-up
        token = step(token, cache).argmax(-1)
    sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        token = step(token, cache).argmax(-1)
    sync(device)
    return (time.perf_counter() - t0) / steps * 1e3


@torch.no_grad()
def throughput(model, batch, prompt_len, new_tokens, device, cuda_graph=False):
    """Generated tokens per second of model.generate (prefill included, as in mamba-ssm's benchmark; a warm-up call
    first, which also captures the CUDA graph that later calls of this batch size reuse), and the prefill's ms."""
    prompt = torch.randint(0, VOCAB, (batch, prompt_len), device=device)
    model.generate(prompt[:, :16], max_new_tokens=4, temperature=0, cuda_graph=cuda_graph)  # warm-up
    sync(device)
    t0 = time.perf_counter()
    out = model.generate(prompt, max_new_tokens=new_tokens, temperature=0, cuda_graph=cuda_graph)
    sync(device)
    seconds = time.perf_counter() - t0
    assert out.shape == (batch, prompt_len + new_tokens)
    cache = model.allocate_cache(batch, max_seqlen=prompt_len + 1)
    t0 = time.perf_counter()
    model(prompt, cache=cache, num_last_tokens=1)  # generate's prefill
    sync(device)
    return batch * new_tokens / seconds, (time.perf_counter() - t0) * 1e3


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dim", type=int, default=None)
    p.add_argument("--positions", default=None)
    p.add_argument("--prompt-len", type=int, default=None)
    p.add_argument("--new-tokens", type=int, default=None)
    p.add_argument("--batches", default=None)
    a = p.parse_args()
    cuda = a.device == "cuda"
    dim = a.dim or (768 if cuda else 64)
    dtype = torch.bfloat16 if cuda else torch.float32
    positions = [int(s) for s in (a.positions or ("100,1000,4000,16000" if cuda else "16,64,256")).split(",")]
    prompt_len, new_tokens = a.prompt_len or (2048 if cuda else 64), a.new_tokens or (128 if cuda else 16)
    batches = [int(s) for s in (a.batches or ("1,64" if cuda else "1,4")).split(",")]
    torch.manual_seed(0)
    models = {k: build(k, dim, a.device, dtype).eval() for k in ("mamba", "mamba-moe", "attention")}
    variants = [(k, False) for k in models] + ([("mamba", True), ("mamba-moe", True)] if cuda else [])

    tolerance = 5e-2 if dtype == torch.bfloat16 else 1e-4
    for kind, graph in variants:
        # With experts, bf16 rounding differences between the parallel forward and the steps flip near-tied routing
        # decisions (a whole expert's output changes): the MoE model's decoding is checked on a float32 copy.
        checked = models[kind] if kind != "mamba-moe" else copy.deepcopy(models[kind]).float()
        err = check_steps(checked, a.device, graph)
        note = " (float32 copy)" if checked is not models[kind] else ""
        print(f"{kind + (' +cuda graph' if graph else ''):26s} decode vs full forward: relative error {err:.1e}{note}")
        if not err <= tolerance:
            sys.exit(f"decode does not match the full forward ({err:.1e} > {tolerance:.0e}): not timing it")

    rows, series = [], {}
    for kind, graph in variants:
        label = kind + (" +cuda graph" if graph else "")
        ms = [per_token_ms(models[kind], pos, a.device, cuda_graph=graph) for pos in positions]
        series[label] = (positions, ms)
        timed = {b: throughput(models[kind], b, prompt_len, new_tokens, a.device, graph) for b in batches}
        rows.append(dict(model=label, params=models[kind].num_parameters(), ms_per_token=dict(zip(positions, ms)),
                         o1_ratio=ms[-1] / ms[0], tokens_per_s={b: t[0] for b, t in timed.items()},
                         prefill_ms={b: t[1] for b, t in timed.items()}))
    print(f"\ndecoding, {dtype}, {device_name(a.device)}; prompt {prompt_len}, {new_tokens} new tokens")
    head = f"{'model':26s} {'params':>8s} " + " ".join(f"{'ms@' + str(p):>9s}" for p in positions)
    head += f" {'last/first':>10s} " + " ".join(f"{'tok/s b' + str(b):>11s}" for b in batches)
    head += " " + " ".join(f"{'prefill b' + str(b):>11s}" for b in batches)
    print(head)
    for r in rows:
        line = f"{r['model']:26s} {r['params'] / 1e6:7.1f}M " + " ".join(
            f"{r['ms_per_token'][p]:9.3f}" for p in positions)
        line += f" {r['o1_ratio']:10.2f} " + " ".join(f"{r['tokens_per_s'][b]:11.0f}" for b in batches)
        line += " " + " ".join(f"{r['prefill_ms'][b]:8.1f} ms" for b in batches)
        print(line)
    write_json(f"decode_{a.device}.json", dict(device=device_name(a.device), dim=dim, dtype=str(dtype),
                                               prompt_len=prompt_len, new_tokens=new_tokens, rows=rows))
    plot(f"decode_{a.device}.png", series, "position", "ms per generated token", "decode cost vs position",
         logx=True)


if __name__ == "__main__":
    main()
