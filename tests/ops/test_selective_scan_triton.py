"""selective_scan(backend="triton"): forward, last state and every gradient match the float64 reference; the backward
keeps no (batch, dim, seqlen, d_state) tensor; the custom op passes opcheck and compiles with fullgraph=True.

Without a GPU the kernels run under Triton's interpreter (conftest sets TRITON_INTERPRET=1), where the block sizes are
CHUNK_L=8 and BLOCK_D=2 (forward) or 4 (backward), so these small shapes cross chunk and channel-block edges.
"""

import contextlib
import dataclasses
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mamba_r1.ops.selective_scan import selective_scan
from mamba_r1.ops.selective_scan.ref import selective_scan_ref_float64
from tests.conftest import DEVICE, GRAD_TOL, TOL, autograd_node_names, rel_err

NAMES = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias", "initial_state")


def make_inputs(batch, dim, seqlen, d_state, groups=0, dtype=torch.float32, with_D=True, with_z=True,
                with_bias=True, with_initial_state=True, delta_softplus=True):
    """Inputs in Mamba's ranges (A = -(1..d_state) jittered, dt ~ 0.05; delta is already positive when the scan will
    not apply softplus). Activations (u, delta, B, C, z) in ``dtype``; parameters and the state in float32, as under
    autocast."""
    bc_shape = (batch, d_state, seqlen) if groups == 0 else (batch, groups, d_state, seqlen)
    delta = 0.5 * torch.randn(batch, dim, seqlen) + math.log(math.expm1(0.05))
    args = dict(
        u=torch.randn(batch, dim, seqlen),
        delta=delta if delta_softplus else torch.nn.functional.softplus(delta),
        A=-(torch.arange(1, d_state + 1, dtype=torch.float32).repeat(dim, 1) * (0.5 + torch.rand(dim, d_state))),
        B=torch.randn(*bc_shape),
        C=torch.randn(*bc_shape),
        D=torch.randn(dim) if with_D else None,
        z=torch.randn(batch, dim, seqlen) if with_z else None,
        delta_bias=0.1 * torch.randn(dim) if with_bias else None,
        initial_state=torch.randn(batch, dim, d_state) if with_initial_state else None,
    )
    for name in ("u", "delta", "B", "C", "z"):
        if args[name] is not None:
            args[name] = args[name].to(dtype)
    return {k: None if v is None else v.to(DEVICE).requires_grad_() for k, v in args.items()}


def grads_of(outputs, cotangents, args):
    """Gradients of sum(output * cotangent) w.r.t. every present input (None for absent ones)."""
    present = [k for k in NAMES if args[k] is not None]
    loss = sum((o.double() * c).sum() for o, c in zip(outputs, cotangents))
    grads = torch.autograd.grad(loss, [args[k] for k in present])
    return dict(zip(present, grads))


def term_magnitudes(args, delta_softplus):
    """The float64 reference run on the magnitudes of the terms it sums (|u|, |dt|, |B|, |C|, |D|, |h0|, |silu(z)|).

    A float32 kernel rounds each term, so its error scales with these magnitudes, not with the output when the data
    itself cancels (seqlen 1 with B, C shared by all channels makes every output dt u sum_n B_n C_n, which a draw can
    make 1e-4 of its terms): the forward error is measured against the larger of the two."""
    plain = {k: None if v is None else v.detach().double() for k, v in args.items()}
    dt = plain["delta"] + (0 if plain["delta_bias"] is None else plain["delta_bias"][:, None])
    dt = torch.nn.functional.softplus(dt) if delta_softplus else dt
    magnitude = {k: None if v is None else v.abs() for k, v in plain.items()}
    magnitude.update(delta=dt.abs(), delta_bias=None, z=None, A=plain["A"])
    y = selective_scan_ref_float64(**magnitude)
    return y if plain["z"] is None else y * torch.nn.functional.silu(plain["z"]).abs()


