"""Registers, spills (stack bytes) and shared memory of the Triton scan kernels, compiled for a GPU without one.

Triton compiles for a named target (here sm_90, Hopper) on any machine: ptxas ships with it. Register pressure decides
occupancy and spills, which is most of what can be learned about these kernels before a GPU run, and costs no device
time. The versions differ from the lent machine's (its Triton may be older), so treat the figures as close, not exact.
    python benchmarks/kernel_resources.py [--arch 90]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

sys.path.insert(0, str(Path(__file__).parent))
from tune_scan import BWD, FWD  # noqa: E402

from mamba_r1.ops.selective_scan import triton_bwd, triton_fwd  # noqa: E402

# Activations in bf16 (as in training), parameters, states and gradient partials in float32.
BF16_POINTERS = {"u_ptr", "delta_ptr", "B_ptr", "C_ptr", "z_ptr", "out_ptr", "dout_ptr", "du_ptr", "ddelta_ptr",
                 "dz_ptr"}
CUOBJDUMP = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"


def signature(kernel) -> dict[str, str]:
    sig = {}
    for param in kernel.params:
        if param.is_constexpr:
            sig[param.name] = "constexpr"
        elif param.name.endswith("_ptr"):
            sig[param.name] = "*bf16" if param.name in BF16_POINTERS else "*fp32"
        else:
            sig[param.name] = "i64" if param.name.startswith("stride") else "i32"
    return sig


def resources(kernel, constexprs: dict, num_warps: int, arch: int) -> str:
    compiled = triton.compile(ASTSource(fn=kernel, signature=signature(kernel), constexprs=constexprs),
                              target=GPUTarget("cuda", arch, 32), options={"num_warps": num_warps})
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(compiled.asm["cubin"])
    try:
        out = subprocess.run([str(CUOBJDUMP), "--dump-resource-usage", f.name], capture_output=True, text=True,
                             check=True).stdout
    finally:
        os.unlink(f.name)
    fields = dict(part.split(":") for line in out.splitlines() if "REG:" in line for part in line.split()
                  if ":" in part and part.split(":")[1].isdigit())
    return f"registers {fields.get('REG', '?'):>3s}  spill stack {fields.get('STACK', '?'):>5s} B  " \
           f"shared {fields.get('SHARED', '?'):>5s} B"


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", type=int, default=90)
    p.add_argument("--d-state", type=int, default=16)
    a = p.parse_args()
    block_n = triton.next_power_of_2(a.d_state)
    fwd_flags = dict(HAS_D=True, HAS_Z=True, HAS_DELTA_BIAS=True, HAS_H0=False, DELTA_SOFTPLUS=True, BLOCK_N=block_n,
                     CARRY_IN_MEMORY=True, UNROLL_N=1)
    bwd_flags = dict(HAS_D=True, HAS_Z=True, HAS_DELTA_BIAS=True, HAS_DLAST=False, WANT_DH0=False,
                     DELTA_SOFTPLUS=True, BLOCK_N=block_n, CARRY_IN_MEMORY=True, ATOMIC_BC=True, UNROLL_N=1)
    print(f"sm_{a.arch}, triton {triton.__version__}, d_state {a.d_state}, bf16 activations, z gating, softplus")
    rows = [("fwd scan", triton_fwd._selective_scan_fwd_kernel, c, fwd_flags) for c in FWD]
    rows += [("bwd", triton_bwd._selective_scan_bwd_kernel, c, bwd_flags) for c in BWD]
    for name, kernel, (chunk_l, block_d, warps, stages, unroll), flags in rows:
        constexprs = dict(flags, BLOCK_D=block_d, CHUNK_L=chunk_l, N_STAGES=stages, UNROLL_N=unroll)
        try:
            usage = resources(kernel, constexprs, warps, a.arch)
        except Exception as err:  # a configuration the compiler refuses
            usage = f"does not compile: {type(err).__name__}: {str(err)[:100]}"
        print(f"{name:15s} chunk {chunk_l:5d} block_d {block_d:4d} warps {warps} stages {stages} unroll {unroll}: "
              f"{usage}", flush=True)


if __name__ == "__main__":
    main()
