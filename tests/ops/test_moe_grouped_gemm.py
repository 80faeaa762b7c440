"""The grouped GEMM kernel against a float64 per-expert loop (its specification) and torch._grouped_mm (its fallback):
odd segment sizes, empty experts, K and N not multiples of the tiles, both weight layouts; where it applies and where
it falls back; its differentiable form against moe_dispatch.grouped_matmul; opcheck of both ops; Triton's scratch
allocator. The fused expert FFN and the layer op run it too (test_moe_expert_ffn.py, test_moe_layer_kernels.py)."""

import contextvars

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mamba_r1.ops import moe_grouped_gemm
from mamba_r1.ops.moe_dispatch import grouped_matmul as dispatch_grouped_matmul
from mamba_r1.ops.moe_grouped_gemm import grouped_gemm, grouped_gemm_applies, grouped_matmul
from tests.conftest import DEVICE, TOL, rel_err

# The kernel's dtypes where the tests run: half precision on the GPU, float32 under the interpreter.
KERNEL_DTYPES = (torch.bfloat16, torch.float16) if DEVICE == "cuda" else (torch.float32,)


def _segments(rows_per_expert):
    return torch.tensor(rows_per_expert, device=DEVICE).cumsum(0).to(torch.int32)  # (E,) end rows


def _loop_reference(x, w, rows_per_expert):
    """float64, expert by expert: x[rows of e] @ w[e]."""
    return torch.cat([xe.double() @ we.double() for xe, we in zip(x.split(rows_per_expert), w)])


@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
@pytest.mark.parametrize("transposed", [False, True])
@settings(deadline=None, max_examples=12)
@given(rows_per_expert=st.lists(st.integers(0, 41), min_size=1, max_size=5),
       k=st.integers(1, 9).map(lambda m: 8 * m), n=st.integers(1, 9).map(lambda m: 8 * m), seed=st.integers(0, 99))
def test_matches_per_expert_loop(dtype, transposed, rows_per_expert, k, n, seed):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(sum(rows_per_expert), k, generator=gen).to(DEVICE, dtype)
    num_experts = len(rows_per_expert)
    if transposed:  # the input gradient's case: the (E, N, K) weight read as its (E, K, N) transposed view
        w = torch.randn(num_experts, n, k, generator=gen).to(DEVICE, dtype).transpose(-2, -1)
    else:
        w = torch.randn(num_experts, k, n, generator=gen).to(DEVICE, dtype)
    assert grouped_gemm_applies(x, w)
    got = grouped_gemm(x, w, _segments(rows_per_expert))
    assert got.shape == (x.shape[0], n) and got.dtype == dtype
    if x.shape[0]:
        assert rel_err(got, _loop_reference(x, w, rows_per_expert)) <= TOL[dtype]


@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
def test_tiles_never_write_the_next_experts_rows(dtype):
    """Segment sizes straddling the row tiles: each row is its own expert's product, not a neighbour's (a tile that
    stored the next expert's rows with its own weight would corrupt them, order-dependently)."""
    block_m = moe_grouped_gemm._blocks(torch.empty(0, device=DEVICE), 256)[0]
    rows_per_expert = [block_m + 1, 1, block_m - 1, 0, 2 * block_m + 3]
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(sum(rows_per_expert), 16, generator=gen).to(DEVICE, dtype)
    # Weights far apart (expert e scaled by 4**e, within float16's range): a row computed with a neighbour's weight
    # is off by 4x or more.
    scale = 4.0 ** torch.arange(len(rows_per_expert), dtype=torch.float32)
    w = (torch.randn(len(rows_per_expert), 16, 24, generator=gen) * scale[:, None, None]).to(DEVICE, dtype)
    got = grouped_gemm(x, w, _segments(rows_per_expert)).double()
    want = _loop_reference(x, w, rows_per_expert)
    for got_e, want_e in zip(got.split(rows_per_expert), want.split(rows_per_expert)):
        if want_e.numel():
            assert rel_err(got_e, want_e) <= TOL[dtype]


def test_agrees_with_torch_grouped_mm():
    """The fallback computes the same products (up to rounding): an expert-FFN shape with an empty expert."""
    dtype = KERNEL_DTYPES[0]
    rows_per_expert = [37, 0, 64, 5]
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(sum(rows_per_expert), 48, generator=gen).to(DEVICE, dtype)
    w = torch.randn(4, 48, 80, generator=gen).to(DEVICE, dtype)
    ends = _segments(rows_per_expert)
    assert rel_err(grouped_gemm(x, w, ends), torch._grouped_mm(x, w, offs=ends)) <= TOL[dtype]