def check_against_reference(args, delta_softplus, return_last_state, dtype):
    out = selective_scan(**args, delta_softplus=delta_softplus, return_last_state=return_last_state,
                         backend="triton")
    ref = selective_scan_ref_float64(**args, delta_softplus=delta_softplus, return_last_state=return_last_state)
    outs, refs = (out, ref) if return_last_state else ((out,), (ref,))
    assert outs[0].dtype == args["u"].dtype and outs[0].shape == refs[0].shape
    scale = max(refs[0].norm().item(), term_magnitudes(args, delta_softplus).norm().item())
    err = (outs[0].double() - refs[0]).norm().item() / scale if torch.isfinite(outs[0]).all() else math.inf
    assert err <= TOL[dtype], f"output: relative error {err:.2e}"
    if return_last_state:
        assert outs[1].dtype == torch.float32 and outs[1].shape == refs[1].shape
        assert rel_err(outs[1], refs[1]) <= TOL[torch.float32]

    # Cotangents representable in the output dtype: autograd rounds them to it before our backward sees them, and the
    # reference must see the same ones.
    cotangents = [torch.randn_like(r).to(o.dtype).double() for o, r in zip(outs, refs)]
    grads = grads_of(outs, cotangents, args)
    ref_grads = grads_of(refs, cotangents, args)
    largest = max(g.norm().item() for g in ref_grads.values())
    for name, grad in grads.items():
        assert grad.dtype == args[name].dtype and grad.shape == args[name].shape, name
        if ref_grads[name].norm() == 0:
            # Structurally zero (dA when seqlen is 1 and there is no initial state: h_t - x_t = 0 exactly). A GPU
            # kernel's fused multiply-adds leave residue at the rounding level of the products: measure it against
            # the gradients' scale.
            err = grad.double().norm().item() / largest
        else:
            err = rel_err(grad, ref_grads[name])
        assert err <= GRAD_TOL[dtype], f"grad of {name}: relative error {err:.2e}"


def _groups_for(dim, pick):
    """0 means 3-D B/C; otherwise a divisor of dim, so some groups hold channel counts that are not multiples of 4."""
    divisors = [g for g in (1, 2, 3) if dim % g == 0]
    return 0 if pick == 0 else divisors[pick % len(divisors)]


