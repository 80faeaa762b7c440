"""Registers, spills (stack bytes) and shared memory of the Triton scan kernels, compiled for a GPU without one.

Triton compiles for a named target (here sm_90, Hopper) on any machine: ptxas ships with it. Register pressure decides
occupancy and spills, which is most of what can be learned about these kernels before a GPU run, and costs no device
time. Compile with the lent machine's Triton, not this venv's: the SASS can differ a lot (triton 3.6 builds reverse
scans from five butterfly shuffles per register, 3.9 from one; the backward's state loop was 1,009 instructions
under 3.6 and 815 under 3.9). The image had triton 3.6.0 in 2026-11:
    pip install --no-deps --target /tmp/t36 triton==3.6.0 && PYTHONPATH=/tmp/t36 python benchmarks/kernel_resources.py

The launch on a GPU specialises every pointer and every size or stride that is a multiple of 16 as 16-divisible, and
the layouts follow (16-byte vector loads: 8 bf16 steps per thread). Compiled without those hints a kernel gets
1 step per thread and a very different instruction mix (190 shuffles per state instead of 26 in the forward), so
they are given here as the target shapes (dims, seqlens and strides all multiples of 16) would give them.
`--sass` also prints the instruction mix of each kernel's innermost loop (the state loop): what it issues per state.
    python benchmarks/kernel_resources.py [--arch 90] [--d-state 16] [--sass]
    python benchmarks/kernel_resources.py --moe        (SwitchMoE's bias + GELU and token-gradient kernels)
    python benchmarks/kernel_resources.py --scan-layouts   (the tiles lane_asm.scan_time's PTX gets)
"""

from __future__ import annotations

import argparse
import collections
import itertools
import os
import re
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


def signature(kernel, paired_bc: bool = False) -> dict[str, str]:
    sig = {}
    for param in kernel.params:
        if param.is_constexpr:
            sig[param.name] = "constexpr"
        elif paired_bc and param.name in ("B_ptr", "C_ptr"):
            sig[param.name] = "*i32"  # bf16 pairs (BlockSizes.paired_bc)
        elif param.name.endswith("_ptr"):
            sig[param.name] = "*bf16" if param.name in BF16_POINTERS else "*fp32"
        else:
            sig[param.name] = "i64" if param.name.startswith("stride") else "i32"
    return sig


def alignment_hints(kernel) -> dict:
    """tt.divisibility 16 on every pointer and on every size and stride but those that are 1 or small at the
    target shapes (d_state's stride in A and channel counts per group are multiples of 16 there too)."""
    return {(i,): [["tt.divisibility", 16]] for i, param in enumerate(kernel.params) if not param.is_constexpr}


def cuobjdump(compiled, flag: str) -> str:
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(compiled.asm["cubin"])
    try:
        return subprocess.run([str(CUOBJDUMP), flag, f.name], capture_output=True, text=True, check=True).stdout
    finally:
        os.unlink(f.name)


def innermost_loop_mix(sass: str) -> str:
    """Instruction count and the most frequent opcodes of the shortest backward branch's body (the state loop)."""
    code = [(int(m.group(1), 16), m.group(2).strip()) for m in re.finditer(r"/\*([0-9a-f]{4,})\*/\s+([^;]*);", sass)]
    loops = [(int(m.group(1), 16), addr) for addr, text in code for m in [re.search(r"BRA (0x[0-9a-f]+)", text)]
             if m and int(m.group(1), 16) < addr]
    if not loops:
        return "no loop"
    start, end = min(loops, key=lambda loop: loop[1] - loop[0])
    ops = collections.Counter(re.sub(r"^@!?U?P\w+\s+", "", text).split()[0].split(".")[0]
                              for addr, text in code if start <= addr <= end)
    return f"{sum(ops.values())} instructions: " + ", ".join(f"{op} {n}" for op, n in ops.most_common(8))


