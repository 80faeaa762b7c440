"""Inline-PTX helpers for the scan kernels' time tiles when a program is one channel on one warp (the GPU table).

A (1, CHUNK_L) tile on one warp puts CHUNK_L / 32 elements in each thread, and whatever layout Triton picks (8 steps a
thread from the 16-byte loads, or any other), the position of an element is its lane bits and its register bits, each
standing for distinct bits of the position. Two facts follow that hold for every such layout:
  * reversing time complements every position bit: lane l goes to lane l ^ 31 and register r to register P - 1 - r
    (P = CHUNK_L / 32), so a flip is one shuffle per register (flip_time). tl.flip, and Triton 3.6's reverse scans,
    spend five butterfly shuffles per register on it;
  * the first step is lane 0's register 0, the last step lane 31's register P - 1, so one thread can store a chunk's
    edge column straight from its register (store_edge). tl.store with a mask on one column gets its own layout and
    converts the tile through shared memory first.
Each helper takes ASM (a constexpr): False gives the plain Triton equivalent, which the CPU interpreter runs (it has
no inline PTX) and which any other program shape needs. lane_asm() says when True is allowed.
"""

from __future__ import annotations

import triton
import triton.language as tl

CHUNKS = (256, 512, 1024)  # chunk lengths the helpers have code for (8, 16, 32 elements per thread)


def lane_asm(block_d: int, num_warps: int, chunk_l: int, interpreting: bool) -> bool:
    """Whether the kernels may use the inline-PTX paths: one channel per program on one warp, on a GPU."""
    return block_d == 1 and num_warps == 1 and chunk_l in CHUNKS and not interpreting


@triton.constexpr_function
def _flip_asm(pack):
    """Outputs $0..$(pack-1) = inputs $(2 pack - 1)..$pack from lane ^ 31."""
    return "\n".join(f"shfl.sync.bfly.b32 ${j}, ${2 * pack - 1 - j}, 31, 31, -1;" for j in range(pack))


@triton.constexpr_function
def _edge_asm(pack, last):
    """Store one element (register pack-1 of lane 31, or register 0 of lane 0) at its own address; dummy outputs."""
    lane, reg = (31, pack - 1) if last else (0, 0)
    ptr, val = pack + reg, 2 * pack + reg  # operands: pack outputs, pack addresses, pack values
    dummies = "\n".join(f"mov.b32 ${j}, 0;" for j in range(pack))
    return ("{\n.reg .pred %p;\n.reg .b32 %lane;\nmov.u32 %lane, %laneid;\n"
            f"setp.eq.u32 %p, %lane, {lane};\n@%p st.global.b32 [${ptr}], ${val};\n{dummies}\n}}")


@triton.constexpr_function
def _constraints(pack, with_addresses):
    """pack outputs, (pack 64-bit addresses,) pack 32-bit inputs."""
    return ",".join(["=r"] * pack + (["l"] * pack if with_addresses else []) + ["r"] * pack)


@triton.jit
def flip_time(x, CHUNK_L: tl.constexpr, ASM: tl.constexpr):
    """x (BLOCK_D, CHUNK_L) float32 reversed along time: with ASM (see lane_asm) one lane ^ 31 shuffle per register,
    the registers taken in reverse order; otherwise tl.flip."""
    if ASM:
        tl.static_assert(CHUNK_L == 256 or CHUNK_L == 512 or CHUNK_L == 1024,
                         "flip_time(ASM=True) takes chunks of 256, 512 or 1024 steps")
        bits = tl.inline_asm_elementwise(_flip_asm(CHUNK_L // 32), _constraints(CHUNK_L // 32, False),
                                         [x.to(tl.int32, bitcast=True)], dtype=tl.int32, is_pure=True,
                                         pack=CHUNK_L // 32)
        return bits.to(tl.float32, bitcast=True)
    else:
        return tl.flip(x, 1)


@triton.jit
def store_edge(ptrs, x, mask, LAST: tl.constexpr, CHUNK_L: tl.constexpr, ASM: tl.constexpr):
    """Store the chunk's last (LAST) or first time column of x (BLOCK_D, CHUNK_L) float32 at ptrs (BLOCK_D, CHUNK_L)
    (equal along time; mask (BLOCK_D, CHUNK_L) is the channels' and is ignored with ASM, where the one channel is
    real). With ASM the thread holding that column stores it from its register; otherwise a masked tl.store."""
    if ASM:
        bits = x.to(tl.int32, bitcast=True)
        addr = ptrs.to(tl.int64)  # triton 3.6 refuses pointer and number operands in one inline_asm_elementwise
        tl.static_assert(CHUNK_L == 256 or CHUNK_L == 512 or CHUNK_L == 1024,
                         "store_edge(ASM=True) takes chunks of 256, 512 or 1024 steps")
        tl.inline_asm_elementwise(_edge_asm(CHUNK_L // 32, LAST), _constraints(CHUNK_L // 32, True), [addr, bits],
                                  dtype=tl.int32, is_pure=False, pack=CHUNK_L // 32)
    else:
        offs_l = tl.arange(0, CHUNK_L)
        edge = (offs_l == CHUNK_L - 1) if LAST else (offs_l == 0)
        tl.store(ptrs, x, mask=mask & edge[None, :])
