"""Causal depthwise conv1d + SiLU (MambaBlock's conv): the fused Triton op vs cuDNN's F.conv1d + F.silu.

Input as MambaBlock makes it: x a channel slice of in_proj's (batch, 2 * dim, seqlen) output, bf16, width 4.
Checks both against the float64 reference first, then times forward and forward+backward; with --sweep it also tries
the block sizes (channels x time steps x warps per program) of each kernel in turn, the forward, backward pass 1
(dpre and the weight/bias partials) and pass 2 (dx), the others staying at the module's table, and both dtypes of
the dpre buffer between the passes. Every configuration is checked for correctness before it is timed.
    python benchmarks/bench_conv.py [--sweep]
"""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
from common import device_name, median_ms, write_json  # noqa: E402

from mamba_r1.ops import causal_conv1d  # noqa: E402

conv_module = importlib.import_module("mamba_r1.ops.causal_conv1d")
TILES = [(8, 128, 4), (4, 256, 4), (16, 128, 4), (4, 512, 4), (8, 256, 8), (2, 512, 4), (2, 1024, 8), (1, 1024, 4)]
# kernel -> the module constants holding its (BLOCK_D, BLOCK_L, num_warps) on CUDA, and the tiles to try.
SWEEP = {
    "fwd": (("FWD_BLOCK_D_CUDA", "FWD_BLOCK_L_CUDA", "FWD_WARPS_CUDA"), TILES),
    "bwd_dpre": (("BWD_DPRE_BLOCK_D_CUDA", "BWD_DPRE_BLOCK_L_CUDA", "BWD_DPRE_WARPS_CUDA"), TILES),
    "bwd_dx": (("BWD_DX_BLOCK_D_CUDA", "BWD_DX_BLOCK_L_CUDA", "BWD_DX_WARPS_CUDA"), TILES),
}


def sweep_configs():
    """(label, {module constant: value}) rows: the table, then one kernel's tile or the dpre dtype changed at a time."""
    yield "table", {}
    for kernel, (names, tiles) in SWEEP.items():
        for tile in tiles:
            yield f"{kernel} {tile}", dict(zip(names, tile))
    yield "dpre in x's dtype", {"BWD_DPRE_FLOAT32": False}


def cudnn(x, w, b):
    return F.silu(F.conv1d(x, w[:, None], b, padding=w.shape[1] - 1, groups=x.shape[1])[..., :x.shape[2]])


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="8,2048,2048,4", help="batch,dim,seqlen,width")
    p.add_argument("--sweep", action="store_true")
    p.add_argument("--device", default="cuda", help="cuda; cpu only as a smoke test (TRITON_INTERPRET=1, float32)")
    a = p.parse_args()
    batch, dim, seqlen, width = (int(v) for v in a.shape.split(","))
    dev = a.device
    dtype = torch.bfloat16 if dev == "cuda" else torch.float32
    wide = torch.randn(batch, 2 * dim, seqlen, device=dev, dtype=dtype)
    x_slice = wide[:, :dim]  # what the block passes: a strided view
    w = (torch.randn(dim, width, device=dev) / width).to(dtype).requires_grad_(True)
    b = torch.randn(dim, device=dev).to(dtype).requires_grad_(True)
    dout = torch.randn(batch, dim, seqlen, device=dev, dtype=dtype)

    # Correctness on a small slice (2 x 64 x 300) against the float64 reference.
    pieces = (x_slice[:2, :64, :300].detach(), w.detach()[:64], b.detach()[:64])
    small = [t.double().requires_grad_(True) for t in pieces]
    ref = cudnn(*small)
    ref_grads = torch.autograd.grad(ref, small, dout[:2, :64, :300].double())
    got_in = [t.clone().requires_grad_(True) for t in pieces]

    def check():
        got = causal_conv1d(*got_in, silu=True, backend="triton")
        grads = torch.autograd.grad(got, got_in, dout[:2, :64, :300])
        return rel_err(got, ref), max(rel_err(g, r) for g, r in zip(grads, ref_grads))

    def timings(fn, inp):
        with torch.no_grad():
            t_fwd = median_ms(lambda: fn(inp, w, b), dev)
        x_g = inp.detach().requires_grad_(True)

        def fwd_bwd():
            torch.autograd.grad(fn(x_g, w, b), [x_g, w, b], dout)
        return t_fwd, median_ms(fwd_bwd, dev)

    def fused(inp, w_, b_):
        return causal_conv1d(inp, w_, b_, silu=True, backend="triton")

    rows = []
    configs = sweep_configs() if a.sweep else [("table", {})]
    for label, cfg in configs:
        table = {name: getattr(conv_module, name) for name in cfg}
        for name, value in cfg.items():
            setattr(conv_module, name, value)
        try:
            fwd_err, grad_err = check()
            t = timings(fused, x_slice) if max(fwd_err, grad_err) < 1e-2 else (float("nan"), float("nan"))
        finally:
            for name, value in table.items():
                setattr(conv_module, name, value)
        rows.append(dict(impl=f"triton {label}", fwd_ms=t[0], fwd_bwd_ms=t[1], fwd_err=fwd_err, grad_err=grad_err))
        print(rows[-1], flush=True)
    t = timings(cudnn, x_slice)
    rows.append(dict(impl="cuDNN F.conv1d + F.silu", fwd_ms=t[0], fwd_bwd_ms=t[1]))
    print(f"\ncausal conv1d + SiLU, {batch} x {dim} x {seqlen}, width {width}, {dtype}, {device_name(dev)}")
    print(f"{'implementation':32s} {'fwd ms':>8s} {'fwd+bwd ms':>11s}")
    for r in rows:
        print(f"{r['impl']:32s} {r['fwd_ms']:8.3f} {r['fwd_bwd_ms']:11.3f}")
    write_json(f"conv_{dev}.json", dict(device=device_name(dev), shape=[batch, dim, seqlen, width], rows=rows))


if __name__ == "__main__":
    main()
