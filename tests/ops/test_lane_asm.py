"""The scan kernels' inline-PTX helpers (mamba_r1/ops/selective_scan/lane_asm.py), checked on the CPU.

The PTX itself runs only on a GPU (tests/ops/test_selective_scan_triton.py runs it there against the float64
reference). Here: the claim the helpers rest on (in any layout whose lane and register bits are distinct position
bits, reversing time is lane ^ 31 with the registers reversed, the first step is lane 0's register 0 and the last lane
31's last register), checked on the layouts a one-warp tile can have, and the generated PTX checked to do exactly that
mapping; then the plain-Triton paths (ASM=False) under the interpreter.
"""

import itertools
import re

import pytest
import torch

from mamba_r1.ops.selective_scan import lane_asm
from tests.conftest import DEVICE

LANES = 32


def layouts(chunk_l):
    """Position of (lane, register) for layouts a (1, chunk_l) one-warp tile can get: contiguous runs of 1, 4 and 8
    steps per thread (the vector loads' widths) and bit orders that interleave lane and register bits."""
    regs = chunk_l // LANES
    reg_bits, lane_bits = regs.bit_length() - 1, 5
    n_bits = reg_bits + lane_bits
    candidates = []
    for run_bits in sorted({0, min(2, reg_bits), min(3, reg_bits)}):
        # position bits: the run's low bits in registers, then the lanes, then the remaining register bits
        order = [("r", b) for b in range(run_bits)] + [("l", b) for b in range(lane_bits)]
        order += [("r", b) for b in range(run_bits, reg_bits)]
        candidates.append(order)
    # and a scrambled one: position bit k from an arbitrary (register or lane) bit
    scrambled = [("l", 4), ("r", 0), ("l", 0), ("l", 3)] + [("r", b) for b in range(1, reg_bits)] + \
        [("l", 1), ("l", 2)]
    candidates.append(scrambled[:n_bits])
    for order in candidates:
        assert sorted(order) == sorted([("r", b) for b in range(reg_bits)] + [("l", b) for b in range(lane_bits)])

        def position(lane, reg, order=order):
            bits = {"l": lane, "r": reg}
            return sum(((bits[kind] >> b) & 1) << k for k, (kind, b) in enumerate(order))

        yield position


def parse_flip(ptx, pack):
    """{output register: (input register, lane xor)} from _flip_asm's text."""
    mapping = {}
    for line in ptx.splitlines():
        m = re.fullmatch(r"shfl\.sync\.bfly\.b32 \$(\d+), \$(\d+), (\d+), 31, -1;", line.strip())
        assert m, line
        out, inp, xor = (int(g) for g in m.groups())
        assert out < pack <= inp < 2 * pack
        mapping[out] = (inp - pack, xor)
    assert sorted(mapping) == list(range(pack))
    return mapping


@pytest.mark.parametrize("chunk_l", lane_asm.CHUNKS)
def test_flip_ptx_reverses_time_in_every_layout(chunk_l):
    pack = chunk_l // LANES
    mapping = parse_flip(lane_asm._flip_asm(pack), pack)
    for position in layouts(chunk_l):
        values = {(lane, reg): position(lane, reg) for lane in range(LANES) for reg in range(pack)}
        assert sorted(values.values()) == list(range(chunk_l))  # a layout: every step once
        for lane, reg in itertools.product(range(LANES), range(pack)):
            src_reg, xor = mapping[reg]
            got = values[(lane ^ xor, src_reg)]  # shfl.bfly reads the partner lane's register
            assert got == chunk_l - 1 - position(lane, reg)


@pytest.mark.parametrize("chunk_l", lane_asm.CHUNKS)
@pytest.mark.parametrize("last", [False, True])
def test_edge_ptx_stores_the_edge_step_in_every_layout(chunk_l, last):
    pack = chunk_l // LANES
    ptx = lane_asm._edge_asm(pack, last)
    lane = int(re.search(r"setp\.eq\.u32 %p, %lane, (\d+);", ptx).group(1))
    ptr, val = (int(g) for g in re.search(r"@%p st\.global\.b32 \[\$(\d+)\], \$(\d+);", ptx).groups())
    reg = ptr - pack
    assert val - 2 * pack == reg  # the value stored is the one whose address is used
    assert 0 <= reg < pack and len(re.findall(r"mov\.b32 \$(\d+), 0;", ptx)) == pack  # every output defined
    for position in layouts(chunk_l):
        assert position(lane, reg) == (chunk_l - 1 if last else 0)


def test_lane_asm_only_for_one_channel_on_one_warp_on_a_gpu():
    assert lane_asm.lane_asm(1, 1, 512, interpreting=False)
    assert not lane_asm.lane_asm(2, 1, 512, interpreting=False)
    assert not lane_asm.lane_asm(1, 2, 512, interpreting=False)
    assert not lane_asm.lane_asm(1, 1, 128, interpreting=False)
    assert not lane_asm.lane_asm(1, 1, 512, interpreting=True)


@pytest.mark.skipif(DEVICE != "cpu", reason="the plain-Triton paths, as the CPU interpreter runs them")
@pytest.mark.parametrize("block_d", [1, 4])
def test_plain_paths_flip_and_store_edges(block_d):
    import triton
    import triton.language as tl

    @triton.jit
    def kernel(x_ptr, flipped_ptr, first_ptr, last_ptr, BLOCK_D: tl.constexpr, CHUNK_L: tl.constexpr):
        offs_d = tl.arange(0, BLOCK_D)
        offs_l = tl.arange(0, CHUNK_L)
        x = tl.load(x_ptr + offs_d[:, None] * CHUNK_L + offs_l[None, :])
        tl.store(flipped_ptr + offs_d[:, None] * CHUNK_L + offs_l[None, :], lane_asm.flip_time(x, CHUNK_L, False))
        mask = (offs_d < BLOCK_D)[:, None]
        lane_asm.store_edge(first_ptr + offs_d[:, None] + offs_l[None, :] * 0, x, mask, False, CHUNK_L, False)
        lane_asm.store_edge(last_ptr + offs_d[:, None] + offs_l[None, :] * 0, x, mask, True, CHUNK_L, False)

    chunk_l = 8
    x = torch.randn(block_d, chunk_l)
    flipped, first, last = torch.empty_like(x), torch.full((block_d,), 7.0), torch.full((block_d,), 7.0)
    kernel[(1,)](x, flipped, first, last, BLOCK_D=block_d, CHUNK_L=chunk_l)
    assert torch.equal(flipped, x.flip(1))
    assert torch.equal(first, x[:, 0]) and torch.equal(last, x[:, -1])
