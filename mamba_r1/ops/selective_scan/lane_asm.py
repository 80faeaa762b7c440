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
  * a thread's registers come in runs of VEC consecutive steps when the tile's layout is the vector loads' (VEC = 8
    for 16-bit activations: #blocked<sizePerThread [1, 8], threadsPerWarp [1, 32]>), so a tile can be written to shared
    memory in 16-byte pieces and read back four consecutive steps per lane (add_row). Unlike the two facts above this
    one depends on the layout Triton picks; tests/ops/test_lane_asm.py compiles the backward and checks it.
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
def _add_row_asm(pack, vec):
    """Add the tile (operands: pack dummy outputs, pack copies of the row's address, pack values) to a float32 row with
    coalesced 16-byte reductions: each lane writes its runs of vec steps to a shared-memory copy of the chunk, then
    reads back steps 4 lane .. 4 lane + 3 of every 128 and adds them with red.v4, so each warp instruction covers 512
    contiguous bytes. The shared copy is XOR-swizzled in 16-byte pieces (piece c stored at c ^ bit 3 of c) so that
    the eight lanes of a quarter-warp, 32 bytes apart, hit distinct banks."""
    chunk = 32 * pack
    lines = ["{", f".shared .align 16 .b8 add_row_buf[{4 * chunk}];",
             ".reg .b32 %ln, %sb, %t, %b, %rd, %v<4>;", ".reg .b64 %g;",
             "mov.u32 %ln, %laneid;", "mov.u32 %sb, add_row_buf;",
             "bar.warp.sync -1;"]  # the previous call's reads by other lanes are done
    for m in range(vec // 4):  # the m-th 16-byte piece of each of this lane's runs
        lines += [f"mad.lo.u32 %t, %ln, {vec // 4}, {m};", "bfe.u32 %b, %t, 3, 1;", "xor.b32 %t, %t, %b;",
                  "shl.b32 %t, %t, 4;", "add.u32 %t, %t, %sb;"]
        for s in range(pack // vec):  # run s of this lane: steps 32 vec s + vec lane ...
            regs = ", ".join(f"${2 * pack + s * vec + 4 * m + j}" for j in range(4))
            lines.append(f"st.shared.v4.b32 [%t+{128 * vec * s}], {{{regs}}};")
    lines += ["bar.warp.sync -1;", "bfe.u32 %b, %ln, 3, 1;", "xor.b32 %t, %ln, %b;", "shl.b32 %t, %t, 4;",
              "add.u32 %rd, %t, %sb;", "mul.wide.u32 %g, %ln, 16;", f"add.u64 %g, %g, ${pack};"]
    for q in range(pack // 4):  # steps 128 q + 4 lane ... + 3
        lines += [f"ld.shared.v4.b32 {{%v0, %v1, %v2, %v3}}, [%rd+{512 * q}];",
                  f"red.global.gpu.relaxed.add.v4.f32 [%g+{512 * q}], {{%v0, %v1, %v2, %v3}};"]
    lines += [f"mov.b32 ${j}, 0;" for j in range(pack)] + ["}"]
    return "\n".join(lines)


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


@triton.jit
def add_row(row_ptr, x, CHUNK_L: tl.constexpr, VEC: tl.constexpr, ASM: tl.constexpr):
    """Atomically add x (1, CHUNK_L) float32 to the float32 row at row_ptr (a scalar pointer, CHUNK_L elements that
    all exist, 16-byte aligned). With ASM (see lane_asm; VEC: the tile's run of consecutive steps per thread) through
    shared memory and 16-byte reductions that each cover 512 contiguous bytes (_add_row_asm); tl.atomic_add spends
    32 shuffles and 64 selects per pair of tiles converting them to its four-per-thread layout. Otherwise
    tl.atomic_add (relaxed)."""
    if ASM:
        tl.static_assert(CHUNK_L == 256 or CHUNK_L == 512 or CHUNK_L == 1024,
                         "add_row(ASM=True) takes chunks of 256, 512 or 1024 steps")
        tl.static_assert(VEC == 4 or VEC == 8, "add_row(ASM=True) takes runs of 4 or 8 steps per thread")
        addr = tl.zeros(x.shape, dtype=tl.int64) + row_ptr.to(tl.int64)  # one register: every element the same
        tl.inline_asm_elementwise(_add_row_asm(CHUNK_L // 32, VEC), _constraints(CHUNK_L // 32, True),
                                  [addr, x.to(tl.int32, bitcast=True)], dtype=tl.int32, is_pure=False,
                                  pack=CHUNK_L // 32)
    else:
        offs_l = tl.arange(0, CHUNK_L)
        tl.atomic_add(row_ptr + offs_l[None, :], x, sem="relaxed")
