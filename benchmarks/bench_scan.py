"""Selective-scan benchmark: every backend, forward and forward+backward, median times, speed-up over "ref".

CPU (default):   python benchmarks/bench_scan.py
GPU (TARGETS.md shapes, bf16, with the byte floor and mamba-ssm when importable):
                 python benchmarks/bench_scan.py --device cuda --preset targets

Correctness is checked against the float64 reference on fresh random inputs before any time is printed.
Prints a table; writes JSON to benchmarks/results/scan_<device>.json.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import device_name, median_ms, write_json  # noqa: E402

from mamba_r1.ops import selective_scan  # noqa: E402
from mamba_r1.ops.selective_scan.ref import selective_scan_ref_float64  # noqa: E402

PRESETS = {
    # (batch, dim, seqlen, d_state)
    "cpu": [(2, 256, 1024, 16), (1, 128, 4096, 16), (4, 512, 256, 16)],
    "targets": [(8, 2048, 2048, 16), (1, 2048, 65536, 16), (2, 4096, 8192, 16), (8, 1024, 2048, 64),
                (4, 1024, 8192, 64)],
}
# TARGETS.md, mamba-ssm CUDA fwd / fwd+bwd on the lent H100 (ms), for the ratio column when mamba-ssm is absent.
MAMBA_SSM_H100 = {(8, 2048, 2048, 16): (0.594, 3.04), (1, 2048, 65536, 16): (3.02, 14.6),
                  (2, 4096, 8192, 16): (1.44, 6.37), (8, 1024, 2048, 64): (1.01, 5.77),
                  (4, 1024, 8192, 64): (2.37, 12.1)}


def make_inputs(shape, dtype, device, requires_grad=False):
    """Mamba-like inputs: dt = softplus(delta + bias) log-uniform in [1e-3, 1e-1], A = -(1..d_state), z gating."""
    batch, dim, seqlen, d_state = shape
    dt_init = torch.exp(torch.rand(dim, device=device) * (math.log(0.1) - math.log(1e-3)) + math.log(1e-3))
    args = dict(
        u=torch.randn(batch, dim, seqlen, device=device, dtype=dtype),
        delta=0.5 * torch.randn(batch, dim, seqlen, device=device, dtype=dtype),
        A=-torch.arange(1, d_state + 1, device=device, dtype=torch.float32).repeat(dim, 1),
        B=torch.randn(batch, d_state, seqlen, device=device, dtype=dtype),
        C=torch.randn(batch, d_state, seqlen, device=device, dtype=dtype),
        D=torch.ones(dim, device=device),
        z=torch.randn(batch, dim, seqlen, device=device, dtype=dtype),
        delta_bias=dt_init + torch.log(-torch.expm1(-dt_init)),
    )
    if requires_grad:
        for t in args.values():
            t.requires_grad_(True)
    return args


def byte_floor_ms(shape, dtype, bandwidth_gbs, backward):
    """Every tensor read or written once; float32 parameters (A, D, delta_bias) are negligible.

    Forward: u, delta, z, B, C in, out written. Forward+backward adds: dout, u, delta, z, B, C read again and du,
    ddelta, dz, dB, dC written (the states themselves are recomputed, never stored).
    """
    batch, dim, seqlen, d_state = shape
    el = torch.tensor([], dtype=dtype).element_size()
    per_channel, per_state = (11, 6) if backward else (4, 2)
    io = per_channel * batch * dim * seqlen + per_state * batch * d_state * seqlen
    return io * el / (bandwidth_gbs * 1e9) * 1e3


def copy_bandwidth_gbs() -> float:
    """Device-to-device copy of 1 GiB, counting bytes read and written: what a memory-bound kernel can reach."""
    src = torch.empty(2**30, dtype=torch.uint8, device="cuda").random_()
    dst = torch.empty_like(src)
    ms = median_ms(lambda: dst.copy_(src), "cuda")
    return 2 * src.numel() / (ms * 1e-3) / 1e9


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def check(backend, shape, dtype, device):
    """Forward and gradients of the backend against the float64 reference on fresh inputs; returns the errors."""
    small = (min(shape[0], 2), min(shape[1], 256), min(shape[2], 1024), shape[3])
    args = make_inputs(small, dtype, device, requires_grad=True)
    out = selective_scan(**args, delta_softplus=True, backend=backend)
    g = torch.randn_like(out, dtype=torch.float32)
    (out.float() * g).sum().backward()
    got = {k: t.grad.clone() for k, t in args.items()}
    ref_args = {k: t.detach().double().requires_grad_(True) for k, t in args.items()}
    ref = selective_scan_ref_float64(**ref_args, delta_softplus=True)
    (ref * g.double()).sum().backward()
    fwd = rel_err(out, ref)
    bwd = max(rel_err(got[k], ref_args[k].grad) for k in got)
    return fwd, bwd


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--preset", choices=sorted(PRESETS), default=None)
    p.add_argument("--shapes", default=None, help="batch,dim,seqlen,d_state[;...]: overrides the preset")
    p.add_argument("--backends", default=None, help="comma-separated; default: ref,torch on CPU, triton on CUDA")
    p.add_argument("--dtype", default=None, help="float32 or bfloat16 (default: float32 on CPU, bfloat16 on CUDA)")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--no-backward", action="store_true")
    p.add_argument("--bandwidth", type=float, default=None,
                   help="GB/s for the byte floor (default on CUDA: a device-to-device copy measured in this run)")
    p.add_argument("--out", default=None)
    a = p.parse_args()

    cuda = a.device == "cuda"
    preset = a.preset or ("targets" if cuda else "cpu")
    dtype = getattr(torch, a.dtype or ("bfloat16" if cuda else "float32"))
    backends = (a.backends or ("triton" if cuda else "ref,torch")).split(",")
    def measure(fn):
        return median_ms(fn, a.device, a.reps)

    try:
        from mamba_ssm.ops.selective_scan_interface import selective_scan_fn  # optional anchor
    except ImportError:
        selective_scan_fn = None

    if cuda and a.bandwidth is None:
        a.bandwidth = copy_bandwidth_gbs()
        print(f"device-to-device copy: {a.bandwidth:.0f} GB/s (bytes read + written), used for the byte floor")
    rows = []
    shapes = ([tuple(int(v) for v in sh.split(",")) for sh in a.shapes.split(";")] if a.shapes
              else PRESETS[preset])
    for shape in shapes:
        for backend in backends + (["mamba_ssm"] if cuda and selective_scan_fn else []):
            if backend == "ref" and cuda and shape[2] > 8192:
                continue  # minutes per call; TARGETS.md already records the reference's time
            if backend == "mamba_ssm":
                def fn(**kw):
                    return selective_scan_fn(kw["u"], kw["delta"], kw["A"], kw["B"], kw["C"], kw["D"], kw["z"],
                                             kw["delta_bias"], delta_softplus=True)
                fwd_err = bwd_err = float("nan")
            else:
                def fn(backend=backend, **kw):
                    return selective_scan(**kw, delta_softplus=True, backend=backend)
                fwd_err, bwd_err = check(backend, shape, dtype, a.device)
            args = make_inputs(shape, dtype, a.device)
            with torch.no_grad():
                t_fwd = measure(lambda: fn(**args))
            t_bwd = float("nan")
            if not a.no_backward:
                gargs = make_inputs(shape, dtype, a.device, requires_grad=True)
                dout = torch.randn(shape[0], shape[1], shape[2], device=a.device, dtype=dtype)

                def fwd_bwd():
                    out = fn(**gargs)
                    torch.autograd.grad(out, list(gargs.values()), dout)

                t_bwd = measure(fwd_bwd)
            rows.append(dict(shape=list(shape), backend=backend, dtype=str(dtype).replace("torch.", ""),
                             fwd_ms=t_fwd, fwd_bwd_ms=t_bwd, fwd_err=fwd_err, grad_err=bwd_err))
            args = gargs = None  # free the inputs before the next shape
            if cuda:
                torch.cuda.empty_cache()

    for r in rows:  # speed-ups over the reference of the same shape, and the anchors on CUDA
        same = [x for x in rows if x["shape"] == r["shape"] and x["backend"] == "ref"]
        r["speedup_fwd"] = same[0]["fwd_ms"] / r["fwd_ms"] if same else float("nan")
        r["speedup_fwd_bwd"] = same[0]["fwd_bwd_ms"] / r["fwd_bwd_ms"] if same else float("nan")
        if cuda:
            shape = tuple(r["shape"])
            r["floor_fwd_ms"] = byte_floor_ms(shape, dtype, a.bandwidth, False)
            r["floor_fwd_bwd_ms"] = byte_floor_ms(shape, dtype, a.bandwidth, True)
            anchor = MAMBA_SSM_H100.get(shape)
            r["vs_mamba_ssm_fwd"] = r["fwd_ms"] / anchor[0] if anchor else float("nan")
            r["vs_mamba_ssm_fwd_bwd"] = r["fwd_bwd_ms"] / anchor[1] if anchor else float("nan")

    name = device_name(a.device)
    print(f"\nselective_scan, {name}, {dtype}, torch {torch.__version__}")
    head = f"{'shape (b, d, l, n)':24s} {'backend':9s} {'fwd ms':>9s} {'fwd+bwd ms':>11s} {'x ref fwd':>9s} " \
           f"{'x ref f+b':>9s} {'fwd err':>8s} {'grad err':>8s}"
    if cuda:
        head += f" {'floor f/fb ms':>14s} {'/ mamba-ssm f, fb':>18s}"
    print(head)
    for r in rows:
        line = f"{str(tuple(r['shape'])):24s} {r['backend']:9s} {r['fwd_ms']:9.3f} {r['fwd_bwd_ms']:11.3f} " \
               f"{r['speedup_fwd']:9.1f} {r['speedup_fwd_bwd']:9.1f} {r['fwd_err']:8.1e} {r['grad_err']:8.1e}"
        if cuda:
            line += f" {r['floor_fwd_ms']:6.3f}/{r['floor_fwd_bwd_ms']:6.3f} " \
                    f"{r['vs_mamba_ssm_fwd']:8.2f}, {r['vs_mamba_ssm_fwd_bwd']:7.2f}"
        print(line)
    payload = dict(device=name, torch=torch.__version__, bandwidth_gbs=a.bandwidth, rows=rows)
    write_json(a.out or f"scan_{a.device}.json", payload)

if __name__ == "__main__":
    main()