def resources(kernel, constexprs: dict, num_warps: int, arch: int, sass: bool = False) -> str:
    compiled = triton.compile(ASTSource(fn=kernel, signature=signature(kernel, constexprs.get("PAIRED_BC", False)),
                                        constexprs=constexprs,
                                        attrs=alignment_hints(kernel)),
                              target=GPUTarget("cuda", arch, 32), options={"num_warps": num_warps})
    out = cuobjdump(compiled, "--dump-resource-usage")
    fields = dict(part.split(":") for line in out.splitlines() if "REG:" in line for part in line.split()
                  if ":" in part and part.split(":")[1].isdigit())
    usage = f"registers {fields.get('REG', '?'):>3s}  spill stack {fields.get('STACK', '?'):>5s} B  " \
            f"shared {fields.get('SHARED', '?'):>5s} B"
    if sass:
        usage += "\n    state loop: " + innermost_loop_mix(cuobjdump(compiled, "--dump-sass"))
    return usage


def scan_layouts(arch: int) -> None:
    """Print, per forward variant the launcher can run when vector_tiles() holds (bf16 tiles, 16-divisible sizes and
    strides; B and C read as int32 pairs or as bf16, with or without z, with or without masks), how many
    lane_asm.scan_time PTX calls the compiled kernel has and the layout of the tiles they get: the PTX assumes eight
    consecutive steps per thread over 32 lanes (tests/ops/test_lane_asm.py checks these lines)."""
    kernel = triton_fwd._selective_scan_fwd_kernel
    base = dict(HAS_D=True, HAS_DELTA_BIAS=True, HAS_H0=False, DELTA_SOFTPLUS=True, CARRY_IN_MEMORY=True, BLOCK_D=1,
                BLOCK_N=16, CHUNK_L=512, N_STAGES=1, UNROLL_N=1, EDGE_ASM=True, SCAN_ASM=True)
    for paired, has_z, even in itertools.product((True, False), (True, False), (True, False)):
        constexprs = dict(base, PAIRED_BC=paired, HAS_Z=has_z, EVEN=even)
        compiled = triton.compile(ASTSource(fn=kernel, signature=signature(kernel, paired), constexprs=constexprs,
                                            attrs=alignment_hints(kernel)),
                                  target=GPUTarget("cuda", arch, 32), options={"num_warps": 1})
        ir = compiled.asm["ttgir"]
        layouts = dict(re.findall(r"^(#\w+) = (.*)$", ir, flags=re.MULTILINE))
        # _scan_asm's text is the only inline asm with shfl.sync.up
        ops = [line for line in ir.splitlines() if "elementwise_inline_asm" in line and "shfl.sync.up" in line]
        names = sorted({re.search(r"-> tensor<[^,]+, (#\w+)>", line).group(1) for line in ops})
        print(f"forward PAIRED_BC={paired} HAS_Z={has_z} EVEN={even}: {len(ops)} scan_time calls, tiles "
              + " | ".join(layouts.get(n, n) for n in names))


