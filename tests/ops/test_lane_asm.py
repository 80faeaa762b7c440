"""The scan kernels' inline-PTX helpers (mamba_r1/ops/selective_scan/lane_asm.py), checked on the CPU.

The PTX itself runs only on a GPU (tests/ops/test_selective_scan_triton.py runs it there against the float64
reference). Here: the claim the helpers rest on (in any layout whose lane and register bits are distinct position
bits, reversing time is lane ^ 31 with the registers reversed, the first step is lane 0's register 0 and the last lane
31's last register), checked on the layouts a one-warp tile can have, and the generated PTX checked to do exactly that
mapping; then the plain-Triton paths (ASM=False) under the interpreter.
"""

import collections
import itertools
import os
import re
import subprocess
import sys
from pathlib import Path

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


def run_add_row_ptx(ptx, pack, values, row_address):
    """Run _add_row_asm's PTX on the 32 lanes of a warp in lockstep: values[lane][k] is operand $(2 pack + k) of that
    lane. Returns {global float32 address: sum added} and, per shared-memory store / load instruction, the 16-byte
    piece each lane touched (to check the banks). Knows exactly the instructions the generator emits (anything else
    fails)."""
    body = [line.strip() for line in ptx.splitlines()]
    assert body[0] == "{" and body[-1] == "}"
    buf = 1 << 20  # the buffer's shared address (arbitrary, 16-byte aligned)
    regs = [{"%ln": lane} for lane in range(LANES)]
    shared, added = {}, collections.defaultdict(float)
    accesses, reductions = collections.defaultdict(list), collections.defaultdict(list)
    arith = {"mad.lo.u32": lambda a: a[0] * a[1] + a[2], "bfe.u32": lambda a: (a[0] >> a[1]) & ((1 << a[2]) - 1),
             "xor.b32": lambda a: a[0] ^ a[1], "shl.b32": lambda a: a[0] << a[1], "add.u32": lambda a: a[0] + a[1],
             "mul.wide.u32": lambda a: a[0] * a[1], "add.u64": lambda a: a[0] + a[1]}
    for i, line in enumerate(body[1:-1]):
        op, _, rest = line.rstrip(";").partition(" ")
        if op == ".shared":
            assert rest == f".align 16 .b8 add_row_buf[{4 * 32 * pack}]", rest
            continue
        if op in (".reg", "bar.warp.sync"):
            continue
        for lane in range(LANES):
            def val(tok, lane=lane):
                tok = tok.strip()
                if tok.startswith("$"):
                    k = int(tok[1:])
                    assert pack <= k < 3 * pack, tok  # inputs only: addresses $pack..$(2 pack - 1), values after
                    return row_address if k < 2 * pack else values[lane][k - 2 * pack]
                return regs[lane][tok] if tok.startswith("%") else int(tok)

            def addr(tok):
                base, _, off = tok.strip().strip("[]").partition("+")
                return val(base) + (int(off) if off else 0)

            if op == "mov.u32":
                dst, src = (t.strip() for t in rest.split(","))
                regs[lane][dst] = {"%laneid": lane, "add_row_buf": buf}[src]
            elif op == "mov.b32":
                dst, src = (t.strip() for t in rest.split(","))
                assert dst.startswith("$") and int(dst[1:]) < pack and src == "0"  # the dummy outputs
            elif op in arith:
                dst, *srcs = (t.strip() for t in rest.split(","))
                regs[lane][dst] = arith[op]([val(t) for t in srcs])
            elif op == "st.shared.v4.b32":
                target, data = rest.split(",", 1)
                a = addr(target)
                assert a % 16 == 0 and buf <= a < buf + 4 * 32 * pack
                for j, tok in enumerate(data.strip(" {}").split(",")):
                    shared[a + 4 * j] = val(tok)
                accesses[i].append((lane, (a - buf) // 16))
            elif op == "ld.shared.v4.b32":
                data, target = rest.split("},")
                a = addr(target)
                for j, tok in enumerate(data.strip(" {").split(",")):
                    regs[lane][tok.strip()] = shared[a + 4 * j]  # a read of a piece nobody wrote fails here
                accesses[i].append((lane, (a - buf) // 16))
            elif op == "red.global.gpu.relaxed.add.v4.f32":
                target, data = rest.split(",", 1)
                a = addr(target)
                assert a % 16 == 0
                for j, tok in enumerate(data.strip(" {}").split(",")):
                    added[a + 4 * j] += val(tok)
                reductions[i].append((a - row_address) // 16)
            else:
                raise AssertionError(f"unexpected instruction {line}")
    return added, accesses, reductions


@pytest.mark.parametrize("chunk_l", lane_asm.CHUNKS)
def test_add_row_ptx_adds_each_step_once_coalesced_and_without_bank_conflicts(chunk_l):
    """The vector loads' layout (8 consecutive steps per thread, 32 lanes along time, then the next 256): every step's
    value lands at row + 4 step, each reduction instruction covers 512 contiguous bytes, and the eight lanes of each
    quarter-warp touch distinct 16-byte bank groups in shared memory."""
    pack, vec, row = chunk_l // LANES, 8, 1 << 30

    def position(lane, k):
        return (k // vec) * LANES * vec + lane * vec + k % vec

    values = [[float(position(lane, k)) + 0.5 for k in range(pack)] for lane in range(LANES)]
    added, accesses, reductions = run_add_row_ptx(lane_asm._add_row_asm(pack, vec), pack, values, row)
    assert added == {row + 4 * step: step + 0.5 for step in range(chunk_l)}
    assert len(reductions) == chunk_l // 128
    for pieces in reductions.values():
        assert pieces == list(range(pieces[0], pieces[0] + LANES)) and pieces[0] % LANES == 0  # 512 bytes, aligned
    for instruction, touched in accesses.items():
        pieces = dict(touched)
        for quarter in range(4):
            groups = [pieces[lane] % 8 for lane in range(8 * quarter, 8 * quarter + 8)]
            assert len(set(groups)) == 8, (instruction, quarter, groups)


def test_add_row_ptx_detects_a_wrong_layout():
    """The same PTX on four steps per thread puts values at the wrong steps: the check above can fail."""
    pack, row = 16, 1 << 30
    values = [[float((k // 4) * LANES * 4 + lane * 4 + k % 4) for k in range(pack)] for lane in range(LANES)]
    added, _, _ = run_add_row_ptx(lane_asm._add_row_asm(pack, 8), pack, values, row)
    assert added != {row + 4 * step: float(step) for step in range(32 * pack)}


def test_backward_tiles_have_the_layout_add_row_assumes():
    """Compile the backward for sm_90 (no GPU needed; outside the interpreter) as the launcher runs it when
    vector_tiles() holds: the tiles reaching add_row are 8 consecutive steps per thread over 32 lanes."""
    pytest.importorskip("triton")
    root = Path(__file__).resolve().parents[2]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, str(root / "benchmarks" / "kernel_resources.py"), "--add-row-layout"],
                         capture_output=True, text=True, env=env, cwd=root, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "2 add_row calls:" in out.stdout, out.stdout
    assert "sizePerThread = [1, 8], threadsPerWarp = [1, 32], warpsPerCTA = [1, 1], order = [1, 0]" in out.stdout, \
        out.stdout
