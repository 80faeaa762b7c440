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
  * with the vector loads' layout (16-bit tiles: eight consecutive steps per thread, 32 lanes, then the next 256
    steps; #blocked<sizePerThread [1, 8], threadsPerWarp [1, 32]>) a thread's registers are runs of eight steps, so
    an affine scan can run each run sequentially and pass only one composed map per run between lanes (scan_time,
    the forward's). This one depends on the layout Triton picks: the launcher uses it only where vector_tiles()
    holds, and tests/ops/test_lane_asm.py compiles the forward and checks the layout.
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
def _scan_asm(pack, vec):
    """Inclusive scan of h_t = d_t h_(t-1) + x_t (h_(-1) = 0) over a one-warp tile whose registers are runs of vec
    consecutive steps (run r of lane l: steps 32 vec r + vec l ...). Operands: h outputs $0.., decays $pack..,
    inputs $(2 pack)... Per run: (1) the run's composed map (A, B): the product of its decays (a tree) and its scan
    from 0 (one register); (2) an inclusive Hillis-Steele scan of the runs' maps over the lanes (shuffles up by
    1..16, applied where the source lane exists, by predicate rather than select), shifted by one lane to exclusive;
    (3) runs after the first start from the previous run's end state H (lane 31's, broadcast): carry = A_excl H +
    B_excl; (4) the run scanned again from its carry. A fix-up variant (running products kept per step, one FMA per
    step from the carry: same instruction count, shorter dependency chain, more live registers) was 1-2% slower in
    the forward on an H200 (benchmarks/RESULTS.md)."""
    runs = pack // vec
    one = "0f3F800000"
    lines = ["{", f".reg .pred %p<{runs}>;",
             f".reg .b32 %sa<{runs}>, %sb<{runs}>, %ua<{runs}>, %ub<{runs}>, %xa<{runs}>, %xb<{runs}>, %c<{runs}>;",
             f".reg .b32 %q<{pack}>, %ha, %hb, %hh;"]

    def dec(k):
        return f"${pack + k}"

    def inp(k):
        return f"${2 * pack + k}"

    for r in range(runs):  # (1) each run's map: its decays' product as a tree, its scan from 0 in one register
        k0 = r * vec
        level = [dec(k0 + j) for j in range(vec)]
        while len(level) > 1:
            level_regs = [f"%sa{r}" if len(level) == 2 else f"%q{k0 + len(level) // 2 + j // 2}"
                          for j in range(0, len(level), 2)]
            lines += [f"mul.rn.f32 {reg}, {level[2 * i]}, {level[2 * i + 1]};" for i, reg in enumerate(level_regs)]
            level = level_regs
        lines.append(f"mov.b32 %sb{r}, {inp(k0)};")
        lines += [f"fma.rn.f32 %sb{r}, {dec(k0 + j)}, %sb{r}, {inp(k0 + j)};" for j in range(1, vec)]
    for step in (1, 2, 4, 8, 16):  # (2) inclusive scan of the runs' maps over the lanes
        for r in range(runs):
            need_a = not (r == 0 and step == 16)  # run 0 needs no product past its last step (it starts from 0)
            lines.append(f"shfl.sync.up.b32 %ub{r}|%p{r}, %sb{r}, {step}, 0, -1;")
            if need_a:
                lines.append(f"shfl.sync.up.b32 %ua{r}, %sa{r}, {step}, 0, -1;")
            lines.append(f"@%p{r} fma.rn.f32 %sb{r}, %sa{r}, %ub{r}, %sb{r};")
            if need_a:
                lines.append(f"@%p{r} mul.rn.f32 %sa{r}, %sa{r}, %ua{r};")
    for r in range(runs):  # ... made exclusive: lane 0 gets the identity map
        lines += [f"shfl.sync.up.b32 %xb{r}|%p{r}, %sb{r}, 1, 0, -1;", f"@!%p{r} mov.b32 %xb{r}, 0;"]
        if r:
            lines += [f"shfl.sync.up.b32 %xa{r}, %sa{r}, 1, 0, -1;", f"@!%p{r} mov.b32 %xa{r}, {one};"]
    # (3) the state entering each run: run 0 starts from 0; run r from H, the end state of run r - 1 (lane 31's)
    lines.append("mov.b32 %c0, %xb0;")
    for r in range(1, runs):
        if r == 1:
            lines.append("shfl.sync.idx.b32 %hh, %sb0, 31, 31, -1;")
        else:
            lines += [f"shfl.sync.idx.b32 %ha, %sa{r - 1}, 31, 31, -1;",
                      f"shfl.sync.idx.b32 %hb, %sb{r - 1}, 31, 31, -1;", "fma.rn.f32 %hh, %ha, %hh, %hb;"]
        lines.append(f"fma.rn.f32 %c{r}, %xa{r}, %hh, %xb{r};")
    for r in range(runs):  # (4) each run scanned again, from its carry
        lines += [f"fma.rn.f32 ${k}, {dec(k)}, {f'${k - 1}' if k % vec else f'%c{r}'}, {inp(k)};"
                  for k in range(r * vec, (r + 1) * vec)]
    lines.append("}")
    return "\n".join(lines)


@triton.constexpr_function
def _constraints(pack, with_addresses):
    """pack outputs, (pack 64-bit addresses,) pack 32-bit inputs."""
    return ",".join(["=r"] * pack + (["l"] * pack if with_addresses else []) + ["r"] * pack)


@triton.constexpr_function
def _scan_constraints(pack):
    """pack outputs, pack decays, pack inputs (32-bit registers)."""
    return ",".join(["=r"] * pack + ["r"] * (2 * pack))


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
def affine_combine(decay_left, value_left, decay_right, value_right):
    """Compose h -> decay_left * h + value_left, then h -> decay_right * h + value_right."""
    return decay_left * decay_right, decay_right * value_left + value_right


@triton.jit
def affine_combine2(decay_a, value_a, decay_b, value_b, next_decay_a, next_value_a, next_decay_b, next_value_b):
    """Two independent affine maps composed at once, each as affine_combine does: one tl.associative_scan over four
    tiles runs two scans whose shuffles and FMA chains interleave."""
    return (decay_a * next_decay_a, next_decay_a * value_a + next_value_a,
            decay_b * next_decay_b, next_decay_b * value_b + next_value_b)


@triton.jit
def scan_time(decay, x, CHUNK_L: tl.constexpr, ASM: tl.constexpr):
    """h (BLOCK_D, CHUNK_L) float32 with h_t = decay_t h_(t-1) + x_t along time from h_(-1) = 0 (a start state is
    folded into x_0 by the caller). With ASM (one channel on one warp in the vector loads' layout: see vector_tiles
    in triton_fwd.py) the inline-PTX scan of _scan_asm; otherwise tl.associative_scan."""
    if ASM:
        tl.static_assert(CHUNK_L == 256 or CHUNK_L == 512 or CHUNK_L == 1024,
                         "scan_time(ASM=True) takes chunks of 256, 512 or 1024 steps")
        bits = tl.inline_asm_elementwise(_scan_asm(CHUNK_L // 32, 8), _scan_constraints(CHUNK_L // 32),
                                         [decay.to(tl.int32, bitcast=True), x.to(tl.int32, bitcast=True)],
                                         dtype=tl.int32, is_pure=True, pack=CHUNK_L // 32)
        return bits.to(tl.float32, bitcast=True)
    else:
        _, h = tl.associative_scan((decay, x), 1, affine_combine)
        return h