def moe_kernels(arch: int) -> None:
    """Registers and whole-kernel instruction counts of the MoE's elementwise kernels (bf16 tensors, GELU, grouped
    layout, the GPU tiles of mamba_r1/ops/moe_expert_ffn.py and moe_routing.py)."""
    from mamba_r1.ops import moe_expert_ffn as ffn
    from mamba_r1.ops import moe_routing as routing

    def sig(kernel):
        out = {}
        for param in kernel.params:
            name = param.name
            if param.is_constexpr:
                out[name] = "constexpr"
            elif name.endswith("_ptr"):
                out[name] = ("*i64" if name in ("expert_ptr", "slot_of_ptr") else "*i1" if name == "keep_ptr"
                             else "*fp32" if name in ("partial_ptr", "grad_logits_ptr") else "*bf16")
            else:
                out[name] = "i32"
        return out

    rows, feats, warps = ffn.BIAS_BLOCKS_CUDA
    t_rows, t_feats, t_warps = routing.TOKEN_GRAD_BLOCKS_CUDA
    cases = [("bias + GELU forward", ffn._bias_act_fwd_kernel, dict(ACT=1, PADDED=False, BLOCK_R=rows, BLOCK_W=feats),
              warps),
             ("bias + GELU backward", ffn._bias_act_bwd_kernel, dict(ACT=1, PADDED=False, BLOCK_R=rows, BLOCK_W=feats),
              warps),
             ("token gradient, top-1", routing._token_grad_kernel,
              dict(NUM_EXPERTS=8, TOP_K=1, OWNS=False, HALF=True, BLOCK_T=t_rows, BLOCK_D=t_feats), t_warps)]
    for name, kernel, constexprs, num_warps in cases:
        compiled = triton.compile(ASTSource(fn=kernel, signature=sig(kernel), constexprs=constexprs,
                                            attrs=alignment_hints(kernel)),
                                  target=GPUTarget("cuda", arch, 32), options={"num_warps": num_warps})
        sass = cuobjdump(compiled, "--dump-sass")
        ops = collections.Counter(re.sub(r"^@!?U?P\w+\s+", "", text.strip()).split()[0].split(".")[0]
                                  for text in re.findall(r"/\*[0-9a-f]{4,}\*/\s+([^;]*);", sass))
        regs = re.search(r"REG:(\d+)", cuobjdump(compiled, "--dump-resource-usage")).group(1)
        print(f"{name:24s} tile {constexprs.get('BLOCK_R', constexprs.get('BLOCK_T'))} x "
              f"{constexprs.get('BLOCK_W', constexprs.get('BLOCK_D'))}, {num_warps} warps: registers {regs}, "
              f"{sum(ops.values())} instructions: " + ", ".join(f"{op} {n}" for op, n in ops.most_common(6)))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", type=int, default=90)
    p.add_argument("--d-state", type=int, default=16)
    p.add_argument("--sass", action="store_true", help="also the instruction mix of each kernel's state loop")
    p.add_argument("--moe", action="store_true", help="the MoE's elementwise kernels instead of the scan's")
    p.add_argument("--scan-layouts", action="store_true",
                   help="only the layout of the tiles lane_asm.scan_time's PTX gets in the forward")
    a = p.parse_args()
    if a.moe:
        moe_kernels(a.arch)
        return
    if a.scan_layouts:
        scan_layouts(a.arch)
        return
    block_n = triton.next_power_of_2(a.d_state)
    fwd_flags = dict(HAS_D=True, HAS_Z=True, HAS_DELTA_BIAS=True, HAS_H0=False, DELTA_SOFTPLUS=True, BLOCK_N=block_n,
                     CARRY_IN_MEMORY=True, UNROLL_N=1, PAIRED_BC=False, EDGE_ASM=False, EVEN=True, SCAN_ASM=False)
    bwd_flags = dict(HAS_D=True, HAS_Z=True, HAS_DELTA_BIAS=True, HAS_DLAST=False, WANT_DH0=False,
                     DELTA_SOFTPLUS=True, BLOCK_N=block_n, CARRY_IN_MEMORY=True, ATOMIC_BC=True, UNROLL_N=1,
                     PAIRED_BC=False, FLIP_ADJOINT=False, LANE_ASM=False, EDGE_ASM=False, EVEN=True,
                     JOINT_SCAN=False, BATCH_INNER=False, BC_COPIES=1)
    print(f"sm_{a.arch}, triton {triton.__version__}, d_state {a.d_state}, bf16 activations, z gating, softplus")
    rows = [("fwd scan", triton_fwd._selective_scan_fwd_kernel, c, fwd_flags) for c in FWD]
    rows += [("bwd", triton_bwd._selective_scan_bwd_kernel, c, bwd_flags) for c in BWD]
    for name, kernel, (chunk_l, block_d, warps, stages, unroll, switches), flags in rows:
        on = set(switches.split("+"))
        constexprs = dict(flags, BLOCK_D=block_d, CHUNK_L=chunk_l, N_STAGES=stages, UNROLL_N=unroll,
                          PAIRED_BC="paired" in on)
        if "FLIP_ADJOINT" in flags:
            constexprs["FLIP_ADJOINT"] = "flip" in on
            constexprs["LANE_ASM"] = block_d == 1 and warps == 1  # the GPU launch's choice
        constexprs["EDGE_ASM"] = "edge" in on and block_d == 1 and warps == 1
        if "FLIP_ADJOINT" not in flags:
            constexprs["SCAN_ASM"] = "scan" in on and block_d == 1 and warps == 1
        else:
            constexprs["JOINT_SCAN"] = "joint" in on and "flip" in on
        name = f"{name} {switches}" if switches else name
        try:
            usage = resources(kernel, constexprs, warps, a.arch, a.sass)
        except Exception as err:  # a configuration the compiler refuses
            usage = f"does not compile: {type(err).__name__}: {str(err)[:100]}"
        print(f"{name:22s} chunk {chunk_l:5d} block_d {block_d:4d} warps {warps} stages {stages} unroll {unroll}: "
              f"{usage}", flush=True)


if __name__ == "__main__":
    main()