@pytest.mark.parametrize("why, make", [
    ("rows of 12 bytes (TMA wants 16-byte multiples)",
     lambda d: (torch.randn(5, 3, dtype=d), torch.randn(2, 3, 8, dtype=d))),
    ("x not contiguous", lambda d: (torch.randn(8, 5, dtype=d).t(), torch.randn(2, 8, 8, dtype=d))),
    ("weight neither contiguous nor a transposed contiguous one",
     lambda d: (torch.randn(5, 8, dtype=d), torch.randn(8, 2, 16, dtype=d).permute(1, 0, 2)[:, :, :8])),
])
def test_falls_back_to_torch_grouped_mm(why, make):
    x, w = (t.to(DEVICE) for t in make(KERNEL_DTYPES[0]))
    assert not grouped_gemm_applies(x, w), why
    ends = torch.tensor([2, x.shape[0]], device=DEVICE, dtype=torch.int32)
    try:
        want = torch._grouped_mm(x, w, offs=ends)
    except RuntimeError:  # what torch._grouped_mm refuses, grouped_gemm refuses alike
        with pytest.raises(RuntimeError):
            grouped_gemm(x, w, ends)
        return
    assert torch.equal(grouped_gemm(x, w, ends), want)


@pytest.mark.skipif(DEVICE == "cuda", reason="the CPU rule: bf16 on CPU is torch._grouped_mm's (no bf16 in Triton's "
                                             "interpreter)")
def test_half_precision_on_cpu_is_left_to_torch():
    x, w = torch.randn(4, 8, dtype=torch.bfloat16), torch.randn(2, 8, 8, dtype=torch.bfloat16)
    assert not grouped_gemm_applies(x, w)


@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
def test_grouped_matmul_gradients_match_torch_path(dtype):
    """The differentiable form against moe_dispatch.grouped_matmul (torch._grouped_mm's): output, x's gradient (the
    kernel with the weight read transposed) and the weight's, with an empty expert."""
    rows_per_expert = [9, 0, 23, 4]
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(sum(rows_per_expert), 24, generator=gen).to(DEVICE, dtype)
    w = torch.randn(4, 24, 40, generator=gen).to(DEVICE, dtype)
    grad = torch.randn(x.shape[0], 40, generator=gen).to(DEVICE, dtype)
    ends = _segments(rows_per_expert)
    results = []
    for fn in (grouped_matmul, dispatch_grouped_matmul):
        leaves = [t.clone().requires_grad_() for t in (x, w)]
        out = fn(*leaves, ends)
        out.backward(grad)
        results.append((out, *(leaf.grad for leaf in leaves)))
    for got, want in zip(*results):
        assert rel_err(got, want) <= TOL[dtype]


def test_op_passes_opcheck():
    rows_per_expert = [5, 0, 11]
    gen = torch.Generator().manual_seed(4)
    dtype = KERNEL_DTYPES[0]
    x = torch.randn(sum(rows_per_expert), 16, generator=gen).to(DEVICE, dtype).requires_grad_()
    w = torch.randn(3, 16, 8, generator=gen).to(DEVICE, dtype).requires_grad_()
    ends = _segments(rows_per_expert)
    torch.library.opcheck(moe_grouped_gemm.moe_grouped_gemm_op, (x, w, ends))
    grad = torch.randn(x.shape[0], 8, generator=gen).to(DEVICE, dtype)
    for need_x, need_w in ((True, True), (True, False), (False, True)):
        torch.library.opcheck(moe_grouped_gemm.moe_grouped_gemm_bwd_op,
                              (grad, x.detach(), w.detach(), ends, need_x, need_w))


def test_triton_allocator_is_set_only_when_missing():
    """The in-kernel descriptors need Triton's scratch allocator: set when the thread has none (the autograd engine's
    device thread starts without one), a user's own left in place. Triton keeps it in a context variable, so each
    case runs in a fresh copy of the context."""
    allocation = moe_grouped_gemm._ALLOCATION
    if allocation is None:
        pytest.skip("this triton keeps its allocator elsewhere")

    def after(start):
        allocation._allocator.set(start)
        moe_grouped_gemm._ensure_allocator()
        return allocation._allocator.get()

    def users_allocator(size, alignment, stream):
        return torch.empty(size, dtype=torch.int8)

    assert contextvars.copy_context().run(after, allocation.NullAllocator()) is moe_grouped_gemm._scratch
    assert contextvars.copy_context().run(after, users_allocator) is users_allocator