@pytest.mark.parametrize("variant", ["registers", "memory"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@settings(deadline=None, max_examples=20)
@given(
    batch=st.integers(1, 2),
    dim=st.sampled_from([1, 3, 6]),
    seqlen=st.sampled_from([1, 2, 8, 11, 12, 17]),
    d_state=st.sampled_from([1, 2, 3, 5]),
    group_pick=st.integers(0, 3),
    with_D=st.booleans(),
    with_z=st.booleans(),
    with_bias=st.booleans(),
    with_initial_state=st.booleans(),
    softplus=st.booleans(),
    return_last_state=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_forward_and_gradients_match_float64_reference(variant, dtype, batch, dim, seqlen, d_state,
                                                       group_pick, with_D, with_z, with_bias, with_initial_state,
                                                       softplus, return_last_state, seed):
    torch.manual_seed(seed)
    args = make_inputs(batch, dim, seqlen, d_state, _groups_for(dim, group_pick), dtype, with_D, with_z, with_bias,
                       with_initial_state, softplus)
    with block_sizes_variant(variant):
        check_against_reference(args, softplus, return_last_state, dtype)


@contextlib.contextmanager
def block_sizes_variant(variant):
    """Run the kernels with the chunk carry in registers, per-program dB / dC partials and the adjoint as a reverse
    scan ("registers"), or with the carry through memory, atomically summed dB / dC, the adjoint as a forward scan
    over flipped tiles in one tl.associative_scan with the recompute, dB / dC spread over three buffers and the batch
    element varying fastest in the grid ("memory", as the GPU table runs them)."""
    from mamba_r1.ops.selective_scan import triton_fwd

    row = triton_fwd.block_sizes()
    memory = variant == "memory"
    triton_fwd.BLOCK_SIZE_OVERRIDE = dataclasses.replace(
        row, carry_in_memory=memory, atomic_bc=memory, flip_adjoint=memory, joint_scan=memory, batch_inner=memory,
        bc_copies=3 if memory else 1)
    try:
        yield
    finally:
        triton_fwd.BLOCK_SIZE_OVERRIDE = None


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 5, 9, 16, 0), (1, 2, 3, 64, 2)])
def test_large_d_state_matches_float64_reference(dtype, shape):
    batch, dim, seqlen, d_state, groups = shape
    args = make_inputs(batch, dim, seqlen, d_state, groups, dtype=dtype)
    check_against_reference(args, delta_softplus=True, return_last_state=True, dtype=dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("variant", ["registers", "memory"])
def test_whole_chunks_and_channel_blocks_run_unmasked(dtype, variant):
    """seqlen a multiple of the chunk and channels a multiple of the block: the kernels compile without masks (EVEN)."""
    from mamba_r1.ops.selective_scan import triton_fwd

    sizes = triton_fwd.block_sizes()
    seqlen, dim = 2 * sizes.chunk_l, 4 * max(sizes.fwd_block_d, sizes.bwd_block_d)
    for block_d in (sizes.fwd_block_d, sizes.bwd_block_d):
        assert triton_fwd.even_tiles(seqlen, sizes.chunk_l, dim, min(block_d, dim))
    assert not triton_fwd.even_tiles(seqlen + 1, sizes.chunk_l, dim, 1)
    args = make_inputs(2, dim, seqlen, 3, groups=1, dtype=dtype)
    with block_sizes_variant(variant):
        check_against_reference(args, delta_softplus=True, return_last_state=True, dtype=dtype)


@pytest.mark.skipif(DEVICE == "cpu", reason="the forward's inline-PTX scan runs on a GPU only (the interpreter takes "
                    "the tl.associative_scan path, which the tests above cover)")
@pytest.mark.parametrize("shape", [(2, 96, 1040, 16, 1), (1, 32, 528, 5, 0), (2, 16, 1024, 64, 2)])
def test_vector_tile_shapes_match_float64_reference(shape):
    """bf16 tiles with seqlen and strides multiples of 16 (vector_tiles: the GPU table's forward runs its inline-PTX
    scan), whole and partial chunks, d_state below and above 16, shared and grouped B / C."""
    from mamba_r1.ops.selective_scan import triton_fwd

    batch, dim, seqlen, d_state, groups = shape
    args = make_inputs(batch, dim, seqlen, d_state, groups, dtype=torch.bfloat16)
    assert triton_fwd.vector_tiles(seqlen, [args[name] for name in ("u", "delta", "z", "B", "C")])
    check_against_reference(args, delta_softplus=True, return_last_state=True, dtype=torch.bfloat16)


def test_bf16_long_sequence_stays_finite_and_accurate():
    args = make_inputs(1, 3, 300, 2, dtype=torch.bfloat16)
    check_against_reference(args, delta_softplus=True, return_last_state=True, dtype=torch.bfloat16)


def _launch_both(u, delta, A, B, C, D, z, delta_bias, dout):
    """Forward and backward launchers on (batch, dim, seqlen) u / delta / z / dout and (batch, groups, d_state,
    seqlen) B / C as given (no casts on the way): every output and gradient, by name."""
    from mamba_r1.ops.selective_scan import triton_bwd, triton_fwd

    out = torch.empty_like(u)
    last_state, ckpt = triton_fwd.selective_scan_fwd_launch(u, delta, A, B, C, D, z, delta_bias, None, True, out)
    du, ddelta, dz = torch.empty_like(u), torch.empty_like(delta), torch.empty_like(z)
    grads = triton_bwd.selective_scan_bwd_launch(dout, None, u, delta, A, B, C, D, z, delta_bias, ckpt, True, False,
                                                 du, ddelta, dz)
    return dict(out=out, last_state=last_state, ckpt=ckpt, du=du, ddelta=ddelta, dz=dz,
                **{f"d{k}": v for k, v in grads.items() if v is not None})


@pytest.mark.parametrize("shape", [(2, 3, 18, 5, 1), (1, 4, 10, 3, 2)])
def test_bf16_b_and_c_read_as_pairs_give_the_same_results(shape):
    """BlockSizes.paired_bc: bfloat16 B and C are read as int32 pairs and widened by integer ops. bfloat16 to float32
    is exact, so the kernels must give the same results as on B.float(), C.float() (only the atomics' order may
    differ, on a GPU). The other inputs are float32, so this runs under the interpreter too."""
    from mamba_r1.ops.selective_scan import triton_fwd

    batch, dim, seqlen, d_state, groups = shape
    torch.manual_seed(0)
    args = {k: None if v is None else v.detach() for k, v in make_inputs(batch, dim, seqlen, d_state, groups).items()}
    B16, C16 = args["B"].to(torch.bfloat16), args["C"].to(torch.bfloat16)
    assert triton_fwd.bf16_pairs(B16, C16) is not None
    dout = torch.randn_like(args["u"])
    common = dict(u=args["u"], delta=args["delta"], A=args["A"], D=args["D"], z=args["z"],
                  delta_bias=args["delta_bias"], dout=dout)
    row = triton_fwd.block_sizes()
    try:
        triton_fwd.BLOCK_SIZE_OVERRIDE = dataclasses.replace(row, paired_bc=True)
        paired = _launch_both(B=B16, C=C16, **common)
        triton_fwd.BLOCK_SIZE_OVERRIDE = dataclasses.replace(row, paired_bc=False)
        plain = _launch_both(B=B16.float(), C=C16.float(), **common)
    finally:
        triton_fwd.BLOCK_SIZE_OVERRIDE = None
    assert paired.keys() == plain.keys()
    for name, want in plain.items():
        err = rel_err(paired[name], want)
        assert err <= (1e-6 if row.atomic_bc else 0.0), f"{name}: relative error {err:.1e}"


def test_bf16_pairs_only_where_the_int32_view_is_exact():
    from mamba_r1.ops.selective_scan import triton_fwd

    even = torch.randn(1, 1, 3, 10).to(torch.bfloat16)
    B32, C32 = triton_fwd.bf16_pairs(even, even)
    assert B32.dtype == torch.int32 and B32.shape == (1, 1, 3, 5)
    assert torch.equal(B32.view(torch.bfloat16), even)
    odd = torch.randn(1, 1, 3, 9).to(torch.bfloat16)
    assert triton_fwd.bf16_pairs(odd, odd) is None  # odd seqlen
    assert triton_fwd.bf16_pairs(even, even.float()) is None  # not bfloat16
    shifted = torch.randn(1, 1, 3, 11).to(torch.bfloat16)[..., 1:]
    assert triton_fwd.bf16_pairs(even, shifted) is None  # odd element offset: rows not 4-byte aligned
    wide = torch.randn(1, 1, 3, 21).to(torch.bfloat16)[..., :10]
    assert triton_fwd.bf16_pairs(wide, even) is None  # odd row stride


def test_strided_inputs_match_contiguous_ones():
    batch, dim, seqlen, d_state = 2, 6, 13, 5
    args = make_inputs(batch, dim, seqlen, d_state)
    # Layouts seen in Mamba: delta permuted from a (dim, batch * seqlen) matmul, B and C sliced out of one projection,
    # u a channel slice, the output's gradient expanded (stride 0).
    delta_t = args["delta"].detach().permute(1, 0, 2).contiguous().permute(1, 0, 2).requires_grad_()
    BC = torch.cat([args["B"].detach(), args["C"].detach()], dim=1).requires_grad_()
    wide_u = torch.randn(batch, 2 * dim, seqlen, device=DEVICE, requires_grad=True)
    strided = dict(args, delta=delta_t, B=BC[:, :d_state], C=BC[:, d_state:], u=wide_u[:, ::2])
    out = selective_scan(**strided, delta_softplus=True, backend="triton")
    ref = selective_scan_ref_float64(**strided, delta_softplus=True)
    assert rel_err(out, ref) <= TOL[torch.float32]
    cotangent = torch.ones((), device=DEVICE).expand(out.shape)
    got = torch.autograd.grad(out, [delta_t, BC, wide_u], cotangent)
    want = torch.autograd.grad(ref, [delta_t, BC, wide_u], cotangent.double())
    for g, w in zip(got, want):
        assert rel_err(g, w) <= GRAD_TOL[torch.float32]


def test_backward_keeps_no_full_state_tensor():
    from mamba_r1.ops.selective_scan.triton_fwd import num_chunks

    batch, dim, seqlen, d_state = 1, 8, 32, 8
    args = make_inputs(batch, dim, seqlen, d_state)
    saved_shapes = []

    def pack(t):
        saved_shapes.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        selective_scan(**args, delta_softplus=True, backend="triton")
    # What the backward needs: the inputs and the float32 state at each chunk start, all <= 1/8 of the full states.
    assert (batch, dim, num_chunks(seqlen), d_state) in saved_shapes, saved_shapes
    assert max(math.prod(s) for s in saved_shapes) <= batch * dim * seqlen * d_state // 8, saved_shapes


@pytest.mark.parametrize("variant", ["registers", "memory"])
def test_custom_ops_pass_opcheck(variant):
    from mamba_r1.ops.selective_scan.autograd import selective_scan_bwd_op, selective_scan_fwd_op

    # 4-D B and C in float32: the gradients come back as the kernels leave them (with atomics, sliced out of rows
    # padded to whole chunks), and must still have the fake implementation's strides.
    args = make_inputs(1, 3, 9, 2, groups=1)
    inputs = [args[k] for k in NAMES]
    with block_sizes_variant(variant):
        torch.library.opcheck(selective_scan_fwd_op, inputs + [True])
        # The backward op is not itself differentiable (no double backward): check it on plain tensors.
        plain = [t.detach() for t in inputs]
        _, last_state, checkpoints = selective_scan_fwd_op(*plain, True)
        cotangents = [torch.randn_like(plain[0]), torch.randn_like(last_state)]
        torch.library.opcheck(selective_scan_bwd_op, cotangents + plain + [checkpoints, True])


@pytest.mark.parametrize("groups", [0, 2])
def test_db_dc_copies_and_batch_inner_grid_match_reference(groups):
    """The GPU table's dB / dC atomics: channel blocks add into block % bc_copies of several buffers, and the grid runs
    the batch element fastest. Here 3 copies fed by 3 channel blocks per group (dim 24 in blocks of 4) over 3 batch
    elements: forward and every gradient against the float64 reference."""
    from mamba_r1.ops.selective_scan import triton_fwd

    torch.manual_seed(1)
    args = make_inputs(3, 24, 21, 5, groups=groups)
    with block_sizes_variant("memory"):
        sizes = triton_fwd.block_sizes()
        assert sizes.bc_copies == 3 and sizes.batch_inner and sizes.atomic_bc and 24 // max(groups, 1) // 4 >= 3
        check_against_reference(args, delta_softplus=True, return_last_state=True, dtype=torch.float32)


@pytest.mark.parametrize("variant", ["registers", "memory"])
def test_empty_batch_gives_empty_outputs_and_gradients(variant):
    """batch 0: empty output and last state, zero-size gradients of the activations and zero gradients of the
    parameters (no division by the empty size anywhere in the launchers)."""
    args = make_inputs(0, 3, 10, 4)
    with block_sizes_variant(variant):
        out, last = selective_scan(**args, delta_softplus=True, return_last_state=True, backend="triton")
        assert out.shape == (0, 3, 10) and last.shape == (0, 3, 4)
        grads = torch.autograd.grad(out.sum() + last.sum(), [args[k] for k in NAMES])
    for name, grad in zip(NAMES, grads):
        assert grad.shape == args[name].shape, name
        assert torch.count_nonzero(grad) == 0, name


def test_eager_calls_skip_the_dispatcher_with_the_same_results(monkeypatch):
    """Eagerly the scan runs the custom ops' bodies under a plain autograd.Function (eager_custom_ops.run_op); traced
    (what torch.compile sees) the custom ops themselves. Same kernels: output, last state and every gradient equal bit
    for bit, and the eager graph has the plain node."""
    from mamba_r1.ops import eager_custom_ops

    torch.manual_seed(0)
    leaves = make_inputs(2, 5, 19, 3, groups=0)
    cotangent = torch.randn(2, 5, 19, device=DEVICE)
    results = []
    for traced in (False, True):
        monkeypatch.setattr(eager_custom_ops, "tracing", lambda: traced)
        args = {k: None if v is None else v.detach().clone().requires_grad_() for k, v in leaves.items()}
        out, last = selective_scan(**args, delta_softplus=True, return_last_state=True, backend="triton")
        names = autograd_node_names(out)
        grads = torch.autograd.grad((out * cotangent).sum() + last.sum(), [args[k] for k in NAMES])
        results.append((names, [out.detach(), last.detach(), *grads]))
    (eager_names, eager), (traced_names, traced) = results
    assert "_SelectiveScanEagerBackward" in eager_names
    assert "_SelectiveScanEagerBackward" not in traced_names
    for got, want in zip(eager, traced):
        assert torch.equal(got, want)


def test_compiles_with_fullgraph():
    args = make_inputs(2, 3, 10, 3, groups=3, dtype=torch.bfloat16)

    def scan(**kw):
        out, last = selective_scan(**kw, delta_softplus=True, return_last_state=True, backend="triton")
        return out.float().sum() + last.sum()

    compiled = torch.compile(scan, fullgraph=True, backend="aot_eager")
    got = torch.autograd.grad(compiled(**args), [args["u"], args["A"], args["B"]])
    want = torch.autograd.grad(scan(**args), [args["u"], args["A"], args["B"]])
    for g, w in zip(got, want):
        assert torch.equal(g, w)


def test_float64_raises_type_error_pointing_to_other_backends():
    args = make_inputs(1, 2, 3, 2)
    args["u"] = args["u"].double()
    with pytest.raises(TypeError, match="u of dtype torch.float64.*backend='ref'"):
        selective_scan(**args, backend="triton")


@pytest.mark.skipif(DEVICE != "cpu", reason="checks the CPU path without the interpreter")
def test_cpu_without_interpreter_raises_actionable_error(monkeypatch):
    from mamba_r1.ops.selective_scan import triton_fwd

    class CompiledKernelStandIn:  # what @triton.jit returns when TRITON_INTERPRET was not set
        pass

    monkeypatch.setattr(triton_fwd, "_selective_scan_fwd_kernel", CompiledKernelStandIn())
    with pytest.raises(RuntimeError, match="backend='torch'.*TRITON_INTERPRET=1"):
        selective_scan(**make_inputs(1, 2, 3, 2), backend="triton")


def test_package_imports_without_triton_and_says_what_to_do():
    script = (
        "import sys; sys.modules['triton'] = None\n"  # makes `import triton` raise ImportError
        "import torch, mamba_r1, mamba_r1.ops\n"
        "from mamba_r1.ops import selective_scan\n"
        "x = torch.randn(1, 2, 3)\n"
        "try:\n"
        "    selective_scan(x, x, -torch.ones(2, 1), torch.randn(1, 1, 3), torch.randn(1, 1, 3), backend='triton')\n"
        "except ImportError as err:\n"
        "    assert \"backend='torch'\" in str(err), err\n"
        "    print('ok')\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                            cwd=Path(__file__).resolve().parents[2])
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr
