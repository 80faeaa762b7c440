"""The scan kernels' inline-PTX helpers (mamba_r1/ops/selective_scan/lane_asm.py), checked on the CPU.

The PTX itself runs only on a GPU (tests/ops/test_selective_scan_triton.py runs it there against the float64
reference). Here: the claim the helpers rest on (in any layout whose lane and register bits are distinct position
bits, reversing time is lane ^ 31 with the registers reversed, the first step is lane 0's register 0 and the last lane
31's last register), checked on the layouts a one-warp tile can have, and the generated PTX checked to do exactly that
mapping; then the plain-Triton paths (ASM=False) under the interpreter.
"""

import itertools
import os
import re
import struct
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


def f32(v):
    """Round a Python float to float32 (what a 32-bit register holds)."""
    return struct.unpack("f", struct.pack("f", v))[0]


def run_scan_ptx(ptx, pack, decays, inputs):
    """Run _scan_asm's PTX on the 32 lanes of a warp in lockstep; decays[lane][k] / inputs[lane][k] are the operands
    $(pack + k) / $(2 pack + k) of that lane; returns outputs[lane][k] ($k). Knows exactly the instructions the
    generator emits (anything else fails); float32 rounding after every operation (fma rounded once)."""
    body = [line.strip() for line in ptx.splitlines()]
    assert body[0] == "{" and body[-1] == "}"
    regs = [dict() for _ in range(LANES)]
    for lane in range(LANES):
        for k in range(pack):
            regs[lane][f"${pack + k}"], regs[lane][f"${2 * pack + k}"] = f32(decays[lane][k]), f32(inputs[lane][k])
    for line in body[1:-1]:
        if line.startswith(".reg"):
            continue
        guard, _, rest = line.rstrip(";").partition(" ") if line.startswith("@") else ("", "", line.rstrip(";"))
        op, _, args = rest.partition(" ")
        args = [a.strip() for a in args.split(",")]
        results = []
        for lane in range(LANES):
            if guard:
                pred = regs[lane][guard.lstrip("@!")]
                if pred == guard.startswith("@!"):
                    results.append(None)
                    continue

            def val(tok, lane=lane):
                if tok.startswith("0f"):
                    return struct.unpack(">f", bytes.fromhex(tok[2:]))[0]
                return regs[lane][tok] if tok[0] in "%$" else float(int(tok))

            if op == "mul.rn.f32":
                results.append({args[0]: f32(val(args[1]) * val(args[2]))})
            elif op == "fma.rn.f32":
                results.append({args[0]: f32(val(args[1]) * val(args[2]) + val(args[3]))})
            elif op == "mov.b32":
                results.append({args[0]: val(args[1])})
            elif op in ("shfl.sync.up.b32", "shfl.sync.idx.b32"):
                dst, src, b, c, mask = args
                assert mask == "-1"
                if op.endswith("up.b32"):
                    assert c == "0"
                    source = lane - int(b)
                else:
                    assert c == "31"
                    source = int(b)
                ok = 0 <= source < LANES
                out = {}
                dst_reg, _, dst_pred = dst.partition("|")
                out[dst_reg] = regs[source if ok else lane][src]
                if dst_pred:
                    out[dst_pred] = ok
                results.append(out)
            else:
                raise AssertionError(f"unexpected instruction {line}")
        for lane, out in enumerate(results):  # all lanes read before any writes (a warp instruction)
            if out:
                regs[lane].update(out)
    return [[regs[lane][f"${k}"] for k in range(pack)] for lane in range(LANES)]


def vector_position(lane, k, vec=8):
    """Step held by register k of a lane in the vector loads' layout: runs of vec steps, 32 lanes, then the next."""
    return (k // vec) * LANES * vec + lane * vec + k % vec


@pytest.mark.parametrize("chunk_l", lane_asm.CHUNKS)
@pytest.mark.parametrize("decays_near", ["mixed", "one"])
def test_scan_ptx_matches_a_sequential_scan(chunk_l, decays_near):
    """_scan_asm's PTX, run lane by lane on the vector loads' layout, gives h_t = d_t h_(t-1) + x_t from h_(-1) = 0 at
    every step (float32 rounding). Decays "mixed": in [0, 1], some exactly 1 and 0 as padding and long decays give;
    "one": in [0.98, 1], so that products over whole lanes stay far from 0 and a wrong product shows."""
    import random

    pack = chunk_l // LANES
    rng = random.Random(chunk_l)
    if decays_near == "mixed":
        d = [rng.choice([1.0, 0.0, rng.uniform(0.5, 1.0), rng.uniform(0.0, 1.0)]) for _ in range(chunk_l)]
    else:
        d = [rng.uniform(0.98, 1.0) for _ in range(chunk_l)]
    x = [rng.gauss(0.0, 1.0) for _ in range(chunk_l)]
    expected, h = [], 0.0
    for t in range(chunk_l):
        h = f32(d[t]) * h + f32(x[t])
        expected.append(h)
    decays = [[d[vector_position(lane, k)] for k in range(pack)] for lane in range(LANES)]
    inputs = [[x[vector_position(lane, k)] for k in range(pack)] for lane in range(LANES)]
    out = run_scan_ptx(lane_asm._scan_asm(pack, 8), pack, decays, inputs)
    for lane, k in itertools.product(range(LANES), range(pack)):
        t = vector_position(lane, k)
        assert out[lane][k] == pytest.approx(expected[t], rel=1e-5, abs=1e-5), (lane, k, t)


def test_scan_ptx_on_another_layout_gives_another_scan():
    """The same PTX on a layout of four steps per thread scans the steps in another order: the check above can fail."""
    pack, chunk_l = 16, 512
    x = [float(t % 7) for t in range(chunk_l)]
    decays = [[1.0] * pack for _ in range(LANES)]  # decay 1: h_t is the running sum, order-sensitive by position
    inputs = [[x[vector_position(lane, k, vec=4)] for k in range(pack)] for lane in range(LANES)]
    out = run_scan_ptx(lane_asm._scan_asm(pack, 8), pack, decays, inputs)
    running = list(itertools.accumulate(x))
    assert any(out[lane][k] != running[vector_position(lane, k, vec=4)]
               for lane in range(LANES) for k in range(pack))


def test_forward_tiles_have_the_layout_scan_time_assumes():
    """Compile the forward for sm_90 (no GPU needed; outside the interpreter) as the launcher runs it when
    vector_tiles() holds (B and C as pairs or bf16, with and without z and masks): the tiles reaching scan_time's PTX
    are 8 consecutive steps per thread over 32 lanes."""
    pytest.importorskip("triton")
    root = Path(__file__).resolve().parents[2]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, str(root / "benchmarks" / "kernel_resources.py"), "--scan-layouts"],
                         capture_output=True, text=True, env=env, cwd=root, timeout=900)
    assert out.returncode == 0, out.stderr[-2000:]
    lines = [line for line in out.stdout.splitlines() if "scan_time" in line]
    assert len(lines) == 8, out.stdout  # paired or not x z or not x EVEN or not
    for line in lines:
        assert ": 1 scan_time calls," in line, line
        assert line.endswith("#ttg.blocked<{sizePerThread = [1, 8], threadsPerWarp = [1, 32], warpsPerCTA = [1, 1], "
                             "order = [1, 0]}>"), line
